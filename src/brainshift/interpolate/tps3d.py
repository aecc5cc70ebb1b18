"""True 3-D biharmonic (polyharmonic, kernel ``r``) spline through the keypoints.

In 3-D the biharmonic operator's fundamental solution is proportional to ``r`` (``r^2 log r`` is the 2-D
one), so the 3-D thin-plate spline that minimises the 3-D bending energy is
``u(x) = a_0 + a . x + sum_n w_n phi(|x - c_n|)`` with ``phi(r) = -r`` (Duchon 1977; Wahba 1990). The fit is
the system of :class:`scipy.interpolate.RBFInterpolator` with ``kernel="linear"`` (``-r``) and ``degree=1``
(ridge ``smoothing`` on the kernel diagonal, the affine term on shifted and scaled coordinates), solved once
with LAPACK; scipy's local ``neighbors`` mode is used as is.

Evaluation on a whole grid is the expensive part (``N`` keypoints x ``I J K`` voxels kernel terms: 14 x 10^9
for 2,000 keypoints on the 1 mm MNI152 grid). Small problems are evaluated exactly, in chunks on two threads.
Large ones use a kernel split (the idea of Ewald summation and of particle-mesh methods): ``r = phi_far(r) +
phi_near(r)`` where ``phi_far`` equals ``r`` beyond a radius ``R`` and is a smooth polynomial in ``r^2``
inside it (the degree-4 Taylor polynomial of ``sqrt`` at ``R^2``, so ``phi_far`` is C^4), and
``phi_near = r - phi_far`` vanishes beyond ``R``. The far sum is smooth: it is evaluated exactly on a grid
``h`` voxels coarser (``h ~ R / 4``) and interpolated with separable 4-point (cubic Lagrange) interpolation,
which reproduces cubic polynomials; the near sum is added exactly on the voxels within ``R`` of each keypoint;
the affine term is added exactly everywhere. The result is then checked against exact evaluation at a
sample of voxels (random ones and those next to keypoints); if any differs by more than ``tolerance_vox`` the
split is redone with a finer coarse grid, then replaced by exact evaluation.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from brainshift.errors import BrainshiftError, KeypointError
from brainshift.geometry import check_affine
from brainshift.interpolate._chunks import run_chunks
from brainshift.interpolate.base import check_keypoints, check_shape, register_interpolator

#: Smallest evaluation chunk tried before giving up on the memory budget.
MIN_CHUNK = 1024
_BYTES = 8  # float64 throughout the fit and the evaluation

#: Kernel terms (keypoints x voxels) from which the kernel split is used instead of exact evaluation.
SPLIT_MIN_TERMS = 1 << 28
#: Split radius in units of the smallest voxel spacing, and coarse grid step as a fraction of the radius.
SPLIT_RADIUS_VOXELS = 24.0
SPLIT_STEP_FRACTION = 1.0 / 6.0
#: Voxels (random, plus up to as many next to keypoints) at which the split result is checked exactly.
CHECK_VOXELS = 4096
#: Elements of one ``chunk x N`` float64 work array (2 MB): keeps each thread's work in cache-sized pieces.
_WORK_ELEMENTS = 1 << 18

#: Taylor coefficients of sqrt(1 + e) in e (binomial(1/2, k), k = 0..4): phi_far(r) = R * sum b_k (r^2/R^2 - 1)^k
#: inside the radius (C^4 at R; measured more accurate with 6-point interpolation than degrees 3, 5 and 6).
_SQRT_TAYLOR = (1.0, 0.5, -0.125, 0.0625, -0.0390625)


def tps3d_memory_bytes(n_points: int, chunk: int, neighbors: int | None = None) -> tuple[int, int]:
    """Estimate the memory of :func:`tps3d_interpolate` in bytes: ``(system, per_chunk)``.

    ``system``: the global ``(N+4)^2`` float64 system, counted three times (the matrix, its LU factor and
    a copy); with ``neighbors`` the fit only builds a KD-tree. ``per_chunk``: for a chunk of ``chunk``
    evaluation points, a full ``chunk x (N+4)`` kernel block (the evaluation works in smaller pieces, so
    this is an upper bound) plus coordinates and output; with ``neighbors = k``, one local ``(k+4)^2``
    system per point in the worst case.
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


class _Spline:
    """A fitted 3-D biharmonic spline in local world coordinates (internal).

    ``u(q) = sum_n v_n |q - c_n| + a_0 + a_1..3 . (q / scale)`` for local coordinates ``q = A p + t - shift``
    (``p`` voxel indices, ``A, t`` the affine, ``shift`` the centre of the keypoints' bounding box); ``v =
    -w`` with ``w`` scipy's coefficients of the kernel ``-r``.
    """

    def __init__(self, centers: np.ndarray, values: np.ndarray, smoothing: float, affine: np.ndarray) -> None:
        import scipy.linalg
        from scipy.spatial.distance import cdist
        from threadpoolctl import threadpool_limits

        n = len(centers)
        self.affine = affine
        world = centers @ affine[:3, :3].T + affine[:3, 3]
        lo, hi = world.min(axis=0), world.max(axis=0)
        self.shift = (hi + lo) / 2.0
        scale = (hi - lo) / 2.0
        scale[scale == 0.0] = 1.0
        self.scale = scale
        self.centers = world - self.shift  # local world coordinates (mm, or voxels without an affine)
        lhs = np.zeros((n + 4, n + 4))
        lhs[:n, :n] = -cdist(self.centers, self.centers)
        lhs[np.arange(n), np.arange(n)] += smoothing
        lhs[:n, n] = 1.0
        lhs[:n, n + 1 :] = self.centers / scale
        lhs[n:, :n] = lhs[:n, n:].T
        rhs = np.zeros((n + 4, values.shape[1]))
        rhs[:n] = values
        try:
            with threadpool_limits(limits=1, user_api="blas"):  # threaded LU was 2-20x slower on a busy 2-core CPU
                sol = scipy.linalg.solve(lhs, rhs, check_finite=False)
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise KeypointError(f"expected a solvable tps3d system for {n} keypoints, got: {exc}") from exc
        if not np.all(np.isfinite(sol)):
            raise KeypointError(f"expected a solvable tps3d system for {n} keypoints, got non-finite coefficients")
        self.v = -sol[:n]  # (N, C) weights of +r
        # the affine term as a function of voxel indices: const + g @ p, per component
        a = sol[n:]  # (4, C) for [1, q / scale]
        lin = (affine[:3, :3] / scale[:, None]).T @ a[1:]  # (3 voxel axes, C)
        self.poly_const = a[0] + ((affine[:3, 3] - self.shift) / scale) @ a[1:]
        self.poly_grad = lin

    def local(self, p: np.ndarray) -> np.ndarray:
        """Local world coordinates ``(M, 3)`` of voxel indices ``p (M, 3)``."""
        return p @ self.affine[:3, :3].T + (self.affine[:3, 3] - self.shift)

    def exact(self, p: np.ndarray) -> np.ndarray:
        """The spline at voxel indices ``p (M, 3)`` evaluated term by term; ``(M, C)`` float64."""
        q = self.local(p)
        r = np.zeros((len(q), len(self.centers)))
        for d in range(3):
            t = q[:, d : d + 1] - self.centers[None, :, d]
            t *= t
            r += t
        np.sqrt(r, out=r)
        return r @ self.v + self.poly_const + p @ self.poly_grad


def _voxel_indices(flat: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``(M, 3)`` float64 voxel indices of C-order flat indices."""
    n_j, n_k = shape[1], shape[2]
    p = np.empty((len(flat), 3))
    p[:, 0] = flat // (n_j * n_k)
    p[:, 1] = (flat // n_k) % n_j
    p[:, 2] = flat % n_k
    return p


def _evaluate_exact(spline: _Spline, shape: tuple[int, int, int], chunk: int) -> np.ndarray:
    """Every voxel, term by term, in chunks on the worker threads; ``(C, I, J, K)`` float32."""
    n_vox = math.prod(shape)
    c = spline.v.shape[1]
    out = np.empty((c, n_vox), dtype=np.float32)
    step = max(1, min(int(chunk), _WORK_ELEMENTS // max(1, len(spline.centers))))

    def work(s: int) -> None:
        idx = np.arange(s, min(n_vox, s + step))
        out[:, s : s + len(idx)] = spline.exact(_voxel_indices(idx, shape)).T

    run_chunks(work, range(0, n_vox, step))
    return out.reshape(c, *shape)


def _phi_near(s: np.ndarray, radius: float) -> np.ndarray:
    """Near kernel ``r - phi_far(r)`` of squared distances ``s`` (same dtype): ``sqrt(s)`` minus the degree-4
    Taylor polynomial of ``sqrt`` in ``s`` about ``R^2`` inside the radius, ``0`` outside (C^4 at ``R``)."""
    e = s * (1.0 / radius**2) - 1.0
    t = e * _SQRT_TAYLOR[-1]
    for b in _SQRT_TAYLOR[-2:0:-1]:
        t += b
        t *= e
    t += 1.0
    t *= -radius
    t += np.sqrt(s)
    t[e >= 0.0] = 0.0
    return t


def _add_ball_terms(target: np.ndarray, origin: np.ndarray, steps: np.ndarray, cv: np.ndarray, v: np.ndarray,
                    gram: np.ndarray, radius: float, sign: float, i_range: tuple[int, int]) -> None:
    """``target[:, node] += sign * v_n * phi_near(|A (x_node - c_n)|^2)`` for nodes within ``radius`` of each keypoint.

    The grid's node ``(a, b, c)`` sits at voxel position ``origin + (a, b, c) * steps``; only first-axis node
    indices in ``i_range`` are touched (so threads on disjoint ranges never write the same element).
    ``cv`` are the keypoints in voxel indices, ``gram = A^T A`` the metric of the affine's 3x3 part.
    """
    half = radius * np.sqrt(np.diag(np.linalg.inv(gram)))  # voxel half-widths of the radius ball
    diagonal = np.abs(gram - np.diag(np.diag(gram))).max() <= 1e-12 * np.abs(gram).max()
    top = np.array([i_range[1] - 1, target.shape[2] - 1, target.shape[3] - 1])
    bottom = np.array([i_range[0], 0, 0])
    lo_all = np.maximum(np.ceil((cv - half - origin) / steps), bottom).astype(int)
    hi_all = np.minimum(np.floor((cv + half - origin) / steps), top).astype(int)
    keep = np.nonzero(np.all(hi_all >= lo_all, axis=1))[0]
    dt = target.dtype
    for n in keep:
        lo, hi = lo_all[n], hi_all[n]
        d = [(origin[a] + np.arange(lo[a], hi[a] + 1) * steps[a] - cv[n, a]) for a in range(3)]
        di, dj, dk = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        if diagonal:
            s = (gram[0, 0] * di * di + gram[1, 1] * dj * dj).astype(dt) + (gram[2, 2] * dk * dk).astype(dt)
        else:
            s = ((gram[0, 0] * di * di + gram[1, 1] * dj * dj + 2.0 * gram[0, 1] * di * dj)
                 + (gram[2, 2] * dk * dk + 2.0 * (gram[0, 2] * di + gram[1, 2] * dj) * dk)).astype(dt)
        g = _phi_near(s, radius)
        box = target[:, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        for c in range(target.shape[0]):
            box[c] += g * dt.type(sign * v[n, c])


def _slabs(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous non-empty ranges."""
    edges = np.linspace(0, n, max(1, min(parts, n)) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _lagrange(shape_len: int, step: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """``order``-point Lagrange weights from coarse nodes at ``(c - m) * step`` (``m = order // 2 - 1``) to fine
    samples ``0..n-1``.

    Returns ``(first, weights)``: fine sample ``x`` is ``sum_q weights[x, q] * coarse[first[x] + q]``.
    """
    x = np.arange(shape_len)
    first = x // step
    t = (x % step) / step
    m = order // 2 - 1
    offs = np.arange(order) - m  # node offsets relative to the cell's left node
    w = np.ones((shape_len, order))
    for q in range(order):
        for r in range(order):
            if r != q:
                w[:, q] *= (t - offs[r]) / (offs[q] - offs[r])
    return first, w


def _upsample_axis(coarse: np.ndarray, axis: int, shape_len: int, step: int, order: int) -> np.ndarray:
    """Interpolate ``coarse`` along ``axis`` (nodes at ``(c - m) * step``) to ``shape_len`` samples."""
    first, w = _lagrange(shape_len, step, order)
    bshape = [1] * coarse.ndim
    bshape[axis] = shape_len
    out = np.take(coarse, first, axis=axis) * w[:, 0].reshape(bshape)
    for q in range(1, order):
        out += np.take(coarse, first + q, axis=axis) * w[:, q].reshape(bshape)
    return out


def _evaluate_split(spline: _Spline, shape: tuple[int, int, int], radius: float, steps: tuple[int, int, int],
                    chunk: int, order: int = 6) -> np.ndarray:
    """Far sum on a coarse grid (Lagrange-interpolated), exact near sum, exact affine term: ``(C, I, J, K)`` float32."""
    from brainshift.interpolate._chunks import n_workers

    n_c = len(spline.centers)
    n_comp = spline.v.shape[1]
    a3 = spline.affine[:3, :3]
    gram = a3.T @ a3
    cv = (spline.centers + spline.shift - spline.affine[:3, 3]) @ np.linalg.inv(a3).T  # keypoints, voxel indices
    st = np.asarray(steps, dtype=np.float64)
    # 1. far sum at the coarse nodes: node c of axis a at voxel index (c - m) * step_a (m = order/2 - 1 nodes
    #    of margin before the grid, order/2 after, as the stencil needs). All terms as +r (one GEMM for the
    #    squared distances, one for the weighted sum), then the terms within the radius corrected to phi_far.
    mo = order // 2 - 1
    axes = [(np.arange((s - 1) // h + order) - mo) * float(h) for s, h in zip(shape, steps, strict=True)]
    cshape = tuple(len(x) for x in axes)
    nodes = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    far = np.empty((len(nodes), n_comp))
    step = max(1, min(int(chunk), _WORK_ELEMENTS // n_c))
    c2 = (spline.centers**2).sum(axis=1)
    cm2 = -2.0 * spline.centers.T

    def far_work(s: int) -> None:
        q = spline.local(nodes[s : s + step])
        r = q @ cm2
        r += (q * q).sum(axis=1)[:, None]
        r += c2
        np.maximum(r, 0.0, out=r)
        np.sqrt(r, out=r)
        far[s : s + len(q)] = r @ spline.v

    run_chunks(far_work, range(0, len(nodes), step))
    coarse = np.ascontiguousarray(np.moveaxis(far.reshape(*cshape, n_comp), -1, 0))  # (C, ci, cj, ck)
    origin = np.array([x[0] for x in axes])
    run_chunks(lambda rng: _add_ball_terms(coarse, origin, st, cv, spline.v, gram, radius, -1.0, rng),
               _slabs(cshape[0], n_workers()))
    coarse = _upsample_axis(coarse, 3, shape[2], steps[2], order)
    coarse = _upsample_axis(coarse, 2, shape[1], steps[1], order)

    # 2. first axis by planes, plus the exact affine term, into the float32 output
    out = np.empty((n_comp, *shape), dtype=np.float32)
    first, w = _lagrange(shape[0], steps[0], order)
    jj = np.arange(shape[1], dtype=np.float64)[:, None]
    kk = np.arange(shape[2], dtype=np.float64)[None, :]
    g = spline.poly_grad

    def plane_work(rng: tuple[int, int]) -> None:
        for i in range(*rng):
            f = coarse[:, first[i]] * w[i, 0]
            for q in range(1, order):
                f += coarse[:, first[i] + q] * w[i, q]
            for c in range(n_comp):
                f[c] += spline.poly_const[c] + g[0, c] * i + g[1, c] * jj + g[2, c] * kk
            out[:, i] = f

    run_chunks(plane_work, _slabs(shape[0], 4 * n_workers()))

    # 3. exact near sum v_n * (r - phi_far(r)) on the voxels within the radius of each keypoint
    run_chunks(lambda rng: _add_ball_terms(out, np.zeros(3), np.ones(3), cv, spline.v, gram, radius, 1.0, rng),
               _slabs(shape[0], n_workers()))
    return out


def _check_voxels(spline: _Spline, shape: tuple[int, int, int]) -> np.ndarray:
    """Flat indices of the check sample: random voxels (fixed seed) and the voxels nearest to keypoints."""
    n_vox = math.prod(shape)
    rng = np.random.default_rng(0)
    rand = rng.integers(0, n_vox, size=min(n_vox, CHECK_VOXELS))
    a3 = spline.affine[:3, :3]
    cv = (spline.centers + spline.shift - spline.affine[:3, 3]) @ np.linalg.inv(a3).T
    pick = cv[rng.permutation(len(cv))[:CHECK_VOXELS]]
    ijk = np.clip(np.rint(pick), 0, np.array(shape) - 1).astype(np.int64)
    near = np.ravel_multi_index(tuple(ijk.T), shape)
    return np.unique(np.concatenate([rand, near]))


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
    tolerance_vox: float = 1e-3,
) -> np.ndarray:
    """3-D biharmonic spline (kernel ``phi(r) = -r`` plus affine term), evaluated on every voxel.

    Distances are Euclidean in world millimetres when ``affine`` is given (anisotropic or oblique voxels
    are handled physically), in voxel units otherwise. The displacement components stay in voxel units:
    the spline is linear in its data, so interpolating ``A @ u`` in mm and mapping back with ``A^-1``
    equals interpolating ``u`` directly.

    With ``smoothing = 0`` and no ``neighbors`` the field passes exactly through the keypoints and
    reproduces any affine displacement field exactly everywhere. Small problems (fewer than
    :data:`SPLIT_MIN_TERMS` keypoint x voxel terms, or ``tolerance_vox = 0``) are evaluated term by term;
    large ones with the kernel split of the module docstring, verified against term-by-term evaluation at
    a sample of voxels to ``tolerance_vox`` (2,000 keypoints on the 1 mm MNI152 grid: ~10 s instead of ~2
    min). Before allocating, the memory is estimated (:func:`tps3d_memory_bytes`) and the chunk shrunk to
    fit ``max_memory_gb``.

    Args:
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices, N >= 4, not coplanar.
        disps_vox: ``(N, 3)`` keypoint displacements, voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: optional 4x4 voxel -> RAS mm affine; when given, the spline is built in mm.
        smoothing: ridge ``>= 0`` added to the kernel diagonal (scipy's convention); ``0`` interpolates exactly.
        chunk_size: evaluation points per chunk (upper bound; shrunk to respect ``max_memory_gb``).
        max_memory_gb: memory budget in GB (1e9 bytes) for the system and one evaluation chunk.
        neighbors: if given, each voxel uses only its ``neighbors`` nearest keypoints (scipy's local mode:
            bounded memory for very many keypoints, but slow on a full grid and not a global spline).
        tolerance_vox: largest evaluation error allowed for the fast split evaluation, voxel units (checked
            at a sample of voxels; ``0`` evaluates every voxel term by term).

    Returns:
        ``(3, I, J, K)`` float32 field.

    Convention: forward Lagrangian field in voxel units along ``i, j, k`` on the grid ``shape``.

    Raises:
        KeypointError: fewer than 4 keypoints, coplanar keypoints, conflicting duplicates, non-finite
            values, or a singular system.
        BrainshiftError: the memory estimate exceeds ``max_memory_gb`` (raised before allocating), or an
            invalid option value.
        GeometryError: a bad shape or affine.

    Source: the system of scipy.interpolate.RBFInterpolator (kernel "linear", degree 1); Duchon's
    thin-plate splines; kernel splitting as in Ewald summation.
    """
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
    if isinstance(tolerance_vox, bool) or not (
        isinstance(tolerance_vox, numbers.Real) and math.isfinite(tolerance_vox) and tolerance_vox >= 0
    ):
        raise BrainshiftError(f"expected tps3d tolerance_vox >= 0, got {tolerance_vox!r}")
    shape = check_shape(shape)
    pts, disps = check_keypoints(points_vox, disps_vox)
    n_vox = math.prod(shape)
    chunk = _chunk_that_fits(len(pts), chunk_size, n_vox, float(max_memory_gb) * 1e9, neighbors)
    a = np.eye(4) if affine is None else check_affine(affine)

    if neighbors is not None:
        return _scipy_local(pts, disps, shape, a, float(smoothing), int(neighbors), chunk)

    spline = _Spline(pts, disps, float(smoothing), a)
    if tolerance_vox == 0 or len(pts) * n_vox < SPLIT_MIN_TERMS:
        return _evaluate_exact(spline, shape, chunk)

    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    radius = SPLIT_RADIUS_VOXELS * float(spacing.min())
    check = _check_voxels(spline, shape)
    expected = spline.exact(_voxel_indices(check, shape))
    for refine in (1, 2):
        steps = tuple(max(1, int(radius * SPLIT_STEP_FRACTION / refine / s)) for s in spacing)
        field = _evaluate_split(spline, shape, radius, steps, chunk)
        got = field.reshape(field.shape[0], -1)[:, check].T
        if np.abs(got - expected).max() <= tolerance_vox:
            return field
        del field
    return _evaluate_exact(spline, shape, chunk)


def _scipy_local(pts: np.ndarray, disps: np.ndarray, shape: tuple[int, int, int], a: np.ndarray,
                 smoothing: float, neighbors: int, chunk: int) -> np.ndarray:
    """scipy's local (``neighbors``) RBF mode over the grid in chunks; ``(3, I, J, K)`` float32."""
    from scipy.interpolate import RBFInterpolator

    centers = pts @ a[:3, :3].T + a[:3, 3]
    try:
        rbf = RBFInterpolator(centers, disps, kernel="linear", degree=1, smoothing=smoothing, neighbors=neighbors)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise KeypointError(f"expected a solvable tps3d system for {len(pts)} keypoints, got: {exc}") from exc
    n_vox = math.prod(shape)
    out = np.empty((3, n_vox), dtype=np.float32)
    for s in range(0, n_vox, chunk):
        p = _voxel_indices(np.arange(s, min(n_vox, s + chunk)), shape)
        out[:, s : s + len(p)] = rbf(p @ a[:3, :3].T + a[:3, 3]).T
    return out.reshape(3, *shape)
