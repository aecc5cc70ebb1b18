"""``brainshift evaluate-landmarks``: TRE at landmark pairs before and after a displacement field."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


@cli_errors
def evaluate_landmarks_command(
    preop_landmarks: Path = typer.Option(..., "--preop-landmarks",
                                         help="Preop landmarks: MNI .tag (one file may hold both sets), Slicer "
                                              ".fcsv/.mrk.json, or a table with columns x,y,z[,label]."),
    intraop_landmarks: Path | None = typer.Option(None, "--intraop-landmarks",
                                                  help="Intraop landmarks (omit for a two-volume .tag file)."),
    field: Path = typer.Option(..., "--field", "-F",
                               help="Displacement field of infer / register (.h5, .nii.gz, .npz) on the preop grid."),
    frame: str = typer.Option("ras", "--frame", help="Frame of landmark tables: ras | lps (mm)."),
    tag_preop_volume: int = typer.Option(1, "--tag-preop-volume", min=1, max=2,
                                         help="Which volume of a two-volume .tag file is the preop image."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Also write the per-landmark table (.csv)."),
) -> None:
    """Report the target registration error (mm) of each landmark before and after applying the field."""
    from brainshift.evaluate.landmarks import evaluate_landmarks

    if output is not None:
        _check_output_table(output, [preop_landmarks, intraop_landmarks, field])
    res = evaluate_landmarks(preop_landmarks, intraop_landmarks, field, frame=choice(frame),
                             tag_preop_volume=tag_preop_volume)
    typer.echo(f"{'landmark':>12} {'TRE before (mm)':>16} {'TRE after (mm)':>15}")
    for lab, b, a, out in zip(res.labels, res.before_mm, res.after_mm, res.outside, strict=True):
        typer.echo(f"{lab[:12]:>12} {b:16.2f} {a:15.2f}{'  (outside the field)' if out else ''}")
    s = res.summary()
    typer.echo(f"{s['n_landmarks']} landmarks: TRE before {s['before']['mean_mm']:.2f} +- {s['before']['std_mm']:.2f} "
               f"mm (median {s['before']['median_mm']:.2f}, max {s['before']['max_mm']:.2f}); after "
               f"{s['after']['mean_mm']:.2f} +- {s['after']['std_mm']:.2f} mm (median {s['after']['median_mm']:.2f}, "
               f"max {s['after']['max_mm']:.2f})")
    if output is not None:
        from brainshift.io.atomic import atomic_output

        with atomic_output(output) as tmp:
            tmp.write_text(res.table())
        typer.echo(f"wrote {output}")


def _check_output_table(output: Path, inputs: list[Path | None]) -> None:
    """Refuse ``-o`` before any work unless it names a new or earlier ``.csv``/``.txt`` table that is no input."""
    from brainshift.errors import BrainshiftError

    if not output.name.lower().endswith((".csv", ".txt")) or output.is_dir():
        kind = "a directory" if output.is_dir() else repr(str(output))
        raise BrainshiftError(f"expected -o/--output a table file (.csv or .txt), got {kind}")
    from brainshift.io.atomic import check_output_file

    check_output_file(output)  # a file where its folder should be: refused before the work, not after
    for path in inputs:
        if path is not None and output.exists() and path.exists() and output.samefile(path):
            raise BrainshiftError(f"expected -o/--output to be another file than the inputs, got the input {path}")
