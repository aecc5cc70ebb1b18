"""Tests of the 3D SIFT-Rank-style descriptors (brainshift.keypoints.describe)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.keypoints.describe import BIN_DIRECTIONS, DESCRIPTOR_SIZE, describe_keypoints, rank_order
from brainshift.volume import Volume

from ._textured import textured_volume

POINTS = np.array([[30.0, 34.0, 40.0], [40.5, 30.25, 33.0], [36.0, 42.0, 28.0], [25.0, 25.0, 45.0]])


def test_shape_and_ranks_are_permutations():
    vol = Volume(textured_volume(), np.eye(4))
    desc = describe_keypoints(vol, POINTS, 3.0)
    assert desc.shape == (4, DESCRIPTOR_SIZE) and desc.dtype == np.float32
    for row in desc:
        np.testing.assert_array_equal(np.sort(row), np.arange(64))


def test_linear_ramp_fills_the_bins_facing_the_gradient():
    # I = x + 2y + 3z (world RAS): the gradient (1, 2, 3) has positive cosine with the diagonals
    # (+,+,+), (-,+,+), (+,-,+), (+,+,-) only (dot products 6, 4, 2, 0 -> (+,+,-) gets 0 too), so in every cell
    # the (+,+,+) bin is the largest and the bins with a non-positive cosine are zero (computed by hand).
    g = np.stack(np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij"))
    vol = Volume(g[0] + 2 * g[1] + 3 * g[2], np.eye(4))
    hist = describe_keypoints(vol, np.array([[20.0, 20.0, 20.0]]), 2.0, rank=False).reshape(8, 8)
    cos = BIN_DIRECTIONS @ np.array([1.0, 2.0, 3.0])
    assert np.all(hist[:, cos <= 0] == 0.0)
    assert np.all(np.argmax(hist, axis=1) == np.argmax(cos))
    # the cells are equal up to the window's symmetry: a linear image has the same gradient everywhere
    np.testing.assert_allclose(hist, np.broadcast_to(hist[0], hist.shape), rtol=1e-4, atol=1e-6)


def test_monotonic_intensity_change_gives_identical_ranks():
    img = textured_volume()
    a = describe_keypoints(Volume(img, np.eye(4)), POINTS, 3.0)
    b = describe_keypoints(Volume(3.0 * img + 7.0, np.eye(4)), POINTS, 3.0)
    np.testing.assert_array_equal(a, b)


def test_world_axes_make_descriptors_independent_of_the_grid_orientation():
    # The same anatomy stored with flipped and permuted voxel axes (an exact reorientation, no resampling):
    # the world-RAS descriptors at the same world points are equal (up to interpolation rounding).
    img = textured_volume()
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-36, -36, -36]
    # new voxel (i', j', k') = (k, J-1-j, i) -> data transposed and flipped; affine maps it to the same world point
    data2 = np.flip(np.transpose(img, (2, 1, 0)), axis=1)
    aff2 = np.zeros((4, 4))
    aff2[3, 3] = 1
    n = img.shape[1] - 1
    aff2[:3, :3] = aff[:3, :3] @ np.array([[0, 0, 1], [0, -1, 0], [1, 0, 0]])
    aff2[:3, 3] = aff[:3, 3] + aff[:3, :3] @ np.array([0, n, 0])
    pts2 = np.stack([POINTS[:, 2], n - POINTS[:, 1], POINTS[:, 0]], axis=1)
    np.testing.assert_allclose(pts2 @ aff2[:3, :3].T + aff2[:3, 3], POINTS @ aff[:3, :3].T + aff[:3, 3])
    a = describe_keypoints(Volume(img, aff), POINTS, 3.0, rank=False)
    b = describe_keypoints(Volume(data2, aff2), pts2, 3.0, rank=False)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_different_places_have_different_descriptors():
    vol = Volume(textured_volume(), np.eye(4))
    desc = describe_keypoints(vol, POINTS, 3.0)
    d = np.linalg.norm(desc[:, None] - desc[None], axis=-1)
    assert d[~np.eye(4, dtype=bool)].min() > 30.0  # rank vectors of independent places: typically ~150


def test_rank_order_by_hand():
    np.testing.assert_array_equal(rank_order(np.array([[0.3, 0.1, 0.2, 0.1]])), [[3, 0, 2, 1]])


def test_bad_inputs_raise():
    vol = Volume(textured_volume((20, 20, 20)), np.eye(4))
    with pytest.raises(KeypointError, match=r"shape \(N, 3\)"):
        describe_keypoints(vol, np.zeros((3, 2)), 2.0)
    with pytest.raises(KeypointError, match="positive finite"):
        describe_keypoints(vol, np.zeros((2, 3)), [2.0, 0.0])
    with pytest.raises(KeypointError, match="2 keypoint scales"):
        describe_keypoints(vol, np.zeros((2, 3)), [1.0, 2.0, 3.0])
    with pytest.raises(BrainshiftError, match="n_samples"):
        describe_keypoints(vol, np.zeros((2, 3)), 2.0, n_samples=5)
    assert describe_keypoints(vol, np.zeros((0, 3)), 2.0).shape == (0, 64)


def test_descriptors_round_trip_through_a_sift_key_file(tmp_path):
    from brainshift.io.keypoints import read_sift_key, read_sift_key_features, write_sift_key

    vol = Volume(textured_volume(), np.eye(4))
    desc = describe_keypoints(vol, POINTS, [2.0, 3.0, 4.0, 5.0])
    path = write_sift_key(tmp_path / "kp.key", POINTS, [2.0, 3.0, 4.0, 5.0], shape=vol.shape, descriptors=desc)
    feats = read_sift_key_features(path)
    np.testing.assert_allclose(feats.points_vox, POINTS, atol=1e-6)
    np.testing.assert_allclose(feats.scales, [2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(feats.descriptors, desc)  # ranks written as integers, read back exactly
    np.testing.assert_allclose(read_sift_key(path), POINTS, atol=1e-6)  # the locations-only reader still works
    row = path.read_text().splitlines()[6].split("\t")
    assert len(row) == 81 and row[-64:] == [str(int(v)) for v in desc[0]]
    with pytest.raises(KeypointError, match=r"shape \(4, 64\)"):
        write_sift_key(tmp_path / "bad.key", POINTS, descriptors=desc[:, :32])
    short = tmp_path / "short.key"
    short.write_text("\n".join(path.read_text().splitlines()[:6] + ["1\t2\t3\t1.5"]) + "\n")
    with pytest.raises(KeypointError, match="81 finite numbers on line 7"):
        read_sift_key_features(short)
