"""Thin-plate spline as used by the published method (coarse evaluation, trilinear upsampling).

The published method (Assis et al. 2025, arXiv:2508.13762) computes its TPS initial field with the
thin-plate-spline routine of VoxelMorph++ (Heinrich & Hansen 2022): kernel ``U(r) = r^2 log r`` (the 2-D
thin-plate kernel, used in 3-D) on coordinates normalised to ``[-1, 1]`` per axis, a ridge ``lambda`` added
to the kernel matrix diagonal, an affine term, evaluation on a grid ``downsample`` times coarser and
trilinear upsampling. Our implementation is written from that description, in float64 NumPy for the solve.

Differences from the published code, all documented: the coarse grid has ``ceil(size / downsample)``
points per axis (the published code takes ``size // downsample``); ``U(0) = 0`` exactly (the published code
evaluates ``r^2 log(r + 1e-6)``, which differs by less than ``1e-6 r``). Because the ridge makes the spline
a smoothing spline, the field does not pass exactly through the keypoints unless ``lam = 0``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate.base import check_keypoints, check_shape, register_interpolator

#: Evaluation points per block (block x N float64 kernel matrix).
_BLOCK_POINTS = 1 << 15
#: Elements of one block's kernel matrix in :func:`tps_evaluate_grid` (2 MB of float64: cache-sized pieces).
_BLOCK_ELEMENTS = 1 << 18
#: Floor of squared distances in the kernel: ``0.5 * s * log(s)`` is then ``~1e-297`` instead of ``0 * -inf``.
_TINY = 1e-300


def normalise_voxel_coords(points_vox: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Map voxel indices to ``[-1, 1]`` per axis: ``i / (size - 1) * 2 - 1`` (``0`` on an axis of length 1).

    This is ``torch.nn.functional.affine_grid``'s ``align_corners=True`` convention: voxel ``0`` is ``-1``
    and voxel ``size - 1`` is ``+1``. Returns float64 ``(N, 3)``.
    """
    p = np.asarray(points_vox, dtype=np.float64)
    size = np.asarray(shape, dtype=np.float64)
    out = np.zeros_like(p)
    ok = size > 1
    out[:, ok] = p[:, ok] / (size[ok] - 1.0) * 2.0 - 1.0
    return out


def tps_kernel(r: np.ndarray) -> np.ndarray:
    """Thin-plate kernel ``U(r) = r^2 log r`` with ``U(0) = 0`` (its limit)."""
    r = np.asarray(r, dtype=np.float64)
    out = np.zeros_like(r)
    pos = r > 0
    out[pos] = r[pos] ** 2 * np.log(r[pos])
    return out


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b)


def tps_fit(centers: np.ndarray, values: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Solve the ridge-regularised TPS system ``[[K + lam I, P], [P^T, 0]] [w; a] = [values; 0]``.

    Args:
        centers: ``(N, 3)`` normalised keypoint coordinates.
        values: ``(N, C)`` values to fit.
        lam: ridge added to the kernel matrix diagonal.

    Returns:
        ``(w (N, C), a (4, C))``: kernel weights and affine coefficients for ``[1, x, y, z]``.

    Raises:
        KeypointError: the system is singular (e.g. keypoints on one plane).
    """
    n = len(centers)
    lhs = np.zeros((n + 4, n + 4))
    lhs[:n, :n] = tps_kernel(_pairwise_dist(centers, centers)) + lam * np.eye(n)
    lhs[:n, n] = 1.0
    lhs[:n, n + 1 :] = centers
    lhs[n:, :n] = lhs[:n, n:].T
    rhs = np.zeros((n + 4, values.shape[1]))
    rhs[:n] = values
    from threadpoolctl import threadpool_limits

    try:
        with threadpool_limits(limits=1, user_api="blas"):  # threaded LU was 2-20x slower on a busy 2-core CPU
            sol = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError as exc:
        raise KeypointError(f"expected a solvable TPS system, got a singular one for {n} keypoints ({exc})") from exc
    if not np.all(np.isfinite(sol)):
        raise KeypointError(f"expected a solvable TPS system, got non-finite coefficients for {n} keypoints")
    return sol[:n], sol[n:]


def tps_evaluate(x: np.ndarray, centers: np.ndarray, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Evaluate a fitted TPS at ``(M, 3)`` normalised points in blocks; returns ``(M, C)`` float64."""
    out = np.empty((len(x), w.shape[1]))
    for s in range(0, len(x), _BLOCK_POINTS):
        xb = x[s : s + _BLOCK_POINTS]
        out[s : s + len(xb)] = tps_kernel(_pairwise_dist(xb, centers)) @ w + a[0] + xb @ a[1:]
    return out


def tps_evaluate_grid(axes: list[np.ndarray], centers: np.ndarray, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Evaluate a fitted TPS on the tensor grid ``axes`` (three 1-D normalised coordinate arrays).

    Same values as :func:`tps_evaluate` on the grid's points (to rounding), faster: squared distances are
    sums of per-axis squared differences (one broadcast add per kernel term), the kernel is
    ``0.5 s log s`` on squared distances ``s`` (``0`` at ``s = 0``), and blocks of ``i`` planes run on two
    threads with single-threaded BLAS.

    Returns:
        ``(C, len(axes[0]), len(axes[1]), len(axes[2]))`` float64.
    """
    from brainshift.interpolate._chunks import run_chunks

    n = len(centers)
    sq = [(ax[:, None] - centers[None, :, d]) ** 2 for d, ax in enumerate(axes)]  # (len(axis), N) each
    half_w = 0.5 * w
    ni, nj, nk = (len(ax) for ax in axes)
    out = np.empty((w.shape[1], ni, nj, nk))
    rows = max(1, _BLOCK_ELEMENTS // max(1, nk * n))

    def work(i: int) -> None:
        for j0 in range(0, nj, rows):
            j1 = min(nj, j0 + rows)
            s = (sq[0][i] + sq[1][j0:j1])[:, None, :] + sq[2][None, :, :]  # (rows, nk, N)
            s = s.reshape(-1, n)
            k = np.log(np.maximum(s, _TINY))
            k *= s
            vals = k @ half_w
            vals += a[0]
            vals += axes[0][i] * a[1]
            vals += (axes[1][j0:j1, None, None] * a[2] + axes[2][None, :, None] * a[3]).reshape(-1, w.shape[1])
            out[:, i, j0:j1] = vals.T.reshape(-1, j1 - j0, nk)

    run_chunks(work, range(ni))
    return out


def _lerp_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Linearly resample ``x`` to ``n_out`` samples along ``axis`` with aligned end points.

    Output sample ``m`` sits at input position ``m (n_in - 1) / (n_out - 1)`` (``align_corners=True``).
    """
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    if n_in == 1:
        return np.repeat(x, n_out, axis=axis)
    pos = np.linspace(0.0, n_in - 1.0, n_out) if n_out > 1 else np.zeros(1)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n_in - 2)
    frac = (pos - i0).astype(x.dtype).reshape([n_out if d == axis else 1 for d in range(x.ndim)])
    lo = np.take(x, i0, axis=axis)
    hi = np.take(x, i0 + 1, axis=axis)
    hi -= lo
    hi *= frac
    lo += hi
    return lo


def upsample_trilinear(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinearly upsample a ``(C, a, b, c)`` array to ``(C, *shape)`` with aligned corners.

    Separable: linear resampling along ``k``, then ``j``, then ``i`` (plain NumPy, single-threaded: on a busy
    2-core machine this was 2-20x steadier than threaded BLAS or torch for this size). Equals
    ``torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=True)`` up to float32
    rounding (tested). Returns a C-contiguous float32 array.
    """
    x = np.asarray(coarse, dtype=np.float32)
    for axis in (3, 2, 1):
        x = _lerp_axis(x, int(shape[axis - 1]), axis)
    return np.ascontiguousarray(x, dtype=np.float32)


@register_interpolator("tps")
def tps_interpolate(
    points_vox: np.ndarray,
    disps_vox: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    lam: float = 0.1,
    downsample: int = 4,
    max_memory_gb: float = 2.0,
) -> np.ndarray:
    """Published-variant thin-plate spline: ``r^2 log r`` on ``[-1, 1]`` coords, ridge, coarse + upsample.

    Fits ``u(x) = a_0 + a_1 x + a_2 y + a_3 z + sum_n w_n U(|x - c_n|)`` per displacement component on
    keypoint coordinates normalised per axis to ``[-1, 1]`` (:func:`normalise_voxel_coords`, so the
    metric is anisotropic when the axes differ in length, as published), with ``lam`` added to the kernel
    matrix diagonal. The spline is evaluated on a grid of ``ceil(size / downsample)`` points per axis
    spanning the same ``[-1, 1]`` extent and upsampled to the full grid with trilinear interpolation with
    aligned corners (:func:`upsample_trilinear`, equal to ``torch.nn.functional.interpolate(mode=
    "trilinear", align_corners=True)`` as published; corner voxels of the coarse and fine grids coincide,
    matching the normalisation). ``downsample=1`` evaluates every voxel directly.

    Args:
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices, N >= 4, not coplanar.
        disps_vox: ``(N, 3)`` keypoint displacements, voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: accepted for the common interface and unused (the published variant works on normalised
            voxel coordinates).
        lam: ridge regularisation ``>= 0`` (published: 0.1). With ``lam > 0`` the field does not pass
            exactly through the keypoints; constant and affine parts are still reproduced exactly.
        downsample: integer coarsening factor ``>= 1`` of the evaluation grid (published: 4).
        max_memory_gb: refuse (before allocating) a fit + evaluation estimated to need more memory than this.

    Returns:
        ``(3, I, J, K)`` float32 field.

    Convention: forward Lagrangian field in voxel units along ``i, j, k`` on the grid ``shape``.

    Raises:
        KeypointError: fewer than 4 keypoints, coplanar keypoints, conflicting duplicates, non-finite values.
        BrainshiftError: ``lam < 0`` or ``downsample`` not a positive integer, or the estimated memory
            (:func:`tps_memory_bytes`: the ``(N + 4)^2`` system, the kernel blocks, the coarse and full
            fields) exceeds ``max_memory_gb``.
    """
    if isinstance(lam, bool) or not (isinstance(lam, numbers.Real) and math.isfinite(lam) and lam >= 0):
        raise BrainshiftError(f"expected tps lam >= 0, got {lam!r}")
    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise BrainshiftError(f"expected tps downsample a positive integer, got {downsample!r}")
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)
    if downsample == 1:
        coarse_shape = shape
    else:
        coarse_shape = tuple(1 if s == 1 else max(2, math.ceil(s / downsample)) for s in shape)
    n = len(pts)
    need_gb = tps_memory_bytes(n, coarse_shape, shape) / 1e9
    if need_gb > max_memory_gb:
        raise BrainshiftError(f"tps with {n} keypoints needs about {need_gb:.1f} GB, more than the "
                              f"{max_memory_gb:g} GB allowed; use fewer keypoints or the 'linear' interpolator")
    centers = normalise_voxel_coords(pts, shape)
    w, a = tps_fit(centers, disps, float(lam))

    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in coarse_shape]
    coarse = np.ascontiguousarray(tps_evaluate_grid(axes, centers, w, a), dtype=np.float32)
    return upsample_trilinear(coarse, shape)


#: Ridge values tried by :func:`choose_tps_lam` (log-spaced around the published 0.1).
LAM_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
#: The fewest keypoints for which ``register`` and ``infer --tps-lam cv`` choose ``lam`` by 5-fold
#: cross-validation (:func:`choose_tps_lam`): each fold's fit keeps 16, the held-out folds score 4 each.
MIN_KEYPOINTS_LAM_CV = 20


def choose_tps_lam(points_vox: np.ndarray, disps_vox: np.ndarray, shape: tuple[int, int, int],
                   affine: np.ndarray, *, lams: tuple[float, ...] = LAM_GRID, folds: int = 5,
                   seed: int = 0) -> tuple[float, dict[float, float]]:
    """The ridge ``lam`` of :func:`tps_interpolate` that best predicts held-out keypoints (k-fold CV).

    For noisy keypoints in the hundreds (``brainshift register``'s matches, ~0.3 mm localisation noise), the
    published ``lam = 0.1`` fits the noise; a larger ridge smooths it. The keypoints are split into ``folds``
    seeded folds; for each ``lam`` the spline of the other folds (:func:`tps_fit` on the same normalised
    coordinates as :func:`tps_interpolate`) is evaluated exactly at the held-out keypoints, and the ``lam``
    with the smallest RMS held-out error (world mm, through ``affine``) is returned (the smallest such ``lam``
    on ties). This is the classical choice of a smoothing spline's parameter by cross-validation (Wahba,
    Spline Models for Observational Data, 1990), over a fixed grid.

    Args:
        points_vox, disps_vox: ``(N, 3)`` keypoints (0-based voxel indices) and displacements (voxel units).
        shape: grid shape ``(I, J, K)`` (defines the normalisation, as in :func:`tps_interpolate`).
        affine: ``(4, 4)`` voxel-to-world affine (errors are scored in mm).
        lams: candidate ridges (each ``>= 0``).
        folds: number of folds (``2 <= folds <= N``; each training set keeps at least 5 keypoints).
        seed: seed of the fold split.

    Returns:
        ``(lam, {lam: RMS held-out error in mm})``.

    Raises:
        KeypointError: invalid keypoints (as :func:`tps_interpolate`), or too few for ``folds``.
        BrainshiftError: invalid ``lams`` or ``folds``.
    """
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)
    lams = tuple(float(v) for v in lams)
    if not lams or not all(math.isfinite(v) and v >= 0 for v in lams):
        raise BrainshiftError(f"expected candidate lam values >= 0, got {lams!r}")
    n = len(pts)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise BrainshiftError(f"expected folds an integer >= 2, got {folds!r}")
    if n - math.ceil(n / folds) < 5:
        raise KeypointError(f"expected enough keypoints for {folds}-fold cross-validation (each fit keeps >= 5), "
                            f"got {n}")
    centers = normalise_voxel_coords(pts, shape)
    a3 = np.asarray(affine, dtype=np.float64)[:3, :3]
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    sq = {lam: 0.0 for lam in lams}
    for f in range(folds):
        held, keep = fold_of == f, fold_of != f
        for lam in lams:
            w, a = tps_fit(centers[keep], disps[keep], lam)
            err = (tps_evaluate(centers[held], centers[keep], w, a) - disps[held]) @ a3.T
            sq[lam] += float((err**2).sum())
    rmse = {lam: math.sqrt(sq[lam] / n) for lam in lams}
    best = min(lams, key=lambda v: (rmse[v], v))
    return best, rmse


def tps_memory_bytes(n_points: int, coarse_shape: tuple[int, int, int], shape: tuple[int, int, int]) -> float:
    """Estimated peak memory of :func:`tps_interpolate` in bytes.

    The ``(N + 4)^2`` float64 system and its LU copy, the kernel blocks of the worker threads
    (:data:`_BLOCK_ELEMENTS` float64, or one ``k`` row of the coarse grid if larger, three arrays each), the
    float64 coarse field and the float32 output with one float32 intermediate of the upsampling.
    """
    from brainshift.interpolate._chunks import n_workers

    n = int(n_points)
    block = max(_BLOCK_ELEMENTS, coarse_shape[2] * n)
    return 8.0 * (2 * (n + 4) ** 2 + 3 * n_workers() * block + 4 * math.prod(coarse_shape)) + 4.0 * 6 * math.prod(shape)
