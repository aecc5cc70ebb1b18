"""The ``brainshift keypoints`` command: detect 3-D keypoints in an image, write ``PREFIX.csv`` and ``PREFIX.key``.

Top-level imports are light (typer, pathlib); numpy/scipy and the detector are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import cli_errors


@cli_errors
def keypoints_command(
    image: Path = typer.Argument(..., help="Image to detect keypoints in (NIfTI, NRRD or MetaImage)."),
    mask: Path | None = typer.Option(None, "--mask", "-m",
                                     help="Region to restrict keypoints to (nonzero = inside; negative values are "
                                          "refused)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output prefix; writes PREFIX.csv and PREFIX.key (default: IMAGE stem + _keypoints)."
    ),
    max_keypoints: int | None = typer.Option(None, "--max", help="Keep at most N keypoints (strongest first)."),
    sigma_min_mm: float = typer.Option(1.6, "--sigma-min-mm", help="Sigma (mm) of the first pyramid level."),
    n_octaves: int = typer.Option(4, "--octaves", help="Number of octaves (each doubles sigma)."),
    n_scales: int = typer.Option(3, "--scales", help="DoG levels searched per octave."),
    contrast_threshold: float = typer.Option(0.05, "--contrast", help="Minimum normalised DoG response."),
    edge_ratio: float = typer.Option(10.0, "--edge-ratio", help="Maximum Hessian eigenvalue ratio."),
    min_distance_mm: float = typer.Option(3.0, "--min-distance-mm", help="Duplicate radius (mm)."),
    border_mm: float = typer.Option(5.0, "--border-mm", help="Minimum distance from the mask boundary (mm)."),
) -> None:
    """Detect 3-D scale-space keypoints (DoG extrema, 3D SIFT-Rank style) and write them as CSV and .key.

    PREFIX.csv has columns x,y,z,scale_mm,response in the voxel frame (0-based i, j, k); PREFIX.key uses the
    3D SIFT-Rank text layout (voxel coordinates + 0.5 and scales in voxels, as that tool writes them) with
    64 rank-ordered descriptor values per keypoint (``brainshift match`` reads them).
    """
    import math
    import time

    from brainshift.errors import BrainshiftError
    from brainshift.io.images import check_intensities, read_image
    from brainshift.io.keypoints import write_detected_keypoints, write_sift_key
    from brainshift.keypoints.detect import detect_keypoints

    _check_options({"--sigma-min-mm": (sigma_min_mm, math.isfinite(sigma_min_mm) and sigma_min_mm > 0, "> 0"),
                    "--octaves": (n_octaves, n_octaves >= 1, ">= 1"),
                    "--scales": (n_scales, n_scales >= 1, ">= 1"),
                    "--contrast": (contrast_threshold, math.isfinite(contrast_threshold) and contrast_threshold >= 0,
                                   ">= 0"),
                    "--edge-ratio": (edge_ratio, math.isfinite(edge_ratio) and edge_ratio >= 1, ">= 1"),
                    "--min-distance-mm": (min_distance_mm, math.isfinite(min_distance_mm) and min_distance_mm >= 0,
                                          ">= 0"),
                    "--border-mm": (border_mm, math.isfinite(border_mm) and border_mm >= 0, ">= 0"),
                    "--max": (max_keypoints, max_keypoints is None or max_keypoints >= 1, ">= 1")})
    if out is not None and (out.name in ("", ".", "..") or out.is_dir()):  # "" or "dir/" would write .csv/.key
        raise BrainshiftError(f"expected --out a file prefix (writes PREFIX.csv and PREFIX.key), got the directory "
                              f"{str(out)!r}; give a name inside it, e.g. {str(out / 'keypoints')!r}")
    prefix = out if out is not None else image.parent / f"{_stem(image)}_keypoints"
    if prefix.suffix.lower() in (".csv", ".key"):
        prefix = prefix.with_suffix("")
    csv_path = prefix.parent / f"{prefix.name}.csv"
    key_path = prefix.parent / f"{prefix.name}.key"
    from brainshift.io.atomic import check_output_file

    for path in (csv_path, key_path):  # before the detection: a directory there, or a file where a folder should be
        check_output_file(path)
    volume = read_image(image)
    check_intensities(volume, image, "image")
    mask_volume = read_image(mask, kind="label") if mask is not None else None
    if mask_volume is not None:  # nonzero = inside, as register --mask; checked here to name the file
        from brainshift.volume import mask_inside

        mask_inside(mask_volume, f"mask {str(mask)!r} (--mask)", nonempty=True)
    start = time.perf_counter()
    try:
        kp = detect_keypoints(
            volume, mask_volume, sigma_min_mm=sigma_min_mm, n_octaves=n_octaves, n_scales=n_scales,
            contrast_threshold=contrast_threshold, edge_ratio=edge_ratio, min_distance_mm=min_distance_mm,
            border_mm=border_mm, max_keypoints=max_keypoints,
        )
    except BrainshiftError as exc:  # name the command-line options, not the library's parameters
        raise type(exc)(_option_names(str(exc))) from None
    elapsed = time.perf_counter() - start
    if len(kp) == 0:
        raise BrainshiftError(f"expected keypoints in {image}, got none (an image with little structure, or too "
                              f"strict options: try a lower --contrast, a smaller --border-mm or a --mask)")
    # .key scales are in voxels (SIFT-Rank ignores the voxel size): mm over the geometric-mean spacing
    spacing = volume.spacing
    # descriptors: 3D SIFT-Rank-style ranks in world RAS axes (brainshift.keypoints.describe), read back by
    # io.keypoints.read_sift_key_features and matched by `brainshift match`
    from brainshift.io.atomic import atomic_output
    from brainshift.keypoints.describe import describe_keypoints

    descriptors = describe_keypoints(volume, kp.points_vox, kp.scales_mm)
    # the pair is written together: both files complete under temporary names before either replaces anything,
    # so a failure (full disk, an interruption) leaves the earlier .csv and .key as they were
    with atomic_output(csv_path) as tmp_csv, atomic_output(key_path) as tmp_key:
        write_detected_keypoints(tmp_csv, kp)
        write_sift_key(tmp_key, kp.points_vox, kp.scales_mm / float(spacing.prod() ** (1 / 3)), shape=volume.shape,
                       spacing_mm=tuple(float(s) for s in spacing), descriptors=descriptors)
    n_bright = int((kp.polarity > 0).sum())
    typer.echo(f"{len(kp)} keypoints ({n_bright} bright, {len(kp) - n_bright} dark) in {elapsed:.2f} s; "
               f"wrote {csv_path} and {key_path}")


def _check_options(options: dict) -> None:
    """Raise BrainshiftError naming the first command-line option whose value is out of range."""
    from brainshift.errors import BrainshiftError

    for name, (value, ok, expected) in options.items():
        if not ok:
            raise BrainshiftError(f"expected {name} {expected}, got {value}")


#: library parameter -> command-line option of ``brainshift keypoints``
_OPTIONS = {"sigma_min_mm": "--sigma-min-mm", "n_octaves": "--octaves", "n_scales": "--scales",
            "contrast_threshold": "--contrast", "edge_ratio": "--edge-ratio", "min_distance_mm": "--min-distance-mm",
            "border_mm": "--border-mm", "max_keypoints": "--max"}


def _option_names(message: str) -> str:
    """``message`` with the detector's parameter names replaced by the options that set them."""
    import re

    return re.sub(r"\b(" + "|".join(_OPTIONS) + r")\b", lambda m: _OPTIONS[m.group(1)], message)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
