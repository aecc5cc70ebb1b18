"""Tiny ellipsoidal phantom subjects written as NIfTI files (for the batch and command tests)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from brainshift.simulate.dataset import Subject
from brainshift.volume import Volume

SPACING_MM = 2.0
SHAPE = (40, 44, 36)


def phantom_arrays(tumour_offset_mm=(10.0, 5.0, 8.0)):
    """Ellipsoidal brain (semi-axes 32, 38, 28 mm), a 10 mm spherical tumour, a small ventricle; 2 mm grid."""
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = -np.asarray(SHAPE) * SPACING_MM / 2
    xyz = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) * SPACING_MM + affine[:3, 3]
    brain = ((xyz / np.array([32.0, 38.0, 28.0])) ** 2).sum(-1) <= 1
    tumour = (((xyz - np.asarray(tumour_offset_mm)) / 10.0) ** 2).sum(-1) <= 1
    vent = (((xyz - np.array([-8.0, 0.0, 0.0])) / np.array([4.0, 10.0, 4.0])) ** 2).sum(-1) <= 1
    image = np.where(brain, 0.8, 0.0).astype(np.float32)
    image[tumour] = 0.4
    return image, brain, tumour & brain, vent & brain & ~tumour, affine


def phantom_subject(subject_id: str = "ph", tumour_offset_mm=(10.0, 5.0, 8.0)) -> Subject:
    image, brain, tumour, vent, affine = phantom_arrays(tumour_offset_mm)

    def lab(m):
        return Volume(m.astype(np.uint8), affine, "label")

    return Subject(subject_id, Volume(image, affine), lab(brain), lab(tumour), lab(vent), info={"source": "phantom"})


def write_phantom_files(folder: Path, name: str, tumour_offset_mm=(10.0, 5.0, 8.0), empty_tumour: bool = False) -> dict:
    """Write ``<name>_{t1,brain,tumour,vent}.nii.gz``; returns a subject spec dict (paths as str)."""
    folder.mkdir(parents=True, exist_ok=True)
    image, brain, tumour, vent, affine = phantom_arrays(tumour_offset_mm)
    if empty_tumour:
        tumour = np.zeros_like(tumour)
    spec = {}
    for key, arr in (("image", image), ("brain_mask", brain), ("tumour", tumour), ("ventricles", vent)):
        path = folder / f"{name}_{key}.nii.gz"
        data = arr if key == "image" else arr.astype(np.uint8)
        nib.save(nib.Nifti1Image(data, affine), str(path))
        spec[key] = str(path)
    return spec
