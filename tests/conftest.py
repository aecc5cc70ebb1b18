"""Fixtures shared by the whole suite: which default model ``brainshift`` sees.

The repository ships ``weights/default.safetensors``; tests of the behaviour without a default model, and of
the default-model path with a tiny network (fast to run), point :data:`brainshift.resources.DEFAULT_WEIGHTS`
elsewhere instead of depending on what is on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def write_tiny_weights(path: Path, spacing_mm: float = 3.0, keypoint_channel: str = "none") -> Path:
    """A random ``fast-small`` network on a ``spacing_mm`` grid saved as safetensors (seeded); with
    ``keypoint_channel="proximity"`` it takes the keypoint channel too."""
    import torch

    from brainshift.model.checkpoint import save_weights
    from brainshift.model.network import NetworkConfig, build_network, get_preset

    torch.manual_seed(0)
    cfg = NetworkConfig.from_dict({**get_preset("fast-small").to_dict(), "spacing_mm": spacing_mm,
                                   "keypoint_channel": keypoint_channel,
                                   "in_channels": 5 if keypoint_channel != "none" else 4})
    save_weights(path, build_network(cfg), cfg, {"note": "random test network"})
    return path


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """A tiny random network saved as ``tmp_path/tiny.safetensors`` (not installed as the default model)."""
    return write_tiny_weights(tmp_path / "tiny.safetensors")


@pytest.fixture
def no_default_weights(tmp_path, monkeypatch) -> Path:
    """No default model: ``DEFAULT_WEIGHTS`` points at a file that does not exist."""
    import brainshift.resources as resources

    missing = tmp_path / "no_default_model" / "default.safetensors"
    monkeypatch.setattr(resources, "DEFAULT_WEIGHTS", missing)
    return missing


@pytest.fixture
def tiny_default_weights(tmp_path, monkeypatch) -> Path:
    """A tiny random network installed as the default model."""
    import brainshift.resources as resources

    path = write_tiny_weights(tmp_path / "tiny_default.safetensors")
    monkeypatch.setattr(resources, "DEFAULT_WEIGHTS", path)
    return path
