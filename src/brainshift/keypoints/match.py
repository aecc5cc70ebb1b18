"""Matching keypoint descriptors between two images, and geometric outlier rejection.

:func:`match_keypoints` pairs the keypoints of image A (preop) and image B (intraop) by their descriptors
(:mod:`brainshift.keypoints.describe`): for each keypoint, only the other image's keypoints within a maximum
plausible displacement (world mm; brain shift stays below ~30 mm) are candidates; a pair is kept when each is
the other's nearest candidate in descriptor space (mutual nearest neighbours) and the nearest is clearly
better than the second nearest (Lowe's ratio test, IJCV 2004). :func:`reject_outliers` then removes matches
whose displacement disagrees with the smooth displacement of their neighbours (iterative rejection against a
robust local fit: median, then affine). Everything is in world millimetres: the two images may be on different grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError


@dataclass(frozen=True)
class Matches:
    """Keypoint matches between images A and B.

    Attributes:
        index_a: ``(M,)`` int64 indices into A's keypoints.
        index_b: ``(M,)`` int64 indices into B's keypoints.
        distance: ``(M,)`` float64 descriptor distance of each match (Euclidean).
        ratio: ``(M,)`` float64 nearest / second-nearest descriptor distance seen from A (``0`` when A's
            keypoint had a single candidate); smaller is more distinctive.
        n_candidates: number of (A, B) keypoint pairs within the maximum displacement that were compared.
    """

    index_a: np.ndarray
    index_b: np.ndarray
    distance: np.ndarray
    ratio: np.ndarray
    n_candidates: int

    def __len__(self) -> int:
        return int(len(self.index_a))

    def take(self, keep: np.ndarray) -> Matches:
        """The matches selected by ``keep`` (a boolean mask or an index array)."""
        return Matches(self.index_a[keep], self.index_b[keep], self.distance[keep], self.ratio[keep],
                       self.n_candidates)


def _check_set(desc: np.ndarray, pts: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(desc, dtype=np.float64)
    p = np.asarray(pts, dtype=np.float64)
    if d.ndim != 2 or p.ndim != 2 or p.shape[1] != 3 or len(d) != len(p):
        raise KeypointError(f"expected descriptors (N, D) and points (N, 3) of set {name} with the same N, got "
                            f"{d.shape} and {p.shape}")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(p))):
        raise KeypointError(f"expected finite descriptors and points in set {name}, got NaN or inf")
    return d, p


def match_keypoints(
    desc_a: np.ndarray,
    pts_a_mm: np.ndarray,
    desc_b: np.ndarray,
    pts_b_mm: np.ndarray,
    *,
    ratio: float = 0.9,
    max_displacement_mm: float = 30.0,
    mutual: bool = True,
) -> Matches:
    """Match descriptors of A to B: candidates within ``max_displacement_mm``, mutual nearest neighbours, ratio test.

    Args:
        desc_a: ``(N_a, D)`` descriptors of A (e.g. :func:`~brainshift.keypoints.describe.describe_keypoints`).
        pts_a_mm: ``(N_a, 3)`` keypoint positions of A in world mm (RAS; the same frame as ``pts_b_mm``).
        desc_b: ``(N_b, D)`` descriptors of B.
        pts_b_mm: ``(N_b, 3)`` keypoint positions of B in world mm.
        ratio: keep a match when ``nearest <= ratio * second nearest`` descriptor distance among A's candidates
            (Lowe's test; ``1`` disables it). A keypoint with a single candidate passes.
        max_displacement_mm: largest plausible world distance between matched keypoints.
        mutual: also require A's keypoint to be the nearest, among B's keypoint's candidates, to B's keypoint.

    Returns:
        :class:`Matches`, sorted by increasing descriptor distance. The displacement of match ``m`` is
        ``pts_b_mm[index_b[m]] - pts_a_mm[index_a[m]]`` (world mm, A -> B).

    Raises:
        KeypointError: mismatched shapes, different descriptor lengths, non-finite values.
        BrainshiftError: ``ratio`` not in ``(0, 1]`` or ``max_displacement_mm`` not positive.
    """
    from scipy.spatial import cKDTree

    da, pa = _check_set(desc_a, pts_a_mm, "A")
    db, pb = _check_set(desc_b, pts_b_mm, "B")
    if da.shape[1] != db.shape[1]:
        raise KeypointError(f"expected descriptors of equal length, got {da.shape[1]} (A) and {db.shape[1]} (B)")
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise BrainshiftError(f"expected ratio in (0, 1], got {ratio!r}")
    if not (isinstance(max_displacement_mm, (int, float)) and math.isfinite(max_displacement_mm)
            and max_displacement_mm > 0):
        raise BrainshiftError(f"expected max_displacement_mm > 0, got {max_displacement_mm!r}")
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0), 0)
    if len(pa) == 0 or len(pb) == 0:
        return empty

    pairs = cKDTree(pa).sparse_distance_matrix(cKDTree(pb), float(max_displacement_mm), output_type="ndarray")
    if len(pairs) == 0:
        return empty
    ia, ib = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    dist = np.empty(len(ia))
    for s in range(0, len(ia), 1 << 16):  # descriptor distances of the candidate pairs, in chunks
        dist[s : s + (1 << 16)] = np.linalg.norm(da[ia[s : s + (1 << 16)]] - db[ib[s : s + (1 << 16)]], axis=1)

    # A side: nearest and second-nearest candidate of each A keypoint
    order = np.lexsort((dist, ia))
    ia_s, ib_s, d_s = ia[order], ib[order], dist[order]
    starts = np.nonzero(np.r_[True, ia_s[1:] != ia_s[:-1]])[0]
    counts = np.diff(np.r_[starts, len(ia_s)])
    best_a = ia_s[starts]
    best_b = ib_s[starts]
    best_d = d_s[starts]
    second = np.where(counts > 1, d_s[np.minimum(starts + 1, len(d_s) - 1)], np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        rat = np.where(np.isfinite(second), best_d / np.where(second > 0, second, np.inf), 0.0)
    rat = np.where((second == 0) & np.isfinite(second), 1.0, rat)  # a tie at zero distance is not distinctive
    keep = (rat <= ratio) if ratio < 1 else np.ones(len(best_a), bool)

    if mutual:  # B side: nearest A candidate of each B keypoint
        order_b = np.lexsort((dist, ib))
        ib_sb, ia_sb = ib[order_b], ia[order_b]
        starts_b = np.nonzero(np.r_[True, ib_sb[1:] != ib_sb[:-1]])[0]
        nearest_a_of_b = np.full(len(pb), -1, dtype=np.int64)
        nearest_a_of_b[ib_sb[starts_b]] = ia_sb[starts_b]
        keep &= nearest_a_of_b[best_b] == best_a

    m = Matches(best_a[keep], best_b[keep], best_d[keep], rat[keep], int(len(ia)))
    return m.take(np.argsort(m.distance, kind="stable"))


def reject_outliers(
    points_mm: np.ndarray,
    disps_mm: np.ndarray,
    *,
    n_neighbors: int = 10,
    radius_mm: float = 40.0,
    threshold_mm: float = 1.5,
    n_mad: float = 3.0,
    max_iter: int = 10,
    local_model: str = "affine",
) -> np.ndarray:
    """Inlier mask of matched displacements by geometric consistency (iterative robust local fit).

    Brain shift is smooth on the scale of centimetres, so a correct match moves like its neighbours. Each
    iteration predicts every match's displacement from the displacements of its ``n_neighbors`` nearest
    *current inliers* within ``radius_mm`` (itself excluded) and keeps the matches whose residual
    ``|d - prediction|`` is at most ``max(threshold_mm, n_mad * 1.4826 * MAD)`` (MAD: median absolute
    deviation of the inliers' residuals around their median). The prediction is, with
    ``local_model="median"``, the component-wise median of the neighbours' displacements (robust, but biased
    where the displacement varies fast: its error grows with the gradient times the neighbours' spread); with
    ``local_model="affine"``, the value at the match of a least-squares affine fit ``d(x) = b + J (x - x_i)``
    to the neighbours (exact for any locally affine displacement, so a tighter threshold keeps correct
    matches where the shift changes fastest), its gradient ``J`` ridge-damped by 1e-6 in units of the
    neighbours' spread so that near-coplanar neighbourhoods stay well posed. The first iteration, when every
    match is still an inlier, always uses the median (robust to the wrong matches among the neighbours).
    Rejected matches are re-tested at every iteration (they come back when the inliers around them support
    them); the loop stops when the mask no longer changes or after ``max_iter`` iterations. A match with
    fewer than 3 inlier neighbours in the radius (5 for ``"affine"``, which falls back to the median below
    that) is an outlier (nothing supports it). The inlier ratio is ``mask.mean()``.

    Args:
        points_mm: ``(M, 3)`` match positions in world mm (e.g. the preop keypoints).
        disps_mm: ``(M, 3)`` their displacements in world mm.
        n_neighbors: neighbours in each local fit.
        radius_mm: largest distance of a neighbour.
        threshold_mm: residual always accepted (the matches' own localisation error, ~1 voxel). The defaults
            (``"affine"``, 1.5 mm) were chosen on 8 validation cases of training subjects
            (``bench/register_validation.py``; bench/RESULTS.md): the median at 2 mm kept wrong matches
            (precision 0.91 on large shifts) and at 1.5 mm lost half the true ones on a 17 mm shift.
        n_mad: robust standard deviations accepted above ``threshold_mm``.
        max_iter: most iterations.
        local_model: ``"affine"`` (default) or ``"median"`` (see above).

    Returns:
        ``(M,)`` bool mask, True for inliers.

    Raises:
        KeypointError: mismatched shapes or non-finite values.
        BrainshiftError: invalid options.
    """
    p = np.asarray(points_mm, dtype=np.float64)
    d = np.asarray(disps_mm, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or d.shape != p.shape:
        raise KeypointError(f"expected points and displacements of equal shape (M, 3), got {p.shape} and {d.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(d))):
        raise KeypointError("expected finite points and displacements, got NaN or inf")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 3:
        raise BrainshiftError(f"expected n_neighbors an integer >= 3, got {n_neighbors!r}")
    for name, v in (("radius_mm", radius_mm), ("threshold_mm", threshold_mm), ("n_mad", n_mad)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise BrainshiftError(f"expected {name} > 0, got {v!r}")
    if local_model not in ("median", "affine"):
        raise BrainshiftError(f"expected local_model 'median' or 'affine', got {local_model!r}")
    n = len(p)
    inlier = np.ones(n, dtype=bool)
    if n < 4:
        return np.zeros(n, dtype=bool)
    for it in range(int(max_iter)):
        if int(inlier.sum()) < 4:
            return np.zeros(n, dtype=bool)
        resid = _local_residuals(p, d, inlier, n_neighbors, float(radius_mm), local_model if it > 0 else "median")
        resid[~np.isfinite(resid)] = np.inf
        r_in = resid[inlier & np.isfinite(resid)]
        mad = float(np.median(np.abs(r_in - np.median(r_in)))) if len(r_in) else 0.0
        new = resid <= max(float(threshold_mm), n_mad * 1.4826 * mad)
        if np.array_equal(new, inlier):
            break
        inlier = new
    return inlier


def local_residuals_mm(points_mm: np.ndarray, disps_mm: np.ndarray, inlier: np.ndarray, *, n_neighbors: int = 10,
                       radius_mm: float = 40.0, local_model: str = "affine") -> np.ndarray:
    """Each match's distance (mm) to the displacement its inlier neighbours predict, as :func:`reject_outliers`
    scores it (the same neighbours, radius and local model; the match itself never supports itself).

    Args:
        points_mm, disps_mm: ``(M, 3)`` match positions and displacements in world mm.
        inlier: ``(M,)`` bool, the matches allowed to support others (e.g. :func:`reject_outliers`'s mask).
        n_neighbors, radius_mm, local_model: as in :func:`reject_outliers`.

    Returns:
        ``(M,)`` float64 residuals in mm; NaN where fewer than 3 inlier neighbours lie within ``radius_mm``.

    Raises:
        KeypointError: mismatched shapes. BrainshiftError: unknown ``local_model``.
    """
    p = np.asarray(points_mm, dtype=np.float64)
    d = np.asarray(disps_mm, dtype=np.float64)
    mask = np.asarray(inlier, dtype=bool)
    if p.ndim != 2 or p.shape[1] != 3 or d.shape != p.shape or mask.shape != (len(p),):
        raise KeypointError(f"expected points and displacements (M, 3) and an inlier mask (M,), got {p.shape}, "
                            f"{d.shape} and {mask.shape}")
    if local_model not in ("median", "affine"):
        raise BrainshiftError(f"expected local_model 'median' or 'affine', got {local_model!r}")
    if int(mask.sum()) < 1:
        return np.full(len(p), np.nan)
    return _local_residuals(p, d, mask, int(n_neighbors), float(radius_mm), local_model)


def _local_residuals(p: np.ndarray, d: np.ndarray, inlier: np.ndarray, n_neighbors: int, radius_mm: float,
                     local_model: str) -> np.ndarray:
    """``|d - prediction|`` from the ``n_neighbors`` nearest inliers within ``radius_mm`` (NaN: support < 3).

    The prediction is the neighbours' component-wise median, or (``"affine"``, with at least 5 neighbours)
    :func:`_local_affine_prediction`.
    """
    import warnings

    from scipy.spatial import cKDTree

    n = len(p)
    idx_in = np.nonzero(inlier)[0]
    k = min(n_neighbors + 1, len(idx_in))
    dist, nb = cKDTree(p[idx_in]).query(p, k=k, distance_upper_bound=radius_mm)
    dist, nb = np.atleast_2d(dist.T).T.reshape(n, k), np.atleast_2d(nb.T).T.reshape(n, k)
    nb_global = np.where(np.isfinite(dist), idx_in[np.minimum(nb, len(idx_in) - 1)], -1)
    nb_global[nb_global == np.arange(n)[:, None]] = -1  # a match does not support itself
    valid = nb_global >= 0
    nb_d = np.where(valid[..., None], d[np.maximum(nb_global, 0)], np.nan)  # (n, k, 3)
    # keep at most n_neighbors valid neighbours (the self match, when present, was one of the k)
    rank = np.cumsum(valid, axis=1)
    nb_d[rank > n_neighbors] = np.nan
    support = np.minimum(valid.sum(axis=1), n_neighbors)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no support
        pred = np.nanmedian(nb_d, axis=1)
    if local_model == "affine":
        use = (support >= 5) & np.isfinite(pred).all(axis=1)
        nb_p = np.where(valid[..., None], p[np.maximum(nb_global, 0)], np.nan)
        nb_p[rank > n_neighbors] = np.nan
        pred[use] = _local_affine_prediction(p[use], nb_p[use], nb_d[use])
    resid = np.linalg.norm(d - pred, axis=1)
    resid[support < 3] = np.nan
    return resid


def _local_affine_prediction(p: np.ndarray, nb_p: np.ndarray, nb_d: np.ndarray) -> np.ndarray:
    """Value at each ``p`` ``(n, 3)`` of a ridge-damped least-squares affine fit to its neighbours.

    ``nb_p``, ``nb_d``: ``(n, k, 3)`` neighbour positions and displacements (mm), NaN rows unused. The fit is
    centred on the neighbours' centroid and scaled by their RMS spread (so that the intercept and the
    gradient decouple), the gradient is damped by ``1e-6 * count`` (near-coplanar neighbourhoods stay well
    posed), and the fit is evaluated at ``p``. Returns ``(n, 3)`` mm.
    """
    ok = np.isfinite(nb_p).all(axis=2) & np.isfinite(nb_d).all(axis=2)  # (n, k)
    w = ok.astype(np.float64)
    cnt = np.maximum(w.sum(axis=1), 1.0)
    centre = np.where(ok[..., None], nb_p, 0.0).sum(axis=1) / cnt[:, None]
    off = np.where(ok[..., None], nb_p - centre[:, None, :], 0.0)
    scale = np.sqrt((off**2).sum(axis=(1, 2)) / cnt + 1e-12)
    x = np.concatenate([w[..., None], off / scale[:, None, None]], axis=2)  # (n, k, 4)
    y = np.where(ok[..., None], nb_d, 0.0)
    a = np.einsum("nki,nkj->nij", x, x)
    a[:, 1:, 1:] += (1e-6 * cnt)[:, None, None] * np.eye(3)
    coef = np.linalg.solve(a, np.einsum("nki,nkj->nij", x, y))  # (n, 4, 3): value at centre, gradient
    at = np.concatenate([np.ones((len(p), 1)), (p - centre) / scale[:, None]], axis=1)
    return np.einsum("ni,nij->nj", at, coef)
