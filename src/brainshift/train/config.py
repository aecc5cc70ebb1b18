"""Training configuration: the published training options (names and defaults) plus ours.

A :class:`TrainConfig` is read from a YAML or JSON file (``brainshift train --config FILE``); a JSON config of
the published training script works as is (its option names are accepted, with ``-`` or ``_``). Command-line
options override the file. Unknown keys raise :class:`~brainshift.errors.BrainshiftError` naming them. Every
run writes the resolved configuration to ``save_dir/config_resolved.yaml``.

Published options (Assis et al. 2025; names and defaults from the published training script, see
``shared/reference/published_architecture.md``): ``data, test, checkpoint, load_model, save_dir, configs,
split, batch_size, size, model, predict_residual, layer_order, num_features, num_levels, num_groups, se_mode,
upsample_mode, pool_mode, mse_w, epochs, lr, lncc, lncc_w, lncc_window, hessian, jdet, jdet_mode, reg_w,
extra_eval, augment, evaluate_every, interp, num_kpts, min_kpts, max_kpts, device, seed``.

How the published network options map to :class:`brainshift.model.NetworkConfig` (see
:func:`network_config`): ``num_features * 2**level`` features for ``num_levels`` levels; ``layer_order``
``"cil"`` (conv, instance norm, LeakyReLU) -> ``norm="instance"``, ``"cbl"`` -> ``"batch"``, ``"cgl"`` ->
``"group"``, ``"cl"`` -> ``"none"``; ``model="res-unet"`` -> no squeeze-excitation, ``"res-unet-se"`` ->
``se_mode``; ``upsample_mode`` ``None`` -> transposed convolution (the published architecture), else
``"nearest"`` / ``"trilinear"``; ``pool_mode`` -> ``pool``. Our option ``preset`` (a name of
``brainshift.model.PRESETS``) replaces that mapping, and ``network`` (a dict of ``NetworkConfig`` fields) and
``spacing_mm`` override the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainshift.errors import BrainshiftError, InputFileError

#: the initial-field interpolators a training sample can draw (``interp_methods``)
TRAIN_INTERPOLATORS = ("linear", "tps", "tps3d", "gp")
_INTERP_CHOICES = ("linear", "tps", "mixed")
_JDET_MODES = ("negative", "unit")
_MODELS = ("res-unet-se", "res-unet")
_LAYER_ORDER_NORM = {"cil": "instance", "cbl": "batch", "cgl": "group", "cl": "none"}


@dataclass
class TrainConfig:
    """Every option of ``brainshift train``.

    Published options (same names and defaults as the published training script):

    Attributes:
        data: dataset folder in the layout of :mod:`brainshift.simulate.dataset`, or a list of such folders
            (their union; a one-element list is the folder itself, see :func:`data_folders`). With several
            folders each case is named ``"<folder index>-<case id>"`` (0-based position in the list; e.g.
            ``"1-s0000_c00"``) in ``splits.json`` and the caches, and the split by subject spans the folders:
            equal subject ids in two folders are treated as the same brain (true when the folders were simulated
            with the same ``--seed``; otherwise merely conservative: a subject id's cases never straddle splits).
        test: optional second dataset used only for the final test evaluation (instead of the test split).
        checkpoint: a training-state file (``last.pt``) to resume from (implies ``resume``).
        load_model: initial weights (ours ``.safetensors`` or the published ``.pt``) to fine-tune. Their network
            configuration is used, except ``network: {keypoint_channel, keypoint_scale_mm}``, which add (or change)
            the keypoint channel; its first-layer weights start at zero, so training starts from the loaded model.
        save_dir: output folder (checkpoints, resolved config, splits, logs).
        configs: the configuration file this config was read from (recorded only).
        split: ``[validation, test]`` fractions of the SUBJECTS (no subject is in two splits).
        batch_size: samples per optimiser step (per process under DDP).
        size: training crop ``(I, J, K)`` in network-grid voxels, centred on the brain; ``None`` = the whole
            padded network grid (validation always uses the whole grid).
        model: ``"res-unet-se"`` (published) or ``"res-unet"`` (no squeeze-excitation).
        predict_residual: the network adds its prediction to the input field (published: True).
        layer_order, num_features, num_levels, num_groups, se_mode, upsample_mode, pool_mode: network options
            (mapping in the module docstring).
        mse_w: weight of the masked MSE to the ground-truth field.
        mse_relative: ours. Each sample's masked MSE is divided by its INITIAL field's masked MSE (at least
            ``mse_floor_mm2``) before averaging over the batch (:func:`brainshift.train.losses.relative_masked_mse`),
            so every case counts by how much of its initial error the network removes (the per-case ratio the
            benchmarks report) instead of by its size in mm²; the best checkpoint is then chosen by the validation
            cases' mean ratio (``mse_ratio``) instead of their mean MSE.
        mse_floor_mm2: ours. The smallest initial-field MSE (mm², > 0) a relative MSE divides by, so nearly exact
            initial fields do not weigh without bound.
        epochs, lr: Adam epochs and learning rate.
        lncc, lncc_w, lncc_window: local normalised cross-correlation image loss (MONAI), its weight and
            half window (kernel ``2 * lncc_window + 1`` voxels).
        hessian: bending-energy regularisation (MONAI ``BendingEnergyLoss``), weight ``reg_w``.
        jdet, jdet_mode: Jacobian-determinant regularisation (``negative`` | ``unit``), weight ``reg_w``.
        reg_w: weight of the regularisation terms.
        extra_eval: validation also computes Dice and HD95 of the warped tumour mask.
        augment: MONAI intensity augmentation of the image channel.
        evaluate_every: validate every N epochs.
        interp: ``"linear"``, ``"tps"`` or ``None`` (random choice per sample, the published "mixed").
        num_kpts: if set, ``min_kpts = max_kpts = num_kpts``.
        min_kpts, max_kpts: keypoints per sample, drawn uniformly in ``[min_kpts, max_kpts]``.
        device: ``"cuda"`` (published default) or ``"cpu"``; ``"cuda"`` without a GPU is an error.
        seed: seed of every random draw (python, numpy, torch, workers, splits).

    Ours:

    Attributes:
        preset: name in ``brainshift.model.PRESETS`` (replaces the published network options).
        network: ``NetworkConfig`` field overrides, applied last.
        spacing_mm: grid spacing the network works on (``None``: from the network config).
        cache_dir: folder for MONAI ``PersistentDataset`` caches (``None``: in-memory ``CacheDataset``).
        num_workers: DataLoader workers.
        variants_per_case: size of the cached pool of (keypoint draw, interpolation) variants per case;
            0 draws a fresh variant for every sample (no cache of variants).
        samples_per_epoch: samples per epoch (``None``: one per training subject).
        heldout_kpts: random held-out points per case for TRE when a subject has no ``keypoints.csv``.
        keypoint_rules: where keypoints come from, one rule drawn per sample among ``detected``, ``random``,
            ``cortex``, ``craniotomy`` (:func:`brainshift.train.data.keypoint_candidates`).
        noise_mm: ``[low, high]`` standard deviation (mm) of the Gaussian noise on each world component of the
            driving displacements, drawn per sample (``[0, 0]``: exact displacements).
        interp_methods: the interpolators ``interp: null`` ("mixed") chooses among
            (:data:`TRAIN_INTERPOLATORS`: ``linear``, ``tps``, ``tps3d``, ``gp``; ``gp`` since session 31, which
            no shipped model has trained on yet).
        flip_axes: network-grid array axes along which each training sample is mirrored with probability 1/2
            (image, initial field, ground truth and mask together; the field's component along a mirrored axis
            changes sign). Mirroring the whole problem (anatomy, tumour, gravity) gives another exact solution
            of the same mechanics (linear or hyperelastic, isotropic materials), so it is a label-preserving
            augmentation; ``[0]`` (left-right on RAS-like grids) keeps samples anatomically plausible.
        lr_schedule: ``"constant"`` or ``"cosine"``: the learning rate decays from ``lr`` to ``lr_min`` along half
            a cosine over the planned steps (``epochs`` x steps per epoch), a function of the step only, so a
            resumed run continues the same curve (Loshchilov & Hutter, SGDR, 2017, without restarts).
        lr_min: the final learning rate of the cosine schedule.
        zero_init_head: a network trained from scratch starts with its final 1x1x1 convolution at zero, so
            with ``predict_residual`` it starts as the identity refinement (output = the initial field) rather
            than adding random millimetres to it (no effect with ``load_model`` or a resumed state).
        max_steps: stop after this many optimiser steps (tests, smoke runs).
        max_minutes: stop after the optimiser step that passes this many minutes of training in this run (a
            time budget, e.g. for a CPU session); the model is then validated and saved as after an epoch, and
            ``--resume`` continues from there.
        log_dir: TensorBoard folder (``None``: ``save_dir/logs``).
        resume: continue from ``save_dir/last.pt`` (or ``checkpoint``): weights, Adam moments, epoch and step;
            the learning rate is this config's ``lr`` (so a resumed run can lower it).
        progress: tqdm progress bars.
        val_subjects: subject ids (``sNNNN``) that form the validation split, replacing its fraction (e.g. to
            keep the same validation subjects while a dataset grows in parts); the test fraction is then drawn
            from the remaining subjects. Every id must be a subject of ``data`` (of any of its folders).
    """

    data: str | tuple[str, ...] | None = None
    test: str | None = None
    checkpoint: str | None = None
    load_model: str | None = None
    save_dir: str = "checkpoints"
    configs: str | None = None
    split: tuple[float, float] = (0.10, 0.15)
    batch_size: int = 1
    size: tuple[int, int, int] | None = (160, 192, 144)
    model: str = "res-unet-se"
    predict_residual: bool = True
    layer_order: str = "cil"
    num_features: int = 32
    num_levels: int = 4
    num_groups: int = 8
    se_mode: str = "scse"
    upsample_mode: str | None = None
    pool_mode: str = "max"
    mse_w: float = 1.0
    epochs: int = 20
    lr: float = 1e-4
    lncc: bool = False
    lncc_w: float = 1.0
    lncc_window: int = 2
    hessian: bool = False
    jdet: bool = False
    jdet_mode: str = "negative"
    reg_w: float = 1.0
    extra_eval: bool = False
    augment: bool = False
    evaluate_every: int = 1
    interp: str | None = None
    num_kpts: int | None = None
    min_kpts: int = 20
    max_kpts: int = 20
    device: str = "cuda"
    seed: int = 0
    # --- ours ---
    preset: str | None = None
    network: dict[str, Any] = field(default_factory=dict)
    spacing_mm: float | None = None
    cache_dir: str | None = None
    num_workers: int = 0
    variants_per_case: int = 0
    samples_per_epoch: int | None = None
    heldout_kpts: int = 50
    keypoint_rules: tuple[str, ...] = ("detected",)
    noise_mm: tuple[float, float] = (0.0, 0.0)
    interp_methods: tuple[str, ...] = ("linear", "tps")
    flip_axes: tuple[int, ...] = ()
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    zero_init_head: bool = True
    max_steps: int | None = None
    max_minutes: float | None = None
    log_dir: str | None = None
    resume: bool = False
    progress: bool = True
    val_subjects: tuple[str, ...] = ()
    mse_relative: bool = False
    mse_floor_mm2: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.data, list | tuple):  # a one-element list is the folder itself
            folders = data_folders(self.data)
            self.data = folders[0] if len(folders) == 1 else folders
        validate(self)

    @property
    def variant_options(self) -> dict[str, Any]:
        """Keyword options of :func:`brainshift.train.data.draw_variant` beyond ``interp`` and ``k_range``."""
        return {"rules": tuple(self.keypoint_rules), "noise_mm": tuple(float(x) for x in self.noise_mm),
                "methods": tuple(self.interp_methods)}

    @property
    def k_range(self) -> tuple[int, int]:
        """``(min, max)`` keypoints per sample (``num_kpts`` wins when set)."""
        if self.num_kpts is not None:
            return int(self.num_kpts), int(self.num_kpts)
        return int(self.min_kpts), int(self.max_kpts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


_INT = {"batch_size", "num_features", "num_levels", "num_groups", "epochs", "lncc_window", "evaluate_every",
        "min_kpts", "max_kpts", "seed", "num_workers", "variants_per_case", "heldout_kpts"}
_OPT_INT = {"num_kpts", "max_steps", "samples_per_epoch"}
_FLOAT = {"mse_w", "lr", "lncc_w", "reg_w", "lr_min", "mse_floor_mm2"}
_OPT_FLOAT = {"spacing_mm", "max_minutes"}
_BOOL = {"predict_residual", "zero_init_head", "lncc", "hessian", "jdet", "extra_eval", "augment", "resume",
         "progress", "mse_relative"}
_STR = {"save_dir", "model", "layer_order", "se_mode", "pool_mode", "jdet_mode", "device", "lr_schedule"}
# Options naming one of a fixed set of choices: read in any case (``interp_methods: [TPS]``), as the CLI reads -m.
_CHOICE = {"model", "layer_order", "se_mode", "pool_mode", "jdet_mode", "device", "lr_schedule", "upsample_mode",
           "interp", "preset", "keypoint_rules", "interp_methods"}
_OPT_STR = {"test", "checkpoint", "load_model", "configs", "upsample_mode", "interp", "preset",
            "cache_dir", "log_dir"}


#: Keypoint rules of training samples (:func:`brainshift.train.data.keypoint_candidates`).
KEYPOINT_RULES = ("detected", "random", "cortex", "craniotomy")


def data_folders(data: str | Path | list | tuple) -> tuple[str, ...]:
    """The dataset folders a ``data`` value names, in order: ``(str(data),)`` for one folder (a string or path),
    the entries for a list. Checks the form only; whether a folder exists and holds complete cases is checked
    where it is read (:func:`brainshift.train.data.split_cases`, :func:`brainshift.train.loop.train`).

    Raises:
        BrainshiftError: neither a folder nor a list of folders, an empty list or entry, or a folder listed
            twice (compared after resolving the paths, so ``data`` and ``./data`` are the same folder).
    """
    if isinstance(data, str | Path):
        return (str(data),)
    if not isinstance(data, list | tuple) or not all(isinstance(d, str | Path) and str(d) for d in data):
        raise BrainshiftError(f"expected data to be a dataset folder or a list of folders, got {data!r}")
    if not data:
        raise BrainshiftError("expected data to list at least one dataset folder, got an empty list")
    folders = tuple(str(d) for d in data)
    seen: dict[Path, str] = {}
    for f in folders:
        r = Path(f).resolve()
        if r in seen:
            raise BrainshiftError(f"expected each dataset folder of data once, got {r} twice (as {seen[r]!r} and "
                                  f"{f!r})")
        seen[r] = f
    return folders


def field_names() -> list[str]:
    """All option names of :class:`TrainConfig`."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(name: str, value: Any) -> Any:
    """Convert a value read from a file or the command line to the option's type."""
    if name == "data" and value is not None:
        folders = data_folders(value)
        return folders[0] if len(folders) == 1 else folders
    try:
        if value is None:
            if name in ("flip_axes", "val_subjects"):
                return ()  # null: no mirroring / the validation fraction
            if name in _INT | _FLOAT | _BOOL | _STR | {"split", "network"}:
                raise BrainshiftError(f"expected a value for option {name!r}, got null")
            return None
        if name in _INT or name in _OPT_INT:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            return int(value)
        if name in _FLOAT or name in _OPT_FLOAT:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise BrainshiftError(f"expected a finite number for option {name!r}, got {value!r}")
            return float(value)
        if name in _BOOL:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool | int):
                raise ValueError
            return bool(value)
        if name in _STR or name in _OPT_STR:
            if not isinstance(value, str | Path):
                raise ValueError
            s = str(value)
            if name in ("interp", "upsample_mode") and s.lower() in ("none", "null", "random", ""):
                return None
            return s.lower() if name in _CHOICE else s
        if name == "split":
            if not isinstance(value, list | tuple):
                raise ValueError
            vals = tuple(float(v) for v in value)
            if len(vals) != 2:
                raise ValueError
            return vals
        if name == "size":
            if not isinstance(value, list | tuple) or any(isinstance(v, bool) or float(v) != int(v) for v in value):
                raise ValueError
            vals = tuple(int(v) for v in value)
            if len(vals) != 3:
                raise ValueError
            return vals
        if name == "flip_axes":
            items = str(value).replace(",", " ").split() if isinstance(value, str | int) else value
            try:
                if isinstance(items, bool) or any(isinstance(v, bool) or float(v) != int(v) for v in items):
                    raise ValueError
                return tuple(int(v) for v in items)
            except (TypeError, ValueError):
                raise BrainshiftError(f"expected flip_axes to be a list of array axes among 0, 1, 2 (e.g. [0]), "
                                      f"got {value!r}") from None
        if name in ("keypoint_rules", "interp_methods", "val_subjects"):
            items = str(value).replace(",", " ").split() if isinstance(value, str) else value
            if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
                raise ValueError
            return tuple(v.lower() for v in items) if name in _CHOICE else tuple(items)
        if name == "noise_mm":
            vals = tuple(float(v) for v in ([value, value] if isinstance(value, int | float) else value))
            if len(vals) != 2:
                raise ValueError
            return vals
        if name == "network":
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except BrainshiftError:
        raise
    except (TypeError, ValueError):
        raise BrainshiftError(f"expected a valid value for option {name!r}, got {value!r}") from None
    return value


def validate(cfg: TrainConfig) -> None:
    """Check option values and their combinations.

    Raises:
        BrainshiftError: naming the first bad option, what was expected and what was found.
    """
    if cfg.model not in _MODELS:
        raise BrainshiftError(f"expected model in {_MODELS} (unet and vxm are not provided), got {cfg.model!r}")
    if cfg.layer_order not in _LAYER_ORDER_NORM:
        raise BrainshiftError(f"expected layer_order in {tuple(_LAYER_ORDER_NORM)}, got {cfg.layer_order!r}")
    if cfg.se_mode not in ("scse", "cse", "sse", "none"):
        raise BrainshiftError(f"expected se_mode in ('scse', 'cse', 'sse'), got {cfg.se_mode!r}")
    if cfg.upsample_mode not in (None, "nearest", "trilinear", "transposed"):
        raise BrainshiftError(f"expected upsample_mode None, 'nearest' or 'trilinear', got {cfg.upsample_mode!r}")
    if cfg.pool_mode not in ("max", "avg"):
        raise BrainshiftError(f"expected pool_mode 'max' or 'avg', got {cfg.pool_mode!r}")
    if cfg.jdet_mode not in _JDET_MODES:
        raise BrainshiftError(f"expected jdet_mode in {_JDET_MODES}, got {cfg.jdet_mode!r}")
    if cfg.interp is not None and cfg.interp not in _INTERP_CHOICES:
        raise BrainshiftError(f"expected interp in ('linear', 'tps') or None (random), got {cfg.interp!r}")
    if len(cfg.split) != 2 or min(cfg.split) < 0 or sum(cfg.split) >= 1:
        raise BrainshiftError(f"expected split [val, test] fractions >= 0 summing to < 1, got {list(cfg.split)}")
    kmin, kmax = cfg.k_range
    if kmin < 4 or kmax < kmin:
        raise BrainshiftError(f"expected 4 <= min_kpts <= max_kpts, got min_kpts={kmin}, max_kpts={kmax}")
    for name in ("batch_size", "epochs", "evaluate_every", "num_levels", "num_features", "lncc_window"):
        if getattr(cfg, name) < 1:
            raise BrainshiftError(f"expected {name} >= 1, got {getattr(cfg, name)}")
    for name in ("num_workers", "variants_per_case", "heldout_kpts", "seed"):
        if getattr(cfg, name) < 0:
            raise BrainshiftError(f"expected {name} >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise BrainshiftError(f"expected max_steps >= 1, got {cfg.max_steps}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise BrainshiftError(f"expected max_minutes > 0, got {cfg.max_minutes}")
    if cfg.lr <= 0:
        raise BrainshiftError(f"expected a positive learning rate, got {cfg.lr}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise BrainshiftError(f"expected lr_schedule 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    if cfg.lr_min < 0 or (cfg.lr_schedule == "cosine" and cfg.lr_min > cfg.lr):
        raise BrainshiftError(f"expected 0 <= lr_min <= lr ({cfg.lr}) for the cosine schedule, got {cfg.lr_min}")
    if any(a not in (0, 1, 2) for a in cfg.flip_axes) or len(set(cfg.flip_axes)) != len(cfg.flip_axes):
        raise BrainshiftError(f"expected flip_axes to be distinct array axes among 0, 1, 2, got {list(cfg.flip_axes)}")
    if not cfg.keypoint_rules or set(cfg.keypoint_rules) - set(KEYPOINT_RULES):
        raise BrainshiftError(f"expected keypoint_rules among {list(KEYPOINT_RULES)}, got {list(cfg.keypoint_rules)}")
    lo, hi = cfg.noise_mm
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi):
        raise BrainshiftError(f"expected noise_mm as [low, high] with 0 <= low <= high, got {list(cfg.noise_mm)}")
    if not cfg.interp_methods or set(cfg.interp_methods) - set(TRAIN_INTERPOLATORS):
        raise BrainshiftError(f"expected interp_methods among {list(TRAIN_INTERPOLATORS)}, got "
                              f"{list(cfg.interp_methods)}")
    if len(set(cfg.val_subjects)) != len(cfg.val_subjects) or not all(str(v).strip() for v in cfg.val_subjects):
        raise BrainshiftError(f"expected val_subjects to be distinct, non-empty subject ids, got "
                              f"{list(cfg.val_subjects)}")
    if cfg.size is not None and (len(cfg.size) != 3 or min(cfg.size) < 1):
        raise BrainshiftError(f"expected size (I, J, K) of positive ints or None, got {cfg.size}")
    if not (cfg.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", cfg.device)):
        raise BrainshiftError(f"expected device 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    for name in ("mse_w", "lncc_w", "reg_w"):
        if not getattr(cfg, name) >= 0:
            raise BrainshiftError(f"expected {name} >= 0 (a loss weight), got {getattr(cfg, name)}")
    if not cfg.mse_floor_mm2 > 0:
        raise BrainshiftError(f"expected mse_floor_mm2 > 0 (mm², the smallest initial-field MSE a relative MSE "
                              f"divides by), got {cfg.mse_floor_mm2}")
    if cfg.spacing_mm is not None and not cfg.spacing_mm > 0:
        raise BrainshiftError(f"expected spacing_mm > 0 (mm) or null, got {cfg.spacing_mm}")
    if not isinstance(cfg.network, dict):
        raise BrainshiftError(f"expected network to be a mapping of NetworkConfig fields, got {cfg.network!r}")


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from ``values`` (on top of ``base`` or the defaults).

    Keys may use ``-`` or ``_``; a leading ``--`` is dropped (published argparse names).

    Raises:
        BrainshiftError: unknown keys (all of them listed) or bad values.
    """
    known = set(field_names())
    norm = {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(k for k in norm if k not in known)
    if unknown:
        raise BrainshiftError(f"expected training options among the known names, got unknown key(s): "
                              f"{', '.join(unknown)} (see brainshift.train.config.TrainConfig)")
    current = (base or TrainConfig()).to_dict()
    current.update(norm)
    current = {k: _coerce(k, v) for k, v in current.items()}
    return TrainConfig(**current)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file into a dict.

    Raises:
        InputFileError: missing or unparsable file, or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"expected a training config file at {p}, "
                             + ("got a directory" if p.is_dir() else "it does not exist"))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"expected a UTF-8 text training config file (YAML or JSON), got {p}, which is not "
                             f"UTF-8 text") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InputFileError(f"expected a valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'} "
                             f"config in {p}, got a parse error: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputFileError(f"expected a mapping of option names to values in {p}, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file at ``path`` (YAML or JSON), then ``overrides`` (e.g. command-line options).

    ``path`` may also name a preset shipped with the package (``train_default``, ``configs/train_fast.yaml``...;
    :func:`brainshift.resources.config_names`) when no such file exists, so the presets work from a wheel.
    ``overrides`` entries whose value is ``None`` are ignored (option not given).

    Raises:
        BrainshiftError: unknown keys or bad values; InputFileError: unreadable file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        from brainshift.resources import config_names, config_path

        if not Path(path).exists() and Path(path).name.removesuffix(".yaml") in config_names():
            path = config_path(Path(path).name)
        values.update(read_config_file(path))
        values.setdefault("configs", str(path))
    cfg = from_dict(values)
    if overrides:
        cfg = from_dict({k: v for k, v in overrides.items() if v is not None}, base=cfg)
    return cfg


def save_resolved(cfg: TrainConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (atomically) and return the path."""
    import yaml

    from brainshift.io.atomic import atomic_output

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p) as tmp:
        Path(tmp).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return p


def network_config(cfg: TrainConfig):
    """The :class:`brainshift.model.NetworkConfig` this training config asks for (mapping in module doc).

    Raises:
        BrainshiftError: unknown preset or unknown ``network`` field.
    """
    from brainshift.model import PRESETS, NetworkConfig

    if cfg.preset is not None:
        if cfg.preset not in PRESETS:
            raise BrainshiftError(f"expected preset in {sorted(PRESETS)}, got {cfg.preset!r}")
        base = PRESETS[cfg.preset]
        values = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else dict(base)
    else:
        values = dataclasses.asdict(NetworkConfig())
        values["features"] = tuple(cfg.num_features * 2**lvl for lvl in range(cfg.num_levels))
        values["norm"] = _LAYER_ORDER_NORM[cfg.layer_order]
        values["se_mode"] = "none" if cfg.model == "res-unet" else cfg.se_mode
        values["upsample"] = "transposed" if cfg.upsample_mode in (None, "transposed") else cfg.upsample_mode
        values["pool"] = cfg.pool_mode
        values["predict_residual"] = bool(cfg.predict_residual)
        if "num_groups" in values:
            values["num_groups"] = cfg.num_groups
    known = {f.name for f in dataclasses.fields(NetworkConfig)}
    unknown = sorted(set(cfg.network) - known)
    if unknown:
        raise BrainshiftError(f"expected network keys among {sorted(known)}, got unknown: {', '.join(unknown)}")
    values.update(cfg.network)
    if cfg.spacing_mm is not None:
        values["spacing_mm"] = float(cfg.spacing_mm)
    try:
        if "features" in values:
            values["features"] = tuple(int(f) for f in values["features"])
        return NetworkConfig(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, BrainshiftError):
            raise
        raise BrainshiftError(f"expected valid network values, got {cfg.network!r} ({exc})") from None
