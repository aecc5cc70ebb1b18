"""Linear-elastic finite elements on the voxel hexahedral mesh: reference stiffness, assembly, AMG-CG solve.

- **Element.** 8-node trilinear hexahedron, displacement DOFs ``3 * node + component`` in the mesh's local
  frame (voxel axes, mm). Every element is a cube of edge ``h``, so for isotropic linear elasticity
  ``K_e = h (lambda_e K_lambda + mu_e K_mu)`` with ``K_lambda``, ``K_mu`` the stiffness of the unit cube for
  ``(lambda, mu) = (1, 0)`` and ``(0, 1)``, integrated once with 2x2x2 Gauss points (full integration; with
  ``volumetric_integration="reduced"`` the ``K_lambda`` part uses the 1-point rule: selective reduced
  integration against volumetric locking for nu -> 0.5; the ``mu`` part stays fully integrated so no
  hourglass mode appears).
- **Assembly** (vectorised, no per-element Python loop): node ``a`` only couples with the 27 nodes of its
  3x3x3 neighbourhood, so the matrix is accumulated as 3x3 blocks ``(n_nodes, 27, 3, 3)``: for each of the 64
  local node pairs ``(p, q)`` one fancy-indexed add over all elements (node ``p`` of distinct elements is
  distinct, so no collision), then turned into a block-sparse (BSR, 3x3) matrix. This takes seconds where a
  general per-element assembly took ~13 min for 70,000 hexahedra.
- **Units.** Lengths mm, moduli Pa, so stiffness is in Pa mm and forces in Pa mm^2 (= 1e-6 N); displacements
  come out in mm.
- **Solve.** pyamg smoothed-aggregation AMG (the six rigid-body modes as near-null space, Vanek et al.
  1996) as preconditioner of scipy's conjugate gradient; relative residual tolerance ``rtol``; the
  *true* residual is checked after CG, and an unconverged solve raises :class:`SolverError`.
- **Constraints** (supports, skull contact) are imposed exactly on DOFs in per-node rotated frames
  (see :mod:`brainshift.simulate.contact`): a constrained DOF's row and column are replaced by its diagonal,
  so the matrix keeps its size and symmetry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from brainshift.errors import SolverError
from brainshift.simulate.mesh import HEX_OFFSETS, HexMesh

_GP = 1.0 / np.sqrt(3.0)


def _shape_gradients(xi: np.ndarray) -> np.ndarray:
    """``(8, 3)`` derivatives of the trilinear shape functions of the unit cube at local ``xi`` in [0, 1]^3."""
    o = HEX_OFFSETS.astype(np.float64)
    s = 2.0 * o - 1.0  # +-1
    # N_p = prod_d (1 - o_d + s_d x_d)  on [0,1]^3
    fac = 1.0 - o + s * xi[None, :]  # (8, 3)
    g = np.empty((8, 3))
    for d in range(3):
        others = [e for e in range(3) if e != d]
        g[:, d] = s[:, d] * fac[:, others[0]] * fac[:, others[1]]
    return g


def gauss_points(order: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Gauss points on the unit cube ``(n, 3)`` and weights ``(n,)`` (order 2: 2x2x2, order 1: centre)."""
    if order == 1:
        return np.full((1, 3), 0.5), np.ones(1)
    pts = np.array([0.5 - 0.5 * _GP, 0.5 + 0.5 * _GP])
    g = np.stack(np.meshgrid(pts, pts, pts, indexing="ij"), axis=-1).reshape(-1, 3)
    return g, np.full(8, 1.0 / 8.0)


@lru_cache(maxsize=4)
def reference_gradients(order: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Shape-function gradients of the unit cube at the Gauss points ``(n_gp, 8, 3)`` and the weights."""
    pts, w = gauss_points(order)
    return np.stack([_shape_gradients(p) for p in pts]), w


def _b_matrix(grad: np.ndarray) -> np.ndarray:
    """``(6, 24)`` strain-displacement matrix (Voigt, engineering shear) from ``(8, 3)`` gradients."""
    b = np.zeros((6, 24))
    for p in range(8):
        gx, gy, gz = grad[p]
        c = 3 * p
        b[0, c], b[1, c + 1], b[2, c + 2] = gx, gy, gz
        b[3, c], b[3, c + 1] = gy, gx
        b[4, c + 1], b[4, c + 2] = gz, gy
        b[5, c], b[5, c + 2] = gz, gx
    return b


@lru_cache(maxsize=4)
def unit_cube_stiffness(volumetric_integration: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """``(K_lambda, K_mu)``: 24x24 stiffness of the unit cube for ``lambda = 1`` and ``mu = 1``.

    ``K_e`` of a cube of edge ``h`` with Lame parameters ``(lambda, mu)`` is ``h (lambda K_lambda + mu K_mu)``.
    ``volumetric_integration`` is ``"full"`` (2x2x2 Gauss) or ``"reduced"`` (1 point for ``K_lambda``).
    """
    if volumetric_integration not in ("full", "reduced"):
        raise SolverError(f"expected volumetric_integration 'full' or 'reduced', got {volumetric_integration!r}")
    m = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    d_mu = np.diag([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    grads, w = reference_gradients(2)
    k_mu = sum(wi * _b_matrix(g).T @ d_mu @ _b_matrix(g) for g, wi in zip(grads, w, strict=True))
    order = 2 if volumetric_integration == "full" else 1
    grads_l, w_l = reference_gradients(order)
    k_lam = sum(wi * np.outer(_b_matrix(g).T @ m, _b_matrix(g).T @ m) for g, wi in zip(grads_l, w_l, strict=True))
    return np.asarray(k_lam), np.asarray(k_mu)


def _slot(offset: np.ndarray) -> np.ndarray:
    """Index 0..26 of a neighbour offset in {-1, 0, 1}^3."""
    return (offset[..., 0] + 1) * 9 + (offset[..., 1] + 1) * 3 + (offset[..., 2] + 1)


@dataclass
class BlockPattern:
    """Sparsity of the nodal 3x3-block matrix of a mesh: neighbours within the 3x3x3 node stencil."""

    neighbour: np.ndarray  # (n_nodes, 27) node id of each stencil neighbour, -1 if absent
    coupled: np.ndarray  # (n_nodes, 27) bool: the two nodes share an element
    indptr: np.ndarray
    indices: np.ndarray
    rows: np.ndarray  # block row of every stored block
    diag_pos: np.ndarray  # (n_nodes,) position of the diagonal block in the block list


def block_pattern(mesh: HexMesh) -> BlockPattern:
    """The BSR sparsity pattern of a mesh's stiffness matrix (see the module docstring)."""
    nid = np.pad(mesh.node_id_grid(), 1, constant_values=-1)
    offs = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1], indexing="ij"), axis=-1).reshape(27, 3)
    ng = mesh.node_grid + 1
    neighbour = np.stack([nid[tuple((ng + o).T)] for o in offs], axis=1)
    coupled = np.zeros((mesh.n_nodes, 27), dtype=bool)
    for p in range(8):
        for q in range(8):
            coupled[mesh.elements[:, p], int(_slot(HEX_OFFSETS[q] - HEX_OFFSETS[p]))] = True
    counts = coupled.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = neighbour[coupled].astype(np.int64)
    rows = np.repeat(np.arange(mesh.n_nodes), counts)
    diag_pos = indptr[:-1] + coupled[:, :13].sum(axis=1)  # slot 13 is the node itself
    return BlockPattern(neighbour, coupled, indptr, indices, rows, diag_pos)


def assemble_stiffness(mesh: HexMesh, lam_pa: np.ndarray, mu_pa: np.ndarray, *, volumetric_integration: str = "full",
                       pattern: BlockPattern | None = None, which: np.ndarray | None = None) -> sp.bsr_matrix:
    """Global stiffness ``(3 n_nodes, 3 n_nodes)`` BSR (3x3 blocks) in Pa mm, local frame.

    Args:
        mesh: the mesh (cubes of edge ``mesh.element_size_mm``).
        lam_pa, mu_pa: ``(n_elements,)`` Lame parameters in Pa.
        volumetric_integration: ``"full"`` or ``"reduced"`` (see :func:`unit_cube_stiffness`).
        pattern: a precomputed :func:`block_pattern` of the mesh (computed if None).
        which: optional ``(n_elements,)`` bool: assemble only these elements (on the full pattern).
    """
    k_lam, k_mu = unit_cube_stiffness(volumetric_integration)
    h = mesh.element_size_mm
    sel = np.ones(mesh.n_elements, dtype=bool) if which is None else np.asarray(which, dtype=bool)
    lam = np.asarray(lam_pa, dtype=np.float64)[sel] * h
    mu = np.asarray(mu_pa, dtype=np.float64)[sel] * h
    elements = mesh.elements[sel]
    pat = pattern if pattern is not None else block_pattern(mesh)
    acc = np.zeros((mesh.n_nodes, 27, 3, 3))
    for p in range(8):
        rows = elements[:, p]
        for q in range(8):
            s = int(_slot(HEX_OFFSETS[q] - HEX_OFFSETS[p]))
            kl = k_lam[3 * p:3 * p + 3, 3 * q:3 * q + 3]
            km = k_mu[3 * p:3 * p + 3, 3 * q:3 * q + 3]
            acc[rows, s] += lam[:, None, None] * kl + mu[:, None, None] * km
    data = acc[pat.coupled]
    n = 3 * mesh.n_nodes
    return sp.bsr_matrix((data, pat.indices, pat.indptr), shape=(n, n))


def element_forces(mesh: HexMesh, u: np.ndarray, lam_pa: np.ndarray, mu_pa: np.ndarray, which: np.ndarray,
                   volumetric_integration: str = "full") -> np.ndarray:
    """Nodal internal forces ``(n_nodes, 3)`` (Pa mm^2) of the elements selected by ``which`` for ``u``.

    This is ``K_which @ u`` without assembling ``K_which``.
    """
    k_lam, k_mu = unit_cube_stiffness(volumetric_integration)
    h = mesh.element_size_mm
    el = mesh.elements[which]
    ue = np.asarray(u, dtype=np.float64)[el].reshape(-1, 24)
    fe = (np.asarray(lam_pa)[which] * h)[:, None] * (ue @ k_lam.T) + (np.asarray(mu_pa)[which] * h)[:, None] * (
        ue @ k_mu.T)
    out = np.zeros((mesh.n_nodes, 3))
    np.add.at(out, el.ravel(), fe.reshape(-1, 3))
    return out


def body_force_nodal(mesh: HexMesh, force_density: np.ndarray) -> np.ndarray:
    """Consistent nodal loads ``(n_nodes, 3)`` in Pa mm^2 of a per-element uniform body force.

    Args:
        force_density: ``(n_elements, 3)`` body force per volume in Pa/mm (local frame), e.g. ``rho g``.

    For a trilinear cube every node carries exactly 1/8 of the element's load.
    """
    fe = np.asarray(force_density, dtype=np.float64) * (mesh.element_size_mm ** 3 / 8.0)
    out = np.zeros((mesh.n_nodes, 3))
    for p in range(8):
        np.add.at(out, mesh.elements[:, p], fe)
    return out


def rigid_body_modes(points_mm: np.ndarray) -> np.ndarray:
    """``(3 n, 6)`` near-null space of elasticity: 3 translations and 3 rotations about the centroid."""
    x = np.asarray(points_mm, dtype=np.float64)
    x = x - x.mean(axis=0)
    scale = max(float(np.abs(x).max()), 1e-12)
    x = x / scale
    n = x.shape[0]
    b = np.zeros((n, 3, 6))
    for d in range(3):
        b[:, d, d] = 1.0
    # rotation about axis e: u = e x x
    b[:, 1, 3], b[:, 2, 3] = -x[:, 2], x[:, 1]
    b[:, 0, 4], b[:, 2, 4] = x[:, 2], -x[:, 0]
    b[:, 0, 5], b[:, 1, 5] = -x[:, 1], x[:, 0]
    return b.reshape(3 * n, 6)


@dataclass
class SolveInfo:
    """Diagnostics of one linear solve."""

    iterations: int
    residual: float
    setup_s: float
    solve_s: float


def apply_constraints(k: sp.bsr_matrix, free: np.ndarray, diag_pos: np.ndarray, rows: np.ndarray,
                      diag: np.ndarray | None = None) -> sp.bsr_matrix:
    """Replace the rows/columns of constrained DOFs by their diagonal (``free``: ``(n_nodes, 3)`` bool).

    The block structure is kept; blocks are masked with ``outer(free[row], free[col])``. ``diag`` ``(n_nodes, 3)``
    gives the diagonal values to put on constrained DOFs (default: ``k``'s own diagonal).
    """
    m = free.astype(np.float64)
    held = ~free.all(axis=1)  # nodes with a constrained DOF: only their blocks change
    sel = np.nonzero(held[rows] | held[k.indices])[0]
    data = k.data.copy()
    data[sel] *= m[rows[sel]][:, :, None] * m[k.indices[sel]][:, None, :]
    dg = np.einsum("bii->bi", k.data[diag_pos]) if diag is None else diag
    hn = np.nonzero(held)[0]
    data[diag_pos[hn]] += np.einsum("bi,ij->bij", (1.0 - m[hn]) * dg[hn], np.eye(3))
    return sp.bsr_matrix((data, k.indices, k.indptr), shape=k.shape)


def update_constraints(kc: sp.bsr_matrix, k: sp.bsr_matrix, free: np.ndarray, free_prev: np.ndarray,
                       diag_pos: np.ndarray, rows: np.ndarray, diag: np.ndarray | None = None) -> sp.bsr_matrix:
    """:func:`apply_constraints` for a new ``free`` given ``kc = apply_constraints(k, free_prev, ...)``, in place.

    Only the blocks in the rows and columns of nodes whose constraints changed are recomputed (from ``k``), so
    an active-set iteration that changes a few hundred contact nodes does not copy the whole matrix (measured:
    0.2-2.9 s per copy of a 255k-DOF stiffness on the shared 2-core machine, 0.02 s for the update). The result equals
    ``apply_constraints(k, free, ...)`` bit for bit. ``kc``'s data array is overwritten and returned wrapped in a
    new matrix: nothing else may still use ``kc`` (an AMG hierarchy built from it in float64 would change).
    """
    changed = (free != free_prev).any(axis=1)
    if not changed.any():
        return kc
    data = kc.data
    sel = np.nonzero(changed[rows] | changed[k.indices])[0]
    m = free.astype(np.float64)
    data[sel] = k.data[sel] * (m[rows[sel]][:, :, None] * m[k.indices[sel]][:, None, :])
    cn = np.nonzero(changed & ~free.all(axis=1))[0]
    dg = np.einsum("bii->bi", k.data[diag_pos]) if diag is None else diag
    data[diag_pos[cn]] += np.einsum("bi,ij->bij", (1.0 - m[cn]) * dg[cn], np.eye(3))
    return sp.bsr_matrix((data, kc.indices, kc.indptr), shape=kc.shape)


class AMGSolver:
    """Smoothed-aggregation AMG preconditioned CG for one SPD matrix (pyamg + scipy).

    Settings (each measured on the MNI152 brain at 3 mm, 231,618 DOFs, see bench/RESULTS.md):

    - strength of connection ``symmetric`` with ``theta = 0.05`` (drops the couplings to the soft ventricles
      and across weak material interfaces from the aggregation graph: 25 CG iterations to 1e-8 against 32 with
      pyamg's ``theta = 0``; ``0.1`` and above coarsen worse);
    - forward block Gauss-Seidel before, backward after: a symmetric V-cycle (an SPD preconditioner for CG) at
      half the smoothing cost of pyamg's default symmetric sweeps; no candidate improvement (setup ~40 %
      faster, same CG iteration count); the coarsest level (<= 300 unknowns) by sparse LU;
    - the setup and the cycles run with single-threaded BLAS (threadpoolctl): the Arnoldi spectral-radius
      estimate of the prolongation smoother did vector operations through multithreaded OpenBLAS, which on the
      shared 2-core machine made the setup 2.5-3x slower (4 s against 1.5 s per setup); CG works on vectors
      where threads only add synchronisation;
    - the V-cycle is applied by :meth:`vcycle` (pre-smooth, restrict the residual, recurse, prolong,
      post-smooth), which is pyamg's cycle without the two residual norms pyamg's ``aspreconditioner``
      computes on the finest level for its own stopping test (15 % of the cycle's time).

    Args:
        a: SPD matrix (BSR 3x3 preferred).
        near_null: ``(n, 6)`` rigid-body modes (rows of constrained DOFs zeroed).
        rtol: relative residual tolerance.
        maxiter: maximum CG iterations.
        precision: ``"single"`` (default) runs the V-cycle on float32 copies of the hierarchy (built in float64)
            with pyamg's float32 block Gauss-Seidel kernel; CG and its residual stay float64, so the tolerance
            and the solution are those of a float64 solve (same CG iteration counts on the MNI152 case). The
            cycle reads half the bytes: the MNI152 case's solves take ~5 % less time (bench/RESULTS.md);
            ``"double"`` keeps everything float64.

    Raises:
        ValueError: unknown ``precision``.
    """

    def __init__(self, a: sp.spmatrix, near_null: np.ndarray, rtol: float = 1e-8, maxiter: int = 500,
                 precision: str = "single") -> None:
        import pyamg
        from threadpoolctl import threadpool_limits

        if precision not in ("single", "double"):
            raise ValueError(f"expected precision 'single' or 'double', got {precision!r}")
        t0 = time.perf_counter()
        self.a = a
        self.rtol = float(rtol)
        self.maxiter = int(maxiter)
        self.precision = precision
        # pyamg's setup draws the start vector of its spectral-radius estimates from numpy's legacy global
        # generator: seed it (and restore the caller's state) so a hierarchy, hence a simulation, is
        # reproducible bit for bit
        rng_state = np.random.get_state()  # noqa: NPY002
        np.random.seed(0)  # noqa: NPY002
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                self.ml = pyamg.smoothed_aggregation_solver(
                    a, B=near_null, symmetry="symmetric", strength=("symmetric", {"theta": 0.05}), max_coarse=300,
                    coarse_solver="splu", improve_candidates=None,
                    presmoother=("block_gauss_seidel", {"sweep": "forward"}),
                    postsmoother=("block_gauss_seidel", {"sweep": "backward"}))
        finally:
            np.random.set_state(rng_state)  # noqa: NPY002
        self._single = self._single_levels() if precision == "single" else None
        self.setup_s = time.perf_counter() - t0

    def _single_levels(self) -> list[dict]:
        """float32 copies of every level's A, P, R and block-diagonal inverse (the single-precision cycle)."""
        from pyamg.util.utils import get_block_diag

        out = []
        for lv in self.ml.levels[:-1]:
            a64 = lv.A.tobsr() if lv.A.format == "bsr" else lv.A.tobsr(blocksize=(1, 1))
            bs = a64.blocksize[0]
            dinv = get_block_diag(a64, blocksize=bs, inv_flag=True).astype(np.float32)
            out.append({"A": a64.astype(np.float32), "P": lv.P.astype(np.float32), "R": lv.R.astype(np.float32),
                        "Dinv": dinv, "bs": bs})
        return out

    def _gauss_seidel32(self, d: dict, x: np.ndarray, b: np.ndarray, forward: bool) -> None:
        """One block Gauss-Seidel sweep in float32 (pyamg's C++ kernel, float instantiation), in place."""
        from pyamg import amg_core

        a, bs = d["A"], d["bs"]
        nb = a.shape[0] // bs
        start, stop, step = (0, nb, 1) if forward else (nb - 1, -1, -1)
        amg_core.block_gauss_seidel(a.indptr, a.indices, np.ravel(a.data), x, b, np.ravel(d["Dinv"]),
                                    start, stop, step, bs)

    def vcycle(self, b: np.ndarray, level: int = 0) -> np.ndarray:
        """One V-cycle from a zero initial guess on ``level`` for right-hand side ``b`` (the preconditioner).

        With ``precision="single"`` the cycle runs on float32 copies of the hierarchy (input and output stay
        float64): the preconditioner only needs to approximate the inverse, CG's own matrix-vector products
        and residual stay in float64, so the converged solution and its tolerance are unchanged while the
        cycle reads half the bytes.
        """
        if self._single and level == 0:
            return self._vcycle32(np.asarray(b, np.float32), 0).astype(np.float64)
        levels = self.ml.levels
        lv = levels[level]
        x = np.zeros_like(b)
        lv.presmoother(lv.A, x, b)
        coarse_b = lv.R @ (b - lv.A @ x)
        if level == len(levels) - 2:
            coarse_x = self.ml.coarse_solver(levels[-1].A, coarse_b)
        else:
            coarse_x = self.vcycle(coarse_b, level + 1)
        x += lv.P @ coarse_x
        lv.postsmoother(lv.A, x, b)
        return x

    def _vcycle32(self, b: np.ndarray, level: int) -> np.ndarray:
        d = self._single[level]
        x = np.zeros_like(b)
        self._gauss_seidel32(d, x, b, forward=True)
        coarse_b = d["R"] @ (b - d["A"] @ x)
        if level == len(self._single) - 1:
            coarse_x = np.asarray(self.ml.coarse_solver(self.ml.levels[-1].A, coarse_b.astype(np.float64)),
                                  np.float32)
        else:
            coarse_x = self._vcycle32(coarse_b, level + 1)
        x += d["P"] @ coarse_x
        self._gauss_seidel32(d, x, b, forward=False)
        return x

    def preconditioner(self):
        """The V-cycle as a scipy ``LinearOperator``."""
        from scipy.sparse.linalg import LinearOperator

        n = self.ml.levels[0].A.shape[0]
        if len(self.ml.levels) == 1:
            return LinearOperator((n, n), matvec=lambda b: self.ml.coarse_solver(self.ml.levels[0].A, np.ravel(b)),
                                  dtype=np.float64)
        return LinearOperator((n, n), matvec=lambda b: self.vcycle(np.ravel(b)), dtype=np.float64)

    def solve(self, rhs: np.ndarray, x0: np.ndarray | None = None, a: sp.spmatrix | None = None,
              rtol: float | None = None, maxiter: int | None = None) -> tuple[np.ndarray, SolveInfo]:
        """Solve ``a x = rhs`` (``a`` defaults to the matrix the hierarchy was built for).

        Raises:
            SolverError: if CG stops before the relative residual reaches ``rtol`` (checked on the true
                residual, with a factor 10 of slack for round-off).
        """
        from scipy.sparse.linalg import cg
        from threadpoolctl import threadpool_limits

        mat = self.a if a is None else a
        rtol = self.rtol if rtol is None else float(rtol)
        maxiter = self.maxiter if maxiter is None else int(maxiter)
        t0 = time.perf_counter()
        bnorm = float(np.linalg.norm(rhs))
        if bnorm == 0.0:
            return np.zeros_like(rhs), SolveInfo(0, 0.0, self.setup_s, 0.0)
        its = [0]

        def _count(_xk):
            its[0] += 1

        with threadpool_limits(limits=1, user_api="blas"):
            x, info = cg(mat, rhs, x0=x0, rtol=rtol, atol=0.0, maxiter=maxiter, M=self.preconditioner(),
                         callback=_count)
        res = float(np.linalg.norm(rhs - mat @ x)) / bnorm
        dt = time.perf_counter() - t0
        if info != 0 or not np.isfinite(res) or res > 10.0 * rtol:
            raise SolverError(f"expected the CG solve to reach a relative residual of {rtol:g} within "
                              f"{maxiter} iterations, got {res:.3g} after {its[0]} (info {info})")
        return x, SolveInfo(its[0], res, self.setup_s, dt)


def solve_constrained(k: sp.bsr_matrix, f: np.ndarray, free: np.ndarray, prescribed: np.ndarray | None = None, *,
                      pattern: BlockPattern, near_null: np.ndarray, rtol: float = 1e-8, maxiter: int = 500,
                      x0: np.ndarray | None = None, precision: str = "single") -> tuple[np.ndarray, SolveInfo]:
    """Solve ``K u = f`` with ``u = prescribed`` on the constrained DOFs (``free == False``).

    Args:
        k: BSR stiffness ``(3n, 3n)``.
        f: ``(n, 3)`` nodal loads.
        free: ``(n, 3)`` bool, False for a constrained DOF.
        prescribed: ``(n, 3)`` values of the constrained DOFs (zero if None).
        pattern: the mesh's :class:`BlockPattern`.
        near_null: ``(3n, 6)`` rigid-body modes.
        precision: of the AMG preconditioner's cycle (:class:`AMGSolver`); CG itself is float64.

    Returns:
        ``(u (n, 3), SolveInfo)``.

    Raises:
        SolverError: under-constrained (the constraints do not remove the 6 rigid modes) or unconverged.
    """
    check_rigid_modes_removed(near_null, free)
    g = np.zeros_like(f) if prescribed is None else np.where(free, 0.0, prescribed)
    kc = apply_constraints(k, free, pattern.diag_pos, pattern.rows)
    rhs = np.where(free, f - (k @ g.ravel()).reshape(-1, 3), 0.0)
    dg = np.einsum("bii->bi", k.data[pattern.diag_pos])
    rhs = np.where(free, rhs, dg * g)
    b = near_null * free.reshape(-1, 1)
    solver = AMGSolver(kc, b, rtol=rtol, maxiter=maxiter, precision=precision)
    x, info = solver.solve(rhs.ravel(), x0=None if x0 is None else x0.ravel())
    return x.reshape(-1, 3), info


def check_rigid_modes_removed(near_null: np.ndarray, free: np.ndarray) -> None:
    """Raise :class:`SolverError` if the constrained DOFs leave a rigid-body mode (or more) free.

    The constrained rows of the rigid-mode matrix must have rank 6.
    """
    fixed_rows = ~free.ravel()
    if not fixed_rows.any():
        raise SolverError("expected supports (fixed nodes or active skull contact) that remove the 6 rigid-body "
                          "modes, got no constrained degree of freedom: the model is under-constrained")
    sub = near_null[fixed_rows]
    s = np.linalg.svd(sub.T @ sub, compute_uv=False)
    if s[-1] <= 1e-10 * max(s[0], 1e-300):
        rank = int((s > 1e-10 * s[0]).sum())
        raise SolverError(f"expected supports that remove all 6 rigid-body modes, got constraints of rank {rank}: "
                          "the model is under-constrained")
