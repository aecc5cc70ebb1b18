"""Tests of weights files (brainshift.model.checkpoint): our safetensors format and the published torch format."""

import json

import pytest
import torch

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.model.checkpoint import load_weights, save_weights
from brainshift.model.network import NetworkConfig, build_network

SMALL = NetworkConfig(features=(4, 8, 16), spacing_mm=2.0, se_mode="cse", upsample="trilinear")


def _x(shape=(8, 8, 12)):
    return torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(0))


def test_safetensors_round_trip_rebuilds_network_with_identical_outputs(tmp_path):
    torch.manual_seed(1)
    model = build_network(SMALL).eval()
    path = tmp_path / "net.safetensors"
    save_weights(path, model, SMALL, {"epoch": 7, "val_mse": 0.25, "note": "tiny"})
    loaded = load_weights(path)
    assert loaded.config == SMALL
    assert loaded.metadata["epoch"] == 7 and loaded.metadata["val_mse"] == 0.25
    assert loaded.metadata["source_format"] == "safetensors"
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.equal(loaded.model(_x()), model(_x()))
    # the header alone describes the network (JSON strings in safetensors metadata)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    assert json.loads(header["config"])["features"] == [4, 8, 16]


def test_saved_weights_are_readable_like_any_written_file(tmp_path):
    import os

    cfg = NetworkConfig(features=(4, 8))
    save_weights(tmp_path / "m.safetensors", build_network(cfg), cfg)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # was 0600 (safetensors' own file)


def test_save_unwraps_wrappers_and_rejects_mismatched_config(tmp_path):
    model = build_network(SMALL)
    wrapped = torch.nn.Module()
    wrapped.module = model  # the shape of DistributedDataParallel
    save_weights(tmp_path / "w.safetensors", wrapped, SMALL.to_dict(), None)
    assert load_weights(tmp_path / "w.safetensors").config == SMALL
    with pytest.raises(InputFileError, match="expected tensor"):
        save_weights(tmp_path / "bad.safetensors", model, NetworkConfig(features=(4, 8, 32)), {})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(BrainshiftError, match=".safetensors"):
        save_weights(tmp_path / "w.pt", model, SMALL, {})


def test_published_format_loads_wrapped_and_plain_state_dicts(tmp_path):
    torch.manual_seed(2)
    ref = build_network(SMALL).eval()
    wrapped = tmp_path / "published.pt"
    torch.save({"model_state_dict": ref.state_dict(), "epoch": 200, "optimizer_state_dict": {}}, wrapped)
    plain = tmp_path / "plain.pth"
    torch.save(ref.state_dict(), plain)
    for path in (wrapped, plain):
        loaded = load_weights(path, config=SMALL)
        assert loaded.metadata["source_format"] == "published"
        with torch.no_grad():
            assert torch.equal(loaded.model(_x()), ref(_x()))
    assert load_weights(wrapped, config=SMALL).metadata["epoch"] == 200


def test_published_default_architecture_state_dict_loads(tmp_path):
    # a published-format file with the published architecture (default config, no config argument)
    ref = build_network()
    path = tmp_path / "res-unet-se.pt"
    torch.save({"model_state_dict": ref.state_dict()}, path)
    loaded = load_weights(path)
    assert loaded.config == NetworkConfig()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_first_shape_mismatch_is_named(tmp_path):
    state = build_network(SMALL).state_dict()
    state["encoders.1.basic_module.conv2.conv.weight"] = torch.zeros(8, 8, 3, 3, 2)
    state["final_conv.weight"] = torch.zeros(3, 5, 1, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(InputFileError) as info:
        load_weights(path, config=SMALL)
    msg = str(info.value)
    assert "'encoders.1.basic_module.conv2.conv.weight'" in msg
    assert "(8, 8, 3, 3, 3)" in msg and "(8, 8, 3, 3, 2)" in msg
    assert "final_conv" not in msg  # only the first mismatch


def test_missing_and_unexpected_names_are_listed(tmp_path):
    state = build_network(SMALL).state_dict()
    del state["final_conv.bias"]
    state["module.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(InputFileError, match=r"missing 1 tensor\(s\): final_conv.bias; unexpected 1 tensor\(s\): "
                                             r"module.extra"):
        load_weights(path, config=SMALL)


class _Payload:
    """Unpickling this calls open(target, 'w'), creating a file: arbitrary code execution."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "payload": _Payload(target)}, path)
    assert not target.exists()
    with pytest.raises(InputFileError, match="weights_only=True") as info:
        load_weights(path)
    assert "arbitrary unpickling" in str(info.value) and "open" in str(info.value)
    assert not target.exists()


def test_bad_files_and_options(tmp_path):
    with pytest.raises(InputFileError, match="missing path"):
        load_weights(tmp_path / "none.safetensors")
    other = tmp_path / "w.onnx"
    other.write_bytes(b"x")
    with pytest.raises(InputFileError, match=".safetensors, .pt or .pth"):
        load_weights(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputFileError, match="safetensors"):
        load_weights(junk)
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(build_network(SMALL).state_dict(), str(bare))
    with pytest.raises(InputFileError, match="embedded network config"):
        load_weights(bare)
    notdict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(InputFileError, match="model_state_dict"):
        load_weights(notdict)
    ok = tmp_path / "ok.safetensors"
    save_weights(ok, build_network(SMALL), SMALL, {})
    with pytest.raises(BrainshiftError, match="no config"):
        load_weights(ok, config=SMALL)
    if not torch.cuda.is_available():
        with pytest.raises(BrainshiftError, match="CUDA"):
            load_weights(ok, device="cuda")


def test_training_state_file_loads_with_its_recorded_architecture(tmp_path):
    # `brainshift train` writes last.pt with the state dicts and its NetworkConfig as JSON
    from brainshift.model.network import get_preset

    cfg = get_preset("fast-small")
    net = build_network(cfg)
    path = tmp_path / "last.pt"
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": {}, "epoch": 3,
                "network_config": cfg.to_json()}, str(path))
    loaded = load_weights(path)
    assert loaded.config == cfg
    assert loaded.metadata["source_format"] == "brainshift training state"
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), net.eval()(x))
