"""`brainshift infer` end to end through typer's CliRunner: outputs, conventions and every bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()
SHAPE = (24, 28, 20)


@pytest.fixture()
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random(SHAPE).astype(np.float32) + 0.1
    data[:2] = 0.0  # some background
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    affine[:3, 3] = [-10, -12, -8]
    path = tmp_path / "preop.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _table(path, rows):
    with open(path, "w") as fh:
        fh.write("x,y,z,dx,dy,dz\n")
        for r in rows:
            fh.write(",".join(str(v) for v in r) + "\n")
    return path


def _good_rows(n=12, seed=1):
    rng = np.random.default_rng(seed)
    pts = rng.uniform([3, 3, 3], [s - 4 for s in SHAPE], size=(n, 3))
    # affine displacement in voxel units: u = B p + t
    b = np.array([[0.02, 0.0, 0.01], [0.0, -0.03, 0.0], [0.01, 0.0, 0.02]])
    d = pts @ b.T + np.array([0.5, -1.0, 0.25])
    return np.hstack([pts, d])


def _invoke(args):
    return runner.invoke(app, args)


def _assert_clean_error(res, out_dir, *fragments):
    assert res.exit_code == 2, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), lines[0]
    # no partial output files
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_infer_linear_writes_all_formats_and_summary(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    for fmt, ext in [("h5", ".h5"), ("npz", ".npz"), ("nii", ".nii.gz")]:
        out = tmp_path / f"out_{fmt}"
        res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "linear", "--no-refine",
                       "-o", str(out), "-f", fmt, "-q"])
        assert res.exit_code == 0, res.output
        assert (out / f"initial_disp_field{ext}").exists()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["keypoint_count"] == 12
        assert summary["refined"] is False
        assert summary["frames"]["keypoint_table"] == "voxel"
        assert summary["fields"]["initial_disp_field"]["pct_jacobian_nonpositive"] == 0.0


def test_infer_gp_writes_the_gaussian_process_field(tmp_path, image_path):
    """-m gp end to end: the same field as the library interpolator, recorded as gp in summary.json."""
    from brainshift.interpolate import interpolate
    from brainshift.io.images import read_image

    rows = _good_rows(16)
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "gp", "--no-refine", "-o", str(out),
                   "-f", "npz", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interpolation"] == "gp" and summary["keypoint_count"] == 16
    with np.load(out / "initial_disp_field.npz") as z:
        field = z["field"]
    img = read_image(image_path)
    expected = interpolate("gp", rows[:, :3], rows[:, 3:], img.shape, img.affine)
    np.testing.assert_allclose(field, expected, atol=1e-5)
    assert np.abs(field).max() > 0.1


def test_refining_clustered_keypoints_keeps_no_learnt_correction_or_warns(tmp_path, image_path):
    """12 keypoints in one region: by default (auto: linear, safeguards) the learnt correction is kept out (alpha 0,
    recorded, no warning); where the network's correction is applied to such keypoints anyway (the network alone;
    fewer than 10 keypoints, not judged) infer warns, naming --no-refine (the safeguards cannot check it away from
    them); a spline warns that it extrapolates them; spread keypoints do not warn, nor clustered ones without
    refinement (test above)."""
    import warnings

    rng = np.random.default_rng(3)
    pts = np.array([10.0, 12.0, 8.0]) + rng.uniform(0, 3, size=(12, 3))
    clustered = _table(tmp_path / "clustered.csv", np.hstack([pts, np.tile([0.5, -0.2, 0.1], (12, 1))]))
    few = _table(tmp_path / "few.csv", np.hstack([pts[:8], np.tile([0.5, -0.2, 0.1], (8, 1))]))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*keypoints span.*")
        res = _invoke(["infer", "-p", str(image_path), "-k", str(clustered), "-o", str(tmp_path / "c"), "-f", "npz",
                       "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["refined"] is True and summary["interpolation"] == "linear"
    assert summary["safeguards"]["learnt_correction"] is False and summary["safeguards"]["alpha"] == 0.0
    assert "safeguards: no learnt correction: 12 keypoints clustered in one region" in res.output
    for kp, extra, name, match in ((clustered, ["--no-safeguards"], "n",
                                    "network refined the field.*--no-refine, or drop --no-safeguards"),
                                   (few, [], "f", r"network refined the field.*add --no-refine \(README"),
                                   (clustered, ["-m", "tps"], "t", "make -m tps extrapolate")):
        with pytest.warns(UserWarning, match=match):
            res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / name),
                           "-f", "npz", "-q", *extra])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["safeguards"]["learnt_correction"] is True
    spread = _table(tmp_path / "spread.csv", _good_rows())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*keypoints span.*")
        res = _invoke(["infer", "-p", str(image_path), "-k", str(spread), "-o", str(tmp_path / "s"), "-f", "npz",
                       "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["safeguards"]["learnt_correction"] is True


def test_infer_npz_field_reproduces_affine_keypoint_field(tmp_path, image_path):
    rows = _good_rows(20)
    rows[:, :3] = np.round(rows[:, :3])  # grid-aligned keypoints: the field at a voxel centre is exact
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "linear", "--no-refine",
                   "-o", str(out), "-f", "npz", "-q"])
    assert res.exit_code == 0, res.output
    with np.load(out / "initial_disp_field.npz") as z:
        field = z["field"]
    # at each keypoint voxel the interpolated field equals its displacement
    idx = rows[:, :3].astype(int)
    got = field[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    np.testing.assert_allclose(got, rows[:, 3:], atol=1e-4)


def test_infer_save_inverse_and_warped(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out),
                   "--save-inverse", "--save-warped", "-q"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert "initial_inverse_disp_field.h5" in names
    assert "preop_warped_to_intraop.nii.gz" in names
    assert nib.load(str(out / "preop_warped_to_intraop.nii.gz")).shape == SHAPE


def test_missing_preop_file(tmp_path):
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(tmp_path / "nope.nii.gz"), "-k", str(tmp_path / "kp.csv"), "-o", str(out),
                   "--no-refine"])
    _assert_clean_error(res, out, "nope.nii.gz")


def test_4d_image(tmp_path):
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), np.eye(4)), str(path))
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(path), "-k", str(kp), "-o", str(out), "--no-refine"]), out, "3-D")


def test_fewer_than_four_keypoints(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows(3))
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"]),
                        out, "3")


def test_coplanar_keypoints(tmp_path, image_path):
    rows = [[5, 5, 10, 1, 0, 0], [15, 5, 10, 1, 0, 0], [5, 20, 10, 1, 0, 0], [15, 20, 10, 0, 1, 0],
            [10, 12, 10, 0, 0, 1], [8, 9, 10, 0, 0, 0]]
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"]),
                        out, "plane")


def test_conflicting_duplicate_keypoints_are_named(tmp_path, image_path):
    rows = _good_rows(8).tolist()
    rows.append([rows[2][0], rows[2][1], rows[2][2], 9.0, 9.0, 9.0])
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"])
    _assert_clean_error(res, out, "line 4 of kp.csv and the keypoint on line 10 of kp.csv", "(9, 9, 9)")


def test_nan_in_table(tmp_path, image_path):
    rows = _good_rows(8).tolist()
    rows[3][4] = float("nan")
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"]), out)


def test_wrong_column_count(tmp_path, image_path):
    kp = tmp_path / "kp.csv"
    kp.write_text("1,2,3,4,5,6\n2,3,4,5,6,7\n3,4,5,6,7\n4,5,6,7,8,9\n5,6,7,8,9,1\n")
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"]),
                        out, "6")


def test_keypoint_outside_image(tmp_path, image_path):
    rows = _good_rows(8).tolist()
    rows[0][0] = 500.0
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--no-refine"]),
                        out, "outside", "line 2 of kp.csv")


def test_field_on_another_grid(tmp_path, image_path):
    field_path = tmp_path / "f.npz"
    np.savez(field_path, field=np.zeros((3, 10, 10, 10), np.float32), affine=np.eye(4))
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-i", str(field_path), "-o", str(out),
                                 "--no-refine"]), out, "grid")


def _without_gpu(monkeypatch):
    """torch sees no GPU (as on a CPU-only machine), whatever this machine has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_gpu_is_refused_before_any_work_when_the_network_runs(tmp_path, image_path, tiny_weights,
                                                                           monkeypatch):
    # was refused only after the image was read and interpolated (~2 s), by the network's loading thread: an
    # unreadable -p file shows which check comes first
    _without_gpu(monkeypatch)
    kp = _table(tmp_path / "kp.csv", _good_rows())
    not_an_image = tmp_path / "not_an_image.nii.gz"
    not_an_image.write_bytes(b"not an image")
    out = tmp_path / "o"
    for device in ("cuda", "cuda:1", "CUDA"):
        _assert_clean_error(_invoke(["infer", "-p", str(not_an_image), "-k", str(kp), "-o", str(out), "-d", device,
                                     "-w", str(tiny_weights), "--refine"]), out, "expected a CUDA GPU for device")


def test_cuda_without_gpu_is_accepted_without_refinement(tmp_path, image_path, monkeypatch):
    # with --no-refine no network runs and nothing needs a GPU: -d cuda was refused, now it is a warning
    _without_gpu(monkeypatch)
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    with pytest.warns(UserWarning, match=r"^-d/--device cuda has no effect without network refinement"):
        res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "-d", "cuda", "--no-refine",
                       "-f", "npz", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and not summary["refined"]


def test_tps3d_too_many_keypoints_is_refused_before_allocating(tmp_path, image_path):
    rng = np.random.default_rng(3)
    n = 40000
    pts = np.stack([rng.uniform(0, s - 1, n) for s in SHAPE], axis=1)
    pts = np.unique(np.round(pts, 3), axis=0)
    rows = np.hstack([pts, np.zeros_like(pts)])
    kp = tmp_path / "kp.csv"
    np.savetxt(kp, rows, delimiter=",", header="x,y,z,dx,dy,dz", comments="")
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "tps3d", "-o", str(out),
                                 "--no-refine"]), out, "GB")


def test_refine_without_weights_says_so(tmp_path, image_path, no_default_weights):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(out), "--refine"]),
                        out, "weights")


def test_rerun_into_same_folder_removes_earlier_outputs(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out), "--save-inverse",
                   "-q"])
    assert res.exit_code == 0, res.output
    (out / "notes.txt").write_text("mine")  # not a brainshift output: must survive
    (out / "initial_disp_field.h5.bak").write_text("mine")  # named like an output: must survive too
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "tps", "--no-refine", "-o", str(out),
                   "-f", "npz", "-q"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["initial_disp_field.h5.bak", "initial_disp_field.npz",
                                                     "notes.txt", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["outputs"] == ["initial_disp_field.npz", "summary.json"]


def test_a_users_file_at_an_output_path_is_never_overwritten(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    out.mkdir()
    (out / "initial_disp_field.h5").write_bytes(b"my field")  # no summary.json: brainshift did not write it
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out), "-q"])
    _assert_clean_error(res, tmp_path / "none", "initial_disp_field.h5", "did not write")
    assert sorted(p.name for p in out.iterdir()) == ["initial_disp_field.h5"]
    assert (out / "initial_disp_field.h5").read_bytes() == b"my field"


def test_a_directory_at_an_output_path_is_an_error(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    (out / "summary.json").mkdir(parents=True)
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out), "-q"])
    _assert_clean_error(res, tmp_path / "none", "summary.json")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]


def test_absurd_displacements_are_refused(tmp_path, image_path):
    rows = _good_rows()
    rows[3, 3:] = [1e30, 0, 0]
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out), "-q"])
    _assert_clean_error(res, out, "--max-displacement", "line 5 of kp.csv")


def test_output_below_an_existing_file_fails_before_any_work(tmp_path, image_path, monkeypatch):
    import brainshift.compensate as compensate_module

    def _never(*a, **k):
        raise AssertionError("no interpolation may run when -o is unusable")

    monkeypatch.setattr(compensate_module, "interpolate_keypoints", _never)
    kp = _table(tmp_path / "kp.csv", _good_rows())
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(blocker / "sub")])
    _assert_clean_error(res, blocker / "sub", "directory", "existing file")


def test_intraop_markups_with_a_table_is_refused(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--kpt-intraop", str(kp), "--no-refine",
                   "-o", str(out)])
    _assert_clean_error(res, out, "--kpt-intraop only with Slicer markups")


def test_unknown_interpolator_names_the_option_and_every_choice(tmp_path, image_path):
    # the message listed ['linear', 'tps', 'tps3d'] without 'atlas' and without the option's name
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "cubic", "--no-refine",
                                 "-o", str(out)]), out, "expected -m/--interp_mode one of", "'atlas'", "got 'cubic'")


def test_intraop_markups_without_preop_markups_is_refused(tmp_path, image_path):
    # without -k it said "got neither"; with -i it was silently ignored
    mk = tmp_path / "intra.mrk.json"
    mk.write_text('{"markups": [{"coordinateSystem": "RAS", "controlPoints": [{"position": [0, 0, 0]}]}]}')
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "--kpt-intraop", str(mk), "--no-refine",
                                 "-o", str(out)]), out, "got only --kpt-intraop")
    field = tmp_path / "f.npz"
    np.savez(field, field=np.zeros((3, *SHAPE), np.float32), affine=nib.load(image_path).affine)
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-i", str(field), "--kpt-intraop", str(mk),
                                 "--no-refine", "-o", str(out)]), out, "--kpt-intraop intra.mrk.json without -k")


def test_unknown_device_is_refused_even_without_refinement(tmp_path, image_path):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "o"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-d", "tpu", "--no-refine",
                                 "-o", str(out)]), out, "tpu")


def test_default_run_refines_with_the_default_model(tmp_path, image_path, tiny_default_weights):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    # the network alone (--no-safeguards: the safeguards always run both mirrored passes)
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "o"), "-q", "-f", "npz",
                   "--no-safeguards"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["refined"] is True and summary["inputs"]["weights"] == str(tiny_default_weights)
    assert summary["network"]["mirror_average"] is False  # the tiny model was not trained with mirroring
    assert (tmp_path / "o" / "corrected_disp_field.npz").is_file()
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "m"), "-q", "-f", "npz",
                   "--mirror-average", "--no-safeguards"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["network"]["mirror_average"] is True
    assert summary["network"]["min_field_rms_mm"] == 0.0  # the tiny model records no scale normalisation floor
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "s"), "-q", "-f", "npz",
                   "--min-field-rms", "3", "--no-safeguards"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["network"]["min_field_rms_mm"] == 3.0
    assert summary["network"]["field_scale"] == 1.0
    for bad in ("-1", "nan", "inf"):
        _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "n"), "-q",
                                     "--min-field-rms", bad]), tmp_path / "n", "--min-field-rms a finite number")
    plain = np.load(tmp_path / "o" / "corrected_disp_field.npz")
    mirrored = np.load(tmp_path / "m" / "corrected_disp_field.npz")
    assert not np.array_equal(plain[plain.files[0]], mirrored[mirrored.files[0]])  # a different (averaged) field
    # --no-refine still gives the classical field only
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "c"), "-q", "-f", "npz",
                   "--no-refine"])
    assert res.exit_code == 0 and json.loads((tmp_path / "c" / "summary.json").read_text())["refined"] is False
    with pytest.warns(UserWarning, match="--mirror-average has no effect"):
        res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "n"), "-q", "-f", "npz",
                       "--no-refine", "--mirror-average"])
    assert res.exit_code == 0, res.output
    # an initial field without keypoints: the network runs, unchecked, and infer says so
    np.savez(tmp_path / "init.npz", field=np.zeros((3, *SHAPE), np.float32), affine=nib.load(image_path).affine)
    with pytest.warns(UserWarning, match="safeguards .* need keypoints"):
        res = _invoke(["infer", "-p", str(image_path), "-i", str(tmp_path / "init.npz"), "-o", str(tmp_path / "i"),
                       "-q", "-f", "npz"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "i" / "summary.json").read_text())["refined"] is True


def test_default_without_weights_says_it_does_not_refine(tmp_path, image_path, no_default_weights):
    kp = _table(tmp_path / "kp.csv", _good_rows())
    with pytest.warns(UserWarning, match="no network weights"):
        res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["refined"] is False


def test_refined_infer_records_safeguards_and_writes_uncertainty(tmp_path, image_path, tiny_default_weights):
    """With keypoints the refinement runs under the safeguards: summary.json records alpha and the keypoint
    residuals, the refined field honours the keypoints at least as well as the initial one (+0.05 mm), and
    --save-uncertainty writes a non-negative scalar map on the preop grid."""
    kp = _table(tmp_path / "kp.csv", _good_rows(n=16))
    out = tmp_path / "out"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "tps", "--refine", "-o", str(out),
                   "-f", "npz", "--save-uncertainty"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    sg = summary["safeguards"]
    assert 0.0 <= sg["alpha"] <= 1.0 and sg["folds"] >= 2
    # the folds' rule and kNNDM's choice among its candidates (blocks: as many clusters as folds; random: 16)
    assert sg["fold_rule"] == "knndm" and sg["folds"] <= sg["fold_clusters"] <= 16 and sg["fold_w_mm"] >= 0.0
    assert sg["keypoint_residual_mean_mm"] <= sg["keypoint_residual_mean_mm_before"] + 1e-6
    unc = nib.load(str(out / "uncertainty_mm.nii.gz"))
    assert unc.shape == SHAPE and np.all(np.asarray(unc.dataobj) >= 0)
    np.testing.assert_allclose(unc.affine, nib.load(str(image_path)).affine, atol=1e-6)
    assert "uncertainty_mm.nii.gz" in summary["outputs"]
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "tps", "--refine", "-o", str(out),
                   "-f", "npz", "--no-safeguards"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["safeguards"] is None and not (out / "uncertainty_mm.nii.gz").exists()


def test_initial_field_with_keypoints_runs_under_the_safeguards(tmp_path, image_path, tiny_default_weights):
    """-i with -k (README, the -i row): the given field is refined and the keypoints drive the safeguards (folds,
    alpha, the consistency guard); the output honours the keypoints within the initial field's residual + 0.05 mm.
    -m atlas makes its own initial field, so -i with it is refused; --tps-lam has nothing to tune with -i."""
    from brainshift.model.safeguards import keypoint_residuals_mm

    rows = _good_rows(n=16)
    kp = _table(tmp_path / "kp.csv", rows)
    affine = nib.load(image_path).affine
    init = np.zeros((3, *SHAPE), np.float32)
    init[0] += 0.4  # a given field that misses the keypoints' affine shift
    np.savez(tmp_path / "init.npz", field=init, affine=affine)
    out = tmp_path / "out"
    res = _invoke(["infer", "-p", str(image_path), "-i", str(tmp_path / "init.npz"), "-k", str(kp), "-o", str(out),
                   "-q", "-f", "npz"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    sg = summary["safeguards"]
    assert sg is not None and sg["n_keypoints"] == 16 and sg["folds"] >= 2 and "consistency_guard" in sg
    assert summary["keypoint_count"] == 16
    refined = np.load(out / "corrected_disp_field.npz")
    refined = refined[refined.files[0]]
    pts, d = rows[:, :3], rows[:, 3:]
    r_init = keypoint_residuals_mm(init, pts, d, affine).mean()
    assert r_init > 0.3
    assert keypoint_residuals_mm(refined, pts, d, affine).mean() <= r_init + 0.05
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-i", str(tmp_path / "init.npz"), "-k", str(kp),
                                 "-m", "atlas", "--atlas", str(tmp_path), "-o", str(tmp_path / "a"), "-q"]),
                        tmp_path / "a", "no initial field (-i) with -m atlas")
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-i", str(tmp_path / "init.npz"), "-k", str(kp),
                                 "--tps-lam", "0.5", "-o", str(tmp_path / "t"), "-q"]),
                        tmp_path / "t", "without an initial field (-i) for --tps-lam")


def test_sheared_image_is_refused_for_itk_and_nifti_outputs_but_not_npz(tmp_path):
    """ITK directions are orthonormal: a sheared grid cannot be written so that every reader agrees, so .h5 and
    .nii outputs are refused before any work, with one line; .npz keeps the exact affine."""
    data = np.random.default_rng(0).random(SHAPE).astype(np.float32) + 0.1
    affine = np.diag([1.0, 1.0, 1.5, 1.0])
    affine[0, 2] = 0.3  # the k axis leans along x: a gantry-tilt-like shear
    path = tmp_path / "sheared.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    kp = _table(tmp_path / "kp.csv", _good_rows())
    out = tmp_path / "out"
    _assert_clean_error(_invoke(["infer", "-p", str(path), "-k", str(kp), "-o", str(out), "--no-refine"]), out,
                        "orthogonal voxel axes")
    res = _invoke(["infer", "-p", str(path), "-k", str(kp), "-o", str(out), "--no-refine", "-f", "npz"])
    assert res.exit_code == 0, res.output


def test_tps_lam_cv_chooses_the_ridge_and_a_number_sets_it(tmp_path, image_path):
    """--tps-lam cv runs choose_tps_lam over the keypoints (recorded in summary.json) and its field is the tps of
    that ridge; --tps-lam 0 gives the exact spline, which reproduces the keypoints' affine field at a keypoint."""
    from brainshift.interpolate.tps import choose_tps_lam
    from brainshift.io.fields import read_field

    rng = np.random.default_rng(3)
    rows = _good_rows(30, seed=4)
    rows[:, 3:] += rng.normal(0.0, 0.3, size=(30, 3))  # noisy: the cross-validation prefers some smoothing
    kp = _table(tmp_path / "kp.csv", rows)
    out = tmp_path / "cv"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "--tps-lam", "cv", "-f", "npz",
                   "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    img = nib.load(str(image_path))
    lam, rmse = choose_tps_lam(rows[:, :3], rows[:, 3:], SHAPE, img.affine)
    assert summary["interpolation_options"]["lam"] == pytest.approx(lam)
    assert set(summary["tps_lam_cv_rmse_mm"]) == {f"{k:g}" for k in rmse}
    fixed = tmp_path / "fixed"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "--tps-lam", f"{lam!r}",
                   "-f", "npz", "-o", str(fixed), "-q"])
    assert res.exit_code == 0, res.output
    a, _ = read_field(out / "initial_disp_field.npz")
    b, _ = read_field(fixed / "initial_disp_field.npz")
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert "tps_lam_cv_rmse_mm" not in json.loads((fixed / "summary.json").read_text())


@pytest.mark.parametrize(("args", "fragment"), [
    (["--tps-lam", "-1"], "number >= 0"),
    (["--tps-lam", "abc"], "number >= 0"),
    (["--tps-lam", "cv", "-m", "linear"], "only with -m tps"),
    (["--tps-lam", "cv"], "at least 20 keypoints"),
])
def test_bad_tps_lam_is_refused(tmp_path, image_path, args, fragment):
    kp = _table(tmp_path / "kp.csv", _good_rows(12))
    out = tmp_path / "out"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(out), "-q", *args])
    _assert_clean_error(res, out, fragment)


def test_clustered_keypoints_with_a_spline_warn_and_record_their_extent(tmp_path, image_path):
    """Keypoints from one small region: -m tps warns (use linear) and summary.json records the hull fraction;
    keypoints spread over the image do not warn; -m linear never does."""
    rng = np.random.default_rng(3)
    pts = np.array([10.0, 12.0, 8.0]) + rng.uniform(0, 3, size=(8, 3))
    clustered = _table(tmp_path / "clustered.csv", np.hstack([pts, np.tile([0.5, -0.2, 0.1], (8, 1))]))
    with pytest.warns(UserWarning, match="-m linear"):
        res = _invoke(["infer", "-p", str(image_path), "-k", str(clustered), "-m", "tps", "--no-refine",
                       "-o", str(tmp_path / "c_tps"), "-f", "npz", "-q"])
    assert res.exit_code == 0, res.output
    frac = json.loads((tmp_path / "c_tps" / "summary.json").read_text())["keypoint_hull_fraction"]
    assert 0.0 < frac < 27.0 / (22 * 28 * 20)  # inside a 3-voxel cube of the 22 x 28 x 20 foreground
    spread = _table(tmp_path / "spread.csv", _good_rows())
    import warnings

    for kp, method, name in ((spread, "tps", "s_tps"), (clustered, "linear", "c_lin")):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*keypoints span.*")
            res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", method, "--no-refine",
                           "-o", str(tmp_path / name), "-f", "npz", "-q"])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s_tps" / "summary.json").read_text())["keypoint_hull_fraction"] > 0.04
    # the default -m auto interpolates the clustered keypoints linearly (no warning) and the spread ones with tps
    for kp, want, name in ((clustered, "linear", "c_auto"), (spread, "tps", "s_auto")):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*keypoints span.*")
            res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "-o", str(tmp_path / name),
                           "-f", "npz", "-q"])
        assert res.exit_code == 0, res.output
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["interpolation"] == want and summary["interpolator_choice"]["chosen"] == want
        assert (summary["interpolator_choice"]["keypoint_hull_fraction"] < 0.04) == (want == "linear")


def test_tps_lam_cv_with_auto_choosing_linear_tunes_no_ridge(tmp_path, image_path):
    """--tps-lam cv under -m auto: keypoints clustered in one region make auto take linear, so no ridge is chosen
    or recorded (and fewer than 20 keypoints are then no error)."""
    rng = np.random.default_rng(5)
    for n in (24, 8):
        pts = np.array([10.0, 12.0, 8.0]) + rng.uniform(0, 3, size=(n, 3))
        kp = _table(tmp_path / f"clustered{n}.csv", np.hstack([pts, np.tile([0.5, -0.2, 0.1], (n, 1))]))
        out = tmp_path / f"c{n}"
        with pytest.warns(UserWarning, match="--tps-lam cv not used"):
            res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "--tps-lam", "cv", "-f",
                           "npz", "-o", str(out), "-q"])
        assert res.exit_code == 0, res.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["interpolation"] == "linear"
        assert "tps_lam_cv_rmse_mm" not in summary and "interpolation_options" not in summary


@pytest.mark.parametrize("lam", ["cv", "0.5"])
def test_tps_lam_left_unused_by_auto_is_said_on_stderr_and_in_the_summary(tmp_path, image_path, lam):
    """--tps-lam with -m auto choosing linear (keypoints in one region): the run goes on as linear, as before, but
    says so in one warning line and records it under interpolator_choice.tps_lam (it was silently ignored)."""
    import warnings

    from brainshift.cli.app import format_warning

    rng = np.random.default_rng(5)
    pts = np.array([10.0, 12.0, 8.0]) + rng.uniform(0, 3, size=(24, 3))
    kp = _table(tmp_path / "clustered.csv", np.hstack([pts, np.tile([0.5, -0.2, 0.1], (24, 1))]))
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "--no-refine", "--tps-lam", lam, "-f", "npz",
                       "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    notes = [format_warning(w.message, w.category, w.filename, w.lineno) for w in caught
             if str(w.message).startswith("--tps-lam")]
    assert len(notes) == 1 and notes[0].count("\n") == 1, notes  # one "warning: ..." line, as the CLI prints it
    assert notes[0].startswith(f"warning: --tps-lam {lam} not used: -m auto chose linear (keypoints clustered")
    assert "which has no ridge" in notes[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interpolation"] == "linear" and "interpolation_options" not in summary
    record = summary["interpolator_choice"]["tps_lam"]
    assert record["used"] is False and record["given"] == ("cv" if lam == "cv" else 0.5)
    assert record["reason"].startswith("-m auto chose linear")


def test_a_model_with_a_keypoint_channel_runs_with_keypoints_and_refuses_a_field_alone(tmp_path, image_path):
    """A model trained with the keypoint channel (NetworkConfig.keypoint_channel) gets the keypoints from -k under
    the safeguards; -i without -k gives it nothing to build the channel from: one clear error, no output."""
    from tests.conftest import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "kp.safetensors", keypoint_channel="proximity")
    kp = _table(tmp_path / "kp.csv", _good_rows(n=16))
    out = tmp_path / "out"
    res = _invoke(["infer", "-p", str(image_path), "-k", str(kp), "-m", "tps", "-w", str(weights), "--refine",
                   "-o", str(out), "-q", "-f", "npz"])
    assert res.exit_code == 0, res.output
    sg = json.loads((out / "summary.json").read_text())["safeguards"]
    assert sg is not None and sg["n_keypoints"] == 16
    affine = nib.load(image_path).affine
    np.savez(tmp_path / "init.npz", field=np.zeros((3, *SHAPE), np.float32), affine=affine)
    out2 = tmp_path / "out2"
    _assert_clean_error(_invoke(["infer", "-p", str(image_path), "-i", str(tmp_path / "init.npz"), "-w", str(weights),
                                 "--refine", "-o", str(out2)]), out2, "expected keypoints (-k)")


def test_keypoints_mostly_on_the_background_warn_of_the_frame(tmp_path, image_path):
    """More than half of the keypoints on the image background (intensity at its minimum: here the slabs i < 2 and,
    for a spread table, none) is the usual sign of a frame mix-up (--coords): one warning naming it; a table with
    a few such points does not warn. The console names what the safeguards did."""
    import warnings

    rows = _good_rows(12)
    rows[:7, 0] = np.random.default_rng(5).uniform(0, 1.4, 7)  # 7 of 12 on the background slab i in {0, 1}
    bad = _table(tmp_path / "bad.csv", rows)
    with pytest.warns(UserWarning, match=r"7 of 12 keypoints lie on the image background.*--coords"):
        res = _invoke(["infer", "-p", str(image_path), "-k", str(bad), "-o", str(tmp_path / "b"), "-f", "npz",
                       "--no-refine"])
    assert res.exit_code == 0, res.output
    rows[5:7, 0] = 6.0  # 5 of 12: a share that points on the brain's surface can have
    fine = _table(tmp_path / "fine.csv", rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*image background.*")
        res = _invoke(["infer", "-p", str(image_path), "-k", str(fine), "-o", str(tmp_path / "f"), "-f", "npz"])
    assert res.exit_code == 0, res.output
    assert "safeguards: kept " in res.output and "of the network's correction" in res.output
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    beta = summary["safeguards"]["beta"]
    assert f"beta {beta:.2f} (how closely the output honours the keypoints" in res.output
    # the network grid as used: RAS axes, not framed (this image has no background beyond the margin)
    grid = summary["network"]["grid"]
    assert grid["axes"] == "RAS" and grid["framed_on_region"] is False and len(grid["shape"]) == 3
    assert "network_grid" not in summary["safeguards"]  # recorded once
