"""``brainshift evaluate``: score interpolators and the network on a simulated dataset (light imports only)."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli import cli_errors


@cli_errors
def evaluate_command(
    data: Path = typer.Option(..., "--data", help="Simulated dataset folder (subjects/ and cases/)."),
    methods: str = typer.Option("linear,tps,net-linear,net-tps", "--methods",
                                help="Comma-separated: none, linear, tps, tps3d, net-linear, net-tps."),
    weights: Path | None = typer.Option(None, "--weights", "-w",
                                        help="Network weights for net-* (default: weights/default.safetensors)."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder (CSV, summary.md, PNG)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keypoint draws (per case: seed + case id)."),
    num_kpts: int = typer.Option(20, "--num-kpts", help="Driving keypoints per case."),
    noise_mm: float = typer.Option(0.0, "--noise-mm", help="Std (mm) of Gaussian noise per world component on "
                                                           "the keypoint displacements."),
    cases: int | None = typer.Option(None, "--cases", help="Evaluate only the first N cases (sorted ids)."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu | cuda | auto (network methods)."),
    no_overlap: bool = typer.Option(False, "--no-overlap", help="Skip Dice/HD95 (saves a field inversion per "
                                                                "method and case)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Per case and method: MSE/MAE/P95 (mm), TRE, det J, Dice/HD95, time; writes CSV, summary.md, box plots."""
    from brainshift.evaluate.report import summary_markdown, write_report
    from brainshift.evaluate.run import evaluate_dataset

    rows = evaluate_dataset(data, methods, weights=weights, seed=seed, n_keypoints=num_kpts, noise_mm=noise_mm,
                            cases=cases, device=device, progress=not quiet, overlap=not no_overlap)
    paths = write_report(rows, out, title=f"{data} ({num_kpts} keypoints, noise {noise_mm:g} mm, seed {seed})")
    typer.echo(summary_markdown(rows))
    typer.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
