"""Tests of the published-variant thin-plate spline (brainshift.interpolate.tps)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate import tps_interpolate
from brainshift.interpolate.tps import choose_tps_lam, normalise_voxel_coords, upsample_trilinear

from ._util import affine_disps, affine_field, grid_keypoints


def _dense_reference(pts: np.ndarray, disps: np.ndarray, shape: tuple[int, int, int], lam: float) -> np.ndarray:
    """Independent dense solve of the same normalised system, written out by hand.

    Coordinates: voxel i -> i / (size - 1) * 2 - 1 per axis. Kernel r^2 log r written as 0.5 r^2 log(r^2)
    (0 at r = 0). System [[K + lam I, P], [P^T, 0]] with P = [1, x, y, z], solved by least squares.
    """
    size = np.array(shape, dtype=np.float64)
    c = pts / (size - 1) * 2 - 1
    axes = [np.linspace(-1, 1, s) for s in shape]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.where(r2 > 0, 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0)), 0.0)

    n = len(c)
    p = np.hstack([np.ones((n, 1)), c])
    lhs = np.block([[kernel(c, c) + lam * np.eye(n), p], [p.T, np.zeros((4, 4))]])
    rhs = np.vstack([disps, np.zeros((4, 3))])
    sol = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    vals = kernel(x, c) @ sol[:n] + np.hstack([np.ones((len(x), 1)), x]) @ sol[n:]
    return vals.T.reshape(3, *shape)


def test_matches_independent_dense_solve_downsample_1():
    shape = (9, 11, 8)
    pts = grid_keypoints(shape, 8, seed=11, margin=1)
    disps = np.random.default_rng(11).normal(scale=2.0, size=pts.shape)
    field = tps_interpolate(pts, disps, shape, lam=0.1, downsample=1)
    assert field.shape == (3, *shape) and field.dtype == np.float32
    ref = _dense_reference(pts, disps, shape, lam=0.1)
    assert np.abs(field - ref).max() < 1e-5
    assert np.abs(ref).max() > 0.5  # the comparison is not between two near-zero fields


def test_coarse_upsampled_close_to_dense_on_smooth_field():
    shape = (33, 41, 29)
    pts = grid_keypoints(shape, 12, seed=12, margin=4)
    size = np.array(shape) - 1.0
    # smooth, non-affine keypoint displacements (a few voxels)
    disps = np.stack(
        [3 * np.sin(np.pi * pts[:, 0] / size[0]), 2 * np.cos(np.pi * pts[:, 1] / size[1]), pts[:, 2] / size[2]], 1
    )
    dense = tps_interpolate(pts, disps, shape, lam=0.1, downsample=1)
    coarse = tps_interpolate(pts, disps, shape, lam=0.1, downsample=4)
    diff = np.abs(coarse - dense)
    # the coarse grid (9 x 11 x 8) and the full grid share their corner voxels (align_corners=True)
    for i in (0, shape[0] - 1):
        for j in (0, shape[1] - 1):
            for k in (0, shape[2] - 1):
                assert diff[:, i, j, k].max() < 1e-5
    # trilinear upsampling error of a smooth field, small against its ~3-voxel range (measured with this
    # seed: max 0.086, mean 0.005 voxel; the max sits near keypoints, where r^2 log r bends most)
    assert diff.max() < 0.15
    assert diff.mean() < 0.01
    assert np.abs(dense).max() > 2.0


def test_constant_field_reproduced_exactly_despite_ridge():
    shape = (20, 22, 18)
    pts = grid_keypoints(shape, 10, seed=13)
    disps = np.tile([1.25, -2.0, 0.5], (len(pts), 1))
    field = tps_interpolate(pts, disps, shape)  # lam=0.1, downsample=4 (published)
    np.testing.assert_allclose(field, np.broadcast_to(np.array([1.25, -2.0, 0.5])[:, None, None, None], field.shape),
                               atol=1e-5)


def test_affine_field_reproduced_exactly():
    # the affine term absorbs an affine field whatever lam is; trilinear upsampling keeps it affine
    shape = (20, 22, 18)
    pts = grid_keypoints(shape, 10, seed=14)
    u, m, b = affine_disps(pts)
    field = tps_interpolate(pts, u, shape, lam=0.1, downsample=4)
    assert np.abs(field - affine_field(shape, m, b)).max() < 1e-4


def test_lam_zero_interpolates_keypoints_lam_positive_does_not():
    shape = (12, 13, 11)
    pts = grid_keypoints(shape, 9, seed=15)
    disps = np.random.default_rng(15).normal(scale=2.0, size=pts.shape)
    i, j, k = pts.astype(int).T
    exact = tps_interpolate(pts, disps, shape, lam=0.0, downsample=1)
    np.testing.assert_allclose(exact[:, i, j, k].T, disps, atol=1e-4)
    ridge = tps_interpolate(pts, disps, shape, lam=0.1, downsample=1)
    assert np.abs(ridge[:, i, j, k].T - disps).max() > 1e-3  # published behaviour: ridge smooths


def test_normalisation_maps_grid_ends_to_minus_one_and_one():
    out = normalise_voxel_coords(np.array([[0.0, 0.0, 0.0], [159.0, 191.0, 0.0]]), (160, 192, 1))
    np.testing.assert_array_equal(out, [[-1.0, -1.0, 0.0], [1.0, 1.0, 0.0]])


def test_bad_options_and_coplanar_keypoints_raise():
    shape = (10, 10, 10)
    pts = grid_keypoints(shape, 6, seed=16)
    with pytest.raises(BrainshiftError, match="lam"):
        tps_interpolate(pts, np.zeros_like(pts), shape, lam=-0.1)
    with pytest.raises(BrainshiftError, match="downsample"):
        tps_interpolate(pts, np.zeros_like(pts), shape, downsample=0)
    flat = pts.copy()
    flat[:, 2] = 4.0
    with pytest.raises(KeypointError, match="plane"):
        tps_interpolate(flat, np.zeros_like(flat), shape)


@pytest.mark.parametrize("coarse_shape", [(3, 4, 5), (5, 1, 2), (6, 6, 6)])
def test_separable_upsampling_equals_torch_trilinear_align_corners(coarse_shape):
    import torch

    shape = (11, 1 if coarse_shape[1] == 1 else 9, 7)
    x = np.random.default_rng(17).normal(size=(3, *coarse_shape)).astype(np.float32)
    ours = upsample_trilinear(x, shape)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=shape, mode="trilinear",
                                          align_corners=True)[0].numpy()
    assert ours.shape == (3, *shape) and ours.dtype == np.float32 and ours.flags.c_contiguous
    assert np.abs(ours - ref).max() < 1e-5
    # corners of coarse and fine grids coincide
    np.testing.assert_allclose(ours[:, -1, -1, -1], x[:, -1, -1, -1], atol=1e-6)


def test_memory_guard_refuses_before_fitting(monkeypatch):
    # 30,000 keypoints on a 160 x 192 x 144 grid: the 40 x 48 x 36 coarse kernel matrix alone is ~33 GB
    import brainshift.interpolate.tps as tps_mod

    def _fail(*a, **k):
        raise AssertionError("tps_fit must not run when the memory estimate is too large")

    monkeypatch.setattr(tps_mod, "tps_fit", _fail)
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, size=(30000, 3))
    with pytest.raises(BrainshiftError, match=r"tps with 30000 keypoints needs about \d+\.\d GB"):
        tps_mod.tps_interpolate(pts, np.zeros_like(pts), (160, 192, 144))


def test_choose_tps_lam_smooths_noise_and_keeps_exact_data():
    rng = np.random.default_rng(0)
    shape, affine = (40, 48, 40), np.diag([2.0, 2.0, 2.0, 1.0])
    pts = rng.uniform(2, 37, size=(300, 3))
    smooth = np.stack([2 * np.sin(pts[:, 0] / 8), 1.5 * np.cos(pts[:, 1] / 9), 0.02 * pts[:, 2]], axis=1)
    # exact samples of a smooth field: the least smoothing predicts held-out points best
    lam_exact, rmse_exact = choose_tps_lam(pts, smooth, shape, affine)
    assert lam_exact <= 0.1 and rmse_exact[lam_exact] == min(rmse_exact.values())
    # an affine field plus noise: the affine part is reproduced at any lam, the kernel part only fits the
    # noise, so the largest ridge on the grid wins
    aff_d = pts @ np.array([[0.02, 0.0, 0.01], [0.0, -0.03, 0.0], [0.01, 0.0, 0.02]]).T + 0.5
    lam_noisy, rmse_noisy = choose_tps_lam(pts, aff_d + rng.normal(scale=0.3, size=pts.shape), shape, affine)
    assert lam_noisy == max(rmse_noisy)
    assert rmse_noisy[lam_noisy] < rmse_noisy[0.1]


def test_choose_tps_lam_bad_input():
    pts = np.random.default_rng(1).uniform(0, 9, size=(6, 3))
    with pytest.raises(KeypointError, match="cross-validation"):
        choose_tps_lam(pts, np.zeros((6, 3)), (10, 10, 10), np.eye(4))
    with pytest.raises(BrainshiftError, match="lam"):
        choose_tps_lam(pts, np.zeros((6, 3)), (10, 10, 10), np.eye(4), lams=(-1.0,))
    with pytest.raises(BrainshiftError, match="folds"):
        choose_tps_lam(pts, np.zeros((6, 3)), (10, 10, 10), np.eye(4), folds=1)
