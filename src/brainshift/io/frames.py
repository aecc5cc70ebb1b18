"""Coordinate frames at the file boundary: RAS <-> LPS (ITK / Slicer), frame names, ITK geometry and axis order.

The pure voxel <-> RAS geometry (affine checks, spacing) lives in :mod:`brainshift.geometry`.

Frames used in brainshift:

- ``voxel``: 0-based continuous voxel indices ``(i, j, k)`` in nibabel's on-disk axis order; the centre of
  voxel ``i`` is at ``i`` (not ``i + 0.5``).
- ``ras``: world millimetres, x to the Right, y to the Anterior, z to the Superior (nibabel, NIfTI).
- ``lps``: world millimetres, x to the Left, y to the Posterior, z to the Superior (ITK, DICOM, Slicer
  files that declare LPS). ``lps = diag(-1, -1, 1) @ ras``.

A 4x4 ``affine`` always maps voxel ``(i, j, k, 1)`` to RAS mm (nibabel's convention).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.geometry import (  # noqa: F401  (ras_to_voxel, voxel_to_ras: still imported from here by simulate/ and interpolate/tps3d.py)
    check_affine,
    ras_to_voxel,
    voxel_to_ras,
    voxel_vectors_to_ras,
)

Frame = Literal["voxel", "ras", "lps"]
FRAMES: tuple[str, ...] = ("voxel", "ras", "lps")

#: Flip between RAS and LPS; its own inverse.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def check_frame(frame: str) -> str:
    """Validate a frame name (``voxel``, ``ras`` or ``lps``)."""
    f = str(frame).lower()
    if f not in FRAMES:
        raise BrainshiftError(f"expected a coordinate frame in {FRAMES}, got {frame!r}")
    return f


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Flip ``(N, 3)`` points (or vectors) between RAS and LPS; the map is its own inverse."""
    p = np.asarray(points, dtype=np.float64)
    return p * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps


def points_to_voxel(points: np.ndarray, frame: str, affine: np.ndarray) -> np.ndarray:
    """Convert ``(N, 3)`` points given in ``frame`` (voxel | ras | lps) to continuous voxel indices."""
    frame = check_frame(frame)
    p = np.asarray(points, dtype=np.float64)
    if frame == "voxel":
        return p.copy()
    if frame == "lps":
        p = lps_to_ras(p)
    return ras_to_voxel(p, affine)


def vectors_to_voxel(vectors: np.ndarray, frame: str, affine: np.ndarray) -> np.ndarray:
    """Convert ``(N, 3)`` displacement vectors given in ``frame`` to voxel units along ``i, j, k``.

    A world displacement ``d_ras`` corresponds to ``A^-1 d_ras`` in voxel units, ``A`` the affine's 3x3 part.
    """
    frame = check_frame(frame)
    v = np.asarray(vectors, dtype=np.float64)
    if frame == "voxel":
        return v.copy()
    if frame == "lps":
        v = lps_to_ras(v)
    a = check_affine(affine)
    return v @ np.linalg.inv(a[:3, :3]).T


def affine_to_itk(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """ITK geometry ``(origin, spacing, direction)`` in LPS for a voxel-to-RAS ``affine``.

    ITK indexes an image as ``(x, y, z) = (i, j, k)`` (the same axis order as nibabel), so no axis is
    permuted here; only the world frame is flipped. ``direction`` is the row-major 3x3 matrix.

    Raises:
        GeometryError: a sheared affine (no orthonormal ITK direction exists;
            :func:`brainshift.geometry.check_no_shear`).
    """
    from brainshift.geometry import check_no_shear

    check_no_shear(affine)  # an ITK direction matrix is orthonormal: never write a geometry readers would change
    a = RAS_TO_LPS_4 @ check_affine(affine)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    direction = a[:3, :3] / spacing
    return tuple(a[:3, 3].tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """Voxel-to-RAS 4x4 affine from ITK ``origin`` (LPS mm), ``spacing`` (mm) and row-major ``direction``."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return RAS_TO_LPS_4 @ lps


def array_to_itk_order(array: np.ndarray) -> np.ndarray:
    """nibabel ``(I, J, K[, C])`` array -> the ``(K, J, I[, C])`` array SimpleITK's GetImageFromArray expects.

    SimpleITK's NumPy view is C-ordered ``(z, y, x)`` while its index is ``(x, y, z) = (i, j, k)``.
    """
    if array.ndim == 3:
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0, 3)))
    raise GeometryError(f"expected a 3-D array (I, J, K) or a 4-D vector array (I, J, K, C), got {array.shape}")


def array_from_itk_order(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`array_to_itk_order`: SimpleITK ``(K, J, I[, C])`` -> nibabel ``(I, J, K[, C])``."""
    if array.ndim == 3:
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    if array.ndim == 4:
        return np.ascontiguousarray(np.transpose(array, (2, 1, 0, 3)))
    raise GeometryError(f"expected a 3-D or 4-D SimpleITK array, got {array.shape}")


def field_to_world_vectors(field_vox: np.ndarray, affine: np.ndarray, frame: str = "lps") -> np.ndarray:
    """Voxel-unit field ``(3, I, J, K)`` -> ``(I, J, K, 3)`` float64 world displacement vectors in ``frame``.

    ``frame`` is ``"ras"`` (``A @ u``) or ``"lps"`` (``diag(-1, -1, 1) @ A @ u``, what ITK stores).

    Convention: forward or backward alike; only the component frame and the axis layout change (components
    move from the first to the last axis, the layout of ITK vector images and NIfTI vector intents).
    """
    frame = check_frame(frame)
    if frame == "voxel":
        raise GeometryError("expected a world frame 'ras' or 'lps' for field vectors, got 'voxel'")
    m = check_affine(affine)[:3, :3]
    if frame == "lps":
        m = RAS_TO_LPS @ m
    f = np.asarray(field_vox)
    if f.ndim != 4 or f.shape[0] != 3:
        raise GeometryError(f"expected a displacement field of shape (3, I, J, K), got {f.shape}")
    return np.einsum("ab,bijk->ijka", m, f.astype(np.float64, copy=False))


def world_vectors_to_field(vectors: np.ndarray, affine: np.ndarray, frame: str = "lps") -> np.ndarray:
    """Inverse of :func:`field_to_world_vectors`: ``(I, J, K, 3)`` world vectors -> ``(3, I, J, K)`` float32.

    Convention: the components become voxel units along ``i, j, k`` (``A^-1 @ d_ras``); forward or backward
    alike.
    """
    frame = check_frame(frame)
    if frame == "voxel":
        raise GeometryError("expected a world frame 'ras' or 'lps' for field vectors, got 'voxel'")
    m = check_affine(affine)[:3, :3]
    if frame == "lps":
        m = RAS_TO_LPS @ m
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 4 or v.shape[3] != 3:
        raise GeometryError(f"expected world vectors of shape (I, J, K, 3), got {v.shape}")
    return np.einsum("ab,ijkb->aijk", np.linalg.inv(m), v).astype(np.float32)


def points_from_voxel(points_vox: np.ndarray, frame: str, affine: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`points_to_voxel`: ``(N, 3)`` voxel indices -> points in ``frame`` (voxel | ras | lps)."""
    frame = check_frame(frame)
    p = np.asarray(points_vox, dtype=np.float64)
    if frame == "voxel":
        return p.copy()
    ras = voxel_to_ras(p, affine)
    return ras_to_lps(ras) if frame == "lps" else ras


def vectors_from_voxel(vectors_vox: np.ndarray, frame: str, affine: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`vectors_to_voxel`: ``(N, 3)`` voxel-unit vectors -> vectors in ``frame``."""
    frame = check_frame(frame)
    v = np.asarray(vectors_vox, dtype=np.float64)
    if frame == "voxel":
        return v.copy()
    ras = voxel_vectors_to_ras(v, affine)
    return ras_to_lps(ras) if frame == "lps" else ras
