"""Field files read by ANTs (antspyx) and SimpleITK with the same meaning, pinned through ANTs itself.

``.h5`` (float32 compressed by default, float64 on request) and ``.nii.gz`` fields written by
:func:`brainshift.io.fields.write_field`:

- points: ``ants.apply_transforms_to_points`` maps the preop LPS point ``x`` to ``x + flip(A u(x))`` (its
  intraop position), the same as SimpleITK's ``TransformPoint`` to 1e-4 mm;
- images: ``ants.apply_transforms(fixed=preop grid, moving=intraop image, [field])`` pulls the intraop image
  into preop space: ``out(p) = intraop(p + u(p))``, checked against a hand-shifted array for a uniform field.

The expected values come from the affine by hand (``_lps``), not from brainshift's own conversions.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from brainshift.io.fields import write_field

ants = pytest.importorskip("ants", reason="antspyx is installed by `make install` (pip install --no-deps antspyx)")
pd = pytest.importorskip("pandas")

SHAPE = (20, 24, 16)
#: oblique, anisotropic, axis-permuting voxel-to-RAS affine (i -> A/P, j -> R/L, k -> S)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, 1.2, 5.0], [0.0, 0.0, 0.0, 1.0]])
FLIP = np.array([-1.0, -1.0, 1.0])


def _lps(p_vox: np.ndarray) -> np.ndarray:
    """LPS mm of ``(N, 3)`` continuous voxel indices, by hand: affine, then negate x and y."""
    return (p_vox @ AFFINE[:3, :3].T + AFFINE[:3, 3]) * FLIP


def _smooth_field() -> np.ndarray:
    idx = np.indices(SHAPE).astype(np.float32)
    return np.stack([0.8 * np.sin(idx[1] / 5), 0.5 * np.cos(idx[0] / 4), 0.3 * idx[2] / 16]).astype(np.float32)


@pytest.mark.parametrize("name, kwargs", [("f32.h5", {}), ("f64.h5", {"h5_dtype": "float64", "compression": 0}),
                                          ("f.nii.gz", {})])
def test_ants_maps_points_like_sitk_and_by_hand(tmp_path, name, kwargs):
    field = _smooth_field()
    path = write_field(tmp_path / name, field, AFFINE, **kwargs)
    vox = np.array([[5.0, 6.0, 7.0], [10.0, 12.0, 3.0], [0.0, 0.0, 0.0], [19.0, 23.0, 15.0]])
    # at voxel centres the displacement is the stored vector: x + flip(A u) exactly (float32 rounding only)
    u_at = np.stack([field[:, int(i), int(j), int(k)] for i, j, k in vox])
    expected = _lps(vox + u_at)
    out = ants.apply_transforms_to_points(3, pd.DataFrame(_lps(vox), columns=["x", "y", "z"]), [str(path)])
    np.testing.assert_allclose(out[["x", "y", "z"]].to_numpy(np.float64), expected, atol=1e-4)
    # between voxel centres: ANTs and SimpleITK (reading the float64 .h5 of the same field) interpolate alike
    between = np.array([[5.3, 6.7, 7.2], [10.5, 12.25, 3.9], [1.1, 20.2, 14.6]])
    tx = sitk.ReadTransform(str(write_field(tmp_path / "ref.h5", field, AFFINE, h5_dtype="float64")))
    ref = np.array([tx.TransformPoint(tuple(float(v) for v in q)) for q in _lps(between)])
    got = ants.apply_transforms_to_points(3, pd.DataFrame(_lps(between), columns=["x", "y", "z"]), [str(path)])
    np.testing.assert_allclose(got[["x", "y", "z"]].to_numpy(np.float64), ref, atol=1e-4)


@pytest.mark.parametrize("ext", [".h5", ".nii.gz"])
def test_ants_pulls_the_intraop_image_into_preop_space(tmp_path, ext):
    # uniform field: u = (2, -1, 1) voxels, so out(p) = intraop(p + u) = intraop[i + 2, j - 1, k + 1]
    field = np.zeros((3, *SHAPE), np.float32)
    field[0], field[1], field[2] = 2.0, -1.0, 1.0
    path = write_field(tmp_path / f"u{ext}", field, AFFINE)
    rng = np.random.default_rng(3)
    intraop = rng.uniform(0, 1, SHAPE).astype(np.float32)
    origin, spacing, direction = _itk_geometry()
    moving = ants.from_numpy(intraop, origin=origin, spacing=spacing, direction=direction)
    fixed = ants.from_numpy(np.zeros(SHAPE, np.float32), origin=origin, spacing=spacing, direction=direction)
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=[str(path)],
                                interpolator="linear").numpy()
    # the shifted voxel centres fall on voxel centres: exact samples inside, where p + u stays on the grid
    np.testing.assert_allclose(out[:-2, 1:, :-1], intraop[2:, :-1, 1:], atol=1e-5)


def _itk_geometry():
    """ITK (LPS) origin, spacing and direction matrix of :data:`AFFINE`, by hand."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ AFFINE[:3]
    spacing = np.sqrt((lps[:, :3] ** 2).sum(axis=0))
    return tuple(lps[:, 3]), tuple(spacing), lps[:, :3] / spacing
