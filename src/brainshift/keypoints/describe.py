"""3-D gradient-orientation descriptors of keypoints, rank-ordered as in 3D SIFT-Rank.

Each keypoint gets a 64-value descriptor, the layout of featExtract's ``.key`` files (Toews & Wells, "Efficient
and robust model-to-image alignment using 3D scale-invariant features", MedIA 2013; Chauvin et al., NeuroImage
2020): 2 x 2 x 2 spatial cells x 8 orientation bins of the image gradient over a scale-normalised cube around
the keypoint, then *rank-ordered* (each value replaced by its rank 0..63 among the 64, Toews & Wells' SIFT-Rank),
which makes the descriptor invariant to any monotonic change of the local intensities and of the gradient
magnitudes (bias field, contrast change between scanners).

Rotation: brain shift rotates tissue little (a few degrees), so no dominant orientation is estimated and the
descriptor is **not** rotation-invariant (a rotation-invariant descriptor discards information and adds
orientation-assignment errors). Instead, everything is expressed in the image's **world RAS axes**: the
neighbourhood is a cube aligned with the RAS axes, sampled in millimetres around the keypoint through the
image affine (``scipy.ndimage.map_coordinates``), and gradients are world-frame vectors (``A^-T`` times the
voxel-index gradient). Two images of the same anatomy on different grids (other voxel size, field of view or
orientation, e.g. a preop and an intraop MRI) therefore give comparable descriptors, and rotations up to ~10
degrees change them only moderately.

Construction for a keypoint at ``x`` (RAS mm) with scale ``s`` (mm, the DoG sigma of :mod:`.detect`):

1. the cube of half-width ``support * s`` (mm) centred at ``x`` is sampled on ``n_samples^3`` cell-centred
   points; the image is first Gaussian-blurred to half the sample spacing (levels shared between keypoints
   of similar scale, a factor sqrt(2) apart) so that the samples do not alias;
2. at each sample the world gradient ``g`` contributes ``|g| max(0, g/|g| . d_b)`` to orientation bin ``b``,
   the 8 bin directions ``d_b`` being the cube's diagonals ``(+-1, +-1, +-1) / sqrt(3)`` (the octants);
3. contributions are weighted by a Gaussian window (sigma = half the cube's half-width) and shared between the
   2 x 2 x 2 cells by trilinear weights on the sample's position (soft binning, as in SIFT);
4. the 64 values ``(cell_x, cell_y, cell_z, bin)`` (C order) are replaced by their ranks.
"""

from __future__ import annotations

import math

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.volume import Volume

#: Length of a descriptor: 2 x 2 x 2 spatial cells x 8 orientation bins (featExtract's ``.key`` layout).
DESCRIPTOR_SIZE = 64
#: Orientation bin directions: the 8 octant diagonals ``(+-1, +-1, +-1) / sqrt(3)``, x slowest.
BIN_DIRECTIONS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                          dtype=np.float64) / math.sqrt(3.0)


def _sample_layout(n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised sample offsets ``t (S^3, 3)`` in ``(-1, 1)`` and their window x cell weights ``(S^3, 8)``."""
    ax = -1.0 + (2.0 * np.arange(n_samples) + 1.0) / n_samples
    t = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).reshape(-1, 3)
    window = np.exp(-(t**2).sum(axis=1) / (2 * 0.5**2))
    plus = np.clip(0.5 + t, 0.0, 1.0)  # weight of the "+" cell along each axis (cell centres at -0.5, +0.5)
    per_axis = np.stack([1.0 - plus, plus], axis=-1)  # (S^3, 3, 2)
    cells = np.einsum("na,nb,nc->nabc", per_axis[:, 0], per_axis[:, 1], per_axis[:, 2]).reshape(-1, 8)
    return t, cells * window[:, None]


def rank_order(values: np.ndarray) -> np.ndarray:
    """Replace each row's values by their ranks ``0 .. D-1`` (ties broken by position); float32 ``(N, D)``.

    Source: SIFT-Rank (Toews & Wells 2009/2013): the Euclidean distance between rank vectors is a monotone
    function of Spearman's rank correlation.
    """
    v = np.asarray(values)
    order = np.argsort(v, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(v.shape[1])[None, :].repeat(len(v), axis=0), axis=1)
    return ranks.astype(np.float32)


def describe_keypoints(
    volume: Volume,
    points_vox: np.ndarray,
    scales_mm: np.ndarray | float,
    *,
    support: float = 3.0,
    n_samples: int = 8,
    min_half_width_mm: float = 4.0,
    rank: bool = True,
) -> np.ndarray:
    """3D SIFT-Rank-style descriptors of keypoints, in the image's world RAS axes (see the module docstring).

    Args:
        volume: the image the keypoints were found in (intensity; any grid and orientation).
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices ``(i, j, k)`` of ``volume``.
        scales_mm: ``(N,)`` keypoint scales in mm (``Keypoints.scales_mm``), or one value for all.
        support: half-width of the described cube in units of the scale.
        n_samples: samples per axis of the cube (even, >= 2; each cell gets ``(n_samples / 2)^3``).
        min_half_width_mm: smallest half-width of the cube, mm (small-scale keypoints still see some context).
        rank: replace the histogram values by their ranks (SIFT-Rank); ``False`` returns the raw histograms
            (L2-normalised) for inspection.

    Returns:
        ``(N, 64)`` float32 descriptors: ranks ``0..63`` (each row a permutation), or normalised histograms.
        Index ``((cx * 2 + cy) * 2 + cz) * 8 + b``: cell ``c`` along RAS x, y, z (0 = negative side), bin
        ``b`` of :data:`BIN_DIRECTIONS`.

    Raises:
        KeypointError: points not ``(N, 3)`` finite, scales not positive finite or of the wrong length.
        BrainshiftError: invalid options.
    """
    from scipy import ndimage

    pts = np.asarray(points_vox, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise KeypointError(f"expected finite keypoints of shape (N, 3), got {pts.shape}")
    try:
        sc = np.broadcast_to(np.asarray(scales_mm, dtype=np.float64), (len(pts),)).copy()
    except ValueError:
        raise KeypointError(f"expected {len(pts)} keypoint scales, got shape {np.shape(scales_mm)}") from None
    if not np.all(np.isfinite(sc)) or np.any(sc <= 0):
        raise KeypointError("expected positive finite keypoint scales (mm), got zero, negative, NaN or inf")
    if not (math.isfinite(support) and support > 0):
        raise BrainshiftError(f"expected support > 0, got {support!r}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2 or n_samples % 2:
        raise BrainshiftError(f"expected n_samples an even integer >= 2, got {n_samples!r}")
    if len(pts) == 0:
        return np.zeros((0, DESCRIPTOR_SIZE), dtype=np.float32)

    a = volume.affine
    a3, a3_inv = a[:3, :3], np.linalg.inv(a[:3, :3])
    spacing = volume.spacing
    half = np.maximum(support * sc, float(min_half_width_mm))  # mm
    blur = np.maximum(half / n_samples, 0.5 * float(spacing.min()))  # mm: half the sample spacing
    # blur levels a factor sqrt(2) apart, each keypoint on the level just below its ideal blur
    level = np.floor(2.0 * np.log2(blur / blur.min()) + 1e-9).astype(int)
    t, cell_w = _sample_layout(n_samples)  # (S^3, 3), (S^3, 8)
    centres_w = pts @ a3.T + a[:3, 3]
    data = np.asarray(volume.data, dtype=np.float32)
    hist = np.zeros((len(pts), 8, 8), dtype=np.float64)

    for lev in np.unique(level):
        idx = np.nonzero(level == lev)[0]
        sigma_mm = blur.min() * 2.0 ** (lev / 2.0)
        # crop to the voxels these keypoints' cubes reach (plus the blur's support)
        samples_w = centres_w[idx, None, :] + half[idx, None, None] * t[None, :, :]  # (M, S^3, 3)
        samples_v = (samples_w - a[:3, 3]) @ a3_inv.T
        margin = 4.0 * sigma_mm / spacing + 2.0
        lo = np.maximum(np.floor(samples_v.reshape(-1, 3).min(axis=0) - margin), 0).astype(int)
        hi = np.minimum(np.ceil(samples_v.reshape(-1, 3).max(axis=0) + margin) + 1, volume.shape).astype(int)
        if np.any(hi <= lo):  # every cube lies outside the image: zero gradients
            continue
        crop = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        smooth = ndimage.gaussian_filter(crop, sigma=sigma_mm / spacing, mode="nearest")
        grads_vox = np.gradient(smooth) if min(smooth.shape) > 1 else [np.zeros_like(smooth)] * 3
        coords = (samples_v - lo).reshape(-1, 3).T
        g_vox = np.stack([ndimage.map_coordinates(g, coords, order=1, mode="constant", cval=0.0)
                          for g in grads_vox], axis=-1)  # (M*S^3, 3): d intensity / d voxel index
        g_w = (g_vox @ a3_inv).reshape(len(idx), -1, 3)  # world gradient A^-T g_vox, as rows
        proj = np.maximum(g_w @ BIN_DIRECTIONS.T, 0.0)  # |g| max(0, cos) per bin: (M, S^3, 8)
        hist[idx] = np.einsum("msb,sc->mcb", proj, cell_w)

    desc = hist.reshape(len(pts), DESCRIPTOR_SIZE)
    if rank:
        return rank_order(desc)
    norm = np.linalg.norm(desc, axis=1, keepdims=True)
    return (desc / np.where(norm > 0, norm, 1.0)).astype(np.float32)
