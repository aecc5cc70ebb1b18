"""Files shipped inside the package: the default model and the configuration presets.

Resolved through :mod:`importlib.resources`, so they are found the same way from a source checkout, an
editable install and a wheel (``pip install .``), from any working directory. The repository's top-level
``weights/default.safetensors`` is a link to the packaged file and ``src/brainshift/data/configs`` a link to the
top-level ``configs/`` folder, so each file is stored once.

This module is the one place that decides which network ``infer``, ``evaluate`` and ``demo`` refine with when
no ``--weights`` is given (:func:`resolve_weights`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from brainshift.errors import InputFileError

#: File name of the shipped default model inside ``brainshift/data/weights/``.
DEFAULT_MODEL_NAME = "default.safetensors"


def _data_dir() -> Path:
    return Path(str(resources.files("brainshift").joinpath("data")))


#: The shipped default model (may be absent from a stripped install; tests point it elsewhere).
DEFAULT_WEIGHTS: Path = _data_dir() / "weights" / DEFAULT_MODEL_NAME


#: How records and reports name the shipped default model (:func:`weights_name`): the same on every machine.
DEFAULT_MODEL_LABEL = "default (shipped)"


def default_weights() -> Path | None:
    """The shipped default model file, or None when the package was installed without it."""
    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


def resolve_weights(weights: str | Path | None, *, required: bool = False) -> Path | None:
    """The network weights to use: ``weights`` when given (it must exist), else the shipped default model.

    Args:
        weights: a weights file chosen by the user, or None for the default model.
        required: raise instead of returning None when no weights are given and no default model ships.

    Returns:
        The weights path, or None (``weights`` None, no default model, ``required`` False).

    Raises:
        InputFileError: ``weights`` given but not a file; or none given, no default model and ``required``.
    """
    if weights is not None:
        p = Path(weights)
        if p.is_dir():
            raise InputFileError(f"expected a weights file at -w/--weights, got the directory {p}")
        if not p.is_file():
            raise InputFileError(f"expected a weights file at {p}, got no such file (not found)")
        return p
    default = default_weights()
    if default is None and required:
        raise InputFileError(f"expected network weights (-w/--weights FILE), got none and no default model at "
                             f"{DEFAULT_WEIGHTS}")
    return default


def weights_name(weights: str | Path) -> str:
    """A machine-independent name of a weights file for records and reports (``summary.json``, ``report.html``):
    :data:`DEFAULT_MODEL_LABEL` for the shipped default model (:data:`DEFAULT_WEIGHTS`, also when reached through
    a link or given with ``--weights``), else the file's name. Record the path beside it."""
    p = Path(weights)
    try:
        if p.resolve() == Path(DEFAULT_WEIGHTS).resolve():
            return DEFAULT_MODEL_LABEL
    except OSError:  # an unresolvable path is not the shipped model
        pass
    return p.name


def config_path(name: str) -> Path:
    """A shipped configuration preset: ``name`` with or without ``.yaml`` (e.g. ``train_default``).

    Raises:
        InputFileError: no such preset (the message lists the shipped ones).
    """
    stem = name.removesuffix(".yaml")
    p = _data_dir() / "configs" / f"{stem}.yaml"
    if not p.is_file():
        raise InputFileError(f"expected a shipped config among {', '.join(config_names())}, got {name!r}")
    return p


def config_names() -> list[str]:
    """Names (without ``.yaml``) of the shipped configuration presets, sorted."""
    d = _data_dir() / "configs"
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []
