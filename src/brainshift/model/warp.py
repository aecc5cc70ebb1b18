"""Differentiable warping, composition and Jacobian determinants of displacement fields in torch.

Pull semantics (as in VoxelMorph's ``SpatialTransformer`` and MONAI's ``Warp``): ``warp(vol, disp)`` returns
``out(p) = vol(p + disp(p))`` sampled trilinearly, with ``p`` a voxel index ``(i, j, k)``. Warping the
*intraop* image with the forward Lagrangian field ``u`` (preop voxel ``p`` moves to ``p + u(p)``) therefore
brings it back onto the preop grid: ``warp(intraop, u)(p) = intraop(p + u(p)) ~ preop(p)``.

``torch.nn.functional.grid_sample`` is used with ``align_corners=True``: voxel index ``v`` along an axis of
size ``n`` maps to the normalised coordinate ``2 v / (n - 1) - 1``, so ``-1`` and ``+1`` are the centres of
the first and last voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from brainshift.errors import GeometryError


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``(3, I, J, K)`` tensor of voxel indices ``(i, j, k)`` (torch twin of :func:`brainshift.field.voxel_grid`)."""
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def voxel_to_grid_sample(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Voxel coordinates ``(B, 3, I', J', K')`` (components ``i, j, k``) -> a ``grid_sample`` grid.

    Args:
        coords: sampling positions in voxel indices of a source volume of spatial ``shape`` ``(I, J, K)``.
        shape: the source's spatial size.

    Returns:
        ``(B, I', J', K', 3)`` grid in grid_sample's normalised coordinates (align_corners=True). Its last
        dimension is ordered ``(x, y, z)`` = (width, height, depth) = our ``(k, j, i)``: grid_sample indexes the
        input ``(B, C, D, H, W)`` with ``x`` along W. Hence the component reversal here. An axis of size 1 maps
        every position to its single voxel.
    """
    if coords.ndim != 5 or coords.shape[1] != 3:
        raise GeometryError(f"expected voxel coordinates of shape (B, 3, I, J, K), got {tuple(coords.shape)}")
    scale = torch.tensor([2.0 / max(int(s) - 1, 1) for s in shape], dtype=coords.dtype, device=coords.device)
    norm = coords * scale[None, :, None, None, None] - 1.0
    # (B, 3, I, J, K) components (i, j, k) -> (B, I, J, K, 3) components (k, j, i) = grid_sample's (x, y, z)
    return norm.flip(1).permute(0, 2, 3, 4, 1)


def warp(volume: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Pull-warp ``volume`` by ``disp``: ``out(p) = volume(p + disp(p))``.

    Args:
        volume: ``(B, C, I, J, K)`` tensor.
        disp: ``(B, 3, I, J, K)`` displacement in voxel units of ``volume``'s grid, components ``(i, j, k)``.
        mode: ``bilinear`` (trilinear in 3-D) or ``nearest`` (for labels).
        padding_mode: value for samples outside the volume: ``border`` (nearest edge value, MONAI's default),
            ``zeros`` or ``reflection``.

    Returns:
        ``(B, C, I, J, K)`` warped tensor (differentiable in ``volume`` and ``disp``).

    Raises:
        GeometryError: if the shapes do not match.

    Convention: ``disp`` is sampled as a pull field (the location each output voxel reads from, relative
    to itself). With a forward Lagrangian preop->intraop field ``u``, ``warp(intraop, u)`` ~ preop.
    """
    if volume.ndim != 5:
        raise GeometryError(f"expected a volume of shape (B, C, I, J, K), got {tuple(volume.shape)}")
    if disp.ndim != 5 or disp.shape[1] != 3 or disp.shape[2:] != volume.shape[2:] or (
            disp.shape[0] not in (1, volume.shape[0])):
        raise GeometryError(f"expected a displacement of shape ({volume.shape[0]}, 3, "
                            f"{', '.join(str(s) for s in volume.shape[2:])}), got {tuple(disp.shape)}")
    shape = volume.shape[2:]
    coords = identity_grid(shape, device=disp.device, dtype=disp.dtype)[None] + disp
    grid = voxel_to_grid_sample(coords, shape)
    if grid.shape[0] != volume.shape[0]:
        grid = grid.expand(volume.shape[0], -1, -1, -1, -1)
    return F.grid_sample(volume.to(disp.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of the map ``p -> q = p + first(p) -> q + second(q)``: ``first + second(p + first(p))``.

    Args:
        first, second: ``(B, 3, I, J, K)`` forward displacements in voxel units on the same grid.

    Returns:
        ``(B, 3, I, J, K)`` composed displacement (``second`` sampled trilinearly with border padding).

    Convention: forward Lagrangian fields in voxel units; ``first`` is applied first.
    """
    return first + warp(second, first)


def jacobian_determinant_torch(disp: torch.Tensor, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> torch.Tensor:
    """``det(I + grad u)`` of the map ``x -> x + u(x)`` for a batch of fields, differentiable.

    Args:
        disp: ``(B, 3, I, J, K)`` displacement whose components are in the same physical unit as
            ``spacing`` (mm along the axes ``i, j, k`` with ``spacing`` in mm; or voxel units with spacing 1).
        spacing: grid spacing along ``i, j, k`` (mm).

    Returns:
        ``(B, I, J, K)`` determinant; values <= 0 mean folding. Derivatives are central differences divided by
        the physical spacing, one-sided at the border (``torch.gradient``, edge_order 1, as ``numpy.gradient``),
        so it equals :func:`brainshift.field.jacobian_determinant` of the voxel-unit field ``disp / spacing``.

    Convention: forward Lagrangian field in physical units along the grid axes.
    """
    if disp.ndim != 5 or disp.shape[1] != 3:
        raise GeometryError(f"expected a displacement of shape (B, 3, I, J, K), got {tuple(disp.shape)}")
    if any(int(s) < 2 for s in disp.shape[2:]):
        raise GeometryError(f"expected at least 2 voxels along each axis, got {tuple(disp.shape[2:])}")
    sp = [float(s) for s in spacing]
    if len(sp) != 3 or any(s <= 0 for s in sp):
        raise GeometryError(f"expected 3 positive spacings, got {tuple(spacing)}")
    # grads[d][:, c] = d u_c / d x_d
    grads = torch.gradient(disp, spacing=sp, dim=(2, 3, 4), edge_order=1)
    j = [[grads[d][:, c] + (1.0 if c == d else 0.0) for d in range(3)] for c in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
