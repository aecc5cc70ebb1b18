"""``brainshift atlas``: build the deformation atlas of one preop image
(:func:`brainshift.simulate.atlas.build_atlas`)."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import cli_errors


@cli_errors
def atlas_command(
    preop_scan: Path = typer.Option(..., "-p", "--preop_scan", "--preop-scan", help="Preop image."),
    brain_mask: Path = typer.Option(..., "--brain-mask", help="Brain mask of the preop image (nonzero = inside; "
                                                                  "negative values are refused)."),
    tumour: Path | None = typer.Option(None, "--tumour",
                                       help="Tumour mask (resection members and the surgical approach); without "
                                            "it gravity directions cover the upper hemisphere."),
    ventricles: Path | None = typer.Option(None, "--ventricles", help="Ventricle mask (fluid-filled ventricles)."),
    config: Path | None = typer.Option(None, "--config",
                                       help="Atlas config (YAML/JSON, section atlas:); default: the shipped "
                                            "configs/atlas.yaml (24 sampled solves at 3 mm, 6-9 min on 2 cores)."),
    entry: str | None = typer.Option(None, "--craniotomy-centre",
                                     help="Craniotomy centre 'x,y,z' in RAS mm (default: the brain-surface point "
                                          "nearest the tumour, above it)."),
    out: Path = typer.Option(..., "-o", "--out", help="Atlas folder (an unfinished build there is resumed)."),
    scheduler_address: str | None = typer.Option(None, "--scheduler-address",
                                                 help="Existing Dask scheduler, e.g. tcp://host:8786."),
    workers: int | None = typer.Option(None, "--workers", help="LocalCluster workers (default: CPU cores)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Simulate the patient's brain under many plausible conditions and store them as a deformation atlas.

    Then `brainshift infer -p PREOP -k KEYPOINTS -m atlas --atlas OUT` fits the atlas to the keypoints.
    """
    import numpy as np

    from brainshift.errors import BrainshiftError
    from brainshift.simulate.atlas import build_atlas, read_atlas_config
    from brainshift.simulate.subject import load_subject

    entry_ras = None
    if entry is not None:
        try:
            entry_ras = np.array([float(v) for v in entry.split(",")], dtype=np.float64)
        except ValueError:
            entry_ras = None
        if entry_ras is None or entry_ras.shape != (3,) or not np.all(np.isfinite(entry_ras)):
            raise BrainshiftError(f"expected --craniotomy-centre as three numbers 'x,y,z' (RAS mm), got {entry!r}")
    if workers is not None and workers < 1:  # 0 silently became every core; a negative count reached Dask
        raise BrainshiftError(f"expected --workers >= 1 (or omitted: one per CPU core), got {workers}")
    cfg = read_atlas_config(config)
    if out.exists() and not out.is_dir():
        raise BrainshiftError(f"expected -o to be a folder for the atlas, got the file {out}")
    subject = load_subject(preop_scan, brain_mask, tumour, ventricles_path=ventricles)
    report = build_atlas(out, subject, cfg, entry_ras=entry_ras, scheduler_address=scheduler_address,
                         n_workers=workers, progress=progress)
    typer.echo(report.summary())
