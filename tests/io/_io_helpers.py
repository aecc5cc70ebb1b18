"""Helpers shared by the I/O tests (a uniquely named module; the folder is not a package, see conftest.py)."""

from __future__ import annotations

import numpy as np

OBLIQUE_SHAPE = (20, 24, 12)



def oblique_affine_matrix(angle_deg: float = 20.0, zooms=(0.5, 0.5, 3.0), origin=(90.0, -126.0, -72.0)) -> np.ndarray:
    """4x4 voxel-to-RAS affine: rotation about z by ``angle_deg`` times ``diag(zooms)``, then ``origin``."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(zooms)
    a[:3, 3] = origin
    return a


def smooth_field(shape, amplitude: float = 1.5) -> np.ndarray:
    """A smooth, non-constant float32 (3, I, J, K) field in voxel units (different in each component)."""
    i, j, k = np.meshgrid(*[np.linspace(0.0, 1.0, s) for s in shape], indexing="ij")
    f = np.stack([
        amplitude * np.sin(np.pi * i) * np.cos(np.pi * j),
        0.5 * amplitude * np.sin(np.pi * j) * (k - 0.3),
        0.3 * amplitude * np.cos(np.pi * k) * i,
    ])
    return f.astype(np.float32)
