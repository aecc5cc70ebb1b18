"""``brainshift demo``: the method end to end on the built-in MNI152 brain."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import cli_errors


@cli_errors
def demo_command(
    out: Path = typer.Option(Path("demo_output"), "--out", "-o", help="Output directory."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw."),
    weights: Path = typer.Option(None, "--weights", "-w", help="Network weights (default: the shipped model "
                                 "if present, else classical methods only)."),
    quick: bool = typer.Option(False, "--quick", help="Small 3 mm case with an analytic field (seconds)."),
    resolution: float = typer.Option(3.0, "--resolution", help="Element edge (mm) of the simulation."),
) -> None:
    """Run the method end to end on the built-in MNI152 brain: report.html, fields and a metrics table."""
    from brainshift.demo import format_table, run_demo

    rows = run_demo(out, seed=seed, weights=weights, quick=quick, resolution_mm=resolution)
    typer.echo(format_table(rows))
