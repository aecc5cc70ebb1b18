"""Gaussian-process regression (kriging) of the keypoint displacements, hyperparameters by the evidence.

Model: each world component of the displacement is an independent zero-mean Gaussian process with the
Matern 5/2 covariance ``eta^2 k_l(r)`` (Rasmussen & Williams, Gaussian Processes for Machine Learning, 2006,
eq. 4.17), observed at the keypoints with isotropic noise of variance ``tau`` (mm^2)::

    u_c(x) ~ GP(0, eta^2 k_l),    d_c(x_n) = u_c(x_n) + e,   e ~ N(0, tau)

The field is the posterior mean ``u_c(x) = eta^2 k_l(x, X) (eta^2 K_l + tau I)^-1 d_c`` (simple kriging),
averaged over a log-spaced grid of ``(eta^2, l, tau)`` with each point weighted by its marginal likelihood
(Bayesian model averaging over hyperparameters with a flat prior on the grid; Rasmussen & Williams 2006,
sections 5.2 and 5.4.1; MacKay, Neural Computation 1992). One eigendecomposition of ``K_l`` per length gives the
evidence of every ``(eta^2, tau)`` at once. Lengths shorter than the keypoints' median nearest-neighbour
distance are left out (the keypoints cannot tell them from noise).

Unlike a spline, the zero-mean prior lets the field return to zero away from the keypoints over the fitted
length instead of extrapolating an affine trend: brain shift is largest near the craniotomy and fades with
distance from it. Constant and affine fields are therefore *not* reproduced exactly (they are approximated
within the keypoints' hull when the evidence picks a long length). With exact keypoints the evidence usually
picks a small ``tau`` and the field passes within a few hundredths of a mm of them; where it judges part of the
displacements to be noise (more often with few keypoints) it smooths them (:func:`gp_interpolate`).

The same model without an atlas is the kernel part of the ``atlas`` interpolator's prior
(:mod:`brainshift.atlas.fit`, ``scaled-atlas+matern``), which there is fitted beside the atlas's components.

Frames: the fit works in world millimetres (RAS, through ``affine``; voxel indices as millimetres without
one), so the kernel is isotropic in space whatever the voxel spacing or orientation; the components are
independent with one shared kernel, so the posterior mean is the same in any orthonormal frame.

Convention: keypoints are continuous 0-based voxel indices, displacements voxel units; the returned field is
float32 ``(3, I, J, K)``, forward Lagrangian, voxel units along ``i, j, k``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from brainshift.errors import BrainshiftError
from brainshift.geometry import check_affine
from brainshift.interpolate._chunks import run_chunks
from brainshift.interpolate.base import check_keypoints, check_shape, register_interpolator

#: Candidate kernel lengths (mm), the same as the atlas fit's kernel part.
LENGTHS_MM = (10.0, 20.0, 40.0, 80.0, 160.0)
#: Candidate prior variances ``eta^2`` (mm^2): amplitudes 0.01 to 100 mm.
AMPLITUDES_MM2 = tuple(float(v) for v in np.logspace(-4, 4, 17))
#: Candidate noise variances ``tau`` (mm^2): exact keypoints (1e-5) to 3 mm noise.
NOISES_MM2 = tuple(float(v) for v in np.logspace(-5, 1, 13))
#: Evidence share below which a kernel length is left out of the average (its weights are not evaluated).
_NEGLIGIBLE = 1e-9
#: Automatic coarse evaluation step (:func:`gp_interpolate`, ``downsample=None``): the shortest kernel length in
#: the average divided by this (mm). Trilinear interpolation of one Matern 5/2 kernel over ``h = l / 8`` errs by
#: at most about ``(h^2 / 8) max |k''| = 5 / (3 * 8^3) = 0.3 %`` of its amplitude; on three validation brains
#: (1 mm grids, 20 keypoints) the field differed from exact evaluation by at most 0.5 % of its largest value and
#: its MSE by less than 0.4 %, at 0.1-0.3 s instead of 9-13 s.
AUTO_STEP_PER_LENGTH = 8.0
#: Elements of one ``chunk x keypoints`` float64 work array in the evaluation (8 MB).
_WORK_ELEMENTS = 1 << 20
_BYTES = 8


def matern52(dist_mm: np.ndarray, length_mm: float) -> np.ndarray:
    """Matern 5/2 correlation ``(1 + a + a^2/3) exp(-a)``, ``a = sqrt(5) d / l`` (Rasmussen & Williams 2006,
    eq. 4.17): twice mean-square differentiable, so the fields it draws are smooth but not analytic. Shared with
    the atlas fit's kernel part (:mod:`brainshift.atlas.fit`).

    Args:
        dist_mm: distances (mm), any shape.
        length_mm: length scale ``l`` (mm).

    Returns:
        Correlations in ``(0, 1]``, same shape.
    """
    a = np.sqrt(5.0) * np.asarray(dist_mm, dtype=np.float64) / float(length_mm)
    return (1.0 + a + a * a / 3.0) * np.exp(-a)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.distance import cdist

    return cdist(a, b)


def usable_lengths(points_mm: np.ndarray, lengths_mm=LENGTHS_MM) -> tuple[float, ...]:
    """The kernel lengths at least the keypoints' median nearest-neighbour distance (at least the longest)."""
    lengths = sorted(float(v) for v in lengths_mm)
    if len(points_mm) < 2:
        return (lengths[-1],)
    d = _pairwise(points_mm, points_mm)
    np.fill_diagonal(d, np.inf)
    spacing = float(np.median(d.min(axis=1)))
    return tuple(v for v in lengths if v >= spacing) or (lengths[-1],)


def gp_memory_bytes(n_points: int, n_lengths: int = len(LENGTHS_MM)) -> int:
    """Estimated peak memory of :func:`gp_fit` plus one evaluation chunk per thread: one ``m x m`` kernel and
    eigenvector matrix per length, and the evaluation's work arrays (a few ``chunk x m`` float64 arrays, chunk
    ``~ 1M / m`` points, per thread)."""
    m = int(n_points)
    return _BYTES * (2 * n_lengths * m * m + 4 * 4 * _WORK_ELEMENTS) + 64 * m


def gp_fit(points_mm: np.ndarray, disps_mm: np.ndarray, *, lengths_mm=LENGTHS_MM, amplitudes_mm2=AMPLITUDES_MM2,
           noises_mm2=NOISES_MM2) -> tuple[dict[float, np.ndarray], dict]:
    """The evidence-averaged posterior mean's weights, per kernel length.

    One eigendecomposition ``K_l = V diag(lam) V^T`` per length gives, for every ``(eta^2, tau)``, the log
    marginal likelihood ``-1/2 sum_c [y_c^T C^-1 y_c + log|C| + m log 2 pi]`` with ``C = eta^2 K_l + tau I``
    (Rasmussen & Williams 2006, eq. 5.8) and the posterior mean's weights ``eta^2 C^-1 y``; the weights are
    averaged with the normalised likelihoods (flat prior on the grid).

    Args:
        points_mm: ``(m, 3)`` keypoints in any orthonormal mm frame.
        disps_mm: ``(m, C)`` displacements (mm) in that frame.
        lengths_mm, amplitudes_mm2, noises_mm2: the hyperparameter grid (lengths filtered by
            :func:`usable_lengths`).

    Returns:
        ``({length: (m, C) weights}, info)``: the field is ``sum_l k_l(x, X) @ weights[l]`` (lengths whose
        evidence share is below 1e-9 left out). ``info``: ``length_mm``, ``eta_mm``, ``tau_mm2`` (the most likely
        grid point), ``mean_log10_tau`` (evidence-weighted), ``log_evidence`` (the most likely point's).

    Raises:
        BrainshiftError: displacements so large that the fit overflows (non-finite weights).
    """
    from threadpoolctl import threadpool_limits

    p = np.asarray(points_mm, dtype=np.float64)
    y = np.asarray(disps_mm, dtype=np.float64)
    m, c = y.shape
    eta2 = np.asarray(amplitudes_mm2, dtype=np.float64)[:, None, None]
    tau = np.asarray(noises_mm2, dtype=np.float64)[None, :, None]
    dist = _pairwise(p, p)
    blocks = []
    # small dense eigenproblems: one BLAS thread is several times faster than two on a busy small CPU
    # overflow (absurd displacements) is caught below as non-finite weights
    with threadpool_limits(limits=1, user_api="blas"), np.errstate(over="ignore", invalid="ignore"):
        for length in usable_lengths(p, lengths_mm):
            lam, vec = np.linalg.eigh(matern52(dist, length))
            lam = np.clip(lam, 0.0, None)
            vy = vec.T @ y  # (m, C)
            d = eta2 * lam[None, None, :] + tau  # (A, T, m)
            le = -0.5 * (((vy ** 2).sum(1) / d).sum(-1) + c * np.log(d).sum(-1) + c * m * math.log(2.0 * math.pi))
            blocks.append((length, vec, vy, d, le))
        top = max(float(b[4].max()) for b in blocks)
        total = sum(float(np.exp(b[4] - top).sum()) for b in blocks)
        weights, best, log_tau = {}, None, 0.0
        for length, vec, vy, d, le in blocks:
            w = np.exp(le - top) / total  # (A, T)
            i, j = np.unravel_index(int(np.argmax(le)), le.shape)
            if best is None or le[i, j] > best[0]:
                best = (float(le[i, j]), length, float(amplitudes_mm2[i]), float(noises_mm2[j]))
            log_tau += float((w.sum(0) * np.log10(np.asarray(noises_mm2))).sum())
            if w.sum() < _NEGLIGIBLE:  # a length the evidence rules out: not evaluated
                continue
            # sum over the grid of w eta^2 (eta^2 K + tau I)^-1 y = V diag(sum w eta^2 / d) V^T y
            coef = ((w[..., None] * eta2) / d).sum((0, 1))  # (m,)
            weights[length] = vec @ (coef[:, None] * vy)
    if not weights or not all(np.all(np.isfinite(v)) for v in weights.values()) or not np.isfinite(top):
        raise BrainshiftError(f"expected keypoint displacements the gp fit can represent, got a fit that overflows "
                              f"(largest displacement {np.abs(y).max():.3g} mm)")
    info = {"length_mm": best[1], "eta_mm": math.sqrt(best[2]), "tau_mm2": best[3], "log_evidence": best[0],
            "mean_log10_tau": log_tau, "lengths_mm": sorted(weights)}
    return weights, info


def gp_evaluate(weights: dict[float, np.ndarray], centres_mm: np.ndarray, query_mm: np.ndarray) -> np.ndarray:
    """``(n, C)`` float64 posterior mean at ``query_mm`` ``(n, 3)`` from :func:`gp_fit`'s weights (chunks of about
    1M kernel terms, on :func:`brainshift.interpolate._chunks.run_chunks`'s threads)."""
    q = np.asarray(query_mm, dtype=np.float64)
    out = np.zeros((len(q), next(iter(weights.values())).shape[1]))
    chunk = max(64, _WORK_ELEMENTS // max(1, len(centres_mm)))

    def work(sl: slice) -> None:
        r = _pairwise(q[sl], centres_mm)
        out[sl] = sum(matern52(r, length) @ w for length, w in weights.items())

    run_chunks(work, [slice(i, min(i + chunk, len(q))) for i in range(0, len(q), chunk)])
    return out


def _coarse_shape(shape: tuple[int, int, int], spacing_mm: np.ndarray, downsample: int | None,
                  shortest_mm: float) -> tuple[int, ...]:
    if downsample is None:  # per axis, in mm: about shortest / AUTO_STEP_PER_LENGTH
        steps = [max(1, int(shortest_mm / AUTO_STEP_PER_LENGTH / float(sp))) for sp in spacing_mm]
    else:
        steps = [int(downsample)] * 3
    return tuple(1 if s == 1 else (s if st == 1 else max(2, math.ceil(s / st)))
                 for s, st in zip(shape, steps, strict=True))


@register_interpolator("gp")
def gp_interpolate(
    points_vox: np.ndarray,
    disps_vox: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    downsample: int | None = None,
    max_memory_gb: float = 2.0,
) -> np.ndarray:
    """Gaussian-process regression (Matern 5/2, zero mean, evidence-averaged hyperparameters; module docstring).

    The posterior mean is evaluated exactly on a coarser grid and upsampled trilinearly with aligned corners (as
    ``tps``): by default each axis's step is about the shortest kernel length in the average divided by
    :data:`AUTO_STEP_PER_LENGTH` in mm (1.25 mm for 10 mm, 5 mm for 40 mm), so thick slices are evaluated on every
    slice and fine in-plane grids coarsely.

    The fitted noise decides how closely the field follows the keypoints: where the evidence finds the
    displacements rougher than any smooth field on the grid explains, it treats part of them as noise and
    smooths (with few keypoints, 4-10, it may not tell signal from noise: up to 1-2 mm off for a few mm of
    displacement). The safeguards' keypoint-consistency contract is relative to this initial field.

    Args:
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices, N >= 4, not coplanar.
        disps_vox: ``(N, 3)`` displacements, voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: 4x4 voxel -> RAS mm affine (the kernel's metric); None: voxel indices as mm.
        downsample: None (default: the automatic step above) or an integer coarsening ``>= 1`` of every axis
            (1: every voxel exactly).
        max_memory_gb: refuse (before allocating) a fit estimated to need more (:func:`gp_memory_bytes`).

    Returns:
        ``(3, I, J, K)`` float32 field.

    Convention: forward Lagrangian field in voxel units along ``i, j, k`` on the grid ``shape``.

    Raises:
        KeypointError: fewer than 4 keypoints, coplanar keypoints, conflicting duplicates, non-finite values.
        GeometryError: a bad shape or affine. BrainshiftError: ``downsample`` not None nor a positive integer,
        ``max_memory_gb`` not positive, too many keypoints for ``max_memory_gb``, a fit that overflows.
    """
    from brainshift.interpolate.tps import upsample_trilinear

    if downsample is not None and (isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer))
                                   or downsample < 1):
        raise BrainshiftError(f"expected gp downsample None or a positive integer, got {downsample!r}")
    if isinstance(max_memory_gb, bool) or not (isinstance(max_memory_gb, numbers.Real) and max_memory_gb > 0):
        raise BrainshiftError(f"expected gp max_memory_gb > 0, got {max_memory_gb!r}")
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)
    need_gb = gp_memory_bytes(len(pts)) / 1e9
    if need_gb > max_memory_gb:
        raise BrainshiftError(f"gp with {len(pts)} keypoints needs about {need_gb:.1f} GB, more than the "
                              f"{max_memory_gb:g} GB allowed; use fewer keypoints or the 'linear' interpolator")
    a = np.eye(4) if affine is None else check_affine(affine)
    a3 = a[:3, :3]
    centres = pts @ a3.T  # world mm (the translation cancels in distances)
    weights, info = gp_fit(centres, disps @ a3.T)
    coarse_shape = _coarse_shape(shape, np.linalg.norm(a3, axis=0), downsample, min(info["lengths_mm"]))
    axes = [np.linspace(0.0, s - 1.0, n) if n > 1 else np.zeros(1) for s, n in zip(shape, coarse_shape, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = gp_evaluate(weights, centres, grid @ a3.T) @ np.linalg.inv(a3).T  # back to voxel units
    coarse = np.ascontiguousarray(world.T.reshape((3,) + tuple(coarse_shape)), dtype=np.float32)
    if not np.all(np.isfinite(coarse)):
        raise BrainshiftError("expected a finite gp field, got non-finite values (displacements too large)")
    if coarse_shape == shape:
        return coarse
    return upsample_trilinear(coarse, shape).astype(np.float32, copy=False)
