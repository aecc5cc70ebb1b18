"""``brainshift evaluate``: score interpolators and the network on a simulated dataset (light imports only)."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


@cli_errors
def evaluate_command(
    data: Path = typer.Option(..., "--data", help="Simulated dataset folder (subjects/ and cases/)."),
    methods: str | None = typer.Option(None, "--methods",
                                       help="Comma-separated: none, linear, tps, tps3d, gp, net-linear, net-tps, "
                                            "net-gp, atlas, net-atlas [default: linear,tps,net-linear,net-tps, plus "
                                            "atlas,net-atlas with --atlases; the net-* methods only when weights "
                                            "are available]."),
    weights: Path | None = typer.Option(None, "--weights", "-w",
                                        help="Network weights for net-* (default: the shipped model)."),
    out: Path = typer.Option(Path("evaluation"), "--out", "-o", help="Output folder (CSV, summary.md, PNG)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the keypoint draws (per case: seed + case id)."),
    num_kpts: int = typer.Option(20, "--num-kpts", help="Driving keypoints per case."),
    noise_mm: float = typer.Option(0.0, "--noise-mm", help="Std (mm) of Gaussian noise per world component on "
                                                           "the keypoint displacements."),
    cases: int | None = typer.Option(None, "--cases", help="Evaluate only the first N cases (sorted ids)."),
    device: str = typer.Option("auto", "--device", "-d", help="auto | cpu | cuda (network methods)."),
    no_overlap: bool = typer.Option(False, "--no-overlap", help="Skip Dice/HD95 (saves a field inversion per "
                                                                "method and case)."),
    mirror_average: bool | None = typer.Option(None, "--mirror-average/--no-mirror-average",
                                               help="Average the network with its left-right mirrored problem "
                                                    "(default: when the model was trained with mirroring)."),
    safeguards: bool = typer.Option(True, "--safeguards/--no-safeguards",
                                    help="net-* methods under the safeguards, as infer runs them (default); "
                                         "--no-safeguards: the network alone."),
    atlases: Path | None = typer.Option(None, "--atlases",
                                        help="Folder of per-subject deformation atlases (brainshift atlas -o "
                                             "DIR/<subject_id>): enables the methods atlas and net-atlas."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Per case and method: MSE/MAE/P95 (mm), TRE, det J, Dice/HD95, time; writes CSV, summary.md, box plots."""
    from brainshift.device import resolve_device
    from brainshift.evaluate.run import evaluate_dataset
    from brainshift.evaluate.tables import summary_markdown, write_tables
    from brainshift.pipeline import check_output_dir
    from brainshift.resources import DEFAULT_WEIGHTS, resolve_weights

    check_output_dir(out)
    methods, device = choice(methods), choice(device)
    if methods is None:
        methods = "linear,tps,net-linear,net-tps" + (",atlas,net-atlas" if atlases is not None else "")
        if resolve_weights(weights) is None:
            methods = "linear,tps" + (",atlas" if atlases is not None else "")
            typer.echo(f"warning: no network weights (no --weights and no default model at {DEFAULT_WEIGHTS}): "
                       f"evaluating {methods} only (no network methods)", err=True)
    if any(m.strip().startswith("net") for m in methods.split(",")):
        device = str(resolve_device(device))
    rows = evaluate_dataset(data, methods, weights=weights, seed=seed, n_keypoints=num_kpts, noise_mm=noise_mm,
                            cases=cases, device=device, progress=not quiet, overlap=not no_overlap,
                            mirror_average=mirror_average, safeguards=safeguards, atlases=atlases)
    paths = write_tables(rows, out, title=f"{data} ({num_kpts} keypoints, noise {noise_mm:g} mm, seed {seed})")
    typer.echo(summary_markdown(rows))
    typer.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
