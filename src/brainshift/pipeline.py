"""The main job as plain functions: keypoints -> initial field -> (refined field) -> outputs.

``run_infer`` is what ``brainshift infer`` calls. Every input is read and validated, and every field
computed, before the first output file is written; each output is written atomically, so bad input never
leaves partial files behind.

Convention: all fields in memory are float32 ``(3, I, J, K)`` on the preop image grid, forward Lagrangian
(the preop point at voxel ``p`` moves to ``p + u(p)`` intraoperatively), components in voxel units along
``i, j, k``. Output files convert at the boundary (see README, "Displacement-field files").
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.progress import StepTimer
from brainshift.volume import Volume

OUTPUT_FORMATS = ("h5", "npz", "nii")
_EXT = {"h5": ".h5", "npz": ".npz", "nii": ".nii.gz"}
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "default.safetensors"


@dataclass
class InferOptions:
    """Options of :func:`run_infer` (the ``brainshift infer`` command); see the README for each."""

    preop_scan: Path
    output: Path = Path(".")
    init_disp: Path | None = None
    kpt_disps: Path | None = None
    kpt_intraop: Path | None = None
    interp_mode: str = "linear"
    coords: str = "voxel"
    device: str = "auto"
    output_fmt: str = "h5"
    weights: Path | None = None
    refine: bool | None = None
    mirror_average: bool | None = None
    save_inverse: bool = False
    save_warped: bool = False
    verbose: bool = True
    interp_options: dict = dc_field(default_factory=dict)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other names are checked by
    :func:`brainshift.model.inference.resolve_device` (``cuda`` without a GPU is an error, never a fallback).

    Raises:
        BrainshiftError: unknown device name, or ``cuda`` requested but torch sees no GPU.
    """
    import torch

    from brainshift.model.inference import resolve_device as _resolve

    d = str(device).lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return str(_resolve(d))


def foreground_mask(image: Volume) -> np.ndarray:
    """Boolean ``(I, J, K)`` mask of voxels above the image minimum (the published method's background rule)."""
    data = image.data
    return data > data.min()


def initial_field_from_keypoints(image: Volume, points_vox: np.ndarray, disps_vox: np.ndarray, method: str,
                                 **options) -> np.ndarray:
    """Validate the keypoints on ``image``'s grid and interpolate them to a dense field.

    Args:
        image: the preop image (defines the grid).
        points_vox, disps_vox: ``(N, 3)`` keypoints and their displacements, voxel units (0-based i, j, k).
        method: interpolator name (``linear``, ``tps``, ``tps3d``; see ``brainshift.interpolate``).

    Returns:
        float32 ``(3, I, J, K)``. Convention: forward Lagrangian, voxel units along i, j, k.

    Raises:
        KeypointError: non-finite, outside the image, conflicting duplicates, fewer than 4, coplanar.
    """
    from brainshift.interpolate import interpolate
    from brainshift.io.keypoints import validate_keypoints

    points_vox, disps_vox = validate_keypoints(points_vox, disps_vox, image.shape)
    return interpolate(method, points_vox, disps_vox, image.shape, image.affine, **options)


def field_summary(field_vox: np.ndarray, image: Volume, mask: np.ndarray | None = None) -> dict:
    """Max / mean displacement (mm) over ``mask`` (default: the image foreground) and % voxels with det J <= 0.

    Convention: ``field_vox`` forward Lagrangian, voxel units on ``image``'s grid.
    """
    from brainshift.field import displacement_magnitude_mm, jacobian_determinant

    m = foreground_mask(image) if mask is None else mask.astype(bool)
    if not m.any():
        m = np.ones(image.shape, dtype=bool)
    # work on the mask's bounding box (+1 voxel so the central differences at its edge see real neighbours)
    idx = np.argwhere(m)
    lo = np.maximum(idx.min(axis=0) - 1, 0)
    hi = np.minimum(idx.max(axis=0) + 2, image.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    sub = field_vox[(slice(None),) + box]
    m = m[box]
    mag = displacement_magnitude_mm(sub, image.affine)[m]
    jac = jacobian_determinant(sub)[m]
    return {
        "max_displacement_mm": float(mag.max()),
        "mean_displacement_mm": float(mag.mean()),
        "pct_jacobian_nonpositive": float(100.0 * np.mean(jac <= 0)),
        "min_jacobian": float(jac.min()),
    }


def run_infer(opts: InferOptions) -> dict:
    """Run ``brainshift infer``: read, interpolate, optionally refine, write fields and ``summary.json``.

    Returns:
        The summary dictionary that is also written to ``output/summary.json``.

    Raises:
        BrainshiftError (and subclasses): any bad input, with a one-line message.
    """
    from brainshift.io.fields import invert_field, read_field, warp_image, write_field
    from brainshift.io.images import read_image

    t_start = time.perf_counter()
    steps = StepTimer(opts.verbose)
    fmt = opts.output_fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise BrainshiftError(f"expected --output_fmt one of {OUTPUT_FORMATS}, got {opts.output_fmt!r}")
    if opts.init_disp is None and opts.kpt_disps is None:
        raise BrainshiftError("expected keypoints (-k/--kpt_disps) or an initial field (-i/--init_disp), got neither")
    refine = opts.refine
    weights = opts.weights
    if refine is None:  # default: refine when weights are given or the default model ships
        refine = weights is not None or DEFAULT_WEIGHTS.exists()
        if not refine:
            warnings.warn(f"no network weights (no -w and no default model at weights/{DEFAULT_WEIGHTS.name}): "
                          "writing the classical interpolation only, without refinement", stacklevel=2)
    if not refine and opts.mirror_average:
        warnings.warn("--mirror-average has no effect without network refinement (--no-refine)", stacklevel=2)
    if refine and weights is None:
        if not DEFAULT_WEIGHTS.exists():
            raise BrainshiftError(
                f"expected network weights for --refine (-w/--weights FILE), got none and no default model at "
                f"weights/{DEFAULT_WEIGHTS.name}; use --no-refine for the classical interpolation only")
        weights = DEFAULT_WEIGHTS
    if weights is not None and not Path(weights).is_file():
        raise InputFileError(f"expected a weights file at {weights}, got no such file")
    _check_keypoint_options(opts)
    # an explicitly named device is checked even without refinement (a bad or absent one is an error);
    # torch is imported only then
    device = resolve_device(opts.device) if (refine or opts.device.lower() not in ("cpu", "auto")) else "cpu"
    out = Path(opts.output)
    check_output_dir(out)

    with steps.step("load preop image"):
        image = read_image(opts.preop_scan)

    n_kpts = None
    if opts.init_disp is not None:
        if opts.kpt_disps is not None:
            warnings.warn("both an initial field and keypoints were given: the initial field is used", stacklevel=2)
        with steps.step("load initial field"):
            init_field, _ = read_field(opts.init_disp, reference=image)
        method = "given"
    else:
        from brainshift.io.keypoints import read_keypoints

        with steps.step("load keypoints"):
            points_vox, disps_vox = read_keypoints(opts.kpt_disps, frame=opts.coords, affine=image.affine,
                                                   intraop_path=opts.kpt_intraop)
        with steps.step(f"interpolate ({opts.interp_mode})"):
            init_field = initial_field_from_keypoints(image, points_vox, disps_vox, opts.interp_mode,
                                                      **opts.interp_options)
        n_kpts = int(len(points_vox))
        method = opts.interp_mode

    fields = {"initial_disp_field": init_field}
    loaded = None
    if refine:
        from brainshift.model.checkpoint import load_weights
        from brainshift.model.inference import refine_field

        with steps.step("load network weights"):
            loaded = load_weights(weights, device=device)
        with steps.step(f"refine with the network ({device})"):
            fields["corrected_disp_field"] = refine_field(image, init_field, loaded, device=device,
                                                          progress=opts.verbose,
                                                          mirror_average=opts.mirror_average)
    final_key = "corrected_disp_field" if refine else "initial_disp_field"
    final = fields[final_key]

    inverse = None
    if opts.save_inverse or opts.save_warped:
        with steps.step("invert the field"):
            inverse = invert_field(final, image.affine)
    warped = None
    if opts.save_warped:
        with steps.step("warp the preop image into intraop space"):
            warped = warp_image(image, final, image.affine, inverse_field=inverse)

    with steps.step("field statistics"):
        stats = {k: field_summary(v, image) for k, v in fields.items()}

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with steps.step("write outputs"):
        for name, fld in fields.items():
            path = out / f"{name}{_EXT[fmt]}"
            write_field(path, fld, image.affine)
            written.append(path.name)
        if inverse is not None and opts.save_inverse:
            path = out / f"{final_key.replace('_disp_field', '')}_inverse_disp_field{_EXT[fmt]}"
            write_field(path, inverse, image.affine)
            written.append(path.name)
        if warped is not None:
            from brainshift.io.images import write_image

            path = out / "preop_warped_to_intraop.nii.gz"
            write_image(warped, path)
            written.append(path.name)

    summary = {
        "brainshift_version": _version(),
        "inputs": {
            "preop_scan": str(opts.preop_scan),
            "init_disp": str(opts.init_disp) if opts.init_disp else None,
            "kpt_disps": str(opts.kpt_disps) if opts.kpt_disps else None,
            "kpt_intraop": str(opts.kpt_intraop) if opts.kpt_intraop else None,
            "weights": str(weights) if refine else None,
        },
        "image": {"shape": list(image.shape), "spacing_mm": [round(float(s), 6) for s in image.spacing],
                  "affine_voxel_to_ras": image.affine.round(6).tolist()},
        "frames": {
            "keypoint_table": opts.coords,
            "fields_in_memory": "forward Lagrangian, voxel units along i, j, k of the preop grid",
            "output_files": _format_note(fmt),
        },
        "interpolation": method,
        "refined": bool(refine),
        "device": device,
        "keypoint_count": n_kpts,
        "fields": stats,
        "outputs": written + ["summary.json"],
        "timings_s": {k: round(v, 4) for k, v in steps.timings_s.items()},
    }
    if loaded is not None:
        from brainshift.model.inference import use_mirror_average

        summary["network"] = {"config": _jsonable(getattr(loaded, "config", None)),
                              "mirror_average": use_mirror_average(loaded, opts.mirror_average)}
    summary["timings_s"]["total"] = round(time.perf_counter() - t_start, 4)
    from brainshift.io.atomic import atomic_output

    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    removed = remove_stale_outputs(out, keep=set(summary["outputs"]))
    if removed:
        warnings.warn(f"removed outputs of an earlier run in {out} that this run did not write: {', '.join(removed)}",
                      stacklevel=2)
    return summary


#: File names ``brainshift infer`` writes (any format); used to clear an earlier run's leftovers.
OUTPUT_PATTERNS = ("initial_disp_field.*", "corrected_disp_field.*", "*_inverse_disp_field.*",
                   "preop_warped_to_intraop.nii.gz", "summary.json")


def remove_stale_outputs(out: Path, keep: set[str]) -> list[str]:
    """Delete files in ``out`` that match :data:`OUTPUT_PATTERNS` but are not in ``keep``; return their names.

    A re-run into the same folder (another interpolator, format or option set) then never leaves an earlier
    run's field beside the new ones. Other files are never touched.
    """
    removed = []
    for pattern in OUTPUT_PATTERNS:
        for p in out.glob(pattern):
            if p.is_file() and p.name not in keep:
                p.unlink()
                removed.append(p.name)
    return sorted(removed)


def check_output_dir(out: Path) -> None:
    """Raise :class:`InputFileError` unless ``out`` is, or can be created as, a directory.

    Checked before any work, so a bad ``-o`` fails at once: an existing file, or a file among its parents.
    """
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputFileError(f"expected -o/--output to be a directory, got {out} "
                                     f"({p} is an existing file)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise InputFileError(f"expected a writable output directory, got {p} (permission denied)")
            return


def _check_keypoint_options(opts: InferOptions) -> None:
    """Options that only make sense together: refuse silent no-ops."""
    if opts.kpt_disps is None:
        return
    suffix = "".join(Path(opts.kpt_disps).suffixes[-2:]).lower()
    markups = suffix.endswith(".fcsv") or suffix.endswith(".mrk.json") or suffix.endswith(".json")
    if opts.kpt_intraop is not None and not markups:
        raise BrainshiftError(f"expected --kpt-intraop only with Slicer markups (.fcsv/.mrk.json) in -k, got -k "
                              f"{Path(opts.kpt_disps).name}, a keypoint table that already holds the displacements")
    if markups and opts.coords != "voxel":
        raise BrainshiftError(f"expected no --coords with Slicer markups (their file declares RAS or LPS), got "
                              f"--coords {opts.coords}")


def _format_note(fmt: str) -> str:
    return {
        "h5": "ITK DisplacementFieldTransform on the preop grid, LPS mm; TransformPoint(preop point) = intraop point",
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
