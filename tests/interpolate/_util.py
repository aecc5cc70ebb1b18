"""Shared helpers for the interpolator tests (small grids, seeded draws)."""

from __future__ import annotations

import numpy as np


def grid_keypoints(shape: tuple[int, int, int], n: int, seed: int, margin: int = 2) -> np.ndarray:
    """``n`` distinct integer (grid-aligned) voxel positions at least ``margin`` voxels inside ``shape``."""
    rng = np.random.default_rng(seed)
    pts: set[tuple[int, int, int]] = set()
    while len(pts) < n:
        pts.add(tuple(int(rng.integers(margin, s - margin)) for s in shape))
    return np.array(sorted(pts), dtype=np.float64)


def affine_disps(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An affine displacement ``u(x) = M x + b`` (voxel units) evaluated at ``points``; returns ``(u, M, b)``."""
    m = np.array([[0.05, -0.02, 0.01], [0.03, 0.04, -0.06], [-0.01, 0.02, 0.03]])
    b = np.array([1.5, -0.7, 0.4])
    return points @ m.T + b, m, b


def affine_field(shape: tuple[int, int, int], m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense ``(3, I, J, K)`` float64 field of ``u(x) = M x + b`` on the voxel grid."""
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.einsum("ab,b...->a...", m, g) + b[:, None, None, None]

