"""Safeguards around the network (brainshift.model.safeguards): cross-validated fallback, keypoint consistency,
uncertainty. Exact answers from networks whose behaviour is known: an oracle, a harmful one, the identity."""

import numpy as np
import pytest
import torch

from brainshift.errors import BrainshiftError
from brainshift.interpolate import interpolate
from brainshift.model.checkpoint import LoadedModel
from brainshift.model.grid import mirror_network_tensor, to_network_grid
from brainshift.model.network import NetworkConfig
from brainshift.model.safeguards import fit_blend, keypoint_residuals_mm, safe_refine, sample_field
from brainshift.volume import Volume

CFG = NetworkConfig(features=(4, 8), spacing_mm=2.0)
SHAPE = (24, 28, 20)


def _image(seed=0):
    rng = np.random.default_rng(seed)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-20.0, -30.0, 5.0]
    img = np.zeros(SHAPE, np.float32)
    img[2:-2, 2:-2, 2:-2] = rng.uniform(1, 2, size=tuple(s - 4 for s in SHAPE))
    return Volume(img, aff)


def _keypoints(field, n=24, seed=1):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(3, np.array(SHAPE) - 4, size=(n, 3))
    return pts, sample_field(field, pts)


def _smooth_field():
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    return np.stack([1.5 * np.sin(2 * i) * j, 0.8 * k ** 2 - 0.3 * i, 0.5 * np.cos(3 * j)]).astype(np.float32)


class _Oracle(torch.nn.Module):
    """Returns the ground truth (network units, padded grid) whatever field it is given: a network that is always
    right. For the left-right mirrored problem (recognised by its mirrored image channel) it returns the mirrored
    ground truth, as a right answer to that problem must be."""

    def __init__(self, image, gt):
        super().__init__()
        t = to_network_grid(image, gt, None, CFG).tensor
        self.gt, self.img = t[:, :3].clone(), t[:, 3:4].clone()

    def forward(self, x):
        if x.shape[2:] != self.gt.shape[2:]:
            raise AssertionError("the folds run on the network grid, which here is the image grid")
        if torch.equal(x[:, 3:4], self.img):
            return self.gt.clone()
        return mirror_network_tensor(self.gt, (0,), field=True)


class _Shrink(torch.nn.Module):
    """Halves its input field: a network that is always wrong for a nonzero field."""

    def forward(self, x):
        return 0.5 * x[:, :3]


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x[:, :3].clone()


def test_oracle_network_is_kept_entirely():
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Oracle(image, gt), CFG, {}), method="tps", consistency=False)
    assert res.alpha == pytest.approx(1.0, abs=1e-6)
    assert res.info["heldout_rmse_network_mm"] < 1e-4 < res.info["heldout_rmse_classical_mm"]
    inside = (slice(3, -3),) * 3
    np.testing.assert_allclose(res.field_vox[(slice(None), *inside)], gt[(slice(None), *inside)], atol=1e-4)


def test_harmful_network_falls_back_to_the_classical_field():
    """A translation is reproduced exactly by the spline, so any correction only hurts: alpha = 0 and the
    output is the classical field."""
    image = _image()
    gt = np.broadcast_to(np.array([1.0, -0.5, 0.25], np.float32)[:, None, None, None], (3, *SHAPE)).copy()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Shrink(), CFG, {}), method="tps")
    assert res.alpha == 0.0
    np.testing.assert_allclose(res.field_vox, init, atol=1e-4)
    assert np.abs(res.network_field_vox - init).max() > 0.2  # the network itself did move the field


class _Shift(torch.nn.Module):
    """Adds a constant to its input field: a correction that the consistency step removes at and between the
    keypoints (the keypoints here fill the small grid, within a kernel width of each other)."""

    def forward(self, x):
        return x[:, :3] + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1, 1)


def test_cross_validation_scores_the_output_after_the_consistency_step():
    """The folds score what the output will be: a correction that the keypoint-consistency step removes (a
    constant, here) can neither help nor hurt, so none of it is kept, and the output is the network-free one.
    Random folds, so that every held-out keypoint lies among kept ones, within the local correction's reach (with
    spatial blocks a constant far from the kept keypoints is a real change of the output there)."""
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt, n=30)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    shifted = safe_refine(image, pts, d, init, LoadedModel(_Shift(), CFG, {}), method="tps", fold_rule="random")
    plain = safe_refine(image, pts, d, init, LoadedModel(_Identity(), CFG, {}), method="tps", fold_rule="random")
    assert shifted.alpha == 0.0 and plain.alpha == 0.0
    assert shifted.info["heldout_rmse_output_mm"] == pytest.approx(plain.info["heldout_rmse_output_mm"], abs=1e-6)
    np.testing.assert_allclose(shifted.field_vox, plain.field_vox, atol=1e-5)
    # scored without the step, the same constant looks like a change of the held-out error
    raw = safe_refine(image, pts, d, init, LoadedModel(_Shift(), CFG, {}), method="tps", consistency=False,
                      fold_rule="random")
    assert raw.info["heldout_rmse_network_mm"] > raw.info["heldout_rmse_classical_mm"] + 0.1


def test_consistency_honours_the_keypoints_at_least_as_well_as_the_initial_field():
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt, n=30)
    for method in ("tps", "linear"):
        init = interpolate(method, pts, d, SHAPE, image.affine)
        res = safe_refine(image, pts, d, init, LoadedModel(_Shrink(), CFG, {}), method=method, folds=2)
        assert res.info["consistency"] in ("local", "tps")
        r_init = keypoint_residuals_mm(init, pts, d, image.affine).mean()
        assert res.info["keypoint_residual_mean_mm"] <= r_init + 0.05
        assert res.info["keypoint_residual_mean_mm"] <= res.info["keypoint_residual_mean_mm_before"] + 1e-6


def test_uncertainty_zero_spread_grows_away_from_keypoints():
    """The identity network has no mirror spread; sigma is then rho x distance to the nearest keypoint."""
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Identity(), CFG, {}), method="tps")
    sig = res.uncertainty_mm
    assert sig.shape == SHAPE and sig.dtype == np.float32 and (sig >= 0).all()
    # distance to the nearest keypoint on the network grid, resampled: small at the keypoints, growing away
    at_kp = sig[tuple(np.rint(pts).astype(int).T)]
    rho = res.info["rho"]
    assert rho > 0 and sig.max() > 0
    # rho is per world component: the held-out 3-D RMS error over sqrt(3), per mm of distance
    cv = res.info
    assert rho == pytest.approx(cv["heldout_rmse_output_mm"] / np.sqrt(3.0) / cv["heldout_rms_distance_mm"], rel=1e-9)
    assert at_kp.max() <= rho * 2.0 * np.sqrt(3.0) + 1e-6  # within one 2 mm voxel diagonal of a keypoint
    assert sig.max() > 4.0 * at_kp.max()


def test_few_keypoints_skip_cross_validation_and_bad_input_raises():
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt, n=5)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Identity(), CFG, {}), method="tps")
    assert res.alpha == 1.0 and res.info["folds"] == 0
    with pytest.raises(BrainshiftError, match="keypoints"):
        safe_refine(image, pts, d[:3], init, LoadedModel(_Identity(), CFG, {}), method="tps")


def test_fit_blend_recovers_the_weights_and_respects_the_box():
    """Held-out errors made of known multiples of the correction c and the spline t give those multiples back;
    outside [0, 1]^2 the exact box-constrained minimum (checked on a fine grid) is returned."""
    rng = np.random.default_rng(5)
    c, t = rng.normal(size=(40, 3)), rng.normal(size=(40, 3))
    assert fit_blend(-(0.3 * c + 0.8 * t), c, t) == pytest.approx((0.3, 0.8), abs=1e-9)
    assert fit_blend(-0.5 * c, c, None) == pytest.approx((0.5, 0.0), abs=1e-12)
    assert fit_blend(-0.5 * c, c, np.zeros_like(t)) == pytest.approx((0.5, 0.0), abs=1e-12)  # no spline: beta 0
    assert fit_blend(-0.5 * c, np.zeros_like(c), t)[0] == 0.0  # nothing to keep: alpha 0
    grid = np.linspace(0.0, 1.0, 201)
    for e0 in (2.0 * c - 0.4 * t, -(1.7 * c + 0.2 * t) + 0.1 * rng.normal(size=c.shape), 3.0 * t - 2.5 * c):
        a, b = fit_blend(e0, c, t)
        assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
        costs = [float(((e0 + x * c + y * t) ** 2).sum()) for x in grid for y in grid]
        assert float(((e0 + a * c + b * t) ** 2).sum()) <= min(costs) + 1e-9


def test_consistency_correction_fits_the_keypoints_and_vanishes_far_from_them():
    """The local correction of step 2: through the residuals at the keypoints (to the ridge and the coarse
    evaluation), zero a few kernel widths away, whatever trend the residuals have (a thin-plate spline would
    carry their linear trend across the whole grid)."""
    from brainshift.model.safeguards import CONSISTENCY_WIDTH_MM, consistency_correction

    shape = (90, 40, 30)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 180 x 80 x 60 mm
    rng = np.random.default_rng(3)
    pts = np.column_stack([rng.uniform(2, 12, 12), rng.uniform(5, 35, 12), rng.uniform(5, 25, 12)])
    resid = np.column_stack([0.5 * pts[:, 1] / 10, -0.3 * np.ones(12), 0.2 * pts[:, 2] / 10])  # a linear trend
    corr = consistency_correction(pts, resid, shape, affine)
    assert corr.shape == (3, *shape) and corr.dtype == np.float32
    np.testing.assert_allclose(sample_field(corr, pts), resid, atol=0.03 * np.abs(resid).max())
    far = int(np.ceil((12 * 2.0 + 5 * CONSISTENCY_WIDTH_MM) / 2.0))  # voxels beyond 5 widths of every keypoint
    assert far < shape[0]
    assert np.abs(corr[:, far:]).max() < 1e-4 * np.abs(resid).max()
    # the global alternative the cross-validation may choose instead carries the trend across the grid
    glob = consistency_correction(pts, resid, shape, affine, kernel="tps")
    assert np.abs(glob[:, far:]).max() > 0.1 * np.abs(resid).max()
    # coincident keypoints (same point twice, same residual) are solvable: the ridge
    twice = consistency_correction(np.vstack([pts, pts[:1]]), np.vstack([resid, resid[:1]]), shape, affine)
    np.testing.assert_allclose(sample_field(twice, pts), resid, atol=0.03 * np.abs(resid).max())


def test_spatial_block_folds_partition_the_keypoints_into_compact_blocks():
    """``_folds`` (blocks): every keypoint held out exactly once, near-equal fold sizes, and two far-apart
    clusters become two folds, each one whole cluster (the held-out keypoints are far from the kept ones)."""
    from brainshift.model.safeguards import _folds

    rng = np.random.default_rng(5)
    left = rng.normal([-40.0, 0.0, 0.0], 3.0, size=(10, 3))
    right = rng.normal([40.0, 5.0, 0.0], 3.0, size=(10, 3))
    pts = np.vstack([left, right])[rng.permutation(20)]
    folds = _folds(pts, 2, 3, seed=0)
    assert len(folds) == 2
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(20))
    assert sorted(int(np.sign(pts[f, 0]).sum()) for f in folds) == [-10, 10]  # each fold one whole cluster
    four = _folds(pts, 4, 3, seed=0)
    assert sorted(len(f) for f in four) == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate(four)), np.arange(20))
    assert all(len(set(np.sign(pts[f, 0]).astype(int))) == 1 for f in four)  # no block straddles the gap
    assert _folds(pts[:5], 4, 3, seed=0) == []  # fewer than 2 x min_per_fold: no cross-validation
    rand = _folds(pts, 4, 3, seed=0, rule="random")
    np.testing.assert_array_equal(np.sort(np.concatenate(rand)), np.arange(20))
    image = _image()
    init = np.zeros((3, *SHAPE), np.float32)
    with pytest.raises(BrainshiftError, match="fold_rule"):
        safe_refine(image, pts[:4] * 0 + 5, np.zeros((4, 3)), init, LoadedModel(_Identity(), CFG, {}), method="tps",
                    fold_rule="kmeans")


def test_knndm_folds_match_the_distances_at_which_the_field_is_used():
    """``knndm_folds``: a partition of the keypoints whose held-out-to-kept distances match the target's. Two tight
    clusters 80 mm apart: when the field is used far from every keypoint (target 80 mm) the folds are the two
    clusters (spatial blocks, held-out keypoints 80 mm from the kept ones); when it is used beside the keypoints
    (target 1 mm) every fold holds keypoints of both clusters (held-out keypoints a few mm from kept ones)."""
    from brainshift.model.safeguards import heldout_distances_mm, knndm_folds

    rng = np.random.default_rng(5)
    left = rng.normal([-40.0, 0.0, 0.0], 1.0, size=(10, 3))
    right = rng.normal([40.0, 5.0, 0.0], 1.0, size=(10, 3))
    pts = np.vstack([left, right])[rng.permutation(20)]
    far, rec_far = knndm_folds(pts, 2, 3, 0, np.full(100, 80.0))
    near, rec_near = knndm_folds(pts, 2, 3, 0, np.full(100, 1.0))
    for split in (far, near):
        assert len(split) == 2
        np.testing.assert_array_equal(np.sort(np.concatenate(split)), np.arange(20))
        assert min(len(h) for h in split) >= 3
    assert rec_far["fold_clusters"] == 2 and sorted(int(np.sign(pts[f, 0]).sum()) for f in far) == [-10, 10]
    assert np.median(heldout_distances_mm(pts, far)) > 70.0
    assert rec_near["fold_clusters"] > 2 and all(len(set(np.sign(pts[f, 0]).astype(int))) == 2 for f in near)
    assert np.median(heldout_distances_mm(pts, near)) < 10.0
    assert rec_near["fold_w_mm"] < 10.0 and rec_far["fold_w_mm"] < 10.0
    assert knndm_folds(pts[:5], 4, 3, 0, np.ones(10)) == ([], {})  # too few keypoints: no cross-validation


def test_safe_refine_records_the_knndm_fold_choice():
    """``fold_rule="knndm"`` runs the cross-validation on the chosen folds and records the choice; the identity
    network's correction is zero, so none of it is kept."""
    image = _image()
    gt = _smooth_field()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Identity(), CFG, {}), method="tps", fold_rule="knndm")
    assert res.info["fold_rule"] == "knndm" and res.info["folds"] == 4
    assert 4 <= res.info["fold_clusters"] <= len(pts) and res.info["fold_w_mm"] >= 0.0
    assert res.alpha == 0.0


@pytest.mark.parametrize("rule", ["knndm", "blocks", "random"])
def test_few_keypoints_run_without_folds_that_cannot_interpolate(rule):
    """6 or 7 keypoints would leave a fold with 3 kept keypoints, fewer than an interpolator needs: no
    cross-validation (alpha = 1) instead of an error; from 8 on every fold keeps at least 4."""
    from brainshift.model.safeguards import MIN_FOLD_KEPT, _folds, knndm_folds

    image = _image()
    gt = _smooth_field()
    for n in (6, 7, 8, 9, 11):
        pts, d = _keypoints(gt, n=n, seed=n)
        init = interpolate("tps", pts, d, SHAPE, image.affine)
        res = safe_refine(image, pts, d, init, LoadedModel(_Identity(), CFG, {}), method="tps", fold_rule=rule)
        assert (res.info["folds"] == 0) == (n < 8) and (res.alpha == 1.0 if n < 8 else res.alpha == 0.0)
        split = (knndm_folds(pts * 2.0, 4, 3, 0, np.linspace(0, 40, 50))[0] if rule == "knndm"
                 else _folds(pts * 2.0, 4, 3, 0, rule))
        assert all(n - len(h) >= MIN_FOLD_KEPT and len(h) >= 3 for h in split)


def test_wasserstein_1d_matches_scipy():
    """``wasserstein_1d`` (quantile form, midpoint rule) agrees with ``scipy.stats.wasserstein_distance`` to
    ``(max - min) / W1_LEVELS`` on samples of different sizes, and is 0 for a distribution against itself."""
    from scipy.stats import wasserstein_distance

    from brainshift.model.safeguards import W1_LEVELS, wasserstein_1d

    rng = np.random.default_rng(2)
    for a, b in ((rng.gamma(2.0, 5.0, 17), rng.uniform(0, 40, 50000)), (rng.normal(10, 3, 300), rng.normal(12, 1, 999)),
                 (np.full(5, 3.0), np.linspace(0, 10, 11))):
        span = max(a.max(), b.max()) - min(a.min(), b.min())
        assert abs(wasserstein_1d(a, b) - wasserstein_distance(a, b)) <= span / W1_LEVELS + 1e-12
    x = rng.uniform(0, 1, 40)
    assert wasserstein_1d(x, x) == 0.0


def test_scale_normalisation_changes_nothing_for_a_homogeneous_network_and_is_recorded():
    """A network with ``f(s u) = s f(u)`` (here: halving its input) gives the same output with and without the
    scale normalisation, folds included (they use the full problem's factor); the factor is recorded."""
    image, gt = _image(), 0.05 * _smooth_field()  # RMS well below 2.5 mm
    pts, d = _keypoints(gt, n=30)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    meta = {"inference": {"min_field_rms_mm": 2.5}}
    scaled = safe_refine(image, pts, d, init, LoadedModel(_Shrink(), CFG, meta), method="tps", min_field_rms_mm=None)
    plain = safe_refine(image, pts, d, init, LoadedModel(_Shrink(), CFG, meta), method="tps", min_field_rms_mm=0)
    assert scaled.info["field_scale"] > 10.0 and plain.info["field_scale"] == 1.0
    assert scaled.alpha == pytest.approx(plain.alpha, abs=1e-6)
    np.testing.assert_allclose(scaled.field_vox, plain.field_vox, atol=1e-5)
    # a correction of fixed size (a prior that ignores the input's magnitude) shrinks by the factor
    shifted = safe_refine(image, pts, d, init, LoadedModel(_Shift(), CFG, meta), method="tps", consistency=False,
                          min_field_rms_mm=None)
    # off by default under the safeguards
    assert safe_refine(image, pts, d, init, LoadedModel(_Shift(), CFG, meta), method="tps").info["field_scale"] == 1
    unscaled = safe_refine(image, pts, d, init, LoadedModel(_Shift(), CFG, {}), method="tps", consistency=False)
    corr = np.abs(shifted.network_field_vox - init).max()
    assert corr == pytest.approx(np.abs(unscaled.network_field_vox - init).max() / shifted.info["field_scale"],
                                 rel=1e-3)


def test_given_field_folds_remove_the_held_out_keypoints_interpolation_contribution():
    """``F + tps(kept) - tps(all)``: for F = tps(all) exactly the interpolation of the kept keypoints (the rule for
    interpolated fields), for F = G + tps(all) exactly G + tps(kept) (a given field keeps its own detail), and on
    a coarser grid the same to resampling accuracy."""
    from brainshift.model.safeguards import given_field_folds

    image, g = _image(), _smooth_field()
    pts, d = _keypoints(g)
    keep = np.arange(len(pts))[::2]
    full = interpolate("tps", pts, d, SHAPE, image.affine)
    kept = interpolate("tps", pts[keep], d[keep], SHAPE, image.affine)
    ff = given_field_folds(image, full, pts, d)
    np.testing.assert_allclose(ff(keep, SHAPE, image.affine), kept, atol=1e-4)
    ff = given_field_folds(image, g + full, pts, d)
    np.testing.assert_allclose(ff(keep, SHAPE, image.affine), g + kept, atol=1e-4)
    # a grid with half the voxels along each axis (2x the spacing): with every keypoint kept, the given field
    # resampled (trilinear) there, in that grid's voxel units (half the fine grid's)
    coarse = image.affine.copy()
    coarse[:3, :3] *= 2.0
    coarse[:3, 3] += 0.5 * np.diag(image.affine)[:3]
    shape_c = tuple(s // 2 for s in SHAPE)
    got = given_field_folds(image, g + full, pts, d)(np.arange(len(pts)), shape_c, coarse)
    q = np.argwhere(np.ones(shape_c, dtype=bool)).astype(float)
    ref = 0.5 * sample_field(g + full, 2.0 * q + 0.5)
    np.testing.assert_allclose(got.reshape(3, -1).T, ref, atol=1e-4)


def test_compensate_scores_a_given_field_with_its_own_folds(monkeypatch):
    """With an initial field and keypoints, the safeguards' folds come from the given field
    (:func:`given_field_folds`), not from an interpolation of the kept keypoints alone."""
    import brainshift.model.safeguards as sg
    from brainshift.compensate import compensate

    image, g = _image(), _smooth_field()
    pts, d = _keypoints(g)
    calls = []
    real = sg.given_field_folds

    def spy(*args, **kwargs):
        inner = real(*args, **kwargs)

        def fold(keep, shape, affine):
            calls.append(len(keep))
            return inner(keep, shape, affine)
        return fold

    monkeypatch.setattr(sg, "given_field_folds", spy)
    res = compensate(image, keypoints=(pts, d), initial_field=g, model=LoadedModel(_Shrink(), CFG, {}))
    assert calls and all(0 < n < len(pts) for n in calls)
    assert res.safeguards["alpha"] == 0.0  # halving the exact field only hurts: it comes back unchanged
    np.testing.assert_allclose(res.refined_field, g, atol=1e-3)


def test_consistency_guard_makes_the_least_correction_that_meets_the_bound():
    """The contract of issue 11 (mean keypoint residual <= bound): a field within it is returned as it is; a field
    off at the keypoints gets the smallest share of the local correction toward the target that reaches the
    bound (so the mean residual lands on the bound, not below it), and nothing changes a few kernel widths from
    the keypoints."""
    from brainshift.model.safeguards import CONSISTENCY_WIDTH_MM, enforce_keypoint_consistency

    shape = (90, 40, 30)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(4)
    pts = np.column_stack([rng.uniform(2, 12, 15), rng.uniform(5, 35, 15), rng.uniform(5, 25, 15)])
    d = rng.normal(0.0, 1.0, size=(15, 3))
    field = np.zeros((3, *shape), np.float32)
    r0 = keypoint_residuals_mm(field, pts, d, affine).mean()
    same, info = enforce_keypoint_consistency(field, pts, d, d, affine, r0 + 0.01)
    assert same is field and not info["applied"] and info["met"]
    bound = 0.5 * r0
    out, info = enforce_keypoint_consistency(field, pts, d, d, affine, bound)
    after = keypoint_residuals_mm(out, pts, d, affine).mean()
    assert info["applied"] and info["met"] and after <= bound
    assert after == pytest.approx(bound, abs=0.01 * r0)  # the least correction: on the bound, not far below
    assert 0.0 < info["scale"] < 1.0 and info["passes"] == 1
    far = int(np.ceil((12 * 2.0 + 5 * CONSISTENCY_WIDTH_MM) / 2.0))
    assert np.abs(out[:, far:]).max() < 1e-4
    # a bound at the target's own residual is reached too (by more passes if the coarse grid needs them)
    tight, info = enforce_keypoint_consistency(field, pts, d, d, affine, 0.02 * r0)
    assert info["met"] and keypoint_residuals_mm(tight, pts, d, affine).mean() <= 0.02 * r0


class _Bump(torch.nn.Module):
    """Adds a sharp bump (large near the grid's centre, where the keypoints are): a correction the ridge of the
    ``tps`` consistency kernel cannot remove at the keypoints."""

    def forward(self, x):
        n = x.shape[2:]
        g = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in n], indexing="ij")
        bump = 6.0 * torch.exp(-(g[0] ** 2 + g[1] ** 2 + g[2] ** 2) / 0.05)
        return x[:, :3] + bump.view(1, 1, *n)


def test_safe_refine_output_meets_the_keypoint_consistency_contract():
    """Whatever the network adds and whichever weights the cross-validation picks, the output's mean keypoint
    residual is at most the initial field's + CONSISTENCY_TOLERANCE_MM (issue 11), and the guard is recorded."""
    from brainshift.model.safeguards import CONSISTENCY_TOLERANCE_MM

    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt, n=30)
    for method in ("tps", "linear"):
        init = interpolate(method, pts, d, SHAPE, image.affine)
        res = safe_refine(image, pts, d, init, LoadedModel(_Bump(), CFG, {}), method=method)
        r_init = keypoint_residuals_mm(init, pts, d, image.affine).mean()
        assert keypoint_residuals_mm(res.field_vox, pts, d, image.affine).mean() <= r_init + CONSISTENCY_TOLERANCE_MM
        guard = res.info["consistency_guard"]
        assert guard["met"] and guard["initial_residual_mean_mm"] == pytest.approx(r_init)
        assert guard["bound_mm"] == pytest.approx(r_init + CONSISTENCY_TOLERANCE_MM - 0.01)


class _RecordKeypointChannel(torch.nn.Module):
    """Returns its input field and records the keypoint channel (channel 4) of every call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x[0, 4].clone())
        return x[:, :3].clone()


def test_every_pass_gets_the_keypoint_channel_of_its_own_keypoints():
    from brainshift.compensate import compensate
    from brainshift.model.grid import keypoint_proximity

    cfg = NetworkConfig(features=(4, 8), spacing_mm=2.0, keypoint_channel="proximity", keypoint_scale_mm=6.0)
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    net = _RecordKeypointChannel()
    safe_refine(image, pts, d, init, LoadedModel(net, cfg, {}), method="tps")
    a = image.affine
    full = keypoint_proximity(pts @ a[:3, :3].T + a[:3, 3], SHAPE, a, 6.0)  # network grid = image grid here
    torch.testing.assert_close(net.seen[0], full)  # the full problem
    torch.testing.assert_close(net.seen[1], full.flip(0))  # its left-right mirrored pass
    folds = net.seen[2:]
    assert len(folds) >= 2
    for f in folds:  # each fold sees only its kept keypoints: nowhere closer to a keypoint, somewhere farther
        assert float((f - full).max()) <= 1e-4 and float((full - f).max()) > 0.05  # float32 distances
    # a model that takes the keypoints refuses to run without them, with one clear error
    with pytest.raises(BrainshiftError, match="expected the driving keypoints"):
        compensate(image, initial_field=init, model=LoadedModel(_RecordKeypointChannel(), cfg, {}))


def test_local_alpha_map_is_the_weighted_least_squares_weight():
    from brainshift.model.safeguards import local_alpha_map

    image = _image()
    ni = to_network_grid(image, np.zeros((3, *SHAPE), np.float32), None, CFG)
    a = image.affine
    rng = np.random.default_rng(0)
    held_vox = np.array([[4.0, 5.0, 4.0], [19.0, 22.0, 15.0]])
    held = held_vox @ a[:3, :3].T + a[:3, 3]
    c = rng.normal(size=(2, 3))
    r = np.stack([-1.0 * c[0], -0.0 * c[1]])  # the correction is right at the first keypoint, useless at the second
    # an infinite bandwidth and no prior: the global least-squares weight everywhere
    glob = float(np.clip(-(r * c).sum() / (c ** 2).sum(), 0, 1))
    m = local_alpha_map(held, r, c, 0.5, 1e9, 0.0, ni)
    np.testing.assert_allclose(m.numpy(), glob, atol=1e-5)
    # a narrow bandwidth: each keypoint's own weight near it; the global alpha far from both (a strong prior)
    m = local_alpha_map(held, r, c, 0.5, 4.0, 0.0, ni)
    assert float(m[4, 5, 4]) == pytest.approx(1.0, abs=1e-4) and float(m[19, 22, 15]) == pytest.approx(0.0, abs=1e-4)
    m = local_alpha_map(held, r, c, 0.3, 4.0, 1e6, ni)
    np.testing.assert_allclose(m.numpy(), 0.3, atol=1e-4)
    with pytest.raises(BrainshiftError, match="local_alpha"):
        local_alpha_map(held, r, c, 0.5, 0.0, 1.0, ni)


def test_local_alpha_keeps_an_oracle_and_drops_a_harmful_network():
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Oracle(image, gt), CFG, {}), method="tps",
                      consistency=False, local_alpha=(20.0, 1.0))
    la = res.info["local_alpha"]
    assert la["min"] > 0.98 and la["bandwidth_mm"] == 20.0
    inside = (slice(3, -3),) * 3
    np.testing.assert_allclose(res.field_vox[(slice(None), *inside)], gt[(slice(None), *inside)], atol=0.02)
    trans = np.broadcast_to(np.array([1.0, -0.5, 0.25], np.float32)[:, None, None, None], (3, *SHAPE)).copy()
    pts, d = _keypoints(trans)
    init = interpolate("tps", pts, d, SHAPE, image.affine)
    res = safe_refine(image, pts, d, init, LoadedModel(_Shrink(), CFG, {}), method="tps", local_alpha=(20.0, 1.0))
    assert res.info["local_alpha"]["max"] == 0.0
    np.testing.assert_allclose(res.field_vox, init, atol=1e-4)


class _MustNotRun(torch.nn.Module):
    def forward(self, x):
        raise AssertionError("the network ran although its correction gets weight 0")


@pytest.mark.parametrize("n", [24, 5])
def test_without_learnt_correction_the_output_is_the_classical_field_and_sigma_its_distance_term(n):
    """``learnt_correction=False`` fixes alpha = 0 even for a network that is always right (an oracle) and without
    folds (few keypoints): the network does not run (one that raises is never called), the output is the linear
    field plus the keypoint consistency step (no farther from the keypoints than the linear field), and the
    uncertainty is ``rho d(x)`` alone (no spread term)."""
    image, gt = _image(), _smooth_field()
    pts, d = _keypoints(gt, n=n)
    init = interpolate("linear", pts, d, SHAPE, image.affine)
    loaded = LoadedModel(_Oracle(image, gt), CFG, {})
    res = safe_refine(image, pts, d, init, loaded, method="linear", learnt_correction=False)
    assert res.alpha == 0.0 and res.info["learnt_correction"] is False
    assert res.network_field_vox is init and res.info.get("heldout_rmse_network_mm") is None  # the network never ran
    other = safe_refine(image, pts, d, init, LoadedModel(_MustNotRun(), CFG, {}), method="linear",
                        learnt_correction=False)
    np.testing.assert_array_equal(res.field_vox, other.field_vox)
    np.testing.assert_array_equal(res.uncertainty_mm, other.uncertainty_mm)
    assert np.abs(res.field_vox - init).max() < 0.25  # only the consistency step's small change
    assert res.info["keypoint_residual_mean_mm"] <= keypoint_residuals_mm(init, pts, d, image.affine).mean() + 1e-6
    rho = res.info["rho"]
    assert (rho > 0) == (n == 24)
    # sigma = rho * distance to the nearest keypoint (mm): 0 at a keypoint's voxel, growing away from them
    corner = np.array([2.0, 2.0, 2.0])
    dist = np.linalg.norm((pts - corner) * 2.0, axis=1).min()
    assert res.uncertainty_mm[2, 2, 2] == pytest.approx(rho * dist, rel=0.05, abs=1e-4)
    kept = safe_refine(image, pts, d, init, loaded, method="linear")
    assert kept.info["learnt_correction"] is True and kept.alpha > 0.5
