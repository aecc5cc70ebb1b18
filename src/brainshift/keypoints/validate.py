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
