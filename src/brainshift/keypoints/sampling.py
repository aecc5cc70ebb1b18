"""Keypoint sampling for simulated cases: sparse inputs and held-out targets from a ground-truth field.

For training and evaluation the published method (Assis et al. 2025) takes keypoints detected on the preop
image, attaches the ground-truth displacement at each, feeds ``k`` of them to the interpolator and keeps the
rest as targets for the target registration error (TRE). This module does that draw: every random choice
comes from the ``numpy.random.Generator`` passed in (draw first, then deterministic work), and the
displacements are the field interpolated trilinearly (``scipy.ndimage.map_coordinates``, order 1).
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import GeometryError, KeypointError
from brainshift.field import check_field


def trilinear_sample(field_vox: np.ndarray, points_vox: np.ndarray) -> np.ndarray:
    """Sample a displacement field trilinearly at continuous voxel positions.

    Uses ``scipy.ndimage.map_coordinates(order=1)`` per component, so the value is exact for a field that is
    affine in the voxel indices.

    Args:
        field_vox: ``(3, I, J, K)`` displacement field, voxel units.
        points_vox: ``(N, 3)`` 0-based voxel positions ``(i, j, k)``, each within ``[0, shape - 1]``.

    Returns:
        ``(N, 3)`` float64 displacements in voxel units along ``i, j, k``.

    Raises:
        GeometryError: the field is not ``(3, I, J, K)`` or not finite.
        KeypointError: points not ``(N, 3)``, not finite, or outside the grid.

    Convention: forward Lagrangian, voxel units: the point ``p`` moves to ``p + u(p)``.
    """
    from scipy.ndimage import map_coordinates

    field = check_field(field_vox)
    pts = _check_points(points_vox, field.shape[1:], "points_vox")
    if pts.shape[0] == 0:
        return np.zeros((0, 3))
    return np.stack(
        [map_coordinates(field[c], pts.T, order=1, mode="nearest", prefilter=False) for c in range(3)], axis=1
    ).astype(np.float64)


def sample_keypoints(
    field_vox: np.ndarray,
    candidates_vox: np.ndarray | None,
    allowed_mask: np.ndarray,
    *,
    k_min: int = 20,
    k_max: int = 20,
    rng: np.random.Generator,
    min_spacing_vox: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``k`` input keypoints with their ground-truth displacements; the rest are held-out targets.

    The number ``k`` is drawn uniformly in ``[k_min, k_max]``. Candidates whose nearest voxel is outside
    ``allowed_mask`` (typically brain minus tumour minus cavity) or outside the grid are dropped; ``k`` of the
    remaining ``M`` are chosen at random (in a random order, each at least ``min_spacing_vox`` from those
    already chosen) and the other ``M - k`` are returned, in their input order, as held-out targets. With
    ``candidates_vox=None`` the keypoints are random voxel centres of ``allowed_mask`` and nothing is held out.
    If fewer than ``k`` candidates can be chosen (few candidates or the spacing), as many as possible are
    returned as long as that is at least ``k_min``.

    Args:
        field_vox: ``(3, I, J, K)`` ground-truth displacement field, voxel units.
        candidates_vox: ``(M0, 3)`` candidate positions (e.g. detected keypoints), 0-based voxel ``(i, j, k)``,
            or ``None`` for random voxels of the mask.
        allowed_mask: ``(I, J, K)`` boolean mask of allowed positions.
        k_min: smallest number of keypoints (>= 1).
        k_max: largest number of keypoints (>= k_min).
        rng: the generator used for every random draw (number, choice, order).
        min_spacing_vox: minimum Euclidean distance in voxel units between chosen keypoints (0: none).

    Returns:
        ``(points_vox (k, 3), disps_vox (k, 3), heldout_points_vox (M - k, 3), heldout_disps_vox (M - k, 3))``,
        all float64 in voxel units; displacements are ``trilinear_sample(field_vox, points)``.

    Raises:
        GeometryError: field or mask of the wrong shape.
        KeypointError: bad ``k_min``/``k_max``, bad candidates, or fewer than ``k_min`` usable candidates.

    Convention: forward Lagrangian, voxel units: a chosen point ``p`` moves to ``p + d``.
    """
    field = check_field(field_vox)
    grid = field.shape[1:]
    mask = np.asarray(allowed_mask)
    if mask.shape != grid:
        raise GeometryError(f"expected an allowed mask on the field grid {grid}, got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not (int(k_min) == k_min and k_min >= 1 and int(k_max) == k_max and k_max >= k_min):
        raise KeypointError(f"expected integers 1 <= k_min <= k_max, got k_min={k_min!r}, k_max={k_max!r}")
    if not (np.isfinite(min_spacing_vox) and min_spacing_vox >= 0):
        raise KeypointError(f"expected min_spacing_vox >= 0, got {min_spacing_vox!r}")

    if candidates_vox is None:
        pool = np.argwhere(mask).astype(np.float64)
        source = "voxels in the allowed mask"
    else:
        cand = np.asarray(candidates_vox, dtype=np.float64)
        if cand.ndim != 2 or cand.shape[1] != 3:
            raise KeypointError(f"expected candidate keypoints of shape (M, 3), got {cand.shape}")
        if not np.all(np.isfinite(cand)):
            raise KeypointError("expected finite candidate keypoints, found NaN or inf")
        in_grid = np.all((cand >= 0) & (cand <= np.array(grid) - 1), axis=1)
        nearest = np.clip(np.rint(cand).astype(int), 0, np.array(grid) - 1)
        pool = cand[in_grid & mask[tuple(nearest.T)]]
        source = f"of {cand.shape[0]} candidate keypoints inside the allowed mask"
    n_pool = pool.shape[0]
    if n_pool < k_min:
        raise KeypointError(f"expected at least k_min={k_min} keypoints to choose from, got {n_pool} {source}")

    k = int(rng.integers(k_min, k_max + 1))
    order = rng.permutation(n_pool)
    chosen = _choose_spaced(pool, order, k, float(min_spacing_vox))
    if chosen.size < k_min:
        raise KeypointError(
            f"expected at least k_min={k_min} keypoints {min_spacing_vox} voxels apart, got {chosen.size} "
            f"from {n_pool} {source}"
        )
    points = pool[chosen]
    disps = trilinear_sample(field, points)
    if candidates_vox is None:
        held = np.zeros((0, 3))
    else:
        rest = np.ones(n_pool, dtype=bool)
        rest[chosen] = False
        held = pool[rest]
    return points, disps, held, trilinear_sample(field, held)


def _choose_spaced(pool: np.ndarray, order: np.ndarray, k: int, spacing: float) -> np.ndarray:
    """Indices of up to ``k`` pool points taken in ``order``, each at least ``spacing`` from those taken."""
    if spacing <= 0:
        return order[:k]
    taken: list[int] = []
    for idx in order:
        if taken and np.min(np.linalg.norm(pool[taken] - pool[idx], axis=1)) < spacing:
            continue
        taken.append(int(idx))
        if len(taken) == k:
            break
    return np.asarray(taken, dtype=int)


def _check_points(points: np.ndarray, grid: tuple[int, ...], name: str) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise KeypointError(f"expected {name} of shape (N, 3), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise KeypointError(f"expected finite {name}, found NaN or inf")
    upper = np.array(grid) - 1
    outside = np.flatnonzero(np.any((pts < 0) | (pts > upper), axis=1))
    if outside.size:
        raise KeypointError(
            f"expected {name} inside the grid [0, {tuple(int(u) for u in upper)}], got {tuple(pts[outside[0]])} "
            f"(row {outside[0]})"
        )
    return pts
