"""Voxel-based hexahedral mesh of the brain.

Model choices (documented here, summarised in the README):

- **Element grid.** 8-node trilinear hexahedra of edge ``h = resolution_mm``, aligned with the subject's voxel
  axes. The grid lives in the image's *index space scaled to mm* (the "local" frame: ``x_loc = v * spacing``,
  ``v`` the continuous voxel index), so an oblique image gets an oblique but still cubic mesh; the local frame
  is a rotation (possibly with a reflection) of RAS, ``x_ras = R x_loc + t`` with ``R = A[:3, :3] / spacing``.
  Affines with shear are rejected. The grid covers the bounding box of ``brain | tumour`` and is centred on
  it (the spare fraction of an element is split evenly on both sides, which keeps a mirror-symmetric phantom
  mirror-symmetric).
- **Tissue fractions.** Every element gets the exact volume fractions of the voxelised masks inside it
  (voxels are treated as boxes; the overlap of each element with each voxel is separable per axis, so the
  fractions are three small matrix products). Brain = ``brain_mask | tumour_mask``; tumour = tumour mask;
  ventricles = ventricles mask minus tumour, inside the brain. ``fractions`` are relative to the brain part
  of the element (parenchyma + tumour + ventricles = 1).
- **Which elements.** An element is kept if its brain fraction is >= ``min_brain_fraction`` (0.5: the mesh
  then has the brain's volume to within half an element layer on the boundary). Only the largest
  face-connected component of kept elements is meshed (islands of a real mask would float freely in the skull
  and make the stiffness singular); the number of dropped elements is recorded in ``HexMesh.info``.
- **Nodes.** Only nodes used by an element exist (no orphan nodes); node ids follow the C order of the node
  grid so every neighbour list is sorted. Element connectivity uses VTK's hexahedron order.

Units: millimetres. Source: the voxel-mesh approach of image-based brain biomechanics (Wittek, Miller et al.;
mesh generation as in Yu et al. 2022, CNM doi:10.1002/cnm.3539, simplified to regular hexahedra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from brainshift.errors import GeometryError

#: Corner offsets of a hexahedron in VTK order (local node p sits at element grid index + OFFSETS[p]).
HEX_OFFSETS = np.array(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.int64
)

#: Column order of ``HexMesh.fractions``.
TISSUES = ("parenchyma", "tumour", "ventricles")


@dataclass
class HexMesh:
    """A regular-grid hexahedral mesh in a subject's voxel index space.

    Attributes:
        element_grid: ``(n_elements, 3)`` int64 element indices ``(a, b, c)`` in the element grid.
        elements: ``(n_elements, 8)`` int64 node ids, VTK hexahedron order.
        node_grid: ``(n_nodes, 3)`` int64 node indices in the node grid (element grid + 1 per axis).
        fractions: ``(n_elements, 3)`` float64 parenchyma / tumour / ventricle fractions (rows sum to 1).
        brain_fraction: ``(n_elements,)`` fraction of each element's volume inside the brain.
        element_size_mm: edge ``h`` of every (cubic) element in mm.
        origin_vox: ``(3,)`` continuous voxel index of node ``(0, 0, 0)`` in the subject grid.
        step_vox: ``(3,)`` node spacing in voxels along ``i, j, k`` (``h / spacing``).
        grid_shape: ``(3,)`` number of elements per axis of the element grid.
        image_affine: the subject's 4x4 voxel-to-RAS affine.
        image_shape: the subject grid's ``(I, J, K)``.
        info: provenance (dropped elements, ...).
    """

    element_grid: np.ndarray
    elements: np.ndarray
    node_grid: np.ndarray
    fractions: np.ndarray
    brain_fraction: np.ndarray
    element_size_mm: float
    origin_vox: np.ndarray
    step_vox: np.ndarray
    grid_shape: tuple[int, int, int]
    image_affine: np.ndarray
    image_shape: tuple[int, int, int]
    info: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return int(self.node_grid.shape[0])

    @property
    def n_elements(self) -> int:
        return int(self.elements.shape[0])

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size of the subject grid in mm along ``i, j, k``."""
        return np.sqrt((self.image_affine[:3, :3] ** 2).sum(axis=0))

    @property
    def rotation(self) -> np.ndarray:
        """``R`` (3x3, orthonormal) with ``x_ras - t = R x_loc``: local (voxel axes, mm) to RAS directions."""
        return self.image_affine[:3, :3] / self.spacing_mm

    @property
    def nodes_vox(self) -> np.ndarray:
        """``(n_nodes, 3)`` continuous voxel indices of the nodes in the subject grid."""
        return self.origin_vox + self.node_grid * self.step_vox

    @property
    def nodes_local_mm(self) -> np.ndarray:
        """``(n_nodes, 3)`` node coordinates in the local frame (voxel axes, mm)."""
        return self.nodes_vox * self.spacing_mm

    @property
    def nodes_ras(self) -> np.ndarray:
        """``(n_nodes, 3)`` node coordinates in RAS mm."""
        from brainshift.geometry import voxel_to_ras

        return voxel_to_ras(self.nodes_vox, self.image_affine)

    @property
    def node_grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) + 1 for s in self.grid_shape)  # type: ignore[return-value]

    def element_centres_ras(self) -> np.ndarray:
        """``(n_elements, 3)`` element centres in RAS mm."""
        from brainshift.geometry import voxel_to_ras

        return voxel_to_ras(self.origin_vox + (self.element_grid + 0.5) * self.step_vox, self.image_affine)

    def node_id_grid(self) -> np.ndarray:
        """Node-grid-shaped int64 array of node ids, -1 where no node exists."""
        g = np.full(self.node_grid_shape, -1, dtype=np.int64)
        g[tuple(self.node_grid.T)] = np.arange(self.n_nodes)
        return g

    def occupancy(self) -> np.ndarray:
        """Element-grid-shaped bool array, True where an element exists."""
        occ = np.zeros(self.grid_shape, dtype=bool)
        occ[tuple(self.element_grid.T)] = True
        return occ


def local_frame(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spacing (mm) and rotation ``R`` of a voxel-to-RAS affine; rejects sheared affines.

    Raises:
        GeometryError: if the affine's columns are not orthogonal (shear).
    """
    from brainshift.geometry import check_affine

    a = check_affine(affine)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    rot = a[:3, :3] / spacing
    err = float(np.abs(rot.T @ rot - np.eye(3)).max())
    if err > 1e-4:
        raise GeometryError("expected a voxel-to-RAS affine without shear (orthogonal axes), got "
                            f"|R^T R - I| = {err:.2g}")
    return spacing, rot


def _overlap_matrix(n_elem: int, lo: float, step: float, n_vox: int) -> np.ndarray:
    """``(n_elem, n_vox)`` fraction of each element interval covered by each voxel box along one axis."""
    e_lo = lo + np.arange(n_elem)[:, None] * step
    e_hi = e_lo + step
    v = np.arange(n_vox)[None, :]
    ov = np.clip(np.minimum(e_hi, v + 0.5) - np.maximum(e_lo, v - 0.5), 0.0, None)
    return ov / step


def _block_fraction(mask: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """Separable box average of ``mask`` (cropped) with the three overlap matrices."""
    out = np.tensordot(mats[0], mask.astype(np.float64), axes=(1, 0))  # (a, J, K)
    out = np.tensordot(mats[1], out, axes=(1, 1))  # (b, a, K)
    out = np.tensordot(mats[2], out, axes=(1, 2))  # (c, b, a)
    return np.transpose(out, (2, 1, 0))


def largest_component(occ: np.ndarray) -> tuple[np.ndarray, int]:
    """Largest face-connected component of a boolean element grid and the number of components."""
    from scipy import ndimage

    lab, n = ndimage.label(occ, structure=ndimage.generate_binary_structure(3, 1))
    if n <= 1:
        return occ.copy(), int(n)
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1), int(n)


def build_mesh(brain_mask, tumour_mask=None, ventricles_mask=None, *, resolution_mm: float = 3.0,
               min_brain_fraction: float = 0.5) -> HexMesh:
    """Mesh the brain of a subject with cubic hexahedra of edge ``resolution_mm``.

    Args:
        brain_mask: label :class:`~brainshift.volume.Volume` (non-zero = brain).
        tumour_mask: label Volume on the same grid (non-zero = tumour), or None.
        ventricles_mask: label Volume on the same grid (non-zero = ventricles / CSF), or None.
        resolution_mm: element edge in mm (3.0 default, 2.0 finer).
        min_brain_fraction: an element is kept if at least this fraction of it is brain.

    Returns:
        The :class:`HexMesh` (largest face-connected component of the kept elements).

    Raises:
        GeometryError: masks on different grids, a sheared affine, a bad resolution or no element kept.
    """
    if not (np.isfinite(resolution_mm) and resolution_mm > 0):
        raise GeometryError(f"expected a positive element size in mm, got {resolution_mm}")
    if not 0.0 < min_brain_fraction <= 1.0:
        raise GeometryError(f"expected a minimum brain fraction in (0, 1], got {min_brain_fraction}")
    for m in (tumour_mask, ventricles_mask):
        if m is not None and not m.same_grid(brain_mask):
            raise GeometryError(f"expected all masks on the brain mask's grid {brain_mask.shape}, got {m.shape}")
    spacing, _ = local_frame(brain_mask.affine)
    brain = brain_mask.data > 0
    tum = tumour_mask.data > 0 if tumour_mask is not None else np.zeros_like(brain)
    ven = ventricles_mask.data > 0 if ventricles_mask is not None else np.zeros_like(brain)
    brain = brain | tum
    if not brain.any():
        raise GeometryError("expected a non-empty brain mask, got an empty one")
    idx = np.nonzero(brain)
    bmin = np.array([i.min() for i in idx])
    bmax = np.array([i.max() for i in idx])
    step = resolution_mm / spacing
    extent = (bmax - bmin + 1).astype(np.float64)
    n_el = np.maximum(1, np.ceil(extent / step - 1e-9)).astype(np.int64)
    extra = n_el * step - extent
    lo = bmin - 0.5 - extra / 2.0  # voxel coordinate of the grid's lower edge along each axis
    sl = tuple(slice(int(a), int(b) + 1) for a, b in zip(bmin, bmax, strict=True))
    mats = [_overlap_matrix(int(n_el[d]), float(lo[d] - bmin[d]), float(step[d]), int(extent[d])) for d in range(3)]
    f_brain = _block_fraction(brain[sl], mats)
    f_tum = _block_fraction(tum[sl] & brain[sl], mats)
    f_ven = _block_fraction(ven[sl] & brain[sl] & ~tum[sl], mats)
    kept = f_brain >= min_brain_fraction - 1e-6  # tolerance: exact halves must not flip on round-off
    if not kept.any():
        raise GeometryError(f"expected at least one element with brain fraction >= {min_brain_fraction} at "
                            f"{resolution_mm} mm, got none (brain too small for this resolution)")
    occ, n_comp = largest_component(kept)
    dropped = int(kept.sum() - occ.sum())
    mesh = mesh_from_occupancy(occ, origin_vox=lo, step_vox=step, element_size_mm=float(resolution_mm),
                               image_affine=brain_mask.affine, image_shape=brain_mask.shape)
    eg = tuple(mesh.element_grid.T)
    fb = np.maximum(f_brain[eg], 1e-12)
    ft = np.clip(f_tum[eg] / fb, 0.0, 1.0)
    fv = np.clip(f_ven[eg] / fb, 0.0, 1.0 - ft)
    mesh.fractions = np.stack([1.0 - ft - fv, ft, fv], axis=1)
    mesh.brain_fraction = f_brain[eg]
    mesh.info.update({"n_components": n_comp, "dropped_island_elements": dropped,
                      "min_brain_fraction": float(min_brain_fraction)})
    return mesh


def mesh_from_occupancy(occ: np.ndarray, *, origin_vox, step_vox, element_size_mm: float, image_affine,
                        image_shape) -> HexMesh:
    """A :class:`HexMesh` with one element per True cell of the boolean element grid ``occ``.

    Fractions are set to pure parenchyma; :func:`build_mesh` overwrites them.
    """
    occ = np.asarray(occ, dtype=bool)
    eg = np.argwhere(occ).astype(np.int64)
    nshape = np.array(occ.shape) + 1
    corners = eg[:, None, :] + HEX_OFFSETS[None, :, :]  # (E, 8, 3)
    flat = np.ravel_multi_index(tuple(corners.reshape(-1, 3).T), tuple(nshape))
    uniq, inv = np.unique(flat, return_inverse=True)
    node_grid = np.stack(np.unravel_index(uniq, tuple(nshape)), axis=1).astype(np.int64)
    n_el = eg.shape[0]
    return HexMesh(
        element_grid=eg, elements=inv.reshape(n_el, 8).astype(np.int64), node_grid=node_grid,
        fractions=np.tile([1.0, 0.0, 0.0], (n_el, 1)), brain_fraction=np.ones(n_el),
        element_size_mm=float(element_size_mm), origin_vox=np.asarray(origin_vox, dtype=np.float64),
        step_vox=np.asarray(step_vox, dtype=np.float64), grid_shape=tuple(int(s) for s in occ.shape),
        image_affine=np.asarray(image_affine, dtype=np.float64), image_shape=tuple(int(s) for s in image_shape),
    )


def check_mesh(mesh: HexMesh) -> None:
    """Validate a mesh: element node ids in range, no orphan node, one face-connected component.

    Raises:
        GeometryError: naming the first problem found (orphan nodes, disconnected components, bad ids).
    """
    if mesh.n_elements == 0:
        raise GeometryError("expected a mesh with at least one element, got none")
    if mesh.elements.min() < 0 or mesh.elements.max() >= mesh.n_nodes:
        raise GeometryError(f"expected element node ids in [0, {mesh.n_nodes}), got "
                            f"[{mesh.elements.min()}, {mesh.elements.max()}]")
    used = np.zeros(mesh.n_nodes, dtype=bool)
    used[mesh.elements.ravel()] = True
    if not used.all():
        raise GeometryError(f"expected no orphan nodes, got {int((~used).sum())} node(s) used by no element")
    _, n = largest_component(mesh.occupancy())
    if n != 1:
        raise GeometryError(f"expected one face-connected mesh component, got {n}")


def remove_elements(mesh: HexMesh, remove: np.ndarray) -> tuple[HexMesh, np.ndarray, np.ndarray]:
    """Delete elements, then orphan nodes, then every face-connected piece but the largest.

    Args:
        mesh: the mesh.
        remove: ``(n_elements,)`` bool, True for the elements to delete.

    Returns:
        ``(new_mesh, kept_elements, old_node_ids)``: ``kept_elements`` indexes the old elements kept (after the
        islands cut off by the removal were dropped too), ``old_node_ids[i]`` is the old id of new node ``i``.

    Raises:
        GeometryError: if nothing is left.
    """
    remove = np.asarray(remove, dtype=bool)
    if remove.shape != (mesh.n_elements,):
        raise GeometryError(f"expected a removal mask of shape ({mesh.n_elements},), got {remove.shape}")
    occ = np.zeros(mesh.grid_shape, dtype=bool)
    occ[tuple(mesh.element_grid[~remove].T)] = True
    if not occ.any():
        raise GeometryError("expected some elements left after the removal, got none")
    occ, _ = largest_component(occ)
    keep = occ[tuple(mesh.element_grid.T)]
    kept_idx = np.nonzero(keep)[0]
    old_nodes = np.unique(mesh.elements[kept_idx].ravel())  # sorted: node-grid C order is preserved
    remap = np.full(mesh.n_nodes, -1, dtype=np.int64)
    remap[old_nodes] = np.arange(old_nodes.size)
    new = HexMesh(
        element_grid=mesh.element_grid[kept_idx], elements=remap[mesh.elements[kept_idx]],
        node_grid=mesh.node_grid[old_nodes], fractions=mesh.fractions[kept_idx],
        brain_fraction=mesh.brain_fraction[kept_idx], element_size_mm=mesh.element_size_mm,
        origin_vox=mesh.origin_vox, step_vox=mesh.step_vox, grid_shape=mesh.grid_shape,
        image_affine=mesh.image_affine, image_shape=mesh.image_shape,
        info={**mesh.info, "removed_elements": int(remove.sum()),
              "detached_elements": int(keep.size - remove.sum() - kept_idx.size)},
    )
    return new, kept_idx, old_nodes


def outer_surface_nodes(mesh: HexMesh) -> np.ndarray:
    """Sorted ids of the nodes on the mesh's *outer* surface (faces towards the exterior background).

    Faces towards an enclosed hole (a cavity fully inside the mesh) are not outer surface.
    """
    from scipy import ndimage

    occ = np.pad(mesh.occupancy(), 1)
    lab, _ = ndimage.label(~occ, structure=ndimage.generate_binary_structure(3, 1))
    exterior = lab == lab[0, 0, 0]
    return _faces_towards(mesh, exterior)


def boundary_nodes(mesh: HexMesh) -> np.ndarray:
    """Sorted ids of every node on a boundary face (outer surface and internal holes)."""
    occ = np.pad(mesh.occupancy(), 1)
    return _faces_towards(mesh, ~occ)


def _faces_towards(mesh: HexMesh, target_padded: np.ndarray) -> np.ndarray:
    """Nodes of element faces whose neighbour cell (in the 1-padded element grid) is in ``target_padded``."""
    eg = mesh.element_grid + 1
    nid = mesh.node_id_grid()
    out = []
    for axis in range(3):
        for side in (0, 1):
            nb = eg.copy()
            nb[:, axis] += 1 if side else -1
            hit = target_padded[tuple(nb.T)]
            if not hit.any():
                continue
            sel = HEX_OFFSETS[:, axis] == side  # the 4 corners of that face
            corners = mesh.element_grid[hit][:, None, :] + HEX_OFFSETS[sel][None, :, :]
            out.append(nid[tuple(corners.reshape(-1, 3).T)])
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate(out))


def surface_normals(mesh: HexMesh, nodes: np.ndarray, smoothing_mm: float = 4.0) -> np.ndarray:
    """Outward unit normals ``(len(nodes), 3)`` in the local frame (voxel axes, mm) at the given nodes.

    The normal is minus the gradient of the element occupancy smoothed with a Gaussian of ``smoothing_mm``
    (the mesh's own shape, so normals agree with its faces), evaluated at the node by averaging the gradient
    over the 8 element cells around it. Where the gradient vanishes the direction from the mesh centroid
    is used.
    """
    from scipy import ndimage

    h = mesh.element_size_mm
    occ = np.pad(mesh.occupancy().astype(np.float64), 2)
    sm = ndimage.gaussian_filter(occ, sigma=max(smoothing_mm / h, 0.5), mode="constant")
    grads = np.stack(np.gradient(sm), axis=-1)  # per cell centre, per element step
    g = np.zeros((len(nodes), 3))
    ng = mesh.node_grid[nodes] + 2  # node (a) is the corner between padded cells a+1 and a+2 -> cells a+1, a+2
    for off in HEX_OFFSETS:
        g += grads[tuple((ng - 1 + off).T)]
    n = -g
    norm = np.linalg.norm(n, axis=1)
    bad = norm < 1e-12
    if bad.any():
        c = mesh.nodes_local_mm.mean(axis=0)
        n[bad] = mesh.nodes_local_mm[nodes[bad]] - c
        norm[bad] = np.linalg.norm(n[bad], axis=1)
    return n / np.maximum(norm, 1e-300)[:, None]
