"""``brainshift demo`` (brainshift.demo): the quick path end to end, with and without a network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.demo import NO_MODEL_NOTE, format_table, run_demo
from brainshift.errors import InputFileError
from brainshift.evaluate.case_report import FIGURES
from brainshift.io.fields import read_field
from brainshift.io.images import read_image
from brainshift.io.keypoints import read_keypoint_table
from brainshift.simulate.analytic import analytic_sag_field
from brainshift.simulate.template import load_mni152

METRICS = ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "pct_jacobian_nonpositive", "time_s")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import brainshift.resources as resources

    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:  # the classical-only demo (no default model)
        mp.setattr(resources, "DEFAULT_WEIGHTS", out.parent / "absent.safetensors")
        rows = run_demo(out, seed=1, quick=True, verbose=False)
    return out, rows


def test_quick_demo_rows_have_finite_metrics_and_beat_no_correction(quick_run):
    out, rows = quick_run
    by = {r["method"]: r for r in rows}
    assert list(by) == ["none", "linear", "tps", "atlas"]
    for method in ("linear", "tps", "atlas"):
        for m in (*METRICS, "kp_residual_mm"):
            assert math.isfinite(by[method][m]), (method, m)
        assert by[method]["n_keypoints"] == 20 and by[method]["n_heldout"] >= 20
        # interpolating 20 exact keypoints must beat leaving the tissue where it was
        assert by[method]["mse_mm2"] < by["none"]["mse_mm2"]
    # the 'none' residual is the keypoints' own mean displacement; linear interpolation honours them exactly and
    # the atlas (fit + spline of its residuals) nearly: the analytic sag field is no member of the atlas
    assert by["none"]["kp_residual_mm"] > 0.2
    assert by["linear"]["kp_residual_mm"] < 0.05 and by["atlas"]["kp_residual_mm"] < 0.3 * by["none"]["kp_residual_mm"]
    # the zero field's error is the ground truth itself: MSE = mean |u_gt|^2 > 0, no folding
    assert by["none"]["mse_mm2"] > 0 and by["none"]["pct_jacobian_nonpositive"] == 0.0


def test_quick_demo_writes_report_fields_images_and_keypoints(quick_run):
    out, rows = quick_run
    report = (out / "report.html").read_text()
    assert '<table id="metrics">' in report
    assert NO_MODEL_NOTE in report  # no weights shipped / given: said in the report
    for key, name in FIGURES.items():
        if key == "uncertainty":  # only with a network (the safeguards' uncertainty map)
            assert not (out / name).exists() and f'src="{name}"' not in report
            continue
        assert (out / name).stat().st_size > 1000
        assert f'src="{name}"' in report
    preop = read_image(out / "preop_t1.nii.gz")
    gt_h5, aff = read_field(out / "field_ground_truth.h5", reference=preop)
    gt_nii, _ = read_field(out / "field_ground_truth.nii.gz", reference=preop)
    np.testing.assert_allclose(gt_h5, gt_nii, atol=1e-4)
    for method in ("linear", "tps"):
        for ext in (".h5", ".nii.gz"):
            assert (out / f"field_{method}{ext}").is_file()
    best = min(rows[1:], key=lambda r: r["mse_mm2"])["method"]
    assert (out / f"preop_t1_warped_{best}.nii.gz").is_file()
    assert read_image(out / "intraop_t1_ground_truth.nii.gz").shape == preop.shape
    # the driving keypoints' displacements are the ground truth sampled at them (voxel frame)
    pts, disps = read_keypoint_table(out / "keypoints.csv", frame="voxel")
    from brainshift.keypoints import trilinear_sample

    np.testing.assert_allclose(trilinear_sample(gt_h5, pts), disps, atol=1e-4)
    assert len(pts) == 20
    # the linear field interpolates the keypoints exactly
    lin, _ = read_field(out / "field_linear.h5")
    np.testing.assert_allclose(trilinear_sample(lin, pts), disps, atol=0.05)
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["none", "linear", "tps", "atlas"]
    assert saved["rows"][1]["mse_mm2"] == pytest.approx(rows[1]["mse_mm2"])
    assert not list(out.glob(".*"))  # no temporary files left


def test_quick_demo_with_a_random_network_adds_refined_rows(tmp_path, tiny_default_weights):
    # the fast-small architecture on the quick case's own 3 mm grid, given explicitly
    rows = run_demo(tmp_path / "out", seed=2, quick=True, weights=tiny_default_weights, verbose=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["none", "linear", "tps", "atlas", "net-linear", "net-tps", "net-atlas"]
    for method in ("net-linear", "net-tps", "net-atlas"):
        for m in (*METRICS, "kp_residual_mm"):
            assert math.isfinite(by[method][m]), (method, m)
        # a refined method's time includes its initial interpolation (or atlas fit)
        assert by[method]["time_s"] >= by[method.removeprefix("net-")]["time_s"]
        # under the safeguards the refined field honours the keypoints (a spline of the residuals)
        assert by[method]["kp_residual_mm"] < 0.3 * by["none"]["kp_residual_mm"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["methods"] == list(by) and summary["metrics"]["net-atlas"]["mse_mm2"] == pytest.approx(
        by["net-atlas"]["mse_mm2"])
    # which model refined the net-* rows (a name that is the same on every machine, and the path), safeguards on,
    # and per refined method the safeguards' record as infer writes it (alpha, beta, the cross-validation)
    model = {"name": "default (shipped)", "weights": str(tiny_default_weights), "safeguards": True}
    assert summary["model"] == model
    assert list(summary["safeguards"]) == ["net-linear", "net-tps", "net-atlas"]
    for rec in summary["safeguards"].values():
        assert 0 <= rec["alpha"] <= 1 and 0 <= rec["beta"] <= 1 and rec["folds"] >= 2
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["model"] == model and saved["safeguards"] == summary["safeguards"]
    sg = summary["safeguards"]["net-tps"]
    assert saved["info"]["model"].startswith(
        f"default (shipped) ({tiny_default_weights}); safeguards on (alpha: share of the network's correction "
        f"kept, beta: how closely the keypoints are honoured): net-linear alpha ")
    assert f"net-tps alpha {sg['alpha']:.3g}, beta {sg['beta']:.3g}" in saved["info"]["model"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert NO_MODEL_NOTE not in report
    assert "<td>model</td><td>default (shipped) (" in report and "safeguards on" in report
    # the uncertainty figure says what it plots: sqrt(3) sigma in mm, sigma the per-component SD of the file
    assert "Plotted: sqrt(3)·σ in mm" in report and "<code>uncertainty_mm.nii.gz</code>, is sqrt(3)" in report
    assert "<td>net-tps</td>" in report
    # the refined methods run under the safeguards: the report shows their uncertainty map beside the error
    assert (tmp_path / "out" / FIGURES["uncertainty"]).stat().st_size > 1000
    assert f'src="{FIGURES["uncertainty"]}"' in report
    assert "<td>net-atlas</td>" in report
    for name in ("net-linear", "net-atlas"):
        net, _ = read_field(tmp_path / "out" / f"field_{name}.h5")
        assert np.isfinite(net).all()


def test_demo_missing_weights_is_an_error(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        run_demo(tmp_path / "out", quick=True, weights=tmp_path / "missing.safetensors", verbose=False)
    assert not (tmp_path / "out" / "report.html").exists()


def test_demo_uses_the_default_model_without_weights_option(tmp_path, tiny_default_weights):
    rows = run_demo(tmp_path / "out", seed=2, quick=True, verbose=False, atlas=False)
    assert [r["method"] for r in rows] == ["none", "linear", "tps", "net-linear", "net-tps"]
    assert not (tmp_path / "out" / "atlas").exists()
    assert NO_MODEL_NOTE not in (tmp_path / "out" / "report.html").read_text()


def test_demo_cli_quick_prints_table_and_note(tmp_path, no_default_weights):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "o"), "--seed", "3", "--no-atlas"])
    assert res.exit_code == 0, res.output
    assert "MSE mm^2" in res.output and "linear" in res.output and "tps" in res.output
    assert "kp res mm" in res.output and "atlas" not in res.output  # --no-atlas: no atlas built, no atlas rows
    assert NO_MODEL_NOTE in res.output
    assert (tmp_path / "o" / "report.html").is_file()
    bad = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "p"), "--weights",
                                   str(tmp_path / "nope.safetensors")])
    assert bad.exit_code == 2 and "not found" in bad.output
    # an unreadable atlas config is refused before any work, in one line
    bad = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "q"), "--atlas-config",
                                   str(tmp_path / "nope.yaml")])
    assert bad.exit_code == 2 and bad.output.startswith("error: expected a readable atlas config file")
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "q").exists()


def test_analytic_sag_field_peak_and_direction():
    _, brain = load_mni152()
    small = brain.resample_to_spacing(4.0)
    field, info = analytic_sag_field(small)
    world = np.einsum("ab,b...->a...", small.affine[:3, :3], field)
    mag = np.sqrt((world ** 2).sum(axis=0))
    # peak amplitude 8 mm at the craniotomy voxel, direction = the unit vector toward the centroid
    assert mag.max() == pytest.approx(8.0, rel=1e-5)
    peak = np.unravel_index(np.argmax(mag), mag.shape)
    np.testing.assert_allclose(world[(slice(None), *peak)] / 8.0, info["direction_ras"], atol=1e-5)
    assert info["direction_ras"][2] < 0  # toward the centroid from the superior convexity: downward


def test_format_table_lists_every_row():
    row = {"method": "linear", "mse_mm2": 1.0, "mae_mm": 0.5, "p95_mm": 2.0, "tre_mm": 0.7,
           "pct_jacobian_nonpositive": 0.0, "time_s": 0.25}
    text = format_table([row, {**row, "method": "net-linear", "kp_residual_mm": 0.125}])
    assert text.splitlines()[2].split()[:2] == ["linear", "1.000"]
    assert text.splitlines()[2].split()[-2] == "-"  # no keypoint residual in that row
    assert text.splitlines()[3].startswith("net-linear") and text.splitlines()[3].split()[-2] == "0.125"


@pytest.mark.slow
def test_full_demo_on_the_simulated_mni152_case(tmp_path):
    rows = run_demo(tmp_path / "full", seed=0, verbose=False)
    by = {r["method"]: r for r in rows}
    assert by["linear"]["mse_mm2"] < by["none"]["mse_mm2"]
    assert by["tps"]["mse_mm2"] < by["none"]["mse_mm2"]
    assert Path(tmp_path / "full" / "report.html").is_file()


@pytest.mark.filterwarnings("ignore:the inverse field's worst residual")  # the bump reaches the grid border
def test_coarse_inverse_field_inverts_a_smooth_field():
    from brainshift.io.fields import coarse_inverse_field, invert_field
    from brainshift.keypoints import trilinear_sample

    shape = (33, 29, 25)
    affine = np.diag([1.0, 1.2, 0.9, 1.0])
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    bump = np.exp(-((i - 16) ** 2 + (j - 14) ** 2 + (k - 12) ** 2) / 50.0)
    u = np.stack([1.5 * bump, -1.0 * bump, 0.8 * bump]).astype(np.float32)  # max |grad| ~ 0.26 < 1
    v = coarse_inverse_field(u, affine, factor=2)
    assert v.shape == u.shape and v.dtype == np.float32
    # p + u(p) + v(p + u(p)) = p inside the grid, to a small fraction of a voxel
    interior = (np.minimum(np.minimum(i, j), k) >= 3) & (i <= 29) & (j <= 25) & (k <= 21)
    p = np.argwhere((bump > 0.05) & interior).astype(np.float64)
    y = p + trilinear_sample(u, p)
    residual = np.linalg.norm(y + trilinear_sample(v, y) - p, axis=1)
    # measured: max 0.21, median 0.007 voxel for this sharp bump (sigma 5 voxels, up to 1.9 voxels); the exact
    # inversion gives max 0.04: the trilinear upsampling of the coarse inverse costs a fraction of a voxel
    assert residual.max() < 0.25 and np.median(residual) < 0.01
    assert float(np.linalg.norm(v, axis=0).max()) > 1.5  # it moves points back (|v| ~ |u|, up to 1.97 voxels)
    # factor 1 is invert_field itself
    np.testing.assert_array_equal(coarse_inverse_field(u, affine, factor=1), invert_field(u, affine))


def test_demo_outputs_are_one_set_with_a_manifest(quick_run, tmp_path):
    """The demo's files appear together with summary.json listing exactly them; a folder holding a user's file
    at an output path is refused before any work and left as it was."""
    from brainshift.errors import BrainshiftError

    out, _ = quick_run
    listed = set(json.loads((out / "summary.json").read_text())["outputs"])
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert listed == on_disk and "report.html" in listed
    assert {"atlas/atlas.json", "atlas/basis.npz", "atlas/build.json"} <= listed  # the atlas is part of the set
    assert not [p for p in out.iterdir() if p.name.startswith(".brainshift-staging")]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my notes")
    with pytest.raises(BrainshiftError, match="did not write"):
        run_demo(mine, seed=1, quick=True, verbose=False)
    assert [p.name for p in mine.iterdir()] == ["report.html"] and (mine / "report.html").read_text() == "my notes"


def test_quick_demo_builds_the_atlas_and_lists_the_atlas_methods(quick_run):
    """The atlas is built into the output set (as ``brainshift atlas`` makes it, less the reduced member files),
    fitted to the demo's keypoints (its record in summary.json and metrics.json) and shown in the report."""
    from brainshift.atlas import load_atlas

    out, rows = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["none", "linear", "tps", "atlas"]
    assert summary["metrics"]["atlas"]["mse_mm2"] == pytest.approx(rows[3]["mse_mm2"])
    assert summary["atlas"]["folder"] == "atlas" and summary["atlas"]["n_solves"] == 6  # QUICK_ATLAS_CONFIG
    assert summary["atlas"]["n_members"] == 6 * 2 * 3  # with/without resection x 3 stiffnesses
    fit = summary["atlas_fit"]
    assert fit["n_keypoints"] == 20 and fit["tau_mm2"] > 0 and fit["member_weights"]
    assert json.loads((out / "metrics.json").read_text())["atlas_fit"] == fit
    preop = read_image(out / "preop_t1.nii.gz")
    atlas = load_atlas(out / "atlas")
    atlas.check_image(preop.shape, preop.affine, preop.data)  # built on the demo's own preop image
    assert atlas.n_components == summary["atlas"]["n_components"] and not (out / "atlas" / "members").exists()
    # the size reported is the folder that stays (was measured with the per-solve members the demo removes)
    kept_mb = sum(f.stat().st_size for f in (out / "atlas").rglob("*") if f.is_file()) / 1e6
    assert summary["atlas"]["size_mb"] == pytest.approx(kept_mb, abs=0.01)
    field, _ = read_field(out / "field_atlas.h5", reference=preop)
    assert np.isfinite(field).all() and np.abs(field).max() > 0.1
    report = (out / "report.html").read_text()
    assert "<td>atlas</td>" in report and "atlas fit" in report and "keypoint residual (mm)" in report
    # the config as the grid design used it (no sampled design's count, ranges, seed or falx share); the solves run
    cfg = summary["atlas"]["config"]
    assert cfg["design"] == "grid" and cfg["drainage_fractions"] == [0.2, 0.5] and cfg["n_ring_directions"] == 2
    for key in ("n_solves", "drainage_range", "craniotomy_radius_range_mm", "poisson_ratio_range",
                "tumour_stiffness_ratio_range", "seed", "falx_probability", "no_tumour_directions"):
        assert key not in cfg, key


def test_quick_demo_records_no_model_links_the_register_report_and_shows_code(quick_run):
    """Without a network: model and safeguards null, said in the report. The report links to make demo's register
    report (saying how to make it while absent) and renders `code` spans as code, never literal backticks."""
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] is None and summary["safeguards"] is None
    assert json.loads((out / "metrics.json").read_text())["info"]["model"] == "no network model"
    report = (out / "report.html").read_text()
    assert "<td>model</td><td>no network model</td>" in report
    assert '<h2>See also</h2>' in report and '<a href="register/report.html">' in report
    assert "<code>make demo</code> writes it right after this report; if the link is broken" in report
    assert "the input of <code>brainshift register</code> (make demo)" in report and "`" not in report


def test_register_link_says_when_the_register_report_is_there(tmp_path):
    from brainshift.demo import REGISTER_REPORT, register_link

    assert register_link(tmp_path)[1].endswith("in this folder")
    (tmp_path / "register").mkdir()
    (tmp_path / REGISTER_REPORT).write_text("<html></html>")
    name, what = register_link(tmp_path)
    assert name == "register/report.html" and what.endswith("; `make demo` remakes it after the demo")


def test_atlas_config_record_keeps_the_keys_of_its_design():
    from brainshift.demo import atlas_config_record
    from brainshift.simulate.atlas import AtlasConfig

    sample = atlas_config_record(AtlasConfig())  # the default: a sampled design, every range given
    assert sample["n_solves"] == 24 and sample["drainage_range"] == [0.05, 0.7] and sample["falx_probability"] == 0.3
    for key in ("drainage_fractions", "n_ring_directions", "no_tumour_directions", "craniotomy_radius_mm",
                "tumour_stiffness_ratio"):
        assert key not in sample, key
    grid = atlas_config_record(AtlasConfig(design="grid"), has_tumour=False)
    assert grid["no_tumour_directions"] == 9 and "n_solves" not in grid and "seed" not in grid
    assert "ventricle_models" not in grid and "reduced_integration_from_nu" not in grid
    fluid_only = atlas_config_record(AtlasConfig(ventricle_models=None, gravity_models=None))
    assert "ventricle_poisson_ratio_range" not in fluid_only and "buoyant_weight_fraction_range" not in fluid_only
    both = atlas_config_record(AtlasConfig(ventricle_models=["fluid", "compressible"], gravity_models=["buoyant"]))
    assert both["ventricle_poisson_ratio_range"] == [0.0, 0.4] and both["buoyant_weight_fraction_range"] == [0.02, 0.06]



def test_demo_rerun_replaces_its_atlas_and_refuses_a_users_atlas_folder(quick_run, tmp_path, no_default_weights):
    """The atlas files belong to the demo's output set: a re-run without the atlas removes them (the folder
    too, once empty); a user's own ``atlas`` file where the folder goes is refused before any work."""
    import shutil

    from brainshift.errors import BrainshiftError

    out, _ = quick_run
    again = tmp_path / "again"
    shutil.copytree(out, again)
    rows = run_demo(again, seed=1, quick=True, verbose=False, atlas=False)
    assert [r["method"] for r in rows] == ["none", "linear", "tps"]
    assert not (again / "atlas").exists() and not (again / "field_atlas.h5").exists()
    summary = json.loads((again / "summary.json").read_text())
    assert summary["atlas"] is None and not [n for n in summary["outputs"] if "atlas" in n]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "atlas").write_text("my notes")
    with pytest.raises(BrainshiftError, match="expected a folder or nothing at .*atlas"):
        run_demo(mine, seed=1, quick=True, verbose=False)
    assert [p.name for p in mine.iterdir()] == ["atlas"] and (mine / "atlas").read_text() == "my notes"


def test_atlas_report_line_names_the_design():
    from brainshift.demo import _atlas_info
    from brainshift.simulate.atlas import AtlasConfig

    rec = {"n_solves": 24, "n_members": 144, "n_components": 26, "retained_energy": 0.9999, "build_s": 527.0}
    line = _atlas_info({**rec, "config": AtlasConfig().to_dict()}, None)["atlas"]
    assert "sampled: drainage 0.05-0.7; gravity within 45 deg" in line and "24 solves at 3 mm" in line
    grid = AtlasConfig(design="grid", gravity_cone_deg=25.0, n_ring_directions=3).to_dict()
    line = _atlas_info({**rec, "config": grid}, None)["atlas"]
    assert "drainage 0.2, 0.5; gravity: the approach and 3 directions tilted 25 deg" in line


def test_atlas_fit_line_names_the_prior_and_the_averaging():
    from brainshift.demo import _atlas_info

    record = {"config": {"design": "sample", "drainage_range": [0, 0.7], "gravity_cone_deg": 30,
                         "resolution_mm": 3, "contact_models": ["unilateral"]},
              "n_solves": 24, "n_members": 48, "n_components": 25, "retained_energy": 0.99, "build_s": 400}
    fit = {"prior": "scaled-atlas+matern", "tau_rule": "evidence", "tau_mm2": 0.002,
           "kernel": {"atlas_scale": 0.5, "eta_mm": 0.31, "length_mm": 80.0, "mean_scale": 0.83,
                      "hyper_rule": "average"}, "fit_residual_mm": {"mean": 0.01, "max": 0.05}}
    line = _atlas_info(record, fit)["atlas fit"]
    assert "mean's amplitude fitted (0.83)" in line and "averaged over the hyperparameters" in line
    assert "length 80 mm" in line and "mean 0.01 mm, max 0.05 mm" in line and "skull" not in line
    held = {**fit, "prior": "scaled-atlas+matern+contact",
            "kernel": {**fit["kernel"], "contact_share": 0.734, "skull_points": 812}}
    line = _atlas_info(record, held)["atlas fit"]
    assert "mean's amplitude fitted (0.83)" in line
    assert "held to no motion through the skull (73% of the evidence on the held prior, 812 skull points)" in line
    fit = {**fit, "prior": "atlas+matern", "kernel": {**fit["kernel"], "hyper_rule": "map"}}
    line = _atlas_info(record, fit)["atlas fit"]
    assert line.startswith("atlas prior x 0.5 plus a Matern kernel") and "averaged" not in line
