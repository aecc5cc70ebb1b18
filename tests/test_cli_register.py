"""Tests of ``brainshift register`` (CliRunner): outputs, their frames, and one-line errors that write nothing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from _register_pair import INTRAOP_AFFINE, make_pair, true_field
from brainshift.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("register")
    pre, intra = make_pair()
    nib.save(nib.Nifti1Image(pre, np.eye(4)), d / "preop.nii.gz")
    nib.save(nib.Nifti1Image(intra, INTRAOP_AFFINE), d / "intraop.nii.gz")
    nib.save(nib.Nifti1Image(np.ones(pre.shape, np.uint8), np.eye(4)), d / "mask.nii.gz")  # texture everywhere
    return d


def _run(*args):
    return runner.invoke(app, ["register", *map(str, args)])


def test_register_writes_matches_fields_summary_and_report(images, tmp_path):
    out = tmp_path / "out"
    r = _run("-p", images / "preop.nii.gz", "-t", images / "intraop.nii.gz", "--mask", images / "mask.nii.gz",
             "-m", "tps", "--no-refine",
             "-f", "npz", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert {"matches.csv", "initial_disp_field.npz", "report.html", "fig_matches.png", "summary.json"} <= set(
        summary["outputs"])
    assert "corrected_disp_field.npz" not in summary["outputs"] and not summary["refined"]
    m = summary["matching"]
    assert m["inliers"] >= 30 and m["inliers"] <= m["candidate_matches"] and 0 < m["inlier_ratio"] <= 1
    # matches.csv: preop voxel frame; dx,dy,dz agree with the known field (computed from true_field)
    table = np.genfromtxt(out / "matches.csv", delimiter=",", names=True, comments="#")
    pts = np.column_stack([table["x"], table["y"], table["z"]])
    disps = np.column_stack([table["dx"], table["dy"], table["dz"]])
    assert len(pts) == m["interpolated"]
    assert (np.linalg.norm(disps - true_field(pts.T).T, axis=1) < 1.0).mean() >= 0.9
    # the intraop columns are the same matches in intraop voxel indices: A_intra q = preop point + d (world mm)
    q = np.column_stack([table["x_intraop"], table["y_intraop"], table["z_intraop"]])
    np.testing.assert_allclose(q @ INTRAOP_AFFINE[:3, :3].T + INTRAOP_AFFINE[:3, 3], pts + disps, atol=1e-3)
    with np.load(out / "initial_disp_field.npz") as f:
        assert f["field"].shape == (3, 64, 64, 64)
    page = (out / "report.html").read_text()
    assert "fig_matches.png" in page and "fig_compare.png" in page and "inliers" in page
    # the Files list names every file written (the fields and summary.json were missing), linked
    files = page.split("<h2>Files</h2>")[1].split("</ul>")[0]
    import re

    listed = re.findall(r'<a href="([^"]+)">', files)
    assert listed == ["matches.csv", "initial_disp_field.npz", "summary.json", "fig_matches.png", "fig_compare.png",
                      "fig_field.png"]
    assert set(listed) | {"report.html"} == set(summary["outputs"])
    # the difference images are shown only inside the brain, and the caption says why
    assert "The differences are shown only inside the brain" in page


@pytest.mark.parametrize("case", ["no-overlap", "not-3d", "too-few"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(images, tmp_path, case):
    pre, intra = make_pair()
    bad = tmp_path / "bad.nii.gz"
    if case == "no-overlap":
        far = INTRAOP_AFFINE.copy()
        far[:3, 3] += 1000.0
        nib.save(nib.Nifti1Image(intra, far), bad)
        expected = "expected images that overlap in world space"
    elif case == "not-3d":
        nib.save(nib.Nifti1Image(np.stack([intra, intra], axis=-1), INTRAOP_AFFINE), bad)
        expected = "expected a 3-D image"
    else:  # a 3-voxel ramp: contrast, but no blob-like keypoint to match
        ramp = np.broadcast_to(np.linspace(0, 1, 60, dtype=np.float32), (62, 60, 60)).copy()
        nib.save(nib.Nifti1Image(ramp, INTRAOP_AFFINE), bad)
        expected = "inlier matches, need at least 4"
    out = tmp_path / "out"
    r = _run("-p", images / "preop.nii.gz", "-t", bad, "--mask", images / "mask.nii.gz", "--no-refine", "-o", out,
             "-q")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], r.output
    assert not out.exists()


@pytest.mark.slow  # ~13 s CPU, 30+ s on the loaded 2-core machine (the safeguards' network passes)
def test_refine_writes_the_corrected_field_and_safeguards(images, tmp_path, tiny_weights):
    w = tiny_weights
    out = tmp_path / "out"
    r = _run("-p", images / "preop.nii.gz", "-t", images / "intraop.nii.gz", "--mask", images / "mask.nii.gz",
             "-m", "linear", "-w", w, "-f", "nii", "--no-report", "-o", out, "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refined"] and summary["safeguards"] is not None
    assert set(summary["outputs"]) == {"matches.csv", "initial_disp_field.nii.gz", "corrected_disp_field.nii.gz",
                                       "summary.json"}


def test_an_empty_mask_is_named_and_writes_nothing(images, tmp_path):
    """An empty --mask said "expected a non-empty brain mask, got no voxel inside" without naming the file."""
    pre, _ = make_pair()
    nib.save(nib.Nifti1Image(np.zeros(pre.shape, np.uint8), np.eye(4)), tmp_path / "empty.nii.gz")
    out = tmp_path / "out"
    r = _run("-p", images / "preop.nii.gz", "-t", images / "intraop.nii.gz", "--mask", tmp_path / "empty.nii.gz",
             "--no-refine", "-o", out, "-q")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "with at least one voxel inside (nonzero), got none" in lines[0], r.output
    assert "empty.nii.gz" in lines[0]
    assert not out.exists()


def test_an_rgb_intraop_image_is_one_line_error(images, tmp_path):
    """A colour NIfTI (RGB records per voxel) was a TypeError traceback in the cast to float32."""
    rgb = np.zeros((20, 20, 20), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    out = tmp_path / "out"
    r = _run("-p", images / "preop.nii.gz", "-t", tmp_path / "rgb.nii.gz", "--no-refine", "-o", out, "-q")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "expected a scalar image (one real number per voxel)" in lines[0], r.output
    assert not out.exists()


def test_cuda_without_gpu_is_refused_before_any_work_only_when_the_network_runs(images, tmp_path, tiny_weights,
                                                                                 monkeypatch):
    """-d cuda on a machine without a GPU: with refinement, refused before the images are read (it was refused by
    the network's loading thread after reading, detecting and matching); with --no-refine the device is unused and
    the run goes on (here to the unreadable -p file, which shows which check came first)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    not_an_image = tmp_path / "not_an_image.nii.gz"
    not_an_image.write_bytes(b"not an image")
    out = tmp_path / "out"
    for refine, expected in (("--refine", "expected a CUDA GPU for device 'cuda'"), ("--no-refine", "not_an_image")):
        r = _run("-p", not_an_image, "-t", images / "intraop.nii.gz", "-d", "cuda", "-w", tiny_weights, refine,
                 "-o", out, "-q")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and ("CUDA" in lines[0]) == (refine == "--refine"), r.output
        assert not out.exists()


def test_misspelt_device_is_refused_even_without_refinement(images, tmp_path):
    """A device name that no run could use (a typo) is refused up front, with or without refinement, as in infer."""
    out = tmp_path / "out"
    for refine in ("--refine", "--no-refine"):
        r = _run("-p", images / "preop.nii.gz", "-t", images / "intraop.nii.gz", "-d", "cdua", refine, "-o", out,
                 "-q")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "expected device 'auto', 'cpu' or 'cuda[:N]', got 'cdua'" in lines[0], r.output
        assert not out.exists()
