"""Frictionless unilateral contact of the brain surface with the rigid skull, by an active-set method.

Method (exact normal constraints, no penalty):

- Every contact node ``a`` (outer brain-surface nodes, minus the craniotomy and the fixed brainstem nodes)
  gets a local orthonormal frame ``Q_a = [t1, t2, n]`` with ``n`` its outward normal (from the smoothed mesh
  occupancy, :func:`brainshift.simulate.mesh.surface_normals`). The stiffness and loads are rotated once into
  these frames (``K' = Q^T K Q`` block by block), so the normal displacement ``u_n = n . u`` is a DOF.
- The skull sits at the node's initial position: the gap condition is ``u_n <= 0`` (no outward motion), the
  contact force (reaction) ``r_n = (K u - f)_n`` must be compressive, ``r_n <= 0`` (the skull pushes inward),
  and ``r_n u_n = 0``. Tangential DOFs are free (frictionless sliding).
- Active set: start with every contact node *active* (``u_n = 0`` imposed exactly, as a Dirichlet condition in
  the rotated frame); solve; *release* active nodes whose reaction is tensile (``r_n > force_tol``) and
  *activate* inactive nodes that moved outward (``u_n > gap_tol``); repeat until the set does not change
  (at most ``max_iterations``, else :class:`SolverError`). The skull is a small-displacement obstacle (the gap
  is measured along the reference normal), consistent with linear elasticity.
- Each iteration reuses the AMG hierarchy of the first one as CG preconditioner (the matrices differ only
  in a few surface rows), rebuilding it only if CG then needs more than ``3 x + 20`` the first iteration count.

Source: the classical active-set (primal-dual) treatment of Signorini contact (Hueber & Wohlmuth 2005,
simplified to node-to-rigid-obstacle constraints); frames as in standard skew-support handling in FE codes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from brainshift.errors import SolverError
from brainshift.simulate.fem import AMGSolver, BlockPattern, SolveInfo, apply_constraints, check_rigid_modes_removed


def node_frames(n_nodes: int, contact_nodes: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """``(n_nodes, 3, 3)`` per-node frames: identity, or ``[t1, t2, n]`` (columns) at contact nodes."""
    q = np.tile(np.eye(3), (n_nodes, 1, 1))
    n = np.asarray(normals, dtype=np.float64)
    n = n / np.linalg.norm(n, axis=1, keepdims=True)
    # a helper axis not parallel to n
    helper = np.where((np.abs(n[:, 0]) < 0.9)[:, None], [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    t1 = np.cross(n, helper)
    t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
    t2 = np.cross(n, t1)
    q[contact_nodes] = np.stack([t1, t2, n], axis=2)
    return q


def rotate_matrix(k: sp.bsr_matrix, frames: np.ndarray, rows: np.ndarray, touched: np.ndarray) -> sp.bsr_matrix:
    """``Q^T K Q`` for block-diagonal ``Q`` (``frames``), only blocks whose row or column node is ``touched``."""
    data = k.data.copy()
    sel = touched[rows] | touched[k.indices]
    qa = frames[rows[sel]]
    qb = frames[k.indices[sel]]
    data[sel] = np.einsum("bji,bjk,bkl->bil", qa, data[sel], qb, optimize=True)
    return sp.bsr_matrix((data, k.indices.copy(), k.indptr.copy()), shape=k.shape)


def to_frames(v: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Nodal vectors ``(n, 3)`` from the local frame into the per-node frames (``Q_a^T v_a``)."""
    return np.einsum("nji,nj->ni", frames, v)


def from_frames(v: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Nodal vectors ``(n, 3)`` from the per-node frames back to the local frame (``Q_a v_a``)."""
    return np.einsum("nij,nj->ni", frames, v)


@dataclass
class ContactResult:
    """Outcome of a contact solve.

    Attributes:
        u: ``(n_nodes, 3)`` displacement in the local frame (mm).
        active: ``(n_contact,)`` bool, final active set (in contact with the skull).
        iterations: active-set iterations.
        solves: per-iteration :class:`SolveInfo`.
        max_outward_mm: largest outward normal displacement of a contact node (penetration of the skull).
        reaction_n: ``(n_contact,)`` normal contact reactions (Pa mm^2; negative = compressive).
        amg_setups: how many AMG hierarchies were built.
    """

    u: np.ndarray
    active: np.ndarray
    iterations: int
    solves: list[SolveInfo] = field(default_factory=list)
    max_outward_mm: float = 0.0
    reaction_n: np.ndarray | None = None
    amg_setups: int = 0
    changes: list[int] = field(default_factory=list)


def solve_contact(k: sp.bsr_matrix, f: np.ndarray, pattern: BlockPattern, near_null: np.ndarray,
                  contact_nodes: np.ndarray, normals: np.ndarray, fixed_nodes: np.ndarray, *,
                  rtol: float = 1e-8, maxiter: int = 500, max_iterations: int = 30, gap_tol_mm: float = 1e-3,
                  force_tol_rel: float = 1e-3, x0: np.ndarray | None = None, active0: np.ndarray | None = None,
                  external: np.ndarray | None = None, progress: bool = False) -> ContactResult:
    """Linear elasticity with fixed nodes and frictionless unilateral skull contact (active set).

    Args:
        k: ``(3n, 3n)`` BSR stiffness (local frame, Pa mm).
        f: ``(n, 3)`` nodal loads (Pa mm^2).
        pattern: the mesh's :class:`~brainshift.simulate.fem.BlockPattern`.
        near_null: ``(3n, 6)`` rigid-body modes in the local frame.
        contact_nodes: ``(m,)`` node ids in skull contact.
        normals: ``(m, 3)`` outward unit normals (local frame).
        fixed_nodes: node ids with all DOFs fixed (brainstem).
        rtol, maxiter: CG tolerance and iteration cap per solve.
        max_iterations: cap on active-set iterations.
        gap_tol_mm: an inactive node moving outward by more than this is activated.
        force_tol_rel: an active node is released if its normal reaction is tensile by more than this times
            the largest nodal load.
        x0: initial guess ``(n, 3)`` in the local frame.
        active0: initial active set ``(m,)`` (all active if None).
        external: ``(n, 3)`` the applied external loads, if ``f`` is not them (an incremental right-hand side):
            reactions are ``K u - external``.
        progress: print one line per iteration.

    Returns:
        :class:`ContactResult`.

    Raises:
        SolverError: under-constrained model, unconverged CG, or an active set still changing after
            ``max_iterations``.
    """
    n = f.shape[0]
    contact_nodes = np.asarray(contact_nodes, dtype=np.int64)
    fixed_nodes = np.asarray(fixed_nodes, dtype=np.int64)
    frames = node_frames(n, contact_nodes, normals) if contact_nodes.size else np.tile(np.eye(3), (n, 1, 1))
    touched = np.zeros(n, dtype=bool)
    touched[contact_nodes] = True
    kr = rotate_matrix(k, frames, pattern.rows, touched) if contact_nodes.size else k
    fr = to_frames(f, frames)
    er = fr if external is None else to_frames(np.asarray(external, dtype=np.float64), frames)
    br = np.einsum("nji,njk->nik", frames, near_null.reshape(n, 3, 6)).reshape(3 * n, 6)
    force_tol = force_tol_rel * max(float(np.abs(f if external is None else external).max()), 1e-300)
    active = np.ones(contact_nodes.size, dtype=bool) if active0 is None else np.asarray(active0, bool).copy()
    x = None if x0 is None else to_frames(np.asarray(x0, dtype=np.float64), frames).ravel()
    solver: AMGSolver | None = None
    first_its = None
    result = ContactResult(u=np.zeros((n, 3)), active=active, iterations=0)
    for it in range(1, max_iterations + 1):
        free = np.ones((n, 3), dtype=bool)
        free[fixed_nodes] = False
        free[contact_nodes[active], 2] = False
        check_rigid_modes_removed(br, free)
        kc = apply_constraints(kr, free, pattern.diag_pos, pattern.rows)
        rhs = np.where(free, fr, 0.0).ravel()
        b = br * free.reshape(-1, 1)
        info = None
        if solver is not None:
            solver.maxiter = 3 * first_its + 20
            try:
                xs, info = solver.solve(rhs, x0=x, a=kc)
            except SolverError:
                solver = None
        if solver is None or info is None:
            solver = AMGSolver(kc, b, rtol=rtol, maxiter=maxiter)
            result.amg_setups += 1
            xs, info = solver.solve(rhs, x0=x)
            first_its = max(info.iterations, 1)
            solver.maxiter = maxiter
        x = xs
        us = xs.reshape(n, 3)
        reac = (kr @ xs).reshape(n, 3) - er
        result.solves.append(info)
        un = us[contact_nodes, 2]
        rn = reac[contact_nodes, 2]
        release = active & (rn > force_tol)
        activate = ~active & (un > gap_tol_mm)
        n_changes = int(release.sum() + activate.sum())
        result.changes.append(n_changes)
        if progress:
            print(f"  contact iteration {it}: {int(active.sum())} active, released {int(release.sum())}, "
                  f"activated {int(activate.sum())}, CG {info.iterations} its, {info.solve_s:.2f} s")
        result.iterations = it
        if n_changes == 0:
            break
        active = (active & ~release) | activate
    else:
        raise SolverError(f"expected the skull-contact active set to settle within {max_iterations} iterations, "
                          f"got {result.changes[-1]} changes in the last one")
    result.u = from_frames(us, frames)
    result.active = active
    result.reaction_n = rn
    result.max_outward_mm = float(un.max()) if un.size else 0.0
    return result


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of a call."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
