"""Loading and saving the refinement network's weights.

Two formats:

- **Ours** (``.safetensors``): the state dict as safetensors tensors, with the :class:`NetworkConfig` and the
  training metadata embedded in the safetensors header metadata as JSON strings (keys ``format``,
  ``format_version``, ``config``, ``metadata``), so the file alone rebuilds its network (the habit of
  VoxelMorph's ``modelio``). Safetensors cannot run code when read.
- **Published** (``.pt`` / ``.pth``): a torch pickle holding a dict with ``model_state_dict`` (or a bare state
  dict) with the manifest's tensor names. It is read with ``torch.load(..., weights_only=True)`` only; a file
  that needs arbitrary unpickling is refused with :class:`InputFileError` (never retried with
  ``weights_only=False``). It carries no configuration, so the architecture is the published one unless
  another :class:`NetworkConfig` is given.

Tensor names and shapes are checked against the architecture before loading; the error names the first
mismatching tensor with its expected and found shape, and the missing / unexpected names.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.io.atomic import atomic_output
from brainshift.model.network import NetworkConfig, build_network

FORMAT_NAME = "brainshift-refinement-network"
FORMAT_VERSION = "1"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth")


@dataclass
class LoadedModel:
    """A network with its configuration and metadata, in eval mode.

    Attributes:
        model: the :class:`~brainshift.model.network.ResidualUNetSE`.
        config: its :class:`NetworkConfig`.
        metadata: training metadata (ours) or the non-tensor entries of a published checkpoint, plus
            ``source_path`` and ``source_format`` (``safetensors`` | ``published``).
    """

    model: nn.Module
    config: NetworkConfig
    metadata: dict = field(default_factory=dict)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_weights(path: str | os.PathLike, model: nn.Module, config: NetworkConfig | dict,
                 metadata: dict | None = None) -> None:
    """Save ``model``'s weights with ``config`` and ``metadata`` embedded (safetensors, written atomically).

    Args:
        path: target file; should end in ``.safetensors``.
        model: the network (DDP / compile wrappers are unwrapped).
        config: its :class:`NetworkConfig` (or dict).
        metadata: JSON-serialisable training metadata (epochs, losses, dataset, git commit...); values JSON
            cannot represent are written with ``str``.

    Raises:
        BrainshiftError: wrong suffix, or a state dict that does not match ``config``'s architecture.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix not in SAFETENSORS_SUFFIXES:
        raise BrainshiftError(f"expected a weights path ending in .safetensors, got {p.name!r}")
    cfg = NetworkConfig.from_dict(config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap_model(model).state_dict().items()}
    check_state_dict(state, build_network(cfg).state_dict())
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_json(),
        "metadata": json.dumps(metadata or {}, sort_keys=True, default=str),
    }
    with atomic_output(p) as tmp:
        save_file(state, str(tmp), metadata=header)


def check_state_dict(state: dict, expected: dict) -> None:
    """Check names and shapes of ``state`` against the architecture's ``expected`` state dict.

    Raises:
        InputFileError: naming the first tensor (in the architecture's order) whose shape differs
            (expected vs got), then missing and unexpected names.
    """
    for name, ref in expected.items():
        if name in state and tuple(state[name].shape) != tuple(ref.shape):
            raise InputFileError(f"expected tensor {name!r} of shape {tuple(ref.shape)} for this architecture, "
                                 f"got {tuple(state[name].shape)}")
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing or unexpected:
        def _few(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {_few(unexpected)}")
        raise InputFileError(f"expected the architecture's {len(expected)} tensor names, got "
                             + "; ".join(parts))


def _build_loaded(state: dict, config: NetworkConfig, metadata: dict, device) -> LoadedModel:
    model = build_network(config)
    check_state_dict(state, model.state_dict())
    ref = model.state_dict()
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=True)
    model.eval()
    return LoadedModel(model=model.to(device), config=config, metadata=metadata)


def _load_safetensors(p: Path, device) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            header = fh.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputFileError(f"expected a readable safetensors weights file, got {p}: {exc}") from None
    if header.get("format") != FORMAT_NAME or "config" not in header:
        raise InputFileError(f"expected a brainshift weights file with an embedded network config "
                             f"(metadata format={FORMAT_NAME!r}), got metadata keys {sorted(header)} in {p}")
    try:
        cfg_dict = json.loads(header["config"])
        metadata = json.loads(header.get("metadata", "{}"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"expected JSON network config and metadata in {p}, got invalid JSON: {exc}") from None
    config = NetworkConfig.from_dict(cfg_dict)
    metadata = dict(metadata, source_path=str(p), source_format="safetensors")
    return _build_loaded(state, config, metadata, device)


def peek_network_config(path: str | os.PathLike) -> NetworkConfig | None:
    """The network configuration embedded in a brainshift ``.safetensors`` file, read from its header only (no
    tensors); ``None`` for any other file or one that cannot be read (:func:`load_weights` then says why)."""
    p = Path(path)
    if p.suffix != ".safetensors":
        return None
    try:
        from safetensors.torch import safe_open

        with safe_open(str(p), framework="pt") as fh:
            header = fh.metadata() or {}
        return NetworkConfig.from_dict(json.loads(header["config"]))
    except Exception:  # noqa: BLE001 - a peek: load_weights reports what is wrong with the file
        return None


def _torch_file_kind(p: Path) -> str:
    """``"zip"`` (torch >= 1.6 format), ``"pickle"`` (legacy), ``"empty"`` or ``"other"`` from the first bytes."""
    with open(p, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "empty"
    if head == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "other"


def _load_published(p: Path, device, config: NetworkConfig | None) -> LoadedModel:
    kind = _torch_file_kind(p)
    if kind == "empty":
        raise InputFileError(f"expected a torch checkpoint in {p}, got an empty file (0 bytes)")
    if kind == "other":
        raise InputFileError(f"expected a torch checkpoint (a zip archive or a pickle) in {p}, got a file that is "
                             f"neither: corrupt, or another format")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if match is None:
            raise InputFileError(f"expected a readable torch checkpoint in {p}, got a corrupt file "
                                 f"(its pickle cannot be read)") from None
        raise InputFileError(
            f"expected a torch checkpoint loadable with weights_only=True (tensors and plain containers only), "
            f"got {p.name}, which needs arbitrary unpickling; refusing to load it (it references "
            f"{match.group(1)})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        cause = " ".join(str(exc).split(".")[0].split()) or type(exc).__name__
        raise InputFileError(f"expected a complete torch checkpoint in {p}, got a truncated or corrupt file "
                             f"({cause})") from None
    metadata: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        state = obj["model_state_dict"]
        metadata = {k: v for k, v in obj.items()
                    if k != "model_state_dict" and isinstance(v, (int, float, str, bool))}
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    else:
        raise InputFileError(f"expected a dict with 'model_state_dict' or a plain state dict in {p}, got "
                             f"{type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:8]}"
                                                         if isinstance(obj, dict) else ""))
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputFileError(f"expected only tensors in the state dict of {p}")
    source = "published"
    if config is None and isinstance(obj, dict) and isinstance(obj.get("network_config"), str):
        # our own training state (`last.pt` of `brainshift train`) records its architecture: use it
        config = NetworkConfig.from_dict(json.loads(obj["network_config"]))
        source = "brainshift training state"
    cfg = NetworkConfig() if config is None else NetworkConfig.from_dict(config)
    metadata.update(source_path=str(p), source_format=source)
    return _build_loaded(state, cfg, metadata, device)


def load_weights(path: str | os.PathLike, device="cpu", config: NetworkConfig | dict | None = None) -> LoadedModel:
    """Load a network from our safetensors file or a published-format torch checkpoint.

    Args:
        path: ``.safetensors`` (ours: the config comes from the file) or ``.pt`` / ``.pth`` (published).
        device: torch device for the model (``cpu``, ``cuda``...); see
            :func:`brainshift.device.resolve_device`.
        config: architecture for a published checkpoint (default: the published one). Must be None for a
            safetensors file, whose embedded config is used.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        InputFileError: missing file, unknown suffix, a pickle needing arbitrary code, a state dict whose
            names/shapes do not match the architecture (first mismatch named), missing embedded config.
    """
    from brainshift.device import resolve_device

    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"expected a weights file, got the directory {p}")
    if not p.is_file():
        raise InputFileError(f"expected a weights file, got a missing path {p}")
    dev = resolve_device(device)
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        if config is not None:
            raise BrainshiftError("expected no config for a safetensors weights file (it embeds its own), got one")
        return _load_safetensors(p, dev)
    if suffix in TORCH_SUFFIXES:
        return _load_published(p, dev, None if config is None else NetworkConfig.from_dict(config))
    raise InputFileError(f"expected weights ending in .safetensors, .pt or .pth, got {p.name!r}")
