"""Pre- and post-processing between an image grid and the network grid (shared by inference and training).

Training (:mod:`brainshift.train`) and inference (:mod:`brainshift.model.inference`) both go through
:func:`to_network_grid` / :func:`field_to_network_grid` / :func:`from_network_grid`, so the two can never
diverge. Steps, in order:

1. **Network grid**: the input grid's field of view at ``config.spacing_mm`` isotropic, its voxel axes reordered
   and flipped to run closest to R, A, S (:func:`nearest_ras_grid`, nibabel's ``io_orientation``; then
   :func:`brainshift.volume.grid_with_spacing`), and cropped to the region's bounding box plus
   :data:`FRAME_MARGIN_MM` where the field of view is larger (:func:`framed_network_grid`): the network sees the
   head as it was trained on it (RAS grids, 10-18 mm of background) whether the image is stored RAS, LPS or in a
   sagittal axis order, and whatever its field of view. An oblique grid keeps its rotation from the nearest axes.
   When that grid equals the input grid (1 mm RAS input, 1 mm network) nothing is resampled; a reordering alone is
   an exact permutation of the arrays.
2. **Field units**: the voxel-unit field of the input grid goes to world mm (``A_in @ u``, the convention),
   then into the network grid's axes (``A_net^-1``) and, for ``field_units="mm"``, times the network spacing:
   ``u_net = S A_net^-1 A_in u`` with ``S = diag(spacing)`` (mm) or the identity (voxel).
3. **Resampling** (image, field components and mask together): trilinear ``grid_sample`` (align_corners=True
   on voxel centres) with border padding, so the half voxel at the edge of the field of view repeats the edge
   value. The mask is resampled trilinearly and thresholded at 0.5.
4. **Region**: the brain mask if given, else the foreground ``image > image.min()`` on the network grid.
5. **Z-score** of the image over the region (mean and standard deviation of the region's voxels, applied to
   the whole volume; a standard deviation below 1e-6 counts as 1). The published script normalised over the
   whole padded volume instead.
6. **Zero the field outside the region** (the published script zeroed it where the image is at its
   minimum).
7. **Scale normalisation** (optional, ``min_field_rms_mm``): a field whose RMS magnitude over the region is
   below ``min_field_rms_mm`` is multiplied by ``field_scale = min_field_rms_mm / RMS`` so that the network sees
   a displacement as large as the smaller ones it was trained on; :func:`refined_from_prediction` divides the
   network's correction by the same factor. Linear elasticity is positively homogeneous (load and solution
   scale together), so the scaled problem is as plausible as the given one; a network trained on
   displacements of several mm otherwise invents corrections of its own training size on a shift of a
   fraction of a mm (bench/RESULTS.md, "Scale-normalised network input", session 16).
8. **Pad** at both ends (``before = total // 2``) to multiples of ``2 ** (levels - 1)``: the image with its
   normalised minimum (background), field and mask with zeros. The pad is recorded and removed exactly by
   :func:`from_network_grid`.
9. **Keypoint channel** (networks with ``config.keypoint_channel = "proximity"`` only): one more channel after
   the image, :func:`keypoint_proximity` of the driving keypoints on the padded network grid, computed from the
   keypoints' world positions (not resampled), so it is the same function of space on any input grid.

All resampling here maps voxel centres through the affines: voxel ``q`` of the target samples the source at
``A_src^-1 A_dst q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.field import check_field
from brainshift.geometry import check_affine, spacing_from_affine
from brainshift.model.network import NetworkConfig
from brainshift.model.warp import voxel_to_grid_sample
from brainshift.volume import Volume, grid_with_spacing, mask_inside

Pad = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class NetworkInput:
    """An image and initial field prepared for the network, with what is needed to map results back.

    Attributes:
        tensor: ``(1, 4, I', J', K')`` float32: field channels (network units) then the z-scored image,
            padded; spatial axes are our ``(i, j, k)``. ``(1, 5, ...)`` with the keypoint channel last for
            networks that take one (step 9).
        mask: ``(I', J', K')`` bool: region where the field was kept (False in the padding).
        pad: ``((before, after),) * 3`` voxels added along ``i, j, k`` on the network grid.
        net_shape: ``(I_n, J_n, K_n)`` network grid before padding.
        net_affine: 4x4 voxel-to-RAS affine of the (unpadded) network grid.
        input_shape: the input image's grid shape.
        input_affine: the input image's affine.
        config: the network configuration used.
        image_mean: mean of the image over the region (before normalisation).
        image_std: standard deviation used to normalise.
        same_grid: True when the network grid is the input grid (no resampling).
        field_scale: the factor (>= 1 when chosen by ``min_field_rms_mm``) the field channels were multiplied
            by (step 7); :func:`refined_from_prediction` divides the correction by it.
        framed: True when the network grid was cropped to the region (:func:`framed_network_grid`).

    Convention: the field channels hold a forward Lagrangian field on the network grid in
    ``config.field_units`` along the network grid's axes.
    """

    tensor: torch.Tensor
    mask: torch.Tensor
    pad: Pad
    net_shape: tuple[int, int, int]
    net_affine: np.ndarray
    input_shape: tuple[int, int, int]
    input_affine: np.ndarray
    config: NetworkConfig
    image_mean: float
    image_std: float
    same_grid: bool
    field_scale: float = 1.0
    framed: bool = False

    def grid_record(self) -> dict:
        """What ``summary.json`` records of the network grid: ``shape`` (unpadded), ``spacing_mm``, ``axes``
        (always ``"RAS"``: :func:`nearest_ras_grid`) and ``framed_on_region`` (cropped to the brain's box plus
        :data:`FRAME_MARGIN_MM`)."""
        return {"shape": [int(v) for v in self.net_shape], "spacing_mm": float(self.config.spacing_mm),
                "axes": "RAS", "framed_on_region": bool(self.framed)}

    @property
    def field(self) -> torch.Tensor:
        """``(1, 3, I', J', K')`` view of the field channels (network units, padded)."""
        return self.tensor[:, :3]

    @property
    def image(self) -> torch.Tensor:
        """``(1, 1, I', J', K')`` view of the z-scored padded image."""
        return self.tensor[:, 3:4]

    @property
    def padded_affine(self) -> np.ndarray:
        """Voxel-to-RAS affine of the padded network grid (origin moved by the leading pad)."""
        a = self.net_affine.copy()
        a[:3, 3] = self.net_affine[:3, :3] @ -np.array([p[0] for p in self.pad], dtype=np.float64) + a[:3, 3]
        return a


def nearest_ras_grid(shape, affine) -> tuple[tuple[int, int, int], np.ndarray]:
    """The same voxel grid with its axes reordered and flipped so that they run closest to R, A, S.

    The voxel centres are the same points in the world; only their indexing changes (nibabel's
    ``io_orientation`` / ``ornt_transform`` / ``inv_ornt_aff``, as ``nibabel.as_closest_canonical``). A RAS grid
    is returned unchanged.

    Args:
        shape: ``(I, J, K)`` grid shape.
        affine: 4x4 voxel-to-RAS (mm) affine.

    Returns:
        ``(shape, affine)`` of the reindexed grid.

    Raises:
        GeometryError: a singular or non-finite affine.
    """
    import nibabel.orientations as nio

    a = check_affine(affine)
    shape = tuple(int(s) for s in shape)
    tr = nio.ornt_transform(nio.io_orientation(a), nio.axcodes2ornt(("R", "A", "S")))
    if np.array_equal(tr, [[0, 1], [1, 1], [2, 1]]):
        return shape, a
    new_shape = [0, 0, 0]
    for old_axis, (new_axis, _) in enumerate(tr):
        new_shape[int(new_axis)] = shape[old_axis]
    return tuple(new_shape), a @ nio.inv_ornt_aff(tr, shape)


def network_grid(shape, affine, config: NetworkConfig) -> tuple[tuple[int, int, int], np.ndarray]:
    """The network grid for an input grid: same field of view, axes closest to R, A, S
    (:func:`nearest_ras_grid`), ``config.spacing_mm`` isotropic.

    Returns the input grid itself (its exact affine) when they coincide to 1e-6 mm.
    """
    a = check_affine(affine)
    shape = tuple(int(s) for s in shape)
    new_shape, new_aff = grid_with_spacing(*nearest_ras_grid(shape, a), float(config.spacing_mm))
    if new_shape == shape and np.allclose(new_aff, a, atol=1e-6):
        return shape, a
    return new_shape, new_aff


#: Version of the network-grid preprocessing (part of the training cache key, brainshift.train.data.config_key):
#: 2 since session 32 (axes closest to R, A, S; framed on the region).
PREPROCESSING_VERSION = 2

#: Background (mm) the network grid keeps around the region's bounding box (:func:`framed_network_grid`): the
#: training images have 10-18 mm of it, so they are never cropped; larger fields of view are.
FRAME_MARGIN_MM = 20.0


def framed_network_grid(image: Volume, mask: np.ndarray | None, config: NetworkConfig
                        ) -> tuple[tuple[int, int, int], np.ndarray]:
    """The network grid of ``image`` (:func:`network_grid`) cropped to the region's bounding box plus
    :data:`FRAME_MARGIN_MM` on every side, so the network sees the head framed as in training whatever the image's
    field of view (its instance normalisation takes statistics over the whole input: 20 / 40 mm more background
    around the same head changed the network's field by 1.2 / 1.8 x its error, bench/RESULTS.md "Session 32").

    The region is the brain mask (nonzero voxels) if given, else the foreground ``image > image.min()``, as in
    :func:`to_network_grid`. The crop is in whole network voxels (the kept voxels are those of the uncropped grid);
    the grid is returned uncropped when the margin reaches past its edges on every side or the region is empty.

    Args:
        image: the input image.
        mask: optional ``(I, J, K)`` brain mask on ``image``'s grid.
        config: the network's configuration.

    Returns:
        ``(shape, affine)`` of the network grid.
    """
    net_shape, net_affine = network_grid(image.shape, image.affine, config)
    region = mask_inside(mask, "brain mask") if mask is not None else (
        np.asarray(image.data) > np.asarray(image.data).min())
    if region.shape != tuple(image.shape):
        raise GeometryError(f"expected a brain mask on the image grid {tuple(image.shape)}, got {region.shape}")
    spans = []
    for axis in range(3):
        hit = np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return net_shape, net_affine
        spans.append((hit[0] - 0.5, hit[-1] + 0.5))
    corners = np.array([[i, j, k] for i in spans[0] for j in spans[1] for k in spans[2]])
    to_net = np.linalg.inv(net_affine) @ check_affine(image.affine)
    idx = corners @ to_net[:3, :3].T + to_net[:3, 3]
    margin = FRAME_MARGIN_MM / spacing_from_affine(net_affine)
    lo = np.maximum(0, np.floor(idx.min(axis=0) - margin)).astype(int)
    hi = np.minimum(np.asarray(net_shape) - 1, np.ceil(idx.max(axis=0) + margin)).astype(int)
    if np.all(lo == 0) and np.all(hi == np.asarray(net_shape) - 1):
        return net_shape, net_affine
    new = net_affine.copy()
    new[:3, 3] = net_affine[:3, :3] @ lo + net_affine[:3, 3]
    return tuple(int(v) for v in hi - lo + 1), new


def _units_scale(affine: np.ndarray, units: str) -> np.ndarray:
    return spacing_from_affine(affine) if units == "mm" else np.ones(3)


def field_vox_to_network_matrix(input_affine, net_affine, units: str) -> np.ndarray:
    """3x3 matrix taking an input-grid voxel-unit vector to network units: ``S A_net^-1 A_in``.

    ``S`` is ``diag(network spacing)`` for ``units="mm"`` (mm along the network grid's axes), else identity.
    """
    a_in = check_affine(input_affine)[:3, :3]
    a_net = check_affine(net_affine)[:3, :3]
    return np.diag(_units_scale(net_affine, units)) @ np.linalg.inv(a_net) @ a_in


def _apply_matrix(m: np.ndarray, field: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the component axis of a ``(B, 3, ...)`` or ``(3, ...)`` tensor."""
    if np.allclose(m, np.eye(3), atol=1e-12, rtol=0):
        return field
    mt = torch.as_tensor(m, dtype=field.dtype, device=field.device)
    if field.ndim == 4:
        return torch.einsum("ab,b...->a...", mt, field)
    return torch.einsum("ab,nb...->na...", mt, field)


def resample_channels(data: torch.Tensor, src_affine, dst_shape, dst_affine,
                      mode: str = "bilinear") -> torch.Tensor:
    """Resample a ``(C, I, J, K)`` tensor from its grid ``src_affine`` onto ``(dst_shape, dst_affine)``.

    Voxel ``q`` of the destination samples the source at ``A_src^-1 A_dst q`` (trilinear for ``bilinear``,
    border padding). Each channel is resampled as a scalar image (vector components are not rotated: convert
    them first, see :func:`field_vox_to_network_matrix`).

    Returns:
        ``(C, *dst_shape)`` tensor of ``data``'s dtype (float32 / float64).
    """
    if data.ndim != 4:
        raise GeometryError(f"expected a (C, I, J, K) tensor to resample, got {tuple(data.shape)}")
    m = np.linalg.inv(check_affine(src_affine)) @ check_affine(dst_affine)
    reordered = _reorder_source(data, src_affine, m)
    if reordered is not None:  # the axes map onto each other: permute and flip exactly, then resample
        return resample_channels(reordered[0], reordered[1], dst_shape, dst_affine, mode=mode)
    dtype = data.dtype if data.dtype in (torch.float32, torch.float64) else torch.float32
    if mode == "bilinear" and np.abs(m[:3, :3] - np.diag(np.diag(m[:3, :3]))).max() < 1e-9:
        fast = _resample_interpolate(data.to(dtype), m, dst_shape)
        if fast is not None:
            return fast
    axes = [torch.arange(int(s), dtype=dtype, device=data.device) for s in dst_shape]
    shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    coords = []
    for a in range(3):
        c = float(m[a, 3]) + sum(float(m[a, b]) * axes[b].reshape(shapes[b]) for b in range(3))
        coords.append(c.expand(*[int(s) for s in dst_shape]))
    grid = voxel_to_grid_sample(torch.stack(coords)[None], data.shape[1:])
    out = F.grid_sample(data[None].to(dtype), grid, mode=mode, padding_mode="border", align_corners=True)
    return out[0]


def _reorder_source(data: torch.Tensor, src_affine, m: np.ndarray) -> tuple[torch.Tensor, np.ndarray] | None:
    """The source ``(C, I, J, K)`` with its axes permuted and flipped (exactly) so that each destination axis maps
    onto the same-numbered source axis in the same direction, and the affine of that reindexed source; None when
    ``m`` (destination voxel -> source voxel) does not map axes onto axes or already maps them in order."""
    m3 = np.asarray(m, np.float64)[:3, :3]
    big = np.abs(m3) > 1e-9 * max(float(np.abs(m3).max()), 1e-300)
    if not (np.all(big.sum(axis=0) == 1) and np.all(big.sum(axis=1) == 1)):
        return None
    src_of = [int(np.flatnonzero(big[:, d])[0]) for d in range(3)]  # destination axis d samples source axis
    signs = [float(np.sign(m3[src_of[d], d])) for d in range(3)]
    if src_of == [0, 1, 2] and all(sg > 0 for sg in signs):
        return None
    out = data.permute(0, *(1 + s for s in src_of))
    flips = [1 + d for d in range(3) if signs[d] < 0]
    if flips:
        out = torch.flip(out, flips)
    p = np.zeros((4, 4))  # source voxel = p @ reindexed voxel
    p[3, 3] = 1.0
    for d, s_ax in enumerate(src_of):
        p[s_ax, d] = signs[d]
        if signs[d] < 0:
            p[s_ax, 3] = data.shape[1 + s_ax] - 1
    return out.contiguous(), check_affine(src_affine) @ p


def _resample_interpolate(data: torch.Tensor, m: np.ndarray, dst_shape) -> torch.Tensor | None:
    """Fast path of :func:`resample_channels` for a corner-aligned axis scaling, else None.

    When ``m`` maps destination voxel ``q`` to source ``r (q + 0.5) - 0.5`` per axis (grids sharing their
    field-of-view corner, as :func:`network_grid` builds them), this is ``F.interpolate`` (trilinear,
    align_corners=False, the given scale) with its coordinate clamping = border padding. The source is
    replicate-padded at the end so the output covers ``dst_shape``, then cropped. Same values as the
    ``grid_sample`` path to float rounding, ~5x less CPU.
    """
    r = np.diag(m[:3, :3]).astype(np.float64)
    if np.any(r <= 0) or not np.allclose(m[:3, 3], 0.5 * r - 0.5, atol=1e-6, rtol=0):
        return None
    sf = 1.0 / r
    need = [max(0, int(np.ceil(d / f)) - int(n) + 1) for d, f, n in zip(dst_shape, sf, data.shape[1:], strict=True)]
    x = data[None]
    if any(need):
        x = F.pad(x, [0, need[2], 0, need[1], 0, need[0]], mode="replicate")
    y = F.interpolate(x, scale_factor=tuple(float(f) for f in sf), mode="trilinear", align_corners=False,
                      recompute_scale_factor=False)
    if any(int(a) < int(d) for a, d in zip(y.shape[2:], dst_shape, strict=True)):
        return None
    return y[0, :, : int(dst_shape[0]), : int(dst_shape[1]), : int(dst_shape[2])]


def pad_to_multiple(tensor: torch.Tensor, multiple: int, value: float = 0.0) -> tuple[torch.Tensor, Pad]:
    """Pad the last three dims of ``tensor`` at both ends up to multiples of ``multiple``.

    Returns:
        ``(padded, pad)`` with ``pad = ((before, after),) * 3`` along ``i, j, k``; ``before = total // 2``.
    """
    pad = []
    for s in tensor.shape[-3:]:
        total = (-int(s)) % int(multiple)
        pad.append((total // 2, total - total // 2))
    flat = []
    for before, after in reversed(pad):  # F.pad lists the last dimension first
        flat += [before, after]
    if any(flat):
        tensor = F.pad(tensor, flat, mode="constant", value=float(value))
    return tensor, tuple(pad)  # type: ignore[return-value]


def crop_pad(tensor: torch.Tensor, pad: Pad) -> torch.Tensor:
    """Remove ``pad`` (from :func:`pad_to_multiple`) from the last three dims of ``tensor`` exactly."""
    sl = [slice(b, int(s) - a) for (b, a), s in zip(pad, tensor.shape[-3:], strict=True)]
    return tensor[(..., *sl)]


def center_crop_or_pad(tensor: torch.Tensor, size, value: float = 0.0) -> torch.Tensor:
    """Centre-crop or pad (with ``value``) the last three dims of ``tensor`` to ``size`` (e.g. a training size).

    Per axis, ``(n - size) // 2`` voxels are cropped from the start (or ``(size - n) // 2`` padded before),
    the rest at the end.
    """
    out = tensor
    for axis, target in enumerate(int(s) for s in size):
        dim = out.ndim - 3 + axis
        n = int(out.shape[dim])
        if n > target:
            out = out.narrow(dim, (n - target) // 2, target)
        elif n < target:
            before = (target - n) // 2
            flat = [0, 0] * (out.ndim - 1 - dim) + [before, target - n - before]
            out = F.pad(out, flat, mode="constant", value=float(value))
    return out


def zscore(image: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Z-score ``image`` with the mean and standard deviation of its voxels in ``region`` (bool, same shape).

    An empty region uses the whole image; a standard deviation below 1e-6 counts as 1.

    Returns:
        ``(normalised, mean, std)``.
    """
    vals = image[region] if bool(region.any()) else image.reshape(-1)
    vals = vals.double()
    mean = float(vals.mean())
    std = float(vals.std(unbiased=False)) if vals.numel() > 1 else 0.0
    if not std > 1e-6:
        std = 1.0
    return ((image - mean) / std).to(image.dtype), mean, std


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32)))


def field_rms_mm(field_net: torch.Tensor, region: torch.Tensor, net_affine: np.ndarray, units: str) -> float:
    """RMS magnitude (world mm) of a network-unit field ``(3, I', J', K')`` over ``region`` (bool ``(I', J', K')``);
    0 for an empty region."""
    if not bool(region.any()):
        return 0.0
    to_mm = check_affine(net_affine)[:3, :3] @ np.diag(1.0 / _units_scale(net_affine, units))
    v = _apply_matrix(to_mm, field_net.double())[:, region]
    return float(torch.sqrt((v ** 2).sum(dim=0).mean()))


def scale_for_rms(rms_mm: float, min_field_rms_mm: float | None) -> float:
    """The scale normalisation factor of step 7: ``max(1, min_field_rms_mm / rms_mm)``; 1 when
    ``min_field_rms_mm`` is ``None`` or 0, or the field is zero (nothing to scale)."""
    if not min_field_rms_mm or rms_mm <= 1e-6:
        return 1.0
    return max(1.0, float(min_field_rms_mm) / float(rms_mm))


def grid_world_mm(shape, affine, origin) -> torch.Tensor:
    """``(I*J*K, 3)`` float32 world positions (mm) of the voxel centres of the grid ``(shape, affine)``, C order,
    relative to ``origin`` (world mm; e.g. the centroid of the points they will be compared with, so float32 keeps
    them precise)."""
    a = np.asarray(affine, np.float64)
    axes = [torch.arange(int(n), dtype=torch.float32) for n in shape]
    ii, jj, kk = torch.meshgrid(*axes, indexing="ij")
    idx = torch.stack([ii.reshape(-1), jj.reshape(-1), kk.reshape(-1)], 1)
    return idx @ torch.from_numpy(a[:3, :3].T.astype(np.float32)) + torch.from_numpy(
        (a[:3, 3] - np.asarray(origin, np.float64)).astype(np.float32))


def keypoint_proximity(points_ras, shape, affine, scale_mm: float) -> torch.Tensor:
    """The keypoint channel: ``exp(-d / scale_mm)`` at each voxel centre of the grid ``(shape, affine)``, with ``d``
    the Euclidean distance (mm, world) to the nearest point of ``points_ras`` (exact, by ``torch.cdist``).

    Args:
        points_ras: ``(N, 3)`` driving keypoints in world RAS mm (N >= 1).
        shape, affine: the grid (e.g. the padded network grid, :attr:`NetworkInput.padded_affine`).
        scale_mm: the length scale (mm), :attr:`NetworkConfig.keypoint_scale_mm`.

    Returns:
        ``(I, J, K)`` float32 tensor in ``(0, 1]``: 1 at a keypoint, ``exp(-1)`` one scale away.

    Raises:
        BrainshiftError: no keypoints, non-finite ones or a bad scale.
    """
    pts = np.asarray(points_ras, np.float64).reshape(-1, 3) if np.size(points_ras) else np.zeros((0, 3))
    if len(pts) == 0 or not np.all(np.isfinite(pts)):
        raise BrainshiftError(f"expected at least one finite keypoint for the keypoint channel, got {len(pts)} "
                              f"({'non-finite values' if len(pts) else 'none'})")
    if not (np.isfinite(scale_mm) and scale_mm > 0):
        raise BrainshiftError(f"expected a positive keypoint scale (mm), got {scale_mm!r}")
    shape = tuple(int(s) for s in shape)
    # brute force in chunks (torch.cdist): a few keypoints against every voxel is faster than a k-d tree query,
    # and exact; coordinates relative to the keypoints' centroid keep float32 precise
    c = pts.mean(axis=0)
    p_t = torch.from_numpy((pts - c).astype(np.float32))
    world = grid_world_mm(shape, affine, c)
    chunk = max(1, 2**24 // max(len(pts), 1))
    d = torch.cat([torch.cdist(world[s:s + chunk], p_t).amin(dim=1) for s in range(0, len(world), chunk)])
    return torch.exp(d / -float(scale_mm)).reshape(shape)


def to_network_grid(image: Volume, field_vox, mask: np.ndarray | None, config: NetworkConfig, *,
                    min_field_rms_mm: float | None = None, field_scale: float | None = None,
                    points_ras=None, frame: bool = True) -> NetworkInput:
    """Prepare an image and its initial field for the network (steps 1-8 of the module docstring).

    Args:
        image: the preop image (intensity :class:`~brainshift.volume.Volume`).
        field_vox: ``(3, I, J, K)`` initial displacement on ``image``'s grid, voxel units.
        mask: optional ``(I, J, K)`` brain mask (nonzero = brain: :func:`brainshift.volume.mask_inside`) on
            ``image``'s grid.
        config: the network's configuration (``spacing_mm``, ``field_units``, ``features`` for the padding).
        min_field_rms_mm: scale normalisation (step 7): a field whose RMS magnitude (mm) over the region on the
            network grid is below this is scaled up to it; ``None`` or 0: no scaling.
        field_scale: scale the field channels by this factor instead (e.g. the factor of the full problem for
            its cross-validation folds); exclusive with ``min_field_rms_mm``.
        points_ras: ``(N, 3)`` driving keypoints (world RAS mm) for a network with a keypoint channel (step 9);
            ignored by networks without one.
        frame: crop the network grid to the region (:func:`framed_network_grid`); False: :func:`network_grid`
            as it is (for an image already on a framed network grid, e.g. the safeguards' coarse problem, so
            its framing is not redone from a coarser region).

    Returns:
        A :class:`NetworkInput` (CPU tensors).

    Raises:
        GeometryError: a field or mask not on the image grid, non-finite values, a mask with negative values,
            or a network expecting a channel count other than 4 (5 with a keypoint channel).
        BrainshiftError: both ``min_field_rms_mm`` and ``field_scale``, or a scale that is not a positive
            finite number; a network with a keypoint channel and no keypoints.

    Convention: ``field_vox`` is forward Lagrangian in voxel units of the input grid; the result's field
    channels are forward Lagrangian in ``config.field_units`` on the network grid (times ``field_scale``).
    """
    if min_field_rms_mm is not None and field_scale is not None:
        raise BrainshiftError("expected min_field_rms_mm or field_scale, got both")
    def _number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))

    if min_field_rms_mm is not None and not (_number(min_field_rms_mm) and min_field_rms_mm >= 0):
        raise BrainshiftError(f"expected min_field_rms_mm a non-negative finite number, got {min_field_rms_mm!r}")
    if field_scale is not None and not (_number(field_scale) and field_scale > 0):
        raise BrainshiftError(f"expected field_scale a positive finite number, got {field_scale!r}")
    if config.in_channels != config.expected_in_channels:
        raise GeometryError(f"expected a network with {config.expected_in_channels} input channels, got "
                            f"{config.in_channels}")
    if config.uses_keypoints and (points_ras is None or np.size(points_ras) == 0):
        raise BrainshiftError("this model takes the keypoints as an input channel (keypoint_channel "
                              f"{config.keypoint_channel!r}): expected the driving keypoints, got none")
    shape = image.shape
    f = check_field(_as_tensor(field_vox).numpy(), shape)
    img = np.asarray(image.data, dtype=np.float32)
    if not np.all(np.isfinite(img)):
        raise GeometryError("expected a finite image, found NaN or inf values")
    net_shape, net_affine = network_grid(shape, image.affine, config)
    framed = False
    if frame:
        f_shape, f_affine = framed_network_grid(image, mask, config)
        framed = f_shape != tuple(net_shape) or not np.array_equal(f_affine, net_affine)
        net_shape, net_affine = f_shape, f_affine
    same = net_shape == shape and np.array_equal(net_affine, image.affine)
    m = field_vox_to_network_matrix(image.affine, net_affine, config.field_units)
    field_t = _apply_matrix(m, torch.from_numpy(np.ascontiguousarray(f)))
    chans = [field_t, torch.from_numpy(np.ascontiguousarray(img))[None]]
    if mask is not None:
        mk = np.asarray(mask)
        if mk.shape != shape:
            raise GeometryError(f"expected a brain mask on the image grid {shape}, got {mk.shape}")
        chans.append(torch.from_numpy(mask_inside(mk, "brain mask").astype(np.float32))[None])
    data = torch.cat(chans)
    if not same:
        data = resample_channels(data, image.affine, net_shape, net_affine)
    field_n, img_n = data[:3], data[3]
    if mask is not None:
        region = data[4] >= 0.5
    else:
        region = img_n > img_n.min()
    img_n, mean, std = zscore(img_n, region)
    field_n = field_n * region
    if field_scale is None:
        field_scale = 1.0 if not min_field_rms_mm else scale_for_rms(
            field_rms_mm(field_n, region, net_affine, config.field_units), min_field_rms_mm)
    if field_scale != 1.0:
        field_n = field_n * float(field_scale)
    background = float(img_n.min())
    mult = config.size_multiple
    field_p, pad = pad_to_multiple(field_n, mult, 0.0)
    img_p, _ = pad_to_multiple(img_n[None], mult, background)
    region_p, _ = pad_to_multiple(region[None].to(torch.uint8), mult, 0)
    chans_p = [field_p, img_p]
    result = NetworkInput(tensor=torch.empty(0), mask=region_p[0].bool(), pad=pad, net_shape=tuple(net_shape),
                          net_affine=net_affine, input_shape=tuple(shape), input_affine=image.affine.copy(),
                          config=config, image_mean=mean, image_std=std, same_grid=same,
                          field_scale=float(field_scale), framed=framed)
    if config.uses_keypoints:
        chans_p.append(keypoint_proximity(points_ras, field_p.shape[1:], result.padded_affine,
                                          config.keypoint_scale_mm)[None])
    result.tensor = torch.cat(chans_p)[None].contiguous()
    return result


def field_to_network_grid(field_vox, net_input: NetworkInput, zero_outside: bool = False) -> torch.Tensor:
    """Take another field on the input grid (e.g. the ground truth for training) to the network grid.

    Same unit conversion, resampling and padding as the initial field in :func:`to_network_grid`.

    Args:
        field_vox: ``(3, I, J, K)`` forward displacement on the input grid, voxel units.
        net_input: from :func:`to_network_grid` for the same input grid.
        zero_outside: also zero it outside ``net_input.mask``.

    Returns:
        ``(1, 3, I', J', K')`` float32 tensor in ``config.field_units`` on the padded network grid.

    Convention: forward Lagrangian in both; see :func:`to_network_grid`.
    """
    f = check_field(_as_tensor(field_vox).numpy(), net_input.input_shape)
    m = field_vox_to_network_matrix(net_input.input_affine, net_input.net_affine, net_input.config.field_units)
    out = _apply_matrix(m, torch.from_numpy(np.ascontiguousarray(f)))
    if not net_input.same_grid:
        out = resample_channels(out, net_input.input_affine, net_input.net_shape, net_input.net_affine)
    out, _ = pad_to_multiple(out, net_input.config.size_multiple, 0.0)
    if zero_outside:
        out = out * net_input.mask
    return out[None].contiguous()


def from_network_grid(pred, net_input: NetworkInput) -> np.ndarray:
    """Map a network output back to the input grid: crop the pad, convert units, resample.

    Args:
        pred: ``(1, 3, I', J', K')`` or ``(3, I', J', K')`` field on the padded network grid in
            ``config.field_units`` (tensor on any device, or array). Linear in ``pred``, so a residual
            (output minus input field) maps back the same way.
        net_input: the :class:`NetworkInput` it was computed from.

    Returns:
        ``(3, I, J, K)`` float32 field on the input grid, voxel units of the input grid.

    Raises:
        GeometryError: if ``pred`` is not on ``net_input``'s padded grid.

    Convention: forward Lagrangian in, forward Lagrangian out (voxel units of the input grid).
    """
    p = _as_tensor(pred)
    if p.ndim == 5 and p.shape[0] == 1:
        p = p[0]
    padded = tuple(net_input.tensor.shape[2:])
    if p.ndim != 4 or p.shape[0] != 3 or tuple(p.shape[1:]) != padded:
        raise GeometryError(f"expected a network output of shape (1, 3, {', '.join(map(str, padded))}), "
                            f"got {tuple(pred.shape)}")
    p = crop_pad(p, net_input.pad)
    m = np.linalg.inv(field_vox_to_network_matrix(net_input.input_affine, net_input.net_affine,
                                                  net_input.config.field_units))
    p = _apply_matrix(m, p.contiguous())
    if not net_input.same_grid:
        p = resample_channels(p, net_input.net_affine, net_input.input_shape, net_input.input_affine)
    return np.ascontiguousarray(p.numpy(), dtype=np.float32)


def refined_from_prediction(pred, net_input: NetworkInput, init_field_vox) -> np.ndarray:
    """The refined field on the input grid: ``init + from_network_grid(pred - network input field) / field_scale``.

    The network's correction (its output minus its input field, on the network grid) is mapped back and added
    to the full-resolution initial field, so a coarse network grid does not blur the initial field's own
    detail; on the input's own grid this is the network output inside the region. The correction is only
    trained inside the region (the brain), so outside it is replaced by the correction at the nearest region
    voxel (``scipy.ndimage.distance_transform_edt`` indices) before resampling: input-grid voxels at the brain's
    edge, whose trilinear stencil on a coarse network grid reaches outside the region, get the brain's
    correction instead of untrained values. Used by
    :func:`brainshift.model.inference.refine_field`; validation code should use it too so both agree.

    Args:
        pred: ``(1, 3, I', J', K')`` network output (padded network grid, network units).
        net_input: the :class:`NetworkInput` it was computed from.
        init_field_vox: ``(3, I, J, K)`` initial field on the input grid, voxel units (the one given to
            :func:`to_network_grid`).

    Returns:
        ``(3, I, J, K)`` float32 refined field, voxel units of the input grid.

    Convention: forward Lagrangian in and out.
    """
    init = check_field(_as_tensor(init_field_vox).numpy(), net_input.input_shape)
    residual = _as_tensor(pred)[:, :3].detach().cpu() - net_input.field
    if net_input.field_scale != 1.0:
        residual = residual / float(net_input.field_scale)
    residual = extend_from_region(residual, net_input.mask)
    return (init + from_network_grid(residual, net_input)).astype(np.float32, copy=False)


def extend_from_region(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``values`` ``(..., I, J, K)`` with every voxel outside ``region`` (bool ``(I, J, K)``) set to the value
    at the nearest region voxel (Euclidean, in voxels; ``scipy.ndimage.distance_transform_edt``). Unchanged
    when the region is empty or everything."""
    from scipy import ndimage

    r = np.asarray(_as_tensor(region).cpu().numpy(), dtype=bool)
    if r.shape != tuple(values.shape[-3:]):
        raise GeometryError(f"expected a region of shape {tuple(values.shape[-3:])}, got {r.shape}")
    if r.all() or not r.any():
        return values
    idx = ndimage.distance_transform_edt(~r, return_distances=False, return_indices=True)
    flat = np.ravel_multi_index(tuple(idx), r.shape)
    v = values.reshape(*values.shape[:-3], -1)
    return v[..., torch.from_numpy(flat.reshape(-1))].reshape(values.shape)


def network_field_to_voxel(field: torch.Tensor, config: NetworkConfig) -> torch.Tensor:
    """Network-unit field ``(B, 3, ...)`` -> voxel units of the (isotropic) network grid, e.g. for :func:`warp`.

    Convention: forward Lagrangian; ``mm`` fields are divided by ``config.spacing_mm``.
    """
    if config.field_units == "mm":
        return field / float(config.spacing_mm)
    return field


def mirror_network_tensor(tensor: torch.Tensor, axes, field: bool) -> torch.Tensor:
    """Mirror a network-grid tensor ``(B, C, I, J, K)`` along spatial ``axes`` (each 0, 1 or 2).

    With ``field``, channels 0-2 are a displacement field along the grid axes (e.g. the network's input, whose
    channel 3 is the image, or its output): the component along each mirrored axis also changes sign, so the
    result is the displacement of the mirrored problem, ``u'(x') = R u(R x')`` with ``R`` the reflection.
    Other channels (image, mask) are only reversed. A reflection is its own inverse. Used by training
    augmentation (:func:`brainshift.train.data.assemble_sample`) and inference mirror averaging
    (:func:`brainshift.model.inference.predict`), so the two mirror identically.

    Returns:
        A new tensor (the input is not modified); ``axes`` empty returns the input itself.
    """
    axes = tuple(int(a) for a in axes)
    if not axes:
        return tensor
    out = tensor.flip(tuple(2 + a for a in axes))
    if field:
        sign = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
        sign[list(axes)] = -1.0
        out = out * sign[None, :, None, None, None]
    return out
