"""Tiny synthetic datasets for the training tests, written with simulate.dataset (no simulator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHAPE = (16, 20, 16)


def smooth_field(shape, amp: float, centre, width: float) -> np.ndarray:
    """Analytic smooth forward field (voxel units): a Gaussian bump pushing along i and j."""
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    r2 = sum((g[a] - centre[a]) ** 2 for a in range(3))
    bump = np.exp(-r2 / (2 * width**2))
    return np.stack([amp * bump, 0.5 * amp * bump, np.zeros(shape)]).astype(np.float32)


def write_dataset(root: Path, n_subjects: int = 1, cases_per_subject: int = 1, shape=SHAPE,
                  spacing: float = 1.0, field_scale: float = 1.0) -> Path:
    """A dataset of ``n_subjects`` ellipsoid brains, each with ``cases_per_subject`` analytic cases whose fields
    are multiplied by ``field_scale`` (two datasets with equal ids and different ground truth)."""
    from brainshift.simulate.dataset import Subject, write_case, write_subject
    from brainshift.volume import Volume

    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = [-10.0, 5.0, 3.0]
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    c = (np.asarray(shape) - 1) / 2.0
    r = sum(((g[a] - c[a]) / (0.42 * shape[a])) ** 2 for a in range(3))
    brain = (r <= 1.0).astype(np.uint8)
    tumour = (sum((g[a] - (c[a] + 2)) ** 2 for a in range(3)) <= 4.0).astype(np.uint8)
    rng = np.random.default_rng(0)
    for s in range(n_subjects):
        image = (100.0 * brain + 30.0 * np.sin(g[0] / 2.0 + s) * brain + rng.normal(0, 1, shape)).astype(np.float32)
        sid = f"sub{s:02d}"
        write_subject(root, Subject(sid, Volume(image, aff), Volume(brain, aff, "label"),
                                    Volume(tumour, aff, "label"), Volume(np.zeros(shape, np.uint8), aff, "label"),
                                    {"seed": s}))
        for k in range(cases_per_subject):
            f = smooth_field(shape, 1.5 + 0.5 * k + 0.1 * s, c + np.array([k - 1.0, 1.0, 0.0]), 4.0) * brain
            if field_scale != 1.0:
                f = (f * np.float32(field_scale)).astype(np.float32)
            write_case(root, f"{sid}_c{k}", sid, f, aff, Volume(tumour, aff, "label"), {"k": k})
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """One subject, one case, 16 x 20 x 16 at 1 mm."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Four subjects with two cases each."""
    return write_dataset(tmp_path / "data", n_subjects=4, cases_per_subject=2)


@pytest.fixture
def two_datasets(tmp_path: Path) -> tuple[Path, Path]:
    """Folders ``a`` (subjects sub00-sub03) and ``b`` (sub00, sub01: the same ids), one case each, so the case
    ids ``sub00_c0`` and ``sub01_c0`` are in both; ``b``'s fields are twice ``a``'s (exact in float32), so a case
    read from the wrong folder shows."""
    return (write_dataset(tmp_path / "a", n_subjects=4),
            write_dataset(tmp_path / "b", n_subjects=2, field_scale=2.0))
