"""Tests of the Delaunay-linear interpolator (brainshift.interpolate.linear)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import Delaunay

from brainshift.errors import KeypointError
from brainshift.interpolate import linear_interpolate
from brainshift.interpolate.linear import volume_corners

from ._util import affine_disps, affine_field, grid_keypoints

SHAPE = (14, 16, 12)


def _inside_hull(points: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    return (Delaunay(points).find_simplex(g.reshape(-1, 3)) >= 0).reshape(shape)


def test_reproduces_affine_field_inside_hull_nearest_mode():
    pts = grid_keypoints(SHAPE, 15, seed=1)
    u, m, b = affine_disps(pts)
    field = linear_interpolate(pts, u, SHAPE, outside="nearest")
    assert field.shape == (3, *SHAPE) and field.dtype == np.float32
    inside = _inside_hull(pts, SHAPE)
    assert inside.sum() > 200  # the hull covers a real part of the grid
    err = np.abs(field - affine_field(SHAPE, m, b))[:, inside]
    assert err.max() < 1e-4


def test_corners_as_keypoints_reproduce_affine_field_everywhere():
    # The 8 corners given as keypoints are not added twice (corner skipped, keypoint wins), so the
    # triangulation spans the whole box with the affine values and the field is affine everywhere.
    pts = np.concatenate([grid_keypoints(SHAPE, 6, seed=2), volume_corners(SHAPE)])
    u, m, b = affine_disps(pts)
    field = linear_interpolate(pts, u, SHAPE, outside="corners")
    assert np.abs(field - affine_field(SHAPE, m, b)).max() < 1e-4


@pytest.mark.parametrize("outside", ["corners", "nearest"])
def test_returns_keypoint_displacements_at_keypoints(outside):
    pts = grid_keypoints(SHAPE, 12, seed=3)
    disps = np.random.default_rng(3).normal(scale=2.0, size=pts.shape)
    field = linear_interpolate(pts, disps, SHAPE, outside=outside)
    i, j, k = pts.astype(int).T
    np.testing.assert_allclose(field[:, i, j, k].T, disps, atol=1e-5)


def test_corners_mode_anchors_the_eight_corners_at_zero():
    pts = grid_keypoints(SHAPE, 10, seed=4)
    disps = np.full(pts.shape, 3.0)
    field = linear_interpolate(pts, disps, SHAPE)  # default outside="corners"
    c = volume_corners(SHAPE).astype(int)
    assert len(c) == 8
    assert np.all(field[:, c[:, 0], c[:, 1], c[:, 2]] == 0.0)
    # and the field is not zero elsewhere: halfway between a corner and a keypoint it is between 0 and 3
    assert 0.0 < field[0, 7, 8, 6] <= 3.0 + 1e-6


def test_nearest_mode_outside_point_gets_nearest_keypoint_displacement():
    pts = grid_keypoints(SHAPE, 10, seed=5, margin=4)
    disps = np.random.default_rng(5).normal(size=pts.shape)
    field = linear_interpolate(pts, disps, SHAPE, outside="nearest")
    for q in ([0, 0, 0], [13, 0, 11], [0, 15, 5]):
        assert not _inside_hull(pts, SHAPE)[tuple(q)]
        nearest = np.argmin(((pts - np.array(q, float)) ** 2).sum(axis=1))  # brute force, by hand
        np.testing.assert_allclose(field[:, q[0], q[1], q[2]], disps[nearest], atol=1e-6)


def test_affine_argument_does_not_change_the_field():
    # barycentric weights are invariant under affine maps, so the world geometry is irrelevant
    pts = grid_keypoints(SHAPE, 8, seed=6)
    disps = np.random.default_rng(6).normal(size=pts.shape)
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    np.testing.assert_array_equal(linear_interpolate(pts, disps, SHAPE, aff), linear_interpolate(pts, disps, SHAPE))


def test_coplanar_keypoints_raise_keypoint_error():
    pts = np.array([[2, 3, 5], [9, 3, 5], [4, 10, 5], [11, 12, 5], [6, 6, 5], [3, 13, 5]], dtype=float)
    with pytest.raises(KeypointError, match="plane"):
        linear_interpolate(pts, np.ones_like(pts), SHAPE)
    with pytest.raises(KeypointError, match="line"):
        linear_interpolate(pts[:4] * [1, 0, 0] + [0, 4, 4], np.ones((4, 3)), SHAPE)


def test_fewer_than_four_keypoints_raise():
    pts = grid_keypoints(SHAPE, 3, seed=7)
    with pytest.raises(KeypointError, match="at least 4"):
        linear_interpolate(pts, np.zeros_like(pts), SHAPE)


def test_qhull_error_becomes_keypoint_error(monkeypatch):
    import scipy.spatial
    from scipy.spatial import QhullError

    def broken(*args, **kwargs):
        raise QhullError("QH6154 Qhull precision error: initial simplex is flat")

    monkeypatch.setattr(scipy.spatial, "Delaunay", broken)
    pts = grid_keypoints(SHAPE, 6, seed=8)
    with pytest.raises(KeypointError, match="QH6154"):
        linear_interpolate(pts, np.zeros_like(pts), SHAPE)


def test_unknown_outside_mode_raises():
    from brainshift.errors import BrainshiftError

    pts = grid_keypoints(SHAPE, 6, seed=9)
    with pytest.raises(BrainshiftError, match="outside"):
        linear_interpolate(pts, np.zeros_like(pts), SHAPE, outside="zero")
