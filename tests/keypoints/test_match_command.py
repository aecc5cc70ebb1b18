"""``brainshift keypoints`` writes descriptors into the .key file and ``brainshift match`` matches two .key files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from _register_pair import INTRAOP_AFFINE, make_pair, true_field
from brainshift.cli import app
from brainshift.io.keypoints import read_sift_key_features

runner = CliRunner()


def test_keypoints_then_match_gives_the_true_displacements(tmp_path):
    pre, intra = make_pair()
    nib.save(nib.Nifti1Image(pre, np.eye(4)), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(intra, INTRAOP_AFFINE), tmp_path / "b.nii.gz")
    for name in ("a", "b"):
        r = runner.invoke(app, ["keypoints", str(tmp_path / f"{name}.nii.gz"), "-o", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    feats = read_sift_key_features(tmp_path / "a.key")
    assert feats.descriptors.shape == (len(feats.points_vox), 64)
    # real SIFT-Rank descriptors: every row a permutation of the ranks 0..63 (zeros before this change)
    assert np.array_equal(np.sort(feats.descriptors, axis=1), np.tile(np.arange(64), (len(feats.descriptors), 1)))

    out = tmp_path / "m.csv"
    r = runner.invoke(app, ["match", str(tmp_path / "a.key"), str(tmp_path / "b.key"), "-a", str(tmp_path / "a.nii.gz"),
                            "-b", str(tmp_path / "b.nii.gz"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    t = np.genfromtxt(out, delimiter=",", names=True)
    pts = np.column_stack([t["x"], t["y"], t["z"]])
    disps = np.column_stack([t["dx"], t["dy"], t["dz"]])
    assert len(pts) >= 20  # measured 34
    # A's voxel frame (identity affine = mm): the displacement is the known field at A's keypoint
    assert (np.linalg.norm(disps - true_field(pts.T).T, axis=1) < 1.0).mean() >= 0.9
    assert {"descriptor_distance", "ratio", "residual_mm", "x_b", "y_b", "z_b"} <= set(t.dtype.names)


def test_match_without_descriptor_columns_is_one_line_error(tmp_path):
    key = tmp_path / "short.key"
    key.write_text("# featExtract 1.1\n# Extraction Voxel Resolution (ijk) : 8 8 8\n# Extraction Voxel Size (mm) : "
                   "1 1 1\n# Feature Coordinate Space: voxel\nFeatures: 1\nScale-space location[x y z scale]\n"
                   "1\t2\t3\t1.5\n")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "i.nii.gz")
    out = tmp_path / "m.csv"
    r = runner.invoke(app, ["match", str(key), str(key), "-a", str(tmp_path / "i.nii.gz"), "-b",
                            str(tmp_path / "i.nii.gz"), "-o", str(out)])
    assert r.exit_code == 2 and r.output.startswith("error: expected 81 finite numbers on line 7")
    assert not out.exists()


def test_match_refuses_features_outside_their_image(tmp_path):
    # a .key file of another (larger) image given with -a: was an empty table and exit 0
    from brainshift.io.keypoints import write_sift_key

    rng = np.random.default_rng(0)
    points = rng.uniform(0, 15, size=(20, 3))
    descriptors = np.argsort(rng.random((20, 64)), axis=1)
    # no grid in the header (zeros): the features' positions are what gives the other image away
    write_sift_key(tmp_path / "big.key", points, 2.0, descriptors=descriptors)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)), tmp_path / "big.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), tmp_path / "small.nii.gz")
    out = tmp_path / "m.csv"
    r = runner.invoke(app, ["match", str(tmp_path / "big.key"), str(tmp_path / "big.key"), "-a",
                            str(tmp_path / "small.nii.gz"), "-b", str(tmp_path / "big.nii.gz"), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: expected the features of") and "inside the grid of -a" in r.output, r.output
    assert not out.exists()


def _key_pair(tmp_path):
    """Two .key files on one 16^3 image whose features lie 8+ mm apart (no pair within 3 mm)."""
    from brainshift.io.keypoints import write_sift_key

    rng = np.random.default_rng(1)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)), tmp_path / "i.nii.gz")
    for name, lo, hi in (("a", 0, 4), ("b", 12, 15)):
        write_sift_key(tmp_path / f"{name}.key", rng.uniform(lo, hi, size=(10, 3)), 2.0, shape=(16, 16, 16),
                       spacing_mm=(1, 1, 1), descriptors=np.argsort(rng.random((10, 64)), axis=1))
    return [str(tmp_path / "a.key"), str(tmp_path / "b.key"), "-a", str(tmp_path / "i.nii.gz"), "-b",
            str(tmp_path / "i.nii.gz")]


def test_match_with_no_consistent_match_is_an_error_not_an_empty_table(tmp_path):
    out = tmp_path / "m.csv"
    r = runner.invoke(app, ["match", *_key_pair(tmp_path), "-o", str(out), "--max-displacement-mm", "3"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: expected at least one consistent match, got none (0 candidate"), r.output
    assert not out.exists()


def test_match_output_must_be_a_table(tmp_path):
    out = tmp_path / "m.nii.gz"
    r = runner.invoke(app, ["match", *_key_pair(tmp_path), "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: expected -o/--output a keypoint table (.csv or .txt)"), r.output
    assert not out.exists()


def test_match_refuses_a_key_row_with_more_than_81_values(tmp_path):
    # a row of 82 values (e.g. two rows run together) was cut to its first 81 and matched; now one error line
    args = _key_pair(tmp_path)
    lines = (tmp_path / "b.key").read_text().splitlines()
    lines[8] += "\t5"  # the 3rd feature row (line 9)
    (tmp_path / "b.key").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.csv"
    r = runner.invoke(app, ["match", *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: expected at most 81 values") and r.output.rstrip().endswith(
        "on line 9 of " + repr(str(tmp_path / "b.key")) + " (feature row 3), got 82"), r.output
    assert len(r.output.splitlines()) == 1 and not out.exists()


def test_match_refuses_a_key_header_recording_another_grid_or_voxel_size(tmp_path):
    # a .key file made from a 12^3 image given with an 8^3 (or a 2 mm) image: the header says so; it was read as
    # voxels of the wrong image (or refused only when a feature happened to lie outside it)
    from brainshift.io.keypoints import write_sift_key

    rng = np.random.default_rng(0)
    points, descriptors = rng.uniform(0, 7, size=(20, 3)), np.argsort(rng.random((20, 64)), axis=1)
    write_sift_key(tmp_path / "k12.key", points, 2.0, shape=(12, 12, 12), spacing_mm=(1, 1, 1),
                   descriptors=descriptors)
    write_sift_key(tmp_path / "k8.key", points, 2.0, shape=(8, 8, 8), spacing_mm=(1, 1, 1),
                   descriptors=descriptors)
    data = rng.random((8, 8, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "i8.nii.gz")
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "i8_2mm.nii.gz")
    out = tmp_path / "m.csv"
    cases = [("k12.key", "i8.nii.gz", "grid", "'Extraction Voxel Resolution' (8, 8, 8) (or doubled / halved: "
                                              "featExtract -2+ / -2-), got (12, 12, 12)"),
             ("k8.key", "i8_2mm.nii.gz", "voxel size", "'Extraction Voxel Size' (2, 2, 2) mm, got (1, 1, 1) mm")]
    for key, image, what, detail in cases:
        r = runner.invoke(app, ["match", str(tmp_path / "k8.key"), str(tmp_path / key), "-a",
                                str(tmp_path / "i8.nii.gz"), "-b", str(tmp_path / image), "-o", str(out)])
        assert r.exit_code == 2, r.output
        expected = (f"error: expected the header of {str(tmp_path / key)!r} to record the {what} of -b "
                    f"{str(tmp_path / image)!r}: {detail}; was the .key file made from this image?")
        assert r.output.strip() == expected, r.output
        assert not out.exists()
