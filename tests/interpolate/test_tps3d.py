"""Tests of the 3-D biharmonic spline (brainshift.interpolate.tps3d)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate import tps3d_interpolate, tps3d_memory_bytes
from brainshift.interpolate.tps3d import _chunk_that_fits

from ._util import affine_disps, affine_field, grid_keypoints

SHAPE = (12, 14, 10)

#: Oblique, anisotropic affine (20 degree rotation about z times diag(0.5, 0.5, 3.0), origin (90, -126, -72)).
_c, _s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = np.array([[_c, -_s, 0], [_s, _c, 0], [0, 0, 1]]) @ np.diag([0.5, 0.5, 3.0])
OBLIQUE[:3, 3] = [90, -126, -72]


def _nonlinear_disps(pts: np.ndarray) -> np.ndarray:
    return np.stack([np.sin(pts[:, 0] / 3), np.cos(pts[:, 1] / 4), (pts[:, 2] / 5) ** 2], axis=1)


def test_reproduces_affine_field_everywhere_and_keypoints():
    pts = grid_keypoints(SHAPE, 12, seed=21)
    u, m, b = affine_disps(pts)
    field = tps3d_interpolate(pts, u, SHAPE)
    assert field.shape == (3, *SHAPE) and field.dtype == np.float32
    assert np.abs(field - affine_field(SHAPE, m, b)).max() < 1e-4
    disps = _nonlinear_disps(pts)
    field = tps3d_interpolate(pts, disps, SHAPE)
    i, j, k = pts.astype(int).T
    np.testing.assert_allclose(field[:, i, j, k].T, disps, atol=1e-4)


def test_matches_hand_solved_polyharmonic_r_spline():
    # independent solve of u(x) = sum w_n |x - c_n| + a0 + a.x with sum w = 0, sum w c = 0 (kernel +r; the
    # sign convention of the kernel does not change the interpolant, only the sign of w)
    pts = grid_keypoints(SHAPE, 7, seed=22)
    disps = _nonlinear_disps(pts)
    n = len(pts)
    phi = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    p = np.hstack([np.ones((n, 1)), pts])
    sol = np.linalg.solve(np.block([[phi, p], [p.T, np.zeros((4, 4))]]), np.vstack([disps, np.zeros((4, 3))]))
    x = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    ref = (np.linalg.norm(x[:, None] - pts[None], axis=-1) @ sol[:n] + np.hstack([np.ones((len(x), 1)), x]) @ sol[n:])
    field = tps3d_interpolate(pts, disps, SHAPE)
    assert np.abs(field - ref.T.reshape(3, *SHAPE)).max() < 1e-4


def test_world_coordinates_change_the_field_on_anisotropic_grid_but_not_affine_fields():
    pts = grid_keypoints(SHAPE, 10, seed=23)
    disps = _nonlinear_disps(pts)
    world = tps3d_interpolate(pts, disps, SHAPE, OBLIQUE)
    voxel = tps3d_interpolate(pts, disps, SHAPE)
    assert np.abs(world - voxel).max() > 1e-2  # mm distances (3 mm along k) differ from voxel distances
    i, j, k = pts.astype(int).T
    np.testing.assert_allclose(world[:, i, j, k].T, disps, atol=1e-4)  # both still interpolate
    u, m, b = affine_disps(pts)
    expected = affine_field(SHAPE, m, b)
    assert np.abs(tps3d_interpolate(pts, u, SHAPE, OBLIQUE) - expected).max() < 1e-4
    assert np.abs(tps3d_interpolate(pts, u, SHAPE) - expected).max() < 1e-4


def test_similarity_affine_gives_the_voxel_field():
    # kernel r with an affine term is invariant under rotation, isotropic scaling and translation
    pts = grid_keypoints(SHAPE, 10, seed=24)
    disps = _nonlinear_disps(pts)
    sim = np.eye(4)
    sim[:3, :3] = 2.5 * OBLIQUE[:3, :3] @ np.diag([2.0, 2.0, 1 / 3])  # rotation x 2.5 (isotropic)
    sim[:3, 3] = [10, 20, -30]
    np.testing.assert_allclose(tps3d_interpolate(pts, disps, SHAPE, sim), tps3d_interpolate(pts, disps, SHAPE),
                               atol=1e-4)


def test_chunking_does_not_change_the_result():
    pts = grid_keypoints(SHAPE, 9, seed=25)
    disps = _nonlinear_disps(pts)
    np.testing.assert_array_equal(tps3d_interpolate(pts, disps, SHAPE, chunk_size=97),
                                  tps3d_interpolate(pts, disps, SHAPE, chunk_size=1 << 20))


def test_smoothing_keeps_affine_but_leaves_keypoints():
    pts = grid_keypoints(SHAPE, 10, seed=26)
    u, m, b = affine_disps(pts)
    assert np.abs(tps3d_interpolate(pts, u, SHAPE, smoothing=5.0) - affine_field(SHAPE, m, b)).max() < 1e-4
    disps = _nonlinear_disps(pts)
    smooth = tps3d_interpolate(pts, disps, SHAPE, smoothing=5.0)
    i, j, k = pts.astype(int).T
    assert np.abs(smooth[:, i, j, k].T - disps).max() > 1e-2


def test_neighbors_equal_to_all_keypoints_is_the_global_spline():
    shape = (6, 7, 5)
    pts = grid_keypoints(shape, 6, seed=27, margin=1)
    disps = _nonlinear_disps(pts)
    np.testing.assert_allclose(tps3d_interpolate(pts, disps, shape, neighbors=6), tps3d_interpolate(pts, disps, shape),
                               atol=1e-4)


def test_memory_guard_raises_before_allocating(monkeypatch):
    import scipy.interpolate

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("RBFInterpolator was built although the memory estimate is over budget")

    monkeypatch.setattr(scipy.interpolate, "RBFInterpolator", must_not_be_called)
    n = 200_000
    pts = np.random.default_rng(28).uniform(0, 150, size=(n, 3))
    with pytest.raises(BrainshiftError, match=r"tps3d with 200000 keypoints needs about .* GB") as err:
        tps3d_interpolate(pts, np.zeros_like(pts), (160, 192, 144), max_memory_gb=0.5)
    msg = str(err.value)
    assert "more than the 0.5 GB allowed" in msg and "'linear'/'tps'" in msg
    need_gb = float(re.search(r"needs about ([0-9.e+]+) GB", msg).group(1))
    system, per_chunk = tps3d_memory_bytes(n, 1024)
    assert need_gb == pytest.approx((system + per_chunk) / 1e9, rel=1e-2)
    assert need_gb > 900  # three (N+4)^2 float64 matrices: 3 * 8 * 200004^2 bytes ~ 960 GB


def test_chunk_shrinks_to_fit_budget():
    system, per_voxel = tps3d_memory_bytes(5000, 1)
    budget = system + per_voxel * 4096.5
    assert _chunk_that_fits(5000, 1 << 16, 10**6, budget, None) == 4096
    assert _chunk_that_fits(5000, 1 << 16, 10**6, 1e12, None) == 1 << 16
    with pytest.raises(BrainshiftError, match="5000 keypoints"):
        _chunk_that_fits(5000, 1 << 16, 10**6, system + per_voxel * 100, None)


def test_bad_options_and_degenerate_keypoints_raise():
    pts = grid_keypoints(SHAPE, 6, seed=29)
    z = np.zeros_like(pts)
    for kwargs, word in (({"smoothing": -1.0}, "smoothing"), ({"chunk_size": 0}, "chunk_size"),
                         ({"max_memory_gb": 0}, "max_memory_gb"), ({"neighbors": 2}, "neighbors")):
        with pytest.raises(BrainshiftError, match=word):
            tps3d_interpolate(pts, z, SHAPE, **kwargs)
    flat = np.array([[5, 2, 3], [5, 9, 3], [5, 4, 8], [5, 11, 7], [5, 6, 5]], dtype=float)
    with pytest.raises(KeypointError, match="plane"):
        tps3d_interpolate(flat, np.zeros_like(flat), SHAPE)


# --- the kernel-split evaluation used for large problems (many keypoints x voxels) ---------------------------


def _force_split(monkeypatch, radius_vox: float = 12.0) -> None:
    """Use the split on small grids: no minimum work, and a 12-voxel radius (coarse step 2) that fits them."""
    import brainshift.interpolate.tps3d as tps3d_mod

    monkeypatch.setattr(tps3d_mod, "SPLIT_MIN_TERMS", 0)
    monkeypatch.setattr(tps3d_mod, "SPLIT_RADIUS_VOXELS", radius_vox)


def _noisy_keypoints(shape: tuple[int, int, int], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` continuous (off-grid) keypoints and smooth displacements plus 0.5-voxel noise (large spline weights)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(3, np.array(shape) - 4, size=(n, 3))
    return pts, _nonlinear_disps(pts) + rng.normal(scale=0.5, size=pts.shape)


@pytest.mark.parametrize("affine", [None, OBLIQUE], ids=["voxel", "oblique"])
def test_split_evaluation_equals_exact_evaluation(monkeypatch, affine):
    shape = (40, 44, 36)
    pts, disps = _noisy_keypoints(shape, 120, seed=41)
    exact = tps3d_interpolate(pts, disps, shape, affine, tolerance_vox=0.0)  # every voxel term by term
    _force_split(monkeypatch)
    import brainshift.interpolate.tps3d as tps3d_mod

    calls = []
    real = tps3d_mod._evaluate_split
    monkeypatch.setattr(tps3d_mod, "_evaluate_split", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    split = tps3d_interpolate(pts, disps, shape, affine)
    assert calls, "the split evaluation was not used"
    assert np.abs(exact).max() > 1.0  # a field of a few voxels, not a near-zero comparison
    # every voxel, not only the checked sample: the split is accurate to the default tolerance (1e-3)
    assert np.abs(split - exact).max() < 1e-3


def test_split_evaluation_keeps_affine_fields_and_zero_fields_exact(monkeypatch):
    _force_split(monkeypatch)
    shape = (30, 34, 28)
    pts = grid_keypoints(shape, 40, seed=42)
    u, m, b = affine_disps(pts)
    assert np.abs(tps3d_interpolate(pts, u, shape) - affine_field(shape, m, b)).max() < 1e-4
    assert np.all(tps3d_interpolate(pts, np.zeros_like(pts), shape, OBLIQUE) == 0.0)


def test_split_that_misses_the_tolerance_falls_back_to_exact(monkeypatch):
    shape = (24, 26, 22)
    pts, disps = _noisy_keypoints(shape, 40, seed=43)
    exact = tps3d_interpolate(pts, disps, shape, tolerance_vox=0.0)
    _force_split(monkeypatch)
    # 1e-9 voxel is below what the coarse grid reaches, even refined: the result must be the exact one
    np.testing.assert_array_equal(tps3d_interpolate(pts, disps, shape, tolerance_vox=1e-9), exact)


def test_near_kernel_is_zero_outside_the_radius_and_continuous_at_it():
    from brainshift.interpolate.tps3d import _phi_near

    r = np.array([0.0, 1.0, 11.999, 12.0, 12.001, 30.0])
    near = _phi_near(r**2, 12.0)
    assert near[3] == 0.0 and near[4] == 0.0 and near[5] == 0.0
    assert abs(near[2]) < 1e-10  # C^4 contact at R: (R - r)^5 scale
    # at r = 0: 0 - R * T(-1) with T the degree-4 Taylor polynomial of sqrt(1 + e): 1 - 1/2 - 1/8 - 1/16 - 5/128
    assert near[0] == pytest.approx(-12.0 * (1 - 0.5 - 0.125 - 0.0625 - 0.0390625))


def test_tolerance_option_is_validated():
    pts = grid_keypoints(SHAPE, 6, seed=44)
    with pytest.raises(BrainshiftError, match="tolerance_vox"):
        tps3d_interpolate(pts, np.zeros_like(pts), SHAPE, tolerance_vox=-1e-3)
