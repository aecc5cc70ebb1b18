"""``brainshift train``: train the refinement network on a simulated dataset (light imports only).

Runs unchanged under ``torchrun --nproc_per_node N $(which brainshift) train --config FILE``
(DistributedDataParallel; only rank 0 writes and prints).
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


def format_summary(result) -> str:
    """A short human summary of a :class:`brainshift.train.loop.TrainResult`."""
    m = result.best_metrics
    lines = [f"trained {result.steps} steps, {len(result.history)} epoch(s)"]
    if m:
        lines.append(f"best epoch {result.best_epoch}: val MSE {m['mse_mm2']:.4g} mm^2 "
                     f"(initial field {m['mse_mm2_init']:.4g}), TRE {m['tre_mm']:.3g} mm "
                     f"(initial {m['tre_mm_init']:.3g}), det J <= 0: {m['pct_jacobian_nonpositive']:.3g} %")
    else:
        lines.append("no validation cases: best = latest model")
    if result.test_metrics:
        t = result.test_metrics
        lines.append(f"test ({int(t['n_cases'])} cases): MSE {t['mse_mm2']:.4g} mm^2, TRE {t['tre_mm']:.3g} mm")
    lines.append(f"weights: {result.best_path}")
    lines.append(f"resume state: {result.last_path}; config: {result.save_dir / 'config_resolved.yaml'}")
    return "\n".join(lines)


@cli_errors
def train_command(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML or JSON training config (published "
                                                                     "option names accepted)."),
    data: list[Path] | None = typer.Option(None, "--data", help="Dataset folder (overrides the config's data); "
                                           "repeat to train on the union of several folders."),
    save_dir: Path | None = typer.Option(None, "--save-dir", help="Output folder (default: checkpoints)."),
    load_model: Path | None = typer.Option(None, "--load-model", help="Initial weights to fine-tune (.safetensors, "
                                           "or the published .pt; overrides the config's load_model)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Number of epochs."),
    resume: bool = typer.Option(False, "--resume", help="Continue from SAVE_DIR/last.pt."),
    lr: float | None = typer.Option(None, "--lr", help="Adam learning rate (also applies to a resumed run)."),
    device: str | None = typer.Option(None, "--device", "-d", help="cpu | cuda (published default: cuda)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimiser steps."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop (validate, save) after this many "
                                             "minutes of training; --resume continues."),
    seed: int | None = typer.Option(None, "--seed", min=0, help="Seed of every random draw."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
) -> None:
    """Train the refinement network (Adam, validation, best/last checkpoints, TensorBoard logs)."""
    from brainshift.train.config import load_config
    from brainshift.train.loop import train

    overrides = {"data": [str(d) for d in data] if data else None,  # one folder: the string (config.data_folders)
                 "save_dir": str(save_dir) if save_dir else None,
                 "load_model": str(load_model) if load_model else None,
                 "epochs": epochs, "resume": True if resume else None, "device": choice(device), "max_steps": max_steps,
                 "max_minutes": max_minutes,
                 "seed": seed, "lr": lr, "progress": False if quiet else None}
    cfg = load_config(config, overrides)
    result = train(cfg)
    if result.best_path is not None:  # rank 0
        typer.echo(format_summary(result))
