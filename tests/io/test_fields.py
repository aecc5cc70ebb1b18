"""Displacement-field files through SimpleITK/ITK: .h5 transforms, NIfTI vector fields, .npz; inversion and
warping. Expected values are computed independently: points through the affine by hand, LPS by negating x, y."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from _io_helpers import (
    OBLIQUE_SHAPE,
    assert_one_line_error,
    oblique_affine_matrix,
    run_infer,
    smooth_field,
    write_small_case,
)

from brainshift.errors import BrainshiftError, GeometryError, InputFileError
from brainshift.io.fields import (
    field_to_sitk_transform,
    invert_field,
    read_field,
    warp_image,
    write_field,
)
from brainshift.volume import Volume

FLIP = np.array([-1.0, -1.0, 1.0])


def _lps(affine, p_vox):
    """LPS mm of continuous voxel index ``p_vox`` (by hand: affine, then negate x and y)."""
    return (affine @ np.append(p_vox, 1.0))[:3] * FLIP


def test_h5_transform_point_is_p_plus_A_u_in_lps(tmp_path, oblique_affine):
    field = smooth_field(OBLIQUE_SHAPE)
    path = write_field(tmp_path / "f.h5", field, oblique_affine)
    tx = sitk.ReadTransform(str(path))
    for v in [(3, 4, 5), (10, 12, 6), (0, 0, 0), (19, 23, 11), (7, 20, 2)]:
        p = _lps(oblique_affine, np.array(v, float))
        expected = _lps(oblique_affine, np.array(v, float) + field[(slice(None), *v)])
        np.testing.assert_allclose(tx.TransformPoint(tuple(p)), expected, atol=1e-4)
    back, aff = read_field(path, reference=Volume(np.zeros(OBLIQUE_SHAPE), oblique_affine))
    np.testing.assert_allclose(aff, oblique_affine, atol=1e-9)
    np.testing.assert_allclose(back, field, atol=1e-6)
    assert back.dtype == np.float32 and back.shape == (3, *OBLIQUE_SHAPE)


def _sag_field(shape, affine, sag_mm=5.0):
    """Brain-like ellipsoid mask and a smooth sag (~``sag_mm`` mm peak, toward inferior) inside it."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    centre = (np.array(shape) - 1) / 2.0
    radii = np.array(shape) * 0.38
    r2 = (((idx - centre) / radii) ** 2).sum(-1)
    # Gaussian bump lowered so that it reaches 0 continuously at r2 = 1.6 (zero outside: a field at rest)
    bump = ((np.exp(-2.0 * r2) - np.exp(-3.2)) / (1 - np.exp(-3.2))).clip(min=0)
    d_ras = np.zeros(shape + (3,))
    d_ras[..., 2] = -sag_mm * bump
    d_ras[..., 0] = 0.3 * sag_mm * bump * np.sin(idx[..., 1] / 6.0)
    field = np.einsum("ab,ijkb->aijk", np.linalg.inv(affine[:3, :3]), d_ras).astype(np.float32)
    return field, r2 < 1.0


def test_h5_inverse_composed_with_forward_is_identity_in_brain(tmp_path):
    affine = oblique_affine_matrix(20.0, zooms=(2.0, 2.0, 2.5), origin=(-40.0, -50.0, -30.0))
    shape = (40, 48, 36)
    field, brain = _sag_field(shape, affine)
    mm = np.sqrt((np.einsum("ab,bijk->aijk", affine[:3, :3], field) ** 2).sum(0))
    assert 4.5 < mm.max() < 5.5  # a ~5 mm sag
    inverse = invert_field(field, affine)
    fwd = sitk.ReadTransform(str(write_field(tmp_path / "fwd.h5", field, affine)))
    inv = sitk.ReadTransform(str(write_field(tmp_path / "inv.h5", inverse, affine)))
    pts = np.argwhere(brain)[:: max(1, int(brain.sum()) // 400)].astype(float)
    errs = []
    for v in pts:
        p = _lps(affine, v)
        errs.append(np.linalg.norm(np.array(inv.TransformPoint(fwd.TransformPoint(tuple(p)))) - p))
    assert len(errs) > 300
    assert max(errs) < 0.1  # mm


def test_invert_field_convention(oblique_affine):
    affine = oblique_affine_matrix(20.0, zooms=(2.0, 2.0, 2.0))
    field, brain = _sag_field((24, 24, 24), affine, sag_mm=4.0)
    v = invert_field(field, affine)
    assert v.shape == field.shape and v.dtype == np.float32
    # y = p + u(p) must map back: p = y + v(y) (linear interpolation of v at y)
    from scipy.ndimage import map_coordinates

    # on the grid (what ITK solves): intraop voxel y came from x = y + v(y), and x + u(x) = y
    y = np.argwhere(brain).T.astype(float)
    x = y + v[:, brain]
    res = x + np.stack([map_coordinates(field[c], x, order=1) for c in range(3)]) - y
    assert np.abs(res).max() < 0.01  # voxels of 2 mm: within the 0.01 mm tolerance per component and then some
    # off the grid (forward then backward, v linearly interpolated): limited by interpolating v between voxels
    p = y
    yp = p + field[:, brain]
    back = yp + np.stack([map_coordinates(v[c], yp, order=1) for c in range(3)])
    assert np.abs(back - p).max() < 0.1
    # sign convention: where the forward field is an exact translation by +2 voxels along i (the flat centre of
    # this field), the backward field is exactly -2 voxels along i
    shift = _translation_bump((32, 28, 28), 2.0)
    vs = invert_field(shift, affine)
    np.testing.assert_allclose(vs[:, 12:20, 12:16, 12:16].reshape(3, -1).T, [[-2.0, 0.0, 0.0]] * 128, atol=2e-3)


def test_nifti_vector_constant_ras_field_read_by_sitk(tmp_path, oblique_affine):
    d_ras = np.array([5.0, 2.0, 1.0])
    u = np.linalg.solve(oblique_affine[:3, :3], d_ras)
    field = np.broadcast_to(u[:, None, None, None], (3, *OBLIQUE_SHAPE)).astype(np.float32)
    path = write_field(tmp_path / "f.nii.gz", field, oblique_affine)
    hdr = nib.load(str(path)).header
    assert int(hdr["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR, as docs/fields.md promises
    assert nib.load(str(path)).shape == (*OBLIQUE_SHAPE, 1, 3)
    img = sitk.ReadImage(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 3 and img.GetSize() == OBLIQUE_SHAPE
    assert img.GetPixelID() == sitk.sitkVectorFloat64
    # docs/fields.md: components are LPS mm, so (+5, +2, +1) RAS reads as (-5, -2, +1) everywhere
    arr = sitk.GetArrayViewFromImage(img).reshape(-1, 3)
    np.testing.assert_allclose(arr, np.tile([-5.0, -2.0, 1.0], (arr.shape[0], 1)), atol=1e-5)
    np.testing.assert_allclose(img.TransformIndexToPhysicalPoint((10, 10, 10)),
                               _lps(oblique_affine, np.array([10.0, 10.0, 10.0])), atol=1e-4)
    back, aff = read_field(path, reference=Volume(np.zeros(OBLIQUE_SHAPE), oblique_affine))
    np.testing.assert_array_equal(back, field)
    np.testing.assert_allclose(aff, oblique_affine, atol=1e-5)
    # ITK uses the file directly as a displacement field transform: TransformPoint = p + (-5, -2, 1)
    tx = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    p = _lps(oblique_affine, np.array([6.0, 7.0, 5.0]))
    np.testing.assert_allclose(tx.TransformPoint(tuple(p)), p + [-5.0, -2.0, 1.0], atol=1e-4)


def test_nifti_fields_written_by_itk_and_dispvect_files(tmp_path, oblique_affine):
    field = smooth_field(OBLIQUE_SHAPE)
    # a vector image written by ITK itself (as ANTs writes its warps): intent 1007, LPS components
    tx = field_to_sitk_transform(field, oblique_affine)
    sitk.WriteImage(sitk.Cast(tx.GetDisplacementField(), sitk.sitkVectorFloat32), str(tmp_path / "itk.nii.gz"))
    assert int(nib.load(str(tmp_path / "itk.nii.gz")).header["intent_code"]) == 1007
    back, _ = read_field(tmp_path / "itk.nii.gz")
    np.testing.assert_allclose(back, field, atol=1e-5)
    # a DISPVECT (1006) file holds RAS components (ITK >= 5.4 flips them on reading): same field
    d_ras = np.einsum("ab,bijk->ijka", oblique_affine[:3, :3], field.astype(np.float64))
    img = nib.Nifti1Image(d_ras[:, :, :, None, :].astype(np.float32), oblique_affine)
    img.header.set_intent(1006)
    nib.save(img, str(tmp_path / "disp.nii.gz"))
    back2, _ = read_field(tmp_path / "disp.nii.gz")
    np.testing.assert_allclose(back2, field, atol=1e-5)
    # and SimpleITK agrees: it reads that file as LPS components
    lps = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "disp.nii.gz")))
    np.testing.assert_allclose(lps[3, 4, 5], d_ras[5, 4, 3] * FLIP, atol=1e-5)


def test_npz_layout_and_round_trip(tmp_path, oblique_affine):
    field = smooth_field(OBLIQUE_SHAPE)
    path = write_field(tmp_path / "f.npz", field, oblique_affine)
    with np.load(path) as z:
        assert sorted(z.files) == ["affine", "field"]
        assert z["field"].dtype == np.float32 and z["field"].shape == (3, *OBLIQUE_SHAPE)
        np.testing.assert_array_equal(z["affine"], oblique_affine)
    back, aff = read_field(path)
    np.testing.assert_array_equal(back, field)
    np.testing.assert_array_equal(aff, oblique_affine)


def test_h5_composite_with_one_displacement_field_is_accepted(tmp_path, oblique_affine):
    field = smooth_field(OBLIQUE_SHAPE)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(field_to_sitk_transform(field, oblique_affine))
    sitk.WriteTransform(comp, str(tmp_path / "comp.h5"))
    back, _ = read_field(tmp_path / "comp.h5")
    np.testing.assert_allclose(back, field, atol=1e-6)
    comp.AddTransform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)))
    sitk.WriteTransform(comp, str(tmp_path / "comp2.h5"))
    with pytest.raises(InputFileError, match=r"composite holding exactly one.*got a composite of"):
        read_field(tmp_path / "comp2.h5")
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "aff.h5"))
    with pytest.raises(InputFileError, match=r"expected a DisplacementFieldTransform .* got a AffineTransform"):
        read_field(tmp_path / "aff.h5")


@pytest.mark.parametrize("ext", [".h5", ".nii.gz", ".npz"])
def test_reference_grid_mismatch(tmp_path, oblique_affine, ext):
    field = smooth_field(OBLIQUE_SHAPE)
    path = write_field(tmp_path / f"f{ext}", field, oblique_affine)
    other_shape = Volume(np.zeros((20, 24, 13)), oblique_affine)
    with pytest.raises(GeometryError, match=r"expected a field on the image grid \(shape \(20, 24, 13\), spacing "
                                            r"\(0\.5, 0\.5, 3\.0\) mm\), got field .* with shape \(20, 24, 12\)"):
        read_field(path, reference=other_shape)
    shifted = oblique_affine.copy()
    shifted[0, 3] += 0.01
    with pytest.raises(GeometryError, match=r"same shape and spacing but the affines differ by up to 0\.01"):
        read_field(path, reference=Volume(np.zeros(OBLIQUE_SHAPE), shifted))


def test_bad_field_files(tmp_path, oblique_affine):
    with pytest.raises(InputFileError, match=r"not found"):
        read_field(tmp_path / "missing.h5")
    with pytest.raises(InputFileError, match=r"expected a displacement field file ending in"):
        read_field(tmp_path / "f.mha")
    nib.save(nib.Nifti1Image(np.zeros((*OBLIQUE_SHAPE, 3), np.float32), oblique_affine), str(tmp_path / "f4.nii"))
    with pytest.raises(InputFileError, match=r"expected a 5-D NIfTI vector field of shape \(I, J, K, 1, 3\)"):
        read_field(tmp_path / "f4.nii")
    np.savez(tmp_path / "f.npz", disp=np.zeros(3))
    with pytest.raises(InputFileError, match=r"expected arrays 'field' and 'affine'"):
        read_field(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", field=np.zeros((2, 4, 4, 4)), affine=np.eye(4))
    with pytest.raises(InputFileError, match=r"expected a valid displacement field .* shape \(3, I, J, K\)"):
        read_field(tmp_path / "g.npz")
    (tmp_path / "junk.npz").write_bytes(bytes(range(256)) * 4)  # was "This file contains pickled (object) data"
    with pytest.raises(InputFileError, match=r"expected a \.npz field file .* not a zip archive"):
        read_field(tmp_path / "junk.npz")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputFileError, match=r"expected an ITK transform file \(HDF5\) .*not HDF5"):
        read_field(tmp_path / "bad.h5")
    good = tmp_path / "good.h5"
    write_field(good, np.zeros((3, 4, 5, 6), np.float32), oblique_affine)
    (tmp_path / "cut.h5").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputFileError, match=r"truncated or corrupt"):
        read_field(tmp_path / "cut.h5")


@pytest.mark.parametrize("layout", ["utf8_type", "fixed_type", "no_parameters", "no_group"])
def test_h5_not_in_itk_layout_is_one_clear_error(tmp_path, capfd, layout):
    # written with h5py by another tool: ITK's HDF5 cannot read UTF-8 or fixed-length strings or missing
    # datasets and prints dozens of HDF5-DIAG lines on stderr before failing; we refuse such files first
    import h5py

    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as h5:
        if layout != "no_group":
            g = h5.create_group("TransformGroup/0")
            dtype = {"fixed_type": "S34"}.get(layout, h5py.string_dtype("utf-8" if layout == "utf8_type" else "ascii"))
            g["TransformType"] = np.array([b"DisplacementFieldTransform_float_3_3"], dtype=dtype)
            if layout != "no_parameters":
                g["TransformParameters"] = np.zeros(3 * 8, np.float32)
                g["TransformFixedParameters"] = np.r_[[2.0, 2, 2], np.zeros(3), np.ones(3), np.eye(3).ravel()]
        else:
            h5["x"] = 1
    with pytest.raises(InputFileError, match=r"expected an ITK transform file in ITK's HDF5 layout"):
        read_field(path)
    assert "HDF5-DIAG" not in capfd.readouterr().err


def test_write_field_leaves_nothing_on_bad_input(tmp_path, oblique_affine):
    field = smooth_field(OBLIQUE_SHAPE)
    field[0, 1, 1, 1] = np.nan
    for ext in (".h5", ".nii.gz", ".npz"):
        with pytest.raises(GeometryError, match=r"expected a finite displacement field"):
            write_field(tmp_path / f"f{ext}", field, oblique_affine)
    with pytest.raises(InputFileError, match=r"expected a displacement field file ending in"):
        write_field(tmp_path / "f.mha", smooth_field(OBLIQUE_SHAPE), oblique_affine)
    assert list(tmp_path.iterdir()) == []


def _translation_bump(shape, shift_vox):
    """Forward field: +shift_vox along i, flat (exact translation) in a central box, tapering to 0 at the edges."""
    idx = [np.arange(s, dtype=np.float64) for s in shape]
    prof = [np.clip(np.minimum(x, s - 1 - x) / 6.0, 0, 1) for x, s in zip(idx, shape, strict=True)]
    w = prof[0][:, None, None] * prof[1][None, :, None] * prof[2][None, None, :]
    f = np.zeros((3, *shape), np.float32)
    f[0] = shift_vox * w
    return f


def test_warp_image_moves_content_forward(oblique_affine):
    shape = (32, 28, 28)
    affine = oblique_affine_matrix(20.0, zooms=(1.0, 1.5, 2.0))
    field = _translation_bump(shape, 2.0)
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    blob = np.exp(-((i - 14) ** 2 + (j - 14) ** 2 + (k - 14) ** 2) / 8.0).astype(np.float32)
    out = warp_image(Volume(blob, affine), field, affine)
    assert out.data.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-9)
    # the preop blob at i = 14 appears at i = 16 intraop (forward field +2 voxels along i)
    assert np.unravel_index(np.argmax(out.data), shape) == (16, 14, 14)
    np.testing.assert_allclose(out.data[16, 14, 14], 1.0, atol=1e-3)
    # labels: nearest neighbour, dtype kept, a cube moved by exactly 2 voxels
    lab = np.zeros(shape, np.int16)
    lab[10:15, 12:17, 12:17] = 7
    inverse = invert_field(field, affine)
    warped = warp_image(Volume(lab, affine, "label"), field, affine, inverse_field=inverse)
    assert warped.kind == "label" and warped.data.dtype == np.int16
    expected = np.zeros_like(lab)
    expected[12:17, 12:17, 12:17] = 7
    np.testing.assert_array_equal(warped.data, expected)
    # passing the inverse gives the same result as computing it
    np.testing.assert_allclose(warp_image(Volume(blob, affine), field, affine, inverse_field=inverse).data,
                               out.data, atol=1e-6)
    with pytest.raises(GeometryError, match=r"expected a displacement field on the image grid"):
        warp_image(Volume(blob, affine), field, affine, inverse_field=inverse[:, :-1])


def test_resampling_intraop_image_with_forward_h5_gives_preop_space(tmp_path):
    """docs/fields.md: sitk.Resample(intraop, preop grid, forward .h5) brings the intraop image into preop space."""
    from brainshift.io.images import volume_from_sitk, volume_to_sitk

    shape = (32, 28, 28)
    affine = oblique_affine_matrix(20.0, zooms=(1.0, 1.5, 2.0))
    field = _translation_bump(shape, 2.0)
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    intraop = np.exp(-((i - 16) ** 2 + (j - 14) ** 2 + (k - 14) ** 2) / 8.0).astype(np.float32)  # blob at i = 16
    tx = sitk.ReadTransform(str(write_field(tmp_path / "fwd.h5", field, affine)))
    ref = volume_to_sitk(Volume(np.zeros(shape, np.float32), affine))
    out = volume_from_sitk(sitk.Resample(volume_to_sitk(Volume(intraop, affine)), ref, tx, sitk.sitkLinear, 0.0))
    # preop position of that tissue: i = 14 (it moved by +2 voxels along i)
    assert np.unravel_index(np.argmax(out.data), shape) == (14, 14, 14)
    np.testing.assert_allclose(out.data[14, 14, 14], 1.0, atol=1e-3)


def test_h5_layout_float32_compressed_and_float64_option(tmp_path, oblique_affine):
    """ITK's own layout: /TransformGroup/0 with TransformType, fixed parameters (size, origin, spacing,
    direction) and the LPS vectors; float32 + gzip by default, float64 on request; SimpleITK reads both to the
    same TransformPoint (1e-4 mm)."""
    import h5py

    field = smooth_field(OBLIQUE_SHAPE)
    p32 = write_field(tmp_path / "f32.h5", field, oblique_affine)
    p64 = write_field(tmp_path / "f64.h5", field, oblique_affine, h5_dtype="float64", compression=0)
    with h5py.File(p32) as h5:
        g = h5["TransformGroup/0"]
        assert g["TransformType"][0].decode() == "DisplacementFieldTransform_float_3_3"
        assert g["TransformParameters"].dtype == np.float32 and g["TransformParameters"].compression == "gzip"
        fixed = g["TransformFixedParameters"][()]
        np.testing.assert_array_equal(fixed[:3], OBLIQUE_SHAPE)  # ITK size (x, y, z) = (I, J, K): no permutation
        np.testing.assert_allclose(fixed[3:6], _lps(oblique_affine, np.zeros(3)), atol=1e-9)  # origin, LPS
    with h5py.File(p64) as h5:
        assert h5["TransformGroup/0/TransformType"][0].decode() == "DisplacementFieldTransform_double_3_3"
        assert h5["TransformGroup/0/TransformParameters"].dtype == np.float64
    t32, t64 = sitk.ReadTransform(str(p32)), sitk.ReadTransform(str(p64))
    for q in [(3.2, 4.7, 5.1), (10, 12, 6), (0.5, 22.5, 11.0)]:
        x = tuple(_lps(oblique_affine, np.array(q, float)))
        np.testing.assert_allclose(t32.TransformPoint(x), t64.TransformPoint(x), atol=1e-4)
    with pytest.raises(BrainshiftError, match=r"expected an \.h5 precision in .*got 'float16'"):
        write_field(tmp_path / "bad.h5", field, oblique_affine, h5_dtype="float16")
    with pytest.raises(BrainshiftError, match=r"expected a gzip level 0-9 .* got 10"):
        write_field(tmp_path / "bad.h5", field, oblique_affine, compression=10)
    assert not (tmp_path / "bad.h5").exists()


# --------------------------------------------------------------- malformed initial fields through the command line


def _infer_init(tmp_path, field):
    return run_infer(tmp_path, initial_field=field)


def test_h5_field_with_nan_fixed_parameters_names_the_file(tmp_path):
    """A NaN origin in TransformFixedParameters: the geometry error came without the file's name."""
    import h5py

    from brainshift.io.images import read_image

    image, _ = write_small_case(tmp_path)
    vol = read_image(image)
    path = tmp_path / "nanorigin.h5"
    write_field(path, np.zeros((3, *vol.shape), np.float32), vol.affine)
    with h5py.File(path, "r+") as h5:
        fixed = h5["TransformGroup/0/TransformFixedParameters"]
        values = fixed[()]
        values[3] = np.nan  # the origin's x
        fixed[...] = values
    res, out = _infer_init(tmp_path, path)
    assert_one_line_error(res, out, "expected a valid displacement field in", "nanorigin.h5", "finite 4x4")


def test_corrupt_gzip_nifti_field_and_a_directory_are_named_so(tmp_path):
    from brainshift.io.images import read_image

    image, _ = write_small_case(tmp_path)
    vol = read_image(image)
    good = tmp_path / "f.nii.gz"
    write_field(good, smooth_field(vol.shape), vol.affine)
    raw = bytearray(good.read_bytes())
    raw[-6] ^= 0xFF  # the gzip trailer's CRC-32
    (tmp_path / "crc.nii.gz").write_bytes(bytes(raw))
    res, out = _infer_init(tmp_path, tmp_path / "crc.nii.gz")
    assert_one_line_error(res, out, "expected an intact gzip-compressed NIfTI vector field", "CRC check failed")
    (tmp_path / "dir.npz").mkdir()  # was "expected an existing displacement field file ... (not found)"
    res, out = _infer_init(tmp_path, tmp_path / "dir.npz")
    assert_one_line_error(res, out, "expected the displacement field to be a file, got a directory")
