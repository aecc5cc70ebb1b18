"""A tiny synthetic dataset in the simulator's layout, with an analytic smooth ground-truth field."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.simulate.dataset import Subject, write_case, write_subject
from brainshift.volume import Volume

SHAPE = (32, 40, 36)
#: anisotropic voxels (1.2, 1.0, 1.1 mm) so world-mm conversions matter
AFFINE = np.array([[1.2, 0, 0, -19.0], [0, 1.0, 0, -20.0], [0, 0, 1.1, -18.0], [0, 0, 0, 1]])


def make_subject(subject_id: str, tumour_centre_vox=(20, 14, 22), tumour_radius_vox=4.0) -> Subject:
    """Ellipsoid brain, spherical tumour, a smooth image with some structure."""
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    c = (np.asarray(SHAPE) - 1) / 2
    r2 = ((i - c[0]) / 13) ** 2 + ((j - c[1]) / 16) ** 2 + ((k - c[2]) / 14) ** 2
    brain = r2 <= 1.0
    t = np.asarray(tumour_centre_vox, dtype=np.float64)
    tumour = ((i - t[0]) ** 2 + (j - t[1]) ** 2 + (k - t[2]) ** 2) <= tumour_radius_vox**2
    image = brain * (100 + 30 * np.sin(i / 3.0) * np.cos(j / 4.0) + 20 * np.cos(k / 2.5)) + tumour * 60
    return Subject(
        subject_id=subject_id,
        image=Volume(image.astype(np.float32), AFFINE, "intensity"),
        brain_mask=Volume(brain.astype(np.uint8), AFFINE, "label"),
        tumour_mask=Volume(tumour.astype(np.uint8), AFFINE, "label"),
        ventricles_mask=Volume(np.zeros(SHAPE, np.uint8), AFFINE, "label"),
        info={"source": "test"},
    )


def analytic_field(subject: Subject, amplitude_mm: float, direction_ras=(0.0, 0.3, -1.0)) -> np.ndarray:
    """Gaussian bump sinking toward ``direction_ras`` around the tumour, zero outside the brain (voxel units)."""
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    centre = np.argwhere(subject.tumour_mask.data > 0).mean(axis=0)
    world = np.stack([i, j, k], axis=-1) @ AFFINE[:3, :3].T
    cw = AFFINE[:3, :3] @ centre
    w = np.exp(-((world - cw) ** 2).sum(-1) / (2 * 9.0**2))
    g = np.asarray(direction_ras) / np.linalg.norm(direction_ras)
    disp_ras = amplitude_mm * w[..., None] * g  # (I, J, K, 3) mm
    disp_vox = disp_ras @ np.linalg.inv(AFFINE[:3, :3]).T
    field = np.moveaxis(disp_vox, -1, 0) * (subject.brain_mask.data > 0)
    return field.astype(np.float32)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Two subjects, three cases (``a_000``, ``a_001`` of subject ``a``; ``b_000`` of ``b``)."""
    root = tmp_path_factory.mktemp("evalds")
    subjects = {"a": make_subject("a"), "b": make_subject("b", tumour_centre_vox=(12, 26, 14))}
    for s in subjects.values():
        write_subject(root, s)
    for case_id, sid, amp in (("a_000", "a", 4.0), ("a_001", "a", 6.0), ("b_000", "b", 5.0)):
        s = subjects[sid]
        write_case(root, case_id, sid, analytic_field(s, amp), AFFINE, s.tumour_mask, {"amplitude_mm": amp})
    return root
