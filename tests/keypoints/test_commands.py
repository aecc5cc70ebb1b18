"""Tests of the ``brainshift keypoints`` command (typer CliRunner)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from brainshift.cli import app

from .test_detect import AFFINE, CENTRES, SHAPE, blob_image

runner = CliRunner()


def test_keypoints_command_writes_csv_and_key(tmp_path):
    from brainshift.io.keypoints import read_sift_key

    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    mask = tmp_path / "mask.nii.gz"
    inside = np.zeros(SHAPE, dtype=np.uint8)
    inside[:24] = 1  # blobs 0 and 2 only
    nib.save(nib.Nifti1Image(inside, AFFINE), mask)

    result = runner.invoke(app, ["keypoints", str(image), "--out", str(tmp_path / "kp")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("4 keypoints (3 bright, 1 dark)")
    lines = (tmp_path / "kp.csv").read_text().splitlines()
    assert lines[0].startswith("#") and "voxel" in lines[0]
    assert lines[1] == "x,y,z,scale_mm,response"
    table = np.loadtxt(tmp_path / "kp.csv", delimiter=",", skiprows=2)
    assert table.shape == (4, 5)
    for c in CENTRES:  # CSV points are 0-based voxel indices
        assert np.min(np.linalg.norm(table[:, :3] - c, axis=1)) < 0.1
    key_points = read_sift_key(tmp_path / "kp.key")  # the .key round trip gives the same voxel points
    np.testing.assert_allclose(key_points, table[:, :3], atol=1e-3)

    result = runner.invoke(app, ["keypoints", str(image), "--mask", str(mask), "--max", "1"])
    assert result.exit_code == 0, result.output
    default_csv = tmp_path / "blobs_keypoints.csv"  # default prefix: beside the image
    table = np.loadtxt(default_csv, delimiter=",", skiprows=2, ndmin=2)
    assert table.shape == (1, 5) and table[0, 0] < 24


def test_keypoints_command_bad_input_exits_2(tmp_path):
    result = runner.invoke(app, ["keypoints", str(tmp_path / "missing.nii.gz")])
    assert result.exit_code == 2
    assert "error:" in result.output
    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    result = runner.invoke(app, ["keypoints", str(image), "--edge-ratio", "0.5"])
    assert result.exit_code == 2 and "expected --edge-ratio >= 1, got 0.5" in result.output
    result = runner.invoke(app, ["keypoints", str(image), "--octaves", "0"])
    assert result.exit_code == 2 and "expected --octaves >= 1, got 0" in result.output
    assert not list(tmp_path.glob("*.csv"))  # nothing written on error


def test_keypoints_out_that_is_a_directory_is_refused(tmp_path, monkeypatch):
    # "--out ''" and "--out DIR/" used to write the hidden files ".csv" and ".key" (or DIR.csv beside DIR)
    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    (tmp_path / "kp").mkdir()
    monkeypatch.chdir(tmp_path)
    for out in ("", ".", "kp", "kp/"):
        result = runner.invoke(app, ["keypoints", str(image), "--out", out])
        assert result.exit_code == 2, (out, result.output)
        assert result.output.startswith("error: expected --out a file prefix"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.nii.gz", "kp"] and not any((tmp_path / "kp").iterdir())


def test_keypoints_pair_is_written_together_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing the .key (a full disk) leaves the earlier .csv and .key exactly as they were."""
    import errno

    import brainshift.io.keypoints as kio

    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    (tmp_path / "kp.csv").write_text("old csv")
    (tmp_path / "kp.key").write_text("old key")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kio, "write_sift_key", full_disk)
    result = runner.invoke(app, ["keypoints", str(image), "--out", str(tmp_path / "kp")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (tmp_path / "kp.csv").read_text() == "old csv" and (tmp_path / "kp.key").read_text() == "old key"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs.nii.gz", "kp.csv", "kp.key"]


def test_keypoints_mask_of_another_place_in_world_space_is_named_so(tmp_path):
    # a non-empty mask whose grid lies elsewhere was reported as "an empty mask"
    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    far = AFFINE.copy()
    far[:3, 3] += 1000.0
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), far), tmp_path / "mask.nii.gz")
    result = runner.invoke(app, ["keypoints", str(image), "--mask", str(tmp_path / "mask.nii.gz")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: expected a mask that overlaps the image in world space, got one whose "
                                    "voxels all fall outside the image's grid"), result.output
    assert len(result.output.splitlines()) == 1 and not list(tmp_path.glob("*.csv"))


def test_keypoints_empty_mask_names_the_file_and_an_out_below_a_file_is_refused_first(tmp_path):
    """An empty --mask said "got an empty mask" without naming it; --out below a file failed after the detection
    with "File exists". Expected: both named, exit 2, nothing written."""
    image = tmp_path / "blobs.nii.gz"
    nib.save(nib.Nifti1Image(blob_image(), AFFINE), image)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE), tmp_path / "empty.nii.gz")
    result = runner.invoke(app, ["keypoints", str(image), "--mask", str(tmp_path / "empty.nii.gz"),
                                 "--out", str(tmp_path / "kp")])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert "with at least one voxel inside (nonzero), got none" in result.output
    assert "empty.nii.gz" in result.output
    (tmp_path / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["keypoints", str(image), "--out", str(tmp_path / "notes.txt" / "kp")])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith("error: expected a folder to write") and "an existing file" in result.output
    assert not list(tmp_path.rglob("*.csv")) and not list(tmp_path.rglob("*.key"))
