"""Tests of the torch warping utilities (brainshift.model.warp): pull semantics pinned on hand values."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainshift.errors import GeometryError
from brainshift.field import jacobian_determinant
from brainshift.model.warp import compose, identity_grid, jacobian_determinant_torch, warp


def _ramp(shape=(8, 16, 32)) -> torch.Tensor:
    i, j, k = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return (i * 100 + j * 10 + k * 0.5)[None, None]


def test_zero_field_is_identity():
    vol = torch.arange(8 * 16 * 32, dtype=torch.float32).reshape(1, 1, 8, 16, 32) / (8 * 16 * 32)  # ramp in [0, 1)
    out = warp(vol, torch.zeros(1, 3, 8, 16, 32))
    assert (out - vol).abs().max().item() < 1e-5


def test_shift_along_last_axis_moves_bright_voxel_pull_semantics():
    vol = torch.zeros(1, 1, 8, 16, 32)
    vol[0, 0, 4, 8, 10] = 1.0
    disp = torch.zeros(1, 3, 8, 16, 32)
    disp[:, 2] = 3.0  # +3 voxels along k (the last axis)
    out = warp(vol, disp)
    # pull: out(p) = vol(p + 3 e_k), so out(4, 8, 7) = vol(4, 8, 10) = 1
    peak = np.unravel_index(int(out[0, 0].argmax()), out.shape[2:])
    assert tuple(int(v) for v in peak) == (4, 8, 7)
    assert out[0, 0, 4, 8, 7].item() == pytest.approx(1.0, abs=1e-5)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_unit_shift_is_exact_in_interior(axis):
    vol = torch.rand(1, 2, 8, 16, 32, generator=torch.Generator().manual_seed(axis))
    disp = torch.zeros(1, 3, 8, 16, 32)
    disp[:, axis] = 1.0
    out = warp(vol, disp)
    n = vol.shape[2 + axis]
    expected = vol.narrow(2 + axis, 1, n - 1)  # out[p] = vol[p + 1] for p < n - 1
    got = out.narrow(2 + axis, 0, n - 1)
    assert (got - expected).abs().max().item() < 1e-5
    # border padding: the last slice reads past the edge and repeats the edge value
    assert torch.allclose(out.narrow(2 + axis, n - 1, 1), vol.narrow(2 + axis, n - 1, 1), atol=1e-5)


def test_fractional_shift_interpolates_linearly():
    vol = _ramp((4, 5, 6))
    disp = torch.zeros(1, 3, 4, 5, 6)
    disp[:, 0] = 0.25
    disp[:, 1] = -0.5
    out = warp(vol, disp)
    # the ramp is linear: out = vol + 100 * 0.25 - 10 * 0.5 where the sample stays inside
    inner = out[0, 0, :3, 1:, :] - vol[0, 0, :3, 1:, :]
    assert torch.allclose(inner, torch.full_like(inner, 25.0 - 5.0), atol=1e-3)


def test_nearest_mode_keeps_labels():
    lab = torch.randint(0, 4, (1, 1, 6, 7, 8)).float()
    disp = torch.full((1, 3, 6, 7, 8), 0.3)
    out = warp(lab, disp, mode="nearest")
    assert torch.equal(out, lab)  # 0.3 voxel rounds to the same voxel


def test_warp_gradients_flow_and_batch_broadcast():
    vol = _ramp((4, 4, 4)).repeat(2, 1, 1, 1, 1)
    disp = torch.zeros(1, 3, 4, 4, 4, requires_grad=True)
    warp(vol, disp).sum().backward()
    assert disp.grad is not None and disp.grad.abs().sum() > 0


def test_warp_rejects_mismatched_shapes():
    with pytest.raises(GeometryError, match="expected a displacement"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))
    with pytest.raises(GeometryError, match="expected a volume"):
        warp(torch.zeros(4, 4, 4), torch.zeros(1, 3, 4, 4, 4))


def test_compose_of_translations_adds():
    a = torch.zeros(1, 3, 6, 6, 6)
    b = torch.zeros(1, 3, 6, 6, 6)
    a[:, 0] = 1.0
    b[:, 2] = -2.0
    c = compose(a, b)
    assert torch.allclose(c[:, 0], torch.ones(1, 6, 6, 6)) and torch.allclose(c[:, 2], torch.full((1, 6, 6, 6), -2.0))


def test_compose_samples_second_at_displaced_point():
    # second(p) = 0.1 * p_i along i (linear); first = +2 along i => composed_i = 2 + 0.1 * (i + 2)
    first = torch.zeros(1, 3, 8, 4, 4)
    first[:, 0] = 2.0
    second = torch.zeros(1, 3, 8, 4, 4)
    second[:, 0] = 0.1 * identity_grid((8, 4, 4))[0]
    c = compose(first, second)
    i = torch.arange(6, dtype=torch.float32)[:, None, None]
    assert torch.allclose(c[0, 0, :6], 2.0 + 0.1 * (i + 2.0).expand(6, 4, 4), atol=1e-5)


def _smooth_field(shape, seed=0, amp=2.0):
    rng = np.random.default_rng(seed)
    return np.stack([gaussian_filter(rng.standard_normal(shape), 2.0) * amp * 10 for _ in range(3)]).astype(
        np.float32)


def test_jacobian_torch_matches_numpy_with_physical_spacing():
    shape = (12, 10, 14)
    u_vox = _smooth_field(shape)
    spacing = (1.5, 2.0, 0.8)
    disp_mm = torch.from_numpy(u_vox * np.asarray(spacing, dtype=np.float32)[:, None, None, None])[None]
    det_t = jacobian_determinant_torch(disp_mm.double(), spacing)[0].numpy()
    det_np = jacobian_determinant(u_vox)
    assert det_np.min() < 1.0 < det_np.max()  # a non-trivial field
    np.testing.assert_allclose(det_t, det_np, rtol=1e-5, atol=1e-5)


def test_jacobian_torch_hand_values():
    # u = diag(0.5, -0.25, 1) x  =>  det = 1.5 * 0.75 * 2 = 2.25 everywhere (linear field, exact differences)
    g = identity_grid((5, 6, 7))
    disp = torch.stack([0.5 * g[0], -0.25 * g[1], 1.0 * g[2]])[None]
    det = jacobian_determinant_torch(disp)
    assert torch.allclose(det, torch.full_like(det, 2.25))
    with pytest.raises(GeometryError):
        jacobian_determinant_torch(torch.zeros(1, 2, 4, 4, 4))
