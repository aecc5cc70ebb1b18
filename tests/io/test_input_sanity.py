"""Input sanity where images enter, and one-line errors: geometry warnings and refusals, unusable intensities,
what every reader makes of the images brainshift writes, usage errors and progress bars."""

from __future__ import annotations

import re
import sys

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.errors import GeometryError, InputFileError
from brainshift.io.images import check_intensities, read_image, write_image
from brainshift.volume import Volume

AFFINE = np.array([[0.0, -1.5, 0, 20], [1.2, 0, 0, -30], [0, 0, 2.0, 5], [0, 0, 0, 1]])  # axes permuted and flipped
runner = CliRunner()


def _nifti(path, affine=AFFINE, s_code=1, q_code=1, qform=None, data=None):
    data = np.random.default_rng(0).random((6, 7, 5)).astype(np.float32) if data is None else data
    img = nib.Nifti1Image(data, None)
    img.set_sform(affine, code=s_code)
    img.set_qform(affine if qform is None else qform, code=q_code)
    nib.save(img, str(path))
    return path


def test_no_sform_and_no_qform_warns_naming_the_file_and_the_affine_used(tmp_path):
    p = _nifti(tmp_path / "a.nii", s_code=0, q_code=0)
    with pytest.warns(UserWarning, match=r"a\.nii' has no sform and no qform .*default affine \[-1\.2 0 0"):
        vol = read_image(p)
    # nibabel's default: the voxel sizes only (x flipped, centred): neither the sform nor the qform written
    np.testing.assert_allclose(np.abs(np.diag(vol.affine)[:3]), [1.2, 1.5, 2.0], rtol=1e-5)


def test_disagreeing_sform_and_qform_warn_naming_both_and_the_one_used(tmp_path):
    other = AFFINE.copy()
    other[:3, 3] += [4, 0, 0]
    p = _nifti(tmp_path / "b.nii.gz", qform=other)
    with pytest.warns(UserWarning, match=r"sform and a qform that disagree \(by up to 4\): sform \[0 -1\.5 0 20;.*"
                                         r"qform \[0 -1\.5 0 24;.*using the sform"):
        vol = read_image(p)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)


def test_agreeing_forms_and_qform_only_are_silent(tmp_path, recwarn):
    read_image(_nifti(tmp_path / "c.nii"))
    read_image(_nifti(tmp_path / "d.nii", s_code=0))
    assert not [w for w in recwarn if "sform" in str(w.message)]


@pytest.mark.parametrize("column", [0, 2])
def test_zero_spacing_is_refused_naming_the_file(tmp_path, column):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), None)
    bad = AFFINE.copy()
    bad[:, column] = 0
    img.set_sform(bad, code=1)
    nib.save(img, str(tmp_path / "z.nii"))
    with pytest.raises(GeometryError, match=r"non-degenerate .* in '.*z\.nii', got spacing \((0|1\.2), "):
        read_image(tmp_path / "z.nii")


@pytest.mark.parametrize("data, message", [
    (np.full((4, 4, 4), np.nan, np.float32), r"finite intensities .* got 64 NaN or inf voxels of 64"),
    (np.zeros((4, 4, 4), np.float32), r"got a constant image \(every voxel 0\)"),
    (np.full((4, 4, 4), 3.5, np.float32), r"every voxel 3\.5"),
])
def test_unusable_intensities_are_refused(data, message):
    with pytest.raises(InputFileError, match=message):
        check_intensities(Volume(data, np.eye(4)), "x.nii", "preop image")


def test_written_images_have_one_geometry_for_nibabel_and_simpleitk(tmp_path):
    """write_image puts the affine in both the sform and the qform: ITK (which may prefer the qform) and
    nibabel read the same grid. Expected values: the affine itself, converted to ITK's LPS by hand."""
    import SimpleITK as sitk

    p = write_image(Volume(np.random.default_rng(1).random((6, 7, 5)).astype(np.float32), AFFINE), tmp_path / "w.nii")
    hdr = nib.load(str(p)).header
    np.testing.assert_allclose(hdr.get_sform(), AFFINE, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), AFFINE, atol=1e-5)
    img = sitk.ReadImage(str(p))
    np.testing.assert_allclose(img.GetSpacing(), [1.2, 1.5, 2.0], atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), [-20, 30, 5], atol=1e-4)  # LPS = (-x, -y, z) of the RAS origin
    # direction columns: i -> RAS (0, 1, 0) = LPS (0, -1, 0); j -> RAS (-1, 0, 0) = LPS (1, 0, 0); k -> (0, 0, 1)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)


def test_nan_and_all_zero_preop_images_are_refused_by_infer(tmp_path):
    kp = tmp_path / "kp.csv"
    kp.write_text("x,y,z,dx,dy,dz\n1,1,1,0,0,0\n4,1,1,0,0,0\n1,5,1,0,0,0\n1,1,3,0,0,0\n3,3,2,0.5,0,0\n")
    for name, data in (("nan", np.full((6, 7, 5), np.nan, np.float32)), ("zero", np.zeros((6, 7, 5), np.float32))):
        p = _nifti(tmp_path / f"{name}.nii.gz", data=data)
        out = tmp_path / f"out_{name}"
        res = runner.invoke(app, ["infer", "-p", str(p), "-k", str(kp), "--no-refine", "-q", "-o", str(out)])
        assert res.exit_code == 2 and res.stderr.startswith("error: expected "), res.output
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["infer", "--bogus"], "No such option: --bogus (see brainshift infer --help)"),
    (["infer", "-p", "x.nii", "--h5-compression", "12"], "Invalid value for '--h5-compression'"),
    (["infer", "-k", "kp.csv"], "Missing option '-p'"),
    (["nope"], "No such command 'nope'"),
    (["keypoints"], "Missing argument 'image'"),
    (["keypoints", "x.nii", "--octaves", "many"], "'--octaves'"),
])
def test_usage_errors_are_one_line(args, fragment):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Usage" not in res.output and "╭" not in res.output


def test_an_error_never_continues_a_progress_bar_line(capsys):
    from tqdm import tqdm

    from brainshift.cli.app import error_line

    bar = tqdm(total=10, file=sys.stderr, desc="refine")
    bar.update(3)
    error_line("expected a\nbroken message, got two lines")
    err = capsys.readouterr().err
    assert err.endswith("\nerror: expected a broken message, got two lines\n"), repr(err)


def test_keypoints_on_a_featureless_image_is_an_error_naming_options(tmp_path):
    data = np.zeros((20, 20, 20), np.float32)
    data[10, 10, 10] = 1.0  # a single bright voxel: nothing at the default scales survives the border
    p = _nifti(tmp_path / "empty.nii.gz", affine=np.diag([1.0, 1.0, 1.0, 1.0]), data=data)
    res = runner.invoke(app, ["keypoints", str(p), "-o", str(tmp_path / "kp"), "--border-mm", "9"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: expected keypoints in ") and "--contrast" in res.stderr, res.stderr
    assert not (tmp_path / "kp.csv").exists()


def test_zero_voxel_size_in_a_qform_only_header_is_refused_not_set_to_one(tmp_path, capfd):
    """nibabel replaces a zero pixdim by 1 mm while loading (printing a log line); with no sform that is the
    grid, so it is refused. The header is patched by hand: nibabel itself never writes a zero pixdim."""
    import struct

    p = _nifti(tmp_path / "q.nii", s_code=0, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    raw = bytearray(p.read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1:4] (NIfTI-1 header offsets 76 + 4 * 1..3)
    p.write_bytes(bytes(raw))
    with pytest.raises(GeometryError, match=r"zero voxel size in the header's pixdim and no sform"):
        read_image(p)
    assert "pixdim" not in capfd.readouterr().err  # nibabel's own log line is not printed besides the error


def test_inverse_of_a_pure_translation_blames_the_grid_boundary_not_a_fold():
    from brainshift.io.fields import invert_field

    field = np.zeros((3, 10, 10, 10), np.float32)
    field[0] = 2.0  # 2 voxels of 1 mm along i everywhere: no fold anywhere
    with pytest.warns(UserWarning, match=r"moves the grid boundary by up to 2 mm") as record:
        invert_field(field, np.eye(4))
    assert not any("fold" in str(w.message) for w in record)


@pytest.mark.parametrize("content, message", [
    (b"", "got an empty file (0 bytes)"),
    (bytes(range(7, 250)), "a zip archive or a pickle"),
    (b"PK\x03\x04 truncated", "truncated or corrupt"),
])
def test_unreadable_weights_say_why(tmp_path, content, message):
    from brainshift.model.checkpoint import load_weights

    (tmp_path / "w.pt").write_bytes(content)
    with pytest.raises(InputFileError, match=re.escape(message)):
        load_weights(tmp_path / "w.pt")


def test_weights_naming_a_directory_say_so(tmp_path):
    (tmp_path / "w.pt").mkdir()
    img = _nifti(tmp_path / "i.nii.gz")
    kp = tmp_path / "kp.csv"
    kp.write_text("x,y,z,dx,dy,dz\n1,1,1,0,0,0\n4,1,1,0,0,0\n1,5,1,0,0,0\n1,1,3,0,0,0\n")
    res = runner.invoke(app, ["infer", "-p", str(img), "-k", str(kp), "-w", str(tmp_path / "w.pt"), "-q",
                              "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "got the directory" in res.stderr, res.output
