"""Tests of brainshift.keypoints.sampling: trilinear sampling and the keypoint / held-out draw."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import GeometryError, KeypointError
from brainshift.keypoints.sampling import sample_keypoints, trilinear_sample

SHAPE = (12, 10, 8)
B = np.array([[0.02, -0.01, 0.03], [0.00, 0.05, -0.02], [0.01, 0.01, -0.04]])
T = np.array([0.5, -1.25, 2.0])


def affine_field() -> np.ndarray:
    """Field u(p) = B p + T (voxel units), exactly reproduced by trilinear interpolation."""
    grid = np.indices(SHAPE).astype(np.float64)
    return (np.einsum("ab,bijk->aijk", B, grid) + T[:, None, None, None]).astype(np.float32)


def test_trilinear_exact_on_affine_field():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, np.array(SHAPE) - 1, size=(50, 3))
    pts[0] = [0, 0, 0]
    pts[1] = np.array(SHAPE) - 1  # the last voxel centre is inside the grid
    got = trilinear_sample(affine_field(), pts)
    assert got.shape == (50, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, pts @ B.T + T, atol=1e-5)


def test_trilinear_hand_value_and_bounds():
    field = np.zeros((3, 2, 2, 2), np.float32)
    field[0, 1, 1, 1] = 8.0  # corner value; at the cell centre each corner weighs 1/8
    np.testing.assert_allclose(trilinear_sample(field, np.array([[0.5, 0.5, 0.5]])), [[1.0, 0.0, 0.0]])
    with pytest.raises(KeypointError, match="inside the grid"):
        trilinear_sample(field, np.array([[0.0, 0.0, 1.01]]))
    with pytest.raises(KeypointError, match="shape"):
        trilinear_sample(field, np.zeros((4, 2)))
    with pytest.raises(GeometryError):
        trilinear_sample(np.zeros((2, 2, 2, 2)), np.zeros((1, 3)))


def candidates(n=40, seed=7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, np.array(SHAPE) - 1, size=(n, 3))


def allowed() -> np.ndarray:
    mask = np.ones(SHAPE, dtype=bool)
    mask[8:] = False  # "tumour" at i >= 8
    return mask


def test_sample_values_disjoint_and_k_range():
    cand = candidates()
    mask = allowed()
    inside = cand[mask[tuple(np.rint(cand).astype(int).T)]]
    for seed in range(5):
        pts, disps, held, held_d = sample_keypoints(affine_field(), cand, mask, k_min=5, k_max=9,
                                                    rng=np.random.default_rng(seed))
        assert 5 <= len(pts) <= 9
        assert len(pts) + len(held) == len(inside)  # candidates outside the allowed mask are dropped
        assert np.all(mask[tuple(np.rint(np.vstack([pts, held])).astype(int).T)])
        np.testing.assert_allclose(disps, pts @ B.T + T, atol=1e-5)
        np.testing.assert_allclose(held_d, held @ B.T + T, atol=1e-5)
        chosen = {tuple(p) for p in pts}
        assert chosen.isdisjoint({tuple(p) for p in held})
        assert chosen | {tuple(p) for p in held} == {tuple(p) for p in inside}
    ks = {len(sample_keypoints(affine_field(), cand, mask, k_min=5, k_max=9, rng=np.random.default_rng(s))[0])
          for s in range(40)}
    assert ks == set(range(5, 10))  # k is uniform over [k_min, k_max]: every value occurs in 40 draws


def test_same_seed_same_draw():
    args = (affine_field(), candidates(), allowed())
    a = sample_keypoints(*args, k_min=6, k_max=10, rng=np.random.default_rng(3))
    b = sample_keypoints(*args, k_min=6, k_max=10, rng=np.random.default_rng(3))
    c = sample_keypoints(*args, k_min=6, k_max=10, rng=np.random.default_rng(4))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not (a[0].shape == c[0].shape and np.array_equal(a[0], c[0]))


def test_random_voxels_when_no_candidates_and_min_spacing():
    mask = allowed()
    pts, disps, held, held_d = sample_keypoints(affine_field(), None, mask, k_min=10, k_max=10,
                                                rng=np.random.default_rng(0), min_spacing_vox=2.5)
    assert pts.shape == (10, 3) and held.shape == (0, 3) and held_d.shape == (0, 3)
    np.testing.assert_array_equal(pts, np.rint(pts))  # voxel centres
    assert np.all(mask[tuple(pts.astype(int).T)])
    gaps = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + 1e9 * np.eye(10)
    assert gaps.min() >= 2.5
    np.testing.assert_allclose(disps, pts @ B.T + T, atol=1e-5)


def test_too_few_candidates_and_bad_arguments():
    field, mask = affine_field(), allowed()
    with pytest.raises(KeypointError, match="at least k_min=20"):
        sample_keypoints(field, candidates(n=15), mask, k_min=20, k_max=25, rng=np.random.default_rng(0))
    close = np.array([[2.0, 2.0, 2.0], [2.5, 2.0, 2.0], [3.0, 2.0, 2.0], [6.0, 6.0, 6.0]])
    with pytest.raises(KeypointError, match="apart"):
        sample_keypoints(field, close, mask, k_min=3, k_max=3, rng=np.random.default_rng(0), min_spacing_vox=2.0)
    with pytest.raises(KeypointError, match="k_min"):
        sample_keypoints(field, candidates(), mask, k_min=5, k_max=4, rng=np.random.default_rng(0))
    with pytest.raises(GeometryError, match="allowed mask"):
        sample_keypoints(field, candidates(), mask[:-1], rng=np.random.default_rng(0))
    with pytest.raises(KeypointError, match="finite"):
        sample_keypoints(field, np.full((30, 3), np.nan), mask, rng=np.random.default_rng(0))
