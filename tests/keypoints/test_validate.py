"""brainshift.keypoints.validate.hull_fraction: exact volumes."""

import numpy as np

from brainshift.keypoints.validate import hull_fraction

AFFINE = np.diag([1.0, 2.0, 1.5, 1.0])


def _box(lo, hi):
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)


def test_hull_of_a_box_over_a_region_is_the_ratio_of_world_volumes():
    region = np.zeros((20, 20, 20), bool)
    region[2:18, 2:18, 2:18] = True  # 16^3 voxels of 3 mm^3
    pts = _box((4, 4, 4), (10, 8, 6))  # 6 x 4 x 2 voxels = 48 voxels of 3 mm^3
    interior = np.array([[6.0, 5.0, 5.0], [7.0, 6.0, 4.5]])  # points inside change nothing
    assert np.isclose(hull_fraction(np.vstack([pts, interior]), AFFINE, region), 48.0 / 16 ** 3)


def test_no_volume_gives_zero_and_an_empty_region_inf():
    region = np.ones((5, 5, 5), bool)
    assert hull_fraction(_box((0, 0, 0), (2, 2, 2))[:3], AFFINE, region) == 0.0  # fewer than 4 points
    plane = np.array([[0, 0, 1], [3, 0, 1], [0, 3, 1], [3, 3, 1], [1, 2, 1]], float)
    assert hull_fraction(plane, AFFINE, region) == 0.0
    assert hull_fraction(_box((0, 0, 0), (2, 2, 2)), AFFINE, np.zeros((5, 5, 5), bool)) == float("inf")
