"""Exact-value tests of the training losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.train.losses import (
    bending_energy,
    invert_displacement,
    jacobian_loss,
    lncc_loss,
    masked_mse,
    relative_masked_mse,
    training_loss,
    warp_to_intraop,
)


def _grid(shape):
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))


def test_masked_mse_hand_values():
    pred = torch.zeros(1, 3, 2, 1, 1)
    target = torch.zeros(1, 3, 2, 1, 1)
    pred[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # squared errors 1, 4, 9 in the masked voxel
    pred[0, :, 1, 0, 0] = torch.tensor([10.0, 10.0, 10.0])  # outside the mask: ignored
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)
    assert float(masked_mse(pred, target, mask)) == pytest.approx(14.0 / 3.0)
    # (B, I, J, K) bool mask works the same way
    assert float(masked_mse(pred, target, mask[:, 0] > 0)) == pytest.approx(14.0 / 3.0)
    # no mask: mean over all 6 values (1 + 4 + 9 + 300) / 6
    assert float(masked_mse(pred, target)) == pytest.approx(314.0 / 6.0)
    # empty mask: 0, not NaN
    assert float(masked_mse(pred, target, torch.zeros_like(mask))) == 0.0


def test_masked_mse_shape_mismatch_raises():
    with pytest.raises(GeometryError, match="same shape"):
        masked_mse(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))
    with pytest.raises(GeometryError, match="mask"):
        masked_mse(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), torch.ones(1, 1, 4, 4, 3))


def test_identity_field_has_zero_jacobian_losses():
    disp = torch.zeros(1, 3, 6, 7, 8)
    assert float(jacobian_loss(disp, (1.0, 2.0, 3.0), "negative")) == 0.0
    assert float(jacobian_loss(disp, (1.0, 2.0, 3.0), "unit")) == 0.0


def test_folding_field_gives_positive_negative_loss():
    # u_i = -2 i (mm, spacing 1): det J = 1 - 2 = -1 everywhere -> relu(0.01 - (-1)) = 1.01 everywhere
    shape = (6, 6, 6)
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[0, 0] = -2.0 * _grid(shape)[0]
    assert float(jacobian_loss(disp, (1, 1, 1), "negative")) == pytest.approx(1.01)
    assert float(jacobian_loss(disp, (1, 1, 1), "negative", margin=0.0)) == pytest.approx(1.0)
    assert float(jacobian_loss(disp, (1, 1, 1), "unit")) == pytest.approx(4.0)  # (-1 - 1)^2


def test_jacobian_uses_physical_spacing():
    # u_i = 0.5 * (index i) mm on a 2 mm grid: du/dx = 0.25 -> det 1.25, unit loss 0.0625;
    # ignoring the spacing would give det 1.5.
    shape = (5, 5, 5)
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[0, 0] = 0.5 * _grid(shape)[0]
    assert float(jacobian_loss(disp, (2.0, 1.0, 1.0), "unit")) == pytest.approx(0.0625)
    assert float(jacobian_loss(disp, (1.0, 1.0, 1.0), "unit")) == pytest.approx(0.25)


def test_jacobian_loss_masked_and_bad_mode():
    shape = (4, 4, 4)
    disp = torch.zeros(1, 3, *shape, dtype=torch.float64)
    disp[0, 0] = -2.0 * _grid(shape)[0]
    mask = torch.zeros(1, 1, *shape)
    assert float(jacobian_loss(disp, (1, 1, 1), "negative", mask=mask)) == 0.0
    with pytest.raises(BrainshiftError, match="jdet_mode"):
        jacobian_loss(disp, (1, 1, 1), "positive")


def test_bending_energy_of_affine_field_is_zero_and_positive_for_quadratic():
    shape = (8, 9, 10)
    g = _grid(shape)
    a = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.0, 0.1], [-0.1, 0.2, 0.4]], dtype=torch.float64)
    affine_field = (torch.einsum("ab,b...->a...", a, g) + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))[None]
    assert float(bending_energy(affine_field)) == pytest.approx(0.0, abs=1e-20)
    quad = torch.zeros(1, 3, *shape, dtype=torch.float64)
    quad[0, 0] = 0.5 * g[0] ** 2  # d2u/di2 = 1 everywhere -> energy 1 per voxel of channel 0, mean 1/3
    assert float(bending_energy(quad)) == pytest.approx(1.0 / 3.0)


def test_lncc_identical_images_is_minus_one():
    torch.manual_seed(0)
    img = torch.rand(1, 1, 12, 12, 12)
    assert float(lncc_loss(img, img, window=2)) == pytest.approx(-1.0, abs=1e-3)
    assert float(lncc_loss(img, 3.0 * img, window=2)) == pytest.approx(-1.0, abs=1e-3)  # scale-invariant
    assert float(lncc_loss(img, torch.rand(1, 1, 12, 12, 12), window=2)) > -0.5


def test_invert_displacement_constant_shift_exact():
    disp = torch.zeros(1, 3, 6, 7, 8)
    disp[:, 2] = 1.5
    v = invert_displacement(disp, iterations=5)
    assert torch.allclose(v, -disp)


def test_invert_displacement_smooth_field_composes_to_identity():
    from brainshift.model.warp import compose

    shape = (16, 16, 16)
    g = _grid(shape).float()
    u = torch.zeros(1, 3, *shape)
    u[0, 0] = 1.5 * torch.exp(-((g - 7.5) ** 2).sum(0) / 18.0)
    v = invert_displacement(u, iterations=20)
    # u then v returns to the start: (u o v) residual ~ 0 in the interior
    resid = compose(v, u)[0, :, 3:-3, 3:-3, 3:-3]
    assert float(resid.abs().max()) < 0.02


def test_warp_to_intraop_moves_a_blob_forward():
    # Forward field +2 voxels along k: a bright voxel at preop k=5 appears at intraop k=7.
    img = torch.zeros(1, 1, 6, 6, 12)
    img[0, 0, 3, 3, 5] = 1.0
    disp = torch.zeros(1, 3, 6, 6, 12)
    disp[:, 2] = 2.0
    out = warp_to_intraop(img, disp)
    assert float(out[0, 0, 3, 3, 7]) == pytest.approx(1.0)
    assert float(out[0, 0, 3, 3, 5]) == pytest.approx(0.0)


def test_training_loss_terms_and_gt_minimum():
    torch.manual_seed(0)
    shape = (8, 8, 8)
    g = _grid(shape).float()
    target = torch.zeros(1, 3, *shape)
    target[0, 1] = 0.8 * torch.exp(-((g - 3.5) ** 2).sum(0) / 8.0)
    mask = torch.ones(1, 1, *shape)
    image = torch.rand(1, 1, *shape)
    intraop = warp_to_intraop(image, target)
    kw = dict(spacing=(1.0, 1.0, 1.0), jdet=True, hessian=True, lncc=True, image=image, intraop=intraop)
    total, terms = training_loss(target, target, mask, **kw)
    assert set(terms) == {"mse", "jdet", "bending", "lncc", "total"}
    assert terms["mse"] == 0.0 and terms["jdet"] == 0.0
    assert terms["lncc"] == pytest.approx(-1.0, abs=1e-3)  # GT prediction reproduces the intraop image
    assert float(total) == pytest.approx(terms["jdet"] + terms["bending"] + terms["lncc"], abs=1e-6)
    noisy = target + 0.3 * torch.randn_like(target)
    _, t2 = training_loss(noisy, target, mask, **kw)
    assert t2["mse"] == pytest.approx(0.09, rel=0.15) and t2["lncc"] > terms["lncc"]
    with pytest.raises(BrainshiftError, match="intraop"):
        training_loss(target, target, mask, spacing=(1, 1, 1), lncc=True)


def test_training_loss_gradient_flows():
    pred = torch.zeros(1, 3, 6, 6, 6, requires_grad=True)
    target = torch.ones(1, 3, 6, 6, 6)
    total, _ = training_loss(pred, target, torch.ones(1, 1, 6, 6, 6), spacing=(1, 1, 1), jdet=True,
                             jdet_mode="unit")
    total.backward()
    assert pred.grad is not None and np.isfinite(pred.grad.numpy()).all() and float(pred.grad.abs().sum()) > 0


def test_relative_masked_mse_is_the_mean_per_sample_ratio_to_the_initial_field():
    target = torch.zeros(2, 3, 4, 4, 4)
    initial = torch.zeros(2, 3, 4, 4, 4)
    initial[0] += 2.0  # sample 0: initial MSE 4 mm²
    initial[1] += 0.5  # sample 1: initial MSE 0.25 mm²
    # the initial fields themselves: ratio 1 whatever their scale; the ground truth: 0
    assert float(relative_masked_mse(initial, target, initial)) == pytest.approx(1.0)
    assert float(relative_masked_mse(target, target, initial)) == 0.0
    # each sample halves its error amplitude (a quarter of its MSE): mean ratio 1/4, though the absolute MSEs
    # differ sixteenfold (the absolute MSE would be dominated by sample 0)
    pred = initial / 2
    assert float(relative_masked_mse(pred, target, initial)) == pytest.approx(0.25)
    # per sample by hand: sample 0 exact, sample 1 unchanged -> (0 + 1) / 2
    pred = torch.stack([target[0], initial[1]])
    assert float(relative_masked_mse(pred, target, initial)) == pytest.approx(0.5)
    # the floor bounds a nearly exact initial field's weight: initial MSE 1e-4 < floor 0.05 -> divide by 0.05
    near = torch.full((1, 3, 4, 4, 4), 0.01)
    assert float(relative_masked_mse(near + 0.09, target[:1], near, floor=0.05)) == pytest.approx(0.01 / 0.05)
    # masked like masked_mse: an error outside the mask does not count
    mask = torch.zeros(2, 1, 4, 4, 4)
    mask[:, :, :2] = 1
    pred = initial.clone()
    pred[:, :, 2:] = 100.0
    assert float(relative_masked_mse(pred, target, initial, mask)) == pytest.approx(1.0)
    with pytest.raises(GeometryError, match="same shape"):
        relative_masked_mse(pred, target, initial[:, :, :3])


def test_training_loss_with_initial_field_is_relative_and_keeps_the_absolute_mse_term():
    target = torch.zeros(2, 3, 5, 5, 5)
    initial = torch.zeros(2, 3, 5, 5, 5)
    initial[0] += 3.0
    initial[1] += 1.0
    pred = (initial / 2).requires_grad_(True)
    mask = torch.ones(2, 1, 5, 5, 5)
    total, terms = training_loss(pred, target, mask, spacing=(1, 1, 1), initial=initial)
    assert terms["mse_rel"] == pytest.approx(0.25) and float(total.detach()) == pytest.approx(0.25)
    assert terms["mse"] == pytest.approx((2.25 + 0.25) / 2)  # the absolute term, logged as before
    total.backward()  # gradient through the numerator only: each sample's gradient scaled by 1 / its initial MSE
    g = pred.grad
    assert float(g[1].abs().mean() / g[0].abs().mean()) == pytest.approx((0.5 / 1.0) / (1.5 / 9.0))
