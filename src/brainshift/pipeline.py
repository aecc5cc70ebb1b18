"""The main job with files: read -> :func:`brainshift.compensate.compensate` -> write (all-or-nothing).

``run_infer`` is what ``brainshift infer`` calls. Every input is read and validated, and every field
computed, before the first output file is written; the outputs are one transaction
(:class:`brainshift.io.output_set.OutputSet`): written into a staging folder inside ``-o`` and moved into place
together with ``summary.json`` (the manifest), so a failure at any point leaves ``-o`` as it was, and a re-run
replaces only files an earlier run listed in its ``summary.json``.

Convention: all fields in memory are float32 ``(3, I, J, K)`` on the preop image grid, forward Lagrangian
(the preop point at voxel ``p`` moves to ``p + u(p)`` intraoperatively), components in voxel units along
``i, j, k``. Output files convert at the boundary (see README, "Displacement-field files").
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.progress import StepTimer
from brainshift.volume import Volume

OUTPUT_FORMATS = ("h5", "npz", "nii")
_EXT = {"h5": ".h5", "npz": ".npz", "nii": ".nii.gz"}
#: The ``.h5`` gzip level ``infer`` writes by default: 0 (uncompressed float32, 0.5x the float64 file). Deflate
#: takes ~1.3 s per MNI-sized field on a 2-core CPU for 0.38x instead (bench/fields_io.py); ``--h5-compression 1``.
INFER_H5_COMPRESSION = 0
#: The default bound on displacements (mm) in keypoints, initial fields and results (``--max-displacement``):
#: brain shift reaches a few centimetres; beyond this a table in the wrong units or frame is far likelier.
MAX_DISPLACEMENT_MM = 100.0


@dataclass
class InferOptions:
    """Options of :func:`run_infer` (the ``brainshift infer`` command); see the README for each."""

    preop_scan: Path
    output: Path = Path(".")
    init_disp: Path | None = None
    kpt_disps: Path | None = None
    kpt_intraop: Path | None = None
    interp_mode: str = "auto"
    coords: str = "voxel"
    device: str = "auto"
    output_fmt: str = "h5"
    weights: Path | None = None
    refine: bool | None = None
    mirror_average: bool | None = None
    safeguards: bool = True
    save_uncertainty: bool = False
    save_inverse: bool = False
    save_warped: bool = False
    verbose: bool = True
    interp_options: dict = dc_field(default_factory=dict)
    h5_dtype: str = "float32"
    h5_compression: int = INFER_H5_COMPRESSION
    max_displacement_mm: float = MAX_DISPLACEMENT_MM
    atlas: Path | None = None
    atlas_prior: str | None = None
    tps_lam: str | None = None
    min_field_rms_mm: float | None = None


def _refinement_plan(opts: InferOptions) -> tuple[bool, Path | None]:
    """``(refine, weights)`` from the options and the shipped default model (:mod:`brainshift.resources`).

    Raises:
        BrainshiftError: ``--refine`` without weights and no default model. InputFileError: missing ``-w`` file.
    """
    from brainshift.resources import DEFAULT_WEIGHTS, resolve_weights

    refine = opts.refine
    weights = resolve_weights(opts.weights) if (opts.weights is not None or refine is not False) else None
    if refine is None:  # default: refine when weights are given or the default model ships
        refine = weights is not None
        if not refine:
            warnings.warn(f"no network weights (no -w and no default model at {DEFAULT_WEIGHTS}): "
                          "writing the classical interpolation only, without refinement", stacklevel=3)
    if not refine and opts.mirror_average:
        warnings.warn("--mirror-average has no effect without network refinement (--no-refine)", stacklevel=3)
    if not refine and str(opts.device).strip().lower() not in ("auto", "cpu"):
        warnings.warn(f"-d/--device {opts.device} has no effect without network refinement (--no-refine): only the "
                      "network runs on a device; the interpolation runs on the CPU", stacklevel=3)
    if refine and weights is None:
        raise BrainshiftError(
            f"expected network weights for --refine (-w/--weights FILE), got none and no default model at "
            f"{DEFAULT_WEIGHTS}; use --no-refine for the classical interpolation only")
    return bool(refine), (weights if refine else None)


def _check_options(opts: InferOptions) -> str:
    """Validate the options that need no file; return the output format."""
    from brainshift.device import check_device_name
    from brainshift.interpolate import available_interpolators
    from brainshift.io.fields import H5_DTYPES

    fmt = opts.output_fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise BrainshiftError(f"expected --output_fmt one of {OUTPUT_FORMATS}, got {opts.output_fmt!r}")
    methods = [*available_interpolators(), "auto", "atlas"]
    if str(opts.interp_mode).lower() not in methods:
        raise BrainshiftError(f"expected -m/--interp_mode one of {methods}, got {opts.interp_mode!r}")
    check_device_name(opts.device)  # a typo is refused even with --no-refine (the GPU is checked when it is used)
    if opts.init_disp is None and opts.kpt_disps is None:
        got = "only --kpt-intraop (the preop markups go in -k)" if opts.kpt_intraop is not None else "neither"
        raise BrainshiftError(f"expected keypoints (-k/--kpt_disps) or an initial field (-i/--init_disp), got {got}")
    if opts.h5_dtype not in H5_DTYPES:
        raise BrainshiftError(f"expected --h5-dtype one of {H5_DTYPES}, got {opts.h5_dtype!r}")
    if not 0 <= int(opts.h5_compression) <= 9:
        raise BrainshiftError(f"expected --h5-compression in 0-9, got {opts.h5_compression}")
    bound = float(opts.max_displacement_mm)
    if not (bound > 0 and bound < float("inf")):
        raise BrainshiftError(f"expected --max-displacement a positive number of mm, got {opts.max_displacement_mm}")
    floor = opts.min_field_rms_mm
    if floor is not None and not (isinstance(floor, (int, float)) and 0 <= float(floor) < float("inf")):
        raise BrainshiftError(f"expected --min-field-rms a finite number >= 0 (mm), got {floor}")
    _check_keypoint_options(opts)
    _tps_lam_option(opts)
    if str(opts.interp_mode).lower() == "atlas":
        if opts.atlas is None:
            raise BrainshiftError("expected --atlas FOLDER (made by brainshift atlas) with -m atlas, got none")
        if opts.kpt_disps is None:
            raise BrainshiftError("expected keypoints (-k) with -m atlas (the atlas is fitted to them), got only an "
                                  "initial field")
        if opts.init_disp is not None:
            raise BrainshiftError("expected no initial field (-i) with -m atlas (the atlas fit makes the initial "
                                  "field), got one")
    elif opts.atlas is not None:
        raise BrainshiftError(f"expected --atlas only with -m atlas, got -m {opts.interp_mode}")
    if opts.atlas_prior is not None:
        from brainshift.atlas.fit import PRIORS

        if opts.atlas_prior not in PRIORS:
            raise BrainshiftError(f"expected --atlas-prior one of {list(PRIORS)}, got {opts.atlas_prior!r}")
        if str(opts.interp_mode).lower() != "atlas":
            raise BrainshiftError(f"expected --atlas-prior only with -m atlas, got -m {opts.interp_mode}")
    return fmt


def _load_network_async(weights: Path, device: str):
    """Check ``device`` at once, then start loading the network (torch import, weights) in a background thread.

    torch's import and the weights take ~1.5-2 s; reading the image and interpolating meanwhile (numpy, scipy
    and zlib release the GIL) hides part of it. A named GPU (``cuda``, ``cuda:N``) is checked here, before that
    work, so that a machine without it fails at once rather than after the interpolation
    (:func:`brainshift.device.check_device`; ``auto`` and ``cpu`` cannot fail and keep torch's import in the
    thread). Returns a ``Future`` of the :class:`~brainshift.model.checkpoint.LoadedModel`
    (:func:`brainshift.compensate.compensate` accepts it).

    Raises:
        BrainshiftError: a bad device name, or CUDA asked for without that GPU.
    """
    from concurrent.futures import ThreadPoolExecutor

    from brainshift.device import check_device

    check_device(device)

    def load():
        from brainshift.device import resolve_device
        from brainshift.model.checkpoint import load_weights

        return load_weights(weights, device=resolve_device(device))

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainshift-load")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def _read_inputs(opts: InferOptions, steps: StepTimer) -> tuple[Volume, dict]:
    """The preop image and ``{"initial_field": ...}``, ``{"keypoints": (points_vox, disps_vox)}`` or both (``-i``
    with ``-k``: the field is used as it is and the keypoints drive the safeguards,
    :func:`brainshift.compensate.compensate`)."""
    from brainshift.io.images import check_intensities, read_image

    with steps.step("load preop image"):
        image = read_image(opts.preop_scan)
        check_intensities(image, opts.preop_scan, "preop image")
    given: dict = {}
    if opts.init_disp is not None:
        from brainshift.io.fields import read_field

        with steps.step("load initial field"):
            init_field, _ = read_field(opts.init_disp, reference=image)
            _check_field_bound(image, init_field, opts)
        given["initial_field"] = init_field
        if opts.kpt_disps is None:
            return image, given
    from brainshift.io.keypoints import read_keypoints

    with steps.step("load keypoints"):
        points_vox, disps_vox = read_keypoints(opts.kpt_disps, frame=opts.coords, affine=image.affine,
                                               intraop_path=opts.kpt_intraop)
        names = _keypoint_names(opts.kpt_disps)
        _check_displacement_bound(image, disps_vox, names, opts)
        if names is not None:  # validated here so that messages name the file's lines (compensate re-checks)
            from brainshift.keypoints.validate import validate_keypoints

            points_vox, disps_vox = validate_keypoints(points_vox, disps_vox, image.shape, names=names)
    from brainshift.compensate import foreground_mask

    _keypoints_on_background(points_vox, foreground_mask(image))  # before any work: a frame mix-up warns at once
    return image, {**given, "keypoints": (points_vox, disps_vox)}


def _keypoint_coverage(image: Volume, given: dict, method: str, refined: bool = False,
                       safeguards: bool = True) -> float | None:
    """The keypoints' convex-hull fraction of the image foreground (:func:`brainshift.keypoints.validate.hull_fraction`;
    None without keypoints); warns when a spline (``tps``, ``tps3d``) interpolated keypoints clustered in one
    region (:data:`~brainshift.keypoints.validate.CLUSTERED_HULL_FRACTION`), where ``linear`` is the safer choice,
    and when the network's correction was applied (``refined``) to a field from such keypoints: the safeguards'
    cross-validation can only check the correction near them, and on 18 validation cases with 20 keypoints at the
    craniotomy the refined field had 1.4 x (0.5 mm noise) and 6.4 x (exact keypoints) the mean MSE of ``linear``
    alone, worst 9 x and 57 x (bench/RESULTS.md, "Session 30"). Under the safeguards a ``linear`` or ``gp`` field
    from 10 or more such keypoints gets no learnt correction (:func:`brainshift.compensate.learnt_correction_allowed`):
    no warning then; it remains for the network alone (``--no-safeguards``), the atlas, a given field and fewer
    keypoints (for a spline the first warning says it: refinement helps a spline there, ``linear`` more)."""
    from brainshift.compensate import foreground_mask
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION, hull_fraction

    if "keypoints" not in given:
        return None
    fraction = hull_fraction(given["keypoints"][0], image.affine, foreground_mask(image))
    if method in ("tps", "tps3d") and fraction < CLUSTERED_HULL_FRACTION:
        warnings.warn(f"the keypoints span {100 * fraction:.2g} % of the image foreground (their convex hull): "
                      f"keypoints from one region, e.g. the craniotomy, make -m {method} extrapolate their trend "
                      "across the brain; -m linear had 10-17 x lower error there on our benchmark, refined or not "
                      "(README, Interpolators)", stacklevel=3)
    if refined and fraction < CLUSTERED_HULL_FRACTION and method not in ("tps", "tps3d"):  # a spline: warned above
        from brainshift.compensate import MIN_KEYPOINTS_CLUSTER_RULE, NO_CORRECTION_WHEN_CLUSTERED

        n = len(given["keypoints"][0])
        if not safeguards and n >= MIN_KEYPOINTS_CLUSTER_RULE and method in NO_CORRECTION_WHEN_CLUSTERED:
            advice = "add --no-refine, or drop --no-safeguards (they then keep the correction out)"
        else:
            advice = "add --no-refine"
        warnings.warn(f"the keypoints span {100 * fraction:.2g} % of the image foreground (their convex hull) and the "
                      "network refined the field: the safeguards can only check its correction near them, and on our "
                      "validation cases it made such fields several times worse than -m linear alone: "
                      f"{advice} (README, Interpolators)", stacklevel=3)
    return fraction


#: warn when more than this share of the keypoints lies on the image background (intensity at its minimum)
BACKGROUND_KEYPOINT_SHARE = 0.5


def _keypoints_on_background(points_vox, foreground) -> int:
    """How many keypoints lie on the image background (the nearest voxel outside
    :func:`brainshift.compensate.foreground_mask`, e.g. outside a skull-stripped brain); warns (one line) when more
    than :data:`BACKGROUND_KEYPOINT_SHARE` of them do: the usual sign of coordinates in another frame than
    ``--coords`` says (e.g. LPS rows read as RAS, which mirrors them through the origin's axes), which the range
    check cannot see when the mirrored points stay inside the grid. Points on the brain's surface can lie just
    outside it, hence a share and not any."""
    import numpy as np

    pts = np.asarray(points_vox, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        return 0  # malformed: the keypoint validation says so, with its own message
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        return 0
    idx = np.clip(np.rint(pts).astype(int), 0, np.array(foreground.shape) - 1)
    outside = int((~foreground[idx[:, 0], idx[:, 1], idx[:, 2]]).sum())
    if outside > BACKGROUND_KEYPOINT_SHARE * len(idx):
        warnings.warn(f"{outside} of {len(idx)} keypoints lie on the image background (intensity at its minimum, "
                      "outside the brain of a skull-stripped image): check that --coords names the frame of the "
                      "keypoint file (ras, lps or voxel; README, Conventions)", stacklevel=5)
    return outside


def _keypoint_names(path: Path) -> list[str] | None:
    """``"line N of FILE"`` for each row of a keypoint table (what a user sees in an editor); None otherwise."""
    from brainshift.io.keypoints import TABLE_SUFFIXES, keypoint_table_lines

    p = Path(path)
    if not p.name.lower().endswith(TABLE_SUFFIXES):
        return None
    return [f"line {n} of {p.name}" for n in keypoint_table_lines(p)]


def run_infer(opts: InferOptions) -> dict:
    """Run ``brainshift infer``: read, :func:`brainshift.compensate.compensate`, write fields and ``summary.json``.

    Returns:
        The summary dictionary that is also written to ``output/summary.json``.

    Raises:
        BrainshiftError (and subclasses): any bad input, with a one-line message.
    """
    from brainshift.compensate import compensate
    from brainshift.io.output_set import OutputSet

    t_start = time.perf_counter()
    steps = StepTimer(opts.verbose)
    fmt = _check_options(opts)
    refine, weights = _refinement_plan(opts)
    if refine and opts.kpt_disps is None and weights is not None:
        from brainshift.model.checkpoint import peek_network_config

        net_cfg = peek_network_config(weights)
        if net_cfg is not None and net_cfg.uses_keypoints:  # refused before any work
            raise BrainshiftError(f"expected keypoints (-k) for the model {weights}, which takes them as an input "
                                  f"channel (keypoint_channel {net_cfg.keypoint_channel!r}), got an initial field "
                                  "only; give -k too, or --no-refine")
    if refine and opts.safeguards and opts.kpt_disps is None:
        warnings.warn("an initial field without keypoints (-k): the safeguards (cross-validated fallback, keypoint "
                      "consistency, uncertainty) need keypoints, so the network's correction is applied unchecked; "
                      "give the keypoints too, or --no-refine to keep the field as it is", stacklevel=2)
    out = Path(opts.output)
    outputs = OutputSet(out, _planned_outputs(opts, fmt, refine))  # a user's file in the way fails here, at once
    # the device is checked here, before any work, when the network will run on it; with --no-refine it is unused
    pending = _load_network_async(weights, opts.device) if refine else None
    device = "cpu"
    atlas = None
    if opts.atlas is not None:
        from brainshift.atlas.basis import load_atlas

        with steps.step("load atlas"):
            atlas = load_atlas(opts.atlas)
    image, given = _read_inputs(opts, steps)
    interp_options, lam_cv, lam_unused = _interp_options(opts, image, given, steps)
    if fmt in ("h5", "nii"):  # refused before the work, not when the first field is written
        from brainshift.geometry import check_no_shear

        check_no_shear(image.affine, f"the preop image {opts.preop_scan}")
    with steps.step("interpolate, refine and field statistics"):
        result = compensate(image, **given, method=opts.interp_mode, interp_options=interp_options,
                            model=pending, device=opts.device, mirror_average=opts.mirror_average,
                            progress=opts.verbose, statistics=True, safeguards=opts.safeguards, atlas=atlas,
                            atlas_prior=opts.atlas_prior, min_field_rms_mm=opts.min_field_rms_mm)
    del steps.timings_s["interpolate, refine and field statistics"]
    steps.timings_s.update(result.timings_s)
    _check_result(result, opts)
    learnt = result.refined_field is not None and (result.safeguards or {}).get("learnt_correction", True)
    coverage = _keypoint_coverage(image, given, result.method, refined=learnt, safeguards=opts.safeguards)
    if refine:
        from brainshift.device import resolve_device

        device = str(resolve_device(opts.device))
    with outputs:
        _write_outputs(outputs, fmt, image, result, opts, steps)
        summary = _summary(opts, image, result, weights, device, outputs.written, steps, fmt)
        if interp_options and (result.interpolator_choice is None or result.method == "tps"):
            summary["interpolation_options"] = {k: (round(float(v), 6) if isinstance(v, float) else v)
                                                for k, v in interp_options.items()}
        if lam_unused is not None and result.interpolator_choice is not None:
            summary["interpolator_choice"] = {**result.interpolator_choice, "tps_lam": lam_unused}
        if coverage is not None:
            summary["keypoint_hull_fraction"] = round(coverage, 6)
        if lam_cv:
            summary["tps_lam_cv_rmse_mm"] = {f"{k:g}": round(float(v), 6) for k, v in lam_cv.items()}
        summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
        outputs.commit(summary)
    return summary


def _tps_lam_option(opts: InferOptions) -> float | str | None:
    """``--tps-lam``: None, ``"cv"`` or a ridge ``>= 0`` (checked before any file is read).

    Raises:
        BrainshiftError: not a number ``>= 0`` nor ``cv``, or given with another method than ``tps`` or ``auto``.
    """
    import math

    if opts.tps_lam is None:
        return None
    if str(opts.interp_mode).lower() not in ("tps", "auto"):
        raise BrainshiftError(f"expected --tps-lam only with -m tps (or auto, when it chooses tps), got -m "
                              f"{opts.interp_mode}")
    text = str(opts.tps_lam).strip().lower()
    if text == "cv":
        return "cv"
    try:
        lam = float(text)
    except ValueError:
        lam = float("nan")
    if not (math.isfinite(lam) and lam >= 0):
        raise BrainshiftError(f"expected --tps-lam a number >= 0 or 'cv', got {opts.tps_lam!r}")
    return lam


def _interp_options(opts: InferOptions, image: Volume, given: dict, steps: StepTimer
                    ) -> tuple[dict, dict[float, float], dict | None]:
    """The interpolator options of this run, for ``--tps-lam cv`` the cross-validation's RMS errors (else
    empty), and the record of a ``--tps-lam`` that ``-m auto`` left unused (else None).

    ``--tps-lam cv`` chooses the thin-plate spline's ridge by 5-fold cross-validation over the keypoints
    (:func:`brainshift.interpolate.tps.choose_tps_lam`, as ``brainshift register`` does for its matches).

    With ``-m auto``, the ridge (a number or ``cv``) applies only when auto takes ``tps``
    (:func:`brainshift.compensate.choose_interpolator`); when it takes ``linear``, which has no ridge, the run
    goes on, warns (one line) and returns ``{"given", "used": False, "reason"}`` for ``summary.json``
    (``interpolator_choice.tps_lam``).

    Raises:
        KeypointError: ``--tps-lam cv`` with fewer than
            :data:`brainshift.interpolate.tps.MIN_KEYPOINTS_LAM_CV` keypoints.
        BrainshiftError: ``--tps-lam`` with an initial field (no interpolation to tune).
    """
    from brainshift.errors import KeypointError

    options = dict(opts.interp_options)
    lam = _tps_lam_option(opts)
    if lam is None:
        return options, {}, None
    if "keypoints" not in given or "initial_field" in given:
        raise BrainshiftError("expected keypoints (-k) without an initial field (-i) for --tps-lam, got an initial "
                              "field: nothing is interpolated")
    points_vox, disps_vox = given["keypoints"]
    if str(opts.interp_mode).lower() == "auto":
        from brainshift.compensate import choose_interpolator

        chosen, fraction = choose_interpolator(image, points_vox)
        if chosen != "tps":  # auto takes linear: no ridge to set or choose
            return options, {}, _unused_tps_lam(opts, lam, chosen, fraction)
    if lam != "cv":
        options["lam"] = float(lam)
        return options, {}, None
    from brainshift.interpolate.tps import MIN_KEYPOINTS_LAM_CV, choose_tps_lam

    if len(points_vox) < MIN_KEYPOINTS_LAM_CV:
        raise KeypointError(f"expected at least {MIN_KEYPOINTS_LAM_CV} keypoints for --tps-lam cv (5-fold "
                            f"cross-validation), got {len(points_vox)}; give a number instead (published: 0.1)")

    with steps.step("choose tps ridge (cross-validation)"):
        options["lam"], rmse = choose_tps_lam(points_vox, disps_vox, image.shape, image.affine)
    return options, rmse, None


def _unused_tps_lam(opts: InferOptions, lam: float | str, chosen: str, fraction: float) -> dict:
    """Warn (one line) that ``--tps-lam`` is not used because ``-m auto`` chose ``chosen`` (``linear``, no ridge);
    the record of it for ``summary.json``."""
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION

    reason = (f"-m auto chose {chosen} (keypoints clustered in one region: their convex hull spans "
              f"{100 * fraction:.2g} % of the image foreground, below {100 * CLUSTERED_HULL_FRACTION:g} %), "
              f"which has no ridge")
    warnings.warn(f"--tps-lam {opts.tps_lam} not used: {reason}; with -m tps it applies",
                  stacklevel=4)
    return {"given": lam, "used": False, "reason": reason}


def _planned_outputs(opts: InferOptions, fmt: str, refine: bool) -> list[str]:
    """The file names a run with these options writes (checked against the folder before any work)."""
    ext = _EXT[fmt]
    names = [f"initial_disp_field{ext}"]
    final = "corrected" if refine else "initial"
    if refine:
        names.append(f"corrected_disp_field{ext}")
    if opts.save_inverse:
        names.append(f"{final}_inverse_disp_field{ext}")
    if opts.save_warped:
        names.append("preop_warped_to_intraop.nii.gz")
    if opts.save_uncertainty:
        names.append("uncertainty_mm.nii.gz")
    return names


def _check_displacement_bound(image: Volume, disps_vox, names: list[str] | None, opts: InferOptions) -> None:
    """Refuse keypoint displacements longer than ``opts.max_displacement_mm`` (or non-finite).

    Raises:
        KeypointError: naming the first offending keypoint (its file line for a table) and its length in mm.
    """
    import numpy as np

    from brainshift.errors import KeypointError

    bound = float(opts.max_displacement_mm)
    a = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    disps_mm = np.linalg.norm(np.asarray(disps_vox, dtype=np.float64) @ a.T, axis=1)
    bad = np.flatnonzero(~(disps_mm <= bound))
    if bad.size:
        i = int(bad[0])
        where = names[i] if names is not None else f"keypoint {i + 1} of {Path(opts.kpt_disps).name}"
        raise KeypointError(f"expected keypoint displacements of at most {bound:g} mm (--max-displacement), "
                            f"got {disps_mm[i]:.6g} mm on {where}")


def _check_field_bound(image: Volume, field_vox, opts: InferOptions) -> None:
    """Refuse an initial field with displacements longer than ``opts.max_displacement_mm`` (or non-finite).

    Raises:
        InputFileError: naming the file and the longest displacement in mm.
    """
    import numpy as np

    bound = float(opts.max_displacement_mm)
    a = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    fld = np.asarray(field_vox)
    mm2 = sum(np.square(np.tensordot(a[r], fld, axes=(0, 0)), dtype=np.float64) for r in range(3))
    worst = float(np.sqrt(np.max(mm2))) if fld.size else 0.0
    if not worst <= bound:
        raise InputFileError(f"expected initial-field displacements of at most {bound:g} mm (--max-displacement), "
                             f"got {worst:.6g} mm in {opts.init_disp}")


def _check_result(result, opts: InferOptions) -> None:
    """Refuse a computed field that is non-finite or beyond the bound (never write it, never put inf in JSON)."""
    import numpy as np

    bound = float(opts.max_displacement_mm)
    for name, fld in (("initial", result.initial_field), ("refined", result.refined_field)):
        if fld is not None and not np.isfinite(fld).all():
            raise BrainshiftError(f"expected a finite {name} field, got NaN or inf in {int((~np.isfinite(fld)).sum())} "
                                  f"components; check the inputs for non-finite or extreme values")
    for name, stats in result.statistics.items():
        worst = stats.get("max_displacement_mm")
        if worst is None:
            continue
        if not np.isfinite(worst) or worst > bound:
            raise BrainshiftError(f"expected a {name} field with displacements of at most {bound:g} mm "
                                  f"(--max-displacement), got {worst:.6g} mm; check the keypoints' units and frame")


def _write_outputs(outputs, fmt: str, image: Volume, result, opts: InferOptions, steps: StepTimer) -> None:
    """Write the fields (and the inverse / warped image when asked) into the staging folder of ``outputs``.

    Every file goes through :meth:`brainshift.io.output_set.OutputSet.write`; nothing reaches ``-o`` before
    :meth:`~brainshift.io.output_set.OutputSet.commit`.
    """
    from brainshift.io.fields import invert_field, warp_image, write_field
    from brainshift.io.images import write_image

    final = result.field
    final_key = "corrected_disp_field" if result.refined_field is not None else "initial_disp_field"
    inverse = warped = None
    if opts.save_inverse or opts.save_warped:
        with steps.step("invert the field"):
            inverse = invert_field(final, image.affine)
    if opts.save_warped:
        with steps.step("warp the preop image into intraop space"):
            warped = warp_image(image, final, image.affine, inverse_field=inverse)
    fields = {"initial_disp_field": result.initial_field}
    if result.refined_field is not None:
        fields["corrected_disp_field"] = result.refined_field
    if inverse is not None and opts.save_inverse:
        fields[f"{final_key.replace('_disp_field', '')}_inverse_disp_field"] = inverse
    with steps.step("write outputs"):
        for name, fld in fields.items():
            outputs.write(f"{name}{_EXT[fmt]}", lambda p, fld=fld: write_field(
                p, fld, image.affine, h5_dtype=opts.h5_dtype, compression=int(opts.h5_compression)))
        if warped is not None:
            outputs.write("preop_warped_to_intraop.nii.gz", lambda p: write_image(warped, p))
        if opts.save_uncertainty and result.uncertainty is not None:
            unc = Volume(result.uncertainty, image.affine, "intensity")
            outputs.write("uncertainty_mm.nii.gz", lambda p: write_image(unc, p))
    if opts.save_uncertainty and result.uncertainty is None:
        warnings.warn("--save-uncertainty: no uncertainty map without keypoints, refinement and safeguards; "
                      "none written", stacklevel=2)


def _summary(opts: InferOptions, image: Volume, result, weights, device: str, written: list[str],
             steps: StepTimer, fmt: str) -> dict:
    """The ``summary.json`` dictionary (without the total time)."""
    names = {"initial": "initial_disp_field", "refined": "corrected_disp_field"}
    summary = {
        "brainshift_version": _version(),
        "inputs": {
            "preop_scan": str(opts.preop_scan),
            "init_disp": str(opts.init_disp) if opts.init_disp else None,
            "kpt_disps": str(opts.kpt_disps) if opts.kpt_disps else None,
            "kpt_intraop": str(opts.kpt_intraop) if opts.kpt_intraop else None,
            "weights": str(weights) if weights is not None else None,
            "atlas": str(opts.atlas) if opts.atlas is not None else None,
        },
        "image": {"shape": list(image.shape), "spacing_mm": [round(float(s), 6) for s in image.spacing],
                  "affine_voxel_to_ras": image.affine.round(6).tolist()},
        "frames": {
            "keypoint_table": opts.coords,
            "fields_in_memory": "forward Lagrangian, voxel units along i, j, k of the preop grid",
            "output_files": _format_note(fmt, opts.h5_dtype),
        },
        "interpolation": result.method,
        "refined": result.refined_field is not None,
        "device": device,
        "keypoint_count": result.n_keypoints,
        "fields": {names[k]: v for k, v in result.statistics.items()},
        "outputs": [*written, "summary.json"],
        "timings_s": {k: round(v, 4) for k, v in steps.timings_s.items()},
    }
    if result.model is not None:
        summary["network"] = {"config": _jsonable(getattr(result.model, "config", None)),
                              "mirror_average": result.mirror_average,
                              "min_field_rms_mm": result.min_field_rms_mm, "field_scale": result.field_scale,
                              "grid": result.network_grid}
        summary["safeguards"] = result.safeguards
    if result.atlas_fit is not None:
        summary["atlas_fit"] = result.atlas_fit
    if result.interpolator_choice is not None:
        summary["interpolator_choice"] = result.interpolator_choice
    return summary


def check_output_dir(out: Path) -> None:
    """Raise :class:`InputFileError` unless ``out`` is, or can be created as, a writable directory.

    Kept here for the commands that import it; see :func:`brainshift.io.output_set.check_output_dir`.
    """
    from brainshift.io.output_set import check_output_dir as check

    check(out)


def _check_keypoint_options(opts: InferOptions) -> None:
    """Options that only make sense together: refuse silent no-ops."""
    if opts.kpt_disps is None:
        if opts.kpt_intraop is not None:  # with -i it would be ignored
            raise BrainshiftError(f"expected --kpt-intraop only with the preop Slicer markups in -k, got "
                                  f"--kpt-intraop {Path(opts.kpt_intraop).name} without -k")
        return
    suffix = "".join(Path(opts.kpt_disps).suffixes[-2:]).lower()
    markups = suffix.endswith(".fcsv") or suffix.endswith(".mrk.json") or suffix.endswith(".json")
    if opts.kpt_intraop is not None and not markups:
        raise BrainshiftError(f"expected --kpt-intraop only with Slicer markups (.fcsv/.mrk.json) in -k, got -k "
                              f"{Path(opts.kpt_disps).name}, a keypoint table that already holds the displacements")
    if markups and opts.coords != "voxel":
        raise BrainshiftError(f"expected no --coords with Slicer markups (their file declares RAS or LPS), got "
                              f"--coords {opts.coords}")


def _format_note(fmt: str, h5_dtype: str = "float32") -> str:
    return {
        "h5": f"ITK DisplacementFieldTransform ({h5_dtype}) on the preop grid, LPS mm; TransformPoint(preop point) "
              "= intraop point",
        "nii": "NIfTI 5-D vector field on the preop grid (see README for intent code and component frame)",
        "npz": "field float32 (3, I, J, K) voxel units along i, j, k, forward Lagrangian, plus affine",
    }[fmt]


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return obj


def _version() -> str:
    from brainshift import __version__

    return __version__
