"""read_image / write_image: NIfTI, NRRD and MetaImage versions of one oblique image; bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from _io_helpers import OBLIQUE_SHAPE

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
