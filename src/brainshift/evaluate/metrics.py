"""Accuracy and plausibility metrics of a predicted displacement field against the ground truth.

Plain functions with exact, documented definitions (the evaluation of Assis et al. 2025,
arXiv:2508.13762: MSE in the brain, TRE at held-out keypoints, Jacobian-determinant statistics, Dice and
HD95 of warped masks). Every error is measured in world millimetres: a voxel-unit displacement ``u`` is
``A @ u`` in RAS mm, ``A`` the affine's 3x3 part, so anisotropic or oblique grids are handled physically.
:func:`score_field` is the one scoring function that evaluation, the demo and training validation call, over
the one region :func:`evaluation_region` (brain minus cavity; keypoints lie in :func:`keypoint_region`).

Convention (every field argument): float32 ``(3, I, J, K)``, forward Lagrangian (the preop point at voxel
``p`` moves to ``p + u(p)`` intraop), components in voxel units along ``i, j, k`` of the grid whose
voxel-to-RAS affine is given (or carried by the masks).
"""

from __future__ import annotations

import warnings

import numpy as np

from brainshift.errors import GeometryError, KeypointError
from brainshift.field import check_field, jacobian_stats
from brainshift.geometry import check_affine, spacing_from_affine
from brainshift.volume import Volume


def _as_mask(mask: np.ndarray | Volume | None, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean ``(I, J, K)`` mask on ``shape`` (all True when ``mask`` is None)."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask.data if isinstance(mask, Volume) else mask)
    if m.shape != tuple(shape):
        raise GeometryError(f"expected a mask on the field's grid {tuple(shape)}, got shape {m.shape}")
    return m > 0


def _same_grid_fields(pred_vox: np.ndarray, gt_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = check_field(gt_vox)
    pred = check_field(pred_vox, gt.shape[1:])
    return pred, gt


def field_errors_mm(pred_vox: np.ndarray, gt_vox: np.ndarray, affine: np.ndarray,
                    mask: np.ndarray | Volume | None) -> dict[str, float]:
    """Dense displacement errors in world mm over a mask.

    The per-voxel error is the Euclidean norm of the world-frame difference ``e(p) = |A (u_pred(p) -
    u_gt(p))|`` (mm). Over the voxels of ``mask`` (in the evaluation: the brain without the resection
    cavity):

    - ``mse_mm2``: mean of ``e^2`` (mm^2), the squared Euclidean error; this is 3x the per-component mean
      that ``torch.nn.MSELoss`` would give on world-mm components;
    - ``mae_mm``: mean of ``e`` (mm), the mean Euclidean error;
    - ``p95_mm``: 95th percentile of ``e`` (mm), ``numpy.percentile`` with linear interpolation.

    Convention: both fields forward Lagrangian, voxel units, ``(3, I, J, K)`` on the grid of ``affine``.

    Args:
        pred_vox: predicted field ``(3, I, J, K)``.
        gt_vox: ground-truth field ``(3, I, J, K)``.
        affine: 4x4 voxel-to-RAS mm affine of the grid.
        mask: ``(I, J, K)`` bool/0-1 array or label :class:`Volume`; None means the whole grid.

    Returns:
        ``{"mse_mm2": float, "mae_mm": float, "p95_mm": float}``.

    Raises:
        GeometryError: shapes differ, non-finite values, bad affine, or an empty mask.
    """
    pred, gt = _same_grid_fields(pred_vox, gt_vox)
    a = check_affine(affine)[:3, :3]
    m = _as_mask(mask, gt.shape[1:])
    if not m.any():
        raise GeometryError("expected a non-empty evaluation mask, got one with no voxel set")
    diff_vox = pred[:, m].astype(np.float64) - gt[:, m].astype(np.float64)  # (3, M)
    err = np.sqrt(((a @ diff_vox) ** 2).sum(axis=0))  # (M,) mm
    return {
        "mse_mm2": float(np.mean(err**2)),
        "mae_mm": float(np.mean(err)),
        "p95_mm": float(np.percentile(err, 95)),
    }


def tre_mm(pred_vox: np.ndarray, gt_points_vox: np.ndarray, gt_disps_vox: np.ndarray,
           affine: np.ndarray) -> np.ndarray:
    """Target registration error (mm) at held-out keypoints.

    The predicted field is sampled trilinearly at each point
    (:func:`brainshift.keypoints.sampling.trilinear_sample`) and compared with the point's ground-truth
    displacement: ``TRE_n = |A (u_pred(x_n) - d_n)|``.

    Convention: ``pred_vox`` forward Lagrangian, voxel units ``(3, I, J, K)``; points are 0-based voxel
    indices ``(N, 3)`` on the same grid and ``gt_disps_vox`` their true displacements in voxel units.

    Args:
        pred_vox: predicted field ``(3, I, J, K)``.
        gt_points_vox: ``(N, 3)`` held-out keypoints (voxel frame).
        gt_disps_vox: ``(N, 3)`` their ground-truth displacements (voxel units).
        affine: 4x4 voxel-to-RAS mm affine.

    Returns:
        ``(N,)`` float64 errors in mm (empty when ``N == 0``).

    Raises:
        KeypointError: points/displacements of the wrong shape, non-finite, or outside the grid.
    """
    from brainshift.keypoints.sampling import trilinear_sample

    pred = check_field(pred_vox)
    a = check_affine(affine)[:3, :3]
    pts = np.asarray(gt_points_vox, dtype=np.float64)
    disps = np.asarray(gt_disps_vox, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape != disps.shape:
        raise KeypointError(f"expected points and displacements of one shape (N, 3), got {pts.shape} and "
                            f"{disps.shape}")
    if len(pts) == 0:
        return np.zeros(0, dtype=np.float64)
    if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(disps))):
        raise KeypointError("expected finite held-out keypoints and displacements, found NaN or inf")
    upper = np.asarray(pred.shape[1:], dtype=np.float64) - 1
    if np.any(pts < 0) or np.any(pts > upper):
        bad = pts[np.any((pts < 0) | (pts > upper), axis=1)][0]
        raise KeypointError(f"expected held-out keypoints inside the grid [0, {upper.tolist()}], got {bad.tolist()}")
    sampled = np.asarray(trilinear_sample(pred, pts), dtype=np.float64)  # (N, 3) voxel units
    return np.sqrt((((sampled - disps) @ a.T) ** 2).sum(axis=1))


def warp_masks(field_vox: np.ndarray, masks: dict[str, Volume], *,
               inverse_field: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Preop label masks carried into intraop space by a field.

    Method: pull with the inverse. The inverse (backward) field ``v`` on the same grid, ``y + v(y)`` the
    preop point of intraop voxel ``y``, comes from :func:`brainshift.io.fields.invert_field` (SimpleITK),
    and each mask is resampled by nearest neighbour at ``y + v(y)``
    (:func:`brainshift.io.fields.warp_image`; the masks travel together as the bits of one label image, one
    resampling: nearest neighbour takes each mask from the same voxel as alone). Unlike a nearest-voxel
    push-forward this leaves no holes where tissue stretches. Use the same function for prediction and ground
    truth. SimpleITK's warning about a large inversion residual (where the field folds) is silenced here:
    :func:`jacobian_stats` reports folding.

    Convention: ``field_vox`` forward Lagrangian, voxel units, ``(3, I, J, K)`` on the masks' grid.

    Args:
        field_vox: forward field ``(3, I, J, K)``.
        masks: name -> label :class:`Volume`, all on one grid (the field's).
        inverse_field: the backward field if already computed (skips the inversion).

    Returns:
        name -> bool ``(I, J, K)`` mask in intraop space.

    Raises:
        GeometryError: masks on different grids or not on the field's grid.
    """
    from brainshift.io.fields import invert_field, warp_image

    f = check_field(field_vox)
    if not masks:
        return {}
    ref = next(iter(masks.values()))
    for name, vol in masks.items():
        if not vol.same_grid(ref) or vol.shape != tuple(f.shape[1:]):
            raise GeometryError(f"expected mask {name!r} on the field's grid {tuple(f.shape[1:])} and affine, "
                                f"got shape {vol.shape}")
    if inverse_field is None:
        with warnings.catch_warnings():  # folding is reported by jacobian_stats; one warning per call is noise
            warnings.filterwarnings("ignore", message="the inverse field's worst residual", category=UserWarning)
            inverse_field = invert_field(f, ref.affine)
    # up to 8 masks in the bits of one uint8 label image, resampled once: nearest neighbour picks the same source
    # voxel for every bit, so each mask comes out exactly as alone (half the resampling time for brain + tumour)
    out = {}
    names = list(masks)
    for start in range(0, len(names), 8):
        group = names[start:start + 8]
        bits = np.zeros(ref.shape, dtype=np.uint8)
        for b, name in enumerate(group):
            bits |= (np.asarray(masks[name].data) > 0).astype(np.uint8) << np.uint8(b)
        warped = np.asarray(warp_image(Volume(bits, ref.affine, "label"), f, ref.affine,
                                       inverse_field=inverse_field).data)
        for b, name in enumerate(group):
            out[name] = (warped & np.uint8(1 << b)) > 0
    return out


def mask_overlap(pred_masks: dict[str, np.ndarray], gt_masks: dict[str, np.ndarray],
                 spacing_mm) -> dict[str, float]:
    """Dice and 95th-percentile Hausdorff distance (mm) of each pair of masks (MONAI metrics).

    ``DiceMetric(include_background=True)`` and ``HausdorffDistanceMetric(include_background=True,
    percentile=95)`` on one-channel binary masks, the distance computed with the voxel ``spacing_mm`` (so in
    mm on anisotropic grids; symmetric HD95, MONAI's definition). Both masks are first cropped to the
    bounding box of their union plus a one-voxel margin, which changes neither metric. When the ground-truth
    or predicted mask is empty the pair is not comparable: both empty gives ``nan`` for both metrics, one
    empty gives Dice 0 and HD95 ``nan``.

    Args:
        pred_masks: name -> bool ``(I, J, K)`` (e.g. warped with the predicted field).
        gt_masks: name -> bool ``(I, J, K)`` with the same names.
        spacing_mm: voxel size along ``i, j, k`` (mm).

    Returns:
        ``{"dice_<name>": float, "hd95_<name>_mm": float}`` for each name, in ``gt_masks`` order.

    Raises:
        GeometryError: names or shapes differ.
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    if set(pred_masks) != set(gt_masks):
        raise GeometryError(f"expected the same mask names, got {sorted(pred_masks)} and {sorted(gt_masks)}")
    spacing = [float(s) for s in np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))]
    out: dict[str, float] = {}
    for name, gt in gt_masks.items():
        pred = np.asarray(pred_masks[name]) > 0
        gt = np.asarray(gt) > 0
        if pred.shape != gt.shape:
            raise GeometryError(f"expected mask {name!r} on one grid, got shapes {pred.shape} and {gt.shape}")
        if not gt.any() or not pred.any():
            out[f"dice_{name}"] = float("nan") if not (gt.any() or pred.any()) else 0.0
            out[f"hd95_{name}_mm"] = float("nan")
            continue
        # crop to the masks' bounding box plus one empty voxel (or the grid edge): same surfaces, less work
        nz = np.argwhere(pred | gt)
        lo = np.maximum(nz.min(axis=0) - 1, 0)
        hi = np.minimum(nz.max(axis=0) + 2, gt.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        yp = torch.from_numpy(pred[box][None, None].astype(np.float32))
        yt = torch.from_numpy(gt[box][None, None].astype(np.float32))
        dice = DiceMetric(include_background=True, reduction="mean")
        dice(y_pred=yp, y=yt)
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean")
        with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument its own code passes internally
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*always_return_as_numpy")
            hd(y_pred=yp, y=yt, spacing=spacing)
        out[f"dice_{name}"] = float(dice.aggregate().item())
        out[f"hd95_{name}_mm"] = float(hd.aggregate().item())
    return out


def dice_hd95(pred_field: np.ndarray, gt_field: np.ndarray, masks: dict[str, Volume]) -> dict[str, float]:
    """Dice and HD95 (mm) between the masks warped into intraop space by the predicted and the true field.

    Both fields warp the preop masks with :func:`warp_masks` (pull with the SimpleITK inverse, nearest
    neighbour), then :func:`mask_overlap` compares them with MONAI's metrics, spacing-aware in mm.

    Convention: both fields forward Lagrangian, voxel units, ``(3, I, J, K)`` on the masks' grid.

    Args:
        pred_field: predicted field ``(3, I, J, K)``.
        gt_field: ground-truth field ``(3, I, J, K)``.
        masks: name -> preop label :class:`Volume` (e.g. ``{"brain": ..., "tumour": ...}``), one grid.

    Returns:
        ``{"dice_<name>": float, "hd95_<name>_mm": float}`` per mask.

    Raises:
        GeometryError: fields or masks on different grids.
    """
    pred, gt = _same_grid_fields(pred_field, gt_field)
    if not masks:
        return {}
    spacing = spacing_from_affine(next(iter(masks.values())).affine)
    return mask_overlap(warp_masks(pred, masks), warp_masks(gt, masks), spacing)


# ------------------------------------------------------------------------------- regions and the one score

#: Keys of :func:`score_field` (without ``masks``), in table order.
SCORE_KEYS = ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "tre_median_mm", "tre_max_mm", "pct_jacobian_nonpositive",
              "std_log_jac")
#: Keys :func:`score_field` adds with ``masks={"brain": ..., "tumour": ...}``.
OVERLAP_KEYS = ("dice_brain", "hd95_brain_mm", "dice_tumour", "hd95_tumour_mm")


def evaluation_region(brain_mask: np.ndarray, cavity_mask: np.ndarray) -> np.ndarray:
    """Boolean ``(I, J, K)``: brain minus the resection cavity, where dense errors and det J are measured.

    The one definition used by evaluation, the demo and training validation.
    """
    return (np.asarray(brain_mask) > 0) & ~(np.asarray(cavity_mask) > 0)


def keypoint_region(brain_mask: np.ndarray, tumour_mask: np.ndarray, cavity_mask: np.ndarray) -> np.ndarray:
    """Boolean ``(I, J, K)``: brain minus tumour minus cavity, where keypoints (driving and held out) may lie."""
    return evaluation_region(brain_mask, cavity_mask) & ~(np.asarray(tumour_mask) > 0)


def score_field(pred_vox: np.ndarray, gt_vox: np.ndarray, affine: np.ndarray, region: np.ndarray,
                heldout_points_vox: np.ndarray, heldout_disps_vox: np.ndarray, *,
                masks: dict[str, Volume] | None = None,
                gt_warped_masks: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Score a predicted field against the ground truth: the one scoring function of evaluation, the demo and
    training validation.

    - :func:`field_errors_mm` over ``region``: ``mse_mm2``, ``mae_mm``, ``p95_mm``;
    - :func:`tre_mm` at the held-out keypoints: ``tre_mm`` (mean), ``tre_median_mm``, ``tre_max_mm`` (``nan``
      without held-out keypoints);
    - :func:`~brainshift.field.jacobian_stats` over ``region``: ``pct_jacobian_nonpositive``, ``std_log_jac``;
    - with ``masks``: :func:`mask_overlap` of the masks warped by the prediction and by the ground truth
      (``dice_<name>``, ``hd95_<name>_mm``); ``gt_warped_masks`` reuses the ground truth's warped masks.

    Convention: both fields forward Lagrangian, voxel units ``(3, I, J, K)`` on the grid of ``affine``;
    held-out points 0-based voxel indices ``(N, 3)``, their displacements voxel units.

    Args:
        pred_vox, gt_vox: predicted and true fields.
        affine: 4x4 voxel-to-RAS affine of the grid.
        region: ``(I, J, K)`` mask of the dense errors (:func:`evaluation_region`).
        heldout_points_vox, heldout_disps_vox: ``(N, 3)`` TRE targets and their true displacements.
        masks: preop label Volumes for Dice/HD95 (None: no overlap keys).
        gt_warped_masks: the masks already warped by ``gt_vox`` (:func:`warp_masks`), to skip one inversion.

    Returns:
        dict with :data:`SCORE_KEYS` (+ overlap keys with ``masks``), float values.

    Raises:
        GeometryError: fields, region or masks on different grids, an empty region.
        KeypointError: malformed held-out keypoints.
    """
    tre = tre_mm(pred_vox, heldout_points_vox, heldout_disps_vox, affine)
    jac = jacobian_stats(pred_vox, region)
    out = {
        **field_errors_mm(pred_vox, gt_vox, affine, region),
        "tre_mm": float(tre.mean()) if len(tre) else float("nan"),
        "tre_median_mm": float(np.median(tre)) if len(tre) else float("nan"),
        "tre_max_mm": float(tre.max()) if len(tre) else float("nan"),
        "pct_jacobian_nonpositive": jac["pct_jacobian_nonpositive"],
        "std_log_jac": jac["std_log_jac"],
    }
    if masks:
        gt_warped = gt_warped_masks if gt_warped_masks is not None else warp_masks(gt_vox, masks)
        spacing = spacing_from_affine(next(iter(masks.values())).affine)
        out.update(mask_overlap(warp_masks(pred_vox, masks), gt_warped, spacing))
    return out
