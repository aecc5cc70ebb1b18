"""Contact of the brain surface with the rigid skull, by an active-set method.

Four contact models (``contact_model``), all with the skull as a rigid obstacle at the nodes' initial
positions; the default is the first:

- ``"unilateral"``: frictionless Signorini contact, the brain may slide along the skull and separate from it
  (the method below).
- ``"bilateral"``: frictionless sliding with no separation: every contact node keeps ``u_n = 0`` and is never
  released (the normal reaction may be tensile: a thin CSF layer that neither drains nor cavitates holds the
  surface to the dura, as in bilateral sliding boundary conditions; Miga et al. 2001, Dumpuri et al. 2007).
- ``"no_slip"``: unilateral in the normal direction, but a node in contact cannot slide either (all its DOFs
  held while active): the infinite-friction limit of Coulomb friction (arachnoid trabeculae tethering the
  cortex to the dura; Ji et al. 2009 compare sliding and tethered surfaces). A node whose normal reaction
  turns tensile is released as in the unilateral model.
- ``"tied"``: every contact node is held in all its DOFs and never released (no separation, no sliding): the
  brain surface fixed to the skull outside the craniotomy (the "fixed" surfaces of the boundary-condition
  templates of Dumpuri et al. 2007, here applied to the whole skull contact; a pia-arachnoid complex much
  stiffer than the tissue, cf. Bennion 2020). It is the limit of ``"bilateral"`` with infinite friction and of
  ``"no_slip"`` with no separation.

Separately, ``plane_nodes`` (e.g. the falx cerebri as a fixed plane, :func:`brainshift.simulate.loads.falx_nodes`)
are held on their plane (``u . n = 0`` along the plane's normal) in every model, sliding freely within it.

The unilateral method:

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
- Chattering: a node whose state changed :data:`MAX_NODE_CHANGES` times within one solve is held in contact and
  frozen (no-slip nodes can be released and re-activated out of phase with each other, which never repeats a
  whole set); and if the active set returns to a set it had before (a cycle, typically one node flipping between
  contact and release because its reaction and gap are both at the tolerance), the nodes that change state
  within the cycle are held in contact (``u_n = 0``, the conservative choice: no penetration) and frozen for
  the remaining iterations (:func:`resolve_cycle`); their count is reported (``ContactResult.held_nodes``).
  Measured: 3 of the first 160 cases of a 240-case batch failed this way before (1 change in each of 30
  iterations).
- Each iteration reuses the AMG hierarchy of the first one as CG preconditioner (the matrices differ only
  in a few surface rows), rebuilding it when more than 1 % of the contact nodes changed state or CG then
  needs more than ``2 x + 20`` the first iteration count. The constrained matrix of an iteration is the previous
  one updated in the rows and columns of the nodes whose state changed (:func:`~brainshift.simulate.fem.
  update_constraints`, bit for bit the same matrix: a full copy of a 255k-DOF stiffness took 0.2-2.9 s on the
  shared machine, the update 0.02 s). Each solve starts from the previous iterate. The
  iterations before the set settles are solved to a loose tolerance (1e-3), the last one to the configured
  one (1e-6 by default), and the set is checked once more after it. Measured on the MNI brain at 3 mm: the
  loose 1e-3 solves give the same active-set sequence as 1e-4 with 30 % fewer CG iterations (1e-2 needs
  extra active-set iterations), and the final 1e-6 displacements differ from a 1e-10 solve by 1.3e-6 mm at
  most (5 mm maximum displacement).
- The initial active set is every contact node (measured on the MNI brain: 4 iterations, against 6 when
  starting from the nodes whose normal points along gravity), or a given ``active0``: the case pipeline
  passes the active set of the same case solved at twice the element size
  (:func:`brainshift.simulate.case.simulate_case`, ``coarse_start_min_elements``).

Source: the classical active-set (primal-dual) treatment of Signorini contact (Hueber & Wohlmuth 2005,
simplified to node-to-rigid-obstacle constraints); frames as in standard skew-support handling in FE codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from brainshift.errors import SolverError
from brainshift.progress import StepTimer
from brainshift.simulate.fem import (
    AMGSolver,
    BlockPattern,
    SolveInfo,
    apply_constraints,
    check_rigid_modes_removed,
    update_constraints,
)


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
        iterations: active-set iterations (solves).
        solves: per-iteration :class:`SolveInfo`.
        max_outward_mm: largest outward normal displacement of a contact node (penetration of the skull).
        reaction_n: ``(n_contact,)`` normal contact reactions (Pa mm^2; negative = compressive).
        amg_setups: how many AMG hierarchies were built.
        changes: active-set changes after each solve.
        held_nodes: contact nodes held in contact to break an active-set cycle (see the module docstring).
    """

    u: np.ndarray
    active: np.ndarray
    iterations: int
    solves: list[SolveInfo] = field(default_factory=list)
    max_outward_mm: float = 0.0
    reaction_n: np.ndarray | None = None
    amg_setups: int = 0
    changes: list[int] = field(default_factory=list)
    held_nodes: int = 0


def resolve_cycle(history: list[np.ndarray], new_active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Break an active-set cycle: if ``new_active`` equals an earlier set in ``history`` (oldest first), the
    nodes whose state differs anywhere within the cycle are held active (in contact).

    Args:
        history: earlier active sets, ``(m,)`` bool each, in iteration order.
        new_active: the next active set ``(m,)``.

    Returns:
        ``(active, oscillating)``: the set to use next (``new_active`` with the oscillating nodes active) and
        the ``(m,)`` bool mask of oscillating nodes (all False when there is no cycle).
    """
    for j, earlier in enumerate(history):
        if np.array_equal(earlier, new_active):
            cycle = history[j:] + [new_active]
            osc = np.any([c != new_active for c in cycle], axis=0)
            return new_active | osc, osc
    return new_active, np.zeros_like(new_active, dtype=bool)


CONTACT_MODELS = ("unilateral", "bilateral", "no_slip", "tied")


#: Contact models whose nodes are never released (no separation from the skull).
NEVER_RELEASE = ("bilateral", "tied")
#: Contact models whose nodes in contact cannot slide.
HOLD_TANGENTIAL = ("no_slip", "tied")


def check_contact_model(contact_model: str) -> None:
    """Raise :class:`SolverError` unless ``contact_model`` is one of :data:`CONTACT_MODELS`."""
    if contact_model not in CONTACT_MODELS:
        raise SolverError(f"expected contact_model in {CONTACT_MODELS}, got {contact_model!r}")


def combine_constraint_nodes(contact_nodes: np.ndarray, normals: np.ndarray, plane_nodes: np.ndarray | None,
                             plane_normal: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Skull contact nodes followed by the plane (falx) nodes that are not contact nodes.

    Returns:
        ``(nodes, normals, is_plane)``: ``(m,)`` node ids, ``(m, 3)`` unit normals (local frame), ``(m,)`` bool
        marking the plane nodes (held bilaterally, tangentially free).
    """
    cn = np.asarray(contact_nodes, dtype=np.int64)
    nr = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    if plane_nodes is None or len(plane_nodes) == 0:
        return cn, nr, np.zeros(cn.size, dtype=bool)
    pn = np.setdiff1d(np.asarray(plane_nodes, dtype=np.int64), cn)
    pnorm = np.tile(np.asarray(plane_normal, dtype=np.float64) / np.linalg.norm(plane_normal), (pn.size, 1))
    return (np.concatenate([cn, pn]), np.concatenate([nr, pnorm]),
            np.concatenate([np.zeros(cn.size, bool), np.ones(pn.size, bool)]))


def constrained_free(base_free: np.ndarray, nodes: np.ndarray, active: np.ndarray, hold_tangential: np.ndarray
                     ) -> np.ndarray:
    """``(n, 3)`` free-DOF mask (rotated frames): active nodes' normal DOF held, and their tangential DOFs too
    where ``hold_tangential`` (no-slip)."""
    free = base_free.copy()
    free[nodes[active], 2] = False
    free[nodes[active & hold_tangential], :2] = False
    return free


#: A contact node whose state changed this many times in one solve is held in contact from then on (chattering
#: that is not an exact cycle of the whole set, e.g. no-slip nodes released and re-activated out of phase).
MAX_NODE_CHANGES = 4


def hold_chattering(changes: np.ndarray, release: np.ndarray, activate: np.ndarray, frozen: np.ndarray
                    ) -> np.ndarray:
    """Count each node's state changes (in place) and return the nodes that reached :data:`MAX_NODE_CHANGES`
    and are not yet frozen: the caller holds them in contact (the conservative state: no penetration)."""
    changes += release | activate
    return (changes >= MAX_NODE_CHANGES) & ~frozen


def next_active_set(active: np.ndarray, live: np.ndarray, un: np.ndarray, rn: np.ndarray, force_tol: float,
                    gap_tol_mm: float, never_release: np.ndarray, frozen: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The active-set update: ``(release, activate)`` masks.

    An active node is released when its normal reaction is tensile beyond ``force_tol`` (unless it is in
    ``never_release``: bilateral contact or a plane); an inactive live node is activated when it moved outward
    by more than ``gap_tol_mm``. ``frozen`` nodes (cycle breaking) do not change.
    """
    keep = never_release if frozen is None else (never_release | frozen)
    release = active & (rn > force_tol) & ~keep
    activate = live & ~active & (un > gap_tol_mm) & ~keep
    return release, activate


class ContactSolver:
    """Linear elasticity with fixed nodes and skull contact (active set; ``contact_model`` as in the module
    docstring), plus optional plane (falx) constraints.

    The stiffness is rotated into the contact frames once; the AMG hierarchy is built on the first solve and
    reused by later active-set iterations and later load cases (e.g. after resection); it is rebuilt when the
    active set changed by more than ``rebuild_fraction`` of the contact nodes since it was built (a hierarchy
    built with a node's normal constrained preconditions its release poorly: measured 40+ CG iterations instead
    of ~20), or when CG with it fails to converge in ``2 x + 20`` the iterations of the solve it was built for.
    Active-set iterations first solve to ``loose_rtol`` (1e-3) until the set is stable, then once more to
    ``rtol`` (the final answer, whose active set is checked again).

    Args:
        k: ``(3n, 3n)`` BSR stiffness (local frame, Pa mm).
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
        loose_rtol: CG tolerance of the active-set iterations before the final one.
        rebuild_fraction: active-set change (fraction of the contact nodes) that triggers an AMG rebuild.
        contact_model: ``"unilateral"`` (default), ``"bilateral"``, ``"no_slip"`` or ``"tied"``.
        settle_fraction: the active set also counts as settled when at most this fraction of the contact nodes
            would change state (0, the default: only when none would); those nodes are then held in contact
            (the conservative state: no penetration, a small tensile reaction where a release was due) and
            frozen, as for chattering, and counted in ``ContactResult.held_nodes``. It trades the tail of the
            iteration, where a few nodes change per full solve, for that approximation (the atlas's members use
            it; the default simulation does not).
        plane_nodes: node ids held on a plane through their initial position (falx), or None.
        plane_normal: ``(3,)`` the plane's normal (local frame).

    Raises:
        SolverError: unknown ``contact_model``.
    """

    def __init__(self, k: sp.bsr_matrix, pattern: BlockPattern, near_null: np.ndarray, contact_nodes: np.ndarray,
                 normals: np.ndarray, fixed_nodes: np.ndarray, *, rtol: float = 1e-8, maxiter: int = 500,
                 max_iterations: int = 30, gap_tol_mm: float = 1e-3, force_tol_rel: float = 1e-3,
                 loose_rtol: float = 1e-3, rebuild_fraction: float = 0.01, contact_model: str = "unilateral",
                 plane_nodes: np.ndarray | None = None, plane_normal: np.ndarray | None = None,
                 settle_fraction: float = 0.0) -> None:
        check_contact_model(contact_model)
        if not 0.0 <= float(settle_fraction) < 1.0:
            raise SolverError(f"expected settle_fraction in [0, 1), got {settle_fraction!r}")
        self.settle_fraction = float(settle_fraction)
        n = k.shape[0] // 3
        self.n = n
        self.pattern = pattern
        contact_nodes, normals, self.is_plane = combine_constraint_nodes(contact_nodes, normals, plane_nodes,
                                                                         plane_normal)
        self.contact_model = contact_model
        self.never_release = self.is_plane | (contact_model in NEVER_RELEASE)
        self.hold_tangential = ~self.is_plane & (contact_model in HOLD_TANGENTIAL)
        self.contact_nodes = np.asarray(contact_nodes, dtype=np.int64)
        self.fixed_nodes = np.asarray(fixed_nodes, dtype=np.int64)
        self.frames = (node_frames(n, self.contact_nodes, normals) if self.contact_nodes.size
                       else np.tile(np.eye(3), (n, 1, 1)))
        self.touched = np.zeros(n, dtype=bool)
        self.touched[self.contact_nodes] = True
        self.kr = rotate_matrix(k, self.frames, pattern.rows, self.touched) if self.contact_nodes.size else k
        self.diag = np.einsum("bii->bi", self.kr.data[pattern.diag_pos]).copy()
        self.br = np.einsum("nji,njk->nik", self.frames, near_null.reshape(n, 3, 6)).reshape(3 * n, 6)
        self.rtol, self.maxiter, self.max_iterations = float(rtol), int(maxiter), int(max_iterations)
        self.loose_rtol = max(float(loose_rtol), self.rtol)
        self.gap_tol_mm, self.force_tol_rel = float(gap_tol_mm), float(force_tol_rel)
        self.amg: AMGSolver | None = None
        self.amg_its = 0
        self.amg_setups = 0
        self.rebuild_fraction = float(rebuild_fraction)
        self._amg_free: np.ndarray | None = None  # constraint pattern the hierarchy was built with

    def _base_free(self, removed_nodes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(free (n, 3) bool, live (m,) bool)``: the DOFs neither fixed nor removed, and the contact nodes that
        still exist."""
        base_free = np.ones((self.n, 3), dtype=bool)
        base_free[self.fixed_nodes] = False
        live = np.ones(self.contact_nodes.size, dtype=bool)
        if removed_nodes is not None and len(removed_nodes):
            base_free[np.asarray(removed_nodes, dtype=np.int64)] = False
            live = base_free[self.contact_nodes, 0]
        return base_free, live

    def subtract_stiffness(self, k_removed: sp.bsr_matrix) -> None:
        """Remove elements' stiffness (assembled on the same pattern) from the system, keeping the AMG."""
        kr = rotate_matrix(k_removed, self.frames, self.pattern.rows, self.touched)
        self.kr = sp.bsr_matrix((self.kr.data - kr.data, self.kr.indices, self.kr.indptr), shape=self.kr.shape)

    def _solve_once(self, kc: sp.bsr_matrix, rhs: np.ndarray, b: np.ndarray, x0, rtol: float, free: np.ndarray
                    ) -> tuple:
        if self.amg is not None and self._amg_free is not None:
            changed = int((self._amg_free != free).any(axis=1).sum())
            if changed > self.rebuild_fraction * max(self.contact_nodes.size, 1):
                self.amg = None
        if self.amg is not None:
            try:
                return self.amg.solve(rhs, x0=x0, a=kc, rtol=rtol, maxiter=2 * self.amg_its + 20)
            except SolverError:
                self.amg = None
        self.amg = AMGSolver(kc, b, rtol=rtol, maxiter=self.maxiter)
        self._amg_free = free.copy()
        self.amg_setups += 1
        x, info = self.amg.solve(rhs, x0=x0, rtol=rtol)
        self.amg_its = max(info.iterations, 1)
        return x, info

    def solve(self, f: np.ndarray, *, external: np.ndarray | None = None, x0: np.ndarray | None = None,
              active0: np.ndarray | None = None, removed_nodes: np.ndarray | None = None,
              progress: bool = False) -> ContactResult:
        """Solve ``K u = f + contact and support reactions`` under the skull (and plane) constraints.

        Args:
            f: ``(n, 3)`` right-hand side (local frame, Pa mm^2).
            external: ``(n, 3)`` the applied external loads if ``f`` is an incremental right-hand side (the
                reactions are ``K u - external``); default ``f``.
            x0: initial guess ``(n, 3)`` (local frame).
            active0: initial active set ``(m,)``; all active if None.
            removed_nodes: node ids that no longer exist (all DOFs pinned to 0, out of the contact set).
            progress: print one line per iteration.

        Raises:
            SolverError: under-constrained model, unconverged CG, or an active set still changing after
                ``max_iterations``.
        """
        n, cn = self.n, self.contact_nodes
        fr = to_frames(np.asarray(f, dtype=np.float64), self.frames)
        er = fr if external is None else to_frames(np.asarray(external, dtype=np.float64), self.frames)
        force_tol = self.force_tol_rel * max(float(np.abs(f if external is None else external).max()), 1e-300)
        base_free, live = self._base_free(removed_nodes)
        active = np.ones(cn.size, dtype=bool) if active0 is None else np.asarray(active0, dtype=bool).copy()
        if active.size != cn.size:  # an active set of the skull nodes only: plane nodes start (and stay) active
            active = np.concatenate([active, np.ones(cn.size - active.size, dtype=bool)])
        active |= self.never_release
        active &= live
        x = None if x0 is None else to_frames(np.asarray(x0, dtype=np.float64), self.frames).ravel()
        setups0 = self.amg_setups
        result = ContactResult(u=np.zeros((n, 3)), active=active, iterations=0)
        rtol = self.loose_rtol
        un = rn = np.zeros(0)
        history = [active.copy()]
        frozen = np.zeros(cn.size, dtype=bool)
        node_changes = np.zeros(cn.size, dtype=np.int64)
        notes = StepTimer(verbose=progress)
        kc = free_prev = None
        # one iteration more than the cap: a set that settled in the last allowed iteration still gets its
        # final (tight) solve; changes in that extra iteration are an error
        for it in range(1, self.max_iterations + 2):
            free = constrained_free(base_free, cn, active, self.hold_tangential)
            check_rigid_modes_removed(self.br, free)
            if kc is None:
                kc = apply_constraints(self.kr, free, self.pattern.diag_pos, self.pattern.rows, diag=self.diag)
            else:  # the hierarchy holds float32 copies, so kc's data may be updated in place
                kc = update_constraints(kc, self.kr, free, free_prev, self.pattern.diag_pos, self.pattern.rows,
                                        diag=self.diag)
            free_prev = free
            rhs = np.where(free, fr, 0.0).ravel()
            x, info = self._solve_once(kc, rhs, self.br * free.reshape(-1, 1), x, rtol, free)
            us = x.reshape(n, 3)
            reac = (self.kr @ x).reshape(n, 3) - er
            result.solves.append(info)
            un, rn = us[cn, 2], reac[cn, 2]
            release, activate = next_active_set(active, live, un, rn, force_tol, self.gap_tol_mm, self.never_release,
                                                frozen)
            n_changes = int(release.sum() + activate.sum())
            if 0 < n_changes <= self.settle_fraction * cn.size:  # the tail: hold the few changing nodes in contact
                active = active | activate
                frozen |= release | activate
                if progress:
                    notes.note(f"  contact: {n_changes} node(s) changing (<= {self.settle_fraction:g} of the contact "
                               f"nodes), held in contact")
                if rtol > self.rtol or activate.any():  # the set changed, or the answer is not yet the tight one
                    result.changes.append(n_changes)
                    result.iterations = it
                    history.append(active.copy())
                    rtol = self.rtol
                    continue
                n_changes = 0
            result.changes.append(n_changes)
            result.iterations = it
            if progress:
                notes.note(f"  contact iteration {it}: {int(active.sum())} active, released {int(release.sum())}, "
                      f"activated {int(activate.sum())}, CG {info.iterations} its (rtol {rtol:g}), "
                      f"{info.solve_s:.2f} s")
            if n_changes == 0:
                if rtol <= self.rtol:
                    break
                rtol = self.rtol
                continue
            if it > self.max_iterations:
                raise SolverError(f"expected the skull-contact active set to settle within {self.max_iterations} "
                                  f"iterations, got {n_changes} changes in the last one")
            chatter = hold_chattering(node_changes, release, activate, frozen)
            active, osc = resolve_cycle(history, ((active & ~release) | activate) | chatter)
            osc |= chatter
            if osc.any():
                frozen |= osc
                if progress:
                    notes.note(f"  contact: active-set cycle or chattering, {int(osc.sum())} node(s) held in contact")
            history.append(active.copy())
        else:
            raise SolverError(f"expected the skull-contact active set to settle within {self.max_iterations} "
                              f"iterations, got {result.changes[-1]} changes in the last one")
        result.u = from_frames(us, self.frames)
        result.active = active
        result.reaction_n = rn
        result.max_outward_mm = float(un[live].max()) if live.any() else 0.0
        result.amg_setups = self.amg_setups - setups0
        result.held_nodes = int(frozen.sum())
        return result


    def solve_held(self, loads: list[np.ndarray], active: np.ndarray, *, x0s: list[np.ndarray] | None = None,
                   removed_nodes: np.ndarray | None = None, rtol: float | None = None) -> np.ndarray:
        """Linear solves with the contact state held: the responses to other loads at a converged active set.

        With the active set fixed, the model is linear in the load, so the responses to other loads at the
        state of an earlier :meth:`solve` are exact for that state (the deformation atlas uses them for gravity
        tilted from a solve's own, :mod:`brainshift.simulate.atlas`). No active-set update follows: active nodes
        may carry tensile reactions (the state is held, not re-solved). The constrained matrix is built once for
        all loads, and the AMG hierarchy is reused when the constraint pattern is close to the one it was built
        for (as :meth:`solve` does).

        Args:
            loads: ``q`` right-hand sides ``(n, 3)`` (local frame, Pa mm^2).
            active: ``(m,)`` bool active set of the contact (and plane) nodes, e.g. ``ContactResult.active``.
            x0s: optional initial guesses ``(n, 3)``, one per load (local frame).
            removed_nodes: node ids that no longer exist (all DOFs pinned to 0).
            rtol: CG tolerance of these solves (default: the solver's ``rtol``).

        Returns:
            ``(q, n, 3)`` displacements (local frame, mm).

        Raises:
            SolverError: under-constrained model, unconverged CG, or an active set of the wrong size.
        """
        n, cn = self.n, self.contact_nodes
        base_free, live = self._base_free(removed_nodes)
        active = np.asarray(active, dtype=bool)
        if active.size != cn.size:
            raise SolverError(f"expected an active set of {cn.size} contact nodes, got {active.size}")
        active = (active | self.never_release) & live
        free = constrained_free(base_free, cn, active, self.hold_tangential)
        check_rigid_modes_removed(self.br, free)
        kc = apply_constraints(self.kr, free, self.pattern.diag_pos, self.pattern.rows, diag=self.diag)
        b = self.br * free.reshape(-1, 1)
        out = np.empty((len(loads), n, 3))
        for i, f in enumerate(loads):
            fr = to_frames(np.asarray(f, dtype=np.float64), self.frames)
            x0 = None if x0s is None else to_frames(np.asarray(x0s[i], dtype=np.float64), self.frames).ravel()
            x, _ = self._solve_once(kc, np.where(free, fr, 0.0).ravel(), b, x0,
                                    self.rtol if rtol is None else float(rtol), free)
            out[i] = from_frames(x.reshape(n, 3), self.frames)
        return out


def solve_contact(k: sp.bsr_matrix, f: np.ndarray, pattern: BlockPattern, near_null: np.ndarray,
                  contact_nodes: np.ndarray, normals: np.ndarray, fixed_nodes: np.ndarray, *,
                  x0: np.ndarray | None = None, active0: np.ndarray | None = None, **settings) -> ContactResult:
    """One-shot :class:`ContactSolver` solve (``settings`` are its keyword arguments)."""
    return ContactSolver(k, pattern, near_null, contact_nodes, normals, fixed_nodes, **settings).solve(
        f, x0=x0, active0=active0)
