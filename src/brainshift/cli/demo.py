"""``brainshift demo``: the method end to end on the built-in MNI152 brain."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import cli_errors


@cli_errors
def demo_command(
    out: Path = typer.Option(Path("demo_output"), "--out", "-o", help="Output directory."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of every random draw."),
    weights: Path = typer.Option(None, "--weights", "-w", help="Network weights (default: the shipped model "
                                 "if present, else classical methods only)."),
    quick: bool = typer.Option(False, "--quick",
                               help="Small 3 mm case with an analytic field instead of the simulation; the atlas and "
                                    "the network still run (about 1-3 minutes on a 2-core CPU)."),
    resolution: float = typer.Option(3.0, "--resolution", help="Element edge (mm) of the simulation."),
    atlas: bool = typer.Option(True, "--atlas/--no-atlas",
                               help="Build the subject's deformation atlas (into OUT/atlas) and add the methods "
                                    "atlas and net-atlas (70-80 s more on 2 free cores)."),
    atlas_config: Path | None = typer.Option(None, "--atlas-config",
                                             help="Atlas config (YAML/JSON, section atlas:) [default: the shipped "
                                                  "atlas_demo; a 6 mm one with --quick]."),
) -> None:
    """Run the method end to end on the built-in MNI152 brain: report.html, fields and a metrics table."""
    from brainshift.demo import format_table, run_demo

    rows = run_demo(out, seed=seed, weights=weights, quick=quick, resolution_mm=resolution, atlas=atlas,
                    atlas_config=atlas_config)
    typer.echo(format_table(rows))
