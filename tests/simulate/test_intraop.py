"""Tests of the synthetic intraoperative MRI (brainshift.simulate.intraop)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from brainshift.errors import GeometryError
from brainshift.simulate.intraop import invert_field_at, synthesize_intraop_image
from brainshift.volume import Volume

SHAPE = (48, 52, 44)
SPOTS = np.array([[14.0, 16.0, 12.0], [30.0, 20.0, 28.0], [24.0, 36.0, 20.0], [34.0, 34.0, 32.0],
                  [18.0, 28.0, 30.0]])


def _phantom() -> tuple[Volume, np.ndarray]:
    """A dim ellipsoid 'brain' with bright Gaussian spots (sigma 1.5 voxels) at SPOTS; oblique-free 1 mm grid,
    origin away from zero. Field: a smooth bump up to ~4 voxels plus a constant 1-voxel shift along k."""
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
    c = (np.array(SHAPE) - 1)[:, None, None, None] / 2
    brain = (((g - c) / (0.45 * np.array(SHAPE))[:, None, None, None]) ** 2).sum(axis=0) <= 1
    img = 0.3 * brain.astype(float)
    for s in SPOTS:
        img += np.exp(-((g - s[:, None, None, None]) ** 2).sum(axis=0) / (2 * 1.5**2))
    aff = np.eye(4)
    aff[:3, 3] = [-24.0, -30.0, 10.0]
    w = np.exp(-((g - np.array([26.0, 24.0, 24.0])[:, None, None, None]) ** 2).sum(axis=0) / (2 * 12.0**2))
    field = np.stack([3.0 * w, -2.0 * w, 1.0 + 0.5 * w]).astype(np.float32)
    return Volume(img.astype(np.float32), aff, "intensity"), field


def test_ground_truth_maps_preop_spots_onto_the_intraop_image():
    preop, field = _phantom()
    intra, params = synthesize_intraop_image(preop, field, None, seed=4, noise_fraction=(0.005, 0.005))
    a = np.asarray(params["affine"])
    assert 1.0 <= params["spacing_mm"] <= 1.5 and 0 < params["rotation_deg"] <= 10
    assert intra.shape == tuple(params["shape"]) and not np.allclose(a[:3, :3], np.diag(np.diag(a[:3, :3])))
    assert params["inverse_residual_vox"] < 1e-3
    # where the ground truth sends each spot (world mm), in intraop voxels
    u = np.stack([ndimage.map_coordinates(f, SPOTS.T, order=1) for f in field]).T
    target_w = (SPOTS + u) @ preop.affine[:3, :3].T + preop.affine[:3, 3]
    target_v = (target_w - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    # the spot's intensity-weighted centroid in the intraop image around that place
    data = intra.data
    for t in target_v:
        lo = np.maximum(np.round(t).astype(int) - 4, 0)
        sl = tuple(slice(lo[d], lo[d] + 9) for d in range(3))
        patch = np.clip(data[sl] - 0.5 * data[sl].max(), 0, None)
        idx = np.stack(np.meshgrid(*[np.arange(s.start, s.start + n) for s, n in zip(sl, patch.shape, strict=True)],
                                   indexing="ij"))
        centroid = (idx * patch).reshape(3, -1).sum(axis=1) / patch.sum()
        assert np.linalg.norm(centroid - t) < 1.0  # within one intraop voxel (measured ~0.1-0.2)
        assert data[tuple(np.round(t).astype(int))] > 0.6  # the bright spot itself (peak 1.3 before bias)


def test_cavity_is_filled_with_fluid_intensity_and_seed_reproduces():
    preop, field = _phantom()
    cavity = np.zeros(SHAPE, bool)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    cavity[((g - np.array([30, 20, 28])[:, None, None, None]) ** 2).sum(axis=0) <= 16] = True  # around spot 1
    opts = {"noise_fraction": (0.0, 0.0), "bias_strength": (1e-9, 1e-9)}
    intra, params = synthesize_intraop_image(preop, field, cavity, seed=5, **opts)
    a = np.asarray(params["affine"])
    u = np.stack([ndimage.map_coordinates(f, SPOTS[1:2].T, order=1) for f in field]).T
    t = ((SPOTS[1] + u[0]) @ preop.affine[:3, :3].T + preop.affine[:3, 3] - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    assert intra.data[tuple(np.round(t).astype(int))] == pytest.approx(params["fluid_intensity"], abs=1e-6)
    again, params2 = synthesize_intraop_image(preop, field, cavity, seed=5, **opts)
    np.testing.assert_array_equal(again.data, intra.data)
    assert params2 == params


def test_field_inversion_by_hand():
    # constant field u = (1, -2, 0.5): p + u = q  ->  p = q - u exactly
    field = np.zeros((3, 8, 8, 8), np.float32)
    field[0], field[1], field[2] = 1.0, -2.0, 0.5
    q = np.array([[4.0], [4.0], [4.0]])
    p, res = invert_field_at(field, q)
    np.testing.assert_allclose(p[:, 0], [3.0, 6.0, 3.5])
    assert res == 0.0


def test_field_or_mask_on_another_grid_raises():
    preop, field = _phantom()
    with pytest.raises(GeometryError, match="field of shape"):
        synthesize_intraop_image(preop, field[:, :-1], None, seed=0)
    with pytest.raises(GeometryError, match="cavity_mask on the preop grid"):
        synthesize_intraop_image(preop, field, np.zeros((4, 4, 4), bool), seed=0)


def test_inversion_skips_points_the_field_cannot_reach_without_changing_the_result():
    """Only points within reach of the field's support are iterated; the result equals the plain fixed-point
    iteration everywhere (also for a field nonzero on the grid boundary, which continues outside the grid)."""
    from scipy import ndimage

    from brainshift.simulate.intraop import invert_field_at

    shape = (30, 34, 26)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    r = np.sqrt((i - 15) ** 2 + (j - 17) ** 2 + (k - 13) ** 2)
    f = np.stack([2 * np.exp(-r ** 2 / 50) * (r < 10), -1.5 * np.exp(-r ** 2 / 80) * (r < 10), np.zeros(shape)])
    q = np.random.default_rng(0).uniform(-4, 38, size=(3, 20000))
    for field in (f.astype(np.float32), np.where(i[None] == 0, 0.5, f).astype(np.float32)):
        p = q.copy()
        for _ in range(20):
            p = q - np.stack([ndimage.map_coordinates(c, p, order=1, mode="nearest") for c in field])
        np.testing.assert_array_equal(invert_field_at(field, q)[0], p)
