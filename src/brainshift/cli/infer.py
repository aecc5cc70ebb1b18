"""``brainshift infer``: preop image + keypoints (or an initial field) -> dense displacement field files."""

from __future__ import annotations

from pathlib import Path

import typer

from brainshift.cli.app import choice, cli_errors


@cli_errors
def infer_command(
    preop_scan: Path = typer.Option(..., "-p", "--preop_scan", "--preop-scan",
                                    help="Preop image (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)."),
    init_disp: Path | None = typer.Option(None, "-i", "--init_disp", "--init-disp",
                                          help="Initial displacement field (.h5, .nii/.nii.gz vector, .npz); "
                                               "replaces interpolation; with -k the keypoints drive the "
                                               "safeguards."),
    kpt_disps: Path | None = typer.Option(None, "-k", "--kpt_disps", "--kpt-disps",
                                          help="Keypoints: table x,y,z,dx,dy,dz (.csv/.txt), or preop Slicer "
                                               "markups (.fcsv/.mrk.json) with --kpt-intraop."),
    kpt_intraop: Path | None = typer.Option(None, "--kpt-intraop",
                                            help="Intraop Slicer markups matching -k (by label or order)."),
    interp_mode: str = typer.Option("auto", "-m", "--interp_mode", "--interp-mode",
                                    help="Interpolator: auto (tps, or linear for keypoints clustered in one region: "
                                         "convex hull < 4 % of the foreground) | linear (Delaunay) | tps (published; "
                                         "ridge 0.1, a smoothing spline: not exact at the keypoints) | tps3d "
                                         "(biharmonic, exact) | gp (Gaussian-process regression, Matern kernel "
                                         "fitted to the keypoints; returns to zero away from them) | atlas (the "
                                         "patient's deformation atlas fitted to the keypoints; needs --atlas)."),
    tps_lam: str | None = typer.Option(None, "--tps-lam",
                                       help="Ridge of -m tps (and of auto when it takes tps): a number >= 0 "
                                            "(default: the published 0.1) or cv (chosen by 5-fold cross-validation "
                                            "over the keypoints, as register does; for many noisy keypoints, at "
                                            "least 20)."),
    atlas: Path | None = typer.Option(None, "--atlas",
                                      help="Deformation atlas folder of this preop image (brainshift atlas), for "
                                           "-m atlas."),
    atlas_prior: str | None = typer.Option(None, "--atlas-prior",
                                           help="Prior of -m atlas's fit: scaled-atlas+matern+contact (default: "
                                                "the atlas's members, their mean's amplitude fitted too, plus a "
                                                "smooth Matern kernel for what they do not span, side by side with "
                                                "the same prior held to no motion through the skull outside the "
                                                "craniotomy, with 20 or more keypoints; the field averaged over "
                                                "both and over the "
                                                "hyperparameters by their marginal likelihood) | scaled-atlas+matern "
                                                "(without the skull-held prior) | atlas+matern (also the members' "
                                                "mean fixed) | atlas (the members alone, no kernel)."),
    device: str = typer.Option("auto", "-d", "--device",
                               help="auto | cpu | cuda: where the network refinement runs (unused with --no-refine)."),
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
    min_field_rms: float | None = typer.Option(None, "--min-field-rms",
                                               help="Scale normalisation floor (mm): an initial field whose RMS "
                                                    "over the brain is smaller is scaled up to it for the network "
                                                    "and the correction scaled back (default: for the network "
                                                    "alone the model's own value, 2.5 for the default model; under "
                                                    "the safeguards off; 0: off)."),
    safeguards: bool = typer.Option(True, "--safeguards/--no-safeguards",
                                    help="Keep the network's correction only as far as it predicts held-out "
                                         "keypoints better than the interpolation, then honour the keypoints "
                                         "(needs keypoints; default on). --no-safeguards: the network alone."),
    save_uncertainty: bool = typer.Option(False, "--save-uncertainty",
                                          help="Also write uncertainty_mm.nii.gz: per-voxel standard deviation "
                                               "(mm) of the refined field (with safeguards)."),
    h5_dtype: str = typer.Option("float32", "--h5-dtype", help="Precision of .h5 fields: float32 | float64."),
    h5_compression: int = typer.Option(0, "--h5-compression", min=0, max=9,
                                       help=".h5 gzip level (0: none, the fastest; 1: ~0.77x the size, ~1.3 s "
                                            "more per MNI-sized field)."),
    max_displacement_mm: float = typer.Option(100.0, "--max-displacement",
                                              help="Refuse keypoint, initial-field or result displacements "
                                                   "longer than this (mm)."),
    save_inverse: bool = typer.Option(False, "--save-inverse", help="Also write the inverse field."),
    save_warped: bool = typer.Option(False, "--save-warped", help="Also write the preop image warped to intraop."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress output."),
) -> None:
    """Turn a preop image plus matched keypoints (or an initial field) into a dense displacement field."""
    from brainshift.pipeline import InferOptions, run_infer

    summary = run_infer(InferOptions(
        preop_scan=preop_scan, output=output, init_disp=init_disp, kpt_disps=kpt_disps, kpt_intraop=kpt_intraop,
        interp_mode=choice(interp_mode), coords=choice(coords), device=choice(device),
        output_fmt=choice(output_fmt), weights=weights,
        refine=refine, mirror_average=mirror_average, save_inverse=save_inverse, save_warped=save_warped,
        safeguards=safeguards, save_uncertainty=save_uncertainty,
        h5_dtype=choice(h5_dtype), h5_compression=h5_compression, max_displacement_mm=max_displacement_mm,
        atlas=atlas, atlas_prior=choice(atlas_prior), tps_lam=choice(tps_lam), min_field_rms_mm=min_field_rms,
        verbose=not quiet))
    final = summary["fields"].get("corrected_disp_field", summary["fields"]["initial_disp_field"])
    typer.echo(f"wrote {', '.join(summary['outputs'])} to {output}")
    typer.echo(f"max displacement {final['max_displacement_mm']:.2f} mm, mean {final['mean_displacement_mm']:.2f} mm, "
               f"det J <= 0 in {final['pct_jacobian_nonpositive']:.4f} % of voxels, "
               f"total {summary['timings_s']['total']:.2f} s")
    guard = summary.get("safeguards")
    if isinstance(guard, dict) and "alpha" in guard:
        if guard.get("learnt_correction") is False:
            typer.echo(f"safeguards: no learnt correction: {guard.get('learnt_correction_reason', '')}")
        else:
            typer.echo(f"safeguards: kept {guard['alpha']:.2f} of the network's correction (alpha, chosen by "
                       f"{guard.get('folds', 0)}-fold cross-validation over the keypoints); beta "
                       f"{guard.get('beta', float('nan')):.2f} (how closely the output honours the keypoints: "
                       f"1 exactly, 0 as the initial field does)")
