"""Fit a deformation atlas to sparse keypoint displacements: the ``atlas`` interpolator.

Model: the displacement is the atlas mean plus a combination of its principal components,
``u(x) = mean(x) + sum_k c_k phi_k(x)``, with a Gaussian prior ``c_k ~ N(0, s_k^2)`` whose variances are those
of the atlas members' coordinates (:attr:`DeformationAtlas.prior_std_mm`), and keypoint displacements observed
with isotropic noise. The estimate is the posterior mean (regularised least squares in whitened coordinates
``z = c / s``)::

    z = (B_w^T B_w + tau I)^-1 B_w^T (d - mean(x)),   B_w = B diag(s)

where ``tau`` (mm^2, the noise variance relative to the prior) is chosen by maximising the marginal likelihood
of the keypoint displacements under the model (type-II maximum likelihood, "evidence": ``r ~ N(0, B_w B_w^T +
tau I)``; Rasmussen & Williams, Gaussian Processes for Machine Learning, 2006, section 5.4; MacKay, Neural
Computation 1992), or, with ``tau_rule="cv"``, by K-fold cross-validation over the keypoints (the value with the
smallest held-out prediction error; the rule before session 22, noisier with 20 keypoints: bench/RESULTS.md,
session 22). The residuals left at the keypoints are then
interpolated by a thin-plate spline (or another interpolator) and added, so the field honours the keypoints as
a classical interpolator does; the spline's ridge is chosen by the same cross-validation, so noisy keypoints
are smoothed rather than honoured exactly (:func:`choose_residual_lam`).

With ``prior="atlas+matern"`` the prior is the atlas's plus a stationary Gaussian process, for the part of the
deformation the members do not span (e.g. a contact model no member has)::

    u(x) = mean(x) + B(x) c + g(x),   c ~ N(0, a^2 diag(s^2)),   g_i ~ GP(0, eta^2 k_l),   e ~ N(0, tau I)

with ``k_l`` the Matern 5/2 kernel of length ``l`` (mm) applied to each displacement component independently
(Rasmussen & Williams 2006, eq. 4.17), and the four hyperparameters (atlas scale ``a^2``, kernel amplitude
``eta``, length ``l``, noise ``tau``) chosen together by the marginal likelihood over a grid
(:func:`choose_hyperparameters_evidence`). The estimate is the posterior mean (kriging with the atlas's
covariance plus the kernel's); ``a^2 = 1, eta = 0`` is the atlas prior above.

``prior="scaled-atlas+matern"`` treats the atlas mean as one more component rather than a fixed
offset: ``u(x) = b mean(x) + B(x) c + g(x)`` with ``b ~ N(0, a^2)``, i.e. a zero prior mean whose covariance is
the members' second moments (``mean mean^T + B S B^T``) scaled by ``a^2``. A brain that barely moves (e.g. held
by contact all round) no longer has to cancel the members' average sag with their components: zero
displacements give the zero field. Chosen on validation (bench/RESULTS.md, session 24).

``prior="scaled-atlas+matern+contact"`` (the default since session 25) adds, for every hyperparameter setting, the
same prior conditioned on **no normal motion at the skull**: at points of the brain surface outside every
member's craniotomy (:func:`brainshift.atlas.boundary.skull_contact`), ``n . u(b) = 0`` is observed with variance
``a^2`` :data:`CONTACT_SIGMA2` (:func:`_conditioned`). The brain slides along the skull but does not pass through
it, whichever contact model holds; the members' own boundary behaviour (e.g. separating from the skull in
unilateral contact) is then a choice the data make, not one the atlas imposes: the grid holds the free and the
conditioned prior side by side, and the marginal likelihood weighs them (``kernel.contact_share`` in the fit's
info: the conditioned prior's share); with fewer than :data:`CONTACT_MIN_KEYPOINTS` keypoints the free prior
alone. Atlases without recorded craniotomies (built before session 25) get the
free prior alone. Chosen on validation (bench/RESULTS.md, session 25).

With ``hyper_rule="average"`` (the default) the estimate is the posterior mean averaged over the whole grid of
hyperparameters, each point weighted by its marginal likelihood (a flat prior on the log-spaced grid: Bayesian
model averaging; Rasmussen & Williams 2006, section 5.2; MacKay 1992), rather than that of the most likely point
(``"map"``): with 20 keypoints several settings explain the data about equally well. The residual spline is
then added only when the fitted noise says the keypoints are exact (:data:`KERNEL_EXACT_TAU_MM2`; for the
average, the evidence-weighted geometric mean of ``tau``); otherwise the posterior mean, which already smooths
the noise, is the field. This follows the atlas approach of
Miga et al. (Int J CARS 2016, doi:10.1007/s11548-015-1295-x; Sun et al., IEEE JTEHM 2014), with a Gaussian
prior on a reduced basis in place of their constrained member weights; for reporting, the members nearest the
fit (in the prior's metric) are named with their modelling choices.

Convention: keypoints are continuous voxel indices ``(i, j, k)`` of the atlas's preop grid with displacements
in voxel units; fields are float32 ``(3, I, J, K)``, forward Lagrangian, voxel units along ``i, j, k``. The
fit itself works in mm along the voxel axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from brainshift.atlas.basis import DeformationAtlas
from brainshift.errors import BrainshiftError
from brainshift.interpolate.gp import matern52, usable_lengths

#: Candidate values of the noise-to-prior ratio tau (mm^2).
DEFAULT_TAUS = tuple(float(t) for t in np.logspace(-3, 2, 11))


@dataclass
class AtlasFit:
    """What :func:`fit_atlas` returns.

    Attributes:
        field_vox: float32 ``(3, I, J, K)`` final field: the atlas fit plus the interpolated keypoint residuals.
        atlas_field_vox: float32 ``(3, I, J, K)`` the prior's posterior mean before the residual interpolation
            (the atlas fit, with the kernel part for ``atlas+matern``; zero outside the atlas's brain region).
        coefficients: ``(r,)`` fitted coordinates in the atlas basis (mm).
        info: ``tau_mm2`` (chosen), ``tau_rule``, ``log_evidence`` (``{tau: log marginal likelihood}``) or
            ``cv_rmse_mm`` (``{tau: held-out RMS error mm}``, ``tau_rule="cv"``), ``fit_residual_mm`` (mean and max
            distance between the atlas fit and the keypoint displacements before the residual interpolation),
            ``n_components``, ``member_weights`` (the members nearest the fit with their modelling choices,
            :func:`member_weights`), ``residual_method``; ``prior``, and for the kernel priors ``kernel``
            (``atlas_scale``, ``eta_mm``, ``length_mm``: the most likely hyperparameters; ``mean_scale``: the
            atlas mean's fitted amplitude, 1 for ``atlas+matern``; ``hyper_rule``; for ``+contact`` also
            ``skull_points``, the number of skull points, and ``contact_share``, the skull-held prior's share of the
            evidence); with ``hyper_rule="average"``
            ``tau_mm2`` is the evidence-weighted geometric mean of the noise variance.
    """

    field_vox: np.ndarray
    atlas_field_vox: np.ndarray
    coefficients: np.ndarray
    info: dict = field(default_factory=dict)


def _solve(bw: np.ndarray, r: np.ndarray, tau: float) -> np.ndarray:
    k = bw.shape[1]
    return np.linalg.solve(bw.T @ bw + tau * np.eye(k), bw.T @ r)


def _folds(m: int, n_folds: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(m)
    return [perm[i::n_folds] for i in range(n_folds)]


#: How the regularisation ``tau`` is chosen: by the marginal likelihood (default) or by cross-validation.
TAU_RULES = ("evidence", "cv")
#: Priors of the fit (module docstring): the atlas's alone; the atlas's plus a Matern 5/2 Gaussian process; the same
#: with the atlas mean's amplitude fitted as one more component; that prior weighed against itself conditioned on
#: no normal motion at the skull outside the craniotomy (:mod:`brainshift.atlas.boundary`).
PRIORS = ("atlas", "atlas+matern", "scaled-atlas+matern", "scaled-atlas+matern+contact")
#: The prior :func:`fit_atlas` and :func:`fold_field_on_grid` use unless told otherwise.
DEFAULT_PRIOR = "scaled-atlas+matern+contact"
#: How the kernel priors' hyperparameters are used: the posterior mean averaged over the grid, each point weighted
#: by its marginal likelihood (``average``, the default), or the single most likely point (``map``, session 23).
HYPER_RULES = ("average", "map")
#: Grid of the kernel priors' hyperparameters: atlas scale ``a^2``, kernel-to-atlas variance ratio
#: ``rho = eta^2 / a^2`` (0: no kernel), kernel length (mm) and noise ``tau`` (mm^2).
ATLAS_SCALES = tuple(4.0 ** e for e in range(-3, 2))
KERNEL_RATIOS = (0.0,) + tuple(float(v) for v in np.logspace(-4, 3, 15))
KERNEL_LENGTHS_MM = (10.0, 20.0, 40.0, 80.0, 160.0)
KERNEL_TAUS = tuple(float(t) for t in np.logspace(-5, 1, 13))
#: With the kernel priors the residual spline (``tps``'s ridge 0.1) is added only when the marginal
#: likelihood found the keypoints exact: noise variance ``tau`` at most this (mm^2, a noise SD of 0.2 mm);
#: otherwise the posterior mean, which already treats the residuals as noise, is the field.
KERNEL_EXACT_TAU_MM2 = 0.04
#: Fewest keypoints with which the ``+contact`` prior weighs the skull-held prior (fewer: the free prior alone).
#: On validation (bench/RESULTS.md, session 25) it passed session 24's rule with 20 keypoints but not with 10 or 5:
#: better with exact keypoints, worse by 0.11 / 0.18 with 0.5 mm noise (the marginal likelihood of 15-30 numbers
#: cannot tell a brain held by the skull from one that leaves it).
CONTACT_MIN_KEYPOINTS = 20
#: Variance (mm^2, times the atlas scale ``a^2``) of the normal motion the ``+contact`` prior leaves at the skull
#: points (:func:`_conditioned`): a soft ``u . n = 0``. Chosen on 6 validation cases (bench/RESULTS.md, session 25:
#: mean ratio to the better classical interpolator 0.45 against 0.46 for 0.1 with the points 12 mm apart, 0.44
#: against 0.52 at 16 mm; 1 and 10 were worse at 8 mm).
CONTACT_SIGMA2 = 0.03
#: The variances the marginal likelihood weighs for the skull-held prior (each grid point of the hyperparameters
#: holds the free prior and one held prior per value; together the held priors have the free prior's prior
#: weight, split evenly among them). Grids 0.03 / 0.3 and 0.03 / 0.3 / 3 failed session 24's rule on validation
#: (bench/RESULTS.md, session 26: 0.364 / 0.363 against 0.347 with exact keypoints): one value.
CONTACT_SIGMA2S = (CONTACT_SIGMA2,)


def identifiable_lengths(points_mm: np.ndarray, lengths_mm=None) -> tuple[float, ...]:
    """The kernel lengths the keypoints can tell from noise: those at least their median nearest-neighbour
    distance (a shorter kernel correlates almost no pair of keypoints, so the marginal likelihood cannot
    separate it from noise, and its posterior mean puts a bump at each keypoint). At least the longest.

    Args:
        points_mm: ``(m, 3)`` keypoints (mm).
        lengths_mm: candidate lengths (default :data:`KERNEL_LENGTHS_MM`).

    Returns:
        The kept lengths, ascending.
    """
    return usable_lengths(points_mm, KERNEL_LENGTHS_MM if lengths_mm is None else lengths_mm)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


@dataclass
class _Skull:
    """Skull points in the fit (:mod:`brainshift.atlas.boundary`) with the normal component of the fit's whitened
    basis there: ``bn[j] = n_j . B_w(b_j)`` ``(M, k)``, the same columns as the keypoints' ``B_w``."""

    points_mm: np.ndarray  # (M, 3) local mm
    normals: np.ndarray  # (M, 3) unit, outward
    bn: np.ndarray  # (M, k)

    def __len__(self) -> int:
        return int(len(self.points_mm))


def _skull_kernel(points_mm: np.ndarray, skull: _Skull, length: float) -> tuple[np.ndarray, np.ndarray]:
    """The Matern kernel between the keypoints' components and the skull points' normal components
    ``C[(i, a), j] = k(x_i, b_j) n_j[a]`` ``(3m, M)``, and among the skull points ``k(b_i, b_j) n_i . n_j``."""
    m, n = len(points_mm), skull.normals
    kxb = matern52(_pairwise(points_mm, skull.points_mm), length)  # (m, M)
    c = (kxb[:, None, :] * n.T[None, :, :]).reshape(3 * m, len(skull))
    return c, matern52(_pairwise(skull.points_mm, skull.points_mm), length) * (n @ n.T)


@dataclass
class _SkullFactor:
    """One kernel length's skull terms, in the eigenbasis ``Q diag(lam) Q^T`` of the skull points' normal kernel
    ``K_BB (n_i . n_j)`` (no kernel: ``Q = I``, ``lam = 0``), so that the held prior's ``M_BB + sigma^2 I`` is a
    diagonal plus the rank-k atlas part for every kernel ratio and ``sigma^2`` (one eigendecomposition per length
    instead of one Cholesky factorisation per grid point)."""

    q: np.ndarray | None  # (M, M) eigenvectors; None: identity
    lam: np.ndarray  # (M,) eigenvalues (>= 0)
    u: np.ndarray  # (M, k) Q^T B_n
    cq: np.ndarray | None  # (M, 3m) Q^T C^T (C: the kernel between keypoint components and skull normals)


def _skull_factor(points_mm: np.ndarray, skull: _Skull, length: float | None) -> _SkullFactor:
    """:class:`_SkullFactor` for the kernel of ``length`` (None: the atlas part alone)."""
    if length is None:
        return _SkullFactor(q=None, lam=np.zeros(len(skull)), u=skull.bn, cq=None)
    c, kn = _skull_kernel(points_mm, skull, length)
    lam, q = np.linalg.eigh(kn)
    return _SkullFactor(q=q, lam=np.clip(lam, 0.0, None), u=q.T @ skull.bn, cq=q.T @ c.T)


@dataclass
class _Held:
    """The conditioning's projection ``P = (M_BB + sigma^2 I)^-1 M_BX`` of one held prior, kept factored:
    :meth:`apply` gives ``P v`` (posterior weights ``w`` on the keypoints put ``-P w`` on the skull points'
    normal components)."""

    factor: _SkullFactor
    g: np.ndarray  # (M, 3m) Q^T M_BX^T
    s_inv: np.ndarray  # (M,) 1 / (rho lam + sigma^2)
    small: tuple  # Cholesky factor of I + U^T S^-1 U (k, k)
    sigma2: float

    def apply(self, v: np.ndarray) -> np.ndarray:
        u = self.factor.u
        h = self.s_inv * (self.g @ v)
        h = h - self.s_inv * (u @ scipy.linalg.cho_solve(self.small, u.T @ h))
        return h if self.factor.q is None else self.factor.q @ h


def _conditioned(a_mat: np.ndarray, k3: np.ndarray | None, bw: np.ndarray, factor: _SkullFactor, rho: float,
                 sigma2: float = CONTACT_SIGMA2) -> tuple[np.ndarray, _Held]:
    """The prior ``M = B_w B_w^T + rho K (x) I_3`` conditioned on no normal motion at the skull points.

    With ``y_j = n_j . u(b_j)`` observed as zero with variance ``a^2 sigma^2`` (a soft ``u . n = 0``), the
    keypoints' covariance is ``a^2 M'`` with ``M' = M_XX - M_XB (M_BB + sigma^2 I)^-1 M_BX`` (Gaussian
    conditioning; Rasmussen & Williams 2006, eq. A.6), so the marginal likelihood keeps its form. In the
    eigenbasis of the skull kernel (``factor``), ``M_BB + sigma^2 I = Q (S + U U^T) Q^T`` with the diagonal
    ``S = rho lam + sigma^2`` and ``U = Q^T B_n`` (k columns), inverted by the Woodbury identity (Golub & Van
    Loan 2013, section 2.1.4). Returns ``(M' (3m, 3m), the projection P as a :class:`_Held`)``."""
    g = factor.u @ bw.T  # (M, 3m)
    mat = a_mat
    s_diag = np.full(len(factor.lam), float(sigma2))
    if rho > 0:
        g = g + rho * factor.cq
        mat = a_mat + rho * k3
        s_diag = s_diag + rho * factor.lam
    s_inv = 1.0 / s_diag
    su = s_inv[:, None] * factor.u  # (M, k)
    small = scipy.linalg.cho_factor(np.eye(factor.u.shape[1]) + factor.u.T @ su, lower=True)
    t = su.T @ g  # (k, 3m): U^T S^-1 G
    quad = g.T @ (s_inv[:, None] * g) - t.T @ scipy.linalg.cho_solve(small, t)
    out = mat - quad
    return 0.5 * (out + out.T), _Held(factor=factor, g=g, s_inv=s_inv, small=small, sigma2=float(sigma2))


def _evidence_grid(bw: np.ndarray, r: np.ndarray, points_mm: np.ndarray, scales, ratios, lengths_mm, taus,
                   skull: _Skull | None = None):
    """The kernel priors' grid (defaults: module constants) with, for each ``(rho, l)``, one eigendecomposition
    ``V diag(lam) V^T`` of ``B_w B_w^T + rho K_l (x) I_3``: yields ``(rho, l, V, V^T r, d, log p(r), P)`` with
    ``d = a^2 lam + tau`` ``(S, T, 3m)`` and the log marginal likelihood ``(S, T)`` for every atlas scale ``a^2``
    and noise ``tau`` (Rasmussen & Williams 2006, section 5.4.1); ``P`` is None for the free prior. With
    ``skull`` points every ``(rho, l)`` is there twice: the free prior and the prior conditioned on no normal
    motion at the skull (:func:`_conditioned`, ``P`` its projection). Then ``(scales, taus)`` as used."""
    from threadpoolctl import threadpool_limits

    # many small dense problems (3m and a few hundred rows): one BLAS thread is faster than several
    with threadpool_limits(limits=1, user_api="blas"):
        return _evidence_grid_blocks(bw, r, points_mm, scales, ratios, lengths_mm, taus, skull)


def _evidence_grid_blocks(bw, r, points_mm, scales, ratios, lengths_mm, taus, skull):
    scales = ATLAS_SCALES if scales is None else scales
    ratios = KERNEL_RATIOS if ratios is None else ratios
    lengths_mm = identifiable_lengths(points_mm) if lengths_mm is None else lengths_mm
    taus = KERNEL_TAUS if taus is None else taus
    m = len(points_mm)
    a_mat = bw @ bw.T
    dist = _pairwise(points_mm, points_mm)
    k3s = {length: np.kron(matern52(dist, length), np.eye(3)) for length in lengths_mm}
    factors = {length: _skull_factor(points_mm, skull, length) for length in lengths_mm} if skull else {}
    bare = _skull_factor(points_mm, skull, None) if skull else None
    sigma2s = tuple(CONTACT_SIGMA2S)
    held_log_prior = -np.log(len(sigma2s))  # the held priors together weigh as much as the free prior
    sc = np.asarray(scales, dtype=np.float64)[:, None, None]
    ta = np.asarray(taus, dtype=np.float64)[None, :, None]
    blocks = []
    for rho in ratios:
        for length in (lengths_mm if rho > 0 else lengths_mm[:1]):
            k3 = k3s[length] if rho > 0 else None
            priors = [(a_mat + rho * k3 if rho > 0 else a_mat, None)]
            if skull:
                priors += [_conditioned(a_mat, k3, bw, factors[length] if rho > 0 else bare, rho, s2)
                           for s2 in sigma2s]
            for mat, proj in priors:
                lam, vec = np.linalg.eigh(mat)
                lam = np.clip(lam, 0.0, None)
                vr = vec.T @ r
                d = sc * lam[None, None, :] + ta  # (S, T, 3m)
                le = -0.5 * (((vr ** 2) / d).sum(-1) + np.log(d).sum(-1) + 3 * m * np.log(2.0 * np.pi))
                if proj is not None:
                    le = le + held_log_prior
                blocks.append((float(rho), float(length), vec, vr, d, le, proj))
    return blocks, tuple(scales), tuple(taus)


def _grid_point(blocks, scales, taus) -> tuple[dict, float]:
    """The most likely point of :func:`_evidence_grid` (ties: the first on the grid)."""
    best, best_le = None, -np.inf
    for rho, length, _, _, _, le, proj in blocks:
        i, j = np.unravel_index(int(np.argmax(le)), le.shape)
        if le[i, j] > best_le + 1e-12:
            best_le = float(le[i, j])
            best = {"atlas_scale2": float(scales[i]), "rho": rho, "length_mm": length, "tau_mm2": float(taus[j]),
                    "eta_mm": float(np.sqrt(rho * scales[i])), "contact": proj is not None,
                    "contact_sigma2": proj.sigma2 if proj is not None else None}
    return best, best_le


def choose_hyperparameters_evidence(bw: np.ndarray, r: np.ndarray, points_mm: np.ndarray, *,
                                    scales=None, ratios=None, lengths_mm=None, taus=None,
                                    skull: _Skull | None = None) -> tuple[dict, float]:
    """The ``atlas+matern`` prior's hyperparameters by the marginal likelihood (type-II maximum likelihood).

    ``r ~ N(0, C)``, ``C = a^2 (B_w B_w^T + rho K_l (x) I_3) + tau I`` (module docstring; ``eta^2 = rho a^2``).
    For each ``(rho, l)`` one eigendecomposition of ``B_w B_w^T + rho K_l (x) I_3`` gives ``log p(r)`` for every
    ``(a^2, tau)`` at once (Rasmussen & Williams 2006, section 5.4.1).

    Args:
        bw: ``(3m, k)`` whitened atlas basis at the keypoints (rows ``3j .. 3j+2`` belong to keypoint ``j``).
        r: ``(3m,)`` observed displacement minus the atlas mean (mm).
        points_mm: ``(m, 3)`` keypoint positions (mm, any orthonormal frame: the kernel is isotropic).
        scales, ratios, lengths_mm, taus: the grid (default: :data:`ATLAS_SCALES`, :data:`KERNEL_RATIOS`,
            :func:`identifiable_lengths` of :data:`KERNEL_LENGTHS_MM`, :data:`KERNEL_TAUS`).
        skull: skull points with the basis's normal component there: each prior also conditioned on no normal
            motion there (:func:`_conditioned`); None: the free prior alone.

    Returns:
        ``({"atlas_scale2", "eta_mm", "length_mm", "tau_mm2", "rho", "contact"}, best log marginal likelihood)``.
        Ties: the first on the grid (no kernel, then the shortest length, the free prior, the weakest atlas
        scale, the smallest tau).
    """
    return _grid_point(*_evidence_grid(bw, r, points_mm, scales, ratios, lengths_mm, taus, skull))


@dataclass
class _Posterior:
    """Posterior mean of the fit: atlas coefficients plus, for the kernel prior, the kernel's weights."""

    coefficients: np.ndarray  # (r,) mm
    points_mm: np.ndarray  # (m, 3) keypoints, local mm
    kernel_parts: list = field(default_factory=list)  # [(length mm, (n, 3) centres local mm, (n, 3) weights)]
    mean_scale: float = 1.0  # amplitude of the atlas mean in the field

    @property
    def has_kernel(self) -> bool:
        return bool(self.kernel_parts)

    def kernel_at(self, points_mm: np.ndarray) -> np.ndarray | float:
        if not self.kernel_parts:
            return 0.0
        # many points (every mesh node): distances by one matrix product. float64 throughout: the posterior
        # weights of nearly exact keypoints are large and of both signs, so float32 sums lose digits.
        # exp(-a) of a length half as long is the square of this one's: one exp per centre set (the default
        # lengths are powers of two apart), the longest length first
        out = np.zeros((len(points_mm), 3))
        chunk = max(1, 4_000_000 // max(max(len(c) for _, c, _ in self.kernel_parts), 1))
        pts = np.asarray(points_mm, dtype=np.float64)
        parts = sorted(self.kernel_parts, key=lambda part: -part[0])
        for i in range(0, len(pts), chunk):
            p = pts[i:i + chunk]
            dists: dict[int, np.ndarray] = {}
            exps: dict[int, tuple[float, np.ndarray]] = {}
            for length, centres, weights in parts:
                if id(centres) not in dists:
                    d2 = (p * p).sum(1)[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * (p @ centres.T)
                    dists[id(centres)] = np.sqrt(np.maximum(d2, 0.0))
                a = dists[id(centres)] * (np.sqrt(5.0) / length)
                prev = exps.get(id(centres))
                if prev is not None and prev[0] == 2.0 * length:
                    e = prev[1] * prev[1]
                else:
                    e = np.exp(-a)
                exps[id(centres)] = (length, e)
                k = (1.0 + a + a * a / 3.0) * e
                out[i:i + chunk] += k @ weights
        return out

    def kernel_at_nodes(self, nodes, ids: np.ndarray | None = None) -> np.ndarray | float:
        """The kernel part at mesh nodes ``ids`` (default: all), local mm ``(n, 3)``.

        The parts centred on the keypoints alone are evaluated at every node. The parts that also have the skull
        points (hundreds of centres; kernel lengths of 10 mm and more, so smooth on the 3 mm mesh) are evaluated
        on the node lattice of twice the node spacing and interpolated trilinearly to the nodes between: exact at
        every other node along each axis, within ``(h^2 / 8) max |f''|`` (h = 2 node steps) elsewhere, at 1/8 of
        the cost. The fit's residuals at the keypoints use these same nodal values, so the keypoints are honoured
        as before."""
        if not self.kernel_parts:
            return 0.0
        g = nodes.node_grid if ids is None else nodes.node_grid[np.asarray(ids)]
        own = [p for p in self.kernel_parts if len(p[1]) == len(self.points_mm)]
        wide = [p for p in self.kernel_parts if len(p[1]) != len(self.points_mm)]
        out = _Posterior(self.coefficients, self.points_mm, own).kernel_at(nodes.positions_mm(ids)) if own else 0.0
        if wide:
            base = g // 2
            odd = (g - 2 * base).astype(np.float64)  # 0: on the coarse lattice, 1: halfway to the next point
            offsets = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])
            corners = (base[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
            weights = np.prod(np.where(offsets[None] == 1, 0.5 * odd[:, None, :], 1.0 - 0.5 * odd[:, None, :]),
                              axis=2)  # (n, 8)
            keep = weights.reshape(-1) > 0
            dims = tuple(int(v) for v in corners.max(0) + 1)
            flat, inverse = np.unique(np.ravel_multi_index(tuple(corners[keep].T), dims), return_inverse=True)
            uniq = np.stack(np.unravel_index(flat, dims), axis=1)
            pos = (np.asarray(nodes.origin_vox) + 2 * uniq * np.asarray(nodes.step_vox)) * np.asarray(nodes.spacing_mm)
            vals = _Posterior(self.coefficients, self.points_mm, wide).kernel_at(pos)
            full = np.zeros((len(corners), 3))
            full[keep] = vals[inverse.reshape(-1)]
            out = out + np.einsum("nc,ncd->nd", weights, full.reshape(len(g), 8, 3))
        return out

    def nodal(self, atlas: DeformationAtlas) -> np.ndarray:
        """``(n_nodes, 3)`` local-mm posterior mean at the atlas's nodes."""
        out = atlas.nodal(self.coefficients) + self.kernel_at_nodes(atlas.nodes)
        if self.mean_scale != 1.0:
            out = out + (self.mean_scale - 1.0) * np.asarray(atlas.mean, dtype=np.float64)
        return out


def _kernel_parts(points_mm: np.ndarray, skull: _Skull | None, kern: dict, skull_kern: dict) -> list:
    """``_Posterior.kernel_parts`` from the kernel weights ``{length: (3m,)}`` on the keypoints and
    ``{length: (M,)}`` on the skull points' normal components."""
    m = len(points_mm)
    both = None if skull is None else np.concatenate([points_mm, skull.points_mm])
    parts = []
    for length in sorted(kern):
        w = kern[length].reshape(m, 3)
        if length in skull_kern:
            parts.append((length, both, np.concatenate([w, skull_kern[length][:, None] * skull.normals])))
        else:
            parts.append((length, points_mm, w))
    return parts


def _posterior(bw: np.ndarray, s: np.ndarray, points_mm: np.ndarray, skull: _Skull | None, alpha: np.ndarray,
               beta: np.ndarray, kern: dict, skull_kern: dict) -> _Posterior:
    """The posterior from its weights: ``a^2 alpha`` on the keypoints and ``a^2 beta`` on the skull points (summed
    over the grid), the kernel's share of each per length."""
    z = bw.T @ alpha + (skull.bn.T @ beta if skull is not None else 0.0)
    return _Posterior(coefficients=s * z, points_mm=points_mm,
                      kernel_parts=_kernel_parts(points_mm, skull, kern, skull_kern))


def _kernel_posterior(bw: np.ndarray, s: np.ndarray, r: np.ndarray, points_mm: np.ndarray, hp: dict,
                      skull: _Skull | None = None) -> _Posterior:
    m = len(points_mm)
    length, rho, a2 = hp["length_mm"], hp["rho"], hp["atlas_scale2"]
    a_mat = bw @ bw.T
    k3 = np.kron(matern52(_pairwise(points_mm, points_mm), length), np.eye(3)) if rho > 0 else None
    proj = None
    if hp.get("contact"):
        factor = _skull_factor(points_mm, skull, length if rho > 0 else None)
        mat, proj = _conditioned(a_mat, k3, bw, factor, rho, hp.get("contact_sigma2") or CONTACT_SIGMA2)
    else:
        mat = a_mat + rho * k3 if rho > 0 else a_mat
    va = a2 * np.linalg.solve(a2 * mat + hp["tau_mm2"] * np.eye(3 * m), r)
    vb = -proj.apply(va) if proj is not None else np.zeros(len(skull) if skull is not None else 0)
    kern = {length: rho * va} if rho > 0 else {}
    skull_kern = {length: rho * vb} if rho > 0 and proj is not None else {}
    return _posterior(bw, s, points_mm, skull if proj is not None else None, va, vb, kern, skull_kern)


def _averaged_kernel_posterior(bw: np.ndarray, s: np.ndarray, r: np.ndarray, points_mm: np.ndarray, *,
                               scales=None, ratios=None, lengths_mm=None, taus=None, skull: _Skull | None = None
                               ) -> tuple[_Posterior, dict]:
    """The posterior mean averaged over the hyperparameter grid, each point weighted by its marginal likelihood
    (a flat prior on the log-spaced grid: Bayesian model averaging over hyperparameters, Rasmussen & Williams
    2006, section 5.2), rather than the single most likely point. Returns the posterior and the grid's
    weighted mean of ``log10 tau``, the evidence share of the skull-conditioned priors and the most likely
    point (for reporting and the residual rule)."""
    blocks, scales, taus = _evidence_grid(bw, r, points_mm, scales, ratios, lengths_mm, taus, skull)
    m = len(points_mm)
    sc = np.asarray(scales, dtype=np.float64)[:, None]
    top = max(float(b[5].max()) for b in blocks)
    total = sum(float(np.exp(b[5] - top).sum()) for b in blocks)
    alpha, beta = np.zeros(3 * m), np.zeros(len(skull) if skull is not None else 0)
    kern: dict[float, np.ndarray] = {}
    skull_kern: dict[float, np.ndarray] = {}
    log_tau = contact_share = 0.0
    for rho, length, vec, vr, d, le, proj in blocks:
        w = np.exp(le - top) / total  # (S, T)
        if proj is not None:
            contact_share += float(w.sum())
        if w.max() < 1e-8:
            continue
        # alpha_st = V diag(1 / d_st) V^T r; atlas part a^2 alpha, kernel part rho a^2 alpha
        va = vec @ (((w * sc)[..., None] / d).sum((0, 1)) * vr)  # sum_st w a^2 alpha_st
        alpha += va
        if rho > 0:
            kern[length] = kern.get(length, 0.0) + rho * va
        if proj is not None:
            vb = -proj.apply(va)
            beta += vb
            if rho > 0:
                skull_kern[length] = skull_kern.get(length, 0.0) + rho * vb
        log_tau += float((w.sum(0) * np.log10(np.asarray(taus))).sum())
    best, best_le = _grid_point(blocks, scales, taus)
    post = _posterior(bw, s, points_mm, skull, alpha, beta, kern, skull_kern)
    return post, {**best, "log_evidence": best_le, "mean_log10_tau": log_tau, "contact_share": contact_share}


def choose_tau_evidence(bw: np.ndarray, r: np.ndarray, m: int, *, taus=DEFAULT_TAUS) -> tuple[float, dict]:
    """Regularisation by the marginal likelihood of the keypoint displacements (type-II maximum likelihood).

    Under the atlas's model the whitened coordinates are ``z ~ N(0, I)`` and the observations ``r = B_w z + e``
    with ``e ~ N(0, tau I)``, so ``r ~ N(0, C)``, ``C = B_w B_w^T + tau I``. The chosen ``tau`` maximises
    ``log p(r) = -(r^T C^-1 r + log det C + 3m log 2 pi) / 2`` over ``taus`` (Rasmussen & Williams 2006,
    section 5.4.1), computed from one eigendecomposition of ``B_w B_w^T``.

    Args:
        bw: ``(3m, k)`` whitened basis at the keypoints.
        r: ``(3m,)`` observed displacement minus the atlas mean (mm).
        m: number of keypoints.
        taus: candidate values (mm^2).

    Returns:
        ``(tau, {tau: log marginal likelihood})``; with fewer than 2 keypoints ``(1.0, {})``.
    """
    if m < 2:
        return 1.0, {}
    lam, vec = np.linalg.eigh(bw @ bw.T)
    q = (vec.T @ r) ** 2
    lam = np.clip(lam, 0.0, None)
    out = {}
    for tau in taus:
        d = lam + float(tau)
        out[float(tau)] = float(-0.5 * ((q / d).sum() + np.log(d).sum() + len(r) * np.log(2.0 * np.pi)))
    best = max(out, key=lambda t: (out[t], t))  # ties: the stronger prior
    return best, out


def choose_tau(bw: np.ndarray, r: np.ndarray, m: int, *, taus=DEFAULT_TAUS, n_folds: int = 5, seed: int = 0
               ) -> tuple[float, dict[float, float]]:
    """Cross-validated regularisation over keypoints (``tau_rule="cv"``).

    Args:
        bw: ``(3m, k)`` whitened basis at the keypoints (rows ``3j .. 3j+2`` belong to keypoint ``j``).
        r: ``(3m,)`` observed displacement minus the atlas mean (mm).
        m: number of keypoints.
        taus: candidate values (mm^2).
        n_folds: folds (at most ``m``; leave-one-out for fewer keypoints).
        seed: seed of the fold assignment.

    Returns:
        ``(tau, {tau: RMS held-out error in mm})``; with a single keypoint, ``(1.0, {})``.
    """
    if m < 2:
        return 1.0, {}
    folds = _folds(m, min(int(n_folds), m), seed)
    rows = np.arange(3 * m).reshape(m, 3)
    cv = {}
    for tau in taus:
        err, cnt = 0.0, 0
        for test in folds:
            train = np.setdiff1d(np.arange(m), test)
            tr, te = rows[train].ravel(), rows[test].ravel()
            z = _solve(bw[tr], r[tr], tau)
            err += float(((bw[te] @ z - r[te]) ** 2).sum())
            cnt += len(test)
        cv[float(tau)] = float(np.sqrt(err / max(cnt, 1)))
    best = min(cv, key=lambda t: (cv[t], -t))  # ties: the stronger prior
    return best, cv


def member_weights(atlas: DeformationAtlas, coefficients: np.ndarray, top: int = 5) -> list[dict]:
    """The members nearest the fit: Gaussian-kernel weights on the whitened coordinates.

    ``w_i ~ exp(-0.5 * sum_k ((c_k - x_ik) / s_k)^2)`` over the members' coordinates ``x_i`` (normalised to sum
    to one), ``s_k`` the prior standard deviations: how much each member explains the fitted field, in the
    prior's own metric. Reported in ``summary.json`` to name the modelling choices closest to the fit.

    Returns:
        Up to ``top`` dicts ``{"member": index, "weight": w, "distance": whitened distance, **the member's
        modelling choices}``, largest weight first.
    """
    coords = np.asarray(atlas.coordinates, dtype=np.float64)  # (n_members, r)
    if len(coords) == 0:
        return []
    z = (coords - np.asarray(coefficients, dtype=np.float64)[None, :]) / atlas.prior_std_mm[None, :]
    d2 = (z ** 2).sum(axis=1)
    w = np.exp(-0.5 * (d2 - d2.min()))
    w /= w.sum()
    out = []
    for i in np.argsort(-w)[:top]:
        member = atlas.members[i] if i < len(atlas.members) else {}
        out.append({"member": int(i), "weight": round(float(w[i]), 4), "distance": round(float(np.sqrt(d2[i])), 3),
                    **member})
    return out


#: Candidate ridges of the residual thin-plate spline (``tps``'s ``lam``; 0.1 is the ``tps`` interpolator's own),
#: and ``None`` for no residual spline (the atlas fit alone).
RESIDUAL_LAMS = (0.1, 1.0, 10.0, None)
#: A smoother residual spline than ``tps``'s own is chosen only when it predicts held-out keypoints at least this
#: much better (relative RMS error), so noiseless keypoints keep being honoured.
RESIDUAL_MARGIN = 0.05


def choose_residual_lam(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray, tau: float, *,
                        lams=RESIDUAL_LAMS, n_folds: int = 5, seed: int = 0) -> tuple[float | None, dict]:
    """Cross-validated smoothing of the residual spline (noisy keypoints should not be honoured exactly).

    The atlas prior's rule (for ``atlas+matern`` see :data:`KERNEL_EXACT_TAU_MM2`). For each fold: the atlas
    coordinates are fitted to the other keypoints (regularisation ``tau``), a thin-plate spline with ridge
    ``lam`` (``tps``'s normalised coordinates, :func:`brainshift.interpolate.tps.tps_fit`) is fitted to their
    residuals, and both predict the held-out keypoints. The ridge with the smallest RMS error wins if it beats
    ``lam = 0.1`` (the ``tps`` interpolator's own) by ``RESIDUAL_MARGIN`` and by more than 0.01 mm; otherwise 0.1.

    Returns:
        ``(lam or None for no residual spline, {str(lam): RMS held-out error mm})``; ``(0.1, {})`` with fewer
        than 10 keypoints (folds too small for a spline).
    """
    from brainshift.errors import KeypointError
    from brainshift.interpolate.tps import normalise_voxel_coords, tps_evaluate, tps_fit

    p = np.asarray(points_vox, dtype=np.float64)
    d = np.asarray(disps_vox, dtype=np.float64)
    m = len(p)
    default = lams[0]
    if m < 10 or atlas.n_components == 0:
        return default, {}
    spacing = np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    mean, basis = atlas.sample(p)
    s = atlas.prior_std_mm
    bw = basis.reshape(3 * m, -1) * s[None, :]
    r = (d * spacing - mean).reshape(-1)
    rows = np.arange(3 * m).reshape(m, 3)
    norm = normalise_voxel_coords(p, tuple(atlas.nodes.image_shape))
    err = {lam: 0.0 for lam in lams}
    for test in _folds(m, min(int(n_folds), m), seed):
        train = np.setdiff1d(np.arange(m), test)
        tr, te = rows[train].ravel(), rows[test].ravel()
        z = _solve(bw[tr], r[tr], tau)
        res_tr = (r[tr] - bw[tr] @ z).reshape(-1, 3)
        res_te = (r[te] - bw[te] @ z).reshape(-1, 3)
        for lam in lams:
            if lam is None:
                pred = 0.0
            else:
                try:
                    w, a = tps_fit(norm[train], res_tr, lam)
                except KeypointError:
                    err[lam] = np.inf
                    continue
                pred = tps_evaluate(norm[test], norm[train], w, a)
            err[lam] += float(((res_te - pred) ** 2).sum())
    rms = {lam: float(np.sqrt(e / m)) for lam, e in err.items()}
    best = min(rms, key=lambda k: rms[k])
    better = rms[default] - rms[best]
    chosen = best if better > RESIDUAL_MARGIN * rms[default] and better > 0.01 else default
    return chosen, {("none" if k is None else f"{k:g}"): round(v, 4) for k, v in rms.items()}


def _skull_in_fit(atlas: DeformationAtlas, s_fit: np.ndarray, *, scaled: bool) -> _Skull | None:
    """The atlas's skull points (:func:`brainshift.atlas.boundary.skull_contact`, cached on the atlas) with the
    normal component of the fit's whitened basis there (the mean first when ``scaled``); None without any."""
    contact = getattr(atlas, "_skull_contact", None)
    if contact is None:
        from brainshift.atlas.boundary import skull_contact

        contact = skull_contact(atlas)
        atlas._skull_contact = contact
    if not len(contact):
        return None
    pts_vox = contact.points_mm / np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    mean, basis = atlas.sample(pts_vox)  # (M, 3), (M, 3, r)
    cols = np.concatenate([mean[:, :, None], basis], axis=2) if scaled else basis
    bn = np.einsum("mc,mck->mk", contact.normals, cols) * s_fit[None, :]
    return _Skull(points_mm=contact.points_mm, normals=contact.normals, bn=bn)


def _resolve_prior(prior: str | None, tau_rule: str) -> str:
    """None -> :data:`DEFAULT_PRIOR` (read at call time), or ``"atlas"`` with ``tau_rule="cv"``."""
    if prior is None:
        return "atlas" if tau_rule == "cv" else DEFAULT_PRIOR
    return prior


def _residual_lam(atlas: DeformationAtlas, p: np.ndarray, d: np.ndarray, tau: float, hyper: dict | None, *,
                  n_folds: int, seed: int) -> tuple[float | None, dict]:
    """The residual spline's ridge (None: no spline): cross-validated for the atlas prior
    (:func:`choose_residual_lam`); for ``atlas+matern`` ``tps``'s 0.1 when the keypoints were found exact
    (:data:`KERNEL_EXACT_TAU_MM2`), else None."""
    if hyper is None:
        return choose_residual_lam(atlas, p, d, tau, n_folds=n_folds, seed=seed)
    return (RESIDUAL_LAMS[0] if tau <= KERNEL_EXACT_TAU_MM2 else None), {}


def _fit_posterior(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray, *, taus=DEFAULT_TAUS,
                   n_folds: int = 5, seed: int = 0, tau_rule: str = "evidence", prior: str | None = None,
                   hyper_rule: str = "average") -> tuple[_Posterior, np.ndarray, dict, dict | None]:
    """:func:`fit_coefficients`, also returning the posterior and the kernel prior's hyperparameters (or None)."""
    prior = _resolve_prior(prior, tau_rule)
    p = np.asarray(points_vox, dtype=np.float64)
    d = np.asarray(disps_vox, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or d.shape != p.shape or len(p) == 0:
        raise BrainshiftError(f"expected (m, 3) keypoints and displacements with m >= 1, got {p.shape} and {d.shape}")
    if tau_rule not in TAU_RULES:
        raise BrainshiftError(f"expected tau_rule among {list(TAU_RULES)}, got {tau_rule!r}")
    if prior not in PRIORS:
        raise BrainshiftError(f"expected prior among {list(PRIORS)}, got {prior!r}")
    if hyper_rule not in HYPER_RULES:
        raise BrainshiftError(f"expected hyper_rule among {list(HYPER_RULES)}, got {hyper_rule!r}")
    if prior != "atlas" and tau_rule != "evidence":
        raise BrainshiftError(f"expected tau_rule 'evidence' with prior {prior!r} (its hyperparameters are chosen "
                              f"by the marginal likelihood), got {tau_rule!r}")
    atlas.check_points(p)
    spacing = np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    m = len(p)
    mean, basis = atlas.sample(p)  # (m, 3), (m, 3, r)
    r = (d * spacing - mean).reshape(-1)
    s = atlas.prior_std_mm
    bw = basis.reshape(3 * m, -1) * s[None, :]
    x_mm = p * spacing
    hyper = None
    if prior != "atlas" and m >= 2 and bw.shape[1] > 0:
        s_fit, bw_fit, r_fit = s, bw, r
        if prior.startswith("scaled-"):  # the mean as one more component (zero prior mean)
            s_fit = np.concatenate([[1.0], s])
            bw_fit = np.concatenate([mean.reshape(-1, 1), bw], axis=1)
            r_fit = (d * spacing).reshape(-1)
        skull = (_skull_in_fit(atlas, s_fit, scaled=prior.startswith("scaled-"))
                 if prior.endswith("+contact") and m >= CONTACT_MIN_KEYPOINTS else None)
        if hyper_rule == "average":  # tau: the evidence-weighted geometric mean, for the residual rule
            post, hyper = _averaged_kernel_posterior(bw_fit, s_fit, r_fit, x_mm, skull=skull)
            best_le, hyper["tau_mm2"] = hyper["log_evidence"], float(10.0 ** hyper["mean_log10_tau"])
        else:
            hyper, best_le = choose_hyperparameters_evidence(bw_fit, r_fit, x_mm, skull=skull)
            post = _kernel_posterior(bw_fit, s_fit, r_fit, x_mm, hyper, skull)
        if prior.startswith("scaled-"):
            post.mean_scale, post.coefficients = float(post.coefficients[0]), post.coefficients[1:]
        tau, scores = hyper["tau_mm2"], {hyper["tau_mm2"]: best_le}
    elif bw.shape[1] == 0:
        tau, scores, post = 1.0, {}, _Posterior(np.zeros(0), x_mm)
    else:
        if tau_rule == "evidence":
            tau, scores = choose_tau_evidence(bw, r, m, taus=taus)
        else:
            tau, scores = choose_tau(bw, r, m, taus=taus, n_folds=n_folds, seed=seed)
        post = _Posterior(s * _solve(bw, r, tau), x_mm)
    c = post.coefficients
    fitted = post.mean_scale * mean + (basis @ c if basis.shape[2] else 0.0)  # (m, 3) mm
    if post.has_kernel:  # as the rasterised field has it: trilinear between the nodes' values
        nid, w = atlas.nodes.trilinear(p)
        fitted = fitted + np.einsum("mc,mcd->md", w, post.kernel_at_nodes(atlas.nodes, nid.ravel()).reshape(m, 8, 3))
    resid_mm = d * spacing - fitted
    dist = np.linalg.norm(resid_mm, axis=1)
    key = "log_evidence" if tau_rule == "evidence" else "cv_rmse_mm"
    info = {"tau_mm2": tau, "tau_rule": tau_rule, "prior": prior,
            key: {f"{t:.4g}": round(v, 4) for t, v in scores.items()},
            "n_components": int(atlas.n_components), "n_keypoints": m,
            "fit_residual_mm": {"mean": round(float(dist.mean()), 4), "max": round(float(dist.max()), 4)},
            "coefficient_norm": round(float(np.linalg.norm(c / s)) if len(c) else 0.0, 4)}
    if hyper is not None:
        info["kernel"] = {"atlas_scale": round(float(np.sqrt(hyper["atlas_scale2"])), 4),
                          "eta_mm": round(hyper["eta_mm"], 5), "length_mm": hyper["length_mm"],
                          "mean_scale": round(post.mean_scale, 4), "hyper_rule": hyper_rule}
        if prior.endswith("+contact"):
            info["kernel"]["skull_points"] = len(skull) if skull is not None else 0
            info["kernel"]["contact_share"] = (round(hyper["contact_share"], 4) if "contact_share" in hyper
                                               else float(hyper["contact"]))
    return post, resid_mm, info, hyper


def fit_coefficients(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray, *,
                     taus=DEFAULT_TAUS, n_folds: int = 5, seed: int = 0, tau_rule: str = "evidence",
                     prior: str | None = None, hyper_rule: str = "average") -> tuple[np.ndarray, np.ndarray, dict]:
    """The atlas coordinates that fit the keypoints (module docstring), without making a field.

    Args:
        atlas, points_vox, disps_vox, taus, n_folds, seed, tau_rule, prior, hyper_rule: as :func:`fit_atlas`.

    Returns:
        ``(coefficients (r,) mm, residuals (m, 3) local mm at the keypoints, info)``; with the
        ``atlas+matern`` prior the residuals are those left by the atlas part and the kernel part together.

    Raises:
        BrainshiftError: shapes that do not match, an unknown rule or prior. KeypointError: keypoints outside the
        atlas's brain.
    """
    post, resid_mm, info, _ = _fit_posterior(atlas, points_vox, disps_vox, taus=taus, n_folds=n_folds, seed=seed,
                                             tau_rule=tau_rule, prior=prior, hyper_rule=hyper_rule)
    return post.coefficients, resid_mm, info


def fold_field_on_grid(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray,
                       shape: tuple[int, int, int], affine: np.ndarray, *, seed: int = 0,
                       prior: str | None = None, hyper_rule: str = "average") -> np.ndarray:
    """The atlas method's field for these keypoints, evaluated on another grid (e.g. the network's grid).

    Used by the safeguards' cross-validation (:func:`brainshift.model.safeguards.safe_refine`), whose folds run
    on the network grid. The atlas fit (coefficients) is the same as on the preop grid; the atlas field is
    sampled at the other grid's voxel centres (zero outside the atlas's brain region) and the keypoint residuals
    are interpolated by a thin-plate spline on that grid (its ridge chosen as in :func:`fit_atlas`).

    Args:
        atlas: the atlas.
        points_vox, disps_vox: ``(m, 3)`` keypoints and displacements on the **atlas's** (preop) grid, voxels.
        shape, affine: the target grid.
        seed: seed of the fit's folds.
        prior, hyper_rule: as :func:`fit_atlas`.

    Returns:
        float32 ``(3, *shape)``. Convention: forward Lagrangian, voxel units along the target grid's axes.
    """
    from brainshift.interpolate import interpolate

    post, resid_mm, info, hyper = _fit_posterior(atlas, points_vox, disps_vox, seed=seed, prior=prior,
                                                 hyper_rule=hyper_rule)
    lam, _ = _residual_lam(atlas, points_vox, disps_vox, info["tau_mm2"], hyper, n_folds=5, seed=seed)
    a_full = np.asarray(atlas.affine, dtype=np.float64)
    a_t = np.asarray(affine, dtype=np.float64)
    t = np.linalg.inv(a_full) @ a_t  # target voxel -> preop voxel
    idx = np.argwhere(np.ones(tuple(shape), dtype=bool)).astype(np.float64)
    p_full = idx @ t[:3, :3].T + t[:3, 3]
    near = np.round(p_full).astype(np.int64)
    inside = np.all((near >= 0) & (near < np.asarray(atlas.nodes.image_shape)), axis=1)
    inside[inside] = atlas.region[tuple(near[inside].T)]
    nodal = post.nodal(atlas)
    u_local = np.zeros((len(idx), 3))
    if inside.any():
        nid, w = atlas.nodes.trilinear(p_full[inside])
        u_local[inside] = np.einsum("mc,mcd->md", w, nodal[nid])
    rot = a_full[:3, :3] / np.asarray(atlas.nodes.spacing_mm)  # local mm -> RAS
    to_t = np.linalg.inv(a_t[:3, :3]) @ rot  # local mm -> target voxel units
    field = (u_local @ to_t.T).T.reshape((3,) + tuple(shape)).astype(np.float32)
    tinv = np.linalg.inv(t)
    pts_t = np.asarray(points_vox, dtype=np.float64) @ tinv[:3, :3].T + tinv[:3, 3]
    if lam is None:
        return field
    corr = interpolate("tps", pts_t, resid_mm @ to_t.T, tuple(shape), a_t, lam=lam)
    return (field + np.asarray(corr, dtype=np.float32)).astype(np.float32)


def fit_atlas(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray, *,
              taus=DEFAULT_TAUS, n_folds: int = 5, seed: int = 0, residual_method: str = "tps",
              residual_options: dict | None = None, affine: np.ndarray | None = None,
              tau_rule: str = "evidence", prior: str | None = None, hyper_rule: str = "average") -> AtlasFit:
    """Fit the atlas to keypoint displacements and return the dense field (module docstring).

    Args:
        atlas: a :class:`DeformationAtlas` of this image.
        points_vox: ``(m, 3)`` keypoint positions, continuous voxel indices on the atlas's grid.
        disps_vox: ``(m, 3)`` keypoint displacements, voxel units.
        taus: candidate regularisation values (mm^2).
        n_folds: cross-validation folds over the keypoints (the residual spline's ridge; ``tau`` with
            ``tau_rule="cv"``).
        seed: seed of the folds.
        residual_method: interpolator of the residuals left at the keypoints (``tps``, ``linear``, ``tps3d``;
            :func:`brainshift.interpolate.interpolate`), or ``"none"`` to return the atlas fit alone. For
            ``tps`` without a ``lam`` option its ridge is chosen by cross-validation
            (:func:`choose_residual_lam`: 0.1 as ``tps``, smoother, or no spline, for noisy keypoints).
        residual_options: options of that interpolator.
        affine: the grid's affine (for ``tps3d``); default: the atlas's.
        tau_rule: ``"evidence"`` (default: the marginal likelihood, :func:`choose_tau_evidence`) or ``"cv"``
            (:func:`choose_tau`).
        prior: ``"atlas"`` (the atlas's Gaussian prior), ``"atlas+matern"`` (plus a Matern 5/2 Gaussian
            process, every hyperparameter by the marginal likelihood: :func:`choose_hyperparameters_evidence`;
            needs ``tau_rule="evidence"``), ``"scaled-atlas+matern"`` (the same with the atlas mean's amplitude
            fitted as one more component, zero prior mean) or ``"scaled-atlas+matern+contact"`` (that prior and
            the same held to no normal motion at the skull, weighed by the marginal likelihood; the default;
            :mod:`brainshift.atlas.boundary`); None: :data:`DEFAULT_PRIOR` (read at call time), or ``"atlas"``
            with ``tau_rule="cv"``.
        hyper_rule: for the kernel priors, ``"average"`` (the posterior mean averaged over the hyperparameter
            grid, weighted by the marginal likelihood; default) or ``"map"`` (the most likely grid point alone).

    Returns:
        :class:`AtlasFit`; ``atlas_field_vox`` is the prior's posterior mean (with the kernel part).

    Raises:
        KeypointError: keypoints outside the atlas's brain, or unusable for the residual interpolator.
        BrainshiftError: shapes that do not match, an atlas without components.
    """
    p = np.asarray(points_vox, dtype=np.float64)
    d = np.asarray(disps_vox, dtype=np.float64)
    post, resid_mm, info, hyper = _fit_posterior(atlas, p, d, taus=taus, n_folds=n_folds, seed=seed,
                                                 tau_rule=tau_rule, prior=prior, hyper_rule=hyper_rule)
    c = post.coefficients
    spacing = np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    atlas_field = atlas.nodes.rasterise(post.nodal(atlas), atlas.region)
    options = dict(residual_options or {})
    if residual_method == "tps" and "lam" not in options:
        lam, lam_cv = _residual_lam(atlas, p, d, info["tau_mm2"], hyper, n_folds=n_folds, seed=seed)
        info["residual_lam_cv_rmse_mm"] = lam_cv
        if lam is None:
            residual_method = "none"
        else:
            options["lam"] = lam
        info["residual_lam"] = lam
    info = {**info, "member_weights": member_weights(atlas, c), "residual_method": residual_method}
    if residual_method == "none":
        return AtlasFit(field_vox=atlas_field, atlas_field_vox=atlas_field, coefficients=c, info=info)
    from brainshift.interpolate import interpolate

    resid_vox = resid_mm / spacing
    shape = tuple(int(v) for v in atlas.nodes.image_shape)
    corr = interpolate(residual_method, p, resid_vox, shape, atlas.affine if affine is None else affine,
                       **options)
    total = (atlas_field + np.asarray(corr, dtype=np.float32)).astype(np.float32)
    return AtlasFit(field_vox=total, atlas_field_vox=atlas_field, coefficients=c, info=info)
