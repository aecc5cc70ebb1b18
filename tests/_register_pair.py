"""A small preop / intraop image pair with a known forward field, the intraop on another grid (register tests)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE = (64, 64, 64)
CENTRE = np.array([34.0, 30.0, 32.0])
#: Intraop grid: flipped along i, 1.1 mm voxels, origin shifted (world mm = preop voxels, identity preop affine).
INTRAOP_AFFINE = np.array([[-1.1, 0, 0, 66.0], [0, 1.1, 0, -3.0], [0, 0, 1.1, -2.0], [0, 0, 0, 1.0]])
INTRAOP_SHAPE = (62, 60, 60)


def textured_volume(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Gaussian-smoothed (sigma 2 voxels) white noise rescaled to [0, 1] (as tests/keypoints/_textured.py)."""
    img = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return (img - img.min()) / (img.max() - img.min())


def true_field(x: np.ndarray) -> np.ndarray:
    """Forward field (preop voxels = mm): a smooth bump up to ~3 mm plus a 0.5 mm shift; x (3, ...) -> (3, ...)."""
    w = np.exp(-((x - CENTRE.reshape(3, *[1] * (x.ndim - 1))) ** 2).sum(axis=0) / (2 * 16.0**2))
    return np.stack([2.5 * w, -1.5 * w, 1.0 * w + 0.5])


def make_pair(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(preop, intraop)`` float32 arrays: preop on an identity-affine grid, intraop the moved tissue on
    :data:`INTRAOP_AFFINE` (the preop point ``q`` solving ``q + u(q) = y`` is shown at world ``y``)."""
    pre = textured_volume(SHAPE, seed=seed).astype(np.float32)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in INTRAOP_SHAPE], indexing="ij"))
    y = np.einsum("ab,b...->a...", INTRAOP_AFFINE[:3, :3], g) + INTRAOP_AFFINE[:3, 3].reshape(3, 1, 1, 1)
    q = y.copy()
    for _ in range(30):  # fixed point q <- y - u(q)
        q = y - true_field(q)
    intra = ndimage.map_coordinates(pre, q, order=3, mode="nearest").astype(np.float32)
    return pre, intra
