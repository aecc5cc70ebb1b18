"""Tests of brainshift.keypoints.detect: DoG keypoints on synthetic images and on the MNI152 template."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.keypoints.detect import Keypoints, detect_keypoints
from brainshift.volume import Volume

# anisotropic, translated grid: spacing (1.0, 1.2, 2.0) mm
SHAPE = (48, 44, 22)
SPACING = np.array([1.0, 1.2, 2.0])
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = [-20.0, 5.0, 3.0]
# blob centres at sub-voxel positions (voxel indices), amplitude (negative = dark blob), sigma in mm
CENTRES = np.array([[12.3, 11.6, 6.4], [34.7, 13.2, 14.8], [14.1, 31.4, 13.3], [33.5, 30.2, 7.6]])
AMPLITUDES = np.array([1.0, 0.8, -0.6, 1.2])
SIGMAS_MM = np.array([3.0, 3.5, 3.0, 4.0])


def blob_image(centres=CENTRES, amplitudes=AMPLITUDES, sigmas=SIGMAS_MM, shape=SHAPE, spacing=SPACING):
    """Sum of isotropic (in mm) Gaussian blobs on a constant background of 0.5."""
    grid = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    img = np.full(grid.shape[0], 0.5)
    for c, a, s in zip(centres, amplitudes, sigmas, strict=True):
        img += a * np.exp(-(((grid - c) * spacing) ** 2).sum(axis=1) / (2.0 * s * s))
    return img.reshape(shape).astype(np.float32)


def nearest(kp: Keypoints, point: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(kp.points_vox - point, axis=1)
    return int(d.argmin()), float(d.min())


def test_blobs_found_subvoxel_with_polarity_and_scale():
    kp = detect_keypoints(Volume(blob_image(), AFFINE))
    assert len(kp) == 4  # exactly the four blobs, nothing else on a constant background
    assert kp.points_vox.dtype == np.float64 and kp.points_vox.shape == (4, 3)
    for centre, amp, sigma in zip(CENTRES, AMPLITUDES, SIGMAS_MM, strict=True):
        i, dist = nearest(kp, centre)
        assert np.all(np.abs(kp.points_vox[i] - centre) < 0.5), (centre, kp.points_vox[i])
        assert dist < 0.1  # the quadratic refinement is far better than the 0.5 voxel requirement
        assert kp.polarity[i] == (1 if amp > 0 else -1)
        # a 3-D Gaussian of std s peaks in the scale-normalised Laplacian at sigma = s * sqrt(2/3)
        assert kp.scales_mm[i] == pytest.approx(sigma * np.sqrt(2.0 / 3.0), rel=0.1)
    assert np.all(np.diff(kp.responses) <= 0)  # sorted strongest first


@pytest.mark.parametrize("sigma_mm", [5.0, 7.0, 10.0])
def test_large_blobs_on_coarse_octaves(sigma_mm):
    # detection scales 4.1, 5.7, 8.2 mm: between octaves 0 and 1, octave 1 (grid strides 2, 1, 1) and
    # octave 2 (strides 4, 2, 2) of the anisotropic pyramid; positions map back to the full grid
    shape, centre = (64, 56, 32), np.array([31.7, 27.2, 15.8])
    img = blob_image(centre[None], np.array([-1.0]), np.array([sigma_mm]), shape=shape)
    kp = detect_keypoints(Volume(img, AFFINE))
    assert len(kp) == 1 and kp.polarity[0] == -1
    assert np.all(np.abs(kp.points_vox[0] - centre) < 0.5), kp.points_vox[0]
    assert kp.scales_mm[0] == pytest.approx(sigma_mm * np.sqrt(2.0 / 3.0), rel=0.1)


def test_thick_slices_keep_only_blobs_resolved_across_slices():
    # 3 mm slices: a blob of sigma 3 mm (detection scale ~2.45 mm < 3 mm) is not localisable across slices,
    # one of 5 mm (scale ~4.1 mm) is; on 1 mm slices both are found
    shape, centre = (48, 48, 16), np.array([23.6, 24.2, 7.7])
    for spacing, sigma_mm, expected in (((1, 1, 3), 3.0, 0), ((1, 1, 3), 5.0, 1), ((1, 1, 1), 3.0, 1)):
        spacing = np.array(spacing, dtype=float)
        grid_shape = shape if spacing[2] == 3 else (48, 48, 48)
        c = centre if spacing[2] == 3 else centre * [1, 1, 3]
        img = blob_image(c[None], np.array([1.0]), np.array([sigma_mm]), shape=grid_shape, spacing=spacing)
        kp = detect_keypoints(Volume(img, np.diag([*spacing, 1.0])))
        assert len(kp) == expected, (spacing, sigma_mm)
        if expected:
            assert np.all(np.abs(kp.points_vox[0] - c) < 0.5)


def test_flat_and_ramp_give_no_keypoints():
    shape = (40, 40, 30)
    grid = np.indices(shape).astype(np.float32)
    flat = np.full(shape, 3.0, np.float32)
    ramp = 0.3 * grid[0] + 0.5 * grid[1] + 1.6 * grid[2]  # oblique linear ramp: zero DoG everywhere inside
    for img in (flat, ramp):
        assert len(detect_keypoints(Volume(img, AFFINE))) == 0
        assert len(detect_keypoints(Volume(img, AFFINE), border_mm=0.0)) == 0


def test_tube_and_elongated_blob_rejected_by_hessian_ratio():
    shape = (40, 40, 50)
    spacing = np.array([1.0, 1.0, 2.0])
    affine = np.diag([*spacing, 1.0])
    d = (np.indices(shape) - np.array([20.0, 19.5, 25.2])[:, None, None, None]) * spacing[:, None, None, None]
    # Gaussian ellipsoid with axes 3, 3, 18 mm: Hessian eigenvalue ratio at its centre about 20
    elongated = np.exp(-(d[0] ** 2 / 18 + d[1] ** 2 / 18 + d[2] ** 2 / (2 * 18.0**2))).astype(np.float32)
    assert len(detect_keypoints(Volume(elongated, affine))) == 0
    loose = detect_keypoints(Volume(elongated, affine), edge_ratio=1e6)  # the ratio test is what rejects it
    assert nearest(loose, np.array([20.0, 19.5, 25.2]))[1] < 0.5
    # an infinite tube (constant along k): no definite Hessian anywhere
    tube = np.exp(-(d[0] ** 2 + d[1] ** 2) / 18).astype(np.float32)
    assert len(detect_keypoints(Volume(tube, affine), edge_ratio=1e6)) == 0
    # the same cross-section as a sphere is kept
    sphere = np.exp(-(d**2).sum(axis=0) / 18).astype(np.float32)
    kept = detect_keypoints(Volume(sphere, affine))
    assert len(kept) == 1 and nearest(kept, np.array([20.0, 19.5, 25.2]))[1] < 0.1


def test_mask_restriction_and_border():
    image = Volume(blob_image(), AFFINE)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:24] = 1  # i < 24 holds blobs 0 and 2 (i = 12.3 and 14.1)
    kp = detect_keypoints(image, mask)
    assert len(kp) == 2
    assert np.all(kp.points_vox[:, 0] < 24)
    assert sorted(kp.polarity.tolist()) == [-1, 1]
    # distance to the nearest outside voxel (mask boundary or beyond the image edge), by hand:
    # blob 0 (12.3, 11.6, 6.4): min(24 - 12.3, 12.3 + 1, (11.6 + 1) * 1.2, (6.4 + 1) * 2) = 11.7 mm;
    # blob 2 (14.1, 31.4, 13.3): 24 - 14.1 = 9.9 mm. A 11 mm border keeps only blob 0, 12 mm none.
    kp11 = detect_keypoints(image, mask, border_mm=11.0)
    assert len(kp11) == 1 and nearest(kp11, CENTRES[0])[1] < 0.1
    assert len(detect_keypoints(image, mask, border_mm=12.0)) == 0
    # a Volume mask on another grid is resampled to the image grid (nearest neighbour)
    coarse_affine = AFFINE.copy()
    coarse_affine[:3, :3] *= 2.0
    coarse_affine[:3, 3] += 0.5 * np.diag(AFFINE)[:3]  # voxel centres of the 2x grid
    coarse = np.zeros((24, 22, 11), dtype=np.uint8)
    coarse[:12] = 1
    kp_vol = detect_keypoints(image, Volume(coarse, coarse_affine, "label"))
    np.testing.assert_array_equal(kp_vol.points_vox, kp.points_vox)


def test_deterministic_and_max_keypoints():
    image = Volume(blob_image(), AFFINE)
    a, b = detect_keypoints(image), detect_keypoints(image)
    for name in ("points_vox", "scales_mm", "responses", "polarity"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    top2 = detect_keypoints(image, max_keypoints=2)
    np.testing.assert_array_equal(top2.points_vox, a.points_vox[:2])


def test_duplicates_within_min_distance_removed():
    # two blobs 9 mm apart along i (1 mm grid): both found without suppression, only the stronger within 10 mm
    shape, spacing = (48, 40, 40), np.ones(3)
    centres = np.array([[19.5, 20.0, 20.0], [28.5, 20.0, 20.0]])
    img = blob_image(centres, np.array([1.0, 0.7]), np.array([3.0, 3.0]), shape=shape, spacing=spacing)
    both = detect_keypoints(Volume(img, np.eye(4)), min_distance_mm=0.0)
    assert len(both) == 2 and nearest(both, centres[1])[1] < 0.5
    one = detect_keypoints(Volume(img, np.eye(4)), min_distance_mm=10.0)
    assert len(one) == 1
    np.testing.assert_array_equal(one.points_vox[0], both.points_vox[0])  # the strongest survives
    assert nearest(one, centres[0])[1] < 0.5


def test_bad_inputs_raise():
    image = Volume(blob_image(), AFFINE)
    with pytest.raises(GeometryError, match="expected a mask on the image grid"):
        detect_keypoints(image, np.ones((5, 5, 5)))
    with pytest.raises(GeometryError, match="empty mask"):
        detect_keypoints(image, np.zeros(SHAPE))
    bad = blob_image()
    bad[3, 4, 5] = np.nan
    with pytest.raises(GeometryError, match="finite"):
        detect_keypoints(Volume(bad, AFFINE))
    with pytest.raises(BrainshiftError, match="sigma_min_mm"):
        detect_keypoints(image, sigma_min_mm=0.0)
    with pytest.raises(BrainshiftError, match="edge_ratio"):
        detect_keypoints(image, edge_ratio=0.5)


def test_mni152_count_and_spread():
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    t1 = nilearn_datasets.load_mni152_template(resolution=1)
    brain = nilearn_datasets.load_mni152_brain_mask(resolution=1)
    mask = np.asarray(brain.dataobj) > 0
    kp = detect_keypoints(Volume(np.asarray(t1.dataobj), t1.affine), mask)
    assert len(kp) >= 300
    world = kp.points_vox @ t1.affine[:3, :3].T
    assert np.min(np.linalg.norm(world[:, None] - world[None], axis=-1) + 1e9 * np.eye(len(kp))) >= 3.0
    idx = np.argwhere(mask)
    centre = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    octant = ((kp.points_vox > centre) * np.array([1, 2, 4])).sum(axis=1)
    counts = np.bincount(octant, minlength=8)
    assert counts.min() >= 0.05 * len(kp)  # every octant of the brain's bounding box is populated
    from scipy.ndimage import distance_transform_edt

    # distance to the nearest outside voxel (the image edge counts): pad by one, crop for a faster transform
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 3  # in padded indices: one outside voxel on each side
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    depth = distance_transform_edt(np.pad(mask, 1)[box])[tuple((np.rint(kp.points_vox).astype(int) + 1 - lo).T)]
    assert np.all(depth >= 4.0)  # border_mm = 5 (nearest-voxel vs. exact distance differ by < 1 mm)
    # not clustered on the surface: the 5-10 mm shell holds ~20 % of the brain; keypoints there are a minority
    assert np.mean(depth < 10.0) < 0.5
