"""``brainshift train`` through typer's CliRunner on a tiny synthetic dataset."""

from __future__ import annotations

import torch
import yaml
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()


def _write_config(path, **extra):
    cfg = {"network": {"features": [4, 8]}, "size": None, "epochs": 2, "lr": 1e-3, "split": [0.0, 0.0],
           "min_kpts": 6, "max_kpts": 6, "progress": False, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_runs_and_summarises(tiny_dataset, tmp_path):
    cfg = _write_config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(out),
                              "--device", "cpu", "--max-steps", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert "trained 1 steps" in res.output and "best.safetensors" in res.output
    resolved = yaml.safe_load((out / "config_resolved.yaml").read_text())
    assert resolved["device"] == "cpu" and resolved["max_steps"] == 1 and resolved["data"] == str(tiny_dataset)
    # --resume continues from last.pt: one more step
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(out),
                              "--device", "cpu", "--max-steps", "2", "--resume", "-q"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output


def test_load_model_fine_tunes_from_given_weights(tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    cfg = _write_config(tmp_path / "c.yaml")
    first = tmp_path / "first"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(first),
                              "--device", "cpu", "--max-steps", "1", "-q"])
    assert res.exit_code == 0, res.output
    # lr 1e-12: Adam moves each weight by ~1e-12, so the result is the loaded network to 1e-9 (a fresh network of the
    # same seed differs from it by the first run's Adam step, ~1e-3 per weight)
    second = tmp_path / "second"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(second),
                              "--load-model", str(first / "best.safetensors"), "--lr", "1e-12", "--device", "cpu",
                              "--max-steps", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((second / "config_resolved.yaml").read_text())["load_model"] == str(first /
                                                                                            "best.safetensors")
    a, b = load_file(str(first / "best.safetensors")), load_file(str(second / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-9) for k in a)
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir",
                              str(tmp_path / "third"), "--load-model", str(tmp_path / "missing.safetensors"),
                              "--device", "cpu", "-q"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1 and "missing.safetensors" in res.output


def test_train_command_errors_are_one_line(tiny_dataset, tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 1\nnot_an_option: 3\n")
    res = runner.invoke(app, ["train", "--config", str(bad), "--data", str(tiny_dataset), "--device", "cpu"])
    assert res.exit_code == 2 and "not_an_option" in res.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _write_config(tmp_path / "c.yaml")
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir",
                              str(tmp_path / "o")])  # published default device: cuda
    assert res.exit_code == 2 and "CUDA" in res.output
    res = runner.invoke(app, ["train", "--config", str(cfg), "--device", "cpu"])
    assert res.exit_code == 2 and "dataset folder" in res.output


def test_trained_weights_work_with_infer_refine(tiny_dataset, tmp_path):
    # done-when of issue 5: `brainshift infer --refine -w <weights>` with a file written by `brainshift train`
    import json

    import numpy as np

    cfg = _write_config(tmp_path / "c.yaml")
    out = tmp_path / "out"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(out),
                              "--device", "cpu", "--max-steps", "1", "-q"])
    assert res.exit_code == 0, res.output
    rng = np.random.default_rng(0)
    pts = rng.uniform([4, 4, 4], [11, 15, 11], size=(8, 3))
    kp = tmp_path / "kp.csv"
    kp.write_text("x,y,z,dx,dy,dz\n" + "".join(",".join(f"{v:.4f}" for v in (*p, 0.5, -0.3, 0.2)) + "\n"
                                              for p in pts))
    image = tiny_dataset / "subjects" / "sub00" / "t1.nii.gz"
    res = runner.invoke(app, ["infer", "-p", str(image), "-k", str(kp), "-m", "linear", "--refine", "-w",
                              str(out / "best.safetensors"), "-o", str(tmp_path / "inf"), "-f", "npz", "-d", "cpu",
                              "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "inf" / "summary.json").read_text())
    assert summary["refined"] is True
    with np.load(tmp_path / "inf" / "corrected_disp_field.npz") as z:
        assert np.isfinite(z[z.files[0]]).all()


def test_a_training_size_the_network_cannot_take_is_refused_before_writing(tiny_dataset, tmp_path):
    # the check came after config_resolved.yaml and splits.json were written into --save-dir
    cfg = _write_config(tmp_path / "c.yaml", size=[31, 32, 32])
    out = tmp_path / "out"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(tiny_dataset), "--save-dir", str(out),
                              "--device", "cpu", "--max-steps", "1", "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected a training size made of multiples of 2") and \
        len(res.output.splitlines()) == 1, res.output
    assert not out.exists()


def test_train_command_on_two_dataset_folders(two_datasets, tmp_path):
    """``--data A --data B``: the union, case keys naming their folder, the split by subject across folders."""
    import json

    from brainshift.model import load_weights

    a, b = two_datasets
    cfg = _write_config(tmp_path / "c.yaml", val_subjects=["sub01"])
    out = tmp_path / "out"
    res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(a), "--data", str(b), "--save-dir",
                              str(out), "--device", "cpu", "--max-steps", "1", "-q"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((out / "config_resolved.yaml").read_text())["data"] == [str(a), str(b)]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["folders"] == [str(a), str(b)] and splits["val"] == ["0-sub01_c0", "1-sub01_c0"]
    assert splits["train"] == ["0-sub00_c0", "0-sub02_c0", "0-sub03_c0", "1-sub00_c0"] and splits["test"] == []
    meta = load_weights(out / "best.safetensors", device="cpu").metadata
    assert meta["dataset"]["data"] == [str(a), str(b)] and meta["dataset"]["n_cases"]["val"] == 2
    for data, match in (([a, a], "twice"), ([a, tmp_path / "nowhere"], "nowhere, it does not exist")):
        res = runner.invoke(app, ["train", "--config", str(cfg), "--data", str(data[0]), "--data", str(data[1]),
                                  "--save-dir", str(tmp_path / "o2"), "--device", "cpu", "-q"])
        assert res.exit_code == 2 and match in res.output and len(res.output.strip().splitlines()) == 1, res.output
