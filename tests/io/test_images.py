"""read_image / write_image: NIfTI, NRRD and MetaImage versions of one oblique image; bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from _io_helpers import OBLIQUE_SHAPE, assert_one_line_error, run_infer, write_small_case

from brainshift.errors import InputFileError
from brainshift.io.images import read_image, volume_from_sitk, volume_to_sitk, write_image
from brainshift.volume import Volume


@pytest.mark.parametrize("ext", [".nrrd", ".nhdr", ".mha", ".mhd"])
def test_nifti_nrrd_metaimage_give_same_data_and_affine(tmp_path, oblique_volume, ext):
    nii = tmp_path / "img.nii.gz"
    write_image(oblique_volume, nii)
    # the other formats are produced by ITK itself from the NIfTI file (independent of brainshift's conversion)
    other = tmp_path / f"img{ext}"
    sitk.WriteImage(sitk.ReadImage(str(nii)), str(other))
    a, b = read_image(nii), read_image(other)
    assert a.shape == b.shape == OBLIQUE_SHAPE
    assert a.data.dtype == b.data.dtype == np.float32
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, oblique_volume.affine, atol=1e-5)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-5)


def test_write_image_round_trip_and_header(tmp_path, oblique_volume):
    path = write_image(oblique_volume, tmp_path / "sub" / "out.nii")
    img = nib.load(str(path))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_allclose(img.get_qform(), oblique_volume.affine, atol=1e-5)
    back = read_image(path)
    np.testing.assert_array_equal(back.data, oblique_volume.data)
    np.testing.assert_allclose(back.affine, oblique_volume.affine, atol=1e-5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.nii"]  # no temporary left behind


def test_write_image_rejects_other_formats(tmp_path, oblique_volume):
    with pytest.raises(InputFileError, match=r"expected an output image path ending in \.nii or \.nii\.gz"):
        write_image(oblique_volume, tmp_path / "out.nrrd")
    assert not (tmp_path / "out.nrrd").exists()


def test_trailing_singleton_dims_are_squeezed(tmp_path, oblique_affine):
    data = np.arange(np.prod(OBLIQUE_SHAPE), dtype=np.float32).reshape(OBLIQUE_SHAPE)
    nib.save(nib.Nifti1Image(data[..., None], oblique_affine), str(tmp_path / "t1.nii.gz"))
    vol = read_image(tmp_path / "t1.nii.gz")
    assert vol.shape == OBLIQUE_SHAPE
    np.testing.assert_array_equal(vol.data, data)
    # a 4-D ITK image with one time point (MetaImage)
    img4 = sitk.JoinSeries([volume_to_sitk(Volume(data, oblique_affine))])
    sitk.WriteImage(img4, str(tmp_path / "t1.mha"))
    vol4 = read_image(tmp_path / "t1.mha")
    assert vol4.shape == OBLIQUE_SHAPE
    np.testing.assert_array_equal(vol4.data, data)
    np.testing.assert_allclose(vol4.affine, oblique_affine, atol=1e-6)


def test_genuine_4d_image_is_an_error(tmp_path, oblique_affine):
    data = np.zeros(OBLIQUE_SHAPE + (2,), np.float32)
    nib.save(nib.Nifti1Image(data, oblique_affine), str(tmp_path / "bold.nii.gz"))
    with pytest.raises(InputFileError, match=r"expected a 3-D image, got shape \(20, 24, 12, 2\)"):
        read_image(tmp_path / "bold.nii.gz")
    two = sitk.JoinSeries([volume_to_sitk(Volume(data[..., 0], oblique_affine))] * 2)
    sitk.WriteImage(two, str(tmp_path / "bold.nrrd"))
    with pytest.raises(InputFileError, match=r"expected a 3-D image, got shape \(20, 24, 12, 2\)"):
        read_image(tmp_path / "bold.nrrd")


def test_missing_unsupported_and_corrupt_files(tmp_path):
    with pytest.raises(InputFileError, match=r"not found") as exc:
        read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(exc.value)
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputFileError, match=r"expected an image file ending in .*img\.png"):
        read_image(tmp_path / "img.png")
    with gzip.open(tmp_path / "bad.nii.gz", "wb") as fh:
        fh.write(b"not a nifti header at all")
    with pytest.raises(InputFileError, match=r"expected a readable NIfTI image, got .*bad\.nii\.gz"):
        read_image(tmp_path / "bad.nii.gz")
    (tmp_path / "bad.nrrd").write_text("garbage\n")
    with pytest.raises(InputFileError, match=r"expected a readable image, got .*bad\.nrrd"):
        read_image(tmp_path / "bad.nrrd")
    with pytest.raises(InputFileError, match=r"got a directory"):
        (tmp_path / "dir.nii").mkdir()
        read_image(tmp_path / "dir.nii")


def test_labels_stay_integer(tmp_path, oblique_affine):
    lab = np.zeros(OBLIQUE_SHAPE, np.uint8)
    lab[5:10, 5:10, 3:6] = 3
    nib.save(nib.Nifti1Image(lab, oblique_affine), str(tmp_path / "lab.nii.gz"))
    vol = read_image(tmp_path / "lab.nii.gz", kind="label")
    assert vol.kind == "label" and vol.data.dtype == np.uint8
    np.testing.assert_array_equal(vol.data, lab)
    # the same labels stored as float become int32; intensities become float32
    nib.save(nib.Nifti1Image(lab.astype(np.float32), oblique_affine), str(tmp_path / "labf.nii.gz"))
    assert read_image(tmp_path / "labf.nii.gz", kind="label").data.dtype == np.int32
    assert read_image(tmp_path / "lab.nii.gz").data.dtype == np.float32
    nib.save(nib.Nifti1Image(lab.astype(np.float32) + 0.5, oblique_affine), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(InputFileError, match=r"expected integer labels"):
        read_image(tmp_path / "frac.nii.gz", kind="label")
    # labels through MetaImage keep their type too
    sitk.WriteImage(volume_to_sitk(Volume(lab, oblique_affine, "label")), str(tmp_path / "lab.mha"))
    vol2 = read_image(tmp_path / "lab.mha", kind="label")
    assert vol2.data.dtype == np.uint8
    np.testing.assert_array_equal(vol2.data, lab)


def test_sitk_conversion_round_trip(oblique_volume):
    img = volume_to_sitk(oblique_volume)
    assert img.GetSize() == OBLIQUE_SHAPE  # ITK index (x, y, z) = nibabel (i, j, k)
    # voxel (3, 4, 5) of the array is ITK index (3, 4, 5)
    assert img.GetPixel(3, 4, 5) == pytest.approx(float(oblique_volume.data[3, 4, 5]))
    back = volume_from_sitk(img)
    np.testing.assert_array_equal(back.data, oblique_volume.data)
    np.testing.assert_allclose(back.affine, oblique_volume.affine, atol=1e-12)


# ------------------------------------------------------------------- malformed images through the command line


def _infer(tmp_path, image):
    return run_infer(tmp_path, image=image)


def test_rgb_image_is_one_line_error_not_a_traceback(tmp_path):
    rgb = np.zeros((16, 18, 14), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(tmp_path / "rgb.nii.gz"))
    res, out = _infer(tmp_path, tmp_path / "rgb.nii.gz")
    assert_one_line_error(res, out, "expected a scalar image", "got 3 values per voxel (R, G, B)")
    with pytest.raises(InputFileError, match=r"scalar image .* \(R, G, B\)"):  # labels (masks) too
        read_image(tmp_path / "rgb.nii.gz", kind="label")


def test_complex_image_is_refused_not_cast_to_its_real_part(tmp_path):
    data = (np.random.default_rng(1).random((16, 18, 14)) * (1 + 1j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "c.nii.gz"))
    res, out = _infer(tmp_path, tmp_path / "c.nii.gz")
    assert_one_line_error(res, out, "expected real voxel values", "complex64")


def test_float64_intensities_beyond_float32_are_named_so(tmp_path):
    data = np.random.default_rng(1).random((16, 18, 14))
    data[3, 4, 5] = 1e300  # finite in the file, inf once cast to float32
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "big.nii.gz"))
    res, out = _infer(tmp_path, tmp_path / "big.nii.gz")
    assert_one_line_error(res, out, "within float32's range", "got 1 voxels beyond it (up to 1e+300)")
    assert "overflow" not in res.output  # numpy's RuntimeWarning no longer comes first


def test_corrupt_gzip_stream_is_refused_even_where_nibabel_stops_before_its_end(tmp_path):
    """nibabel reads only the bytes the voxels need, so a stream damaged near its end (or a wrong CRC-32 in the
    trailer) was read without an error. Expected: refused naming the gzip stream."""
    image, _ = write_small_case(tmp_path)
    raw = image.read_bytes()
    bad_crc = bytearray(raw)
    bad_crc[-6] ^= 0xFF  # the CRC-32 of the gzip trailer (the voxel data are intact)
    (tmp_path / "crc.nii.gz").write_bytes(bytes(bad_crc))
    res, out = _infer(tmp_path, tmp_path / "crc.nii.gz")
    assert_one_line_error(res, out, "expected an intact gzip-compressed NIfTI image", "CRC check failed")
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) - 20])
    res, out = _infer(tmp_path, tmp_path / "cut.nii.gz")
    assert_one_line_error(res, out, "expected a complete gzip-compressed NIfTI image", "truncated")


def test_non_integer_or_nan_labels_say_which(tmp_path):
    data = np.zeros((6, 6, 6), np.float32)
    data[2, 2, 2] = 0.5
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "frac.nii.gz"))
    with pytest.raises(InputFileError, match=r"integer labels .* non-integer values \(e\.g\. 0\.5\)"):
        read_image(tmp_path / "frac.nii.gz", kind="label")
    data[2, 2, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputFileError, match=r"integer labels .* got 1 NaN or inf voxels"):
        read_image(tmp_path / "nan.nii.gz", kind="label")


def test_truncated_metaimage_is_one_line_naming_the_cause_and_itk_prints_nothing(tmp_path, capfd):
    """ITK's MetaIO printed "data not read completely" lines on stderr, then an exception blaming errno ("No
    such file or directory"). Expected: one error line with MetaIO's cause, nothing else on stderr."""
    image, _ = write_small_case(tmp_path)
    sitk.WriteImage(sitk.ReadImage(str(image)), str(tmp_path / "img.mha"))
    raw = (tmp_path / "img.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(raw[: len(raw) - 500])
    capfd.readouterr()
    res, out = _infer(tmp_path, tmp_path / "cut.mha")
    line = assert_one_line_error(res, out, "expected a readable image", "data not read completely")
    assert "No such file or directory" not in line
    assert "MetaImage" not in capfd.readouterr().err


def test_singular_itk_direction_message_is_the_cause_not_a_matrix_row(tmp_path):
    image, _ = write_small_case(tmp_path)
    sitk.WriteImage(sitk.ReadImage(str(image)), str(tmp_path / "img.mhd"))
    header = (tmp_path / "img.mhd").read_text()
    lines = [("TransformMatrix = 1 0 0 1 0 0 0 0 1" if ln.startswith("TransformMatrix") else ln)
             for ln in header.splitlines()]
    (tmp_path / "img.mhd").write_text("\n".join(lines) + "\n")
    res, out = _infer(tmp_path, tmp_path / "img.mhd")
    assert_one_line_error(res, out, "expected a readable image", "Bad direction, determinant is 0")
