"""``brainshift register``: preop + intraop image -> matched keypoints -> dense displacement field files."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


@cli_errors
def register_command(
    preop_scan: Path = typer.Option(..., "-p", "--preop_scan", "--preop-scan",
                                    help="Preop image (NIfTI, NRRD or MetaImage); defines the output grid."),
    intraop_scan: Path = typer.Option(..., "-t", "--intraop", "--intraop_scan", "--intraop-scan",
                                      help="Intraop image, on any grid (spacing, orientation, field of view) "
                                           "overlapping the preop in world space."),
    mask: Path | None = typer.Option(None, "--mask",
                                     help="Brain mask of the preop image, nonzero = inside (negative values are "
                                          "refused; default: computed; Otsu threshold, "
                                          "largest component, holes filled). A mask on another grid is "
                                          "resampled to the preop grid through world coordinates (nearest "
                                          "neighbour)."),
    interp_mode: str = typer.Option("tps", "-m", "--interp_mode", "--interp-mode",
                                    help="Interpolator of the matches: linear | tps | tps3d."),
    refine: bool | None = typer.Option(None, "--refine/--no-refine",
                                       help="Refine with the network (default: when weights are available)."),
    weights: Path | None = typer.Option(None, "-w", "--weights", help="Network weights (.safetensors or .pt)."),
    output_fmt: str = typer.Option("h5", "-f", "--output_fmt", "--output-fmt", help="Field format: h5 | npz | nii."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html with its figures."),
    device: str = typer.Option("auto", "-d", "--device",
                               help="auto | cpu | cuda: where the network refinement runs (unused with --no-refine)."),
    safeguards: bool = typer.Option(True, "--safeguards/--no-safeguards",
                                    help="Refine under the safeguards (as infer; default on)."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Output directory (created if missing)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
) -> None:
    """Register a preop to an intraop image by matched 3-D keypoints, then interpolate and refine the field."""
    from brainshift.register_pipeline import RegisterOptions, run_register

    summary = run_register(RegisterOptions(
        preop_scan=preop_scan, intraop_scan=intraop_scan, output=output, mask=mask, interp_mode=choice(interp_mode),
        refine=refine, weights=weights, output_fmt=choice(output_fmt), report=report, device=choice(device),
        safeguards=safeguards,
        verbose=not quiet))
    m = summary["matching"]
    typer.echo(f"{m['keypoints_preop']} preop / {m['keypoints_intraop']} intraop keypoints, "
               f"{m['candidate_matches']} candidate matches, {m['inliers']} inliers "
               f"(ratio {m['inlier_ratio']:.2f}); total {summary['timings_s']['total']:.2f} s")
    typer.echo(f"wrote {', '.join(summary['outputs'])} to {output}")
