"""Pure grid geometry: affine checks, voxel size, voxel <-> RAS mapping.

The lowest layer beside :mod:`brainshift.errors`: :mod:`brainshift.volume`, :mod:`brainshift.field` and
:mod:`brainshift.io` import from here, never the other way round. RAS <-> LPS and ITK conversions live in
:mod:`brainshift.io.frames` (the ITK boundary).

Convention: a 4x4 ``affine`` maps voxel ``(i, j, k, 1)`` (0-based, nibabel's on-disk axis order, the centre of
voxel ``i`` at ``i``) to RAS+ millimetres (nibabel's convention).
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import GeometryError


def check_affine(affine: np.ndarray) -> np.ndarray:
    """Return ``affine`` as a float64 4x4 array.

    Raises:
        GeometryError: not 4x4, not finite, or singular (``|det A| < 1e-12``).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise GeometryError(f"expected a 4x4 voxel-to-RAS affine, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise GeometryError("expected an invertible, finite 4x4 voxel-to-RAS affine, got a singular one")
    return a


def apply_affine(matrix4: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``(N, 3)`` points mapped by a 4x4 matrix: ``p @ M[:3, :3].T + M[:3, 3]`` (float64).

    Raises:
        GeometryError: points not of shape ``(N, 3)``.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise GeometryError(f"expected points of shape (N, 3), got {p.shape}")
    return p @ matrix4[:3, :3].T + matrix4[:3, 3]


def voxel_to_ras(points_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map ``(N, 3)`` continuous voxel indices to ``(N, 3)`` RAS mm with the voxel-to-RAS ``affine``."""
    return apply_affine(check_affine(affine), points_vox)


def ras_to_voxel(points_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Map ``(N, 3)`` RAS mm to ``(N, 3)`` continuous 0-based voxel indices (inverse of the affine)."""
    return apply_affine(np.linalg.inv(check_affine(affine)), points_ras)


def voxel_vectors_to_ras(vectors_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Convert ``(N, 3)`` voxel-unit displacement vectors to RAS mm: ``d_ras = A @ d_vox``."""
    a = check_affine(affine)
    return np.asarray(vectors_vox, dtype=np.float64) @ a[:3, :3].T


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along ``i, j, k``: the norms of the affine's first three columns, ``(3,)`` float64."""
    a = check_affine(affine)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def max_shear(affine: np.ndarray) -> float:
    """Largest ``|cos|`` of the angle between two voxel axes in world space (0 for an orthogonal grid).

    ITK images and transforms carry an orthonormal direction matrix, so a grid whose axes are not orthogonal
    (a sheared affine, e.g. a gantry-tilted CT) has no exact ITK geometry.
    """
    a = check_affine(affine)[:3, :3]
    u = a / np.linalg.norm(a, axis=0, keepdims=True)
    g = np.abs(u.T @ u - np.eye(3))
    return float(g.max())


#: Largest ``|cos|`` between voxel axes accepted as orthogonal (float32-stored affines are exact to ~1e-7).
SHEAR_TOLERANCE = 1e-4


def check_no_shear(affine: np.ndarray, what: str = "the image grid") -> None:
    """Raise :class:`GeometryError` if ``affine``'s voxel axes are not orthogonal (see :func:`max_shear`)."""
    s = max_shear(affine)
    if s > SHEAR_TOLERANCE:
        angle = float(np.degrees(np.arccos(min(1.0, s))))
        raise GeometryError(f"expected {what} with orthogonal voxel axes (ITK's .h5 and NIfTI readers such as "
                            f"SimpleITK cannot represent shear), got axes {angle:.2f} degrees apart from "
                            f"perpendicular by {90.0 - angle:.2f}; resample the image onto an orthogonal grid, or "
                            f"write -f npz")


def mask_inside(mask, what: str = "mask") -> np.ndarray:
    """The inside of a brain / tumour / region mask array: every nonzero voxel (the convention of SimpleITK, ANTs
    and FSL masks; every label of a label map counts). The one binarisation of a mask in brainshift
    (:func:`brainshift.volume.mask_inside` applies it to a :class:`~brainshift.volume.Volume`).

    Args:
        mask: an array of booleans or real numbers, any shape.
        what: how messages name the mask (``"brain mask"``, ``"--mask"``).

    Returns:
        bool array of the mask's shape.

    Raises:
        GeometryError: values that are not real numbers, NaN or inf, or negative values (a signed image, e.g. a
            difference image or a field component, given as a mask: neither ``> 0`` nor ``!= 0`` would be
            what was meant), naming the count and the smallest value.
    """
    data = np.asarray(mask)
    if data.dtype.kind in "bu":
        return data.astype(bool, copy=False) if data.dtype.kind == "b" else data != 0
    if data.dtype.kind not in "if":
        raise GeometryError(f"expected a {what} of numbers (nonzero = inside), got {data.dtype} values")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise GeometryError(f"expected a {what} of finite values (nonzero = inside), got NaN or inf")
    negative = data < 0
    if negative.any():
        raise GeometryError(f"expected a {what} of non-negative values (nonzero = inside), got "
                            f"{int(negative.sum())} negative voxels (down to {float(data.min()):g}); a signed "
                            f"image rather than a mask?")
    return data != 0
