"""An analytic brain-sag displacement field: a smooth, exactly known ground truth for quick cases and tests.

Convention: forward Lagrangian (the preop point at voxel ``p`` moves to ``p + u(p)``), float32 ``(3, I, J, K)``
in voxel units along ``i, j, k`` of the mask's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainshift.volume import Volume


@dataclass
class SagFieldParameters:
    """Parameters of :func:`analytic_sag_field` (all in mm in the RAS world frame)."""

    amplitude_mm: float = 8.0
    """Peak displacement at the craniotomy centre."""
    width_mm: float = 35.0
    """Standard deviation of the Gaussian fall-off with distance from the craniotomy centre."""


def analytic_sag_field(brain_mask: Volume, params: SagFieldParameters | None = None) -> tuple[np.ndarray, dict]:
    """A smooth analytic brain-sag displacement field under a right-superior craniotomy.

    With ``c`` the craniotomy centre (the brain-mask voxel maximising ``z + 0.6 x`` in RAS mm, i.e. the
    right-superior convexity) and ``g`` the unit vector from ``c`` toward the brain-mask centroid, the world
    displacement of a point ``x`` is ``d(x) = amplitude * exp(-|x - c|^2 / (2 width^2)) * g`` (mm, RAS).
    It is infinitely smooth and diffeomorphic for these parameters (max |grad d| = amplitude / (width
    sqrt(e)) ~ 0.14 < 1).

    Args:
        brain_mask: label Volume; its grid is the field's grid.
        params: amplitude and width (default :class:`SagFieldParameters`).

    Returns:
        ``(field_vox, info)``: float32 ``(3, I, J, K)``; info has ``craniotomy_ras`` and ``direction_ras``.

    Convention: forward Lagrangian, voxel units along i, j, k of ``brain_mask``'s grid.
    """
    from brainshift.field import field_ras_to_voxel, voxel_grid
    from brainshift.geometry import voxel_to_ras

    p = params or SagFieldParameters()
    idx = np.argwhere(brain_mask.data > 0)
    ras = voxel_to_ras(idx.astype(np.float64), brain_mask.affine)
    c = ras[np.argmax(ras[:, 2] + 0.6 * ras[:, 0])]
    g = ras.mean(axis=0) - c
    g /= np.linalg.norm(g)
    grid = voxel_grid(brain_mask.shape).reshape(3, -1).T
    x = voxel_to_ras(grid, brain_mask.affine)
    w = p.amplitude_mm * np.exp(-((x - c) ** 2).sum(axis=1) / (2.0 * p.width_mm ** 2))
    d_ras = (w[:, None] * g[None, :]).T.reshape((3,) + brain_mask.shape)
    return field_ras_to_voxel(d_ras, brain_mask.affine), {"craniotomy_ras": c.tolist(), "direction_ras": g.tolist()}
