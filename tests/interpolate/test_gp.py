"""Tests of Gaussian-process regression (brainshift.interpolate.gp)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate import available_interpolators, gp_interpolate, interpolate
from brainshift.interpolate.gp import gp_evaluate, gp_fit, usable_lengths

from ._util import grid_keypoints

SHAPE = (14, 12, 10)

#: Oblique, anisotropic affine (20 degree rotation about z times diag(2, 2, 3) mm, an origin).
_c, _s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.diag([2.0, 2.0, 3.0])
OBLIQUE[:3, 3] = [90, -126, -72]


def _smooth_disps_mm(world: np.ndarray) -> np.ndarray:
    """A smooth displacement (mm) that fades away from a centre, as brain shift does."""
    c = np.array([100.0, -110.0, -60.0])
    w = np.exp(-((world - c) ** 2).sum(1) / (2 * 15.0 ** 2))[:, None]
    return w * np.array([2.0, -1.0, 0.5])


def _world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return points_vox @ affine[:3, :3].T + affine[:3, 3]


def test_registered_and_checks_its_inputs():
    assert "gp" in available_interpolators()
    pts = grid_keypoints(SHAPE, 8, seed=1)
    with pytest.raises(BrainshiftError, match="downsample"):
        gp_interpolate(pts, np.zeros_like(pts), SHAPE, downsample=0)
    with pytest.raises(KeypointError):
        gp_interpolate(pts[:3], np.zeros((3, 3)), SHAPE)
    with pytest.raises(BrainshiftError, match="options"):
        interpolate("gp", pts, np.zeros_like(pts), SHAPE, lam=0.1)


def test_zero_displacements_give_the_zero_field():
    pts = grid_keypoints(SHAPE, 10, seed=2)
    field = gp_interpolate(pts, np.zeros_like(pts), SHAPE, OBLIQUE)
    assert field.shape == (3, *SHAPE) and field.dtype == np.float32
    assert np.all(field == 0.0)


def test_matches_scikit_learn_gaussian_process_for_one_setting():
    """With a one-point grid the fit is simple kriging: the posterior mean and the log marginal likelihood of
    scikit-learn's GaussianProcessRegressor with the same fixed kernel (Matern nu=2.5 x constant + white)."""
    sk = pytest.importorskip("sklearn.gaussian_process")
    kernels = pytest.importorskip("sklearn.gaussian_process.kernels")
    rng = np.random.default_rng(3)
    p = rng.uniform(-30, 30, size=(15, 3))
    y = _smooth_disps_mm(p + np.array([100.0, -110.0, -60.0]))
    q = rng.uniform(-40, 40, size=(50, 3))
    eta2, length, tau = 2.5, 25.0, 0.01
    weights, info = gp_fit(p, y, lengths_mm=(length,), amplitudes_mm2=(eta2,), noises_mm2=(tau,))
    kern = kernels.ConstantKernel(eta2, "fixed") * kernels.Matern(length, "fixed", nu=2.5) \
        + kernels.WhiteKernel(tau, "fixed")
    lml, pred = 0.0, np.zeros_like(q)
    for c in range(3):
        g = sk.GaussianProcessRegressor(kern, optimizer=None, normalize_y=False).fit(p, y[:, c])
        lml += g.log_marginal_likelihood_value_
        # predict() includes the white kernel only on the diagonal of the training points: the noiseless mean
        pred[:, c] = g.predict(q)
    np.testing.assert_allclose(info["log_evidence"], lml, rtol=1e-9)
    np.testing.assert_allclose(gp_evaluate(weights, p, q), pred, atol=1e-9)


def test_same_world_field_on_any_grid_of_the_same_space():
    """Voxel <-> world mapping: the grid with its first axis flipped and the last two swapped (same voxels in
    space, another index order) gives the same world displacement at every voxel."""
    pts = grid_keypoints(SHAPE, 12, seed=4)
    disps_world = _smooth_disps_mm(_world(pts, OBLIQUE))
    a3 = OBLIQUE[:3, :3]
    f1 = gp_interpolate(pts, disps_world @ np.linalg.inv(a3).T, SHAPE, OBLIQUE, downsample=1)
    # grid 2: voxel (i', j', k') = (I-1-i, k, j)
    perm = np.zeros((4, 4))
    perm[0, 0], perm[0, 3] = -1.0, SHAPE[0] - 1.0
    perm[1, 2] = perm[2, 1] = perm[3, 3] = 1.0  # grid-1 index from grid-2 index
    aff2 = OBLIQUE @ perm
    shape2 = (SHAPE[0], SHAPE[2], SHAPE[1])
    pts2 = _world(pts, OBLIQUE) - aff2[:3, 3]
    pts2 = pts2 @ np.linalg.inv(aff2[:3, :3]).T
    f2 = gp_interpolate(pts2, disps_world @ np.linalg.inv(aff2[:3, :3]).T, shape2, aff2, downsample=1)
    w1 = np.einsum("ab,b...->a...", a3, f1.astype(np.float64))
    w2 = np.einsum("ab,b...->a...", aff2[:3, :3], f2.astype(np.float64))
    np.testing.assert_allclose(w2, np.transpose(w1, (0, 1, 3, 2))[:, ::-1], atol=1e-5)


def test_honours_exact_keypoints_and_fades_far_from_them():
    shape = (40, 40, 30)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [50.0, -150.0, -90.0]
    rng = np.random.default_rng(5)
    pts = rng.uniform(8, 28, size=(25, 3))
    disps_mm = _smooth_disps_mm(_world(pts, aff))
    field = gp_interpolate(pts, disps_mm / 2.0, shape, aff)
    from brainshift.model.safeguards import keypoint_residuals_mm

    assert keypoint_residuals_mm(field, pts, disps_mm / 2.0, aff).mean() < 0.02  # mm, of up to 2.3 mm
    # a spline extrapolates its affine trend; the zero-mean process returns to zero far from the keypoints (over
    # several of the longest kernel lengths, 160 mm)
    world = _world(pts, aff)
    weights, _ = gp_fit(world, disps_mm)
    far = world.mean(0) + np.array([[3000.0, 0.0, 0.0], [0.0, -3000.0, 0.0]])
    assert np.abs(gp_evaluate(weights, world, far)).max() < 1e-6
    assert np.abs(gp_evaluate(weights, world, world)).max() > 0.5


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 3.0), (0.5, 0.5, 3.0), (1.0, 1.0, 5.0)])
def test_coarse_evaluation_is_close_to_exact(spacing):
    """The automatic coarse step is chosen per axis in mm: thick slices are not skipped."""
    shape = (40, 40, 14)
    aff = OBLIQUE.copy()
    aff[:3, :3] = OBLIQUE[:3, :3] @ np.diag(np.asarray(spacing) / np.array([2.0, 2.0, 3.0]))
    pts = grid_keypoints(shape, 30, seed=6, margin=3)
    disps = _smooth_disps_mm(_world(pts, aff) - _world(pts, aff).mean(0) + [100.0, -110.0, -60.0])
    disps = disps @ np.linalg.inv(aff[:3, :3]).T
    exact = gp_interpolate(pts, disps, shape, aff, downsample=1)
    coarse = gp_interpolate(pts, disps, shape, aff)
    assert np.abs(exact).max() > 0.1
    assert np.abs(coarse - exact).max() < 0.05 * np.abs(exact).max()


def test_refuses_overflow_and_too_many_keypoints():
    pts = grid_keypoints(SHAPE, 10, seed=7)
    with pytest.raises(BrainshiftError, match="overflows|finite"):
        gp_interpolate(pts, np.full_like(pts, 1e160), SHAPE)
    with pytest.raises(BrainshiftError, match="GB"):
        gp_interpolate(pts, np.zeros_like(pts), SHAPE, max_memory_gb=1e-4)
    with pytest.raises(BrainshiftError, match="max_memory_gb"):
        gp_interpolate(pts, np.zeros_like(pts), SHAPE, max_memory_gb=0)


def test_lengths_shorter_than_the_keypoint_spacing_are_left_out():
    p = np.array([[0.0, 0, 0], [30, 0, 0], [0, 30, 0], [0, 0, 30]])
    assert usable_lengths(p) == (40.0, 80.0, 160.0)
    assert usable_lengths(p, (5.0, 10.0)) == (10.0,)
