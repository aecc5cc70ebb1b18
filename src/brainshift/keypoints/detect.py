"""3-D scale-space keypoint detection in the spirit of 3D SIFT-Rank.

The detector follows Lowe's SIFT (IJCV 2004) extended to 3-D as in 3D SIFT-Rank (Toews & Wells 2013;
Chauvin et al., NeuroImage 2020, doi:10.1016/j.neuroimage.2019.116208) and Allaire et al. (CVPR workshops
2008): a difference-of-Gaussians (DoG) pyramid with octaves, extrema over the 3x3x3x3 neighbourhood in space
and scale (maxima and minima: dark and bright blobs), sub-voxel and sub-scale refinement by a quadratic
(second-order Taylor) fit, rejection of low contrast and of edge / tube responses with the 3-D Hessian
eigenvalue-ratio test, then suppression of duplicates within a minimum distance keeping the strongest.

Everything is specified in millimetres: the Gaussian sigma along each axis is ``sigma_mm / spacing``, so
anisotropic images are handled; coarse octaves are computed on a grid subsampled by 2 along every axis whose
spacing is still finer than the octave's sampling step (Lowe's pyramid). Filtering uses
``scipy.ndimage.gaussian_filter`` and the separable ``maximum_filter`` / ``minimum_filter`` (spatial 3x3x3
first, the 54 neighbours in the adjacent scales then gathered at the candidates only); the mask-border distance
and the duplicate suppression use ``scipy.spatial.cKDTree``. scikit-image's ``feature.blob_dog`` was the
starting point but has no octaves (every scale at full resolution), no minima, no sub-voxel refinement and no
edge test; it is the timing baseline in ``bench/keypoints.py``.

Only detection is done here (no orientation or descriptor): brainshift needs keypoint *locations* whose
displacements are known (simulation) or matched elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainshift.errors import GeometryError
from brainshift.volume import Volume, mask_inside

_NOMINAL_BLUR_VOX = 0.5  # blur assumed present in the input image, in voxels (Lowe 2004)
_MAX_REFINE_STEPS = 5  # Lowe's maximum number of re-centring steps in the quadratic refinement
_MIN_OCTAVE_SIZE = 6  # an octave grid smaller than this along any axis is not processed
_MIN_SIGMA_VOX = 1.0  # a keypoint's scale must span at least this many voxels of its octave grid on every axis


@dataclass(frozen=True)
class Keypoints:
    """Detected keypoints.

    Attributes:
        points_vox: ``(N, 3)`` float64 sub-voxel locations, 0-based voxel indices ``(i, j, k)`` of the image.
        scales_mm: ``(N,)`` float64 scale of each keypoint in mm: the interpolated DoG level's Gaussian sigma
            at the geometric middle of its pair, ``sigma * sqrt(k)``. A Gaussian blob of standard deviation
            ``s`` mm is detected at about ``s * sqrt(2/3)`` (the scale-normalised Laplacian's optimum in 3-D).
        responses: ``(N,)`` float64 contrast, ``|DoG| / ((k - 1) * range)`` at the refined extremum, i.e.
            the scale-normalised Laplacian magnitude in units of the image's robust intensity range.
        polarity: ``(N,)`` int8, ``+1`` for a bright blob (DoG minimum), ``-1`` for a dark blob (maximum).

    Keypoints are sorted by decreasing response.
    """

    points_vox: np.ndarray
    scales_mm: np.ndarray
    responses: np.ndarray
    polarity: np.ndarray

    def __len__(self) -> int:
        return int(self.points_vox.shape[0])

    def take(self, index: np.ndarray) -> Keypoints:
        """The keypoints selected by ``index`` (an integer index array or a boolean mask of length N)."""
        return Keypoints(self.points_vox[index], self.scales_mm[index], self.responses[index], self.polarity[index])


def detect_keypoints(
    volume: Volume,
    mask: Volume | np.ndarray | None = None,
    *,
    sigma_min_mm: float = 1.6,
    n_octaves: int = 4,
    n_scales: int = 3,
    contrast_threshold: float = 0.05,
    edge_ratio: float = 10.0,
    min_distance_mm: float = 3.0,
    border_mm: float = 5.0,
    max_keypoints: int | None = None,
    crop_margin_mm: float = 10.0,
) -> Keypoints:
    """Detect 3-D DoG scale-space keypoints (bright and dark blobs) in an image.

    Method (Lowe 2004 extended to 3-D as in 3D SIFT-Rank, Chauvin et al. 2020): the image is cropped to the
    mask's bounding box plus ``crop_margin_mm``, blurred to ``sigma_min_mm`` (assuming 0.5 voxel of blur
    already present) and put through ``n_octaves`` octaves of ``n_scales + 4`` Gaussian levels
    (``sigma = sigma_min_mm * 2**(o + s / n_scales)`` mm); each octave after the first is subsampled by 2
    along the axes whose spacing allows it. Candidates are DoG maxima and minima over their 80 neighbours in
    space and scale, searched on DoG levels ``1 .. n_scales + 1`` of each octave: one level more than Lowe's,
    so consecutive octaves overlap by one level (the resampled coarser octave's values differ slightly from
    the finer one's, and an extremum just between them would otherwise be missed by both). Each is refined by
    Newton steps on the quadratic (4-D Taylor) fit of the DoG in (i, j, k, scale), moving to the neighbouring
    sample when the offset exceeds 0.5 (up to 5 times; an optimum beyond the first or last searched level is
    replaced by the quadratic's optimum on that level boundary); then it is rejected if

    - its interpolated response ``|DoG| / ((2**(1/n_scales) - 1) * range)`` is below ``contrast_threshold``
      (``range`` = 0.5 to 99.5 percentile of the intensities inside the mask),
    - its scale is below one voxel of the grid it was found on along some axis (a blob thinner than a thick
      slice cannot be localised across slices),
    - its 3x3 spatial Hessian (in mm units) is not definite with the sign of the extremum, or its
      eigenvalue ratio ``max |lambda| / min |lambda|`` exceeds ``edge_ratio`` (edges, sheets and tubes: the
      3-D form of Lowe's curvature-ratio test),
    - it lies outside the mask or closer than ``border_mm`` to the centre of the nearest voxel outside it
      (voxels beyond the image's edge count as outside; without a mask, the whole image is the mask).

    Finally, keypoints closer than ``min_distance_mm`` (world distance) to a stronger one are removed and
    at most ``max_keypoints`` of the strongest are kept.

    Args:
        volume: the image (intensity); any orientation and voxel size.
        mask: optional region (nonzero = inside: :func:`brainshift.volume.mask_inside`), as a Volume (resampled
            to the image grid with nearest neighbour if its grid differs) or an ``(I, J, K)`` array.
        sigma_min_mm: sigma in mm of the first pyramid level.
        n_octaves: number of octaves (each doubles sigma).
        n_scales: DoG levels searched per octave (Lowe's ``s``).
        contrast_threshold: minimum response (see above); Lowe's 0.03 on a [0, 1] image with ``s = 3``
            corresponds to about 0.12 here.
        edge_ratio: maximum ratio of the largest to the smallest absolute Hessian eigenvalue (>= 1).
        min_distance_mm: duplicate radius in mm.
        border_mm: minimum distance in mm from the mask boundary.
        max_keypoints: keep at most this many (strongest first); ``None`` keeps all.
        crop_margin_mm: margin in mm kept around the mask's bounding box before filtering.

    Returns:
        :class:`Keypoints` sorted by decreasing response, points in 0-based voxel indices of ``volume``.

    Raises:
        GeometryError: mask shape differs from the image, an empty mask or one with negative or non-finite
            values, or non-finite intensities.
        BrainshiftError: a parameter out of range.
    """
    import scipy.ndimage as ndi

    _check_parameters(sigma_min_mm, n_octaves, n_scales, contrast_threshold, edge_ratio, min_distance_mm,
                      border_mm, max_keypoints, crop_margin_mm)
    image = np.asarray(volume.data, dtype=np.float32)
    if not np.all(np.isfinite(image)):
        raise GeometryError("expected an image with finite intensities, found NaN or inf values")
    spacing = volume.spacing
    inside = _mask_array(volume, mask)

    lo, hi = _crop_box(inside, spacing, crop_margin_mm)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    img = np.ascontiguousarray(image[crop])
    inside_c = inside[crop]
    values = img[inside_c]
    intensity_range = float(np.percentile(values, 99.5) - np.percentile(values, 0.5)) if values.size else 0.0
    if not np.isfinite(intensity_range) or intensity_range <= 0:
        return _empty()

    k = 2.0 ** (1.0 / n_scales)
    dog_unit = (k - 1.0) * intensity_range  # DoG value of response 1
    threshold = contrast_threshold * dog_unit

    # base level: blur from the nominal 0.5 voxel to sigma_min_mm along each axis
    base_sigma_vox = np.sqrt(np.maximum(sigma_min_mm**2 - (_NOMINAL_BLUR_VOX * spacing) ** 2, 0.0)) / spacing
    g = ndi.gaussian_filter(img, base_sigma_vox, mode="nearest", truncate=3.0)

    found: list[np.ndarray] = []  # rows: i, j, k (cropped grid), scale_mm, response, polarity
    octave_spacing = spacing.copy()
    stride = np.ones(3)
    step_mm = float(spacing.min())  # sampling step of this octave in mm (Lowe: doubles per octave)
    for octave in range(n_octaves):
        if min(g.shape) < _MIN_OCTAVE_SIZE:
            break
        sigma0 = sigma_min_mm * 2.0**octave
        dog = np.empty((n_scales + 3, *g.shape), dtype=np.float32)
        previous, next_base = g, g
        for s in range(1, n_scales + 4):  # Gaussian levels sigma0 * k**s, blurred incrementally
            inc_mm = sigma0 * np.sqrt(k ** (2 * s) - k ** (2 * (s - 1)))
            current = ndi.gaussian_filter(previous, inc_mm / octave_spacing, mode="nearest", truncate=3.0)
            np.subtract(current, previous, out=dog[s - 1])
            if s == n_scales:
                next_base = current  # twice the octave's base sigma
            previous = current
        del previous, current
        rows = _octave_keypoints(dog, threshold, edge_ratio, octave_spacing, n_scales, sigma0, k)
        if rows.size:
            rows[:, :3] *= stride  # octave grid -> cropped full-resolution grid (subsampling starts at 0)
            rows[:, 4] /= dog_unit
            found.append(rows)
        # next octave: the level with twice the base sigma, subsampled by 2 where the spacing allows it
        step_mm *= 2.0
        factor = np.where(octave_spacing * 2.0 <= step_mm * (1 + 1e-6), 2, 1)
        g = np.ascontiguousarray(next_base[:: factor[0], :: factor[1], :: factor[2]])
        octave_spacing = octave_spacing * factor
        stride = stride * factor
        del next_base, dog

    if not found:
        return _empty()
    rows = np.concatenate(found)
    rows = rows[_inside_and_away(rows[:, :3], inside_c, spacing, border_mm)]  # the crop holds the whole mask
    rows[:, :3] += lo
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0], -rows[:, 4]))  # strongest first, ties by position
    rows = rows[order]
    rows = rows[_suppress_duplicates(rows[:, :3], volume.affine, min_distance_mm)]
    if max_keypoints is not None:
        rows = rows[:max_keypoints]
    return Keypoints(
        points_vox=rows[:, :3].astype(np.float64),
        scales_mm=rows[:, 3].astype(np.float64),
        responses=rows[:, 4].astype(np.float64),
        polarity=rows[:, 5].astype(np.int8),
    )


def _octave_keypoints(dog, threshold, edge_ratio, spacing, n_scales, sigma0, k) -> np.ndarray:
    """Refined, contrast- and edge-filtered extrema of one octave's DoG stack ``(n_scales + 3, I, J, K)``.

    Returns ``(M, 6)`` rows ``i, j, k`` (octave grid), ``scale_mm``, ``|DoG|`` (raw units), polarity.
    """

    cand = _extrema(dog, 0.5 * threshold)  # Lowe's pre-threshold (half the final one) before interpolation
    if cand.size == 0:
        return np.zeros((0, 6))

    upper = np.array(dog.shape) - 2  # last valid centre per axis (level, i, j, k)
    pos = cand.copy()
    converged = np.zeros(len(pos), dtype=bool)
    offset = np.zeros((len(pos), 4))
    grad = np.zeros((len(pos), 4))
    hess = np.zeros((len(pos), 4, 4))
    alive = np.ones(len(pos), dtype=bool)
    for _ in range(_MAX_REFINE_STEPS):
        idx = np.flatnonzero(alive & ~converged)
        if idx.size == 0:
            break
        g_, h_ = _derivatives(dog, pos[idx])
        det = np.linalg.det(h_)
        ok = np.abs(det) > 1e-12 * np.maximum(np.abs(h_).max(axis=(1, 2)) ** 4, 1e-30)
        off = np.zeros((idx.size, 4))
        off[ok] = -np.linalg.solve(h_[ok], g_[ok][..., None])[..., 0]
        alive[idx[~ok]] = False
        # an optimum beyond the first / last searched level of this octave: take the optimum of the quadratic
        # on that boundary (scale offset -0.5 / +0.5, space re-solved); otherwise a blob whose scale falls
        # between two octaves' searched levels would be lost by both
        level = pos[idx, 0]
        edge = ok & (((level == 1) & (off[:, 0] < -0.5)) | ((level == upper[0]) & (off[:, 0] > 0.5)))
        if edge.any():
            off[edge] = _boundary_offset(g_[edge], h_[edge], np.clip(off[edge, 0], -0.5, 0.5))
        done = ok & np.all(np.abs(off) <= 0.5, axis=1)
        converged[idx[done]] = True
        offset[idx[done]], grad[idx[done]], hess[idx[done]] = off[done], g_[done], h_[done]
        move = idx[ok & ~done]
        step = np.round(_offset_clip(off[ok & ~done])).astype(int)
        step[edge[ok & ~done], 0] = 0
        new = pos[move] + step
        out = np.any((new < 1) | (new > upper), axis=1)
        alive[move[out]] = False
        pos[move[~out]] = new[~out]
    keep = np.flatnonzero(alive & converged)
    keep = keep[np.sort(np.unique(pos[keep], axis=0, return_index=True)[1])]  # several may converge to one sample
    pos, offset, grad, hess = pos[keep], offset[keep], grad[keep], hess[keep]
    if pos.shape[0] == 0:
        return np.zeros((0, 6))

    # value of the quadratic model at the offset (= D + g.o / 2 at an unconstrained optimum)
    value = (dog[tuple(pos.T)] + np.einsum("ni,ni->n", grad, offset)
             + 0.5 * np.einsum("ni,nij,nj->n", offset, hess, offset))
    polarity = np.where(value < 0, 1, -1)  # DoG < 0 at the centre of a bright blob
    strong = np.abs(value) >= threshold

    # edge / tube / sheet rejection: spatial Hessian in mm units must be definite with a bounded ratio
    h_mm = hess[:, 1:, 1:] / np.outer(spacing, spacing)
    eig = np.linalg.eigvalsh(h_mm)  # ascending
    signed = eig * polarity[:, None]  # bright blob (DoG minimum): all eigenvalues > 0
    definite = np.all(signed > 0, axis=1)
    ratio = np.abs(eig).max(axis=1) / np.maximum(np.abs(eig).min(axis=1), 1e-30)
    scale_mm = sigma0 * k ** (pos[:, 0] + offset[:, 0] + 0.5)  # geometric middle of the DoG level's pair
    # the scale must be sampled along every axis of this octave's grid (thick slices: no sub-slice blobs)
    resolved = scale_mm >= _MIN_SIGMA_VOX * spacing.max() * (1 - 1e-9)
    good = strong & definite & (ratio <= edge_ratio) & resolved
    ijk = pos[good, 1:] + offset[good, 1:]
    return np.column_stack([ijk, scale_mm[good], np.abs(value[good]), polarity[good]]).astype(np.float64)


def _extrema(dog: np.ndarray, prelim: float) -> np.ndarray:
    """``(N, 4)`` integer positions ``(level, i, j, k)`` of DoG extrema over their 80 neighbours in space and scale.

    Only the inner levels and inner voxels are searched; an extremum is ``>=`` (maxima) or ``<=`` (minima) all
    its neighbours with ``|D| > prelim``. Done in two stages to save work: a spatial 3x3x3 maximum / minimum
    filter on the inner levels (``scipy.ndimage``, separable), then the 54 neighbours in the adjacent levels
    are gathered only at those candidates.
    """
    import scipy.ndimage as ndi

    core = dog[1:-1]
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    found = []
    for sign, filt in ((1.0, ndi.maximum_filter), (-1.0, ndi.minimum_filter)):
        local = filt(core, size=(1, 3, 3, 3), mode="nearest")
        hit = (core[inner] == local[inner]) & (sign * core[inner] > prelim)
        del local
        cand = np.argwhere(hit) + np.array([1, 1, 1, 1])  # level and voxel indices in the full stack
        if cand.size == 0:
            continue
        value = sign * dog[tuple(cand.T)]
        ok = np.ones(len(cand), dtype=bool)
        for dl in (-1, 1):
            for offset in np.ndindex(3, 3, 3):
                p = cand + np.array([dl, *offset]) - np.array([0, 1, 1, 1])
                ok &= sign * dog[p[:, 0], p[:, 1], p[:, 2], p[:, 3]] <= value
        found.append(cand[ok])
    if not found:
        return np.zeros((0, 4), dtype=int)
    cand = np.concatenate(found)
    return cand[np.lexsort(cand.T[::-1])]


def _boundary_offset(grad: np.ndarray, hess: np.ndarray, scale_offset: np.ndarray) -> np.ndarray:
    """Optimum ``(N, 4)`` of the quadratic model with the scale offset fixed to ``scale_offset`` ``(N,)``."""
    rhs = grad[:, 1:] + hess[:, 1:, 0] * scale_offset[:, None]
    hs = hess[:, 1:, 1:]
    ok = np.abs(np.linalg.det(hs)) > 1e-12 * np.maximum(np.abs(hs).max(axis=(1, 2)) ** 3, 1e-30)
    spatial = np.full((grad.shape[0], 3), np.inf)  # a singular spatial Hessian: never converges, dropped
    spatial[ok] = -np.linalg.solve(hs[ok], rhs[ok][..., None])[..., 0]
    return np.column_stack([scale_offset, spatial])


def _offset_clip(offset: np.ndarray) -> np.ndarray:
    """Clip a Newton offset to one voxel per step (Lowe moves to the neighbouring sample)."""
    return np.clip(offset, -1.0, 1.0)


def _derivatives(dog: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central-difference gradient ``(N, 4)`` and Hessian ``(N, 4, 4)`` of the DoG stack at integer ``pos``."""
    n = pos.shape[0]
    eye = np.eye(4, dtype=int)

    def at(delta: np.ndarray) -> np.ndarray:
        p = pos + delta
        return dog[p[:, 0], p[:, 1], p[:, 2], p[:, 3]].astype(np.float64)

    centre = at(np.zeros(4, dtype=int))
    grad = np.empty((n, 4))
    hess = np.empty((n, 4, 4))
    plus = [at(eye[a]) for a in range(4)]
    minus = [at(-eye[a]) for a in range(4)]
    for a in range(4):
        grad[:, a] = 0.5 * (plus[a] - minus[a])
        hess[:, a, a] = plus[a] - 2.0 * centre + minus[a]
        for b in range(a + 1, 4):
            v = 0.25 * (at(eye[a] + eye[b]) - at(eye[a] - eye[b]) - at(eye[b] - eye[a]) + at(-eye[a] - eye[b]))
            hess[:, a, b] = hess[:, b, a] = v
    return grad, hess


def _inside_and_away(points: np.ndarray, inside: np.ndarray, spacing: np.ndarray, border_mm: float) -> np.ndarray:
    """Boolean ``(N,)``: the point's nearest voxel is in the mask and at least ``border_mm`` from its boundary.

    The distance (mm, axis-aligned voxel metric) is to the nearest voxel outside the mask that touches it
    (6-connectivity); voxels beyond the image edge count as outside.
    """
    import scipy.ndimage as ndi
    from scipy.spatial import cKDTree

    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    nearest = np.clip(np.rint(points).astype(int), 0, np.array(inside.shape) - 1)
    in_mask = inside[tuple(nearest.T)]
    if border_mm <= 0:
        return in_mask
    padded = np.pad(inside, 1, constant_values=False)
    shell = ndi.binary_dilation(padded) & ~padded
    shell_vox = np.argwhere(shell).astype(np.float64) - 1.0
    dist, _ = cKDTree(shell_vox * spacing).query(points * spacing, k=1)
    return in_mask & (dist >= border_mm)


def _suppress_duplicates(points: np.ndarray, affine: np.ndarray, radius_mm: float) -> np.ndarray:
    """Indices of the points kept by greedy suppression (points sorted strongest first) within ``radius_mm``."""
    from scipy.spatial import cKDTree

    n = points.shape[0]
    if n == 0 or radius_mm <= 0:
        return np.arange(n)
    world = points @ affine[:3, :3].T
    tree = cKDTree(world)
    suppressed = np.zeros(n, dtype=bool)
    kept = []
    for i, neighbours in enumerate(tree.query_ball_point(world, r=radius_mm)):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed[neighbours] = True
    return np.asarray(kept, dtype=int)


def _mask_array(volume: Volume, mask: Volume | np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.ones(volume.shape, dtype=bool)
    resampled = False
    if isinstance(mask, Volume):
        inside = mask_inside(mask)  # nonzero = inside, on the mask's own grid
        if not mask.same_grid(volume):
            if not inside.any():
                raise GeometryError("expected a mask with at least one voxel inside, got an empty mask")
            inside = Volume(inside.astype(np.uint8), mask.affine, "label").resample_like(volume).data != 0
            resampled = True
    else:
        if np.shape(mask) != volume.shape:
            raise GeometryError(f"expected a mask on the image grid {volume.shape}, got shape {np.shape(mask)}")
        inside = mask_inside(mask)
    if not inside.any():
        if resampled:  # not empty on its own grid: it lies elsewhere in world space
            raise GeometryError("expected a mask that overlaps the image in world space, got one whose voxels all "
                                "fall outside the image's grid once resampled onto it (a mask of another image?)")
        raise GeometryError("expected a mask with at least one voxel inside, got an empty mask")
    return inside


def _crop_box(inside: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(inside)
    margin = np.ceil(margin_mm / spacing).astype(int)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, np.array(inside.shape))
    return lo, hi


def _check_parameters(sigma_min_mm, n_octaves, n_scales, contrast_threshold, edge_ratio, min_distance_mm,
                      border_mm, max_keypoints, crop_margin_mm) -> None:
    from brainshift.errors import BrainshiftError

    checks = [
        (sigma_min_mm > 0, "sigma_min_mm > 0", sigma_min_mm),
        (int(n_octaves) == n_octaves and n_octaves >= 1, "n_octaves a positive integer", n_octaves),
        (int(n_scales) == n_scales and n_scales >= 1, "n_scales a positive integer", n_scales),
        (contrast_threshold >= 0, "contrast_threshold >= 0", contrast_threshold),
        (edge_ratio >= 1, "edge_ratio >= 1", edge_ratio),
        (min_distance_mm >= 0, "min_distance_mm >= 0", min_distance_mm),
        (border_mm >= 0, "border_mm >= 0", border_mm),
        (max_keypoints is None or (int(max_keypoints) == max_keypoints and max_keypoints >= 1),
         "max_keypoints None or a positive integer", max_keypoints),
        (crop_margin_mm >= 0, "crop_margin_mm >= 0", crop_margin_mm),
    ]
    for ok, expected, got in checks:
        if not ok:
            raise BrainshiftError(f"expected {expected}, got {got!r}")


def _empty() -> Keypoints:
    return Keypoints(np.zeros((0, 3)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int8))
