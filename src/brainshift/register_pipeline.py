"""``brainshift register`` with files: read two images -> :func:`brainshift.register.register` -> write.

:func:`run_register` follows ``brainshift infer``'s conventions (:mod:`brainshift.pipeline`): the fields are
forward Lagrangian on the preop grid and written by :func:`brainshift.io.fields.write_field` (``.h5``, ``.nii.gz``
or ``.npz``); every input is read and validated and every result computed before anything is written; the
outputs are one transaction (:class:`brainshift.io.output_set.OutputSet`: staged in ``-o`` and moved into place
with ``summary.json``, the manifest), so bad input (images that do not overlap, too few matches) leaves ``-o``
as it was. (Kept beside :mod:`brainshift.pipeline`, whose write path another change owns, in the same layer.)

Outputs in ``-o``:

- ``matches.csv``: the inlier matches as a keypoint table in the preop voxel frame, columns
  ``x,y,z,dx,dy,dz`` (0-based ``i, j, k`` of the preop grid; the point moves to ``(x+dx, y+dy, z+dz)``), then
  the scores ``descriptor_distance, ratio, residual_mm, scale_mm`` (:class:`brainshift.register.RegisterResult`)
  and ``x_intraop, y_intraop, z_intraop`` (the matched keypoint, voxel indices of the intraop grid);
- ``initial_disp_field.<ext>``, and ``corrected_disp_field.<ext>`` when refined;
- ``summary.json``: inputs, counts of keypoints, candidate matches, inliers, inlier ratio, field statistics,
  timings;
- ``report.html`` and its figures (:mod:`brainshift.evaluate.register_report`) unless ``report=False``.

Convention: fields float32 ``(3, I, J, K)`` on the preop grid, forward Lagrangian (preop voxel ``p`` moves to
``p + u(p)``), voxel units along ``i, j, k``; files convert at the boundary (README, "Displacement-field files").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError
from brainshift.progress import StepTimer

OUTPUT_FORMATS = ("h5", "npz", "nii")
_EXT = {"h5": ".h5", "npz": ".npz", "nii": ".nii.gz"}
MATCHES_NAME = "matches.csv"
#: Columns of ``matches.csv`` after ``x,y,z,dx,dy,dz``.
SCORE_COLUMNS = ("descriptor_distance", "ratio", "residual_mm", "scale_mm")


@dataclass
class RegisterOptions:
    """Options of :func:`run_register` (the ``brainshift register`` command); see the README."""

    preop_scan: Path
    intraop_scan: Path
    output: Path = Path(".")
    mask: Path | None = None
    interp_mode: str = "tps"
    refine: bool | None = None
    weights: Path | None = None
    output_fmt: str = "h5"
    report: bool = True
    device: str = "auto"
    safeguards: bool = True
    verbose: bool = True


def _plan(opts: RegisterOptions) -> tuple[str, bool, Path | None, list[str]]:
    """``(format, refine, weights, planned file names)``; validates the options that need no file."""
    from brainshift.device import check_device_name
    from brainshift.register import METHODS
    from brainshift.resources import DEFAULT_WEIGHTS, resolve_weights

    fmt = opts.output_fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise BrainshiftError(f"expected --output-fmt one of {OUTPUT_FORMATS}, got {opts.output_fmt!r}")
    if str(opts.interp_mode).strip().lower() not in METHODS:
        raise BrainshiftError(f"expected -m/--interp-mode one of {METHODS}, got {opts.interp_mode!r}")
    check_device_name(opts.device)  # a typo is refused even with --no-refine, as infer does (pipeline._check_options)
    weights = resolve_weights(opts.weights) if (opts.weights is not None or opts.refine is not False) else None
    refine = weights is not None if opts.refine is None else bool(opts.refine)
    if refine and weights is None:
        raise BrainshiftError(f"expected network weights for --refine (-w/--weights FILE), got none and no default "
                              f"model at {DEFAULT_WEIGHTS}; use --no-refine for the interpolation only")
    names = [MATCHES_NAME, f"initial_disp_field{_EXT[fmt]}"]
    if refine:
        names.append(f"corrected_disp_field{_EXT[fmt]}")
    if opts.report:
        from brainshift.evaluate.case_report import REPORT_NAME
        from brainshift.evaluate.register_report import FIGURES

        names += [REPORT_NAME, *FIGURES.values()]
    return fmt, refine, (weights if refine else None), names


def matches_table(points_vox: np.ndarray, disps_vox: np.ndarray, scores: dict[str, np.ndarray],
                  other_points_vox: np.ndarray, other: str = "intraop") -> str:
    """The text of ``matches.csv``: ``x,y,z,dx,dy,dz`` (frame of the first image, voxel), the ``scores`` columns
    in :data:`SCORE_COLUMNS` order (those present), then ``x_<other>,y_<other>,z_<other>`` (the matched keypoint in
    voxel indices of the other image). A plain CSV with a header line; NaN written as ``nan``."""
    names = [c for c in SCORE_COLUMNS if c in scores]
    table = np.column_stack([points_vox, disps_vox, *[np.asarray(scores[c])[:, None] for c in names],
                             other_points_vox]) if len(points_vox) else np.zeros((0, 9 + len(names)))
    header = ",".join(["x", "y", "z", "dx", "dy", "dz", *names, f"x_{other}", f"y_{other}", f"z_{other}"])
    lines = [header]  # a plain CSV (no comment line): pandas / numpy read it as it is
    lines += [",".join("nan" if not np.isfinite(v) else f"{v:.6g}" for v in row) for row in table]
    return "\n".join(lines) + "\n"


def run_match(key_a: Path, key_b: Path, image_a: Path, image_b: Path, output: Path, *, ratio: float = 0.9,
              max_displacement_mm: float = 30.0) -> dict:
    """``brainshift match``: match the features of two 3D SIFT-Rank ``.key`` files and write ``matches.csv``.

    The ``.key`` files hold voxel positions (featExtract's voxel mode) and descriptors (``brainshift keypoints``
    or featExtract); each image gives its grid's affine, so the two may lie on different grids. Matching is
    :func:`brainshift.register.match_features`; the table is in A's voxel frame (``x,y,z,dx,dy,dz``), plus
    ``descriptor_distance, ratio, residual_mm`` and B's voxel indices ``x_b, y_b, z_b``. Written atomically.

    Returns:
        The counts of :class:`brainshift.register.MatchTable` plus ``features_a`` and ``features_b``.

    Raises:
        InputFileError, KeypointError: unreadable files, malformed ``.key`` files, different descriptor lengths,
            a ``.key`` header recording another grid shape or voxel size than its image
            (:func:`brainshift.io.keypoints.check_sift_key_grid`), features outside their image's grid (a ``.key``
            file of another image), no match left.
        BrainshiftError: an output name that is not a table (``.csv``/``.txt``).
    """
    from brainshift.io.atomic import atomic_output, check_output_file
    from brainshift.io.images import read_image
    from brainshift.io.keypoints import check_sift_key_grid, read_sift_key_features
    from brainshift.register import match_features

    if not Path(output).name.lower().endswith((".csv", ".txt")):
        raise BrainshiftError(f"expected -o/--output a keypoint table (.csv or .txt), got {str(output)!r}")
    check_output_file(output)  # before the work: a directory there, or a file where its folder should be
    fa, fb = read_sift_key_features(key_a), read_sift_key_features(key_b)
    vol_a, vol_b = read_image(image_a), read_image(image_b)
    check_sift_key_grid(fa, vol_a.shape, vol_a.spacing, key_path=key_a, image=f"-a {str(image_a)!r}")
    check_sift_key_grid(fb, vol_b.shape, vol_b.spacing, key_path=key_b, image=f"-b {str(image_b)!r}")
    _check_features_on_grid(fa.points_vox, vol_a.shape, key_a, image_a, "-a")
    _check_features_on_grid(fb.points_vox, vol_b.shape, key_b, image_b, "-b")
    aff_a, aff_b = vol_a.affine, vol_b.affine
    table = match_features(fa.points_vox, fa.descriptors, aff_a, fb.points_vox, fb.descriptors, aff_b,
                           ratio=ratio, max_displacement_mm=max_displacement_mm)
    if len(table.points_vox) == 0:
        from brainshift.errors import KeypointError

        c = table.counts
        raise KeypointError(f"expected at least one consistent match, got none ({c.get('candidate_matches', 0)} "
                            f"candidate matches of {len(fa.points_vox)} / {len(fb.points_vox)} features); are both "
                            f"images of the same patient? (--ratio {ratio:g}, --max-displacement-mm "
                            f"{max_displacement_mm:g})")
    text = matches_table(table.points_vox, table.disps_vox, table.scores, table.intraop_points_vox, other="b")
    with atomic_output(output) as tmp:
        tmp.write_text(text)
    return {"features_a": len(fa.points_vox), "features_b": len(fb.points_vox), **table.counts}


def _check_features_on_grid(points_vox: np.ndarray, shape, key: Path, image: Path, option: str) -> None:
    """Refuse ``.key`` features outside their image's voxel grid: the ``.key`` file was made from another image.

    Raises:
        KeypointError: naming the count outside, the first one and the option that gave the image.
    """
    from brainshift.errors import KeypointError

    outside = np.any((points_vox < -0.5) | (points_vox > np.asarray(shape) - 0.5), axis=1)
    if outside.any():
        first = ", ".join(f"{v:g}" for v in points_vox[np.argmax(outside)])
        raise KeypointError(f"expected the features of {str(key)!r} inside the grid of {option} {str(image)!r} "
                            f"(shape {tuple(shape)}), got {int(outside.sum())} of {len(points_vox)} outside, the "
                            f"first at voxel ({first}); was the .key file made from this image?")


def run_register(opts: RegisterOptions) -> dict:
    """Run ``brainshift register``: read both images, :func:`brainshift.register.register`, write the outputs.

    Returns:
        The summary dictionary that is also written to ``output/summary.json``.

    Raises:
        BrainshiftError (and subclasses): any bad input (unreadable or non-3-D images, images that do not
        overlap, too few matches, bad options), with a one-line message; nothing is written then.
    """
    from brainshift.io.images import check_intensities, read_image
    from brainshift.io.output_set import OutputSet
    from brainshift.pipeline import _load_network_async
    from brainshift.register import register

    t_start = time.perf_counter()
    steps = StepTimer(opts.verbose)
    fmt, refine, weights, names = _plan(opts)
    outputs = OutputSet(Path(opts.output), names)  # a user's file in the way fails here, before any work
    pending = _load_network_async(weights, opts.device) if refine else None
    with steps.step("load images"):
        preop = read_image(opts.preop_scan)
        check_intensities(preop, opts.preop_scan, "preop image")
        intraop = read_image(opts.intraop_scan)
        check_intensities(intraop, opts.intraop_scan, "intraop image")
        mask = read_image(opts.mask, kind="label") if opts.mask is not None else None
        if mask is not None:  # nonzero = inside, as keypoints --mask; checked here to name the file
            from brainshift.volume import mask_inside

            mask_inside(mask, f"mask {str(opts.mask)!r} (--mask)", nonempty=True)
    with steps.step("register and compensate"):
        result = register(preop, intraop, mask=mask, method=opts.interp_mode, model=pending,
                          device=opts.device if refine else "cpu", safeguards=opts.safeguards)
    del steps.timings_s["register and compensate"]
    steps.timings_s.update(result.timings_s)
    comp = result.compensation
    for name, fld in (("initial", comp.initial_field), ("refined", comp.refined_field)):
        if fld is not None and not np.isfinite(fld).all():
            raise BrainshiftError(f"expected a finite {name} field, got NaN or inf")
    files = {}
    if opts.report:
        with steps.step("report"):
            files = _report(preop, intraop, result, opts)
    with outputs:
        from brainshift.io.fields import write_field

        with steps.step("write outputs"):
            text = matches_table(result.points_vox, result.disps_vox, result.scores, result.intraop_points_vox)
            outputs.write(MATCHES_NAME, lambda p: p.write_text(text))
            fields = {"initial_disp_field": comp.initial_field, "corrected_disp_field": comp.refined_field}
            for name, fld in fields.items():
                if fld is not None:
                    outputs.write(f"{name}{_EXT[fmt]}", lambda p, fld=fld: write_field(p, fld, preop.affine))
            for name, data in files.items():
                outputs.write(name, lambda p, data=data: p.write_bytes(data))
        summary = _summary(opts, preop, intraop, result, weights, fmt, steps)
        summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
        outputs.commit(summary)
    return summary


def _report(preop, intraop, result, opts: RegisterOptions) -> dict[str, bytes]:
    from brainshift.evaluate.register_report import register_report
    from brainshift.io.fields import coarse_inverse_field, warp_image
    from brainshift.volume import Volume

    fld = result.field
    inverse = coarse_inverse_field(fld, preop.affine)
    warped = warp_image(preop, fld, preop.affine, inverse_field=inverse).data
    brain = Volume(np.asarray(result.mask, dtype=np.uint8), preop.affine, "label")
    warped_mask = np.asarray(warp_image(brain, fld, preop.affine, inverse_field=inverse).data) > 0
    intra_on_pre = intraop.resample_like(preop).data
    c = result.counts
    info = {
        "title": "brainshift register",
        "summary": (f"{c['keypoints_preop']} preop and {c['keypoints_intraop']} intraop keypoints, "
                    f"{c['candidate_matches']} candidate matches, {c['inliers']} inliers "
                    f"(inlier ratio {c['inlier_ratio']:.2f}); interpolation {result.compensation.method}"
                    f"{', refined by the network' if result.compensation.refined_field is not None else ''}."),
        "preop image": str(opts.preop_scan), "intraop image": str(opts.intraop_scan),
        "preop grid": f"{preop.shape}, spacing {tuple(round(float(s), 3) for s in preop.spacing)} mm",
        "intraop grid": f"{intraop.shape}, spacing {tuple(round(float(s), 3) for s in intraop.spacing)} mm",
        "files": report_files(opts, result.compensation.refined_field is not None),
    }
    return register_report(preop, intra_on_pre, warped, fld, result.points_vox, result.disps_vox, result.mask, info,
                           warped_mask=warped_mask)


def report_files(opts: RegisterOptions, refined: bool) -> list[tuple[str, str]]:
    """The report's "Files" list: every file ``run_register`` writes into ``-o`` (``report.html`` aside),
    ``(name, description)``, in the order of the module docstring."""
    from brainshift.evaluate.register_report import FIGURES

    ext = _EXT[opts.output_fmt.lower()]
    files = [(MATCHES_NAME, "inlier matches, preop voxel frame: x,y,z,dx,dy,dz, scores, the matched intraop voxel"),
             (f"initial_disp_field{ext}", f"the interpolated field ({opts.interp_mode}) of the matches")]
    if refined:
        files.append((f"corrected_disp_field{ext}", "the field refined by the network"))
    files.append(("summary.json", "inputs, matching counts, field statistics, safeguards, timings"))
    files += [(n, "figure") for n in FIGURES.values()]
    return files


def _summary(opts: RegisterOptions, preop, intraop, result, weights, fmt: str, steps: StepTimer) -> dict:
    from brainshift import __version__
    from brainshift.pipeline import _format_note

    comp = result.compensation
    names = {"initial": "initial_disp_field", "refined": "corrected_disp_field"}
    summary = {
        "brainshift_version": __version__,
        "inputs": {"preop_scan": str(opts.preop_scan), "intraop_scan": str(opts.intraop_scan),
                   "mask": str(opts.mask) if opts.mask else None,
                   "weights": str(weights) if weights is not None else None},
        "image": {"shape": list(preop.shape), "spacing_mm": [round(float(s), 6) for s in preop.spacing],
                  "affine_voxel_to_ras": preop.affine.round(6).tolist()},
        "intraop_image": {"shape": list(intraop.shape), "spacing_mm": [round(float(s), 6) for s in intraop.spacing],
                          "affine_voxel_to_ras": intraop.affine.round(6).tolist()},
        "brain_mask": "given (--mask)" if opts.mask else "computed: Otsu threshold, largest component, holes filled",
        "frames": {"keypoint_table": "voxel",
                   "fields_in_memory": "forward Lagrangian, voxel units along i, j, k of the preop grid",
                   "output_files": _format_note(fmt)},
        "matching": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in result.counts.items()},
        "interpolation": comp.method,
        "interpolation_options": {k: (float(v) if isinstance(v, (int, float)) else v)
                                  for k, v in result.interp_options.items()},
        "tps_lam_cv_rmse_mm": {f"{k:g}": round(float(v), 6) for k, v in result.lam_cv_rmse_mm.items()},
        "refined": comp.refined_field is not None,
        "keypoint_count": comp.n_keypoints,
        "fields": {names[k]: v for k, v in comp.statistics.items()},
        "timings_s": {k: round(v, 4) for k, v in steps.timings_s.items()},
    }
    if comp.model is not None:
        summary["safeguards"] = comp.safeguards
    return summary
