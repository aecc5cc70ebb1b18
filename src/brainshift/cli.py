"""The ``brainshift`` command line: a thin typer app.

Each command parses options and calls one library function; heavy modules (torch, SimpleITK, scipy) are
imported inside the commands so ``brainshift --help`` is instant. Any :class:`BrainshiftError` (bad input)
is printed as one line ``error: ...`` on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from brainshift.errors import BrainshiftError

app = typer.Typer(
    name="brainshift",
    help="Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands: bad input becomes a one-line ``error:`` message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrainshiftError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:  # missing files, a file where a folder is expected, permissions, full disk
            where = f" {exc.filename!s}" if exc.filename else ""
            typer.echo(f"error: expected a readable input / writable output path, got{where}: "
                       f"{exc.strerror or exc}", err=True)
            raise typer.Exit(code=2) from None
        except MemoryError:
            typer.echo("error: out of memory; use fewer keypoints, a coarser grid or another interpolator", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one ``warning: ...`` line, no source path or code line."""
    return f"warning: {message}\n"


@app.callback()
def _root() -> None:
    """Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field."""
    import warnings

    warnings.formatwarning = _format_warning


@app.command()
def version() -> None:
    """Print the brainshift version."""
    from brainshift import __version__

    typer.echo(__version__)


@app.command()
@cli_errors
def infer(
    preop_scan: Path = typer.Option(..., "-p", "--preop_scan", "--preop-scan",
                                    help="Preop image (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)."),
    init_disp: Path | None = typer.Option(None, "-i", "--init_disp", "--init-disp",
                                          help="Initial displacement field (.h5, .nii/.nii.gz vector, .npz); "
                                               "replaces interpolation."),
    kpt_disps: Path | None = typer.Option(None, "-k", "--kpt_disps", "--kpt-disps",
                                          help="Keypoints: table x,y,z,dx,dy,dz (.csv/.txt), or preop Slicer "
                                               "markups (.fcsv/.mrk.json) with --kpt-intraop."),
    kpt_intraop: Path | None = typer.Option(None, "--kpt-intraop",
                                            help="Intraop Slicer markups matching -k (by label or order)."),
    interp_mode: str = typer.Option("linear", "-m", "--interp_mode", "--interp-mode",
                                    help="Interpolator: linear (Delaunay) | tps (published; ridge 0.1, a smoothing "
                                         "spline: not exact at the keypoints) | tps3d (biharmonic, exact)."),
    device: str = typer.Option("auto", "-d", "--device", help="auto | cpu | cuda (network refinement)."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Output directory (created if missing)."),
    output_fmt: str = typer.Option("h5", "-f", "--output_fmt", "--output-fmt", help="Field format: h5 | npz | nii."),
    weights: Path | None = typer.Option(None, "-w", "--weights",
                                        help="Network weights (.safetensors, or a published .pt checkpoint)."),
    coords: str = typer.Option("voxel", "--coords", help="Frame of the keypoint table: voxel | ras | lps."),
    refine: bool | None = typer.Option(None, "--refine/--no-refine",
                                       help="Refine with the network (default: when weights are available)."),
    mirror_average: bool | None = typer.Option(None, "--mirror-average/--no-mirror-average",
                                               help="Average the network with its left-right mirrored problem "
                                                    "(default: when the model was trained with mirroring)."),
    save_inverse: bool = typer.Option(False, "--save-inverse", help="Also write the inverse field."),
    save_warped: bool = typer.Option(False, "--save-warped", help="Also write the preop image warped to intraop."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
) -> None:
    """Turn a preop image plus matched keypoints (or an initial field) into a dense displacement field."""
    from brainshift.pipeline import InferOptions, run_infer

    summary = run_infer(InferOptions(
        preop_scan=preop_scan, output=output, init_disp=init_disp, kpt_disps=kpt_disps, kpt_intraop=kpt_intraop,
        interp_mode=interp_mode, coords=coords, device=device, output_fmt=output_fmt, weights=weights,
        refine=refine, mirror_average=mirror_average, save_inverse=save_inverse, save_warped=save_warped,
        verbose=not quiet))
    final = summary["fields"].get("corrected_disp_field", summary["fields"]["initial_disp_field"])
    typer.echo(f"wrote {', '.join(summary['outputs'])} to {output}")
    typer.echo(f"max displacement {final['max_displacement_mm']:.2f} mm, mean {final['mean_displacement_mm']:.2f} mm, "
               f"det J <= 0 in {final['pct_jacobian_nonpositive']:.4f} % of voxels, "
               f"total {summary['timings_s']['total']:.2f} s")


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", "-o", help="Output directory."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random draw."),
    weights: Path = typer.Option(None, "--weights", "-w", help="Network weights (default: the shipped model "
                                 "if present, else classical methods only)."),
    quick: bool = typer.Option(False, "--quick", help="Small 3 mm case with an analytic field (seconds)."),
    resolution: float = typer.Option(3.0, "--resolution", help="Element edge (mm) of the simulation."),
) -> None:
    """Run the method end to end on the built-in MNI152 brain: report.html, fields and a metrics table."""
    from brainshift.demo import run_demo

    run_demo(out, seed=seed, weights=weights, quick=quick, resolution_mm=resolution)


# --- commands registered from their modules (each module imports its heavy dependencies lazily) ---
from brainshift.evaluate.commands import evaluate_command  # noqa: E402

app.command("evaluate")(evaluate_command)
from brainshift.keypoints.commands import keypoints_command  # noqa: E402

app.command("keypoints")(keypoints_command)
from brainshift.train.commands import train_command  # noqa: E402

app.command("train")(train_command)

from brainshift.simulate.commands import simulate_batch_command, simulate_command  # noqa: E402

app.command("simulate")(simulate_command)
app.command("simulate-batch")(simulate_batch_command)


def main() -> None:  # console-script entry point
    """Entry point of the ``brainshift`` console script."""
    app(prog_name="brainshift")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
