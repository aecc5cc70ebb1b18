"""`brainshift evaluate` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.evaluate.tables import read_per_case_csv

runner = CliRunner()


def test_evaluate_command_writes_report_and_prints_table(tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear,tps", "--out", str(out),
                              "--num-kpts", "8", "--cases", "2", "--seed", "1", "--no-overlap", "-q"])
    assert res.exit_code == 0, res.output
    assert "| linear | 2 |" in res.output and "| tps | 2 |" in res.output
    assert "MSE / " in res.output
    assert sorted(p.name for p in out.iterdir()) == ["boxplots.png", "metrics_per_case.csv", "summary.json",
                                                  "summary.md"]
    rows = read_per_case_csv(out / "metrics_per_case.csv")
    assert [(r["case"], r["method"], r["n_keypoints"]) for r in rows] == [
        ("a_000", "linear", 8), ("a_000", "tps", 8), ("a_001", "linear", 8), ("a_001", "tps", 8)]
    assert "| linear | 2 |" in (out / "summary.md").read_text()


def test_evaluate_command_bad_input_is_one_line_error(tiny_dataset, tmp_path):
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear,spline", "-q"])
    assert res.exit_code == 2
    assert "error: expected methods among" in res.output
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "net-tps", "-q",
                              "--weights", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "expected a weights file" in res.output
    assert not (tmp_path / "o").exists()


def _evaluate_default_methods(dataset, out):
    """Run ``evaluate`` without --methods on one case; return (result, methods found in the CSV)."""
    res = runner.invoke(app, ["evaluate", "--data", str(dataset), "--out", str(out), "--num-kpts", "8",
                              "--cases", "1", "--no-overlap", "-q"])
    assert res.exit_code == 0, res.output
    return res, {r["method"] for r in read_per_case_csv(out / "metrics_per_case.csv")}


def test_evaluate_default_methods_without_weights_are_the_classical_ones(tiny_dataset, tmp_path, no_default_weights):
    res, methods = _evaluate_default_methods(tiny_dataset, tmp_path / "eval")
    assert methods == {"linear", "tps"}
    assert "warning: no network weights" in res.output


def test_evaluate_default_methods_with_the_default_model(tiny_dataset, tmp_path, tiny_default_weights):
    res, methods = _evaluate_default_methods(tiny_dataset, tmp_path / "eval")
    assert methods == {"linear", "tps", "net-linear", "net-tps"}
    assert "warning: no network weights" not in res.output
    # the model is named the same on every machine, its path recorded beside; the safeguards were on (default)
    out = tmp_path / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == {"name": "default (shipped)", "weights": str(tiny_default_weights),
                                "safeguards": True}
    assert set(summary["safeguards"]) == {"net-linear", "net-tps"}
    assert all(0 <= v["alpha_mean"] <= 1 and 0 <= v["beta_mean"] <= 1 and v["n_cases"] == 1
               for v in summary["safeguards"].values())
    md = (out / "summary.md").read_text()
    assert f"Model of the network methods: default (shipped) ({tiny_default_weights}); safeguards on (alpha: " \
           "share of the network's correction kept, beta: how closely the keypoints are honoured; the values of " \
           "the one case): net-linear alpha " in md
    assert "± " not in md.split("\n\n")[-2]  # one case: means alone in the table
    rows = {r["method"]: r for r in read_per_case_csv(out / "metrics_per_case.csv")}
    assert rows["net-tps"]["model"] == "default (shipped)" and rows["net-tps"]["safeguards"] == "on"
    assert rows["tps"]["model"] == ""


def test_evaluate_output_below_a_file_fails_at_once(tiny_dataset, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear", "--out",
                              str(blocker / "eval"), "-q"])
    assert res.exit_code == 2
    assert "error: expected -o/--output to be a directory" in res.output


def test_evaluate_fewer_than_four_keypoints_is_refused_naming_the_option(tiny_dataset, tmp_path):
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear", "--num-kpts", "3",
                              "--out", str(tmp_path / "eval"), "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected --num-kpts >= 4"), res.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--noise-mm", "1e9"], "expected a noise level of 0-20 mm, got 1000000000.0"),
    (["--device", "gpu"], "expected device 'auto', 'cpu' or 'cuda[:N]', got 'gpu'"),
])
def test_evaluate_absurd_noise_and_unknown_device_are_refused_before_the_work(tiny_dataset, tmp_path, args,
                                                                                fragment):
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear", "--out",
                              str(tmp_path / "eval"), "-q", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith(f"error: {fragment}"), res.output
    assert not (tmp_path / "eval").exists()


def test_evaluate_missing_dataset_folder_says_so(tmp_path):
    res = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "nope"), "--methods", "linear", "--out",
                              str(tmp_path / "eval"), "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected a dataset folder (brainshift simulate-batch --out) at"), res.output
    assert "no such folder" in res.output


def test_evaluate_cuda_without_gpu_warns_without_network_methods_and_is_refused_with_them(tiny_dataset, tmp_path,
                                                                                         monkeypatch):
    # as infer: a device that is named but unavailable matters only when the network runs on it
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=r"^--device cuda has no effect without network methods \(linear\)"):
        res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear", "--cases", "1",
                                  "--out", str(tmp_path / "eval"), "-q", "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval").is_dir()
    res = runner.invoke(app, ["evaluate", "--data", str(tiny_dataset), "--methods", "linear,net-tps", "--out",
                              str(tmp_path / "eval2"), "-q", "--device", "cuda"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected a CUDA GPU for device 'cuda'"), res.output
    assert not (tmp_path / "eval2").exists()
