"""The one place that turns a device name into a torch device.

``auto`` picks ``cuda`` when torch sees a GPU, else ``cpu``; an explicit ``cuda`` without a GPU is an error,
never a silent CPU fallback. torch is imported only when this is called.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from brainshift.errors import BrainshiftError

if TYPE_CHECKING:
    import torch

#: Device names accepted on the command line (``cuda:N`` too).
DEVICE_CHOICES = ("auto", "cpu", "cuda")
_DEVICE_NAME = re.compile(r"auto|(cpu|cuda)(:\d+)?")


def check_device_name(device: str) -> str:
    """``device`` stripped and in lower case if it is a name :func:`resolve_device` takes (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``), without importing torch and without looking for a GPU.

    Raises:
        BrainshiftError: any other name (``tpu``, ``gpu``, ``cdua``).
    """
    name = device.strip().lower() if isinstance(device, str) else ""
    if not _DEVICE_NAME.fullmatch(name):
        raise BrainshiftError(f"expected device 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return name


def check_device(device: str | torch.device) -> None:
    """Refuse, before any work, a device that cannot run the network: a bad name (:func:`check_device_name`), or
    ``cuda`` / ``cuda:N`` without that GPU (:func:`resolve_device`; torch is imported only for those names).

    ``auto`` and ``cpu`` always resolve, so a caller can leave torch's import (1-2 s) to a background thread.

    Raises:
        BrainshiftError: as :func:`check_device_name` and :func:`resolve_device`.
    """
    if not isinstance(device, str):  # a torch.device: torch is imported already
        resolve_device(device)
        return
    name = check_device_name(device)
    if name not in ("auto", "cpu"):
        resolve_device(name)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (or a ``torch.device``).

    Returns:
        ``torch.device``; ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.

    Raises:
        BrainshiftError: an unknown device name, CUDA asked for but not available, or a CUDA index at or above
            the number of GPUs.
    """
    import torch

    if isinstance(device, str):
        device = check_device_name(device)  # one rule for names, with or without torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BrainshiftError(f"expected a torch device such as 'cpu' or 'cuda', got {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BrainshiftError(f"expected a CUDA GPU for device {device!r}, got none (torch.cuda.is_available() "
                                  f"is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BrainshiftError(f"expected a CUDA device index below {torch.cuda.device_count()}, got {dev.index}")
    elif dev.type != "cpu":
        raise BrainshiftError(f"expected device 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return dev
