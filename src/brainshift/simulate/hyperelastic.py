"""Compressible neo-Hookean option: total Lagrangian, Newton-Raphson with load stepping and line search.

Strain energy (per reference volume) ``W = mu/2 (I1 - 3) - mu ln J + lambda/2 (ln J)^2`` with the per-element
``mu``, ``lambda`` of :mod:`.materials` (the model reduces to the linear one at small strain). First
Piola-Kirchhoff stress ``P = mu (F - F^-T) + lambda ln J F^-T`` and its tangent
``dP_iJ/dF_kL = mu d_ik d_JL + (mu - lambda ln J) Finv_Li Finv_Jk + lambda Finv_Ji Finv_Lk``, integrated with 2x2x2
Gauss points. Every element is the same cube, so the shape-function gradients at the Gauss points are shared and
the forces and tangents are computed vectorised over elements (in chunks) and Gauss points, and assembled into
the same 3x3-block pattern as the linear stiffness.

Solve: the load (gravity, then for resection the release of the interface forces) is applied in
``newton_load_steps`` equal steps; each step runs Newton with the consistent tangent (pyamg-preconditioned CG
for the linearised system) and a backtracking line search that halves the step while the residual does not
decrease or an element would invert (J <= 0). When Newton stalls within a step (no convergence in
``max_newton`` iterations, a residual that does not halve over 5 iterations, or a failed line search), the state
returns to the last converged load level and the increment is halved (at most ``max_cutbacks`` times; it doubles
back towards the nominal increment after each converged step). The skull contact is the same active set as the
linear model (:mod:`.contact`): at each step, Newton converges with a fixed set, then nodes are released / activated and
Newton is rerun until the set is stable. Gravity is a dead load (reference direction and magnitude).

Source: Bonet & Wood, *Nonlinear Continuum Mechanics for Finite Element Analysis* (2008), ch. 6-9.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from brainshift.errors import SolverError
from brainshift.progress import StepTimer
from brainshift.simulate import fem
from brainshift.simulate.contact import (
    HOLD_TANGENTIAL,
    NEVER_RELEASE,
    check_contact_model,
    combine_constraint_nodes,
    constrained_free,
    hold_chattering,
    next_active_set,
    node_frames,
    resolve_cycle,
    rotate_matrix,
    to_frames,
)
from brainshift.simulate.mesh import HEX_OFFSETS, HexMesh

_CHUNK = 8192


def _gauss(h: float) -> tuple[np.ndarray, np.ndarray]:
    """Shape gradients in mm^-1 at the Gauss points ``(8, 8, 3)`` and weights (mm^3)."""
    g, w = fem.reference_gradients(2)
    return g / h, w * h ** 3


def _kinematics(mesh: HexMesh, u: np.ndarray, el: np.ndarray, grads: np.ndarray):
    ue = u[mesh.elements[el]]  # (E, 8, 3)
    f = np.einsum("epi,gpj->egij", ue, grads) + np.eye(3)
    det = np.linalg.det(f)
    return f, det


def _stress(f, det, lam, mu):
    finv_t = np.linalg.inv(f).transpose(0, 1, 3, 2)
    lnj = np.log(np.maximum(det, 1e-300))
    return mu[:, None, None, None] * (f - finv_t) + (lam[:, None] * lnj)[:, :, None, None] * finv_t, finv_t, lnj


def internal_forces(mesh: HexMesh, u: np.ndarray, lam: np.ndarray, mu: np.ndarray, which: np.ndarray | None = None
                    ) -> np.ndarray:
    """Nodal internal forces ``(n_nodes, 3)`` (Pa mm^2) of the selected elements at displacement ``u`` (mm).

    Raises:
        SolverError: if an element is inverted (J <= 0 at a Gauss point).
    """
    grads, w = _gauss(mesh.element_size_mm)
    sel = np.nonzero(np.ones(mesh.n_elements, bool) if which is None else which)[0]
    out = np.zeros((mesh.n_nodes, 3))
    for c in range(0, sel.size, _CHUNK):
        el = sel[c:c + _CHUNK]
        f, det = _kinematics(mesh, u, el, grads)
        if np.any(det <= 0):
            raise SolverError("expected a non-inverted deformation (J > 0), got an element with J <= 0")
        p, _, _ = _stress(f, det, lam[el], mu[el])
        fe = np.einsum("g,egij,gpj->epi", w, p, grads)
        np.add.at(out, mesh.elements[el].ravel(), fe.reshape(-1, 3))
    return out


def _min_jacobian(mesh: HexMesh, u: np.ndarray, which: np.ndarray) -> float:
    grads, _ = _gauss(mesh.element_size_mm)
    sel = np.nonzero(which)[0]
    out = np.inf
    for c in range(0, sel.size, _CHUNK):
        _, det = _kinematics(mesh, u, sel[c:c + _CHUNK], grads)
        out = min(out, float(det.min()))
    return out


def tangent_stiffness(mesh: HexMesh, u: np.ndarray, lam: np.ndarray, mu: np.ndarray, which: np.ndarray,
                      pattern: fem.BlockPattern) -> sp.bsr_matrix:
    """Consistent tangent ``(3n, 3n)`` BSR (Pa mm) of the selected elements at ``u``."""
    grads, w = _gauss(mesh.element_size_mm)
    sel = np.nonzero(which)[0]
    acc = np.zeros((mesh.n_nodes, 27, 3, 3))
    eye = np.eye(3)
    for c in range(0, sel.size, _CHUNK):
        el = sel[c:c + _CHUNK]
        f, det = _kinematics(mesh, u, el, grads)
        _, finv_t, lnj = _stress(f, det, lam[el], mu[el])
        finv = finv_t.transpose(0, 1, 3, 2)  # Finv[e,g,L,i]
        ke = np.zeros((el.size, 8, 3, 8, 3))
        for g in range(8):
            a = (mu[el][:, None, None, None, None] * np.einsum("ik,jl->ijkl", eye, eye)[None]
                 + (mu[el] - lam[el] * lnj[:, g])[:, None, None, None, None]
                 * np.einsum("eli,ejk->eijkl", finv[:, g], finv[:, g])
                 + lam[el][:, None, None, None, None] * np.einsum("eji,elk->eijkl", finv[:, g], finv[:, g]))
            t = np.einsum("pj,eijkl->epikl", grads[g], a)
            ke += w[g] * np.einsum("epikl,ql->epiqk", t, grads[g])
        for p in range(8):
            rows = mesh.elements[el, p]
            for q in range(8):
                s = int(fem._slot(HEX_OFFSETS[q] - HEX_OFFSETS[p]))
                acc[rows, s] += ke[:, p, :, q, :]
    n = 3 * mesh.n_nodes
    return sp.bsr_matrix((acc[pattern.coupled], pattern.indices, pattern.indptr), shape=(n, n))


class _NewtonStalled(SolverError):
    """Newton did not converge within one load increment (the caller cuts the increment back)."""


def _newton(mesh, lam, mu, which, f_ext, u, free, *, frames, touched, near_null, used, pattern, rtol, max_newton,
            cg_rtol, cg_maxiter, info, step):
    """Newton with a backtracking line search for one fixed set of constraints. Returns ``(u, r, iterations)``
    (``r``: the last residual in the node frames). Raises :class:`_NewtonStalled` when the residual does not reach
    ``rtol`` in ``max_newton`` iterations, stagnates (does not halve over 5 iterations once 8 are done) or the line
    search finds no decrease."""
    n = mesh.n_nodes
    f_scale = max(float(np.linalg.norm(f_ext)), 1e-300)
    history = []
    for it in range(1, max_newton + 1):
        r = to_frames(internal_forces(mesh, u, lam, mu, which) - f_ext, frames)
        res = float(np.linalg.norm(np.where(free, r, 0.0))) / f_scale
        if res < rtol:
            return u, r, it
        history.append(res)
        if it >= 8 and res > 0.5 * history[-6]:
            raise _NewtonStalled(f"expected Newton to converge to a relative residual of {rtol:g}, got a "
                                 f"stagnating residual {res:.3g} after {it} iterations (load step {step})")
        k = rotate_matrix(tangent_stiffness(mesh, u, lam, mu, which, pattern), frames, pattern.rows, touched)
        diag = np.where(used[:, None], np.einsum("bii->bi", k.data[pattern.diag_pos]), 1.0)
        kc = fem.apply_constraints(k, free, pattern.diag_pos, pattern.rows, diag=np.maximum(diag, 1e-12))
        amg = fem.AMGSolver(kc, near_null * free.reshape(-1, 1), rtol=cg_rtol, maxiter=cg_maxiter)
        du, si = amg.solve(np.where(free, -r, 0.0).ravel())
        info["cg_iterations"] += si.iterations
        du = np.einsum("nij,nj->ni", frames, du.reshape(n, 3))
        alpha = 1.0
        for _ls in range(12):
            trial = u + alpha * du
            if _min_jacobian(mesh, trial, which) > 0:
                rt = to_frames(internal_forces(mesh, trial, lam, mu, which) - f_ext, frames)
                if float(np.linalg.norm(np.where(free, rt, 0.0))) / f_scale < (1 - 1e-4 * alpha) * res:
                    break
            alpha *= 0.5
        else:
            raise _NewtonStalled("expected the Newton line search to reduce the residual, got no decrease "
                                 f"after 12 halvings (load step {step}, residual {res:.3g})")
        u = trial
    raise _NewtonStalled(f"expected Newton to converge to a relative residual of {rtol:g} within "
                         f"{max_newton} iterations, got {res:.3g} (load step {step})")


def _load_step(mesh, lam, mu, which, f_ext, u, active, info, *, step, s, base_free, contact_nodes, frames, touched,
               near_null, used, pattern, live, never_release, hold_tangential, rtol, max_newton, cg_rtol, cg_maxiter,
               max_contact_iterations, gap_tol_mm, force_tol_rel, progress):
    """Equilibrium under one load level: Newton for a fixed active set, then the active set updated until it
    settles. Returns ``(u, active, frozen)``."""
    force_tol = force_tol_rel * max(float(np.abs(f_ext).max()), 1e-300)
    history = [active.copy()]
    frozen = np.zeros(len(contact_nodes), bool)
    node_changes = np.zeros(len(contact_nodes), np.int64)
    for _ in range(max_contact_iterations):
        free = constrained_free(base_free, contact_nodes, active, hold_tangential)
        fem.check_rigid_modes_removed(near_null, free)
        ur = to_frames(u, frames)  # project the current state onto the constraints (active normals at 0)
        ur[~free] = 0.0
        u = np.einsum("nij,nj->ni", frames, ur)
        u, r, it = _newton(mesh, lam, mu, which, f_ext, u, free, frames=frames, touched=touched, near_null=near_null,
                           used=used, pattern=pattern, rtol=rtol, max_newton=max_newton, cg_rtol=cg_rtol,
                           cg_maxiter=cg_maxiter, info=info, step=step)
        info["newton_iterations"].append(it)
        info["contact_iterations"] += 1
        ur = to_frames(u, frames)
        un, rn = ur[contact_nodes, 2], r[contact_nodes, 2]
        release, activate = next_active_set(active, live, un, rn, force_tol, gap_tol_mm, never_release, frozen)
        if progress:
            StepTimer(verbose=True).note(f"  load step {step} (load {s:.3g}): Newton {it} its, released "
                                         f"{int(release.sum())}, activated {int(activate.sum())}")
        if not (release.any() or activate.any()):
            return u, active, frozen
        chatter = hold_chattering(node_changes, release, activate, frozen)
        active, osc = resolve_cycle(history, ((active & ~release) | activate) | chatter)
        frozen |= osc | chatter
        history.append(active.copy())
    raise SolverError(f"expected the skull-contact active set to settle within {max_contact_iterations} "
                      "iterations of the neo-Hookean solve, got changes in the last one")


def solve_neo_hookean(mesh: HexMesh, lam: np.ndarray, mu: np.ndarray, which: np.ndarray, load, *, u0: np.ndarray,
                      contact_nodes: np.ndarray, normals: np.ndarray, fixed_nodes: np.ndarray,
                      active0: np.ndarray | None = None, load_steps: int = 4, rtol: float = 1e-6,
                      max_newton: int = 25, max_cutbacks: int = 6, cg_rtol: float = 1e-8, cg_maxiter: int = 500,
                      max_contact_iterations: int = 30, gap_tol_mm: float = 1e-3, force_tol_rel: float = 1e-3,
                      progress: bool = False, contact_model: str = "unilateral", plane_nodes: np.ndarray | None = None,
                      plane_normal: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Neo-Hookean equilibrium with skull contact under ``load(s)`` (``(n, 3)`` external forces, s in (0, 1]).

    Nodes not used by a selected element are pinned. ``contact_model``, ``plane_nodes`` and ``plane_normal`` as in
    :class:`brainshift.simulate.contact.ContactSolver`. Returns ``(u, active, info)`` (local frame, mm).

    Raises:
        SolverError: Newton not converging, an inverted element, an unstable active set or an unconverged CG.
    """
    check_contact_model(contact_model)
    contact_nodes, normals, is_plane = combine_constraint_nodes(contact_nodes, normals, plane_nodes, plane_normal)
    never_release = is_plane | (contact_model in NEVER_RELEASE)
    hold_tangential = ~is_plane & (contact_model in HOLD_TANGENTIAL)
    n = mesh.n_nodes
    pattern = fem.block_pattern(mesh)
    frames = node_frames(n, contact_nodes, normals) if len(contact_nodes) else np.tile(np.eye(3), (n, 1, 1))
    touched = np.zeros(n, bool)
    touched[contact_nodes] = True
    near_null = np.einsum("nji,njk->nik", frames, fem.rigid_body_modes(mesh.nodes_local_mm).reshape(n, 3, 6)
                          ).reshape(3 * n, 6)
    used = np.zeros(n, bool)
    used[mesh.elements[which].ravel()] = True
    base_free = np.ones((n, 3), bool)
    base_free[fixed_nodes] = False
    base_free[~used] = False
    live = base_free[contact_nodes, 0]
    active = np.ones(len(contact_nodes), bool) if active0 is None else np.asarray(active0, bool).copy()
    if active.size != len(contact_nodes):  # an active set of the skull nodes only: plane nodes start active
        active = np.concatenate([active, np.ones(len(contact_nodes) - active.size, bool)])
    active = (active | never_release) & live
    u = np.asarray(u0, dtype=np.float64).copy()
    info = {"newton_iterations": [], "contact_iterations": 0, "cg_iterations": 0, "load_cutbacks": 0}
    ds0 = 1.0 / load_steps
    ds, s_done, step = ds0, 0.0, 0
    frozen = np.zeros(len(contact_nodes), bool)
    while s_done < 1.0 - 1e-12:
        s = min(1.0, s_done + ds)
        step += 1
        saved = (u.copy(), active.copy(), len(info["newton_iterations"]))
        try:
            u, active, frozen = _load_step(
                mesh, lam, mu, which, load(s), u, active, info, step=step, s=s, base_free=base_free,
                contact_nodes=contact_nodes, frames=frames, touched=touched, near_null=near_null, used=used,
                pattern=pattern, live=live, never_release=never_release, hold_tangential=hold_tangential, rtol=rtol,
                max_newton=max_newton, cg_rtol=cg_rtol, cg_maxiter=cg_maxiter,
                max_contact_iterations=max_contact_iterations, gap_tol_mm=gap_tol_mm, force_tol_rel=force_tol_rel,
                progress=progress)
        except _NewtonStalled as exc:
            if info["load_cutbacks"] >= max_cutbacks:
                raise SolverError(f"{exc} after {max_cutbacks} load-step cutbacks (smallest load increment "
                                  f"{ds:.3g}; equilibrium reached up to {s_done:.3g} of the load)") from None
            u, active = saved[0], saved[1]
            del info["newton_iterations"][saved[2]:]
            info["load_cutbacks"] += 1
            ds *= 0.5
            if progress:
                StepTimer(verbose=True).note(f"  load step {step}: {exc}; cutting the load increment to {ds:.3g}")
            continue
        s_done = s
        ds = min(ds0, 2.0 * ds)  # grow back after a converged step
    ur = to_frames(u, frames)
    info["max_outward_mm"] = float(ur[contact_nodes, 2][live].max()) if live.any() else 0.0
    info["contact_nodes_held"] = int(frozen.sum())
    return u, active, info


def neo_hookean_case(pb, config, do_resect: bool, times: dict, log: list, _log, progress: bool = False,
                     stages: dict | None = None) -> tuple[np.ndarray, float]:
    """The neo-Hookean counterpart of the linear case solve (see :mod:`brainshift.simulate.case`); ``stages``
    receives the gravity equilibrium as ``stages["gravity"]``."""
    m = pb.mesh
    settings = dict(contact_nodes=pb.contact_nodes, normals=pb.normals, fixed_nodes=pb.fixed_nodes,
                    load_steps=config.newton_load_steps, rtol=config.newton_rtol,
                    max_newton=config.newton_max_iterations, cg_rtol=config.solver_rtol,
                    cg_maxiter=config.solver_maxiter, max_contact_iterations=config.max_contact_iterations,
                    gap_tol_mm=config.contact_gap_tolerance_mm, force_tol_rel=config.contact_force_tolerance,
                    progress=progress, contact_model=config.contact_model, plane_nodes=pb.plane_nodes,
                    plane_normal=pb.plane_normal)
    all_el = np.ones(m.n_elements, bool)
    f = fem.body_force_nodal(m, pb.force_density)
    t0 = time.perf_counter()
    u1, act1, info1 = solve_neo_hookean(m, pb.lam, pb.mu, all_el, lambda s: s * f, u0=np.zeros((m.n_nodes, 3)),
                                        **settings)
    times["gravity_solve_s"] = time.perf_counter() - t0
    log.append({"stage": "gravity", **info1, "seconds": times["gravity_solve_s"]})
    _log(f"gravity (neo-Hookean): Newton {info1['newton_iterations']}, {times['gravity_solve_s']:.1f} s")
    if stages is not None:
        stages["gravity"] = np.array(u1, dtype=np.float64)
    if not do_resect:
        return u1, 0.0
    t0 = time.perf_counter()
    tum = pb.tumour_elements
    f_t = fem.body_force_nodal(m, np.where(tum[:, None], pb.force_density, 0.0))
    released = internal_forces(m, u1, pb.lam, pb.mu, tum) - f_t
    released[pb.removed_nodes] = 0.0
    interface_force_n = float(np.linalg.norm(released, axis=1).sum()) * 1e-6
    keep = ~pb.removed_elements
    f_rest = fem.body_force_nodal(m, np.where(keep[:, None], pb.force_density, 0.0))
    u_start = u1.copy()
    u_start[pb.removed_nodes] = 0.0
    u2, _, info2 = solve_neo_hookean(m, pb.lam, pb.mu, keep, lambda s: f_rest - (1.0 - s) * released, u0=u_start,
                                     active0=act1, **settings)
    times["resection_solve_s"] = time.perf_counter() - t0
    log.append({"stage": "resection", **info2, "seconds": times["resection_solve_s"]})
    _log(f"resection (neo-Hookean): Newton {info2['newton_iterations']}, {times['resection_solve_s']:.1f} s")
    return u2, interface_force_n
