"""Where the brain meets the skull: surface points and outward normals of an atlas's brain, outside its craniotomies.

The contact models of the simulator (:mod:`brainshift.simulate.contact`) differ in whether the brain may leave
the skull (unilateral: it may separate; bilateral: it slides without separating; no-slip: it sticks), but none
lets it move **out through** the skull: away from the craniotomy opening the normal displacement of the brain's
surface is zero or inward. The fit's ``+contact`` prior (:mod:`brainshift.atlas.fit`) uses these points to
condition its whole prior (atlas part and Gaussian-process part) on having no normal motion there (a linear,
Gaussian stand-in for the sliding condition ``u . n = 0``; the inequality of unilateral contact is not
Gaussian), weighed against the free prior by the marginal likelihood, so that a deformation no atlas member
spans (e.g. a contact model the atlas lacks) can be extrapolated as the skull allows rather than as free space
would. Inverse-problem fits with contact boundary conditions: Ji et al., Med Image Anal 2009.

Frames: points in the atlas's local frame (voxel axes ``i, j, k`` of the preop image, mm from voxel
``(0, 0, 0)``, :meth:`brainshift.atlas.basis.NodeGrid.positions_mm`); normals unit vectors in the same frame,
pointing out of the brain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainshift.atlas.basis import DeformationAtlas
from brainshift.errors import InputFileError

#: Spacing (mm) of the surface points kept: one per cube of this side (12 against 16 mm chosen on 18 validation
#: cases, bench/RESULTS.md session 25: the same mean ratio with exact keypoints, worst case 0.96 against 1.36 with
#: 0.5 mm noise; about 800 points on an adult brain).
SKULL_POINT_SPACING_MM = 12.0
#: Surface points this far (mm) beyond a member's craniotomy radius still count as the opening (the simulator
#: smooths its normals over 4 mm and its craniotomy is a set of whole elements).
CRANIOTOMY_MARGIN_MM = 6.0
#: Smoothing (mm, Gaussian sigma) of the mesh's node occupancy before its gradient gives the normals.
NORMAL_SMOOTHING_MM = 4.0


@dataclass
class SkullContact:
    """Points of the brain surface held by the skull (outside every member's craniotomy).

    Attributes:
        points_mm: ``(M, 3)`` positions, local frame (mm).
        normals: ``(M, 3)`` unit outward normals, local frame.
    """

    points_mm: np.ndarray
    normals: np.ndarray

    def __len__(self) -> int:
        return int(len(self.points_mm))


def craniotomies(atlas: DeformationAtlas) -> list[tuple[np.ndarray, float]]:
    """The distinct craniotomies of the atlas's members: ``[(entry point RAS mm (3,), radius mm)]``, from the
    members' ``entry_point_ras`` and ``craniotomy_radius_mm`` (a grid design's members share the build config's
    ``craniotomy_radius_mm``; atlases built before the entry points were recorded: empty).

    Raises:
        InputFileError: a member's entry point or radius that is not 3 finite numbers / a positive number (a
            damaged or hand-edited ``atlas.json``)."""
    config = atlas.info.get("config") if isinstance(atlas.info, dict) else None
    default = config.get("craniotomy_radius_mm") if isinstance(config, dict) else None
    seen: dict[tuple, float] = {}
    for m in atlas.members:
        entry, radius = m.get("entry_point_ras"), m.get("craniotomy_radius_mm", default)
        if entry is None or radius is None:
            return []
        try:
            point = np.asarray(entry, dtype=np.float64).reshape(3)
            r = float(radius)
        except (TypeError, ValueError):
            point, r = np.full(3, np.nan), np.nan
        if not (np.all(np.isfinite(point)) and np.isfinite(r) and r > 0):
            raise InputFileError(f"expected each member of the atlas (atlas.json) to have entry_point_ras of 3 "
                                 f"finite numbers and a positive craniotomy_radius_mm, got {entry!r} and "
                                 f"{radius!r} in member {m.get('solve', '?')!r}: a damaged atlas, build it again")
        key = tuple(round(float(v), 3) for v in point)
        seen[key] = max(seen.get(key, 0.0), r)
    return [(np.asarray(k, dtype=np.float64), r) for k, r in seen.items()]


def skull_contact(atlas: DeformationAtlas, *, spacing_mm: float | None = None,
                  margin_mm: float | None = None) -> SkullContact:
    """Surface nodes of the atlas's mesh away from every member's craniotomy, one per ``spacing_mm`` cube, with
    outward normals (the negative gradient of the mesh's node occupancy smoothed by :data:`NORMAL_SMOOTHING_MM`,
    as the simulator smooths its contact normals).

    A node is on the surface when one of its six node-grid neighbours is missing; it is in a craniotomy when its
    straight-line distance to that craniotomy's entry point is below the radius plus ``margin_mm`` (the
    simulator's rule, :mod:`brainshift.simulate.loads`). An atlas without recorded craniotomies gives no points
    (the fit then uses its free prior alone).

    Args:
        atlas: the atlas.
        spacing_mm: thinning of the surface points (mm; default :data:`SKULL_POINT_SPACING_MM`).
        margin_mm: widening of each craniotomy (mm; default :data:`CRANIOTOMY_MARGIN_MM`).

    Returns:
        :class:`SkullContact` (possibly empty).
    """
    from scipy import ndimage

    spacing_mm = SKULL_POINT_SPACING_MM if spacing_mm is None else float(spacing_mm)
    margin_mm = CRANIOTOMY_MARGIN_MM if margin_mm is None else float(margin_mm)
    crans = craniotomies(atlas)
    empty = SkullContact(np.zeros((0, 3)), np.zeros((0, 3)))
    if not crans:
        return empty
    nodes = atlas.nodes
    exists = np.zeros(tuple(nodes.shape), dtype=bool)
    exists[tuple(nodes.node_grid.T)] = True
    padded = np.pad(exists, 1)
    inner = np.ones_like(exists)
    for axis in range(3):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    g = nodes.node_grid
    surface = ~inner[tuple(g.T)]
    ids = np.flatnonzero(surface)
    pos_mm = nodes.positions_mm(ids)
    vox = nodes.origin_vox + g[ids] * nodes.step_vox
    ras = vox @ atlas.affine[:3, :3].T + atlas.affine[:3, 3]
    keep = np.ones(len(ids), dtype=bool)
    for entry, radius in crans:
        keep &= np.linalg.norm(ras - entry, axis=1) >= radius + margin_mm
    pos_mm, node_idx = pos_mm[keep], g[ids][keep]
    if not len(pos_mm):
        return empty
    cell = np.floor(pos_mm / float(spacing_mm)).astype(np.int64)
    _, first = np.unique(cell, axis=0, return_index=True)
    first = np.sort(first)
    pos_mm, node_idx = pos_mm[first], node_idx[first]
    # normals of the mesh itself: the node occupancy smoothed over NORMAL_SMOOTHING_MM, its gradient by central
    # differences along the node-grid axes (mm per node step: step_vox * spacing)
    step_mm = np.asarray(nodes.step_vox, dtype=np.float64) * np.asarray(nodes.spacing_mm, dtype=np.float64)
    smooth = ndimage.gaussian_filter(np.pad(exists, 1).astype(np.float64), NORMAL_SMOOTHING_MM / step_mm)
    at = node_idx + 1
    grad = np.empty((len(at), 3))
    for a in range(3):
        hi, lo = at.copy(), at.copy()
        hi[:, a] += 1
        lo[:, a] -= 1
        grad[:, a] = (smooth[tuple(hi.T)] - smooth[tuple(lo.T)]) / (2.0 * step_mm[a])
    norm = np.linalg.norm(grad, axis=1)
    ok = norm > 1e-9
    return SkullContact(points_mm=pos_mm[ok], normals=-grad[ok] / norm[ok, None])
