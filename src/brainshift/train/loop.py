"""The training loop: Adam, validation, best/last checkpoints, resume, TensorBoard, single process or DDP.

Files written by rank 0 under ``save_dir``:

- ``config_resolved.yaml``: the full configuration of the run; ``splits.json``: case keys and subject ids per
  split (with several dataset folders in ``data``, keys ``"<folder index>-<case id>"`` and the ``folders`` list;
  :func:`brainshift.train.data.case_key`);
- ``last.pt``: training state for ``--resume`` (a torch file of state dicts, numbers and JSON strings only,
  read back with ``weights_only=True``): ``model_state_dict``, ``optimizer_state_dict``, ``epoch`` (completed),
  ``step``, ``best_val_mse``, ``best_epoch``, ``history``, ``network_config``;
- ``best.safetensors``: the best model by validation MSE (``mse_relative``: by the mean per-case ratio to the
  initial field, ``mse_ratio``; without validation cases: the latest), written by
  :func:`brainshift.model.save_weights` with the training metadata (config, epoch, step, validation metrics,
  dataset summary) embedded, so ``brainshift infer --refine -w best.safetensors`` uses it directly;
- ``history.jsonl``: one line per epoch (mean training loss terms, validation metrics);
- ``test_metrics.json`` when there are test cases; ``logs/`` TensorBoard events (``log_dir``).

Validation runs the inference path exactly (:func:`brainshift.model.to_network_grid` on the whole padded
grid, the network, :func:`brainshift.model.refined_from_prediction`, as inference) and scores on the subject grid with
:mod:`brainshift.evaluate.metrics`: ``mse_mm2`` (squared world-mm error over brain minus cavity, the
checkpoint criterion), ``mae_mm``, ``tre_mm`` (mean over held-out keypoints), ``pct_jacobian_nonpositive``, and the
same for the initial field (``*_init``); with ``extra_eval`` also Dice/HD95 of the warped brain and tumour masks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.train.config import TrainConfig, data_folders, network_config, save_resolved
from brainshift.train.distributed import (
    DistContext,
    barrier,
    cleanup_distributed,
    seed_everything,
    setup_distributed,
    worker_init_fn,
)


@dataclass
class TrainResult:
    """What a training run produced (returned on every rank; files exist on rank 0 only).

    Attributes:
        save_dir: output folder.
        best_path: ``best.safetensors`` (None on ranks > 0 or if no epoch completed).
        last_path: ``last.pt``.
        best_metrics: validation metrics of the best epoch (empty without validation cases).
        best_epoch: 1-based epoch of the best checkpoint.
        test_metrics: metrics of the best model on the test cases (empty without any).
        history: per-epoch records.
        steps: optimiser steps done in total.
        model: the trained network (unwrapped from DDP), on its device.
    """

    save_dir: Path
    best_path: Path | None
    last_path: Path | None
    best_metrics: dict[str, float]
    best_epoch: int
    test_metrics: dict[str, float]
    history: list[dict[str, Any]]
    steps: int
    model: torch.nn.Module = field(repr=False)


def _to_mm(field: torch.Tensor, spacing: torch.Tensor, units: str) -> torch.Tensor:
    """Network-unit field ``(B, 3, ...)`` -> mm along the grid axes (``spacing`` ``(B, 3)``)."""
    return field if units == "mm" else field * spacing.to(field)[:, :, None, None, None]


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               cfg: TrainConfig, units: str, device: torch.device) -> dict[str, float]:
    """One optimiser step on ``batch`` (from :class:`brainshift.train.data.TrainDataset`).

    Returns:
        The loss terms (floats), see :func:`brainshift.train.losses.training_loss`.

    Convention: fields forward Lagrangian; the losses work in mm along the network grid's axes.
    """
    from brainshift.train.losses import training_loss, warp_to_intraop

    x = batch["input"].to(device, non_blocking=True)
    spacing = batch["spacing"].to(device)
    target = _to_mm(batch["target"].to(device, non_blocking=True), spacing, units)
    mask = batch["mask"].to(device, non_blocking=True)
    sp = [float(s) for s in spacing[0]]
    image = intraop = None
    if cfg.lncc:
        image = batch["image"].to(device, non_blocking=True)
        with torch.no_grad():
            intraop = warp_to_intraop(image, target / spacing[:, :, None, None, None])
    pred = _to_mm(model(x), spacing, units)
    initial = _to_mm(x[:, :3], spacing, units) if cfg.mse_relative else None
    loss, terms = training_loss(pred, target, mask, spacing=sp, mse_w=cfg.mse_w, jdet=cfg.jdet,
                                jdet_mode=cfg.jdet_mode, hessian=cfg.hessian, reg_w=cfg.reg_w, lncc=cfg.lncc,
                                lncc_w=cfg.lncc_w, lncc_window=cfg.lncc_window, image=image, intraop=intraop,
                                initial=initial, mse_floor=cfg.mse_floor_mm2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps`` planned steps.

    ``constant``: ``cfg.lr``. ``cosine``: ``lr_min + (lr - lr_min) (1 + cos(pi t)) / 2`` with
    ``t = min(step / total_steps, 1)`` (SGDR without restarts, Loshchilov & Hutter 2017).
    """
    if cfg.lr_schedule == "constant" or total_steps <= 0:
        return float(cfg.lr)
    t = min(max(step / total_steps, 0.0), 1.0)
    return float(cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t)))


def widen_input_channels(state: dict, reference: dict) -> dict:
    """``state`` with every tensor that has fewer input channels (dimension 1) than ``reference``'s zero-padded to
    them (only the first convolution's input changes with the channel count), and a first block whose 1x1x1
    convolution was the identity (as many input channels as features) given the identity plus zero columns: a
    model loaded into a network with a keypoint channel then starts as exactly the loaded model (the new channel's
    weights are zero)."""
    out = dict(state)
    for name, ref in reference.items():
        if name not in state and name.endswith("conv1.weight") and ref.ndim == 5 and ref.shape[0] < ref.shape[1] \
                and tuple(ref.shape[2:]) == (1, 1, 1):  # an identity 1x1x1 (channel count was unchanged) widened
            eye = torch.zeros(ref.shape, dtype=ref.dtype)
            eye[:, : ref.shape[0], 0, 0, 0] = torch.eye(ref.shape[0], dtype=ref.dtype)
            out[name] = eye
            out[name[: -len("weight")] + "bias"] = torch.zeros(ref.shape[0], dtype=ref.dtype)
            continue
        t = state.get(name)
        if (t is not None and t.ndim == ref.ndim and t.ndim >= 2 and t.shape[0] == ref.shape[0]
                and t.shape[1] < ref.shape[1] and t.shape[2:] == ref.shape[2:]):
            wide = torch.zeros(ref.shape, dtype=t.dtype)
            wide[:, : t.shape[1]] = t
            out[name] = wide
    return out


def initial_network(net_cfg, cfg: TrainConfig, init_loaded=None) -> torch.nn.Module:
    """The network a run starts from: ``init_loaded``'s weights (``load_model``; input channels it lacks, e.g.
    the keypoint channel, start with zero weights: :func:`widen_input_channels`), else a fresh network whose
    final 1x1x1 convolution is zero when ``cfg.zero_init_head`` (so with residual prediction it starts as the
    identity refinement: output = the initial field). A resumed state overwrites either.
    """
    from brainshift.model import build_network

    model = build_network(net_cfg)
    if init_loaded is not None:
        try:
            model.load_state_dict(widen_input_channels(init_loaded.model.state_dict(), model.state_dict()))
        except RuntimeError:
            raise BrainshiftError(
                f"expected a load_model whose network can start the requested one (the same, or the same plus a "
                f"keypoint channel), got {init_loaded.config.to_json()} for {net_cfg.to_json()}") from None
    elif cfg.zero_init_head:
        torch.nn.init.zeros_(model.final_conv.weight)
        torch.nn.init.zeros_(model.final_conv.bias)
    return model


def validate(model: torch.nn.Module, items: list[tuple[dict, dict]], net_config, device: torch.device,
             extra_eval: bool = False, mse_floor_mm2: float = 0.05) -> dict[str, float]:
    """Validation metrics averaged over ``items`` (from :func:`brainshift.train.data.validation_items`).

    Each case's refined field is what inference returns (:func:`brainshift.compensate.compensate` with the
    model, no mirror averaging) and is scored by :func:`brainshift.evaluate.metrics.score_field` over the
    evaluation region (brain minus cavity), like ``brainshift evaluate``.

    Returns:
        dict: ``mse_mm2``, ``mae_mm``, ``p95_mm``, ``tre_mm``, ``pct_jacobian_nonpositive``, their ``*_init``
        counterparts for the initial field, ``mse_ratio`` (the mean per-case ratio ``mse / max(mse_init,
        mse_floor_mm2)``, the criterion of ``mse_relative`` runs), ``n_cases``; with ``extra_eval`` the Dice/HD95
        keys of :func:`brainshift.evaluate.metrics.score_field`. NaN-aware means (e.g. no held-out keypoints).

    Convention: fields are compared on the subject grid in voxel units, errors in world mm.
    """
    from brainshift.compensate import compensate
    from brainshift.evaluate.metrics import score_field
    from brainshift.model.checkpoint import LoadedModel
    from brainshift.train.data import as_numpy
    from brainshift.volume import Volume

    keys = ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "pct_jacobian_nonpositive")
    loaded = LoadedModel(model=model, config=net_config, metadata={})
    rows: list[dict[str, float]] = []
    was_training = model.training
    try:
        for case, var in items:
            c = {k: as_numpy(v) for k, v in case.items()}
            image = Volume(c["image"], c["affine"])
            kp = (np.asarray(var["points"], np.float64), np.asarray(var["disps"], np.float64))
            refined = compensate(image, initial_field=var["init"], keypoints=kp, model=loaded, mask=c["brain"],
                                 device=device, mirror_average=False, safeguards=False).refined_field
            hp = np.asarray(var["heldout_points"], np.float64).reshape(-1, 3)
            hd = np.asarray(var["heldout_disps"], np.float64).reshape(-1, 3)
            row: dict[str, float] = {}
            for tag, f in (("", refined), ("_init", var["init"])):
                s = score_field(f, c["gt"], c["affine"], c["eval_mask"] > 0, hp, hd)
                row.update({f"{k}{tag}": float(s[k]) for k in keys})
            row["mse_ratio"] = row["mse_mm2"] / max(row["mse_mm2_init"], mse_floor_mm2)
            if extra_eval:
                masks = {"brain": Volume(c["brain"], c["affine"], "label"),
                         "tumour": Volume(c["tumour"], c["affine"], "label")}
                s = score_field(refined, c["gt"], c["affine"], c["eval_mask"] > 0, hp, hd, masks=masks)
                row.update({k: float(s[k]) for k in ("dice_brain", "hd95_brain_mm", "dice_tumour", "hd95_tumour_mm")})
            rows.append(row)
    finally:
        model.train(was_training)
    out: dict[str, float] = {"n_cases": float(len(rows))}
    for k in (rows[0] if rows else {}):
        vals = np.asarray([r[k] for r in rows], np.float64)
        out[k] = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else float("nan")
    return out


def _save_state(path: Path, model, optimizer, *, epoch: int, step: int, best_val_mse: float, best_epoch: int,
                history: list[dict], net_config) -> None:
    from brainshift.io.atomic import atomic_output
    from brainshift.model.checkpoint import unwrap_model

    state = {
        "model_state_dict": unwrap_model(model).state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "best_val_mse": float(best_val_mse),
        "best_epoch": int(best_epoch),
        "history": json.dumps(history, default=float),
        "network_config": net_config.to_json(),
    }
    with atomic_output(path) as tmp:
        torch.save(state, str(tmp))


def load_state(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a ``last.pt`` training state with ``torch.load(weights_only=True)`` (never arbitrary unpickling).

    Raises:
        InputFileError: missing file, or one that is not a brainshift training state.
    """
    import pickle

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"expected a training state file to resume from at {p}, it does not exist")
    try:
        state = torch.load(str(p), map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise InputFileError(f"expected a training state readable with weights_only=True at {p}, got: "
                             f"{str(exc).splitlines()[0]}") from None
    needed = {"model_state_dict", "optimizer_state_dict", "epoch", "step", "network_config"}
    if not isinstance(state, dict) or not needed <= set(state):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise InputFileError(f"expected a training state with keys {sorted(needed)} in {p}, got {got}")
    return state


def _dataset_summary(cfg: TrainConfig, splits) -> dict[str, Any]:
    from brainshift.train.data import describe_data

    return {"data": describe_data(cfg.data), "n_cases": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
            "n_subjects": {k: len(v) for k, v in splits.subjects.items()}}


def _mean_terms(records: list[dict[str, float]]) -> dict[str, float]:
    keys = records[0].keys() if records else []
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


@dataclass
class _Run:
    """Mutable state of one training run (what a resume restores), shared by the helpers of :func:`train`."""

    cfg: TrainConfig
    ctx: DistContext
    net_cfg: Any
    splits: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    save_dir: Path
    start_epoch: int = 0
    step: int = 0
    best_val: float = math.inf
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stop: bool = False

    @property
    def best_path(self) -> Path:
        return self.save_dir / "best.safetensors"

    @property
    def last_path(self) -> Path:
        return self.save_dir / "last.pt"


def _prepare_run(cfg: TrainConfig, ctx: DistContext) -> _Run:
    """Check the configuration, split the data, build (or load) the network and the optimiser, restore a
    resumed state; rank 0 writes ``config_resolved.yaml`` and ``splits.json``."""
    from brainshift.io.atomic import atomic_output
    from brainshift.model import NetworkConfig, load_weights
    from brainshift.train.data import describe_data, split_cases

    save_dir = Path(cfg.save_dir)
    net_cfg = network_config(cfg)
    init_loaded = None
    if cfg.load_model:
        # a published .pt has no config of its own: it is read with the requested network without the keypoint
        # channel (the published one has none), which is then added below as for our .safetensors
        init_loaded = load_weights(cfg.load_model, device="cpu", config=None if str(cfg.load_model).endswith(
            ".safetensors") else net_cfg.without_keypoint_channel())
        net_cfg = init_loaded.config
        kp = {k: cfg.network[k] for k in ("keypoint_channel", "keypoint_scale_mm") if k in cfg.network}
        if kp:  # a keypoint channel added to (or changed on) the loaded network
            d = {**net_cfg.to_dict(), **kp}
            d["in_channels"] = 4  # read as 5 with a keypoint channel (NetworkConfig)
            net_cfg = NetworkConfig.from_dict(d)
    splits = split_cases(cfg.data, tuple(cfg.split), cfg.seed, cfg.val_subjects)
    if not splits.train:
        raise BrainshiftError(f"expected at least one training subject in {describe_data(cfg.data)}, got none")
    if cfg.size is not None and any(int(s) % net_cfg.size_multiple for s in cfg.size):
        raise BrainshiftError(f"expected a training size made of multiples of {net_cfg.size_multiple} "
                              f"(2 ** (levels - 1)), got {tuple(cfg.size)}")
    if ctx.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, save_dir / "config_resolved.yaml")
        with atomic_output(save_dir / "splits.json") as tmp:
            Path(tmp).write_text(json.dumps(splits.to_dict(), indent=2))
    model = initial_network(net_cfg, cfg, init_loaded)
    model.to(ctx.device)
    run = _Run(cfg=cfg, ctx=ctx, net_cfg=net_cfg, splits=splits, model=model,
               optimizer=torch.optim.Adam(model.parameters(), lr=cfg.lr), save_dir=save_dir)
    resume_path = Path(cfg.checkpoint) if cfg.checkpoint else (run.last_path if cfg.resume else None)
    if resume_path is not None:
        state = load_state(resume_path, ctx.device)
        if NetworkConfig.from_dict(json.loads(state["network_config"])) != net_cfg:
            raise BrainshiftError(f"expected a training state for the network {net_cfg.to_json()}, got one "
                                  f"for {state['network_config']} in {resume_path}")
        model.load_state_dict(state["model_state_dict"])
        run.optimizer.load_state_dict(state["optimizer_state_dict"])
        for group in run.optimizer.param_groups:  # the configured learning rate applies to a resumed run
            group["lr"] = float(cfg.lr)
        run.start_epoch, run.step = int(state["epoch"]), int(state["step"])
        run.best_val, run.best_epoch = float(state["best_val_mse"]), int(state["best_epoch"])
        run.history = json.loads(state["history"])
    run.stop = cfg.max_steps is not None and run.step >= cfg.max_steps
    return run


def _train_epoch(run: _Run, ddp_model: torch.nn.Module, dataset, epoch: int, writer, t_run: float) -> dict:
    """One epoch of optimiser steps (stops early at ``max_steps`` / ``max_minutes``); the epoch's record."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
    from tqdm.auto import tqdm

    cfg, ctx = run.cfg, run.ctx
    dataset.set_epoch(epoch)
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        worker_init_fn=worker_init_fn, pin_memory=ctx.device.type == "cuda", drop_last=False)
    records: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (ctx.is_main and cfg.progress),
               leave=False)
    for batch in bar:
        if cfg.lr_schedule != "constant":
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(cfg, run.step, cfg.epochs * len(loader))
        terms = train_step(ddp_model, batch, run.optimizer, cfg, run.net_cfg.field_units, ctx.device)
        run.step += 1
        records.append(terms)
        if writer is not None:
            for k, v in terms.items():
                writer.add_scalar(f"train/{k}", v, run.step)
        bar.set_postfix(loss=f"{terms['total']:.4g}")
        if cfg.max_steps is not None and run.step >= cfg.max_steps:
            run.stop = True
        if cfg.max_minutes is not None and time.perf_counter() - t_run >= 60.0 * cfg.max_minutes:
            run.stop = True
        if run.stop:
            break
    dt = time.perf_counter() - t0
    n_samples = len(records) * cfg.batch_size * ctx.world_size
    return {"epoch": epoch + 1, "step": run.step, "train": _mean_terms(records),
            "samples_per_s": n_samples / dt if dt > 0 else float("nan")}


def _criterion(cfg: TrainConfig) -> str:
    """The validation metric that picks the best checkpoint: the mean per-case ratio to the initial field for
    ``mse_relative`` runs (what their loss optimises), else the mean MSE (the published criterion)."""
    return "mse_ratio" if cfg.mse_relative else "mse_mm2"


def _end_epoch(run: _Run, rec: dict, epoch: int, val_items: list, writer) -> None:
    """Rank 0 after an epoch: validate when due, keep the best weights, save the state and the history."""
    from brainshift.io.atomic import atomic_output
    from brainshift.model import save_weights

    cfg = run.cfg
    last_epoch = epoch + 1 == cfg.epochs or run.stop
    do_val = bool(val_items) and ((epoch + 1) % cfg.evaluate_every == 0 or last_epoch)
    if do_val:
        metrics = validate(run.model, val_items, run.net_cfg, run.ctx.device, cfg.extra_eval, cfg.mse_floor_mm2)
        rec["val"] = metrics
        for k, v in metrics.items():
            writer.add_scalar(f"val/{k}", v, run.step)
        improved = metrics[_criterion(cfg)] < run.best_val
    elif not val_items:
        metrics, improved = {}, True  # no validation cases: the latest model is the best
    else:
        metrics, improved = {}, False
    if improved:
        run.best_val = metrics.get(_criterion(cfg), math.inf)
        run.best_epoch, run.best_metrics = epoch + 1, metrics
        save_weights(run.best_path, run.model, run.net_cfg, {
            "train_config": cfg.to_dict(), "epoch": epoch + 1, "step": run.step, "val": metrics,
            "dataset": _dataset_summary(cfg, run.splits), "world_size": run.ctx.world_size})
    run.history.append(rec)
    writer.add_scalar("train/samples_per_s", rec["samples_per_s"], run.step)
    _save_state(run.last_path, run.model, run.optimizer, epoch=epoch + 1, step=run.step, best_val_mse=run.best_val,
                best_epoch=run.best_epoch, history=run.history, net_config=run.net_cfg)
    with atomic_output(run.save_dir / "history.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(h, default=float) + "\n" for h in run.history))


def _test_best(run: _Run) -> dict[str, float]:
    """Rank 0 at the end: the best weights on the test cases (``cfg.test`` or the split's), saved as
    ``test_metrics.json``; {} without test cases."""
    from brainshift.io.atomic import atomic_output
    from brainshift.model import load_weights
    from brainshift.train.data import cases_of, describe_data, validation_items

    cfg = run.cfg
    if not run.best_metrics:  # resumed run whose best epoch came before the resume
        run.best_metrics = next((h.get("val", {}) for h in run.history if h["epoch"] == run.best_epoch), {})
    test_root, test_cases = (cfg.test, cases_of(cfg.test)[0]) if cfg.test else (cfg.data, run.splits.test)
    if not test_cases:
        return {}
    best = load_weights(run.best_path, device=run.ctx.device)
    items = validation_items(test_root, test_cases, run.net_cfg, seed=cfg.seed, interp=cfg.interp,
                             k_range=cfg.k_range, heldout_kpts=cfg.heldout_kpts, variant_options=cfg.variant_options)
    test_metrics = validate(best.model, items, run.net_cfg, run.ctx.device, cfg.extra_eval, cfg.mse_floor_mm2)
    with atomic_output(run.save_dir / "test_metrics.json") as tmp:
        Path(tmp).write_text(json.dumps({"data": describe_data(test_root), "cases": test_cases, **test_metrics},
                                        indent=2))
    return test_metrics


def train(cfg: TrainConfig) -> TrainResult:
    """Train the refinement network as configured; see the module docstring for what is written.

    Runs in one process, or in each process of ``torchrun --nproc_per_node N`` (DistributedDataParallel;
    the processes hold identical weights after every step).

    Args:
        cfg: the configuration (``cfg.data`` required: a dataset folder or a list of them).

    Returns:
        :class:`TrainResult`.

    Raises:
        BrainshiftError: bad configuration (e.g. a dataset folder listed twice), CUDA requested without a GPU,
            no training cases, a resume state from another network configuration.
        InputFileError: missing dataset folder (each listed one is checked) / state / weights files, a dataset
            folder without a complete case.
    """
    from brainshift.model.checkpoint import unwrap_model
    from brainshift.train.data import TrainDataset, validation_items

    if cfg.data is None:
        raise BrainshiftError("expected a dataset folder (option data / --data), got none")
    for folder in data_folders(cfg.data):
        if not Path(folder).is_dir():
            raise InputFileError(f"expected a dataset folder at {folder}, it does not exist")
    ctx: DistContext = setup_distributed(cfg.device)
    try:
        seed_everything(cfg.seed)
        run = _prepare_run(cfg, ctx)
        ddp_model: torch.nn.Module = run.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp_model = DistributedDataParallel(run.model, device_ids=[ctx.device.index]
                                                if ctx.device.type == "cuda" else None)
        splits, net_cfg = run.splits, run.net_cfg
        dataset = TrainDataset(cfg.data, splits.train, splits.case_subject, net_cfg, size=cfg.size,
                               interp=cfg.interp, k_range=cfg.k_range, heldout_kpts=cfg.heldout_kpts,
                               variant_options=cfg.variant_options,
                               variants_per_case=cfg.variants_per_case, augment=cfg.augment,
                               flip_axes=cfg.flip_axes,
                               samples_per_epoch=cfg.samples_per_epoch, seed=cfg.seed, cache_dir=cfg.cache_dir,
                               num_workers=cfg.num_workers, progress=cfg.progress and ctx.is_main)
        val_items = []
        if ctx.is_main and splits.val:
            val_items = validation_items(cfg.data, splits.val, net_cfg, seed=cfg.seed, interp=cfg.interp,
                                         k_range=cfg.k_range, heldout_kpts=cfg.heldout_kpts,
                                         variant_options=cfg.variant_options)
        writer = None
        if ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(Path(cfg.log_dir) if cfg.log_dir else run.save_dir / "logs"))
        t_run = time.perf_counter()
        for epoch in range(run.start_epoch, cfg.epochs):
            if run.stop:
                break
            rec = _train_epoch(run, ddp_model, dataset, epoch, writer, t_run)
            if ctx.is_main:
                _end_epoch(run, rec, epoch, val_items, writer)
            barrier(ctx)
        test_metrics = _test_best(run) if ctx.is_main and run.best_path.is_file() else {}
        if writer is not None:
            writer.close()
        barrier(ctx)
        return TrainResult(save_dir=run.save_dir,
                           best_path=run.best_path if ctx.is_main and run.best_path.is_file() else None,
                           last_path=run.last_path if ctx.is_main and run.last_path.is_file() else None,
                           best_metrics=run.best_metrics, best_epoch=run.best_epoch, test_metrics=test_metrics,
                           history=run.history, steps=run.step, model=unwrap_model(ddp_model))
    finally:
        cleanup_distributed(ctx)
