"""Fitting an atlas to keypoints: exact recovery inside its span, keypoints honoured, regularisation by CV."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.atlas.basis import DeformationAtlas, NodeGrid, reduce_members
from brainshift.atlas.fit import choose_tau, fit_atlas
from brainshift.errors import KeypointError


def _affine_atlas(n_members=8, seed=0):
    """An atlas whose members are affine fields (local mm) on a full node grid covering the image."""
    shape, image_shape = (8, 9, 7), (22, 25, 19)
    g = np.argwhere(np.ones(shape, dtype=bool))
    nodes = NodeGrid(node_grid=g, shape=shape, origin_vox=np.zeros(3), step_vox=np.array([3.0, 3.0, 3.0]),
                     image_shape=image_shape, spacing_mm=np.array([1.0, 1.0, 1.0]))
    p = nodes.origin_vox + g * nodes.step_vox
    rng = np.random.default_rng(seed)
    params = [(rng.normal(scale=0.02, size=(3, 3)), rng.normal(size=3)) for _ in range(n_members)]
    members = np.stack([p @ a.T + b for a, b in params])
    mean, comps, coords, sv, _ = reduce_members(members, energy=1.0)
    region = np.ones(image_shape, dtype=bool)
    atlas = DeformationAtlas(nodes=nodes, mean=mean, components=comps, coordinates=coords, singular_values=sv,
                             region=region, affine=np.eye(4), image_sha256="x",
                             members=[{"k": i} for i in range(n_members)])
    return atlas, params


def _truth(atlas, weights, params):
    """Voxel field (3, I, J, K) of the member combination sum w_i member_i (sum w = 1)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in atlas.nodes.image_shape], indexing="ij"), -1).astype(float)
    out = sum(w * (grid @ a.T + b) for w, (a, b) in zip(weights, params, strict=True))
    return np.moveaxis(out, -1, 0).astype(np.float32)


def _at(field, idx):
    """``(m, 3)`` values of a ``(3, I, J, K)`` field at integer voxel indices ``idx (m, 3)``."""
    return field[(slice(None),) + tuple(np.asarray(idx).T)].T


def test_a_field_in_the_atlas_span_is_recovered_exactly():
    atlas, params = _affine_atlas()
    w = np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    truth = _truth(atlas, w, params)
    pts = np.random.default_rng(1).uniform([2, 2, 2], [19, 22, 16], size=(30, 3))
    idx = np.round(pts).astype(int)
    pts = idx.astype(float)
    d = _at(truth, idx)
    fit = fit_atlas(atlas, pts, d, residual_method="none")
    assert fit.info["tau_mm2"] <= 1e-2  # noiseless data: the weakest regularisation is chosen
    np.testing.assert_allclose(fit.atlas_field_vox, truth, atol=0.02)
    assert fit.info["fit_residual_mm"]["max"] < 0.02
    # the member weights name the members that made it
    top = {m["member"] for m in fit.info["member_weights"][:3]}
    assert top == {0, 1, 2}


def test_the_final_field_honours_keypoints_outside_the_span():
    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([1.0, 0, 0, 0, 0, 0, 0, 0]), params)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in atlas.nodes.image_shape], indexing="ij"))
    truth = truth + 0.8 * np.sin(grid[0] / 4.0)[None]  # not an affine field
    idx = np.argwhere(np.ones(atlas.nodes.image_shape, dtype=bool))[::97][:40]
    d = _at(truth, idx)
    fit = fit_atlas(atlas, idx.astype(float), d, prior="atlas")  # the kernel prior would capture the sine itself
    at_kp = _at(fit.field_vox, idx)
    from brainshift.interpolate import interpolate

    tps = interpolate("tps", idx.astype(float), d, atlas.nodes.image_shape)
    tps_kp = _at(tps, idx)
    # honoured as well as the classical TPS honours them (its coarse-grid evaluation is not exact either)
    err_atlas = np.linalg.norm(at_kp - d, axis=1)
    err_tps = np.linalg.norm(tps_kp - d, axis=1)
    assert err_atlas.mean() <= err_tps.mean() + 0.01 and err_atlas.max() <= err_tps.max() + 0.01
    atlas_only = _at(fit.atlas_field_vox, idx)
    assert np.abs(atlas_only - d).max() > 0.3  # ... which the atlas alone cannot do


def test_noise_is_regularised_more_strongly():
    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([0.4, 0.6, 0, 0, 0, 0, 0, 0]), params)
    rng = np.random.default_rng(5)
    idx = np.round(rng.uniform([2, 2, 2], [19, 22, 16], size=(25, 3))).astype(int)
    d = _at(truth, idx)
    clean = fit_atlas(atlas, idx.astype(float), d, residual_method="none")
    noisy = fit_atlas(atlas, idx.astype(float), d + rng.normal(scale=1.0, size=d.shape), residual_method="none")
    assert noisy.info["tau_mm2"] > clean.info["tau_mm2"]


def test_choose_tau_single_keypoint_and_outside_points():
    tau, cv = choose_tau(np.ones((3, 2)), np.zeros(3), 1)
    assert tau == 1.0 and cv == {}
    atlas, _ = _affine_atlas()
    with pytest.raises(KeypointError, match="inside the atlas.s brain"):
        fit_atlas(atlas, np.array([[5.0, 5.0, 5.0], [80.0, 5.0, 5.0]]), np.zeros((2, 3)))


def test_fold_field_on_another_grid_is_the_same_field_in_that_grid_units():
    """On a coarser grid (voxels 2x larger, shifted by one preop voxel) the fold field is the fitted field at those
    points, expressed in the coarse grid's voxel units (half the preop's)."""
    from brainshift.atlas.fit import fold_field_on_grid

    atlas, params = _affine_atlas()
    w = np.array([0.2, 0.3, 0.5, 0, 0, 0, 0, 0])
    truth = _truth(atlas, w, params)
    idx = np.round(np.random.default_rng(7).uniform([2, 2, 2], [19, 22, 16], size=(30, 3))).astype(int)
    d = _at(truth, idx)
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 1.0
    shape = (10, 11, 8)
    f = fold_field_on_grid(atlas, idx.astype(float), d, shape, coarse)
    q = np.argwhere(np.ones(shape, dtype=bool))
    p_full = q * 2.0 + 1.0  # the coarse voxel centres on the preop grid (identity affine)
    a_sum = sum(wi * a for wi, (a, _) in zip(w, params, strict=True))
    b_sum = sum(wi * b for wi, (_, b) in zip(w, params, strict=True))
    expect = (p_full @ a_sum.T + b_sum) / 2.0  # mm (= preop voxels) -> coarse voxels
    np.testing.assert_allclose(f.reshape(3, -1).T, expect, atol=0.03)


def test_residual_spline_is_smoothed_for_noisy_keypoints_only():
    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([0.4, 0.6, 0, 0, 0, 0, 0, 0]), params)
    rng = np.random.default_rng(11)
    idx = np.round(rng.uniform([2, 2, 2], [19, 22, 16], size=(40, 3))).astype(int)
    d = _at(truth, idx)
    clean = fit_atlas(atlas, idx.astype(float), d, prior="atlas")  # the atlas prior's cross-validated ridge
    assert clean.info["residual_lam"] == 0.1  # noiseless: honoured as tps does
    noisy_d = d + rng.normal(scale=1.0, size=d.shape)
    noisy = fit_atlas(atlas, idx.astype(float), noisy_d, prior="atlas")
    assert noisy.info["residual_lam"] != 0.1  # smoother, or no residual spline at all
    mse = float(((noisy.field_vox - truth) ** 2).sum(0).mean())
    exact = fit_atlas(atlas, idx.astype(float), noisy_d, residual_options={"lam": 0.1}, prior="atlas")
    assert mse < float(((exact.field_vox - truth) ** 2).sum(0).mean())  # and closer to the truth for it


def test_evidence_recovers_the_noise_variance_of_data_drawn_from_the_prior():
    """Data drawn from the atlas's own model (z ~ N(0, I), noise variance tau0): the marginal likelihood picks the
    grid value nearest tau0, while an exact-data draw picks the weakest regularisation."""
    from brainshift.atlas.fit import choose_tau_evidence

    rng = np.random.default_rng(3)
    m, k = 200, 12
    bw = rng.normal(size=(3 * m, k)) * np.linspace(3.0, 0.3, k)[None, :]
    taus = tuple(float(t) for t in np.logspace(-3, 2, 11))
    for tau0 in (0.01, 0.1, 1.0):
        picked = []
        for _ in range(5):
            r = bw @ rng.normal(size=k) + rng.normal(scale=np.sqrt(tau0), size=3 * m)
            picked.append(choose_tau_evidence(bw, r, m, taus=taus)[0])
        assert np.median(picked) == pytest.approx(tau0, rel=1e-9), (tau0, picked)
    exact = bw @ rng.normal(size=k)
    tau, scores = choose_tau_evidence(bw, exact, m, taus=taus)
    assert tau == min(taus) and len(scores) == len(taus)
    assert choose_tau_evidence(bw[:3], exact[:3], 1) == (1.0, {})


def test_tau_rule_is_recorded_and_checked():
    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([0.4, 0.6, 0, 0, 0, 0, 0, 0]), params)
    idx = np.round(np.random.default_rng(5).uniform([2, 2, 2], [19, 22, 16], size=(25, 3))).astype(int)
    d = _at(truth, idx)
    ev = fit_atlas(atlas, idx.astype(float), d, residual_method="none")
    cv = fit_atlas(atlas, idx.astype(float), d, residual_method="none", tau_rule="cv")
    assert ev.info["tau_rule"] == "evidence" and "log_evidence" in ev.info and "cv_rmse_mm" not in ev.info
    assert ev.info["prior"] == "scaled-atlas+matern+contact"  # the default
    assert cv.info["tau_rule"] == "cv" and "cv_rmse_mm" in cv.info and cv.info["prior"] == "atlas"
    from brainshift.errors import BrainshiftError

    with pytest.raises(BrainshiftError, match="tau_rule"):
        fit_atlas(atlas, idx.astype(float), d, tau_rule="aic")


# --- the atlas + Matern prior (fit_atlas(prior="atlas+matern")) ---------------------------------------------------

def test_matern52_values():
    from brainshift.atlas.fit import matern52

    assert matern52(np.array(0.0), 10.0) == pytest.approx(1.0)
    a = np.sqrt(5.0)
    assert matern52(np.array(10.0), 10.0) == pytest.approx((1 + a + a * a / 3) * np.exp(-a), rel=1e-12)
    v = matern52(np.linspace(0, 100, 50), 20.0)
    assert np.all(np.diff(v) < 0) and v[-1] > 0


def test_evidence_finds_the_kernel_length_of_data_drawn_from_it():
    """Data drawn from a Matern 5/2 process (length 40 mm) with a negligible atlas: the marginal likelihood picks
    40 mm (median over draws) and a kernel amplitude near the drawn one; data inside the atlas's span with no
    kernel part: no kernel."""
    from brainshift.atlas.fit import _pairwise, choose_hyperparameters_evidence, matern52

    rng = np.random.default_rng(4)
    m = 60
    x = rng.uniform(0, 150, size=(m, 3))
    bw = rng.normal(size=(3 * m, 4)) * 1e-3
    k = np.kron(matern52(_pairwise(x, x), 40.0), np.eye(3))
    chol = np.linalg.cholesky(k + 1e-8 * np.eye(3 * m))
    lengths, etas = [], []
    for _ in range(7):
        r = 2.0 * chol @ rng.normal(size=3 * m) + rng.normal(scale=0.01, size=3 * m)
        hp, _ = choose_hyperparameters_evidence(bw, r, x)
        lengths.append(hp["length_mm"])
        etas.append(hp["eta_mm"])
    assert np.median(lengths) == 40.0, lengths
    assert 1.0 <= np.median(etas) <= 4.0, etas
    bw2 = rng.normal(size=(3 * m, 6)) * np.linspace(3.0, 0.5, 6)[None, :]
    hp, _ = choose_hyperparameters_evidence(bw2, bw2 @ rng.normal(size=6), x)
    assert hp["eta_mm"] == 0.0 and hp["tau_mm2"] == pytest.approx(1e-5)


def test_kernel_prior_recovers_the_span_and_captures_what_the_atlas_cannot():
    atlas, params = _affine_atlas()
    w = np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    truth = _truth(atlas, w, params)
    idx = np.round(np.random.default_rng(1).uniform([2, 2, 2], [19, 22, 16], size=(30, 3))).astype(int)
    d = _at(truth, idx)
    fit = fit_atlas(atlas, idx.astype(float), d, residual_method="none", prior="atlas+matern")
    np.testing.assert_allclose(fit.atlas_field_vox, truth, atol=0.02)  # in the span: the atlas prior's answer
    assert fit.info["prior"] == "atlas+matern" and fit.info["kernel"]["eta_mm"] == 0.0
    # a smooth field the affine members cannot make: the kernel part brings the prior's mean closer to it
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in atlas.nodes.image_shape], indexing="ij"))
    wavy = truth + 0.8 * np.sin(grid[0] / 4.0)[None]
    idx = np.round(np.random.default_rng(2).uniform([0, 0, 0], [21, 24, 18], size=(120, 3))).astype(int)
    d = _at(wavy, idx)
    plain = fit_atlas(atlas, idx.astype(float), d, residual_method="none", prior="atlas")
    kern = fit_atlas(atlas, idx.astype(float), d, residual_method="none", prior="atlas+matern")
    assert kern.info["kernel"]["eta_mm"] > 0

    def mse(f):
        return float(((f - wavy) ** 2).sum(0).mean())

    assert mse(kern.atlas_field_vox) < 0.5 * mse(plain.atlas_field_vox)
    # and with the residual spline the keypoints are honoured as with the atlas prior
    full = fit_atlas(atlas, idx.astype(float), d, prior="atlas+matern")
    at_kp = _at(full.field_vox, idx)
    assert np.abs(at_kp - d).max() < 0.05


@pytest.mark.parametrize("prior", ["atlas+matern", "scaled-atlas+matern"])
def test_fold_field_with_the_kernel_prior_is_the_fitted_field(prior):
    """On the preop grid itself the fold field equals fit_atlas's field (same posterior, same residual spline)."""
    from brainshift.atlas.fit import fold_field_on_grid

    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([1.0, 0, 0, 0, 0, 0, 0, 0]), params)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in atlas.nodes.image_shape], indexing="ij"))
    truth = truth + 0.5 * np.cos(grid[1] / 5.0)[None]
    idx = np.argwhere(np.ones(atlas.nodes.image_shape, dtype=bool))[::53][:60]
    d = _at(truth, idx)
    fit = fit_atlas(atlas, idx.astype(float), d, prior=prior)
    f = fold_field_on_grid(atlas, idx.astype(float), d, atlas.nodes.image_shape, np.eye(4), prior=prior)
    np.testing.assert_allclose(f, fit.field_vox, atol=1e-3)


def test_prior_is_checked():
    from brainshift.errors import BrainshiftError

    atlas, _ = _affine_atlas()
    pts, d = np.array([[5.0, 5.0, 5.0], [8.0, 9.0, 7.0]]), np.zeros((2, 3))
    with pytest.raises(BrainshiftError, match="prior among"):
        fit_atlas(atlas, pts, d, prior="gauss")
    with pytest.raises(BrainshiftError, match="tau_rule 'evidence' with prior"):
        fit_atlas(atlas, pts, d, prior="atlas+matern", tau_rule="cv")


def test_kernel_lengths_shorter_than_the_keypoint_spacing_are_not_considered():
    from brainshift.atlas.fit import identifiable_lengths

    g = np.argwhere(np.ones((4, 4, 4), dtype=bool)).astype(float)
    assert identifiable_lengths(g * 10.0) == (10.0, 20.0, 40.0, 80.0, 160.0)
    assert identifiable_lengths(g * 30.0) == (40.0, 80.0, 160.0)
    assert identifiable_lengths(g * 500.0) == (160.0,)  # at least the longest
    assert identifiable_lengths(g[:1]) == (160.0,)


def test_kernel_prior_smooths_noisy_keypoints_and_honours_exact_ones():
    """The kernel prior's noise estimate decides the residual spline: exact keypoints are honoured (tps's ridge),
    noisy ones are left to the posterior mean, which is closer to the truth than honouring them."""
    atlas, params = _affine_atlas()
    truth = _truth(atlas, np.array([0.4, 0.6, 0, 0, 0, 0, 0, 0]), params)
    rng = np.random.default_rng(11)
    idx = np.round(rng.uniform([2, 2, 2], [19, 22, 16], size=(40, 3))).astype(int)
    d = _at(truth, idx)
    clean = fit_atlas(atlas, idx.astype(float), d, prior="atlas+matern")
    assert clean.info["residual_method"] == "tps" and clean.info["residual_lam"] == 0.1
    noisy_d = d + rng.normal(scale=0.7, size=d.shape)
    noisy = fit_atlas(atlas, idx.astype(float), noisy_d, prior="atlas+matern")
    assert noisy.info["tau_mm2"] > 0.04 and noisy.info["residual_method"] == "none"
    honoured = fit_atlas(atlas, idx.astype(float), noisy_d, prior="atlas+matern", residual_options={"lam": 0.1})

    def mse(f):
        return float(((f - truth) ** 2).sum(0).mean())

    assert mse(noisy.field_vox) < 0.5 * mse(honoured.field_vox)


def test_scaled_prior_fits_the_mean_amplitude():
    """``scaled-atlas+matern``: the atlas mean is one more component (zero prior mean), so a weaker or stronger
    version of a member combination is in its span and is recovered with the mean's amplitude, and zero
    displacements give the zero field; the centred prior (``atlas+matern``) must pay for the fixed mean."""
    atlas, params = _affine_atlas()
    w = np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    idx = np.round(np.random.default_rng(1).uniform([2, 2, 2], [19, 22, 16], size=(30, 3))).astype(int)
    for amplitude in (0.3, 1.0, 2.0):
        truth = amplitude * _truth(atlas, w, params)
        d = _at(truth, idx)
        fit = fit_atlas(atlas, idx.astype(float), d, residual_method="none", prior="scaled-atlas+matern")
        np.testing.assert_allclose(fit.atlas_field_vox, truth, atol=0.02)
        assert fit.info["kernel"]["mean_scale"] == pytest.approx(amplitude, abs=0.01)
        assert fit.info["kernel"]["eta_mm"] == 0.0
    zero = fit_atlas(atlas, idx.astype(float), np.zeros((len(idx), 3)), residual_method="none",
                     prior="scaled-atlas+matern")
    assert np.abs(zero.field_vox).max() < 1e-3 and abs(zero.info["kernel"]["mean_scale"]) < 1e-3
    centred = fit_atlas(atlas, idx.astype(float), np.zeros((len(idx), 3)), residual_method="none",
                        prior="atlas+matern")
    assert centred.info["kernel"]["mean_scale"] == 1.0
    assert np.abs(centred.field_vox).max() > 10 * np.abs(zero.field_vox).max()


def test_default_prior_is_the_scaled_kernel_prior():
    from brainshift.atlas.fit import DEFAULT_PRIOR, PRIORS

    atlas, params = _affine_atlas()
    idx = np.round(np.random.default_rng(3).uniform([2, 2, 2], [19, 22, 16], size=(20, 3))).astype(int)
    fit = fit_atlas(atlas, idx.astype(float), _at(_truth(atlas, np.eye(8)[0], params), idx))
    assert DEFAULT_PRIOR == "scaled-atlas+matern+contact" and DEFAULT_PRIOR in PRIORS
    assert fit.info["prior"] == DEFAULT_PRIOR


def test_averaged_posterior_on_a_one_point_grid_is_that_points_posterior():
    """Averaging over the hyperparameter grid (``hyper_rule="average"``) reduces to the single point's posterior
    when the grid has one point, and its weights concentrate on the most likely point when the data decide."""
    from brainshift.atlas.fit import _averaged_kernel_posterior, _kernel_posterior

    rng = np.random.default_rng(0)
    m = 15
    x = rng.uniform(0, 100, (m, 3))
    bw, s, r = rng.normal(size=(3 * m, 5)), np.full(5, 2.0), rng.normal(size=3 * m)
    hp = {"atlas_scale2": 0.25, "rho": 0.5, "length_mm": 40.0, "tau_mm2": 0.1, "eta_mm": np.sqrt(0.125)}
    one = _kernel_posterior(bw, s, r, x, hp)
    avg, info = _averaged_kernel_posterior(bw, s, r, x, scales=(0.25,), ratios=(0.5,), lengths_mm=(40.0,),
                                           taus=(0.1,))
    np.testing.assert_allclose(avg.coefficients, one.coefficients, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(avg.kernel_parts[0][2], one.kernel_parts[0][2], rtol=1e-10, atol=1e-12)
    assert info["mean_log10_tau"] == pytest.approx(-1.0)
    # noiseless data from the atlas part only: the average is the atlas prior's exact interpolant
    z = rng.normal(size=5)
    avg, info = _averaged_kernel_posterior(bw, s, bw @ z, x)
    np.testing.assert_allclose(avg.coefficients, s * z, atol=1e-2)
    assert info["mean_log10_tau"] < -4


def test_hyper_rule_is_checked_and_recorded():
    from brainshift.errors import BrainshiftError

    atlas, params = _affine_atlas()
    idx = np.round(np.random.default_rng(4).uniform([2, 2, 2], [19, 22, 16], size=(20, 3))).astype(int)
    d = _at(_truth(atlas, np.eye(8)[1], params), idx)
    with pytest.raises(BrainshiftError, match="hyper_rule among"):
        fit_atlas(atlas, idx.astype(float), d, hyper_rule="mean")
    for rule in ("average", "map"):
        fit = fit_atlas(atlas, idx.astype(float), d, residual_method="none", hyper_rule=rule)
        assert fit.info["kernel"]["hyper_rule"] == rule
        np.testing.assert_allclose(fit.atlas_field_vox, _truth(atlas, np.eye(8)[1], params), atol=0.02)
