"""Tests of the interpolator registry and the shared keypoint checks (brainshift.interpolate.base)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, GeometryError, KeypointError
from brainshift.interpolate import (
    INTERPOLATORS,
    available_interpolators,
    check_keypoints,
    interpolate,
    register_interpolator,
)
from brainshift.interpolate.base import check_shape

from ._util import grid_keypoints

SHAPE = (10, 12, 9)


def test_registry_lists_the_three_classical_interpolators():
    names = available_interpolators()
    assert {"linear", "tps", "tps3d"} <= set(names)
    assert names == sorted(names)
    assert all(callable(INTERPOLATORS[n]) for n in names)


@pytest.mark.parametrize("method", ["linear", "tps", "tps3d", "gp"])
def test_zero_displacements_give_zero_field(method):
    pts = grid_keypoints(SHAPE, 8, seed=31)
    field = interpolate(method, pts, np.zeros_like(pts), SHAPE, np.diag([0.5, 0.5, 3.0, 1.0]))
    assert field.shape == (3, *SHAPE) and field.dtype == np.float32
    assert np.all(field == 0.0)


@pytest.mark.parametrize("method", ["linear", "tps", "tps3d", "gp"])
def test_dispatch_equals_direct_call(method):
    pts = grid_keypoints(SHAPE, 8, seed=32)
    disps = np.random.default_rng(32).normal(size=pts.shape)
    np.testing.assert_array_equal(interpolate(method, pts, disps, SHAPE), INTERPOLATORS[method](pts, disps, SHAPE))


def test_unknown_method_raises_listing_choices():
    pts = grid_keypoints(SHAPE, 5, seed=33)
    expected = r"expected an interpolator in \['gp', 'linear', 'tps', 'tps3d'.*got 'cubic'"
    with pytest.raises(BrainshiftError, match=expected):
        interpolate("cubic", pts, np.zeros_like(pts), SHAPE)


def test_unknown_option_raises():
    pts = grid_keypoints(SHAPE, 5, seed=34)
    expected = r"options of 'tps'.*\['lam', 'downsample', 'max_memory_gb'\], got \['smoothing'\]"
    with pytest.raises(BrainshiftError, match=expected):
        interpolate("tps", pts, np.zeros_like(pts), SHAPE, smoothing=1.0)


def test_register_new_interpolator_and_refuse_name_clash():
    @register_interpolator("constant_test")
    def constant_interpolate(points_vox, disps_vox, shape, affine=None, *, value=1.0):
        return np.full((3, *shape), value, dtype=np.float32)

    try:
        assert "constant_test" in available_interpolators()
        pts = grid_keypoints(SHAPE, 4, seed=35)
        assert np.all(interpolate("constant_test", pts, pts, SHAPE, value=2.0) == 2.0)
        with pytest.raises(BrainshiftError, match="already registered"):
            register_interpolator("linear")(constant_interpolate)
    finally:
        INTERPOLATORS.pop("constant_test", None)
    assert "constant_test" not in available_interpolators()


def test_identical_duplicates_merged_with_warning():
    pts = grid_keypoints(SHAPE, 6, seed=36)
    disps = np.arange(18, dtype=float).reshape(6, 3)
    p2 = np.vstack([pts, pts[2]])
    d2 = np.vstack([disps, disps[2]])
    with pytest.warns(UserWarning, match=r"merged 1 duplicate keypoint.*keypoints 6 \(= 2"):
        p, d = check_keypoints(p2, d2)
    np.testing.assert_array_equal(p, pts)
    np.testing.assert_array_equal(d, disps)


def test_conflicting_duplicates_raise_naming_them():
    pts = grid_keypoints(SHAPE, 6, seed=37)
    p2 = np.vstack([pts, pts[4]])
    d2 = np.vstack([np.zeros((6, 3)), [[1.0, 0.0, 0.0]]])
    with pytest.raises(KeypointError, match=r"keypoints 4 and 6 at voxel \(") as err:
        check_keypoints(p2, d2)
    assert "(1, 0, 0)" in str(err.value)  # the conflicting displacement is named


@pytest.mark.parametrize(
    ("points", "disps", "match"),
    [
        (np.zeros((5, 2)), np.zeros((5, 2)), r"shape \(N, 3\)"),
        (np.zeros((5, 3)), np.zeros((4, 3)), r"equal shape \(N, 3\), got \(5, 3\) and \(4, 3\)"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, np.nan]]), np.zeros((4, 3)), r"NaN or inf in keypoint 3"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]]), np.full((4, 3), np.inf), "NaN or inf"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]]), np.zeros((3, 3)), "at least 4 distinct keypoints, got 3"),
        (np.tile([1.0, 2, 3], (5, 1)), np.zeros((5, 3)), "at least 4"),
    ],
)
@pytest.mark.filterwarnings("ignore:merged")
def test_bad_keypoints_raise(points, disps, match):
    with pytest.raises(KeypointError, match=match):
        check_keypoints(points, disps)


def test_check_shape():
    assert check_shape((3, 4.0, 5)) == (3, 4, 5)
    for bad in [(3, 4), (3, 0, 5), (3, 4.5, 5), "abc", None]:
        with pytest.raises(GeometryError, match="three positive integers"):
            check_shape(bad)
