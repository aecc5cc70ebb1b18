"""Mask-aware Jacobian determinant (``brainshift.field.jacobian_determinant(field, mask)``): exact properties.

Expected values are hand-computed: an affine map ``u(p) = B p + t`` has ``J = I + B`` everywhere, and every
finite difference (central or one-sided) of a linear function is exact, so the mask-aware rule must give
``det(I + B)`` at every mask voxel that has an in-mask neighbour along each axis.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.field import jacobian_determinant, voxel_grid

B = np.array([[0.1, 0.02, 0.0], [-0.05, 0.2, 0.01], [0.0, 0.03, -0.1]])
T = np.array([3.0, -2.0, 2.5])


def _affine_field(shape, b=B, t=T):
    grid = voxel_grid(shape).astype(np.float64)
    return (np.einsum("ab,b...->a...", b, grid) + t[:, None, None, None]).astype(np.float32)


def _irregular_mask(shape, seed=0):
    # smoothed noise thresholded: an irregular blob with concavities; opening by a 2x2x2 cube keeps only
    # voxels lying in a 2x2x2 block of the mask, so each has an in-mask neighbour along every axis
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.standard_normal(shape), 2.0)
    m = noise > 0.0
    m[[0, -1]] = m[:, [0, -1]] = m[:, :, [0, -1]] = False  # stay off the grid border: a real rim all round
    return ndi.binary_opening(m, structure=np.ones((2, 2, 2), bool))


def _neighbour_counts(m, axis):
    lo = np.zeros_like(m)
    hi = np.zeros_like(m)
    s = [slice(None)] * 3
    s[axis] = slice(1, None)
    t = [slice(None)] * 3
    t[axis] = slice(None, -1)
    lo[tuple(s)] = m[tuple(t)]  # neighbour at x - 1 in the mask
    hi[tuple(t)] = m[tuple(s)]  # neighbour at x + 1 in the mask
    return lo.astype(int) + hi.astype(int)


def test_affine_field_cut_to_irregular_mask_is_exact_at_every_mask_voxel():
    shape = (20, 22, 18)
    m = _irregular_mask(shape)
    counts = [_neighbour_counts(m, a)[m] for a in range(3)]
    assert all(c.min() >= 1 for c in counts)  # premise of the exact answer
    assert all((c == 1).sum() > 50 for c in counts)  # the mask has a rim: many one-sided stencils
    u = _affine_field(shape) * m  # zero outside the mask, as the simulator's fields are outside the brain
    expected = np.linalg.det(np.eye(3) + B)

    det = jacobian_determinant(u, m)
    np.testing.assert_allclose(det[m], expected, rtol=2e-6)
    np.testing.assert_array_equal(det[~m], 1.0)

    # without the mask the central differences straddle the cut in the rim: non-physical values, some folding
    plain = jacobian_determinant(u)
    interior = m & ndi.binary_erosion(m, structure=ndi.generate_binary_structure(3, 1))
    np.testing.assert_allclose(plain[interior], expected, rtol=2e-6)  # away from the cut both rules agree
    rim = m & ~interior
    assert np.abs(plain[rim] - expected).max() > 1.0
    assert (plain[rim] <= 0).any()


def test_translation_cut_to_a_ball_has_unit_jacobian_in_the_ball():
    shape = (15, 16, 17)
    grid = voxel_grid(shape)
    ball = ((grid - np.array([7.0, 7.5, 8.2])[:, None, None, None]) ** 2).sum(axis=0) <= 5.5**2
    u = np.zeros((3, *shape), np.float32)
    u[:, ball] = np.array([2.0, -1.5, 0.75], np.float32)[:, None]
    np.testing.assert_array_equal(jacobian_determinant(u, ball), 1.0)  # every difference is exactly 0
    assert np.abs(jacobian_determinant(u)[ball] - 1.0).max() > 0.3  # the rim without the mask


def test_one_sided_and_missing_neighbours_along_an_axis():
    # mask = a segment i = 2..5 of one line (j, k fixed): no in-mask neighbour along j or k, so those
    # derivatives are 0 and det J = 1 + d u_i / d i. With u_i = i^2: forward difference at i = 2 is
    # 9 - 4 = 5, central at 3 is (16 - 4) / 2 = 6, central at 4 is (25 - 9) / 2 = 8, backward at 5 is
    # 25 - 16 = 9; the other components (which vary along j and k) must not enter.
    shape = (8, 5, 6)
    grid = voxel_grid(shape)
    u = np.zeros((3, *shape), np.float32)
    u[0] = grid[0] ** 2 + 7 * grid[1]
    u[1] = 3 * grid[1] + grid[2]
    u[2] = -0.5 * grid[2] + grid[0] * grid[1]
    m = np.zeros(shape, bool)
    m[2:6, 2, 3] = True
    det = jacobian_determinant(u, m)
    np.testing.assert_array_equal(det[2:6, 2, 3], [6.0, 7.0, 9.0, 10.0])
    np.testing.assert_array_equal(det[~m], 1.0)

    # a single isolated voxel: no derivative along any axis -> det 1
    single = np.zeros(shape, bool)
    single[4, 1, 1] = True
    np.testing.assert_array_equal(jacobian_determinant(u, single), 1.0)

    # the same line along k: only d u_k / d k = -0.5 enters -> det 0.5 at every voxel of the line
    line_k = np.zeros(shape, bool)
    line_k[3, 2, 1:5] = True
    np.testing.assert_array_equal(jacobian_determinant(u, line_k)[line_k], 0.5)


def test_full_mask_equals_numpy_gradient_rule():
    # all voxels in the mask: central inside, one-sided at the grid border, like numpy.gradient
    rng = np.random.default_rng(1)
    u = rng.standard_normal((3, 6, 7, 5)).astype(np.float32) * 0.3
    np.testing.assert_allclose(jacobian_determinant(u, np.ones((6, 7, 5), bool)), jacobian_determinant(u),
                               rtol=1e-5, atol=1e-5)


def test_folding_inside_the_mask_is_still_reported():
    # u_i = -2 i: the map i -> -i reverses orientation, det -1 at every mask voxel, including the rim
    shape = (9, 9, 9)
    u = np.zeros((3, *shape), np.float32)
    m = np.zeros(shape, bool)
    m[2:7, 1:8, 3:6] = True
    u[0] = -2 * voxel_grid(shape)[0] * m
    det = jacobian_determinant(u, m)
    np.testing.assert_allclose(det[m], -1.0, rtol=1e-6)


def test_shape_dtype_and_mask_types():
    shape = (6, 7, 8)
    u = _affine_field(shape)
    m = np.zeros(shape, np.uint8)
    m[1:5, 2:6, 1:7] = 1
    det = jacobian_determinant(u, m)
    assert det.shape == shape and det.dtype == np.float32
    np.testing.assert_array_equal(det, jacobian_determinant(u, m.astype(bool)))
    assert jacobian_determinant(u.astype(np.float64), m).dtype == np.float32
    np.testing.assert_array_equal(jacobian_determinant(u, np.zeros(shape, bool)), 1.0)  # empty mask


def test_bad_mask_shape_names_both_shapes():
    u = np.zeros((3, 4, 5, 6), np.float32)
    with pytest.raises(GeometryError, match=r"\(4, 5, 6\).*\(4, 6, 5\)"):
        jacobian_determinant(u, np.ones((4, 6, 5), bool))
    with pytest.raises(BrainshiftError, match=r"got \(4, 5\)"):
        jacobian_determinant(u, np.ones((4, 5), bool))


def test_jacobian_stats_on_the_bounding_box_equals_the_whole_grid():
    """jacobian_stats crops to the mask's bounding box + 1 voxel: the same det J at every mask voxel as the
    whole-grid central differences (computed here with numpy.gradient by hand)."""
    from brainshift.field import LOG_JAC_CLIP, jacobian_stats

    rng = np.random.default_rng(5)
    f = (0.4 * rng.standard_normal((3, 14, 12, 10))).astype(np.float32)
    mask = np.zeros((14, 12, 10), bool)
    mask[0:5, 3:9, 2:10] = True  # touches the grid border on two sides
    g = [np.gradient(f[c], axis=(0, 1, 2)) for c in range(3)]
    jac = np.stack([np.stack([g[c][d] + (c == d) for d in range(3)]) for c in range(3)])  # (3, 3, I, J, K)
    det = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)).astype(np.float64))[mask]
    out = jacobian_stats(f, mask)
    assert out["pct_jacobian_nonpositive"] == pytest.approx(100.0 * np.mean(det <= 0))
    assert out["min_jacobian"] == pytest.approx(det.min(), rel=1e-5, abs=1e-5)
    assert out["std_log_jac"] == pytest.approx(np.std(np.log(np.clip(det, LOG_JAC_CLIP, None))), rel=1e-4)


def test_statistics_use_the_one_mask_rule_labels_inside_negative_refused():
    """``jacobian_stats`` / ``field_statistics`` binarise a mask as everywhere else (nonzero = inside): a label map
    counts every label; a signed image given as a mask is refused rather than read as ``> 0``."""
    from brainshift.field import field_statistics, jacobian_stats

    shape = (6, 5, 4)
    f = np.zeros((3,) + shape, np.float32)
    f[0] = 0.5  # uniform 0.5 voxel shift along i
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm voxels along i: |A u| = 1 mm
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    labels[3:5, 1:3, 1:3] = 7
    stats = field_statistics(f, affine, labels)
    assert stats["max_displacement_mm"] == pytest.approx(1.0)
    assert stats["mean_displacement_mm"] == pytest.approx(1.0)
    assert stats["pct_jacobian_nonpositive"] == 0.0
    assert jacobian_stats(f, labels)["min_jacobian"] == pytest.approx(1.0)
    signed = labels.astype(np.float32)
    signed[0, 0, 0] = -1.0
    with pytest.raises(GeometryError, match="non-negative"):
        field_statistics(f, affine, signed)
    with pytest.raises(GeometryError, match="non-negative"):
        jacobian_stats(f, signed)
