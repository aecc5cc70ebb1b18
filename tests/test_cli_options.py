"""Option values the command line refuses before any work: one line, exit code 2, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [
    ["demo", "--quick"],
    ["evaluate", "--data", "nowhere", "--methods", "linear"],
    ["simulate", "--demo"],
    ["simulate-batch", "--subjects", "1", "--cases-per-subject", "1"],
    ["train", "--data", "nowhere"],
])
def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, command):
    # numpy's seed sequences take only non-negative integers: -1 was a ValueError traceback from numpy
    out = tmp_path / "out"
    out_option = ["--save-dir" if command[0] == "train" else "-o", str(out)]
    res = runner.invoke(app, [*command, *out_option, "--seed", "-1"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: Invalid value for '--seed'") and "greater than or equal to 0" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_demo_refuses_a_resolution_that_is_not_a_positive_number_at_once(tmp_path, value):
    # 0, -3 and nan were refused by the simulator only after the subject's synthesis; inf passed its check
    out = tmp_path / "out"
    res = runner.invoke(app, ["demo", "-o", str(out), "--resolution", value, "--no-atlas"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected --resolution > 0 (mm, the simulation's element edge), got")
    assert len(res.output.splitlines()) == 1 and not out.exists()


def _mask_case(tmp_path, values):
    """A 32^3 image of four 3 mm Gaussian blobs (two in each half along i) and a mask of the first half with
    ``values`` (outside, inside[, the first 4 slices]), 1 mm grid."""
    import nibabel as nib

    grid = np.indices((32, 32, 32)).astype(np.float64)
    image = np.full((32, 32, 32), 0.5)
    for c, a in (((8, 10, 12), 1.0), ((9, 22, 20), -0.8), ((24, 12, 14), 1.2), ((22, 22, 22), 0.9)):
        image += a * np.exp(-sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True)) / (2 * 3.0 ** 2))
    mask = np.full(image.shape, values[0], np.int16)
    mask[:16] = values[1]
    if len(values) > 2:
        mask[:4] = values[2]
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "mask.nii.gz")
    return tmp_path / "image.nii.gz", tmp_path / "mask.nii.gz"


@pytest.mark.parametrize("command", ["register", "keypoints"])
def test_a_mask_with_negative_values_is_refused_by_register_and_keypoints_alike(tmp_path, command):
    # register took mask > 0 (a -1 voxel outside), keypoints mask != 0 (inside): one rule now, negatives refused
    image, mask = _mask_case(tmp_path, (0, 1, -1))
    out = tmp_path / "out"
    args = (["register", "-p", str(image), "-t", str(image), "--no-refine", "-q", "-o", str(out)]
            if command == "register" else ["keypoints", str(image), "-o", str(out / "kp")])
    res = runner.invoke(app, [*args, "--mask", str(mask)])
    assert res.exit_code == 2, res.output
    assert res.output == (f"error: expected a mask {str(mask)!r} (--mask) of non-negative values (nonzero = inside), "
                          f"got 4096 negative voxels (down to -1); a signed image rather than a mask?\n")
    assert not out.exists()


def test_a_mask_of_zeros_and_twos_is_the_mask_of_zeros_and_ones_in_register_and_keypoints(tmp_path):
    from brainshift.io.images import read_image
    from brainshift.keypoints.detect import _mask_array
    from brainshift.register import _check_inputs

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    image, ones = _mask_case(tmp_path / "a", (0, 1))
    _, twos = _mask_case(tmp_path / "b", (0, 2))
    vol, m1, m2 = read_image(image), read_image(ones, kind="label"), read_image(twos, kind="label")
    # the two commands' binarisations (register's brain mask, keypoints' region) agree on both masks
    for binarise in (lambda m: _check_inputs(vol, vol, m), lambda m: _mask_array(vol, m)):
        np.testing.assert_array_equal(binarise(m2), binarise(m1))
        assert binarise(m2)[:16].all() and not binarise(m2)[16:].any()
    # and so does the keypoints command's output
    outputs = []
    for mask in (ones, twos):
        res = runner.invoke(app, ["keypoints", str(image), "--mask", str(mask), "--border-mm", "0", "-o",
                                  str(mask.parent / "kp")])
        assert res.exit_code == 0, res.output
        outputs.append((mask.parent / "kp.csv").read_text())
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) == 2 + 2  # the two blobs in the mask


@pytest.mark.parametrize("args, reached", [
    # each command gets upper-case choices and a missing input: the error is the input's, so the choices passed
    (["register", "-p", "{missing}", "-t", "{missing}", "-m", "TPS", "-f", "NII", "-d", "CPU"],
     "expected an existing image file"),  # -m TPS was refused while -f NII was accepted
    (["evaluate", "--data", "{missing}", "--methods", "LINEAR,Net-TPS", "-d", "CPU"], "expected a dataset folder"),
    (["train", "--data", "{missing}", "-d", "CPU"], "expected a dataset folder"),  # -d CPU was refused
    (["simulate", "--image", "{missing}", "--brain-mask", "{missing}", "--tumour", "{missing}", "--material",
      "Neo-Hookean"], "expected an existing image file"),  # --material Neo-Hookean was refused
    (["evaluate-landmarks", "--preop-landmarks", "{missing}", "--field", "{missing}", "--frame", "LPS"],
     "expected an existing displacement field file"),
])
def test_choice_options_are_accepted_in_any_case_by_every_command(tmp_path, args, reached):
    missing = str(tmp_path / "missing.nii.gz")
    out = tmp_path / "out"
    out_option = [] if args[0] == "evaluate-landmarks" else ["--save-dir" if args[0] == "train" else "-o", str(out)]
    res = runner.invoke(app, [a.replace("{missing}", missing) for a in args] + out_option)
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {reached}"), res.output
    assert not out.exists()


def test_infer_accepts_upper_case_choices_and_writes_what_lower_case_writes(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((16, 16, 16)).astype(np.float32), np.eye(4)), tmp_path / "pre.nii.gz")
    pts = rng.uniform(2, 13, size=(24, 3))
    rows = np.hstack([pts, 0.05 * pts - 0.3])
    np.savetxt(tmp_path / "k.csv", rows, delimiter=",", header="x,y,z,dx,dy,dz", comments="")
    fields = []
    for name, choices in (("lower", ["tps", "npz", "voxel", "cpu", "cv"]), ("upper", ["TPS", "NPZ", "VOXEL", "CPU",
                                                                                      "CV"])):
        m, f, coords, device, lam = choices
        res = runner.invoke(app, ["infer", "-p", str(tmp_path / "pre.nii.gz"), "-k", str(tmp_path / "k.csv"), "-m", m,
                                  "-f", f, "--coords", coords, "-d", device, "--tps-lam", lam, "--h5-dtype",
                                  "FLOAT64" if name == "upper" else "float64", "--no-refine", "-q", "-o",
                                  str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        with np.load(tmp_path / name / "initial_disp_field.npz") as z:
            fields.append(z["field"])
    np.testing.assert_array_equal(fields[0], fields[1])
