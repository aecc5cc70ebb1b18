"""Training losses as plain functions (torch), plus :func:`training_loss` combining them from a config.

Convention for every displacement argument ``disp``: a batch of fields ``(B, 3, I, J, K)``, forward
Lagrangian (the preop point at voxel ``p`` moves to ``p + u(p)``), components along the grid axes ``i, j, k``
in the physical unit of ``spacing`` (mm) unless a function says voxel units. Torch spatial dims are our
``(i, j, k)`` array order directly (no transposes).

Sources: masked MSE and the Jacobian-determinant terms follow the published method's loss options (Assis
et al. 2025: ``negative`` penalises folding, ``unit`` penalises ``(det J - 1)^2``); bending energy and local
normalised cross-correlation are MONAI's ``BendingEnergyLoss`` and ``LocalNormalizedCrossCorrelationLoss``;
the fixed-point inverse of a displacement field follows Chen et al. 2008 ("A simple fixed-point approach to
invert a deformation field", Med. Phys. 35:81).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from brainshift.errors import GeometryError


def _check_disp(disp: torch.Tensor, name: str = "disp") -> None:
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise GeometryError(f"expected {name} of shape (B, 3, I, J, K), got {tuple(disp.shape)}")


def _mask_like(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """Mask as float ``(B, 1, I, J, K)`` broadcastable to ``ref``; accepts ``(B, I, J, K)`` too."""
    if mask is None:
        return None
    m = mask
    if m.ndim == ref.ndim - 1:
        m = m.unsqueeze(1)
    if m.ndim != ref.ndim or m.shape[0] != ref.shape[0] or tuple(m.shape[2:]) != tuple(ref.shape[2:]):
        raise GeometryError(f"expected a mask of shape (B, 1, I, J, K) matching {tuple(ref.shape)}, "
                            f"got {tuple(mask.shape)}")
    return m.to(dtype=ref.dtype)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the masked voxels and all components.

    ``sum(mask * (pred - target)^2) / (C * sum(mask))``; without a mask the plain mean. An empty mask gives 0.

    Args:
        pred, target: ``(B, C, I, J, K)`` tensors (displacements: same units, e.g. mm).
        mask: ``(B, 1, I, J, K)`` or ``(B, I, J, K)``, bool or 0/1 (the brain).

    Returns:
        Scalar tensor (units of ``pred`` squared).

    Raises:
        GeometryError: shapes differ.
    """
    if pred.shape != target.shape:
        raise GeometryError(f"expected pred and target of the same shape, got {tuple(pred.shape)} and "
                            f"{tuple(target.shape)}")
    sq = (pred - target) ** 2
    m = _mask_like(mask, pred)
    if m is None:
        return sq.mean()
    return (sq * m).sum() / (m.sum() * pred.shape[1]).clamp_min(1.0)


def relative_masked_mse(pred: torch.Tensor, target: torch.Tensor, initial: torch.Tensor,
                        mask: torch.Tensor | None = None, floor: float = 0.05) -> torch.Tensor:
    """Mean over the batch of each sample's masked MSE divided by its initial field's (at least ``floor``).

    ``mean_b [ MSE_b(pred, target) / max(MSE_b(initial, target), floor) ]`` with :func:`masked_mse`'s
    per-sample definition. It is the per-case ratio of the refined to the initial field's error that our
    benchmarks report, so a nearly right initial field weighs as much as a badly wrong one: the network learns
    to leave good fields alone as well as to repair bad ones. The denominator carries no gradient.

    Args:
        pred, target, initial: ``(B, C, I, J, K)`` fields in the same units (e.g. mm).
        mask: ``(B, 1, I, J, K)`` or ``(B, I, J, K)``, bool or 0/1 (the brain); None: every voxel.
        floor: the smallest denominator (units squared, > 0).

    Returns:
        Scalar tensor (dimensionless): 1 for ``pred == initial`` where the initial error exceeds ``floor``,
        0 for ``pred == target``.

    Raises:
        GeometryError: shapes differ.
    """
    if not pred.shape == target.shape == initial.shape:
        raise GeometryError(f"expected pred, target and initial of the same shape, got {tuple(pred.shape)}, "
                            f"{tuple(target.shape)} and {tuple(initial.shape)}")
    per = [masked_mse(pred[b:b + 1], target[b:b + 1], None if mask is None else mask[b:b + 1])
           for b in range(pred.shape[0])]
    with torch.no_grad():
        den = [masked_mse(initial[b:b + 1], target[b:b + 1], None if mask is None else mask[b:b + 1])
               for b in range(pred.shape[0])]
    return torch.stack([p / d.clamp_min(floor) for p, d in zip(per, den, strict=True)]).mean()


def jacobian_determinant(disp: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """``det(I + grad u)`` of a batch of fields, shape ``(B, I, J, K)`` (H6's ``jacobian_determinant_torch``).

    Convention: forward Lagrangian, components in the unit of ``spacing`` (derivatives are taken in that
    physical unit, so anisotropic grids are handled).
    """
    from brainshift.model.warp import jacobian_determinant_torch

    _check_disp(disp)
    return jacobian_determinant_torch(disp, spacing)


def jacobian_loss(disp: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0), mode: str = "negative",
                  mask: torch.Tensor | None = None, margin: float = 0.01) -> torch.Tensor:
    """Jacobian-determinant regularisation, averaged over the (masked) voxels.

    - ``negative``: ``relu(margin - det J)``: zero for a well-behaved map (det J >= margin), positive and with a
      gradient for folding (det J <= 0). ``margin=0`` gives the published ``relu(-det J)``.
    - ``unit``: ``(det J - 1)^2``, zero for volume-preserving maps.

    Args:
        disp: ``(B, 3, I, J, K)``; convention in the module docstring.
        spacing: voxel size along ``i, j, k`` in the unit of ``disp`` (mm).
        mode: ``"negative"`` or ``"unit"``.
        mask: optional ``(B, 1, I, J, K)`` region (the brain).
        margin: ``negative`` mode threshold (dimensionless).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: unknown ``mode`` (a :class:`~brainshift.errors.BrainshiftError`).
    """
    from brainshift.errors import BrainshiftError

    det = jacobian_determinant(disp, spacing).unsqueeze(1)
    if mode == "negative":
        pen = torch.relu(margin - det)
    elif mode == "unit":
        pen = (det - 1.0) ** 2
    else:
        raise BrainshiftError(f"expected jdet_mode 'negative' or 'unit', got {mode!r}")
    m = _mask_like(mask, det)
    if m is None:
        return pen.mean()
    return (pen * m).sum() / m.sum().clamp_min(1.0)


def bending_energy(disp: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Bending energy (sum of squared second derivatives, voxel units) via MONAI ``BendingEnergyLoss``.

    Zero for any affine field. Every spatial size must be > 4 (MONAI's central differences).

    Convention: as in the module docstring; derivatives per voxel.
    """
    import warnings

    from monai.losses import BendingEnergyLoss

    _check_disp(disp)
    with warnings.catch_warnings():  # MONAI 1.6 indexes with lists, which torch >= 2.9 warns about
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        return BendingEnergyLoss(normalize=normalize)(disp)


def lncc_loss(image_a: torch.Tensor, image_b: torch.Tensor, window: int = 2) -> torch.Tensor:
    """MONAI ``LocalNormalizedCrossCorrelationLoss`` with a cubic window of ``2 * window + 1`` voxels.

    Returns the negative mean local NCC, in ``[-1, 0]`` (``-1`` = identical up to local affine intensity).

    Args:
        image_a, image_b: ``(B, 1, I, J, K)``.
        window: half width in voxels (the published ``lncc_window``).
    """
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=2 * int(window) + 1)
    return loss(image_a, image_b)


def invert_displacement(disp_vox: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Inverse field ``v`` of ``u`` by the fixed-point iteration ``v <- -u(q + v(q))`` (Chen et al. 2008).

    ``q -> q + v(q)`` inverts ``p -> p + u(p)``; converges for maps without folding whose displacement
    gradient has norm < 1. Differentiable (used for the image loss).

    Convention: input and output in VOXEL units, ``(B, 3, I, J, K)``; ``u`` forward Lagrangian, ``v`` its
    inverse (pull-back from the intraop grid to the preop grid).
    """
    from brainshift.model.warp import warp

    _check_disp(disp_vox, "disp_vox")
    v = -disp_vox
    for _ in range(max(0, int(iterations) - 1)):
        v = -warp(disp_vox, v)
    return v


def warp_to_intraop(image: torch.Tensor, disp_vox: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """The preop ``image`` ``(B, C, I, J, K)`` moved by the forward field: ``out(q) = image(q + v(q))``.

    ``v`` is :func:`invert_displacement` of ``disp_vox``; the warp is H6's pull ``warp`` (trilinear). With the
    ground-truth field this simulates the intraop image.

    Convention: ``disp_vox`` forward Lagrangian, voxel units.
    """
    from brainshift.model.warp import warp

    return warp(image, invert_displacement(disp_vox, iterations))


def training_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, spacing: Sequence[float],
                  mse_w: float = 1.0, jdet: bool = False, jdet_mode: str = "negative", hessian: bool = False,
                  reg_w: float = 1.0, lncc: bool = False, lncc_w: float = 1.0, lncc_window: int = 2,
                  image: torch.Tensor | None = None, intraop: torch.Tensor | None = None,
                  invert_iterations: int = 10, initial: torch.Tensor | None = None,
                  mse_floor: float = 0.05) -> tuple[torch.Tensor, dict[str, float]]:
    """The published loss: ``mse_w * MSE + reg_w * (jdet + bending) + lncc_w * LNCC`` (terms as enabled).

    Args:
        pred, target: ``(B, 3, I, J, K)`` predicted and ground-truth fields in mm along ``i, j, k``.
        mask: ``(B, 1, I, J, K)`` brain mask (MSE and Jacobian terms are averaged over it).
        spacing: grid spacing in mm along ``i, j, k``.
        image: preop image ``(B, 1, I, J, K)`` (needed when ``lncc``).
        intraop: simulated intraop image (``warp_to_intraop(image, target)``; needed when ``lncc``). The image
            loss compares it with the preop image moved by the PREDICTED field (same operator), so the two
            coincide when the prediction equals the ground truth.
        initial: the initial fields ``(B, 3, I, J, K)`` (mm); given, the MSE term is
            :func:`relative_masked_mse` with floor ``mse_floor`` (mm²) instead of the masked MSE.

    Returns:
        ``(total, terms)`` with ``terms`` a dict of floats (``mse``, the absolute masked MSE in every case; ``mse_rel``
        with ``initial``; and ``jdet`` / ``bending`` / ``lncc`` when on).

    Convention: fields forward Lagrangian, mm along the grid axes.
    """
    from brainshift.errors import BrainshiftError

    _check_disp(pred, "pred")
    mse = masked_mse(pred, target, mask)
    terms = {"mse": float(mse.detach())}
    if initial is None:
        total = mse_w * mse
    else:
        rel = relative_masked_mse(pred, target, initial, mask, mse_floor)
        total = mse_w * rel
        terms["mse_rel"] = float(rel.detach())
    if jdet:
        j = jacobian_loss(pred, spacing, jdet_mode, mask)
        total = total + reg_w * j
        terms["jdet"] = float(j.detach())
    if hessian:
        b = bending_energy(pred)
        total = total + reg_w * b
        terms["bending"] = float(b.detach())
    if lncc:
        if image is None or intraop is None:
            raise BrainshiftError("expected the preop image and the simulated intraop image for the lncc loss, "
                                  "got None")
        sp = torch.as_tensor(list(spacing), dtype=pred.dtype, device=pred.device).view(1, 3, 1, 1, 1)
        moved = warp_to_intraop(image, pred / sp, invert_iterations)
        c = lncc_loss(moved, intraop, lncc_window)
        total = total + lncc_w * c
        terms["lncc"] = float(c.detach())
    terms["total"] = float(total.detach())
    return total, terms
