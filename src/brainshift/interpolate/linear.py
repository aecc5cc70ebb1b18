"""Delaunay (piecewise-linear, barycentric) interpolation of keypoint displacements.

Follows the linear baseline of the published method (Assis et al. 2025, arXiv:2508.13762, which used the
Delaunay-linear interpolator of Joutard et al.'s DrivingPointsPredictionMIR): tetrahedralise the keypoints
(Qhull through :class:`scipy.spatial.Delaunay`) and interpolate the displacement of every voxel
barycentrically inside its tetrahedron (:class:`scipy.interpolate.LinearNDInterpolator`). Outside the
keypoints' convex hull the published method adds the eight volume corners with zero displacement; nearest
keypoint extrapolation is offered as well.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate.base import check_keypoints, check_shape, register_interpolator

#: Voxels evaluated per block; bounds the temporary float64 coordinate / value arrays to ~13 MB each.
_BLOCK_VOXELS = 1 << 19


def volume_corners(shape: tuple[int, int, int]) -> np.ndarray:
    """The eight corner voxels ``(0,0,0) ... (I-1,J-1,K-1)`` of a grid, ``(8, 3)`` float64 (duplicates removed
    when an axis has length 1)."""
    i, j, k = (np.array([0.0, s - 1.0]) for s in shape)
    c = np.stack(np.meshgrid(i, j, k, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.unique(c, axis=0)


@register_interpolator("linear")
def linear_interpolate(
    points_vox: np.ndarray,
    disps_vox: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    outside: Literal["corners", "nearest"] = "corners",
) -> np.ndarray:
    """Piecewise-linear interpolation over the Delaunay tetrahedralisation of the keypoints.

    Args:
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices ``(i, j, k)``, N >= 4, not
            all on one plane.
        disps_vox: ``(N, 3)`` keypoint displacements, voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: accepted for the common interface and unused: barycentric weights are invariant under any
            affine map, so voxel and world coordinates give the same field.
        outside: how voxels outside the keypoints' convex hull are filled. ``"corners"`` (default, the
            published method) adds the eight volume corners with zero displacement to the triangulation
            (a corner that coincides with a keypoint is skipped, the keypoint wins), so the field decays
            linearly to zero towards the corners. ``"nearest"`` gives each outside voxel the displacement
            of its nearest keypoint (Euclidean in voxel units, :class:`scipy.spatial.cKDTree`).

    Returns:
        ``(3, I, J, K)`` float32 field. Exactly the keypoint displacement at each keypoint (grid-aligned
        keypoints). An affine displacement field is reproduced exactly inside the keypoints' convex hull
        with ``outside="nearest"``; with ``"corners"`` only inside tetrahedra whose four vertices are all
        keypoints (the Delaunay tetrahedralisation of keypoints plus corners may let a corner-vertex
        tetrahedron reach into the keypoints' hull), or everywhere if the corners are keypoints too.

    Convention: forward Lagrangian field in voxel units along ``i, j, k`` on the grid ``shape``.

    Raises:
        KeypointError: fewer than 4 keypoints, coplanar/collinear keypoints, conflicting duplicates,
            non-finite values, or a degenerate triangulation (Qhull error).
        BrainshiftError: unknown ``outside`` mode.
    """
    from scipy.interpolate import LinearNDInterpolator
    from scipy.spatial import Delaunay, QhullError, cKDTree

    if outside not in ("corners", "nearest"):
        raise BrainshiftError(f"expected outside in ('corners', 'nearest'), got {outside!r}")
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)

    tri_pts, tri_disps = pts, disps
    if outside == "corners":
        corners = volume_corners(shape)
        free = ~(corners[:, None, :] == pts[None, :, :]).all(axis=2).any(axis=1)
        tri_pts = np.concatenate([pts, corners[free]])
        tri_disps = np.concatenate([disps, np.zeros((int(free.sum()), 3))])
    try:
        tri = Delaunay(tri_pts)
    except QhullError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "Qhull error"
        raise KeypointError(
            f"expected keypoints that form a 3-D tetrahedralisation, got a degenerate set ({first_line})"
        ) from exc
    interp = LinearNDInterpolator(tri, tri_disps, fill_value=np.nan)
    tree = None

    n_i, n_j, n_k = shape
    field = np.empty((3, n_i, n_j, n_k), dtype=np.float32)
    jk = np.stack(np.meshgrid(np.arange(n_j, dtype=np.float64), np.arange(n_k, dtype=np.float64), indexing="ij"))
    jk = jk.reshape(2, -1).T  # (J*K, 2) in (j, k) order
    planes = max(1, _BLOCK_VOXELS // (n_j * n_k))
    for i0 in range(0, n_i, planes):
        i1 = min(n_i, i0 + planes)
        xyz = np.empty(((i1 - i0) * len(jk), 3))
        xyz[:, 0] = np.repeat(np.arange(i0, i1, dtype=np.float64), len(jk))
        xyz[:, 1:] = np.tile(jk, (i1 - i0, 1))
        vals = interp(xyz)
        miss = np.isnan(vals[:, 0])
        if miss.any():
            # "nearest": voxels outside the keypoints' hull. "corners": the hull is the whole box, so only
            # voxels that Qhull's tolerance puts a hair outside a boundary face land here; their nearest
            # triangulation vertex is on that face too.
            if tree is None:
                tree = cKDTree(tri_pts)
            _, idx = tree.query(xyz[miss], workers=-1)
            vals[miss] = tri_disps[idx]
        field[:, i0:i1] = vals.T.reshape(3, i1 - i0, n_j, n_k)
    return field
