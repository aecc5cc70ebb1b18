"""Exact-value tests of brainshift.evaluate.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainshift.errors import GeometryError, KeypointError
from brainshift.evaluate.metrics import (
    dice_hd95,
    field_errors_mm,
    jacobian_stats,
    mask_overlap,
    tre_mm,
    warp_masks,
)
from brainshift.field import LOG_JAC_CLIP
from brainshift.volume import Volume

ANISO = np.diag([2.0, 1.0, 0.5, 1.0])  # spacing (2, 1, 0.5) mm


def _hand_field() -> np.ndarray:
    """Zero except three voxels whose world errors are 2, 1 and 3 mm under ANISO."""
    f = np.zeros((3, 4, 3, 2), np.float32)
    f[:, 0, 0, 0] = (1, 0, 0)  # 1 voxel along i = 2 mm
    f[:, 1, 0, 0] = (0, 0, 2)  # 2 voxels along k = 1 mm
    f[:, 2, 0, 0] = (0, 3, 0)  # 3 voxels along j = 3 mm
    return f


def test_field_errors_hand_values_anisotropic():
    pred, gt = _hand_field(), np.zeros((3, 4, 3, 2), np.float32)
    out = field_errors_mm(pred, gt, ANISO, None)
    # 24 voxels; errors (mm): 2, 1, 3 and 21 zeros
    assert out["mse_mm2"] == pytest.approx((4 + 1 + 9) / 24, abs=1e-12)
    assert out["mae_mm"] == pytest.approx(6 / 24, abs=1e-12)
    # numpy linear percentile: rank 0.95 * 23 = 21.85 between sorted[21] = 1 and sorted[22] = 2
    assert out["p95_mm"] == pytest.approx(1.85, abs=1e-12)
    # the same error in voxel units would give a different MSE: the affine matters
    iso = field_errors_mm(pred, gt, np.eye(4), None)
    assert iso["mse_mm2"] == pytest.approx((1 + 4 + 9) / 24, abs=1e-12)


def test_field_errors_mask_and_symmetry():
    pred, gt = _hand_field(), np.zeros((3, 4, 3, 2), np.float32)
    mask = np.zeros((4, 3, 2), bool)
    mask[:2, 0, 0] = True  # voxels with errors 2 and 1 mm
    mask[3, 2, 1] = True  # an error-free voxel
    out = field_errors_mm(gt, pred, ANISO, Volume(mask.astype(np.uint8), ANISO, "label"))
    assert out["mse_mm2"] == pytest.approx(5 / 3, abs=1e-12)
    assert out["mae_mm"] == pytest.approx(1.0, abs=1e-12)


def test_field_errors_oblique_rotation_preserves_norm():
    # a rotation about z with spacing 2: a voxel error of 1 along i is 2 mm whatever the rotation
    c, s = np.cos(0.4), np.sin(0.4)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([2.0, 2.0, 2.0])
    pred = np.zeros((3, 2, 2, 2), np.float32)
    pred[0] = 1.0
    out = field_errors_mm(pred, np.zeros_like(pred), aff, None)
    assert out["mse_mm2"] == pytest.approx(4.0, rel=1e-6)
    assert out["p95_mm"] == pytest.approx(2.0, rel=1e-6)


def test_field_errors_bad_inputs():
    f = np.zeros((3, 4, 3, 2), np.float32)
    with pytest.raises(GeometryError, match="grid"):
        field_errors_mm(f, np.zeros((3, 4, 3, 3), np.float32), ANISO, None)
    with pytest.raises(GeometryError, match="non-empty"):
        field_errors_mm(f, f, ANISO, np.zeros((4, 3, 2), bool))
    with pytest.raises(GeometryError, match="mask"):
        field_errors_mm(f, f, ANISO, np.ones((4, 3, 3), bool))


def _affine_field(shape, m, t) -> np.ndarray:
    """u(p) = m @ p + t in voxel units (exactly reproduced by trilinear interpolation)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return (np.einsum("ab,b...->a...", m, grid) + np.asarray(t)[:, None, None, None]).astype(np.float32)


def test_tre_of_ground_truth_is_zero_and_offset_is_exact():
    shape = (10, 12, 8)
    m = np.array([[0.05, 0.01, 0.0], [0.0, -0.03, 0.02], [0.01, 0.0, 0.04]])
    t = np.array([0.5, -0.25, 1.0])
    gt = _affine_field(shape, m, t)
    rng = np.random.default_rng(0)
    pts = rng.uniform([1, 1, 1], np.asarray(shape) - 2, size=(15, 3))  # off-grid points
    disps = pts @ m.T + t  # analytic ground truth at the points
    aff = np.diag([1.0, 1.0, 2.5, 1.0])
    assert np.max(tre_mm(gt, pts, disps, aff)) < 1e-5
    # a prediction off by 2 voxels along k on 2.5 mm slices is 5.0 mm off at every point
    pred = gt.copy()
    pred[2] += 2.0
    np.testing.assert_allclose(tre_mm(pred, pts, disps, aff), 5.0, atol=1e-5)


def test_tre_edge_cases():
    f = np.zeros((3, 5, 5, 5), np.float32)
    assert tre_mm(f, np.zeros((0, 3)), np.zeros((0, 3)), np.eye(4)).shape == (0,)
    with pytest.raises(KeypointError, match="inside the grid"):
        tre_mm(f, np.array([[1.0, 2.0, 4.5]]), np.zeros((1, 3)), np.eye(4))
    with pytest.raises(KeypointError, match="one shape"):
        tre_mm(f, np.zeros((2, 3)), np.zeros((3, 3)), np.eye(4))


def test_jacobian_stats_identity_and_folding():
    zero = np.zeros((3, 6, 8, 5), np.float32)
    assert jacobian_stats(zero) == {"pct_jacobian_nonpositive": 0.0, "std_log_jac": 0.0, "min_jacobian": 1.0}
    # u_i = -2 i where j < 4: det J = 1 - 2 = -1 there (u depends on j, but d u_i / d j does not enter det
    # when the other components are zero); det J = 1 elsewhere: exactly half of the voxels fold
    fold = zero.copy()
    fold[0, :, :4, :] = -2.0 * np.arange(6, dtype=np.float32)[:, None, None]
    out = jacobian_stats(fold)
    assert out["pct_jacobian_nonpositive"] == pytest.approx(50.0)
    # log values: log(1e-9) on half, 0 on the other half -> population std = |log(1e-9)| / 2
    assert out["std_log_jac"] == pytest.approx(abs(math.log(LOG_JAC_CLIP)) / 2, rel=1e-6)
    # restricted to the unfolded half: no folding, no spread
    mask = np.zeros((6, 8, 5), bool)
    mask[:, 4:, :] = True
    assert jacobian_stats(fold, mask) == {"pct_jacobian_nonpositive": 0.0, "std_log_jac": 0.0, "min_jacobian": 1.0}


def test_jacobian_stats_uniform_stretch_has_zero_spread():
    f = np.zeros((3, 6, 6, 6), np.float32)
    f[1] = 0.5 * np.arange(6, dtype=np.float32)[None, :, None]  # det J = 1.5 everywhere
    out = jacobian_stats(f)
    assert out["pct_jacobian_nonpositive"] == 0.0
    assert out["std_log_jac"] == pytest.approx(0.0, abs=1e-6)


def test_mask_overlap_hand_values():
    gt = np.zeros((16, 16, 20), bool)
    gt[4:12, 4:12, 5:15] = True  # 10 slices along k
    pred = np.zeros_like(gt)
    pred[4:12, 4:12, 7:17] = True  # shifted by 2 slices: overlap 8 / 10
    out = mask_overlap({"cube": pred}, {"cube": gt}, (1.0, 1.0, 1.5))
    assert out["dice_cube"] == pytest.approx(0.8, abs=1e-6)
    # surface points are at most 2 slices = 3 mm from the other surface
    assert 0.0 < out["hd95_cube_mm"] <= 3.0 + 1e-6
    same = mask_overlap({"cube": gt}, {"cube": gt}, (1.0, 1.0, 1.5))
    assert same == {"dice_cube": 1.0, "hd95_cube_mm": 0.0}
    empty = mask_overlap({"e": np.zeros_like(gt)}, {"e": np.zeros_like(gt)}, 1.0)
    assert math.isnan(empty["dice_e"]) and math.isnan(empty["hd95_e_mm"])
    one = mask_overlap({"e": np.zeros_like(gt)}, {"e": gt}, 1.0)
    assert one["dice_e"] == 0.0 and math.isnan(one["hd95_e_mm"])


def _cube_masks(shape, affine):
    brain = np.zeros(shape, np.uint8)
    brain[3:-3, 3:-3, 3:-3] = 1
    tumour = np.zeros(shape, np.uint8)
    tumour[8:12, 8:13, 7:11] = 1
    return {"brain": Volume(brain, affine, "label"), "tumour": Volume(tumour, affine, "label")}


def test_dice_hd95_ground_truth_against_itself():
    shape, aff = (20, 22, 18), np.diag([1.0, 1.2, 1.5, 1.0])
    masks = _cube_masks(shape, aff)
    gt = np.zeros((3,) + shape, np.float32)
    gt[2] = 1.0  # one slice along k
    out = dice_hd95(gt, gt, masks)
    assert out == {"dice_brain": 1.0, "hd95_brain_mm": 0.0, "dice_tumour": 1.0, "hd95_tumour_mm": 0.0}


def test_warp_masks_moves_by_a_constant_field():
    shape, aff = (20, 22, 18), np.diag([1.0, 1.2, 1.5, 1.0])
    masks = _cube_masks(shape, aff)
    f = np.zeros((3,) + shape, np.float32)
    f[0] = 2.0  # forward: every preop voxel moves +2 along i
    warped = warp_masks(f, masks)
    np.testing.assert_array_equal(warped["tumour"][10:14, 8:13, 7:11], True)
    assert warped["tumour"].sum() == masks["tumour"].data.sum()
    assert not warped["tumour"][8:10].any()


@pytest.mark.filterwarnings("ignore:the inverse field's worst residual")  # the bump reaches the grid border
def test_warp_masks_together_equals_each_alone():
    """The masks are resampled together (bits of one label image): each comes out exactly as when warped alone
    (nearest neighbour picks the same voxel), for overlapping masks and more masks than one byte holds."""
    from brainshift.io.fields import invert_field, warp_image

    shape, aff = (20, 22, 18), np.diag([1.0, 1.2, 1.5, 1.0])
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    bump = np.exp(-((i - 10) ** 2 + (j - 11) ** 2 + (k - 9) ** 2) / 30.0)
    f = np.stack([1.7 * bump, -1.1 * bump, 0.6 * bump]).astype(np.float32)  # smooth, sub-voxel fractions
    rng = np.random.default_rng(0)
    masks = {f"m{n}": Volume((rng.random(shape) < 0.4).astype(np.uint8), aff, "label") for n in range(10)}
    inv = invert_field(f, aff)
    together = warp_masks(f, masks, inverse_field=inv)
    assert list(together) == list(masks)
    for name, vol in masks.items():
        alone = np.asarray(warp_image(vol, f, aff, inverse_field=inv).data) > 0
        np.testing.assert_array_equal(together[name], alone, err_msg=name)
