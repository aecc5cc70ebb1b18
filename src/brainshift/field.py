"""Displacement-field conventions and small exact utilities.

Convention (used by every function in brainshift that takes or returns a field): a displacement field is a
float32 array ``(3, I, J, K)`` on a voxel grid with a voxel-to-RAS ``affine``; it is *forward Lagrangian*:
the preop point at voxel ``p`` moves to ``p + u(p)`` in the intraoperative state; components are in voxel
units along ``i, j, k``. The world (RAS mm) displacement is ``A @ u``, ``A`` the affine's 3x3 part.
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import GeometryError
from brainshift.io.frames import check_affine


def check_field(field: np.ndarray, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Validate a ``(3, I, J, K)`` field (and its grid shape if given); return it as float32.

    Raises:
        GeometryError: wrong rank, wrong component count, grid mismatch or non-finite values.
    """
    f = np.asarray(field)
    if f.ndim != 4 or f.shape[0] != 3:
        raise GeometryError(f"expected a displacement field of shape (3, I, J, K), got {f.shape}")
    if shape is not None and tuple(f.shape[1:]) != tuple(shape):
        raise GeometryError(f"expected a displacement field on the image grid {tuple(shape)}, got {tuple(f.shape[1:])}")
    if not np.all(np.isfinite(f)):
        raise GeometryError("expected a finite displacement field, found NaN or inf values")
    return f.astype(np.float32, copy=False)


def field_voxel_to_ras(field_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(3, I, J, K)`` voxel-unit field -> ``(3, I, J, K)`` RAS mm displacement (``A @ u``).

    Convention: forward Lagrangian in both; only the component frame changes.
    """
    a = check_affine(affine)[:3, :3]
    return np.einsum("ab,b...->a...", a, field_vox).astype(np.float32)


def field_ras_to_voxel(field_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(3, I, J, K)`` RAS mm displacement -> voxel-unit field (``A^-1 @ d``). Convention: forward Lagrangian."""
    a_inv = np.linalg.inv(check_affine(affine)[:3, :3])
    return np.einsum("ab,b...->a...", a_inv, field_ras).astype(np.float32)


def displacement_magnitude_mm(field_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``(I, J, K)`` magnitude in mm of a voxel-unit forward Lagrangian field."""
    return np.sqrt((field_voxel_to_ras(field_vox, affine) ** 2).sum(axis=0))


def jacobian_determinant(field_vox: np.ndarray) -> np.ndarray:
    """Jacobian determinant ``det(I + grad u)`` of the map ``p -> p + u(p)``, shape ``(I, J, K)``.

    Convention: forward Lagrangian field in voxel units. Because ``u`` and the derivatives are both taken in
    voxel units, ``det(I + grad_vox u_vox) = det(A (I + grad_vox u_vox) A^-1)`` equals the determinant in
    world mm for any affine ``A``: no spacing is needed. Derivatives are central differences
    (``numpy.gradient``, one-sided at the border). Values <= 0 mean folding.
    """
    f = check_field(field_vox)
    # g[c][d] = d u_c / d x_d (float32, central differences); J = I + g
    g = [list(np.gradient(f[c], axis=(0, 1, 2))) for c in range(3)]
    for c in range(3):
        g[c][c] += 1.0
    det = g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
    det -= g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
    det += g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0])
    return det.astype(np.float32, copy=False)


def voxel_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """``(3, I, J, K)`` float32 array of voxel indices ``(i, j, k)`` of every grid point."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
