"""Training loop: overfit one case, end-to-end run with checkpoints, resume equals an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.model import NetworkConfig, build_network, load_weights
from brainshift.train.config import from_dict
from brainshift.train.data import TrainDataset
from brainshift.train.loop import load_state, train, train_step

TINY_NET = {"features": [4, 8]}


def test_overfit_one_case_loss_falls_tenfold(tiny_dataset):
    # One fixed sample with a poor initial field (5 keypoints): the residual network must learn GT - init.
    torch.manual_seed(0)
    net = NetworkConfig(features=(8, 16))
    cfg = from_dict({"lr": 3e-3, "device": "cpu"})
    ds = TrainDataset(tiny_dataset, ["sub00_c0"], {"sub00_c0": "sub00"}, net, size=None, interp="linear",
                      k_range=(5, 5), variants_per_case=1)
    batch = {k: v[None] for k, v in ds[0].items()}
    model = build_network(net)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(60):
        losses.append(train_step(model, batch, opt, cfg, "mm", torch.device("cpu"))["mse"])
        if losses[-1] < losses[0] / 10:
            break
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.4g} -> {losses[-1]:.4g} in {len(losses)} steps"


def _cfg(data, save_dir, **kw):
    base = {"data": str(data), "save_dir": str(save_dir), "device": "cpu", "network": TINY_NET, "size": None,
            "epochs": 2, "lr": 1e-3, "split": [0.25, 0.25], "min_kpts": 6, "max_kpts": 8, "heldout_kpts": 10,
            "samples_per_epoch": 2, "progress": False, "seed": 3}
    return from_dict({**base, **kw})


def test_train_end_to_end_files_and_metadata(small_dataset, tmp_path):
    from brainshift.model import refine_field
    from brainshift.simulate.dataset import read_case

    r = train(_cfg(small_dataset, tmp_path / "out", jdet=True, hessian=True))
    out = tmp_path / "out"
    assert r.steps == 4 and len(r.history) == 2 and r.best_epoch in (1, 2)
    for name in ("best.safetensors", "last.pt", "config_resolved.yaml", "splits.json", "history.jsonl",
                 "test_metrics.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((out / "config_resolved.yaml").read_text())
    assert resolved["epochs"] == 2 and resolved["network"] == TINY_NET and resolved["jdet"] is True
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["subjects"]["val"]) == 1 and len(splits["subjects"]["test"]) == 1
    val = r.history[-1]["val"]
    assert val["n_cases"] == 2 and np.isfinite([val["mse_mm2"], val["tre_mm"], val["tre_mm_init"]]).all()
    assert 0.0 <= val["pct_jacobian_nonpositive"] <= 100.0
    assert set(r.history[0]["train"]) == {"mse", "jdet", "bending", "total"}
    assert r.test_metrics["n_cases"] == 2
    loaded = load_weights(out / "best.safetensors")
    assert loaded.config.features == (4, 8)
    md = loaded.metadata
    assert md["epoch"] == r.best_epoch and md["train_config"]["seed"] == 3 and md["val"]["n_cases"] == 2
    assert md["dataset"]["n_subjects"] == {"train": 2, "val": 1, "test": 1}
    # the exported weights drive the inference path
    case = read_case(small_dataset, "sub00_c0")
    init = np.zeros((3, *case.subject.image.shape), np.float32)
    refined = refine_field(case.subject.image, init, loaded, mask=case.subject.brain_mask.data)
    assert refined.shape == init.shape and np.isfinite(refined).all()


def test_resume_equals_uninterrupted_run(small_dataset, tmp_path):
    a = train(_cfg(small_dataset, tmp_path / "a", split=[0.25, 0.0]))
    train(_cfg(small_dataset, tmp_path / "b", split=[0.25, 0.0], epochs=1))
    b = train(_cfg(small_dataset, tmp_path / "b", split=[0.25, 0.0], epochs=2, resume=True))
    assert b.steps == a.steps == 4 and [h["epoch"] for h in b.history] == [1, 2]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    state = load_state(tmp_path / "b" / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 4
    assert state["optimizer_state_dict"]["param_groups"][0]["lr"] == 1e-3
    # a resumed run takes its configured learning rate (staged schedules across runs)
    c = train(_cfg(small_dataset, tmp_path / "b", split=[0.25, 0.0], epochs=3, resume=True, lr=2e-4))
    assert c.steps == 6
    assert load_state(tmp_path / "b" / "last.pt")["optimizer_state_dict"]["param_groups"][0]["lr"] == 2e-4
    with pytest.raises(BrainshiftError, match="network"):
        train(_cfg(small_dataset, tmp_path / "b", split=[0.25, 0.0], epochs=3, resume=True,
                   network={"features": [4, 8, 16]}))


def test_relative_mse_run_logs_the_ratio_and_keeps_the_best_by_it(small_dataset, tmp_path):
    r = train(_cfg(small_dataset, tmp_path / "rel", mse_relative=True, mse_floor_mm2=0.01, evaluate_every=1))
    assert set(r.history[0]["train"]) == {"mse", "mse_rel", "total"}
    ratios = [h["val"]["mse_ratio"] for h in r.history]
    for h in r.history:
        v = h["val"]
        assert 0 < v["mse_ratio"] and np.isfinite(v["mse_ratio"])
    assert r.best_epoch == 1 + int(np.argmin(ratios))
    assert load_state(tmp_path / "rel" / "last.pt")["best_val_mse"] == pytest.approx(min(ratios))
    md = load_weights(tmp_path / "rel" / "best.safetensors").metadata
    assert md["train_config"]["mse_relative"] is True and md["val"]["mse_ratio"] == pytest.approx(min(ratios))
    with pytest.raises(BrainshiftError, match="mse_floor_mm2 > 0"):
        _cfg(small_dataset, tmp_path / "x", mse_relative=True, mse_floor_mm2=0)


def test_max_steps_and_bad_inputs(tiny_dataset, tmp_path):
    r = train(_cfg(tiny_dataset, tmp_path / "o", epochs=5, max_steps=3, split=[0.0, 0.0]))
    assert r.steps == 3 and len(r.history) == 2 and r.best_metrics == {}
    r = train(_cfg(tiny_dataset, tmp_path / "t", epochs=5, max_minutes=1e-9, split=[0.0, 0.0]))
    assert r.steps == 1 and len(r.history) == 1 and (tmp_path / "t" / "last.pt").is_file()
    with pytest.raises(BrainshiftError, match="max_minutes"):
        train(_cfg(tiny_dataset, tmp_path / "t2", max_minutes=0))
    with pytest.raises(InputFileError, match="resume"):
        load_state(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputFileError, match="weights_only"):
        load_state(tmp_path / "junk.pt")
    with pytest.raises(InputFileError, match="dataset folder"):
        train(_cfg(tmp_path / "nope", tmp_path / "o2"))
    with pytest.raises(BrainshiftError, match="multiples of 2"):
        train(_cfg(tiny_dataset, tmp_path / "o3", size=[15, 16, 16]))


def test_zero_init_head_starts_as_identity_refinement():
    from brainshift.train.loop import initial_network

    net = NetworkConfig(features=(4, 8))
    model = initial_network(net, from_dict({"device": "cpu"}))
    assert torch.count_nonzero(model.final_conv.weight) == 0 and torch.count_nonzero(model.final_conv.bias) == 0
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), x[:, :3])  # output = the initial field exactly
    other = initial_network(net, from_dict({"device": "cpu", "zero_init_head": False}))
    assert torch.count_nonzero(other.final_conv.weight) > 0


def test_cosine_learning_rate_schedule():
    from brainshift.train.config import from_dict
    from brainshift.train.loop import learning_rate

    cos = from_dict({"lr": 1e-3, "lr_min": 1e-5, "lr_schedule": "cosine"})
    assert learning_rate(cos, 0, 100) == pytest.approx(1e-3)
    assert learning_rate(cos, 50, 100) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(cos, 100, 100) == pytest.approx(1e-5)
    assert learning_rate(cos, 250, 100) == pytest.approx(1e-5)  # past the plan: stays at lr_min
    assert learning_rate(from_dict({"lr": 1e-3}), 50, 100) == 1e-3


def test_a_loaded_model_widened_with_the_keypoint_channel_starts_as_the_loaded_model(tiny_dataset, tmp_path):
    from brainshift.model.checkpoint import save_weights
    from brainshift.train.distributed import DistContext
    from brainshift.train.loop import _prepare_run, widen_input_channels

    torch.manual_seed(0)
    net = NetworkConfig(features=(4, 8))
    small = build_network(net).eval()
    wide_cfg = NetworkConfig(features=(4, 8), keypoint_channel="proximity")
    wide = build_network(wide_cfg)
    wide.load_state_dict(widen_input_channels(small.state_dict(), wide.state_dict()))
    wide.eval()
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():  # any value of the new channel: the same output as the loaded model
        for prox in (torch.zeros(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)):
            torch.testing.assert_close(wide(torch.cat([x, prox], 1)), small(x), rtol=0, atol=0)
    # through a training config: load_model + network.keypoint_channel
    path = tmp_path / "small.safetensors"
    save_weights(path, small, net)
    cfg = _cfg(tiny_dataset, tmp_path / "o", load_model=str(path), network={"keypoint_channel": "proximity"},
               split=[0.0, 0.0])
    run = _prepare_run(cfg, DistContext())
    assert run.net_cfg.in_channels == 5 and run.net_cfg.features == (4, 8)
    w = run.model.state_dict()["encoders.0.basic_module.conv1.weight"]
    assert w.shape[1] == 5 and torch.count_nonzero(w[:, 4]) == 0
    # a published-format .pt (no config of its own) is read without the channel, then widened the same way
    pt = tmp_path / "small.pt"
    torch.save({"model_state_dict": small.state_dict()}, pt)
    run = _prepare_run(_cfg(tiny_dataset, tmp_path / "o2", load_model=str(pt), split=[0.0, 0.0],
                            network={"features": [4, 8], "keypoint_channel": "proximity"}), DistContext())
    assert run.net_cfg.in_channels == 5
    x5 = torch.cat([x, torch.rand(1, 1, 8, 8, 8)], 1)
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(x5), small(x), rtol=0, atol=0)
    # a keypoint model cannot start a network without the channel: one clear error
    kp_path = tmp_path / "kp.safetensors"
    save_weights(kp_path, wide, wide_cfg)
    with pytest.raises(BrainshiftError, match="expected a load_model whose network can start"):
        _prepare_run(_cfg(tiny_dataset, tmp_path / "o3", load_model=str(kp_path), split=[0.0, 0.0],
                          network={"keypoint_channel": "none"}), DistContext())
