"""Volume.resample_to_spacing on an anisotropic oblique volume and back (issue 3, "resample ... and back")."""

from __future__ import annotations

import numpy as np
from _io_helpers import OBLIQUE_SHAPE

from brainshift.geometry import voxel_to_ras
from brainshift.volume import Volume


def _ramp(points_ras: np.ndarray) -> np.ndarray:
    """A linear function of RAS mm: trilinear interpolation reproduces it exactly inside the grid."""
    return 10.0 + 0.8 * points_ras[:, 0] - 0.5 * points_ras[:, 1] + 0.3 * points_ras[:, 2]


def _grid_points(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1).reshape(-1, 3)


def test_resample_to_1mm_and_back_keeps_ramp_and_orientation(oblique_affine):
    src_pts = _grid_points(OBLIQUE_SHAPE)
    vol = Volume(_ramp(voxel_to_ras(src_pts, oblique_affine)).reshape(OBLIQUE_SHAPE).astype(np.float32),
                 oblique_affine)
    iso = vol.resample_to_spacing(1.0)
    np.testing.assert_allclose(iso.spacing, [1.0, 1.0, 1.0], atol=1e-12)
    # orientation kept: unit direction columns identical
    np.testing.assert_allclose(iso.affine[:3, :3] / iso.spacing, oblique_affine[:3, :3] / vol.spacing, atol=1e-12)
    # field of view kept: extent = shape * spacing (10 x 12 x 36 mm)
    np.testing.assert_allclose(np.array(iso.shape) * iso.spacing, np.array(OBLIQUE_SHAPE) * vol.spacing, atol=1e-9)

    # interior points of the 1 mm grid (inside the source voxel centres) carry the exact ramp
    iso_pts = _grid_points(iso.shape)
    iso_ras = voxel_to_ras(iso_pts, iso.affine)
    src_idx = voxel_to_ras(iso_ras, np.linalg.inv(oblique_affine))  # continuous source voxel indices
    inside = np.all((src_idx >= 0) & (src_idx <= np.array(OBLIQUE_SHAPE) - 1), axis=1)
    assert inside.sum() > 0.3 * len(inside)
    np.testing.assert_allclose(iso.data.reshape(-1)[inside], _ramp(iso_ras[inside]), atol=1e-3)

    back = iso.resample_like(vol)
    assert back.shape == vol.shape
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)
    # back on the source grid: exact where the source point lies inside the 1 mm grid's voxel centres
    iso_idx = voxel_to_ras(voxel_to_ras(src_pts, oblique_affine), np.linalg.inv(iso.affine))
    ok = np.all((iso_idx >= 0) & (iso_idx <= np.array(iso.shape) - 1), axis=1)
    # ...and only where the 1 mm voxels used were themselves interior (exact ramp)
    ok &= np.all((iso_idx >= 1) & (iso_idx <= np.array(iso.shape) - 2), axis=1)
    assert ok.sum() > 0.2 * len(ok)
    err = np.abs(back.data.reshape(-1)[ok] - vol.data.reshape(-1)[ok])
    assert err.max() < 1e-3


def test_mask_inside_nonzero_is_inside_and_signed_or_non_finite_values_are_refused():
    import pytest

    from brainshift.errors import GeometryError
    from brainshift.volume import mask_inside

    labels = np.array([[[0, 2, 4]]], dtype=np.int16)  # a label map: every label is inside
    np.testing.assert_array_equal(mask_inside(labels), [[[False, True, True]]])
    np.testing.assert_array_equal(mask_inside(Volume(labels.astype(np.float32), np.eye(4), "label")),
                                  [[[False, True, True]]])
    np.testing.assert_array_equal(mask_inside(np.array([[[0.0, 0.25]]])), [[[False, True]]])
    np.testing.assert_array_equal(mask_inside(np.array([[[True, False]]])), [[[True, False]]])
    with pytest.raises(GeometryError, match=r"^expected a brain mask of non-negative values \(nonzero = inside\), "
                                            r"got 2 negative voxels \(down to -3\); a signed image rather than a "
                                            r"mask\?$"):
        mask_inside(np.array([[[0, -1, 1, -3]]], dtype=np.int8), "brain mask")
    with pytest.raises(GeometryError, match=r"^expected a mask of finite values \(nonzero = inside\), got NaN"):
        mask_inside(np.array([[[0.0, np.nan]]]))
    with pytest.raises(GeometryError, match=r"^expected a mask of numbers \(nonzero = inside\), got complex128"):
        mask_inside(np.array([[[1j]]]))
