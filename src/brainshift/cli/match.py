"""``brainshift match``: match two 3D SIFT-Rank ``.key`` files (``brainshift keypoints`` or featExtract)."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import cli_errors


@cli_errors
def match_command(
    key_a: Path = typer.Argument(..., help="Features of image A (preop): a .key file with descriptors."),
    key_b: Path = typer.Argument(..., help="Features of image B (intraop): a .key file with descriptors."),
    image_a: Path = typer.Option(..., "-a", "--image-a",
                                 help="Image A, the one KEY_A was made from (its grid maps the .key voxels to world "
                                      "mm; a grid or voxel size recorded in the .key header must agree)."),
    image_b: Path = typer.Option(..., "-b", "--image-b",
                                 help="Image B, the one KEY_B was made from (may lie on another grid than A)."),
    output: Path = typer.Option(Path("matches.csv"), "-o", "--output", help="Output table (.csv)."),
    ratio: float = typer.Option(0.9, "--ratio", help="Lowe's ratio test (1 disables it)."),
    max_displacement_mm: float = typer.Option(30.0, "--max-displacement-mm",
                                              help="Largest plausible displacement between matches (mm)."),
) -> None:
    """Match two keypoint sets by descriptor, reject inconsistent matches, write a keypoint table in A's voxel frame.

    The table has columns x,y,z,dx,dy,dz (0-based voxel indices of A; B's keypoint mapped into A's voxels minus
    A's keypoint), descriptor_distance, ratio, residual_mm and x_b,y_b,z_b (B's voxel indices).
    """
    from brainshift.register_pipeline import run_match

    c = run_match(key_a, key_b, image_a, image_b, output, ratio=ratio, max_displacement_mm=max_displacement_mm)
    typer.echo(f"{c['features_a']} / {c['features_b']} features, {c['candidate_matches']} candidate matches, "
               f"{c['inliers']} inliers (ratio {c['inlier_ratio']:.2f}); wrote {output}")
