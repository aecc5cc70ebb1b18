"""Loads and supports of a brain-shift case: surgical approach, gravity, CSF drainage, craniotomy, brainstem.

Choices (after the facts file, Yu et al. 2022):

- **Tumour centre**: centroid of the tumour mask (RAS mm).
- **Entry point**: the brain-surface point nearest the tumour centre among the surface points *above* it,
  where above means in the superior half-space of the tumour centre (RAS ``z`` greater than the centre's): the
  patient's head is positioned so that the approach faces up, and a surgeon does not enter from below the
  lesion. The surface is the outer boundary of the 1 mm brain mask (holes filled), so the entry point does not
  depend on the mesh resolution. If no surface point is above (a lesion at the vertex), the nearest surface
  point overall is used.
- **Gravity**: the unit vector from the entry point toward the tumour centre, perturbed uniformly on the
  spherical cap of half-angle ``max_gravity_angle_deg`` around it (``cos theta`` uniform).
- **CSF drainage**: the drained CSF level is a plane perpendicular to gravity at depth ``drainage_level_mm``
  below the highest brain point along gravity (depth = ``(x - x_top) . g``). Tissue above it carries its full
  weight ``rho g``; tissue below it floats in CSF and carries ``buoyant_weight_fraction`` of it (0 by
  default: tissue and CSF both 1000 kg/m^3 in the facts; e.g. 0.04 for 1040 kg/m^3 tissue). An element cut
  by the plane gets the fraction of its extent along gravity above the plane.
- **Craniotomy**: outer-surface nodes within ``craniotomy_radius_mm`` (straight-line distance) of the entry
  point are free (no skull).
- **Brainstem**: nodes within ``brainstem_fixation_depth_mm`` of the most inferior mesh node (RAS ``z``) are
  fixed in all directions (the cut brainstem / spinal cord at the foramen magnum).
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import GeometryError
from brainshift.geometry import voxel_to_ras


def tumour_centre_ras(tumour_mask) -> np.ndarray:
    """Centroid (RAS mm) of a tumour label Volume.

    Raises:
        GeometryError: if the mask is empty.
    """
    idx = np.argwhere(np.asarray(tumour_mask.data) > 0)
    if idx.size == 0:
        raise GeometryError("expected a non-empty tumour mask to place the surgical approach, got an empty one")
    return voxel_to_ras(idx.mean(axis=0, keepdims=True), tumour_mask.affine)[0]


def brain_surface_points_ras(brain_mask, tumour_mask=None) -> np.ndarray:
    """``(n, 3)`` RAS mm centres of the outer-surface voxels of ``brain | tumour`` (holes filled)."""
    from scipy import ndimage

    b = np.asarray(brain_mask.data) > 0
    if tumour_mask is not None:
        b = b | (np.asarray(tumour_mask.data) > 0)
    if not b.any():
        raise GeometryError("expected a non-empty brain mask, got an empty one")
    b = ndimage.binary_fill_holes(b)
    surf = b & ~ndimage.binary_erosion(b, border_value=0)
    return voxel_to_ras(np.argwhere(surf).astype(np.float64), brain_mask.affine)


def entry_point_ras(brain_mask, tumour_mask, centre_ras: np.ndarray) -> np.ndarray:
    """The brain-surface point nearest ``centre_ras`` in its superior half-space (see the module docstring)."""
    pts = brain_surface_points_ras(brain_mask, tumour_mask)
    above = pts[:, 2] > centre_ras[2]
    cand = pts[above] if above.any() else pts
    d = np.linalg.norm(cand - centre_ras, axis=1)
    return cand[int(np.argmin(d))]


def perturb_direction(direction: np.ndarray, max_angle_deg: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, float]:
    """A unit vector uniform on the spherical cap of half-angle ``max_angle_deg`` around ``direction``.

    Returns:
        ``(vector, angle_deg)``, the angle between the draw and ``direction``.
    """
    cos_max = np.cos(np.deg2rad(max_angle_deg))
    cos_t = rng.uniform(cos_max, 1.0)
    phi = rng.uniform(0.0, 2.0 * np.pi)
    return tilted_direction(direction, cos_t, phi)


def tilted_direction(direction: np.ndarray, cos_t: float, phi: float) -> tuple[np.ndarray, float]:
    """The unit vector at polar angle ``arccos(cos_t)`` from ``direction`` and azimuth ``phi`` (radians) around it.

    The azimuth is measured in a fixed frame orthogonal to ``direction`` (its cross product with the x axis, or
    the y axis when ``direction`` is nearly along x). Returns ``(vector, angle_deg)``.
    """
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    helper = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(d, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    sin_t = np.sqrt(max(0.0, 1.0 - cos_t * cos_t))
    v = cos_t * d + sin_t * (np.cos(phi) * e1 + np.sin(phi) * e2)
    v /= np.linalg.norm(v)
    return v, float(np.rad2deg(np.arccos(np.clip(v @ d, -1.0, 1.0))))


def brain_depth_range_mm(brain_mask, gravity_ras: np.ndarray) -> tuple[float, float]:
    """``(top, extent)``: min projection of the brain voxels on ``gravity_ras`` and the brain's extent along it."""
    idx = np.argwhere(np.asarray(brain_mask.data) > 0).astype(np.float64)
    if idx.size == 0:
        raise GeometryError("expected a non-empty brain mask, got an empty one")
    proj = voxel_to_ras(idx, brain_mask.affine) @ np.asarray(gravity_ras, dtype=np.float64)
    return float(proj.min()), float(proj.max() - proj.min())


def weight_fraction_per_element(centres_ras: np.ndarray, element_size_mm: float, gravity_ras: np.ndarray,
                                top_mm: float, drainage_level_mm: float, buoyant_weight_fraction: float
                                ) -> np.ndarray:
    """``(n_elements,)`` fraction of its full weight each element carries under CSF drainage.

    ``1`` above the drained level, ``buoyant_weight_fraction`` below, linear in between over the element's
    extent along gravity (``h * |g|_1``).
    """
    g = np.asarray(gravity_ras, dtype=np.float64)
    depth = centres_ras @ g - top_mm
    half = 0.5 * element_size_mm * float(np.abs(g).sum())
    above = np.clip((drainage_level_mm - (depth - half)) / (2.0 * half), 0.0, 1.0)
    return buoyant_weight_fraction + (1.0 - buoyant_weight_fraction) * above


def brainstem_nodes(nodes_ras: np.ndarray, depth_mm: float) -> np.ndarray:
    """Ids of the nodes within ``depth_mm`` of the most inferior node (RAS z)."""
    z = nodes_ras[:, 2]
    return np.nonzero(z <= z.min() + depth_mm + 1e-9)[0]


def falx_nodes(nodes_ras: np.ndarray, element_size_mm: float, midline_x_mm: float, ventricles_top_mm: float
               ) -> np.ndarray:
    """Ids of the nodes of the falx cerebri modelled as a fixed plane: the midsagittal node layer above the
    ventricles.

    The falx is a stiff dural fold in the interhemispheric fissure from the skull down to just above the corpus
    callosum; as a fixed plane it keeps the medial surfaces of the hemispheres from moving across the midline
    while they slide along it (Miga et al. 2001 and Dumpuri et al. 2007 model it as a sliding boundary). The
    plane is ``x = midline_x_mm`` (RAS); its nodes are those within half an element of it, above
    ``ventricles_top_mm`` (RAS z) plus one element.

    Args:
        nodes_ras: ``(n, 3)`` node positions (RAS mm).
        element_size_mm: element edge (mm).
        midline_x_mm: RAS x of the midsagittal plane.
        ventricles_top_mm: RAS z of the top of the lateral ventricles.

    Returns:
        ``(m,)`` int64 node ids (empty if none qualify).
    """
    p = np.asarray(nodes_ras, dtype=np.float64)
    near = np.abs(p[:, 0] - midline_x_mm) <= 0.5 * element_size_mm + 1e-9
    high = p[:, 2] >= ventricles_top_mm + element_size_mm
    return np.nonzero(near & high)[0].astype(np.int64)
