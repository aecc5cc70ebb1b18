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
are smoothed rather than honoured exactly (:func:`choose_residual_lam`). This follows the atlas approach of
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

from brainshift.atlas.basis import DeformationAtlas
from brainshift.errors import BrainshiftError

#: Candidate values of the noise-to-prior ratio tau (mm^2).
DEFAULT_TAUS = tuple(float(t) for t in np.logspace(-3, 2, 11))


@dataclass
class AtlasFit:
    """What :func:`fit_atlas` returns.

    Attributes:
        field_vox: float32 ``(3, I, J, K)`` final field: the atlas fit plus the interpolated keypoint residuals.
        atlas_field_vox: float32 ``(3, I, J, K)`` the atlas fit alone (zero outside the atlas's brain region).
        coefficients: ``(r,)`` fitted coordinates in the atlas basis (mm).
        info: ``tau_mm2`` (chosen), ``tau_rule``, ``log_evidence`` (``{tau: log marginal likelihood}``) or
            ``cv_rmse_mm`` (``{tau: held-out RMS error mm}``, ``tau_rule="cv"``), ``fit_residual_mm`` (mean and max
            distance between the atlas fit and the keypoint displacements before the residual interpolation),
            ``n_components``, ``member_weights`` (the members nearest the fit with their modelling choices,
            :func:`member_weights`), ``residual_method``.
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

    For each fold: the atlas coordinates are fitted to the other keypoints (regularisation ``tau``), a thin-plate
    spline with ridge ``lam`` (``tps``'s normalised coordinates, :func:`brainshift.interpolate.tps.tps_fit`) is
    fitted to their residuals, and both predict the held-out keypoints. The ridge with the smallest RMS error
    wins if it beats ``lam = 0.1`` (the ``tps`` interpolator's own) by ``RESIDUAL_MARGIN`` and by more than
    0.01 mm; otherwise 0.1.

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


def fit_coefficients(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray, *,
                     taus=DEFAULT_TAUS, n_folds: int = 5, seed: int = 0, tau_rule: str = "evidence"
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """The atlas coordinates that fit the keypoints (module docstring), without making a field.

    Args:
        atlas, points_vox, disps_vox, taus, n_folds, seed, tau_rule: as :func:`fit_atlas`.

    Returns:
        ``(coefficients (r,) mm, residuals (m, 3) local mm at the keypoints, info)``.

    Raises:
        BrainshiftError: shapes that do not match. KeypointError: keypoints outside the atlas's brain.
    """
    p = np.asarray(points_vox, dtype=np.float64)
    d = np.asarray(disps_vox, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or d.shape != p.shape or len(p) == 0:
        raise BrainshiftError(f"expected (m, 3) keypoints and displacements with m >= 1, got {p.shape} and {d.shape}")
    if tau_rule not in TAU_RULES:
        raise BrainshiftError(f"expected tau_rule among {list(TAU_RULES)}, got {tau_rule!r}")
    atlas.check_points(p)
    spacing = np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    m = len(p)
    mean, basis = atlas.sample(p)  # (m, 3), (m, 3, r)
    r = (d * spacing - mean).reshape(-1)
    s = atlas.prior_std_mm
    bw = basis.reshape(3 * m, -1) * s[None, :]
    if bw.shape[1] == 0:
        tau, scores, z = 1.0, {}, np.zeros(0)
    else:
        if tau_rule == "evidence":
            tau, scores = choose_tau_evidence(bw, r, m, taus=taus)
        else:
            tau, scores = choose_tau(bw, r, m, taus=taus, n_folds=n_folds, seed=seed)
        z = _solve(bw, r, tau)
    c = s * z
    fitted = mean + (basis @ c if basis.shape[2] else 0.0)  # (m, 3) mm
    resid_mm = d * spacing - fitted
    dist = np.linalg.norm(resid_mm, axis=1)
    key = "log_evidence" if tau_rule == "evidence" else "cv_rmse_mm"
    info = {"tau_mm2": tau, "tau_rule": tau_rule, key: {f"{t:.4g}": round(v, 4) for t, v in scores.items()},
            "n_components": int(atlas.n_components), "n_keypoints": m,
            "fit_residual_mm": {"mean": round(float(dist.mean()), 4), "max": round(float(dist.max()), 4)},
            "coefficient_norm": round(float(np.linalg.norm(z)), 4)}
    return c, resid_mm, info


def fold_field_on_grid(atlas: DeformationAtlas, points_vox: np.ndarray, disps_vox: np.ndarray,
                       shape: tuple[int, int, int], affine: np.ndarray, *, seed: int = 0) -> np.ndarray:
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

    Returns:
        float32 ``(3, *shape)``. Convention: forward Lagrangian, voxel units along the target grid's axes.
    """
    from brainshift.interpolate import interpolate

    c, resid_mm, info = fit_coefficients(atlas, points_vox, disps_vox, seed=seed)
    lam, _ = choose_residual_lam(atlas, points_vox, disps_vox, info["tau_mm2"], seed=seed)
    a_full = np.asarray(atlas.affine, dtype=np.float64)
    a_t = np.asarray(affine, dtype=np.float64)
    t = np.linalg.inv(a_full) @ a_t  # target voxel -> preop voxel
    idx = np.argwhere(np.ones(tuple(shape), dtype=bool)).astype(np.float64)
    p_full = idx @ t[:3, :3].T + t[:3, 3]
    near = np.round(p_full).astype(np.int64)
    inside = np.all((near >= 0) & (near < np.asarray(atlas.nodes.image_shape)), axis=1)
    inside[inside] = atlas.region[tuple(near[inside].T)]
    nodal = atlas.nodal(c)
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
              tau_rule: str = "evidence") -> AtlasFit:
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

    Returns:
        :class:`AtlasFit`.

    Raises:
        KeypointError: keypoints outside the atlas's brain, or unusable for the residual interpolator.
        BrainshiftError: shapes that do not match, an atlas without components.
    """
    p = np.asarray(points_vox, dtype=np.float64)
    d = np.asarray(disps_vox, dtype=np.float64)
    c, resid_mm, info = fit_coefficients(atlas, p, d, taus=taus, n_folds=n_folds, seed=seed, tau_rule=tau_rule)
    spacing = np.asarray(atlas.nodes.spacing_mm, dtype=np.float64)
    atlas_field = atlas.nodes.rasterise(atlas.nodal(c), atlas.region)
    options = dict(residual_options or {})
    if residual_method == "tps" and "lam" not in options:
        lam, lam_cv = choose_residual_lam(atlas, p, d, info["tau_mm2"], n_folds=n_folds, seed=seed)
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
