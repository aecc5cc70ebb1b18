"""Checks of matched keypoints before interpolation (any frame-free use, or on an image grid).

Convention: points are 0-based voxel indices ``(i, j, k)`` and displacements voxel units, both ``(N, 3)``.
"""

from __future__ import annotations

import warnings

import numpy as np

from brainshift.errors import KeypointError

#: coplanarity threshold: smallest / largest singular value of the centred points
COPLANAR_RTOL = 1e-3
#: locations closer than this (voxels) are the same location; displacements closer than this are identical
DUPLICATE_ATOL_VOX = 1e-6
#: points at most this far (voxels) outside ``[0, shape - 1]`` (rounding in frame conversions) are accepted
INSIDE_ATOL_VOX = 1e-6


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"


def validate_keypoints(points_vox: np.ndarray, disps_vox: np.ndarray, shape: tuple[int, int, int] | None, *,
                       min_points: int = 4, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check keypoints before interpolation; merge identical duplicates.

    Checks, in order: shapes ``(N, 3)``; finite values; every point inside the image
    (``0 <= p <= shape - 1`` along each axis, to ``INSIDE_ATOL_VOX``); duplicate locations (to
    ``DUPLICATE_ATOL_VOX``): identical displacements are merged with a warning, different ones are an
    error; at least ``min_points`` points; not all in one plane (smallest singular value of the centred
    points ``<= COPLANAR_RTOL`` times the largest; a 3-D simplex is needed for Delaunay interpolation).

    Args:
        points_vox: ``(N, 3)`` voxel indices.
        disps_vox: ``(N, 3)`` voxel-unit displacements.
        shape: image grid ``(I, J, K)``; ``None`` skips the inside-the-image check (frame-free use, e.g. by
            the interpolators on points that may lie anywhere).
        min_points: minimum number of distinct keypoints.
        names: how messages name keypoint ``n`` (e.g. ``"line 7 of kp.csv"``, the line a user sees in the file);
            default ``"keypoint n"`` (0-based row).

    Returns:
        ``(points_vox, disps_vox)`` float64, duplicates merged (first occurrence kept, order preserved).

    Raises:
        KeypointError: with an "expected ..., got ..." message for each failed check.
    """
    from brainshift.io.keypoints import check_keypoint_pairs

    pts, dsp = check_keypoint_pairs(points_vox, disps_vox)

    def name(i: int) -> str:
        return f"keypoint {i}" if names is None or i >= len(names) else f"the keypoint on {names[i]}"

    if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(dsp))):
        bad = int(np.flatnonzero(~(np.isfinite(pts).all(1) & np.isfinite(dsp).all(1)))[0])
        raise KeypointError(f"expected finite keypoints and displacements, got NaN or inf in {name(bad)} "
                            f"{_fmt(pts[bad])} -> {_fmt(dsp[bad])}")
    upper = np.asarray(shape if shape is not None else (np.inf,) * 3, dtype=np.float64) - 1
    outside = np.flatnonzero(((pts < -INSIDE_ATOL_VOX) | (pts > upper + INSIDE_ATOL_VOX)).any(axis=1))
    if shape is not None and outside.size:
        i = int(outside[0])
        raise KeypointError(f"expected keypoints inside the image (0 <= voxel index <= shape - 1, image shape "
                            f"{tuple(int(s) for s in shape)}), got {outside.size} outside, the first being "
                            f"{name(i)} at voxel {_fmt(pts[i])}")
    key = np.round(pts / DUPLICATE_ATOL_VOX).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if len(first) < len(pts):
        merged = []
        for i in range(len(pts)):
            j = int(first[inverse[i]])
            if j == i:
                continue
            if np.abs(dsp[i] - dsp[j]).max() > DUPLICATE_ATOL_VOX:
                raise KeypointError(f"expected one displacement per keypoint location, got "
                                    f"{f'keypoints {j} and {i}' if names is None else f'{name(j)} and {name(i)}'} at "
                                    f"voxel {_fmt(pts[i])} with displacements {_fmt(dsp[j])} and {_fmt(dsp[i])}")
            merged.append((j, i))
        keep = np.sort(first)
        if names is None:
            listed = "keypoints " + ", ".join(f"{i} (= {j} at {_fmt(pts[j])})" for j, i in merged[:5])
        else:
            listed = ", ".join(f"{name(i)} (= {name(j)} at {_fmt(pts[j])})" for j, i in merged[:5])
        more = f" and {len(merged) - 5} more" if len(merged) > 5 else ""
        warnings.warn(f"merged {len(merged)} duplicate keypoint(s) with identical displacements: "
                      f"{listed}{more}", stacklevel=2)
        pts, dsp = pts[keep], dsp[keep]
    n = len(pts)
    if n < min_points:
        raise KeypointError(f"expected at least {min_points} distinct keypoints, got {n}")
    centred = pts - pts.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False) if n > 1 else np.zeros(3)
    sv = np.concatenate([sv, np.zeros(3 - len(sv))]) if len(sv) < 3 else sv
    if sv[0] == 0 or sv[2] <= COPLANAR_RTOL * sv[0]:
        where, what = ("on one line", "line") if sv[1] <= COPLANAR_RTOL * sv[0] else ("in one plane", "plane")
        raise KeypointError(f"expected keypoints spanning 3-D space, got: all {n} keypoints lie {where} "
                            f"(singular values of the centred points {_fmt(sv)} voxels); add keypoints off that "
                            f"{what}")
    return pts, dsp


#: Keypoints whose convex hull holds less than this fraction of the brain (or image foreground) volume are
#: "clustered": a spline extrapolates their trend across the rest of the brain. Chosen on the leave-one-model-out
#: validation cases (bench/RESULTS.md, "Generalization re-measured", session 14): 10-40 keypoints within 40 mm of
#: the craniotomy span 0.3-3.3 % of the brain, detected, random or cortical keypoints 6.6-68 %.
CLUSTERED_HULL_FRACTION = 0.04


def hull_fraction(points_vox: np.ndarray, affine: np.ndarray, region: np.ndarray) -> float:
    """Volume of the keypoints' convex hull over the volume of ``region``, both in world mm³.

    Args:
        points_vox: ``(N, 3)`` keypoints, 0-based voxel indices of the grid of ``region``.
        affine: ``(4, 4)`` voxel -> world (RAS mm) of that grid.
        region: ``(I, J, K)`` mask (nonzero = inside), e.g. the brain; its volume is the voxel count times the
            voxel volume ``|det A|``.

    Returns:
        The fraction (may exceed 1 for points outside the region); 0.0 for fewer than 4 points or points in a
        plane (no volume: ``scipy.spatial.ConvexHull`` raises QhullError); ``inf`` for an empty region.

    Source: ``scipy.spatial.ConvexHull`` (Qhull).
    """
    from scipy.spatial import ConvexHull, QhullError

    pts = np.asarray(points_vox, np.float64).reshape(-1, 3)
    a3 = np.asarray(affine, np.float64)[:3, :3]
    region_mm3 = float(np.count_nonzero(region)) * abs(float(np.linalg.det(a3)))
    if len(pts) < 4:
        return 0.0
    try:
        hull_mm3 = float(ConvexHull(pts @ a3.T).volume)
    except (QhullError, ValueError):
        hull_mm3 = 0.0
    return hull_mm3 / region_mm3 if region_mm3 > 0 else float("inf")
