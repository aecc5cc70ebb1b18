"""TrainConfig: published names and defaults, file loading, overrides, network mapping."""

from __future__ import annotations

import json

import pytest
import torch

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.train.config import TrainConfig, from_dict, load_config, network_config, save_resolved


def test_published_defaults():
    c = TrainConfig()
    assert c.save_dir == "checkpoints" and c.split == (0.10, 0.15) and c.batch_size == 1
    assert c.size == (160, 192, 144) and c.model == "res-unet-se" and c.layer_order == "cil"
    assert (c.num_features, c.num_levels, c.num_groups) == (32, 4, 8)
    assert (c.mse_w, c.epochs, c.lr, c.lncc_w, c.lncc_window, c.reg_w) == (1.0, 20, 1e-4, 1.0, 2, 1.0)
    assert (c.evaluate_every, c.min_kpts, c.max_kpts, c.device) == (1, 20, 20, "cuda")
    assert c.interp is None and c.num_kpts is None and not (c.lncc or c.hessian or c.jdet or c.augment)
    assert c.jdet_mode == "negative"


def test_published_json_config_loads(tmp_path):
    # a JSON config as the published script reads it (argparse dest names, some written with dashes / --)
    pub = {"model": "res-unet-se", "lr": 5e-4, "epochs": 200, "min_kpts": 20, "max_kpts": 20, "interp": None,
           "jdet": True, "jdet_mode": "unit", "size": [160, 192, 144], "split": [0.1, 0.15], "--save_dir": "runs/a",
           "num-features": 32, "se_mode": "scse", "upsample_mode": None, "pool_mode": "max", "seed": 42,
           "augment": True, "extra_eval": True, "hessian": False, "lncc": False, "device": "cuda"}
    p = tmp_path / "pub.json"
    p.write_text(json.dumps(pub))
    c = load_config(p)
    assert c.lr == 5e-4 and c.epochs == 200 and c.jdet and c.jdet_mode == "unit" and c.save_dir == "runs/a"
    assert c.size == (160, 192, 144) and c.split == (0.1, 0.15) and c.seed == 42 and c.configs == str(p)
    n = network_config(c)
    assert n.features == (32, 64, 128, 256) and n.norm == "instance" and n.se_mode == "scse"
    assert n.upsample == "transposed" and n.predict_residual


def test_unknown_keys_listed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.001\nbogus: 1\nalso_bad: x\n")
    with pytest.raises(BrainshiftError, match="also_bad, bogus"):
        load_config(p)


def test_yaml_then_overrides_and_resolved_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 5\nlr: 0.002\nnum_kpts: 12\npreset: fast\nnetwork: {features: [8, 16]}\n")
    c = load_config(p, {"epochs": 7, "device": "cpu", "seed": None})
    assert c.epochs == 7 and c.lr == 0.002 and c.device == "cpu" and c.seed == 0
    assert c.k_range == (12, 12)
    out = save_resolved(c, tmp_path / "out" / "config_resolved.yaml")
    assert load_config(out) == c  # the resolved file reloads to the same config (configs keeps the origin)


@pytest.mark.parametrize("values, match", [
    ({"interp": "cubic"}, "interp"),
    ({"split": [0.5, 0.5]}, "split"),
    ({"min_kpts": 10, "max_kpts": 5}, "min_kpts"),
    ({"model": "vxm"}, "model"),
    ({"jdet_mode": "positive"}, "jdet_mode"),
    ({"epochs": "many"}, "epochs"),
    ({"size": [16, 16]}, "size"),
    ({"device": "tpu"}, "device"),
    ({"flip_axes": [3]}, "flip_axes"),
    ({"flip_axes": [0, 0]}, "flip_axes"),
    ({"lr_schedule": "step"}, "lr_schedule"),
    ({"lr": 1e-4, "lr_min": 1e-3, "lr_schedule": "cosine"}, "lr_min"),
    ({"lr_min": -1.0}, "lr_min"),
    ({"flip_axes": [0.5]}, "list of array axes"),
    ({"device": "cudax"}, "device 'cpu', 'cuda' or 'cuda:N'"),
    ({"mse_w": -1.0}, "mse_w >= 0"),
    ({"reg_w": -0.1}, "reg_w >= 0"),
    ({"val_subjects": ["s0001", "s0001"]}, "val_subjects"),
    ({"val_subjects": [1, 2]}, "val_subjects"),
])
def test_bad_values_raise(values, match):
    with pytest.raises(BrainshiftError, match=match):
        from_dict(values)


def test_cuda_device_index_is_accepted():
    assert from_dict({"device": "cuda:1"}).device == "cuda:1"


def test_interp_none_spellings_mean_random():
    assert from_dict({"interp": "None"}).interp is None
    assert from_dict({"interp": "random"}).interp is None
    assert from_dict({"interp": "tps"}).interp == "tps"


def test_network_mapping():
    assert network_config(from_dict({"model": "res-unet"})).se_mode == "none"
    n = network_config(from_dict({"layer_order": "cgl", "num_features": 16, "num_levels": 3, "pool_mode": "avg",
                                  "upsample_mode": "trilinear"}))
    assert (n.norm, n.features, n.pool, n.upsample) == ("group", (16, 32, 64), "avg", "trilinear")
    fast = network_config(from_dict({"preset": "fast", "network": {"features": [4, 8]}, "spacing_mm": 3.0}))
    assert fast.features == (4, 8) and fast.spacing_mm == 3.0
    with pytest.raises(BrainshiftError, match="preset"):
        network_config(from_dict({"preset": "nope"}))
    with pytest.raises(BrainshiftError, match="widths"):
        network_config(from_dict({"network": {"widths": [1]}}))


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(InputFileError, match="mapping"):
        load_config(p)


def test_cuda_without_gpu_is_an_error(monkeypatch):
    from brainshift.train.distributed import setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BrainshiftError, match="CUDA"):
        setup_distributed("cuda")
    assert setup_distributed("cpu").device.type == "cpu"


def test_example_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.glob("train_*.yaml"))
    assert {f.name for f in files} >= {"train_published.yaml", "train_fast.yaml", "train_smoke.yaml"}
    for f in files:
        c = load_config(f)
        n = network_config(c)
        if c.size is not None:
            assert all(s % n.size_multiple == 0 for s in c.size), f.name
    pub = load_config(root / "train_published.yaml")
    assert network_config(pub) == network_config(TrainConfig()) and pub.lr == 5e-4 and pub.epochs == 200


def test_flip_axes_and_schedule_spellings():
    assert from_dict({"flip_axes": "0,2"}).flip_axes == (0, 2)
    assert from_dict({"flip_axes": [1]}).flip_axes == (1,)
    assert from_dict({}).flip_axes == () and from_dict({}).lr_schedule == "constant"
    assert from_dict({"flip_axes": None}).flip_axes == ()  # null: no mirroring
    assert from_dict({"val_subjects": "s0011, s0027"}).val_subjects == ("s0011", "s0027")
    assert from_dict({"val_subjects": None}).val_subjects == () == from_dict({}).val_subjects
    assert from_dict({"lr": 1e-4, "lr_min": 1e-3}).lr_min == 1e-3  # unused by the constant schedule


def test_keypoint_policy_options_parse_and_validate():
    from brainshift.errors import BrainshiftError
    from brainshift.train.config import TrainConfig, from_dict

    cfg = from_dict({"keypoint_rules": "detected,cortex", "noise_mm": [0, 1], "interp_methods": ["tps", "tps3d"]})
    assert cfg.variant_options == {"rules": ("detected", "cortex"), "noise_mm": (0.0, 1.0),
                                   "methods": ("tps", "tps3d")}
    assert TrainConfig().variant_options["rules"] == ("detected",)
    assert from_dict({"interp_methods": ["GP", "tps"]}).variant_options["methods"] == ("gp", "tps")
    for bad in ({"keypoint_rules": ["everywhere"]}, {"noise_mm": [1.0, 0.5]}, {"interp_methods": ["nearest"]}):
        with pytest.raises(BrainshiftError):
            from_dict(bad)


def test_a_negative_seed_in_a_config_is_refused(tmp_path):
    # numpy's generators take only non-negative seeds (the splits and the samples' draws): was a traceback
    p = tmp_path / "c.yaml"
    p.write_text("seed: -5\n")
    with pytest.raises(BrainshiftError, match="expected seed >= 0, got -5"):
        load_config(p)


def test_a_config_that_is_not_utf8_or_a_folder_is_an_input_file_error(tmp_path):
    # a Latin-1 byte was a UnicodeDecodeError traceback; a folder was reported as not existing
    p = tmp_path / "c.yaml"
    p.write_bytes(b"epochs: 2 # \xe9\n")
    with pytest.raises(InputFileError, match="expected a UTF-8 text training config file"):
        load_config(p)
    with pytest.raises(InputFileError, match="expected a training config file at .*, got a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("text,message", [
    ("lr: .nan\n", "expected a finite number for option 'lr', got nan"),
    ("lr: .inf\n", "expected a finite number for option 'lr', got inf"),
    ("lr: true\n", "expected a finite number for option 'lr', got True"),
    ("reg_w: .inf\n", "expected a finite number for option 'reg_w', got inf"),
    ("size: '123'\n", "expected a valid value for option 'size', got '123'"),
    ("size: [64.5, 64, 64]\n", "expected a valid value for option 'size', got [64.5, 64, 64]"),
    ("split: '01'\n", "expected a valid value for option 'split', got '01'"),
    ("spacing_mm: 0\n", "expected spacing_mm > 0 (mm) or null, got 0.0"),
])
def test_config_values_that_were_silently_misread_are_refused(tmp_path, text, message):
    # were accepted: a NaN / infinite / boolean learning rate, size '123' read as (1, 2, 3), 64.5 truncated to
    # 64, split '01' read as [0.0, 1.0], a zero grid spacing
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(BrainshiftError) as err:
        load_config(p)
    assert str(err.value) == message


def test_network_values_of_the_wrong_type_are_a_brainshift_error():
    # network: {features: abc} was a ValueError traceback when the run started
    with pytest.raises(BrainshiftError, match="expected valid network values, got {'features': 'abc'}"):
        network_config(from_dict({"network": {"features": "abc"}}))


def test_choice_values_read_in_any_case_as_the_cli_reads_them(tmp_path):
    """``interp_methods: [TPS]`` in a config file means what ``-m TPS`` means on the command line; names that
    are not choices (subject ids, paths) keep their case."""
    path = tmp_path / "c.yaml"
    path.write_text("interp_methods: [TPS, Linear]\nkeypoint_rules: Detected, CORTEX\nlr_schedule: Cosine\n"
                    "preset: FAST\ndevice: CPU\nval_subjects: [S0011]\nsave_dir: Out/Run\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.interp_methods == ("tps", "linear")
    assert cfg.keypoint_rules == ("detected", "cortex")
    assert (cfg.lr_schedule, cfg.preset, cfg.device) == ("cosine", "fast", "cpu")
    assert cfg.val_subjects == ("S0011",)
    assert str(cfg.save_dir) == "Out/Run"
    with pytest.raises(BrainshiftError, match="interp_methods"):
        from_dict({"interp_methods": ["TPS3"]})


def test_data_is_a_folder_or_a_list_of_folders(tmp_path):
    """One folder stays a string (a one-element list becomes it); several are kept in order, recorded as a YAML
    list and read back; an empty list, a folder listed twice or a non-path entry is a one-line error."""
    assert from_dict({"data": ["d/x"]}).data == "d/x" == from_dict({"data": "d/x"}).data
    assert TrainConfig(data=["d/x"]).data == "d/x" and TrainConfig(data="d/x").data == "d/x"
    c = load_config(None, {"data": ["d/x", "d/y"], "device": "cpu"})
    assert c.data == ("d/x", "d/y") and c.to_dict()["data"] == ["d/x", "d/y"]
    out = save_resolved(c, tmp_path / "config_resolved.yaml")
    assert "data:\n- d/x\n- d/y\n" in out.read_text() and load_config(out).data == ("d/x", "d/y")
    for value, match in (([], "at least one dataset folder, got an empty list"),
                         (["d/x", "d/./x"], "twice (as 'd/x' and 'd/./x')"),
                         (["d/x", 3], "a dataset folder or a list of folders, got ['d/x', 3]"),
                         (["d/x", ""], "a dataset folder or a list of folders"),
                         (3, "a dataset folder or a list of folders, got 3")):
        with pytest.raises(BrainshiftError) as info:
            from_dict({"data": value})
        assert match in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(BrainshiftError, match="twice"):
        TrainConfig(data=("d/x", "d/x"))
