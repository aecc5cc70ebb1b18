"""Tests of the voxel hexahedral mesh (counts, fractions, components, orphans, surfaces, normals)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import GeometryError
from brainshift.simulate import mesh as M
from brainshift.volume import Volume

from .phantoms import box_volume, ellipsoid_subject


def test_box_mesh_counts_and_positions():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    M.check_mesh(m)
    assert (m.n_elements, m.n_nodes) == (27, 64)
    # the grid's lower edge is the box's lower voxel edge: voxel -0.5
    np.testing.assert_allclose(m.nodes_vox.min(axis=0), [-0.5, -0.5, -0.5])
    np.testing.assert_allclose(m.nodes_vox.max(axis=0), [8.5, 8.5, 8.5])
    np.testing.assert_allclose(m.fractions, np.tile([1.0, 0.0, 0.0], (27, 1)))


def test_fractions_are_exact_volume_fractions():
    brain = box_volume((6, 6, 6))
    tum = np.zeros(brain.shape, np.uint8)
    tum[:, :, :2] = 1  # first third (2 of 6 voxels) of the bottom element layer... at 3 mm: 2/3 of layer 0
    ven = np.zeros(brain.shape, np.uint8)
    ven[:, :, 5] = 1  # 1 of 3 voxels of the top layer
    m = M.build_mesh(brain, Volume(tum, brain.affine, "label"), Volume(ven, brain.affine, "label"), resolution_mm=3.0)
    bottom = m.element_grid[:, 2] == 0
    np.testing.assert_allclose(m.fractions[bottom], np.tile([1 / 3, 2 / 3, 0.0], (4, 1)))
    np.testing.assert_allclose(m.fractions[~bottom], np.tile([2 / 3, 0.0, 1 / 3], (4, 1)))


def test_partially_filled_elements_are_kept():
    data = np.zeros((12, 12, 12), np.uint8)
    data[:, :, :5] = 1  # 5 voxels at 3 mm: layer 0 full, layer 1 two thirds (kept), nothing above
    m = M.build_mesh(Volume(data, np.eye(4), "label"), resolution_mm=3.0)
    assert sorted(set(m.element_grid[:, 2].tolist())) == [0, 1]


def test_islands_are_dropped_and_recorded():
    data = np.zeros((20, 9, 9), np.uint8)
    data[:9] = 1
    data[15:18, 3:6, 3:6] = 1  # a separate 3 mm cube
    m = M.build_mesh(Volume(data, np.eye(4), "label"), resolution_mm=3.0)
    assert m.n_elements == 27
    assert m.info["dropped_island_elements"] == 1 and m.info["n_components"] == 2
    M.check_mesh(m)


def test_check_mesh_rejects_orphan_node_and_components():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    orphan = M.HexMesh(**{**m.__dict__, "node_grid": np.vstack([m.node_grid, [[0, 0, 0]]])})
    with pytest.raises(GeometryError, match="orphan"):
        M.check_mesh(orphan)
    occ = np.zeros((5, 1, 1), bool)
    occ[[0, 1, 3, 4]] = True
    two = M.mesh_from_occupancy(occ, origin_vox=np.zeros(3), step_vox=np.ones(3) * 3, element_size_mm=3.0,
                                image_affine=np.eye(4), image_shape=(15, 3, 3))
    with pytest.raises(GeometryError, match="component"):
        M.check_mesh(two)


def test_remove_elements_drops_orphans_and_cut_off_pieces():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    corner = np.all(m.element_grid == 0, axis=1)
    new, kept, old_nodes = M.remove_elements(m, corner)
    M.check_mesh(new)
    assert (new.n_elements, new.n_nodes) == (26, 63)  # only the corner node became an orphan
    assert kept.size == 26 and old_nodes.size == 63
    np.testing.assert_array_equal(new.nodes_vox, m.nodes_vox[old_nodes])
    # removing the middle layer of a 3x1x1 bar leaves two pieces: the smaller one is dropped too
    occ = np.ones((3, 1, 1), bool)
    bar = M.mesh_from_occupancy(occ, origin_vox=np.zeros(3), step_vox=np.ones(3), element_size_mm=1.0,
                                image_affine=np.eye(4), image_shape=(3, 1, 1))
    new, kept, _ = M.remove_elements(bar, np.array([False, True, False]))
    assert new.n_elements == 1 and new.info["detached_elements"] == 1


def test_outer_surface_excludes_internal_hole():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    assert M.outer_surface_nodes(m).size == 56  # 64 minus the 8 interior nodes
    hole = np.all(m.element_grid == 1, axis=1)
    new, _, _ = M.remove_elements(m, hole)
    assert M.outer_surface_nodes(new).size == 56
    assert M.boundary_nodes(new).size == 64


def test_normals_point_outward_on_an_ellipsoid():
    s = ellipsoid_subject(tumour_radius_mm=0.0, ventricles=False)
    m = M.build_mesh(s.brain_mask, resolution_mm=3.0)
    surf = M.outer_surface_nodes(m)
    n = M.surface_normals(m, surf)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0)
    x = m.nodes_ras[surf]
    a = np.array([30.0, 35.0, 25.0])
    grad = x / a ** 2  # gradient of the ellipsoid's implicit function
    cos = np.sum(n * grad / np.linalg.norm(grad, axis=1, keepdims=True), axis=1)
    assert np.median(cos) > 0.97 and cos.min() > 0.5


def test_sheared_affine_is_rejected():
    aff = np.eye(4)
    aff[0, 1] = 0.5
    with pytest.raises(GeometryError, match="shear"):
        M.build_mesh(Volume(np.ones((6, 6, 6), np.uint8), aff, "label"))


def test_oblique_anisotropic_grid_gives_cubes_in_mm():
    # 2 mm along i, 1 mm along j, k, rotated 30 degrees about z: elements are still 3 mm cubes in RAS
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([2.0, 1.0, 1.0])
    m = M.build_mesh(Volume(np.ones((9, 18, 18), np.uint8), aff, "label"), resolution_mm=3.0)
    x = m.nodes_ras[m.elements[0]]
    np.testing.assert_allclose(np.linalg.norm(x[1] - x[0]), 3.0)
    np.testing.assert_allclose(np.linalg.norm(x[3] - x[0]), 3.0)
    np.testing.assert_allclose((x[1] - x[0]) @ (x[3] - x[0]), 0.0, atol=1e-12)
    assert m.n_elements == 6 * 6 * 6
