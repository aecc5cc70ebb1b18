"""brainshift.keypoints: 3-D scale-space keypoint detection and keypoint sampling from a ground-truth field.

- :func:`detect_keypoints` (``detect.py``): DoG extrema in the spirit of 3D SIFT-Rank -> :class:`Keypoints`.
- :func:`sample_keypoints`, :func:`trilinear_sample` (``sampling.py``): sparse inputs and held-out targets.
- ``commands.py``: the ``brainshift keypoints`` command.

The names below are imported on first use (PEP 562) so that importing the command module stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Keypoints": "brainshift.keypoints.detect",
    "detect_keypoints": "brainshift.keypoints.detect",
    "sample_keypoints": "brainshift.keypoints.sampling",
    "trilinear_sample": "brainshift.keypoints.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'brainshift.keypoints' has no attribute {name!r}")
