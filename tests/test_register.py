"""Tests of brainshift.register: keypoint registration of two images on different grids."""

from __future__ import annotations

import numpy as np
import pytest

from _register_pair import INTRAOP_AFFINE, SHAPE, make_pair, true_field
from brainshift.errors import GeometryError
from brainshift.register import RegistrationError, brain_mask, register
from brainshift.volume import Volume


@pytest.fixture(scope="module")
def pair():
    """Preop: textured volume, identity affine. Intraop: the moved tissue on a grid flipped along i, spacing
    1.1 mm, origin shifted, so voxel indices of the two images differ and only world coordinates agree."""
    pre, intra = make_pair()
    return Volume(pre, np.eye(4)), Volume(intra, INTRAOP_AFFINE)


@pytest.fixture(scope="module")
def result(pair):
    pre, intra = pair
    return register(pre, intra, mask=np.ones(SHAPE, bool), method="tps3d")


def test_matches_are_precise_in_the_preop_voxel_frame(result):
    # dx must be the intraop point mapped back to preop voxels minus the preop point: with the flipped,
    # rescaled intraop grid any frame mix-up gives errors of tens of voxels.
    true = true_field(result.points_vox.T).T
    err = np.linalg.norm(result.disps_vox - true, axis=1)
    c = result.counts
    assert c["inliers"] >= 30 and c["keypoints_preop"] > 0 and c["keypoints_intraop"] > 0
    assert (err < 1.0).mean() >= 0.9
    assert 0 < c["inlier_ratio"] <= 1 and c["inliers"] <= c["candidate_matches"]
    assert set(result.scores) == {"descriptor_distance", "ratio", "residual_mm", "scale_mm"}
    assert all(len(v) == len(result.points_vox) for v in result.scores.values())


def test_dense_field_follows_the_truth_near_the_keypoints(result):
    f = result.field
    assert f.shape == (3, *SHAPE) and f.dtype == np.float32
    assert result.compensation.refined_field is None
    p = np.round(result.points_vox[:20]).astype(int)
    dense = f[:, p[:, 0], p[:, 1], p[:, 2]].T
    assert np.median(np.linalg.norm(dense - true_field(p.T.astype(float)).T, axis=1)) < 0.5
    assert {"detect keypoints", "describe keypoints", "match keypoints", "interpolate (tps3d)"} <= set(
        result.timings_s)


def test_images_that_do_not_overlap_raise(pair):
    pre, intra = pair
    far = intra.affine.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(GeometryError, match="expected images that overlap in world space"):
        register(pre, Volume(intra.data, far), mask=np.ones(SHAPE, bool))


def test_a_brain_mask_elsewhere_in_world_space_is_named_so(pair):
    # a non-empty mask on a grid 1000 mm away was reported as "expected a non-empty brain mask, got no voxel inside"
    pre, intra = pair
    far = pre.affine.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(GeometryError, match="expected a brain mask that overlaps the preop image in world space"):
        register(pre, intra, mask=Volume(np.ones(SHAPE, np.uint8), far, "label"))
    with pytest.raises(GeometryError, match="expected a non-empty brain mask, got no voxel inside"):
        register(pre, intra, mask=Volume(np.zeros(SHAPE, np.uint8), far, "label"))


def test_unrelated_images_give_too_few_matches(pair):
    pre, _ = pair
    other = Volume(np.full(SHAPE, 1.0, np.float32), np.eye(4))  # no structure: no intraop keypoints
    with pytest.raises(RegistrationError, match="found 0 inlier matches, need at least 4"):
        register(pre, other, mask=np.ones(SHAPE, bool))


def test_brain_mask_is_the_filled_largest_component():
    # a bright ball of radius 15 with a dark core (a "ventricle") and a separate small bright blob: the mask
    # is the ball with its core filled, without the blob.
    g = np.stack(np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij"))
    r = np.linalg.norm(g - 24.0, axis=0)
    img = np.where(r <= 15, 100.0, 0.0) + np.where(r <= 4, -90.0, 0.0)
    img[2:5, 2:5, 2:5] = 100.0
    m = brain_mask(Volume(img.astype(np.float32), np.eye(4)))
    assert m[24, 24, 24] and m[24, 24, 38] and not m[3, 3, 3] and not m[24, 24, 41]
    assert abs(m.sum() - (r <= 15).sum()) <= 0.02 * (r <= 15).sum()


def test_tps_ridge_is_chosen_by_cross_validation_over_the_matches(pair):
    from brainshift.interpolate import interpolate
    from brainshift.interpolate.tps import LAM_GRID

    pre, intra = pair
    res = register(pre, intra, mask=np.ones(SHAPE, bool), method="tps", statistics=False)
    lam = res.interp_options["lam"]
    assert lam in LAM_GRID and set(res.lam_cv_rmse_mm) == set(LAM_GRID)
    assert res.lam_cv_rmse_mm[lam] == min(res.lam_cv_rmse_mm.values())
    # the initial field is exactly the spline of the matches with that ridge
    expected = interpolate("tps", res.points_vox, res.disps_vox, SHAPE, pre.affine, lam=lam)
    np.testing.assert_array_equal(res.compensation.initial_field, expected)
    # a ridge given by the caller is kept, and no cross-validation runs
    given = register(pre, intra, mask=np.ones(SHAPE, bool), method="tps", interp_options={"lam": 0.1},
                     statistics=False)
    assert given.interp_options == {"lam": 0.1} and given.lam_cv_rmse_mm == {}


def test_register_takes_the_method_in_any_case_and_refuses_bad_method_or_model_before_any_work():
    from brainshift.errors import BrainshiftError

    vol = Volume(np.zeros((8, 8, 8), np.float32), np.eye(4))
    # each came only after detection, description and matching (a model that is a path: an AttributeError)
    with pytest.raises(BrainshiftError, match=r"^expected method one of \['linear', 'tps', 'tps3d'\], got 'spline'$"):
        register(vol, vol, method="Spline")
    with pytest.raises(BrainshiftError, match=r"^expected model as a LoadedModel .* got str \(a path: load it"):
        register(vol, vol, model="weights.safetensors")
