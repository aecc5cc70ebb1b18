"""`brainshift simulate` and `brainshift simulate-batch` through typer's CliRunner."""

from __future__ import annotations

import json
import types

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.simulate import batch as batch_mod
from brainshift.simulate.batch import BatchReport, case_seed, read_config_file, subject_seed
from brainshift.simulate.dataset import list_cases, read_case, read_subject
from brainshift.simulate.preview import save_displacement_png

from ._subject_files import phantom_subject, write_phantom_files

runner = CliRunner()


def _fake_simulate_case(subject, config, params, *, progress=False):
    field = np.zeros((3, *subject.image.shape), np.float32)
    field[2][subject.brain_mask.data > 0] = 1.0  # 1 voxel along k
    return types.SimpleNamespace(field_vox=field, cavity_mask=subject.tumour_mask,
                                 meta={"max_displacement_mm": 2.0, "median_displacement_mm": 2.0,
                                       "params": params.to_dict(), "config": config.to_dict()})


def test_simulate_real_input_with_the_real_solver(tmp_path):
    spec = write_phantom_files(tmp_path / "in", "pat")
    out = tmp_path / "out"
    res = runner.invoke(app, ["simulate", "--image", spec["image"], "--brain-mask", spec["brain_mask"],
                              "--tumour", spec["tumour"], "--ventricles", spec["ventricles"], "--out", str(out),
                              "--resolution", "6", "--seed", "4", "--vtu"])
    assert res.exit_code == 0, res.output
    assert list_cases(out) == ["pat_image_c00"]
    case = read_case(out, "pat_image_c00")
    assert case.meta["config"]["resolution_mm"] == 6.0 and case.meta["case_seed"] == case_seed(4, 0, 0)
    assert case.meta["max_displacement_mm"] > 0 and case.cavity_mask.data.sum() > 0
    png = mpimg.imread(out / "cases" / "pat_image_c00" / "displacement_magnitude.png")
    assert png.ndim == 3 and png.shape[1] > png.shape[0] > 100
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["counts"]["cases_complete"] == 1 and ds["subjects"][0]["spec"]["ventricles"] == spec["ventricles"]
    assert "max displacement" in res.output
    import meshio

    mesh = meshio.read(out / "cases" / "pat_image_c00" / "mesh.vtu")
    assert mesh.point_data["displacement_mm"].shape == (len(mesh.points), 3)
    assert np.abs(mesh.point_data["displacement_mm"]).max() > 0


def test_simulate_demo_matches_batch_seeds(tmp_path, monkeypatch):
    from brainshift.simulate import case as case_mod
    from brainshift.simulate import subject as subject_mod

    seen = {}

    def fake_synth(seed, *, config=None, subject_id=None):
        seen["seed"] = seed
        s = phantom_subject(subject_id)
        s.info = {"source": "synthetic-mni152", "seed": seed}
        return s

    monkeypatch.setattr(subject_mod, "synthesize_subject", fake_synth)
    monkeypatch.setattr(case_mod, "simulate_case", _fake_simulate_case)
    out = tmp_path / "demo"
    res = runner.invoke(app, ["simulate", "--demo", "--out", str(out), "--seed", "9", "--material", "neo-hookean"])
    assert res.exit_code == 0, res.output
    # the demo is subject 0 / case 0 of a batch with the same seed
    assert seen["seed"] == subject_seed(9, 0)
    case = read_case(out, "s0000_c00")
    assert case.meta["case_seed"] == case_seed(9, 0, 0) and case.meta["config"]["material"] == "neo-hookean"
    assert read_subject(out, "s0000").info["seed"] == subject_seed(9, 0)
    assert (out / "cases" / "s0000_c00" / "displacement_magnitude.png").stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["--demo", "--image", "x.nii.gz"], "either --demo"),
    ([], "either --demo"),
    (["--image", "x.nii.gz", "--brain-mask", "b.nii.gz"], "incomplete"),
    (["--demo", "--config", "missing.yaml"], "not found"),
    (["--demo", "--material", "rubber"], "material"),
])
def test_simulate_bad_input_one_line_exit_2(tmp_path, args, message):
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_simulate_batch_command_parses_and_reports(tmp_path, monkeypatch):
    calls = []

    def fake_batch(out_dir, **kw):
        calls.append(kw)
        rep = BatchReport(out_dir=out_dir, n_subjects=2, n_cases=4, simulated=["s0000_c00"])
        if kw["seed"] == 13:
            rep.failed = {"s0001_c00": "SolverError: expected convergence"}
        return rep

    monkeypatch.setattr(batch_mod, "simulate_batch", fake_batch)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("simulation:\n  resolution_mm: 2.0\n  craniotomy_radius_mm: 30\n"
                   "synthesis:\n  warp_amplitude_mm: 2.5\n")
    res = runner.invoke(app, ["simulate-batch", "--subjects", "2", "--cases-per-subject", "2", "--out",
                              str(tmp_path / "ds"), "--config", str(cfg), "--workers", "2", "--seed", "7",
                              "--scheduler-address", "tcp://127.0.0.1:8786", "--no-progress"])
    assert res.exit_code == 0, res.output
    kw = calls[0]
    assert kw["subjects"] == 2 and kw["cases_per_subject"] == 2 and kw["n_workers"] == 2 and kw["seed"] == 7
    assert kw["scheduler_address"] == "tcp://127.0.0.1:8786" and kw["progress"] is False
    assert kw["config"].resolution_mm == 2.0 and kw["config"].craniotomy_radius_mm == 30
    assert kw["synthesis"].warp_amplitude_mm == 2.5
    assert "1 simulated" in res.output

    csv = tmp_path / "subjects.csv"
    csv.write_text("image,brain_mask,tumour\nt1.nii.gz,b.nii.gz,t.nii.gz\n")
    res = runner.invoke(app, ["simulate-batch", "--subjects", str(csv), "--cases-per-subject", "1", "--out",
                              str(tmp_path / "ds2"), "--seed", "13", "--resolution", "4"])
    assert res.exit_code == 1  # a failed case: reported, exit code 1
    assert calls[1]["subjects"] == [{"image": str(tmp_path / "t1.nii.gz"), "brain_mask": str(tmp_path / "b.nii.gz"),
                                     "tumour": str(tmp_path / "t.nii.gz")}]
    assert calls[1]["config"].resolution_mm == 4.0
    assert "failed s0001_c00: SolverError" in res.output

    res = runner.invoke(app, ["simulate-batch", "--subjects", "many", "--cases-per-subject", "1", "--out",
                              str(tmp_path / "ds3")])
    assert res.exit_code == 2 and "a number, a part START:STOP or a .csv" in res.output
    res = runner.invoke(app, ["simulate-batch", "--subjects", "30:60", "--cases-per-subject", "1", "--out",
                              str(tmp_path / "ds4"), "--no-progress"])
    assert res.exit_code == 0 and calls[2]["subjects"] == range(30, 60)
    for bad in ("60:30", "5:5"):
        res = runner.invoke(app, ["simulate-batch", "--subjects", bad, "--cases-per-subject", "1", "--out",
                                  str(tmp_path / "ds5")])
        assert res.exit_code == 2 and "START < STOP" in res.output and len(res.output.splitlines()) == 1, res.output
    assert not (tmp_path / "ds5").exists()


def test_read_config_file_flat_json_and_overrides(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"resolution_mm": 4.0, "drainage_fraction_range": [0.1, 0.3]}))
    sim, synth = read_config_file(p, material="neo-hookean")
    assert sim.resolution_mm == 4.0 and sim.drainage_fraction_range == (0.1, 0.3) and sim.material == "neo-hookean"
    assert synth.warp_amplitude_mm == 4.0
    sim, _ = read_config_file(p, resolution=2.0)
    assert sim.resolution_mm == 2.0
    bad = tmp_path / "bad.yaml"
    bad.write_text("simulation: {resolution_mm: 3}\nextra: 1\n")
    from brainshift.errors import BrainshiftError

    with pytest.raises(BrainshiftError, match="sections"):
        read_config_file(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(BrainshiftError, match="mapping"):
        read_config_file(bad)


def test_displacement_png_slices_through_the_peak(tmp_path):
    s = phantom_subject("p")
    field = np.zeros((3, *s.image.shape), np.float32)
    peak = (30, 20, 18)
    field[0][peak] = 2.0  # 2 voxels = 4 mm at the 2 mm spacing
    path = save_displacement_png(s.image, field, tmp_path / "d.png", brain=s.brain_mask, title="t")
    img = mpimg.imread(path)
    assert img.shape[2] in (3, 4) and img.shape[0] > 100


@pytest.mark.parametrize("text,message", [
    ("resolution_mm: abc\n", "expected resolution_mm in the simulation config as a finite number, got 'abc'"),
    ("resolution_mm: .inf\n", "expected resolution_mm in the simulation config as a finite number, got inf"),
    ("resection: 'no'\n", "expected resection in the simulation config as true or false, got 'no'"),
    ("solver_maxiter: 2.5\n", "expected solver_maxiter in the simulation config as an integer, got 2.5"),
    ("drainage_fraction_range: 0.5\n",
     "expected drainage_fraction_range in the simulation config as a list of 2 numbers, got 0.5"),
    ("family: 3\n", "expected family in the simulation config as a mapping or null, got 3"),
    ("simulation: abc\n", "expected the section simulation: of"),
    ("synthesis: [1, 2]\n", "expected the section synthesis: of"),
    ("synthesis: {warp_steps: abc}\n", "expected warp_steps in the synthesis config as an integer, got 'abc'"),
    ("synthesis: {tumour_radius_range_mm: 5}\n",
     "expected tumour_radius_range_mm in the synthesis config as a list of 2 numbers, got 5"),
    (b"\xff\xferesolution_mm: 3\n", "expected a UTF-8 text config file (YAML or JSON), got"),
    (None, "(a directory)"),
])
@pytest.mark.parametrize("command", [["simulate", "--demo"], ["simulate-batch", "--subjects", "1",
                                                              "--cases-per-subject", "1"]])
def test_simulation_config_values_of_the_wrong_type_are_one_line_exit_2(tmp_path, command, text, message):
    # were TypeError / ValueError / UnicodeDecodeError tracebacks, or used as they came (resection 'no' as true,
    # 2.5 CG iterations, an infinite element size); a folder was reported as 'not found'
    cfg = tmp_path / "sim.yaml"
    if text is None:
        cfg.mkdir()
    else:
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = runner.invoke(app, [*command, "--config", str(cfg), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.splitlines()) == 1, res.output
    assert message in res.output, res.output
    assert not (tmp_path / "o").exists()
