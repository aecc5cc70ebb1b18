"""Nodal displacements of the hexahedral mesh -> dense displacement field on the subject's image grid.

The mesh nodes sit on a regular grid in the image's index space, and the FE field is trilinear inside every
element, so sampling the node-grid array with trilinear interpolation (``scipy.ndimage.map_coordinates``,
order 1) reproduces the FE interpolant exactly inside the mesh. Node-grid points without a node (outside the
mesh, or inside the resection cavity) are filled with the value of the nearest node (Euclidean distance
transform), which extrapolates the field into the brain voxels a boundary element did not cover (elements are
kept at brain fraction >= 0.5) and into the cavity (masked out by evaluation). Voxels outside
``brain | tumour`` get zero.

Convention: the returned field is float32 ``(3, I, J, K)``, forward Lagrangian, in voxel units along
``i, j, k`` of the subject grid (``u_vox = u_local_mm / spacing``; the local frame's axes are the voxel axes).
"""

from __future__ import annotations

import numpy as np

from brainshift.simulate.mesh import HexMesh


def node_grid(mesh: HexMesh):
    """The mesh's nodes as a :class:`brainshift.atlas.basis.NodeGrid` (which does the sampling for both the
    simulator and the deformation atlas)."""
    from brainshift.atlas.basis import NodeGrid

    return NodeGrid(node_grid=mesh.node_grid, shape=mesh.node_grid_shape, origin_vox=np.asarray(mesh.origin_vox),
                    step_vox=np.asarray(mesh.step_vox), image_shape=tuple(mesh.image_shape),
                    spacing_mm=mesh.spacing_mm)


def rasterise_displacement(mesh: HexMesh, u_local_mm: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Dense field on the subject grid from nodal displacements (:meth:`brainshift.atlas.basis.NodeGrid.rasterise`).

    Args:
        mesh: the mesh (its ``image_shape`` / ``image_affine`` define the output grid).
        u_local_mm: ``(n_nodes, 3)`` nodal displacement in the local frame (voxel axes, mm).
        region: ``(I, J, K)`` bool, where the field is non-zero (the brain).

    Returns:
        float32 ``(3, I, J, K)`` field.

    Convention: forward Lagrangian, voxel units along ``i, j, k`` of the subject grid, zero outside ``region``.
    """
    return node_grid(mesh).rasterise(u_local_mm, np.asarray(region, dtype=bool))


def rasterise_elements(mesh: HexMesh, which: np.ndarray) -> np.ndarray:
    """``(I, J, K)`` bool: voxels whose centre lies in one of the selected elements."""
    occ = np.zeros(mesh.grid_shape, dtype=bool)
    occ[tuple(mesh.element_grid[which].T)] = True
    axes = [np.floor((np.arange(n) - mesh.origin_vox[d]) / mesh.step_vox[d]).astype(np.int64)
            for d, n in enumerate(mesh.image_shape)]
    inside = [(a >= 0) & (a < mesh.grid_shape[d]) for d, a in enumerate(axes)]
    out = np.zeros(mesh.image_shape, dtype=bool)
    ii = [np.nonzero(m)[0] for m in inside]
    out[np.ix_(*ii)] = occ[np.ix_(*[axes[d][ii[d]] for d in range(3)])]
    return out
