"""Image registration by keypoints: a preop and an intraop image in, a dense brain-shift field out.

:func:`register` is what ``brainshift register`` calls. It reads and writes no file. Steps (each timed in
``RegisterResult.timings_s``):

1. ``brain mask``: the given mask, else :func:`brain_mask` of the preop image (Otsu threshold, largest
   connected component, holes filled; see there).
2. ``detect keypoints``: 3-D DoG keypoints (:func:`brainshift.keypoints.detect.detect_keypoints`) in the preop
   image inside the brain mask, and in the intraop image inside the preop mask carried to the intraop grid
   through world coordinates and dilated by ``intraop_margin_mm`` (tissue moves; the intraop image may have
   another grid, spacing, orientation and field of view).
3. ``describe keypoints``: 3D SIFT-Rank-style descriptors in world RAS axes
   (:func:`brainshift.keypoints.describe.describe_keypoints`; no rotation invariance: brain shift rotates
   tissue little and the descriptors of both images share the world axes).
4. ``match keypoints``: mutual nearest neighbours with a ratio test among pairs within
   ``max_displacement_mm`` in world mm (:func:`brainshift.keypoints.match.match_keypoints`), then geometric
   outlier rejection against a local affine fit of the neighbours' displacements
   (:func:`brainshift.keypoints.match.reject_outliers`).
5. The inliers become a keypoint table in the **preop voxel frame**: the preop keypoint ``p`` (0-based
   ``i, j, k`` of the preop grid) and ``d = A_pre^-1 A_intra q - p`` with ``q`` the matched intraop keypoint
   (voxel indices of the intraop grid), i.e. the intraop point mapped into preop voxel coordinates minus the
   preop point; then :func:`brainshift.compensate.compensate` (interpolation, and refinement under the
   safeguards when a model is given). With ``method="tps"`` and at least :data:`MIN_MATCHES_LAM_CV` matches,
   the spline's ridge ``lam`` is chosen by 5-fold cross-validation over the matches
   (:func:`brainshift.interpolate.tps.choose_tps_lam`; the published 0.1 fits the matches' localisation
   noise; chosen on validation cases, bench/RESULTS.md, session 9), unless ``interp_options`` gives one.

Convention: every field is float32 ``(3, I, J, K)`` on the preop grid, forward Lagrangian (the preop point at
voxel ``p`` moves to ``p + u(p)`` intraoperatively), components in voxel units along ``i, j, k``.

Sources: Toews & Wells, MedIA 2013 and Chauvin et al., NeuroImage 2020 (3D SIFT-Rank features for brain shift);
Lowe, IJCV 2004 (ratio test).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, KeypointError
from brainshift.interpolate.tps import MIN_KEYPOINTS_LAM_CV
from brainshift.volume import Volume, mask_inside

#: Interpolators of the matches. Not ``gp``: its fit and evaluation grow with the number of keypoints (hundreds to
#: thousands of matches here; its evaluation step shrinks with the short kernel lengths they allow).
METHODS = ("linear", "tps", "tps3d")

if TYPE_CHECKING:
    from brainshift.compensate import Result
    from brainshift.model.checkpoint import LoadedModel

#: Fewest inlier matches :func:`register` interpolates (a 3-D affine needs 4 points in general position).
MIN_MATCHES = 4
#: With at least this many inlier matches and ``method="tps"`` (and no ``lam`` given), the spline's ridge is
#: chosen by 5-fold cross-validation over the matches (:func:`brainshift.interpolate.tps.choose_tps_lam`).
MIN_MATCHES_LAM_CV = MIN_KEYPOINTS_LAM_CV


class RegistrationError(KeypointError):
    """Image registration found too few reliable keypoint matches."""


@dataclass
class RegisterResult:
    """What :func:`register` returns.

    Attributes:
        compensation: the :class:`brainshift.compensate.Result` (``initial_field``, ``refined_field``,
            ``uncertainty``, statistics, the interpolation and refinement timings).
        points_vox: ``(M, 3)`` float64 inlier preop keypoints, 0-based voxel indices of the preop grid.
        disps_vox: ``(M, 3)`` float64 their displacements, preop voxel units (the keypoint table's dx, dy, dz).
        scores: per-inlier ``(M,)`` arrays: ``descriptor_distance``, ``ratio`` (Lowe's), ``residual_mm``
            (distance to the displacement its inlier neighbours predict, the local model of the outlier
            rejection: :func:`brainshift.keypoints.match.local_residuals_mm`), ``scale_mm`` (preop keypoint).
        intraop_points_vox: ``(M, 3)`` the matched intraop keypoints, voxel indices of the intraop grid.
        mask: ``(I, J, K)`` bool brain mask of the preop image that was used.
        counts: ``keypoints_preop``, ``keypoints_intraop``, ``candidate_pairs`` (pairs within the maximum
            displacement), ``candidate_matches`` (after mutual nearest neighbours and the ratio test),
            ``inliers``, ``inlier_ratio`` (inliers / candidate matches).
        timings_s: seconds per step (module docstring), including those of ``compensation``.
        interp_options: the interpolator options used (with ``lam`` when it was chosen by cross-validation).
        lam_cv_rmse_mm: ``{lam: RMS held-out match error (mm)}`` of that cross-validation (empty if none ran).

    Convention: the fields of ``compensation`` are forward Lagrangian, voxel units along ``i, j, k`` of the
    preop grid.
    """

    compensation: Result
    points_vox: np.ndarray
    disps_vox: np.ndarray
    scores: dict[str, np.ndarray]
    intraop_points_vox: np.ndarray
    mask: np.ndarray
    counts: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    interp_options: dict = field(default_factory=dict)
    lam_cv_rmse_mm: dict[float, float] = field(default_factory=dict)

    @property
    def field(self) -> np.ndarray:
        """The final field (refined when a model was given)."""
        return self.compensation.field


def brain_mask(image: Volume, *, closing_mm: float = 3.0) -> np.ndarray:
    """Brain (head foreground) mask of a T1-like image: Otsu threshold, largest component, holes filled.

    Method: the intensities above the image minimum are thresholded at Otsu's value
    (``skimage.filters.threshold_otsu``, computed on the non-background voxels so a large empty field of view
    does not bias it); the largest 6-connected component is kept (``scipy.ndimage.label``), closed with a ball
    of ``closing_mm`` and its holes filled (``scipy.ndimage.binary_fill_holes``), so dark ventricles, CSF and a
    fluid-filled cavity inside the brain belong to it. On a skull-stripped image (MNI152 brain, the simulated
    subjects) this is the brain; on a whole-head image it also holds scalp and skull, which only adds keypoints
    that the outlier rejection and the maximum displacement judge like any other: pass a real brain mask
    (``--mask``) when one exists.

    Args:
        image: intensity Volume.
        closing_mm: radius (mm) of the morphological closing.

    Returns:
        ``(I, J, K)`` bool mask on the image grid.

    Raises:
        GeometryError: a constant image, or an empty mask.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    data = np.asarray(image.data, dtype=np.float32)
    fg = data > data.min()
    if not fg.any():
        raise GeometryError("expected an image with contrast for the brain mask, got a constant image")
    thr = threshold_otsu(data[fg])
    m = data > thr
    labels, n = ndimage.label(m)
    if n == 0:
        raise GeometryError(f"expected voxels above the Otsu threshold {thr:.4g}, got none")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    m = labels == int(np.argmax(sizes))
    radius = np.maximum(np.round(closing_mm / image.spacing).astype(int), 0)
    if radius.max() > 0:
        ball = _ellipsoid(radius)
        m = ndimage.binary_closing(np.pad(m, radius[:, None]), structure=ball)[
            radius[0] : radius[0] + m.shape[0], radius[1] : radius[1] + m.shape[1], radius[2] : radius[2] + m.shape[2]]
    return ndimage.binary_fill_holes(m)


def _ellipsoid(radius_vox: np.ndarray) -> np.ndarray:
    """Boolean ellipsoid structuring element of semi-axes ``radius_vox`` (voxels along i, j, k)."""
    r = np.maximum(radius_vox, 0)
    g = np.meshgrid(*[np.arange(-x, x + 1) for x in r], indexing="ij")
    return sum((gi / max(ri, 1)) ** 2 for gi, ri in zip(g, r, strict=True)) <= 1.0


def _to_world(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return points_vox @ affine[:3, :3].T + affine[:3, 3]


def _intraop_region(preop_mask: np.ndarray, preop: Volume, intraop: Volume, margin_mm: float) -> np.ndarray:
    """The preop mask on the intraop grid (world coordinates, nearest neighbour), dilated by ``margin_mm``."""
    from scipy import ndimage

    carried = Volume(preop_mask.astype(np.uint8), preop.affine, "label").resample_to_grid(
        intraop.shape, intraop.affine).data > 0
    radius = np.round(margin_mm / intraop.spacing).astype(int)
    if carried.any() and radius.max() > 0:
        carried = ndimage.binary_dilation(carried, structure=_ellipsoid(radius))
    return carried


def _check_inputs(preop: Volume, intraop: Volume, mask) -> np.ndarray:
    """Validate the images and the mask; return the mask as a bool array on the preop grid."""
    for name, v in (("preop", preop), ("intraop", intraop)):
        if not isinstance(v, Volume):
            raise GeometryError(f"expected the {name} image as a 3-D Volume, got {type(v).__name__}")
        if not np.all(np.isfinite(v.data)):
            raise GeometryError(f"expected finite intensities in the {name} image, got NaN or inf")
    if mask is None:
        return brain_mask(preop)
    resampled = False
    if isinstance(mask, Volume):
        m = mask_inside(mask, "brain mask")  # nonzero = inside, on the mask's own grid
        if not mask.same_grid(preop):
            resampled = bool(m.any())
            m = Volume(m.astype(np.uint8), mask.affine, "label").resample_like(preop).data != 0
    else:
        if np.shape(mask) != preop.shape:
            raise GeometryError(f"expected a brain mask on the preop grid {preop.shape}, got shape {np.shape(mask)}")
        m = mask_inside(mask, "brain mask")
    if not m.any():
        if resampled:  # not empty on its own grid: it lies elsewhere in world space
            raise GeometryError("expected a brain mask that overlaps the preop image in world space, got one whose "
                                "voxels all fall outside the preop grid once resampled onto it (a mask of another "
                                "image?)")
        raise GeometryError("expected a non-empty brain mask, got no voxel inside")
    return m


@dataclass
class MatchTable:
    """Inlier matches of two keypoint sets as a keypoint table in the frame of set A (:func:`match_features`).

    Attributes:
        points_vox: ``(M, 3)`` float64 A's keypoints, 0-based voxel indices of A's grid.
        disps_vox: ``(M, 3)`` float64 displacements in A's voxel units: B's keypoint mapped into A's voxel
            coordinates through world space, minus A's keypoint.
        intraop_points_vox: ``(M, 3)`` B's matched keypoints, voxel indices of B's grid.
        index_a, index_b: ``(M,)`` indices of the matches in A's and B's keypoint sets.
        scores: per-match ``(M,)`` arrays ``descriptor_distance``, ``ratio``, ``residual_mm``.
        counts: ``candidate_pairs``, ``candidate_matches``, ``inliers``, ``inlier_ratio``, ``interpolated``
            (the M kept).
    """

    points_vox: np.ndarray
    disps_vox: np.ndarray
    intraop_points_vox: np.ndarray
    index_a: np.ndarray
    index_b: np.ndarray
    scores: dict[str, np.ndarray]
    counts: dict[str, float]


def match_features(points_a_vox: np.ndarray, desc_a: np.ndarray, affine_a: np.ndarray, points_b_vox: np.ndarray,
                   desc_b: np.ndarray, affine_b: np.ndarray, *, ratio: float = 0.9, max_displacement_mm: float = 30.0,
                   max_matches: int | None = None, reject_options: dict | None = None) -> MatchTable:
    """Match two described keypoint sets through world coordinates and keep the geometrically consistent ones.

    The step of :func:`register` after description, usable on its own (e.g. on two featExtract ``.key`` files
    read by :func:`brainshift.io.keypoints.read_sift_key_features`; ``brainshift match``): positions go to world
    RAS mm through each grid's affine, :func:`~brainshift.keypoints.match.match_keypoints` pairs them (mutual
    nearest neighbours, ratio test, ``max_displacement_mm``), :func:`~brainshift.keypoints.match.reject_outliers`
    removes displacements inconsistent with their neighbours', and the inliers (at most ``max_matches``, smallest
    descriptor distance first) are expressed in A's voxel frame.

    Args:
        points_a_vox, points_b_vox: ``(N_a, 3)``, ``(N_b, 3)`` 0-based voxel indices of each image's grid.
        desc_a, desc_b: ``(N_a, D)``, ``(N_b, D)`` descriptors.
        affine_a, affine_b: 4x4 voxel-to-RAS mm affines of the two grids.
        ratio, max_displacement_mm: see :func:`~brainshift.keypoints.match.match_keypoints`.
        max_matches: keep at most this many inliers; None keeps all.
        reject_options: keyword options of :func:`~brainshift.keypoints.match.reject_outliers`.

    Returns:
        :class:`MatchTable` (possibly empty: the caller decides how many matches it needs).

    Raises:
        KeypointError: malformed points or descriptors. BrainshiftError: invalid options.
    """
    from brainshift.keypoints.match import local_residuals_mm, match_keypoints, reject_outliers

    a_aff, b_aff = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    pa_vox, pb_vox = np.asarray(points_a_vox, dtype=np.float64), np.asarray(points_b_vox, dtype=np.float64)
    for name, pts in (("A", pa_vox), ("B", pb_vox)):
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise KeypointError(f"expected keypoints of set {name} of shape (N, 3), got {pts.shape}")
    pa_mm, pb_mm = _to_world(pa_vox, a_aff), _to_world(pb_vox, b_aff)
    matches = match_keypoints(desc_a, pa_mm, desc_b, pb_mm, ratio=ratio, max_displacement_mm=max_displacement_mm)
    p_mm = pa_mm[matches.index_a]
    d_mm = pb_mm[matches.index_b] - p_mm
    inlier = reject_outliers(p_mm, d_mm, **(reject_options or {})) if len(matches) else np.zeros(0, bool)
    residual = local_residuals_mm(p_mm, d_mm, inlier, **_residual_options(reject_options))
    sel = np.nonzero(inlier)[0]  # matches are sorted by descriptor distance: the first are the most distinctive
    if max_matches is not None and len(sel) > int(max_matches):
        sel = sel[: int(max_matches)]
    m = matches.take(sel)
    points_vox = pa_vox[m.index_a]
    q_a_vox = (pb_mm[m.index_b] - a_aff[:3, 3]) @ np.linalg.inv(a_aff[:3, :3]).T  # B's point in A's voxel frame
    counts = {"candidate_pairs": int(matches.n_candidates), "candidate_matches": len(matches),
              "inliers": int(inlier.sum()),
              "inlier_ratio": round(float(inlier.mean()), 4) if len(matches) else 0.0, "interpolated": int(len(sel))}
    return MatchTable(points_vox=points_vox, disps_vox=q_a_vox - points_vox, intraop_points_vox=pb_vox[m.index_b],
                      index_a=m.index_a, index_b=m.index_b,
                      scores={"descriptor_distance": m.distance, "ratio": m.ratio, "residual_mm": residual[sel]},
                      counts=counts)


def register(
    preop: Volume,
    intraop: Volume,
    *,
    mask: Volume | np.ndarray | None = None,
    method: str = "tps",
    model: LoadedModel | Future | None = None,
    device: str = "cpu",
    safeguards: bool = True,
    interp_options: dict | None = None,
    statistics: bool = True,
    max_displacement_mm: float = 30.0,
    ratio: float = 0.9,
    intraop_margin_mm: float = 5.0,
    max_matches: int | None = 2000,
    detect_options: dict | None = None,
    reject_options: dict | None = None,
) -> RegisterResult:
    """Register a preop to an intraop image by matched keypoints and compensate brain shift (module docstring).

    Args:
        preop: preop intensity Volume; defines the output grid.
        intraop: intraop intensity Volume on any grid (spacing, orientation, field of view) overlapping the
            preop in world (RAS mm) space.
        mask: brain mask on the preop grid (Volume, resampled if on another grid, or ``(I, J, K)`` array;
            nonzero = inside, :func:`brainshift.volume.mask_inside`); default :func:`brain_mask` of the preop.
            Keypoints are searched inside it, and the network uses it.
        method: interpolator (``linear``, ``tps``, ``tps3d``; any case).
        model: network weights (:func:`brainshift.model.checkpoint.load_weights`) or a Future of them; None: no
            refinement.
        device: torch device of the network.
        safeguards: refine under the safeguards (:func:`brainshift.compensate.compensate`).
        interp_options: interpolator keyword options.
        statistics: compute field statistics over the brain mask.
        max_displacement_mm: largest plausible brain shift between matched keypoints (world mm).
        ratio: Lowe's ratio of the matching (``1`` disables it).
        intraop_margin_mm: dilation (mm) of the preop mask carried to the intraop grid, where intraop
            keypoints are searched.
        max_matches: interpolate at most this many inliers (the most distinctive: smallest descriptor
            distance); None keeps all.
        detect_options: keyword options of :func:`~brainshift.keypoints.detect.detect_keypoints` (both images).
        reject_options: keyword options of :func:`~brainshift.keypoints.match.reject_outliers`.

    Returns:
        :class:`RegisterResult`.

    Raises:
        GeometryError: non-finite images, a mask not on the preop grid, empty, or with negative or non-finite
            values, images that do not overlap in world space.
        RegistrationError: fewer than :data:`MIN_MATCHES` inlier matches ("found N inlier matches, need at
            least 4").
        KeypointError, BrainshiftError: invalid options (an unknown method, a model that is no LoadedModel nor a
            Future of one), or inlier keypoints unusable by the interpolator
            (e.g. coplanar).

    Convention: the fields of the result are forward Lagrangian, voxel units along ``i, j, k`` of the preop grid.
    """
    from brainshift.compensate import check_model, compensate
    from brainshift.keypoints.describe import describe_keypoints
    from brainshift.keypoints.detect import detect_keypoints

    check_model(model)  # before the detection: a path or a name failed only in the refinement
    method = method.strip().lower() if isinstance(method, str) else method  # "TPS" skipped the ridge's choice
    if method not in METHODS:  # before the detection, not after it
        raise BrainshiftError(f"expected method one of {list(METHODS)}, got {method!r}")
    if max_matches is not None and (isinstance(max_matches, bool) or int(max_matches) < MIN_MATCHES):
        raise BrainshiftError(f"expected max_matches >= {MIN_MATCHES} or None, got {max_matches!r}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    m_pre = _check_inputs(preop, intraop, mask)
    region_intra = _intraop_region(m_pre, preop, intraop, intraop_margin_mm)
    if not region_intra.any():
        lo, hi = _world_box(preop, m_pre), _world_box(intraop, np.ones(intraop.shape, bool))
        raise GeometryError(f"expected images that overlap in world space, got a preop brain in RAS mm "
                            f"{_fmt_box(lo)} and an intraop field of view {_fmt_box(hi)}")
    timings["brain mask"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    opts = dict(detect_options or {})
    kp_pre = detect_keypoints(preop, m_pre, **opts)
    kp_intra = detect_keypoints(intraop, region_intra, **opts)
    timings["detect keypoints"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    desc_pre = describe_keypoints(preop, kp_pre.points_vox, kp_pre.scales_mm)
    desc_intra = describe_keypoints(intraop, kp_intra.points_vox, kp_intra.scales_mm)
    timings["describe keypoints"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = match_features(kp_pre.points_vox, desc_pre, preop.affine, kp_intra.points_vox, desc_intra,
                           intraop.affine, ratio=ratio, max_displacement_mm=max_displacement_mm,
                           max_matches=max_matches, reject_options=reject_options)
    timings["match keypoints"] = time.perf_counter() - t0
    counts = {"keypoints_preop": len(kp_pre), "keypoints_intraop": len(kp_intra), **table.counts}
    if counts["inliers"] < MIN_MATCHES:
        raise RegistrationError(
            f"found {counts['inliers']} inlier matches, need at least {MIN_MATCHES} (keypoints: {len(kp_pre)} "
            f"preop, {len(kp_intra)} intraop; {counts['candidate_matches']} candidate matches): expected images of "
            f"the same anatomy within {max_displacement_mm:g} mm")
    scores = {**table.scores, "scale_mm": kp_pre.scales_mm[table.index_a]}
    points_vox, disps_vox = table.points_vox, table.disps_vox

    interp = dict(interp_options or {})
    lam_rmse: dict[float, float] = {}
    if method == "tps" and "lam" not in interp and len(points_vox) >= MIN_MATCHES_LAM_CV:
        from brainshift.interpolate.tps import choose_tps_lam

        t0 = time.perf_counter()
        interp["lam"], lam_rmse = choose_tps_lam(points_vox, disps_vox, preop.shape, preop.affine)
        timings["choose the spline's ridge"] = time.perf_counter() - t0
    result = compensate(preop, keypoints=(points_vox, disps_vox), method=method, model=model, mask=m_pre,
                        device=device, interp_options=interp or None, statistics=statistics,
                        statistics_mask=m_pre, safeguards=safeguards)
    timings.update(result.timings_s)
    return RegisterResult(compensation=result, points_vox=points_vox, disps_vox=disps_vox, scores=scores,
                          intraop_points_vox=table.intraop_points_vox, mask=m_pre, counts=counts,
                          timings_s=timings, interp_options=interp, lam_cv_rmse_mm=lam_rmse)


def _residual_options(reject_options: dict | None) -> dict:
    """The options of :func:`reject_outliers` that :func:`local_residuals_mm` shares (the same local model)."""
    keys = ("n_neighbors", "radius_mm", "local_model")
    return {k: v for k, v in (reject_options or {}).items() if k in keys}


def _world_box(volume: Volume, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    w = _to_world(corners, volume.affine)
    return w.min(axis=0), w.max(axis=0)


def _fmt_box(box: tuple[np.ndarray, np.ndarray]) -> str:
    lo, hi = box
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi, strict=True)) + "]"
