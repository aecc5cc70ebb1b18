"""The method as one library call: keypoints (or an initial field) -> initial field -> refined field.

:func:`compensate` is what ``brainshift infer`` (:func:`brainshift.pipeline.run_infer`), the demo, evaluation
(:mod:`brainshift.evaluate.run`) and training validation (:func:`brainshift.train.loop.validate`) call. It
reads and writes no file: inputs are in-memory arrays, the result is a :class:`Result`.

Steps (each timed in ``Result.timings_s``):

1. ``interpolate (<method>)``: the keypoints are validated on the image grid
   (:func:`brainshift.keypoints.validate.validate_keypoints`) and interpolated to a dense initial field
   (:func:`brainshift.interpolate.interpolate`); skipped when ``initial_field`` is given.
2. ``refine with the network``: with a ``model``, the network's residual is added to the initial field
   (Assis et al. 2025, arXiv:2508.13762). With keypoints and ``safeguards=True`` (the default) this is
   :func:`brainshift.model.safeguards.safe_refine`: the learnt correction is kept only as far as it predicts
   held-out keypoints better than the classical field (cross-validated fallback), the result honours the
   keypoints (a local correction of the residuals) and a per-voxel uncertainty map comes with it; otherwise
   :func:`brainshift.model.inference.refine_field` (the network alone). The step keeps its name when the
   safeguards allow no learnt correction (:func:`learnt_correction_allowed`: the network does not run, the time is
   the keypoint-consistency step and the uncertainty map's).
3. ``field statistics``: with ``statistics=True``, :func:`brainshift.field.field_statistics` of every field
   over ``statistics_mask`` (default: the image foreground ``image > min``).

Convention: every field is float32 ``(3, I, J, K)`` on ``image``'s grid, forward Lagrangian (the preop point
at voxel ``p`` moves to ``p + u(p)`` intraoperatively), components in voxel units along ``i, j, k``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import TYPE_CHECKING

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, KeypointError
from brainshift.volume import Volume, mask_inside

if TYPE_CHECKING:
    from brainshift.atlas.basis import DeformationAtlas
    from brainshift.model.checkpoint import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What :func:`compensate` returns.

    Attributes:
        initial_field: ``(3, I, J, K)`` float32 interpolated (or given) field.
        refined_field: ``(3, I, J, K)`` float32 network-refined field, or None without a model.
        method: the interpolator name, or ``"given"`` for an ``initial_field``.
        n_keypoints: number of keypoints interpolated (None for a given field).
        mirror_average: whether the network averaged with its mirrored problem (None without a model).
        model: the network that refined the field (None without one).
        timings_s: seconds per step (step names as in the module docstring).
        statistics: ``{"initial": {...}, "refined": {...}}`` of :func:`brainshift.field.field_statistics`
            (empty without ``statistics=True``).
        uncertainty: ``(I, J, K)`` float32 per-voxel standard deviation (mm) of the refined field, or None
            (only with safeguards).
        safeguards: the safeguards' record (``alpha``: kept fraction of the learnt correction, cross-validation
            errors, keypoint residuals), or None when they did not run.
        atlas_fit: with ``method="atlas"``, the fit's record (:attr:`brainshift.atlas.fit.AtlasFit.info`:
            regularisation chosen by cross-validation, fit residual, closest members); else None.
        interpolator_choice: with ``method="auto"``, what :func:`choose_interpolator` chose and why
            (``{"chosen", "keypoint_hull_fraction", "threshold"}``); else None.
        min_field_rms_mm: the network's scale normalisation floor (mm) as used (0: none), None without a model.
        field_scale: the factor the network's input field was scaled by (1: none), None without a model.
        network_grid: the network grid as used (:meth:`brainshift.model.grid.NetworkInput.grid_record`: shape,
            spacing, axes, whether it was framed on the brain), None without a model.

    Convention: fields forward Lagrangian, voxel units along ``i, j, k`` of the image grid.
    """

    initial_field: np.ndarray
    refined_field: np.ndarray | None = None
    method: str = "given"
    n_keypoints: int | None = None
    mirror_average: bool | None = None
    model: LoadedModel | None = None
    timings_s: dict[str, float] = dc_field(default_factory=dict)
    statistics: dict[str, dict[str, float]] = dc_field(default_factory=dict)
    uncertainty: np.ndarray | None = None
    safeguards: dict | None = None
    atlas_fit: dict | None = None
    interpolator_choice: dict | None = None
    min_field_rms_mm: float | None = None
    field_scale: float | None = None
    network_grid: dict | None = None

    @property
    def field(self) -> np.ndarray:
        """The final field: refined when a model was given, else the initial one."""
        return self.refined_field if self.refined_field is not None else self.initial_field


def foreground_mask(image: Volume) -> np.ndarray:
    """Boolean ``(I, J, K)`` mask of voxels above the image minimum (the published method's background rule);
    all voxels when the image is constant."""
    data = image.data
    m = data > data.min()
    return m if m.any() else np.ones(image.shape, dtype=bool)


def check_model(model, *, resolved: bool = False) -> None:
    """Refuse a ``model`` argument that is neither None, a ``LoadedModel`` nor a ``Future`` (of one).

    A path or a name was an AttributeError deep inside the refinement; :func:`compensate` reads no file, so the
    message says how to load one. Used by :func:`compensate` and :func:`brainshift.register.register`.

    Args:
        model: the argument.
        resolved: ``model`` is a Future's result: only a ``LoadedModel`` will do.

    Raises:
        BrainshiftError: naming the expected type and the type given.
    """
    if not resolved and (model is None or isinstance(model, Future)):
        return
    # a LoadedModel exists only once its module is imported: no torch import just to refuse a str or an int
    checkpoint = sys.modules.get("brainshift.model.checkpoint")
    if checkpoint is not None and isinstance(model, checkpoint.LoadedModel):
        return
    hint = (" (a path: load it first with brainshift.model.checkpoint.load_weights(path))"
            if isinstance(model, (str, bytes, os.PathLike)) else "")
    if resolved:
        raise BrainshiftError(f"expected the model Future to give a LoadedModel "
                              f"(brainshift.model.checkpoint.load_weights), got {type(model).__name__}{hint}")
    raise BrainshiftError(f"expected model as a LoadedModel (brainshift.model.checkpoint.load_weights), a "
                          f"concurrent.futures.Future of one, or None, got {type(model).__name__}{hint}")


def check_model_weights_finite(model) -> None:
    """Refuse a loaded network whose weights hold NaN or inf (a damaged or diverged weights file).

    Such a network turns every field into NaN; the refinement then failed with a message about something else
    (a TPS system that could not be solved, a non-finite field). Checked once the model is resolved, before
    any network pass (about 2 ms for the default model).

    Args:
        model: a ``LoadedModel`` (:func:`brainshift.model.checkpoint.load_weights`).

    Raises:
        BrainshiftError: naming the weights file, the count of tensors with non-finite values and the first one.
    """
    import torch

    bad = [name for name, t in model.model.state_dict().items()
           if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]
    if bad:
        source = model.metadata.get("source_path", "the loaded network") if isinstance(model.metadata, dict) \
            else "the loaded network"
        raise BrainshiftError(f"expected finite network weights in {source}, got NaN or inf values in {len(bad)} "
                              f"tensor(s), the first {bad[0]!r} (a damaged file, or weights saved after training "
                              f"diverged)")


def check_atlas(atlas) -> None:
    """Refuse an ``atlas`` argument that is neither None nor a ``DeformationAtlas``.

    Raises:
        BrainshiftError: naming the expected type and the type given (a folder path: load it with
            :func:`brainshift.atlas.basis.load_atlas`).
    """
    if atlas is None:
        return
    from brainshift.atlas.basis import DeformationAtlas

    if not isinstance(atlas, DeformationAtlas):
        hint = (" (a folder: load it first with brainshift.atlas.basis.load_atlas(folder))"
                if isinstance(atlas, (str, bytes, os.PathLike)) else "")
        raise BrainshiftError(f"expected atlas as a DeformationAtlas (brainshift.atlas.basis.load_atlas) or None, "
                              f"got {type(atlas).__name__}{hint}")


def interpolate_keypoints(image: Volume, points_vox: np.ndarray, disps_vox: np.ndarray, method: str,
                          **options) -> np.ndarray:
    """Validate keypoints on ``image``'s grid and interpolate them to a dense field.

    Args:
        image: the preop image (defines the grid).
        points_vox, disps_vox: ``(N, 3)`` keypoints and their displacements, voxel units (0-based i, j, k).
        method: interpolator name (``linear``, ``tps``, ``tps3d``, ``gp``; see :mod:`brainshift.interpolate`).
        options: interpolator keyword options.

    Returns:
        float32 ``(3, I, J, K)``. Convention: forward Lagrangian, voxel units along i, j, k.

    Raises:
        KeypointError: non-finite, outside the image, conflicting duplicates, fewer than 4, coplanar.
    """
    from brainshift.interpolate import interpolate
    from brainshift.keypoints.validate import validate_keypoints

    points_vox, disps_vox = validate_keypoints(points_vox, disps_vox, image.shape)
    return np.asarray(interpolate(method, points_vox, disps_vox, image.shape, image.affine, **options),
                      dtype=np.float32)


def choose_interpolator(image: Volume, points_vox: np.ndarray) -> tuple[str, float]:
    """The interpolator of ``method="auto"``: ``linear`` for keypoints clustered in one region, else ``tps``.

    Keypoints whose convex hull covers less than
    :data:`~brainshift.keypoints.validate.CLUSTERED_HULL_FRACTION` of the image foreground (:func:`foreground_mask`;
    :func:`brainshift.keypoints.validate.hull_fraction`), e.g. measured on the cortex under the craniotomy, make the
    thin-plate spline extrapolate their (noisy) affine trend across the brain, while Delaunay-linear interpolation
    falls to zero away from them (the published corner anchoring). Evidence (bench/RESULTS.md, "Generalization
    re-measured", session 14, sections 3-4): with 20 keypoints within 40 mm of the craniotomy (0.5 mm noise) linear
    had the lower whole-brain MSE on 9 of 10 validation cases and was 10-17 x better than tps on the held-out
    families; the hull spanned at most 3.3 % of the brain there, and 20 detected keypoints spread over the brain
    21-36 % of the foreground (none below the threshold); with keypoints spread over the brain tps had the lower
    error in every measurement (README, ``-m``). Fewer than 4 keypoints (no hull volume) count as clustered.

    Args:
        image: the preop image (its foreground is the reference volume).
        points_vox: ``(N, 3)`` keypoints, 0-based voxel indices of ``image``'s grid.

    Returns:
        ``(method, hull_fraction)``: ``"linear"`` or ``"tps"``, and the fraction it was chosen by.
    """
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION, hull_fraction

    fraction = hull_fraction(points_vox, image.affine, foreground_mask(image))
    return ("linear" if fraction < CLUSTERED_HULL_FRACTION else "tps"), float(fraction)


#: initial fields that fall back to zero away from their keypoints: for keypoints clustered in one region the
#: safeguards keep the network's correction out of them (:func:`learnt_correction_allowed`)
NO_CORRECTION_WHEN_CLUSTERED = ("linear", "gp")

#: the least keypoint count for which :func:`learnt_correction_allowed` judges clustering: below it a small hull
#: does not mean one region (4-7 points spread over a ball span < 4 % of it in 31-97 % of draws) and the rule's
#: evidence (20 keypoints; the 4 % threshold: 10-40 keypoints, README "Interpolators") does not reach
MIN_KEYPOINTS_CLUSTER_RULE = 10


def learnt_correction_allowed(method: str, hull_fraction: float, n_keypoints: int) -> bool:
    """Whether the safeguards may keep the network's correction of a ``method`` initial field from ``n_keypoints``
    keypoints whose convex hull spans ``hull_fraction`` of the image foreground (:func:`choose_interpolator`).

    False for ``linear`` and ``gp`` fields (:data:`NO_CORRECTION_WHEN_CLUSTERED`) from at least
    :data:`MIN_KEYPOINTS_CLUSTER_RULE` keypoints clustered in one region (hull below
    :data:`~brainshift.keypoints.validate.CLUSTERED_HULL_FRACTION`, e.g. on the cortex under the craniotomy): the
    safeguards' folds hold out keypoints that all lie near the others, so they cannot see a correction that is
    wrong far from them. Chosen on validation (bench/clustered_refinement/PROTOCOL.md; 18 cases, 20 keypoints at
    the craniotomy, shipped model): refined / linear alone, mean per-case MSE ratio 1.43 (0.5 mm noise) and 6.37
    (exact), worst 9.2 x and 57 x; for ``gp`` 3.05 and 1.83. ``tps`` keeps it (refined / tps 0.63 and 0.61
    there); the atlas and given fields too; fewer keypoints are not judged (the safeguards then weigh the
    correction by their folds as before, from 8 keypoints; below that there are no folds and alpha is 1).

    Args:
        method: the interpolator of the initial field (``linear``, ``tps``, ``tps3d``, ``gp``, ``atlas``,
            ``given``; any case).
        hull_fraction: :func:`brainshift.keypoints.validate.hull_fraction` of the keypoints, in ``[0, 1]``.
        n_keypoints: how many keypoints made the field.

    Returns:
        True where the learnt correction may be kept (its weight then chosen by the safeguards' folds).
    """
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION

    return not (str(method).lower() in NO_CORRECTION_WHEN_CLUSTERED and n_keypoints >= MIN_KEYPOINTS_CLUSTER_RULE
                and hull_fraction < CLUSTERED_HULL_FRACTION)


def compensate(image: Volume, *, keypoints: tuple[np.ndarray, np.ndarray] | None = None,
               initial_field: np.ndarray | None = None, method: str = "linear",
               model: LoadedModel | Future | None = None, mask: np.ndarray | None = None, device: str = "cpu",
               mirror_average: bool | None = None, interp_options: dict | None = None,
               statistics: bool = False, statistics_mask: np.ndarray | None = None,
               progress: bool = False, safeguards: bool = True, safeguard_seed: int = 0,
               atlas: DeformationAtlas | None = None, atlas_prior: str | None = None,
               min_field_rms_mm: float | None = None) -> Result:
    """Brain-shift compensation of one image: the initial field from keypoints, refined by the network.

    Args:
        image: preop intensity :class:`~brainshift.volume.Volume` (any grid / orientation / spacing).
        keypoints: ``(points_vox, disps_vox)``, each ``(N, 3)`` in the voxel frame (0-based ``i, j, k``,
            voxel units): the point ``p`` moves to ``p + d``.
        initial_field: a ready ``(3, I, J, K)`` initial field instead of interpolating ``keypoints`` (voxel
            units). Given together with ``keypoints``, the field is used as it is and the keypoints only serve
            the safeguards, whose folds then use the given field without each fold's keypoints' thin-plate
            spline contribution (:func:`brainshift.model.safeguards.given_field_folds`).
        method: interpolator of the keypoints (``linear``, ``tps``, ``tps3d``, ``gp``), ``auto`` (``linear`` for
            keypoints clustered in one region, else ``tps``: :func:`choose_interpolator`; recorded in
            :attr:`Result.interpolator_choice`, ``interp_options`` then apply only to ``tps``), or ``atlas``: the
            patient's deformation atlas fitted to the keypoints plus a thin-plate spline of the remaining residuals
            (:func:`brainshift.atlas.fit.fit_atlas`; needs ``atlas``).
        atlas_prior: the atlas fit's prior (``scaled-atlas+matern+contact``, ``scaled-atlas+matern``,
            ``atlas+matern`` or ``atlas``;
            :data:`brainshift.atlas.fit.PRIORS`);
            None: :data:`brainshift.atlas.fit.DEFAULT_PRIOR`. Also used by the safeguards' folds.
        model: the network (:func:`brainshift.model.checkpoint.load_weights`), or a ``concurrent.futures.Future``
            of one (waited for after the interpolation, so that loading can overlap it); None: no refinement.
        mask: brain mask for the network (z-score region, where the initial field is kept; nonzero = inside,
            :func:`brainshift.volume.mask_inside`); default: the foreground ``image > min``.
        device: torch device of the network (``cpu``, ``cuda[:N]``; see :func:`brainshift.device.resolve_device`).
        mirror_average: average the network with its left-right mirrored problem; None: the model's default
            (:func:`brainshift.model.inference.use_mirror_average`).
        interp_options: keyword options of the interpolator.
        statistics: also compute :func:`brainshift.field.field_statistics` of each field.
        statistics_mask: region of the statistics (nonzero = inside; default: :func:`foreground_mask`).
        progress: let the network step show a tqdm bar.
        safeguards: with keypoints and a model, refine through :func:`brainshift.model.safeguards.safe_refine`
            (cross-validated fallback, keypoint consistency, uncertainty; always both mirrored passes; no learnt
            correction of a ``linear`` or ``gp`` field from 10 or more keypoints clustered in one region:
            :func:`learnt_correction_allowed`, recorded as ``safeguards["learnt_correction"]``);
            False: the network alone, as published.
        safeguard_seed: seed of the safeguards' keypoint folds (and of the atlas fit's folds).
        atlas: the :class:`~brainshift.atlas.basis.DeformationAtlas` of ``image`` (``brainshift atlas``), for
            ``method="atlas"``. With a model too (``net-atlas``), the network refines the atlas field; the
            safeguards' cross-validation then re-fits the atlas without each fold's keypoints.
        min_field_rms_mm: scale normalisation floor (mm) of the network's input: an initial field whose RMS
            magnitude over the brain is smaller is scaled up to it for the network, and the correction scaled back
            (:func:`brainshift.model.grid.to_network_grid`, step 7). ``None``: for the network alone (no
            safeguards, or no keypoints) the model's own value
            (:func:`brainshift.model.inference.model_min_field_rms_mm`; the default model: 2.5 mm), under the
            safeguards 0 (off: on validation it did not change their output beyond noise, bench/RESULTS.md,
            "Scale-normalised network input"); 0: off.

    Returns:
        :class:`Result`.

    Raises:
        BrainshiftError: neither ``keypoints`` nor ``initial_field``; bad device; ``model`` or ``atlas`` of
            another type (a path included: this function reads no file; :func:`check_model`,
            :func:`check_atlas`); ``method="atlas"`` without an atlas or without keypoints; ``interp_options``
            not a dict.
        KeypointError: invalid keypoints (not a pair of ``(N, 3)`` real arrays, non-finite, outside the image;
            for the atlas: outside its brain). GeometryError: ``image`` not a Volume; a field or mask not on the
            image grid, a mask with negative or non-finite values, or a field that is not finite real numbers;
            an atlas built for another image.

    Convention: every field forward Lagrangian, voxel units along ``i, j, k`` of ``image``'s grid.
    """
    from brainshift.field import check_field, field_statistics

    if not isinstance(image, Volume):
        raise GeometryError(f"expected the image as a brainshift Volume (array + affine: Volume(data, affine)), "
                            f"got {type(image).__name__}")
    check_model(model)
    check_atlas(atlas)
    if keypoints is None and initial_field is None:
        raise BrainshiftError("expected keypoints or an initial_field, got neither")
    if keypoints is not None and (isinstance(keypoints, (str, bytes)) or not hasattr(keypoints, "__len__")
                                  or len(keypoints) != 2):
        got = f"{type(keypoints).__name__} of length {len(keypoints)}" if hasattr(keypoints, "__len__") else \
            type(keypoints).__name__
        raise KeypointError(f"expected keypoints as a pair (points_vox, disps_vox) of (N, 3) arrays, got {got}")
    for name, m in (("mask", mask), ("statistics_mask", statistics_mask)):  # before any work, not after it
        if m is not None and np.shape(m) != image.shape:
            raise GeometryError(f"expected the {name} on the image grid {image.shape}, got shape {np.shape(m)}")
    if statistics_mask is not None:
        statistics_mask = mask_inside(statistics_mask, "statistics_mask")
    if mask is not None:
        mask = mask_inside(mask, "mask")
    if interp_options is not None and not isinstance(interp_options, Mapping):
        raise BrainshiftError(f"expected interp_options as a dict of the interpolator's options, got "
                              f"{type(interp_options).__name__}")
    timings: dict[str, float] = {}
    choice = None  # what method="auto" chose
    kp_hull = None  # the keypoints' hull fraction, where already computed
    if keypoints is not None:
        from brainshift.keypoints.validate import validate_keypoints

        points_vox, disps_vox = validate_keypoints(keypoints[0], keypoints[1], image.shape)
    if initial_field is not None:
        init = check_field(initial_field, image.shape)
        method, n_kpts = "given", None if keypoints is None else int(len(points_vox))
    elif str(method).lower() == "atlas":
        if atlas is None:
            raise BrainshiftError("expected an atlas (brainshift atlas; infer --atlas FOLDER) for the method "
                                  "'atlas', got none")
        from brainshift.atlas.fit import fit_atlas

        t0 = time.perf_counter()
        atlas.check_image(image.shape, image.affine, image.data, "the preop image")
        fit = fit_atlas(atlas, points_vox, disps_vox, seed=safeguard_seed, residual_options=interp_options,
                        prior=atlas_prior)
        init, method, n_kpts = fit.field_vox, "atlas", int(len(points_vox))
        timings["interpolate (atlas)"] = time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        from brainshift.interpolate import interpolate  # the keypoints were validated above

        if str(method).lower() == "auto":
            method, fraction = choose_interpolator(image, points_vox)
            kp_hull = fraction
            from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION

            choice = {"chosen": method, "keypoint_hull_fraction": round(fraction, 6),
                      "threshold": CLUSTERED_HULL_FRACTION}
            if method != "tps":
                interp_options = None
        init = np.asarray(interpolate(method, points_vox, disps_vox, image.shape, image.affine,
                                      **(interp_options or {})), dtype=np.float32)
        timings[f"interpolate ({method})"] = time.perf_counter() - t0
        n_kpts = int(len(points_vox))
    result = Result(initial_field=init, method=method, n_keypoints=n_kpts, timings_s=timings,
                    interpolator_choice=choice)
    if method == "atlas":
        result.atlas_fit = fit.info
    if model is not None:
        if isinstance(model, Future):  # resolved before importing brainshift.model: its loader imports it too
            t0 = time.perf_counter()
            model = model.result()
            timings["load network weights"] = time.perf_counter() - t0
            check_model(model, resolved=True)
        check_model_weights_finite(model)
        from brainshift.model.inference import model_min_field_rms_mm, refine_field, use_mirror_average

        result.model = model
        t0 = time.perf_counter()
        if safeguards and keypoints is not None:
            from brainshift.keypoints.validate import hull_fraction
            from brainshift.model.safeguards import safe_refine

            fold_field = None
            if method == "given":  # the given field without each fold's keypoints' tps contribution
                from brainshift.model.safeguards import given_field_folds

                fold_field = given_field_folds(image, init, points_vox, disps_vox, "tps")
            if method == "atlas":
                from brainshift.atlas.fit import fold_field_on_grid

                def fold_field(keep, grid_shape, grid_affine):
                    return fold_field_on_grid(atlas, points_vox[keep], disps_vox[keep], grid_shape, grid_affine,
                                              seed=safeguard_seed, prior=atlas_prior)
            floor = 0.0 if min_field_rms_mm is None else min_field_rms_mm  # off under the safeguards by default
            learnt = True
            if str(method).lower() in NO_CORRECTION_WHEN_CLUSTERED and len(points_vox) >= MIN_KEYPOINTS_CLUSTER_RULE:
                if kp_hull is None:
                    kp_hull = hull_fraction(points_vox, image.affine, foreground_mask(image))
                learnt = learnt_correction_allowed(method, kp_hull, len(points_vox))
            safe = safe_refine(image, points_vox, disps_vox, init, model,
                               method=method if method not in ("given", "atlas") else "tps", mask=mask,
                               device=device, seed=safeguard_seed,
                               interpolate_options=(interp_options or {}) if method not in ("given", "atlas")
                               else {}, fold_field=fold_field, min_field_rms_mm=floor,
                               learnt_correction=learnt)
            result.min_field_rms_mm = model_min_field_rms_mm(model, floor)
            result.refined_field, result.uncertainty = safe.field_vox, safe.uncertainty_mm
            result.safeguards = safe.info
            if not learnt:
                from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION

                result.safeguards["learnt_correction_reason"] = (
                    f"{len(points_vox)} keypoints clustered in one region (convex hull {100 * kp_hull:.2g} % of the "
                    f"image foreground, below {100 * CLUSTERED_HULL_FRACTION:g} %): the folds cannot check the "
                    f"network's correction far from them, so a {method} field keeps none of it")
            result.field_scale = float(safe.info.get("field_scale", 1.0))
            result.network_grid = result.safeguards.pop("network_grid", None)  # summary.json: network.grid
            result.mirror_average = True
        else:
            result.mirror_average = use_mirror_average(model, mirror_average)
            result.min_field_rms_mm = model_min_field_rms_mm(model, min_field_rms_mm)
            record: dict = {}
            result.refined_field = refine_field(image, init, model, mask=mask, device=device, progress=progress,
                                                mirror_average=result.mirror_average,
                                                min_field_rms_mm=min_field_rms_mm, record=record,
                                                points_vox=None if keypoints is None else points_vox)
            result.field_scale = record["field_scale"]
            result.network_grid = record.get("network_grid")
        timings["refine with the network"] = time.perf_counter() - t0
    if statistics:
        t0 = time.perf_counter()
        region = foreground_mask(image) if statistics_mask is None else statistics_mask
        result.statistics["initial"] = field_statistics(init, image.affine, region)
        if result.refined_field is not None:
            result.statistics["refined"] = field_statistics(result.refined_field, image.affine, region)
        timings["field statistics"] = time.perf_counter() - t0
    log.debug("compensate: %s", {k: round(v, 3) for k, v in timings.items()})
    return result
