"""A synthetic textured volume for descriptor and matching tests (seeded smoothed noise, values in [0, 1])."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def textured_volume(shape: tuple[int, int, int] = (72, 72, 72), seed: int = 0) -> np.ndarray:
    """Gaussian-smoothed (sigma 2 voxels) white noise rescaled to [0, 1], float64: blobs at many scales."""
    img = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return (img - img.min()) / (img.max() - img.min())
