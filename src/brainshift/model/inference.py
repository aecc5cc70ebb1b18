"""Inference: refine an initial (interpolated) displacement field with the trained network.

``refine_field`` = :func:`~brainshift.model.grid.to_network_grid` (resample to the model's spacing, convert
field units through world mm, z-score, zero the field outside the brain, pad) -> network under
``torch.inference_mode`` -> :func:`~brainshift.model.grid.refined_from_prediction` (crop the pad exactly,
convert units, resample back, add to the initial field). What is mapped back is the network's *residual*
(output minus its input field), added to the full-resolution initial field: with a network working on a
coarser grid, the initial field keeps its own fine detail (e.g. exact interpolation at the keypoints) and only
the learnt correction is interpolated; on the network's own grid this equals the network output inside the
brain. A network that returns its input unchanged therefore gives back the initial field exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from brainshift.device import resolve_device
from brainshift.field import check_field
from brainshift.geometry import voxel_to_ras
from brainshift.model.checkpoint import LoadedModel
from brainshift.model.grid import NetworkInput, mirror_network_tensor, refined_from_prediction, to_network_grid
from brainshift.volume import Volume


def left_right_axis(net_affine: np.ndarray) -> int:
    """The network-grid axis closest to the world left-right (RAS x) direction, as nibabel's ``io_orientation``
    assigns the axes (jointly, so on a very oblique grid it is the axis :func:`brainshift.model.grid.nearest_ras_grid`
    put first: 0 on every network grid)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(net_affine, np.float64))
    return int(np.flatnonzero(ornt[:, 0] == 0)[0])


def predict(model: torch.nn.Module, net_input: NetworkInput, device: str | torch.device = "cpu", *,
            mirror_average: bool = False) -> torch.Tensor:
    """Run ``model`` on a prepared input without gradients (``torch.inference_mode``).

    The model is moved to ``device`` and put in eval mode in place.

    Args:
        model, net_input, device: the network, its input (:func:`to_network_grid`), ``cpu`` / ``cuda[:N]``.
        mirror_average: also run the left-right mirrored problem (the grid axis closest to world x,
            :func:`left_right_axis`; image and field mirrored by
            :func:`~brainshift.model.grid.mirror_network_tensor`, as in training), mirror its prediction
            back and average the two (test-time augmentation). The mirrored problem is an exact solution of the
            same mechanics, so the average is the left-right equivariant part of the network (twice the time).

    Returns:
        ``(1, 3, I', J', K')`` float32 CPU tensor on the padded network grid, ``config.field_units``.

    Convention: forward Lagrangian field on the network grid.
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    with torch.inference_mode():
        x = net_input.tensor.to(dev)
        out = model(x)
        if mirror_average:
            axis = left_right_axis(net_input.net_affine)
            mirrored = model(mirror_network_tensor(x, (axis,), field=True))
            out = 0.5 * (out + mirror_network_tensor(mirrored, (axis,), field=True))
    return out.float().cpu()


def trained_with_mirroring(loaded: LoadedModel) -> bool:
    """Whether ``loaded`` was trained with left-right mirroring (``train_config.flip_axes`` contains axis 0 in
    its metadata), which is when :func:`refine_field` averages with the mirrored problem by default."""
    cfg = loaded.metadata.get("train_config") if isinstance(loaded.metadata, dict) else None
    return isinstance(cfg, dict) and 0 in list(cfg.get("flip_axes") or [])


def use_mirror_average(loaded: LoadedModel, mirror_average: bool | None) -> bool:
    """``mirror_average`` if given, else :func:`trained_with_mirroring` (the default of :func:`refine_field`)."""
    return trained_with_mirroring(loaded) if mirror_average is None else bool(mirror_average)


#: Key of a model's metadata (its safetensors header) holding the inference's scale normalisation floor (mm):
#: :func:`~brainshift.model.grid.to_network_grid`'s ``min_field_rms_mm``, chosen for that model on validation.
MIN_FIELD_RMS_KEY = "min_field_rms_mm"


def model_min_field_rms_mm(loaded: LoadedModel, override: float | None = None) -> float:
    """The scale normalisation floor (mm) to run ``loaded`` with: ``override`` if given (0 turns it off), else
    the model's own value (metadata ``inference.min_field_rms_mm``, recorded with the weights), else 0 (models
    without one, e.g. your own trained ones, run unscaled).

    Raises:
        BrainshiftError: a negative or non-finite value.
    """
    from brainshift.errors import BrainshiftError

    value = override
    if value is None:
        meta = loaded.metadata if isinstance(loaded.metadata, dict) else {}
        inf = meta.get("inference") if isinstance(meta.get("inference"), dict) else {}
        value = inf.get(MIN_FIELD_RMS_KEY, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise BrainshiftError(f"expected a minimum field RMS a finite number >= 0 (mm), got {value!r}")
    return float(value)


def refine_field(image: Volume, init_field_vox, loaded: LoadedModel, *, mask=None, device="cpu",
                 progress: bool = False, mirror_average: bool | None = None,
                 min_field_rms_mm: float | None = None, record: dict | None = None,
                 points_vox=None) -> np.ndarray:
    """Refine an initial displacement field with the network (see the module docstring).

    Args:
        image: preop intensity image; any grid / orientation / spacing.
        init_field_vox: ``(3, I, J, K)`` initial field on ``image``'s grid (voxel units), e.g. the Delaunay-
            linear or thin-plate-spline interpolation of the keypoints.
        loaded: from :func:`brainshift.model.checkpoint.load_weights`; its model is moved to ``device``.
        mask: optional ``(I, J, K)`` brain mask (z-score region and where the initial field is kept for the
            network); default: the foreground ``image > min``.
        device: ``cpu`` or ``cuda[:N]``; CUDA asked for but absent raises.
        progress: show a tqdm bar (only if the run lasts more than a second and stderr is a terminal).
        mirror_average: average with the left-right mirrored problem (:func:`predict`); ``None`` (default):
            when the model was trained with left-right mirroring (:func:`trained_with_mirroring`).
        min_field_rms_mm: scale normalisation floor (mm; :func:`~brainshift.model.grid.to_network_grid`, step
            7): an initial field whose RMS magnitude over the brain is smaller is scaled up to it for the network
            and the correction scaled back down. ``None`` (default): the model's own value
            (:func:`model_min_field_rms_mm`); 0: off.
        record: if given, a dict that receives ``field_scale``, the scale normalisation factor applied (1: none).
        points_vox: ``(N, 3)`` driving keypoints (0-based voxel indices of ``image``'s grid) for a model with a
            keypoint channel (``config.keypoint_channel``; required there, ignored otherwise).

    Returns:
        ``(3, I, J, K)`` float32 refined field on ``image``'s grid.

    Raises:
        BrainshiftError: bad device; a model with a keypoint channel and no ``points_vox``.
        GeometryError: a field or mask not on the image grid.

    Convention: forward Lagrangian (preop voxel ``p`` moves to ``p + u(p)``), voxel units along ``i, j, k``
    of ``image``'s grid, in and out.
    """
    from tqdm.auto import tqdm

    init = check_field(init_field_vox, image.shape)
    dev = resolve_device(device)
    # disable=None: no bar when stderr is not a terminal (a log file would collect its carriage returns)
    with tqdm(total=3, desc="refine", unit="step", delay=1.0, disable=None if progress else True) as bar:
        bar.set_postfix_str("resample")
        net_input = to_network_grid(image, init, mask, loaded.config,
                                    min_field_rms_mm=model_min_field_rms_mm(loaded, min_field_rms_mm),
                                    points_ras=None if points_vox is None else voxel_to_ras(
                                        np.asarray(points_vox, np.float64).reshape(-1, 3), image.affine))
        if record is not None:
            record["field_scale"] = float(net_input.field_scale)
            record["network_grid"] = net_input.grid_record()
        bar.update()
        bar.set_postfix_str(f"network {tuple(net_input.tensor.shape[2:])} on {dev}")
        out = predict(loaded.model, net_input, dev, mirror_average=use_mirror_average(loaded, mirror_average))
        bar.update()
        bar.set_postfix_str("resample back")
        refined = refined_from_prediction(out, net_input, init)
        bar.update()
    return refined
