"""Displacement-field conventions and small exact utilities.

Convention (used by every function in brainshift that takes or returns a field): a displacement field is a
float32 array ``(3, I, J, K)`` on a voxel grid with a voxel-to-RAS ``affine``; it is *forward Lagrangian*:
the preop point at voxel ``p`` moves to ``p + u(p)`` in the intraoperative state; components are in voxel
units along ``i, j, k``. The world (RAS mm) displacement is ``A @ u``, ``A`` the affine's 3x3 part.
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import GeometryError
from brainshift.geometry import check_affine, mask_inside


def check_field(field: np.ndarray, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Validate a ``(3, I, J, K)`` field (and its grid shape if given); return it as float32.

    Raises:
        GeometryError: wrong rank, wrong component count, grid mismatch, a dtype that is not real numbers
            (complex, text, objects), or values that are not finite as float32 (NaN, inf, or beyond
            float32's range, which the conversion would turn into inf).
    """
    f = np.asarray(field)
    if f.ndim != 4 or f.shape[0] != 3:
        raise GeometryError(f"expected a displacement field of shape (3, I, J, K), got {f.shape}")
    if shape is not None and tuple(f.shape[1:]) != tuple(shape):
        raise GeometryError(f"expected a displacement field on the image grid {tuple(shape)}, got {tuple(f.shape[1:])}")
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise GeometryError(f"expected a displacement field of real numbers (float32), got dtype {f.dtype}")
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf: refused below
        f = f.astype(np.float32, copy=False)
    if not np.all(np.isfinite(f)):
        raise GeometryError("expected a finite displacement field, found NaN or inf values (or values beyond "
                            "float32's range)")
    return f


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


def jacobian_determinant(field_vox: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Jacobian determinant ``det(I + grad u)`` of the map ``p -> p + u(p)``, shape ``(I, J, K)``.

    Because ``u`` and the derivatives are both taken in voxel units, ``det(I + grad_vox u_vox) =
    det(A (I + grad_vox u_vox) A^-1)`` equals the determinant in world mm for any affine ``A``: no spacing is
    needed. Values <= 0 mean folding.

    Without ``mask`` the derivatives are central differences over the whole grid (``numpy.gradient``,
    one-sided at the grid border).

    With ``mask`` (mask-aware differences), the derivative at a voxel of the mask along an axis uses only
    neighbours inside the mask: the central difference when both neighbours along that axis are in the mask,
    the one-sided (forward or backward) difference when only one is, and zero when neither is (that axis then
    contributes the identity column). Voxels outside the mask get ``1.0`` (no volume change; they are not
    measured). Why: fields that are defined on a region and cut to zero outside it (the simulator's ground
    truth is zero outside the brain and filled inside the resection cavity) jump at the region's border; a
    central difference straddling the jump gives non-physical values (often <= 0) in the one-voxel rim, which
    are an artefact of the differencing, not folding. Inside the region and away from its border both rules
    agree exactly; with an all-true mask the result equals the unmasked one (one-sided at the grid border
    too). Only the mask's bounding box is processed, with about a dozen float32 arrays of that box extra
    (under 0.5 GB for a full 182 x 218 x 182 mask, 0.3 GB for a brain-sized one).

    Convention: forward Lagrangian field in voxel units along ``i, j, k``, ``(3, I, J, K)``.

    Args:
        field_vox: ``(3, I, J, K)`` displacement field, voxel units.
        mask: optional ``(I, J, K)`` bool (or 0/1) array of the voxels where the field is defined.

    Returns:
        ``(I, J, K)`` float32 determinants (``1.0`` outside ``mask`` when one is given).

    Raises:
        GeometryError: bad field, or a mask whose shape is not the field's grid.
    """
    f = check_field(field_vox)
    if mask is None:
        # g[c][d] = d u_c / d x_d (float32, central differences); J = I + g
        g = [list(np.gradient(f[c], axis=(0, 1, 2))) for c in range(3)]
        for c in range(3):
            g[c][c] += 1.0
        det = g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
        det -= g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
        det += g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0])
        return det.astype(np.float32, copy=False)

    m = np.asarray(mask)
    if m.shape != f.shape[1:]:
        raise GeometryError(f"expected a Jacobian mask of the field's grid shape {tuple(f.shape[1:])}, "
                            f"got {tuple(m.shape)}")
    m = m.astype(bool, copy=False)
    out = np.ones(f.shape[1:], dtype=np.float32)
    if not m.any():
        return out
    # the mask's bounding box holds every voxel and every neighbour the rule may use
    idx = np.nonzero(m)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    mb = m[box]
    fb = f[(slice(None),) + box]
    # columns of J = I + grad u: col_d[c] = delta_cd + d u_c / d x_d; det J = col_0 . (col_1 x col_2), with
    # col_0 made one component at a time (memory: 6 stored columns + a few temporaries of the box)
    b = [_masked_derivative(fb[c], mb, 1) for c in range(3)]
    b[1] += 1.0
    c = [_masked_derivative(fb[k], mb, 2) for k in range(3)]
    c[2] += 1.0
    det = np.zeros(mb.shape, dtype=np.float32)
    for k in range(3):
        k1, k2 = (k + 1) % 3, (k + 2) % 3
        a_k = _masked_derivative(fb[k], mb, 0)
        if k == 0:
            a_k += 1.0
        cross = b[k1] * c[k2]
        cross -= b[k2] * c[k1]
        a_k *= cross
        det += a_k
        del a_k, cross
    det[~mb] = 1.0
    out[box] = det
    return out


def _masked_derivative(values: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Mask-aware derivative of ``values`` (float32, ``(I, J, K)``) along ``axis`` (voxel units).

    Each grid edge between two neighbours that are both in ``mask`` carries the difference across it; a voxel
    averages the edges it has (two: central difference; one: one-sided; none: zero). Outside ``mask`` the
    result is zero.
    """
    n = values.shape[axis]
    if n < 2:
        return np.zeros(values.shape, dtype=np.float32)

    def sl(start, stop):
        s = [slice(None)] * values.ndim
        s[axis] = slice(start, stop)
        return tuple(s)

    edge = mask[sl(1, None)] & mask[sl(None, -1)]  # both ends in the mask, shape n-1 along axis
    count = np.zeros(values.shape, dtype=np.float32)
    count[sl(None, -1)] += edge
    count[sl(1, None)] += edge
    np.maximum(count, 1.0, out=count)
    inv = np.reciprocal(count, out=count)  # 1 (one edge or none) or 0.5 (two edges)
    diff = np.diff(values, axis=axis)
    diff *= edge
    out = np.zeros(values.shape, dtype=np.float32)
    out[sl(None, -1)] += diff
    out[sl(1, None)] += diff
    out *= inv
    return out


#: Lower clip of det J before taking its logarithm in :func:`jacobian_stats`.
LOG_JAC_CLIP = 1e-9


def mask_bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of a non-empty ``(I, J, K)`` mask grown by ``margin`` voxels (clipped to the
    grid); with ``margin=1`` central differences at every mask voxel see the same neighbours as on the grid."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def jacobian_stats(field_vox: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Plausibility of a field: folding and local volume-change spread, over a mask.

    ``det J = det(I + grad u)`` from :func:`jacobian_determinant` (central differences over the grid, voxel
    units, equal to the world-mm determinant for any affine), evaluated on the mask's bounding box plus one
    voxel (the same values at every mask voxel as on the whole grid, less work). Over the voxels of ``mask``:

    - ``pct_jacobian_nonpositive``: percentage (0-100) of voxels with ``det J <= 0`` (folding);
    - ``std_log_jac``: population standard deviation of ``log(clip(det J, 1e-9, None))``; the clip keeps
      folded voxels finite (they count as ``log(1e-9) = -20.7``, which deliberately inflates the spread),
      as in the Learn2Reg evaluation, except that we do not add their offset of 3;
    - ``min_jacobian``: the smallest ``det J``.

    Convention: forward Lagrangian, voxel units, ``(3, I, J, K)``.

    Args:
        field_vox: field ``(3, I, J, K)``.
        mask: ``(I, J, K)`` mask, nonzero = inside (:func:`brainshift.geometry.mask_inside`); None means the
            whole grid.

    Returns:
        ``{"pct_jacobian_nonpositive": float, "std_log_jac": float, "min_jacobian": float}``.

    Raises:
        GeometryError: bad field, mask of another shape, an empty mask or one with negative / NaN values.
    """
    f = check_field(field_vox)
    if mask is None:
        m = np.ones(f.shape[1:], dtype=bool)
    else:
        m = np.asarray(mask)
        if m.shape != f.shape[1:]:
            raise GeometryError(f"expected a mask on the field's grid {tuple(f.shape[1:])}, got shape {m.shape}")
        m = mask_inside(m)
    if not m.any():
        raise GeometryError("expected a non-empty mask for the Jacobian statistics, got one with no voxel set")
    box = mask_bounding_box(m)
    det = jacobian_determinant(f[(slice(None),) + box])[m[box]].astype(np.float64)
    log_jac = np.log(np.clip(det, LOG_JAC_CLIP, None))
    return {
        "pct_jacobian_nonpositive": float(100.0 * np.mean(det <= 0)),
        "std_log_jac": float(np.std(log_jac)),
        "min_jacobian": float(det.min()),
    }


def field_statistics(field_vox: np.ndarray, affine: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Summary of a field over a mask: max / mean displacement (mm) and :func:`jacobian_stats`.

    Convention: forward Lagrangian, voxel units ``(3, I, J, K)`` on the grid of ``affine``.

    Returns:
        ``max_displacement_mm``, ``mean_displacement_mm`` (world mm, ``|A u|``), ``pct_jacobian_nonpositive``,
        ``min_jacobian``, ``std_log_jac``.

    Raises:
        GeometryError: bad field or affine, or an empty mask / a mask on another grid.
    """
    f = check_field(field_vox)
    stats = jacobian_stats(f, mask)
    m = mask_inside(mask)
    box = mask_bounding_box(m, margin=0)
    mag = displacement_magnitude_mm(f[(slice(None),) + box], affine)[m[box]]
    return {"max_displacement_mm": float(mag.max()), "mean_displacement_mm": float(mag.mean()), **stats}


def voxel_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """``(3, I, J, K)`` float32 array of voxel indices ``(i, j, k)`` of every grid point."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
