"""Tests of the refinement network (brainshift.model.network)."""

import json
from pathlib import Path

import pytest
import torch

from brainshift.errors import BrainshiftError
from brainshift.model.network import PRESETS, NetworkConfig, build_network, count_parameters, get_preset

# copy of shared/reference/published_checkpoint_manifest.json (names and shapes of the published checkpoint)
MANIFEST = Path(__file__).with_name("published_checkpoint_manifest.json")


def test_published_architecture_matches_manifest_exactly():
    model = build_network(NetworkConfig())
    state = model.state_dict()
    # 7,287,146 parameters: the published checkpoint's count (facts file)
    assert count_parameters(model) == 7_287_146
    # 4 encoders x 12 tensors + 3 decoders x (2 upsample + 4 conv + 6 SE) + final conv 2 = 86
    assert len(state) == 86
    man = json.loads(MANIFEST.read_text())
    tensors = man["tensors"]
    assert list(state) == list(tensors)  # same names, same order
    for name, shape in tensors.items():
        assert list(state[name].shape) == shape, name
    assert man["total_parameters"] == count_parameters(model)


def test_state_dict_names_follow_published_pattern():
    state = build_network().state_dict()
    assert "encoders.0.basic_module.conv1.weight" in state
    assert "decoders.0.basic_module.conv1.weight" not in state  # decoder blocks keep their channel count
    assert tuple(state["decoders.0.upsampling.upsample.weight"].shape) == (256, 128, 3, 3, 3)
    assert tuple(state["final_conv.weight"].shape) == (3, 32, 1, 1, 1)
    assert tuple(state["encoders.3.basic_module.se_module.cSE.fc1.weight"].shape) == (256, 256)
    assert tuple(state["encoders.2.basic_module.se_module.sSE.conv.weight"].shape) == (1, 128, 1, 1, 1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_forward_shape(name):
    cfg = get_preset(name)
    model = build_network(cfg).eval()
    x = torch.randn(1, 4, 16, 24, 8)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 3, 16, 24, 8)
    assert torch.isfinite(y).all()


def test_residual_output_is_input_plus_final_conv():
    model = build_network(NetworkConfig(features=(4, 8))).eval()
    # zero final conv: the output is exactly the input's displacement channels
    torch.nn.init.zeros_(model.final_conv.weight)
    torch.nn.init.zeros_(model.final_conv.bias)
    x = torch.randn(2, 4, 8, 6, 4)
    with torch.no_grad():
        assert torch.equal(model(x), x[:, :3])
    model.config.predict_residual = False
    with torch.no_grad():
        assert torch.equal(model(x), torch.zeros(2, 3, 8, 6, 4))


@pytest.mark.parametrize("options", [
    {"norm": "batch"}, {"norm": "group"}, {"norm": "none"},
    {"se_mode": "cse"}, {"se_mode": "sse"}, {"se_mode": "none"},
    {"upsample": "trilinear"}, {"upsample": "nearest"}, {"pool": "avg"},
    {"features": (8, 16, 32)}, {"features": (8,)},
])
def test_configurable_variants_run_and_backpropagate(options):
    cfg = NetworkConfig(**{"features": (4, 8, 16), **options})
    model = build_network(cfg)
    x = torch.randn(2, 4, 8, 8, 12)
    y = model(x)
    assert y.shape == (2, 3, 8, 8, 12)
    y.square().mean().backward()
    assert model.final_conv.weight.grad is not None
    names = set(model.state_dict())
    assert ("encoders.0.basic_module.se_module.cSE.fc1.weight" in names) == (cfg.se_mode in ("scse", "cse"))
    assert ("encoders.0.basic_module.se_module.sSE.conv.weight" in names) == (cfg.se_mode in ("scse", "sse"))
    if len(cfg.features) > 1:
        assert ("decoders.0.upsampling.upsample.weight" in names) == (cfg.upsample == "transposed")


def test_scse_is_elementwise_max_of_branches():
    from brainshift.model.network import SqueezeExcitation

    se = SqueezeExcitation(5, "scse")
    x = torch.randn(1, 5, 3, 4, 2)
    with torch.no_grad():
        expected = torch.maximum(se.cSE(x), se.sSE(x))
        # channel branch by hand: sigmoid(fc2(relu(fc1(mean))))
        s = torch.sigmoid(se.cSE.fc2(torch.relu(se.cSE.fc1(x.mean(dim=(2, 3, 4))))))
        assert torch.allclose(se.cSE(x), x * s[:, :, None, None, None])
        assert torch.equal(se(x), expected)


def test_config_round_trip_and_validation():
    cfg = NetworkConfig(features=(16, 32, 64, 128), spacing_mm=2.0)
    again = NetworkConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.features == (16, 32, 64, 128)
    assert cfg.size_multiple == 8 and cfg.levels == 4
    with pytest.raises(BrainshiftError, match="norm"):
        NetworkConfig(norm="layer")
    with pytest.raises(BrainshiftError, match="unknown"):
        NetworkConfig.from_dict({"num_features": 32})
    with pytest.raises(BrainshiftError, match="preset"):
        get_preset("huge")


def test_forward_rejects_bad_inputs():
    model = build_network(NetworkConfig(features=(4, 8, 16)))
    with pytest.raises(BrainshiftError, match="4, I, J, K"):
        model(torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(BrainshiftError, match="multiples of 4"):
        model(torch.zeros(1, 4, 8, 10, 8))


def test_config_from_published_options():
    from brainshift.model.network import config_from_published_options

    # the published defaults give the published architecture
    assert config_from_published_options({"model": "res-unet-se", "num_features": 32, "num_levels": 4,
                                          "layer_order": "cil", "se_mode": "scse", "lr": 5e-4}) == NetworkConfig()
    cfg = config_from_published_options({"model": "res-unet", "num_features": 8, "num_levels": 3,
                                         "layer_order": "cgl", "pool_mode": "avg"})
    assert cfg.features == (8, 16, 32) and cfg.norm == "group" and cfg.se_mode == "none" and cfg.pool == "avg"
    assert config_from_published_options({"layer_order": "cl"}).norm == "none"
    with pytest.raises(BrainshiftError, match="model"):
        config_from_published_options({"model": "vxm"})
    with pytest.raises(BrainshiftError, match="layer order"):
        config_from_published_options({"layer_order": "cir"})
