"""Small synthetic subjects for the simulator tests: an ellipsoidal brain with a spherical tumour.

The grid is 1 mm isotropic with RAS x = i - ci, y = j - cj, z = k - ck, so the phantom's centre is the RAS
origin and mirroring the array along i mirrors the anatomy left-right (x -> -x).
"""

from __future__ import annotations

import numpy as np

from brainshift.simulate.dataset import Subject
from brainshift.volume import Volume


def box_volume(shape=(9, 9, 9), margin: int = 0) -> Volume:
    """A label volume that is 1 on an ``shape`` box (plus ``margin`` zero voxels around), identity-like affine."""
    data = np.zeros(tuple(s + 2 * margin for s in shape), dtype=np.uint8)
    data[tuple(slice(margin, margin + s) for s in shape)] = 1
    return Volume(data, np.eye(4), "label")


def ellipsoid_subject(semi_axes_mm=(30.0, 35.0, 25.0), tumour_centre_ras=(12.0, 0.0, 6.0),
                      tumour_radius_mm: float = 7.0, ventricles: bool = True) -> Subject:
    """Ellipsoidal brain (semi-axes in mm) on a 1 mm grid centred on the RAS origin, with a spherical tumour."""
    half = np.ceil(np.asarray(semi_axes_mm)).astype(int) + 3
    shape = tuple(int(2 * h + 1) for h in half)
    aff = np.eye(4)
    aff[:3, 3] = -half
    x, y, z = np.meshgrid(*[np.arange(s) - h for s, h in zip(shape, half, strict=True)], indexing="ij")
    a, b, c = semi_axes_mm
    brain = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1.0
    tc = np.asarray(tumour_centre_ras)
    tum = ((x - tc[0]) ** 2 + (y - tc[1]) ** 2 + (z - tc[2]) ** 2 <= tumour_radius_mm ** 2) & brain
    ven = np.zeros_like(brain)
    if ventricles:
        ven = ((x / 4.0) ** 2 + (y / 10.0) ** 2 + ((z - 2.0) / 5.0) ** 2 <= 1.0) & ~tum
    image = np.where(brain, 100.0, 0.0).astype(np.float32) - 40.0 * tum

    def lab(m):
        return Volume(m.astype(np.uint8), aff, "label")

    return Subject("ellipsoid", Volume(image, aff), lab(brain), lab(tum), lab(ven))


def mirror_subject(subject: Subject) -> Subject:
    """The subject mirrored left-right (array flipped along i; same affine, so x -> -x about the centre)."""
    def flip(v: Volume) -> Volume:
        return Volume(np.ascontiguousarray(v.data[::-1]), v.affine, v.kind)

    return Subject(subject.subject_id + "_mirror", flip(subject.image), flip(subject.brain_mask),
                   flip(subject.tumour_mask), flip(subject.ventricles_mask))
