"""True 3-D biharmonic (polyharmonic, kernel ``r``) spline through the keypoints.

In 3-D the biharmonic operator's fundamental solution is proportional to ``r`` (``r^2 log r`` is the 2-D
one), so the 3-D thin-plate spline that minimises the 3-D bending energy is
``u(x) = a_0 + a . x + sum_n w_n phi(|x - c_n|)`` with ``phi(r) = -r`` (Duchon 1977; Wahba 1990). scipy's
:class:`scipy.interpolate.RBFInterpolator` offers exactly this as ``kernel="linear"`` (documented as
``-r``, conditionally positive definite of order 1) with ``degree=1`` for the affine term, plus ridge
``smoothing`` and a local ``neighbors`` mode; we use it for the fit and the evaluation and add what the
pipeline needs around it: millimetre coordinates, chunked evaluation and a memory estimate made before
anything large is allocated.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.interpolate.base import check_keypoints, check_shape, register_interpolator
from brainshift.io.frames import check_affine, voxel_to_ras

#: Smallest evaluation chunk tried before giving up on the memory budget.
MIN_CHUNK = 1024
_BYTES = 8  # float64 throughout the fit and the evaluation


def tps3d_memory_bytes(n_points: int, chunk: int, neighbors: int | None = None) -> tuple[int, int]:
    """Estimate the memory of :func:`tps3d_interpolate` in bytes: ``(system, per_chunk)``.

    ``system``: the global ``(N+4)^2`` float64 system, counted three times (the matrix, its LU factor and
    the scaled copy scipy builds); with ``neighbors`` the fit only builds a KD-tree. ``per_chunk``: for a
    chunk of ``chunk`` evaluation points, a full ``chunk x (N+4)`` kernel block (scipy evaluates in smaller
    pieces, so this is an upper bound) plus coordinates and output; with ``neighbors = k``, one local
    ``(k+4)^2`` system per point in the worst case.
    """
    n = int(n_points)
    if neighbors is None:
        system = 3 * _BYTES * (n + 4) ** 2
        per_chunk = _BYTES * chunk * (n + 4 + 12)
    else:
        k = min(int(neighbors), n)
        system = _BYTES * n * 12
        per_chunk = _BYTES * chunk * ((k + 4) ** 2 + 2 * k + 12)
    return system, per_chunk


def _chunk_that_fits(n_points: int, chunk_size: int, n_vox: int, max_bytes: float, neighbors: int | None) -> int:
    """Largest chunk ``<= chunk_size`` whose estimate fits ``max_bytes``, or raise before allocating."""
    chunk = max(1, min(int(chunk_size), n_vox))
    system, per_chunk = tps3d_memory_bytes(n_points, chunk, neighbors)
    if system + per_chunk <= max_bytes:
        return chunk
    smallest = min(chunk, MIN_CHUNK)
    per_voxel = tps3d_memory_bytes(n_points, 1, neighbors)[1]
    fit = int((max_bytes - system) // per_voxel)
    if fit >= smallest:
        return fit
    need_gb = (system + per_voxel * smallest) / 1e9
    raise BrainshiftError(
        f"tps3d with {n_points} keypoints needs about {need_gb:.3g} GB, more than the "
        f"{max_bytes / 1e9:.3g} GB allowed; use fewer keypoints or the 'linear'/'tps' interpolator"
        + ("" if neighbors is not None else " (or tps3d's neighbors option)")
    )


@register_interpolator("tps3d")
def tps3d_interpolate(
    points_vox: np.ndarray,
    disps_vox: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    *,
    smoothing: float = 0.0,
    chunk_size: int = 1 << 16,
    max_memory_gb: float = 2.0,
    neighbors: int | None = None,
) -> np.ndarray:
    """3-D biharmonic spline (kernel ``phi(r) = -r`` plus affine term), evaluated on every voxel.

    Distances are Euclidean in world millimetres when ``affine`` is given (anisotropic or oblique voxels
    are handled physically), in voxel units otherwise. The displacement components stay in voxel units:
    the spline is linear in its data, so interpolating ``A @ u`` in mm and mapping back with ``A^-1``
    equals interpolating ``u`` directly.

    With ``smoothing = 0`` and no ``neighbors`` the field passes exactly through the keypoints and
    reproduces any affine displacement field exactly everywhere. The evaluation runs over the grid in
    chunks; before allocating, the memory is estimated (:func:`tps3d_memory_bytes`) and the chunk shrunk
    to fit ``max_memory_gb``.

    Args:
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices, N >= 4, not coplanar.
        disps_vox: ``(N, 3)`` keypoint displacements, voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: optional 4x4 voxel -> RAS mm affine; when given, the spline is built in mm.
        smoothing: ridge ``>= 0`` added by scipy to the kernel diagonal; ``0`` interpolates exactly.
        chunk_size: evaluation points per chunk (upper bound; shrunk to respect ``max_memory_gb``).
        max_memory_gb: memory budget in GB (1e9 bytes) for the system and one evaluation chunk.
        neighbors: if given, each voxel uses only its ``neighbors`` nearest keypoints (scipy's local mode:
            bounded memory for very many keypoints, but slow on a full grid and not a global spline).

    Returns:
        ``(3, I, J, K)`` float32 field.

    Convention: forward Lagrangian field in voxel units along ``i, j, k`` on the grid ``shape``.

    Raises:
        KeypointError: fewer than 4 keypoints, coplanar keypoints, conflicting duplicates, non-finite
            values, or a singular system.
        BrainshiftError: the memory estimate exceeds ``max_memory_gb`` (raised before allocating), or an
            invalid option value.
        GeometryError: a bad shape or affine.

    Source: scipy.interpolate.RBFInterpolator (kernel "linear", degree 1); Duchon's thin-plate splines.
    """
    from scipy.interpolate import RBFInterpolator

    if isinstance(smoothing, bool) or not (
        isinstance(smoothing, numbers.Real) and math.isfinite(smoothing) and smoothing >= 0
    ):
        raise BrainshiftError(f"expected tps3d smoothing >= 0, got {smoothing!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise BrainshiftError(f"expected tps3d chunk_size a positive integer, got {chunk_size!r}")
    if isinstance(max_memory_gb, bool) or not (
        isinstance(max_memory_gb, numbers.Real) and math.isfinite(max_memory_gb) and max_memory_gb > 0
    ):
        raise BrainshiftError(f"expected tps3d max_memory_gb > 0, got {max_memory_gb!r}")
    if neighbors is not None and (
        isinstance(neighbors, bool) or not isinstance(neighbors, numbers.Integral) or neighbors < 4
    ):
        raise BrainshiftError(f"expected tps3d neighbors None or an integer >= 4, got {neighbors!r}")
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)
    n_vox = math.prod(shape)
    chunk = _chunk_that_fits(len(pts), chunk_size, n_vox, float(max_memory_gb) * 1e9, neighbors)

    a = None if affine is None else check_affine(affine)
    centers = pts if a is None else voxel_to_ras(pts, a)
    try:
        rbf = RBFInterpolator(
            centers,
            disps,
            kernel="linear",
            degree=1,
            smoothing=float(smoothing),
            neighbors=None if neighbors is None else int(neighbors),
        )
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise KeypointError(f"expected a solvable tps3d system for {len(pts)} keypoints, got: {exc}") from exc

    n_i, n_j, n_k = shape
    out = np.empty((3, n_vox), dtype=np.float32)
    for s in range(0, n_vox, chunk):
        idx = np.arange(s, min(n_vox, s + chunk))
        xyz = np.empty((len(idx), 3))
        xyz[:, 0] = idx // (n_j * n_k)
        xyz[:, 1] = (idx // n_k) % n_j
        xyz[:, 2] = idx % n_k
        if a is not None:
            xyz = xyz @ a[:3, :3].T + a[:3, 3]
        out[:, s : s + len(idx)] = rbf(xyz).T
    return out.reshape(3, n_i, n_j, n_k)
