"""Tests of descriptor matching and outlier rejection (brainshift.keypoints.match)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.keypoints.describe import describe_keypoints
from brainshift.keypoints.detect import detect_keypoints
from brainshift.keypoints.match import local_residuals_mm, match_keypoints, reject_outliers
from brainshift.volume import Volume

from ._textured import textured_volume


def _keypoints_and_descriptors(img: np.ndarray, affine: np.ndarray):
    vol = Volume(img.astype(np.float32), affine)
    kp = detect_keypoints(vol)
    return kp, describe_keypoints(vol, kp.points_vox, kp.scales_mm)


def test_known_translation_gives_precise_matches():
    img = textured_volume()
    shift = np.array([3.3, -2.1, 1.7])  # voxel = mm (identity affine): B(x) = A(x - shift)
    moved = ndimage.shift(img, shift, order=3, mode="nearest")
    ka, da = _keypoints_and_descriptors(img, np.eye(4))
    kb, db = _keypoints_and_descriptors(moved, np.eye(4))
    m = match_keypoints(da, ka.points_vox, db, kb.points_vox)
    disp = kb.points_vox[m.index_b] - ka.points_vox[m.index_a]
    err = np.linalg.norm(disp - shift, axis=1)
    assert len(m) >= 40  # measured 91 of ~120 keypoints
    assert (err < 0.5).mean() >= 0.9  # measured 0.97
    assert np.all(np.diff(m.distance) >= 0) and np.all(m.ratio <= 0.9)


def test_known_smooth_warp_gives_precise_matches():
    # forward field u(p) (mm = voxels): a smooth bump up to ~3 mm. The warped image B(y) = A(q) with
    # q + u(q) = y, solved by fixed-point iteration q <- y - u(q), so each A point p appears at p + u(p).
    shape = (72, 72, 72)
    img = textured_volume(shape, seed=1)
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = np.array([40.0, 30.0, 38.0])

    def u(x: np.ndarray) -> np.ndarray:  # x (3, ...) -> (3, ...)
        w = np.exp(-((x - centre.reshape(3, *[1] * (x.ndim - 1))) ** 2).sum(axis=0) / (2 * 18.0**2))
        return np.stack([2.5 * w, -1.5 * w, 1.0 * w + 0.5])

    q = g.copy()
    for _ in range(30):
        q = g - u(q)
    moved = ndimage.map_coordinates(img, q, order=3, mode="nearest")
    ka, da = _keypoints_and_descriptors(img, np.eye(4))
    kb, db = _keypoints_and_descriptors(moved, np.eye(4))
    m = match_keypoints(da, ka.points_vox, db, kb.points_vox)
    pa = ka.points_vox[m.index_a]
    err = np.linalg.norm(kb.points_vox[m.index_b] - pa - u(pa.T).T, axis=1)
    assert len(m) >= 40
    assert (err < 0.5).mean() >= 0.9


def test_world_coordinates_match_across_grids():
    # B is A on another grid (voxel axes flipped along i, origin moved): matching in world mm gives ~zero
    # displacement although voxel indices differ.
    img = textured_volume()
    aff_b = np.diag([-1.0, 1.0, 1.0, 1.0])
    aff_b[:3, 3] = [img.shape[0] - 1, 0, 0]
    ka, da = _keypoints_and_descriptors(img, np.eye(4))
    kb, db = _keypoints_and_descriptors(np.flip(img, axis=0), aff_b)
    pa_mm = ka.points_vox
    pb_mm = kb.points_vox @ aff_b[:3, :3].T + aff_b[:3, 3]
    m = match_keypoints(da, pa_mm, db, pb_mm)
    err = np.linalg.norm(pb_mm[m.index_b] - pa_mm[m.index_a], axis=1)
    assert len(m) >= 40 and (err < 0.5).mean() >= 0.9


def test_mutual_ratio_and_distance_rules_by_hand():
    # Descriptor distances computed by hand: A0 -> B0 1.0, B1 3.0 (ratio 1/3); A1 -> B0 1.2, B1 0.8 (nearest
    # B1, ratio 0.8/1.2 = 0.667). B2 has A0's exact descriptor but lies 50 mm away: never a candidate.
    da = np.array([[0.0, 0.0], [0.0, 2.2]])
    db = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 0.0]])
    pa = np.zeros((2, 3))
    pb = np.array([[1.0, 0, 0], [0, 1.0, 0], [50.0, 0, 0]])
    m = match_keypoints(da, pa, db, pb, ratio=0.7)
    assert sorted(zip(m.index_a.tolist(), m.index_b.tolist(), strict=True)) == [(0, 0), (1, 1)]
    np.testing.assert_allclose(sorted(m.ratio), [1 / 3, 0.8 / 1.2])
    assert m.n_candidates == 4  # 2 x 2 pairs within 30 mm
    assert len(match_keypoints(da, pa, db, pb, ratio=0.5)) == 1  # A1's ratio 0.667 now fails
    # mutual: a third A keypoint with B0's exact descriptor steals B0, so (A0, B0) is no longer mutual
    da3 = np.vstack([da, [[0.0, 1.0]]])
    pairs = set(zip(*(x.tolist() for x in (lambda r: (r.index_a, r.index_b))(
        match_keypoints(da3, np.zeros((3, 3)), db, pb, ratio=1.0))), strict=True))
    assert (2, 0) in pairs and (0, 0) not in pairs


def test_random_outliers_are_rejected():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 100, size=(300, 3))
    disp = np.stack([3 * np.sin(pts[:, 0] / 30), 2 * np.cos(pts[:, 1] / 25), np.full(300, -1.0)], axis=1)
    disp += rng.normal(scale=0.3, size=disp.shape)  # localisation noise of good matches
    bad = rng.choice(300, size=45, replace=False)  # 15 % wrong matches: random displacements up to 30 mm
    disp[bad] = rng.uniform(-30, 30, size=(45, 3))
    wrong = np.linalg.norm(disp[bad] - np.stack([3 * np.sin(pts[bad, 0] / 30), 2 * np.cos(pts[bad, 1] / 25),
                                                 np.full(45, -1.0)], axis=1), axis=1) > 3.0
    inlier = reject_outliers(pts, disp)
    is_bad = np.zeros(300, bool)
    is_bad[bad[wrong]] = True
    assert not inlier[is_bad].any()  # every clearly wrong match is rejected
    assert inlier[~np.isin(np.arange(300), bad)].mean() >= 0.97  # and (almost) no good one
    assert 0.8 <= inlier.mean() <= 0.9  # the inlier ratio reported to the user


def test_bad_inputs_raise():
    with pytest.raises(KeypointError, match="same N"):
        match_keypoints(np.zeros((3, 64)), np.zeros((2, 3)), np.zeros((2, 64)), np.zeros((2, 3)))
    with pytest.raises(KeypointError, match="equal length"):
        match_keypoints(np.zeros((2, 64)), np.zeros((2, 3)), np.zeros((2, 32)), np.zeros((2, 3)))
    with pytest.raises(BrainshiftError, match="ratio"):
        match_keypoints(np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), ratio=1.5)
    with pytest.raises(KeypointError, match="equal shape"):
        reject_outliers(np.zeros((5, 3)), np.zeros((4, 3)))
    assert len(match_keypoints(np.zeros((0, 4)), np.zeros((0, 3)), np.zeros((2, 4)), np.zeros((2, 3)))) == 0


def test_affine_local_model_keeps_every_match_of_a_steep_affine_shift():
    # exact property: a locally affine displacement is predicted exactly by the local affine fit, so every
    # match is kept even at a tight threshold; the local median is biased by gradient x neighbour spread
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 100, size=(300, 3))
    jac = rng.normal(scale=0.15, size=(3, 3))
    disp = pts @ jac.T + np.array([2.0, -1.0, 0.5])
    assert reject_outliers(pts, disp, threshold_mm=0.1, local_model="affine").all()
    assert reject_outliers(pts, disp, threshold_mm=0.1, local_model="median").mean() < 0.5


def test_affine_local_model_rejects_wrong_matches_on_a_steep_shift():
    rng = np.random.default_rng(6)
    pts = rng.uniform(0, 100, size=(400, 3))
    true = np.stack([8 * np.sin(pts[:, 0] / 40), 6 * np.cos(pts[:, 1] / 35), 0.12 * pts[:, 2]], axis=1)
    disp = true + rng.normal(scale=0.2, size=true.shape)
    bad = rng.choice(400, size=60, replace=False)
    disp[bad] = true[bad] + rng.uniform(3, 15, size=(60, 1)) * rng.normal(size=(60, 3)) / 1.7
    wrong = np.linalg.norm(disp - true, axis=1) > 2.5
    good = np.linalg.norm(disp - true, axis=1) < 1.0
    inlier = reject_outliers(pts, disp)  # defaults: affine, 1.5 mm
    assert not inlier[wrong].any()
    assert inlier[good].mean() >= 0.95
    assert inlier[good].mean() > reject_outliers(pts, disp, local_model="median")[good].mean()


def test_reject_outliers_bad_local_model_raises():
    with pytest.raises(BrainshiftError, match="local_model"):
        reject_outliers(np.zeros((5, 3)), np.zeros((5, 3)), local_model="spline")


def test_local_residuals_are_exact_for_an_affine_shift_and_measure_a_wrong_match():
    """On a steep affine shift the affine local model predicts every match exactly from its neighbours (residual
    0), a wrong match's residual is its offset, and the median model is biased by the gradient; NaN without
    support (fewer than 3 inlier neighbours within the radius)."""
    rng = np.random.default_rng(5)
    p = rng.uniform(0, 80, size=(200, 3))
    jac = np.array([[0.15, 0.02, 0.0], [0.0, -0.1, 0.05], [0.03, 0.0, 0.12]])
    d = (p - 40.0) @ jac.T + [1.0, -2.0, 0.5]
    d[7] += [3.0, 0.0, -4.0]  # a wrong match, 5 mm off
    inlier = np.ones(200, bool)
    inlier[7] = False
    r = local_residuals_mm(p, d, inlier)
    others = np.delete(np.arange(200), 7)
    assert np.max(r[others]) < 1e-3  # exact up to the 1e-6 ridge on the gradient (measured 3e-5 mm)
    assert r[7] == pytest.approx(5.0, abs=1e-3)
    r_med = local_residuals_mm(p, d, inlier, local_model="median")
    assert np.median(r_med[others]) > 0.3  # the median's bias on a 0.1-0.15 mm/mm gradient
    far = np.vstack([p, [[500.0, 500.0, 500.0]]])
    r_far = local_residuals_mm(far, np.vstack([d, [[0.0, 0.0, 0.0]]]), np.append(inlier, True))
    assert np.isnan(r_far[-1])
    with pytest.raises(BrainshiftError, match="local_model"):
        local_residuals_mm(p, d, inlier, local_model="spline")
