"""Skull contact: unilateral, frictionless; checked on a column on a floor and on the brain phantom."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, SolverError
from brainshift.simulate import fem as F
from brainshift.simulate import materials as MAT
from brainshift.simulate import mesh as M
from brainshift.simulate.case import SimulationConfig, draw_case_parameters, simulate_case
from brainshift.simulate.contact import ContactSolver, node_frames

from .phantoms import box_volume, ellipsoid_subject

MU = MAT.MU_PARENCHYMA_PA
LAM = MAT.lame_lambda(MU, 0.45)


def _column_system(gz: float):
    m = M.build_mesh(box_volume((6, 6, 30)), resolution_mm=3.0)
    pat = F.block_pattern(m)
    k = F.assemble_stiffness(m, np.full(m.n_elements, LAM), np.full(m.n_elements, MU), pattern=pat)
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, gz], (m.n_elements, 1)))
    x = m.nodes_local_mm
    bottom = np.nonzero(np.isclose(x[:, 2], x[:, 2].min()))[0]
    top = np.nonzero(np.isclose(x[:, 2], x[:, 2].max()))[0]
    return m, pat, k, f, x, bottom, top


def _floor_and_lid(bottom: np.ndarray, top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contact nodes (floor then lid) and their outward normals (down for the floor, up for the lid)."""
    cn = np.concatenate([bottom, top])
    nn = np.concatenate([np.tile([0.0, 0.0, -1.0], (bottom.size, 1)), np.tile([0.0, 0.0, 1.0], (top.size, 1))])
    return cn, nn


def test_column_pressed_on_floor_equals_bilateral_support():
    """Gravity presses the column onto a frictionless floor: every floor node stays in contact (compressive), so
    the unilateral solution equals the bilateral one (floor nodes' vertical DOF fixed, sliding allowed)."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, f, x, bottom, top = _column_system(-rho_g)
    centre = x[bottom, :2].mean(axis=0)
    corners = bottom[np.all(np.isclose(np.abs(x[bottom, :2] - centre), 3.0), axis=1)]
    assert corners.size == 4
    floor = np.setdiff1d(bottom, corners)
    b = F.rigid_body_modes(x)
    cs = ContactSolver(k, pat, b, floor, np.tile([0.0, 0.0, -1.0], (floor.size, 1)), corners, rtol=1e-11)
    res = cs.solve(f)
    assert res.active.all() and (res.reaction_n < 0).all()
    free = np.ones((m.n_nodes, 3), bool)
    free[corners] = False
    free[floor, 2] = False
    ref, _ = F.solve_constrained(k, f, free, pattern=pat, near_null=b, rtol=1e-11)
    np.testing.assert_allclose(res.u, ref, atol=1e-8 * np.abs(ref).max())
    assert res.u[top, 2].mean() < 0


def test_lid_detaches_and_floor_holds():
    """Contact on the floor and on a lid: under gravity the lid's reactions would be tensile, so it is released;
    no node moves outward through either surface."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, f, x, bottom, top = _column_system(-rho_g)
    cn, nn = _floor_and_lid(bottom, top)
    fixed = bottom[:1]
    # two pinned bottom nodes remove the in-plane rigid modes; the rest of the floor is frictionless contact
    cs = ContactSolver(k, pat, F.rigid_body_modes(x), cn, nn, np.concatenate([fixed, bottom[-1:]]), rtol=1e-10)
    res = cs.solve(f)
    is_top = np.isin(cn, top)
    assert not res.active[is_top].any()
    live_bottom = ~is_top & ~np.isin(cn, [fixed[0], bottom[-1]])
    assert res.active[live_bottom].all()
    un = np.einsum("ni,ni->n", res.u[cn], nn)
    assert un.max() <= 1e-3
    assert res.iterations >= 2


def test_node_frames_are_orthonormal_with_normal_last():
    rng = np.random.default_rng(0)
    n = rng.normal(size=(50, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    q = node_frames(60, np.arange(50), n)
    np.testing.assert_allclose(np.einsum("nji,njk->nik", q, q), np.tile(np.eye(3), (60, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(q[:50, :, 2], n, atol=1e-12)


def test_phantom_case_no_node_through_skull():
    s = ellipsoid_subject()
    cfg = SimulationConfig(resolution_mm=4.0)
    p = draw_case_parameters(s, cfg, 3)
    r = simulate_case(s, cfg, p)
    for stage in r.meta["solves"]:
        assert stage["max_outward_mm"] <= 0.2
        assert 0 < stage["n_active"] < stage["n_contact"]  # some nodes detach, most stay in contact


def test_contact_iteration_cap_raises():
    s = ellipsoid_subject()
    cfg = SimulationConfig(resolution_mm=4.0, max_contact_iterations=1)
    p = draw_case_parameters(s, cfg, 3)
    with pytest.raises(SolverError, match="active set"):
        simulate_case(s, cfg, p)


def test_resolve_cycle_holds_oscillating_nodes_in_contact():
    from brainshift.simulate.contact import resolve_cycle

    a = np.array([True, True, False, True])
    b = np.array([True, False, False, True])  # node 1 released
    c = np.array([True, False, True, True])   # node 2 activated
    # no cycle: unchanged
    nxt, osc = resolve_cycle([a, b], c)
    assert np.array_equal(nxt, c) and not osc.any()
    # back to an earlier set (a -> b -> c -> b): nodes changing within b, c are held active
    nxt, osc = resolve_cycle([a, b, c], b.copy())
    assert osc.tolist() == [False, False, True, False]
    assert nxt.tolist() == [True, False, True, True]
    # a two-cycle a -> b -> a: node 1 held in contact
    nxt, osc = resolve_cycle([a, b], a.copy())
    assert osc.tolist() == [False, True, False, False] and nxt.tolist() == a.tolist()


def test_bilateral_lid_stays_in_contact_and_equals_fixed_normals():
    """Bilateral (no separation): the lid that unilateral contact releases stays held, and the solution equals
    the linear solve with the normal DOFs of floor and lid fixed (computed independently by solve_constrained)."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, f, x, bottom, top = _column_system(-rho_g)
    cn, nn = _floor_and_lid(bottom, top)
    fixed = np.concatenate([bottom[:1], bottom[-1:]])
    b = F.rigid_body_modes(x)
    cs = ContactSolver(k, pat, b, cn, nn, fixed, rtol=1e-11, contact_model="bilateral")
    res = cs.solve(f)
    assert res.active.all() and res.iterations <= 2
    assert (res.reaction_n[np.isin(cn, top)] > 0).any()  # the lid pulls (tensile reaction) and is kept
    free = np.ones((m.n_nodes, 3), bool)
    free[fixed] = False
    free[cn, 2] = False
    ref, _ = F.solve_constrained(k, f, free, pattern=pat, near_null=b, rtol=1e-11)
    np.testing.assert_allclose(res.u, ref, atol=1e-7 * np.abs(ref).max())


def test_no_slip_floor_holds_every_dof_of_contact_nodes():
    """No-slip under a sideways-and-down load: floor nodes in contact do not slide (all DOFs zero), equal to the
    solve with the floor clamped; the frictionless floor lets them slide."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, _, x, bottom, top = _column_system(-rho_g)
    f = F.body_force_nodal(m, np.tile([0.5 * rho_g, 0.0, -rho_g], (m.n_elements, 1)))
    b = F.rigid_body_modes(x)
    floor = bottom[1:-1]
    nn = np.tile([0.0, 0.0, -1.0], (floor.size, 1))
    fixed = np.concatenate([bottom[:1], bottom[-1:]])  # two pins remove the floor's in-plane rigid modes
    slip = ContactSolver(k, pat, b, floor, nn, fixed, rtol=1e-11).solve(f)
    stick = ContactSolver(k, pat, b, floor, nn, fixed, rtol=1e-11, contact_model="no_slip").solve(f)
    assert np.abs(slip.u[floor, 0]).max() > 1e-4
    assert np.abs(stick.u[floor[stick.active]]).max() < 1e-9
    free = np.ones((m.n_nodes, 3), bool)
    free[bottom] = False
    ref, _ = F.solve_constrained(k, f, free, pattern=pat, near_null=b, rtol=1e-11)
    if stick.active.all():
        np.testing.assert_allclose(stick.u, ref, atol=1e-7 * np.abs(ref).max())


def test_tied_lid_and_floor_hold_every_dof_and_equal_the_clamped_solve():
    """Tied (no separation, no sliding) under a sideways-and-down load: the lid that unilateral contact releases
    stays held, the floor that no-slip holds stays held too, and the answer equals the linear solve with every
    DOF of floor and lid clamped (solve_constrained, independent of the active-set code)."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, _, x, bottom, top = _column_system(-rho_g)
    f = F.body_force_nodal(m, np.tile([0.5 * rho_g, 0.0, -rho_g], (m.n_elements, 1)))
    cn, nn = _floor_and_lid(bottom, top)
    pinned = np.concatenate([bottom[:1], bottom[-1:]])
    b = F.rigid_body_modes(x)
    res = ContactSolver(k, pat, b, cn, nn, pinned, rtol=1e-11, contact_model="tied").solve(f)
    assert res.active.all() and res.iterations <= 2
    assert (res.reaction_n[np.isin(cn, top)] > 0).any()  # the lid pulls (tensile) and is kept
    assert np.abs(res.u[cn]).max() < 1e-9
    free = np.ones((m.n_nodes, 3), bool)
    free[pinned] = False
    free[cn] = False
    ref, _ = F.solve_constrained(k, f, free, pattern=pat, near_null=b, rtol=1e-11)
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(res.u, ref, atol=1e-7 * np.abs(ref).max())
    slide = ContactSolver(k, pat, b, cn, nn, pinned, rtol=1e-11, contact_model="bilateral").solve(f)
    assert np.abs(slide.u[cn]).max() > 1e-4  # bilateral slides where tied holds


def test_plane_nodes_stay_on_their_plane():
    """A mid-column plane (falx-like, normal x) holds its nodes' x-displacement at 0 under a sideways load, while
    they slide in y and z."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, _, x, bottom, top = _column_system(-rho_g)
    f = F.body_force_nodal(m, np.tile([rho_g, 0.3 * rho_g, -rho_g], (m.n_elements, 1)))
    b = F.rigid_body_modes(x)
    xm = np.median(np.unique(x[:, 0]))
    plane = np.nonzero(np.isclose(x[:, 0], xm) & (x[:, 2] > x[:, 2].min()))[0]
    assert plane.size > 10
    res = ContactSolver(k, pat, b, np.zeros(0, np.int64), np.zeros((0, 3)), bottom, rtol=1e-11,
                        plane_nodes=plane, plane_normal=np.array([1.0, 0.0, 0.0])).solve(f)
    assert np.abs(res.u[plane, 0]).max() < 1e-9
    assert np.abs(res.u[plane, 1]).max() > 1e-3 and np.abs(res.u[plane, 2]).max() > 1e-3


def test_unknown_contact_model_raises():
    m, pat, k, f, x, bottom, top = _column_system(-1.0)
    with pytest.raises(SolverError, match="contact_model"):
        ContactSolver(k, pat, F.rigid_body_modes(x), bottom, np.tile([0.0, 0.0, -1.0], (bottom.size, 1)), top,
                      contact_model="glued")


@pytest.mark.parametrize("contact_model", ["bilateral", "no_slip", "tied"])
def test_phantom_case_contact_models_keep_nodes_inside(contact_model):
    s = ellipsoid_subject()
    cfg = SimulationConfig(resolution_mm=4.0, contact_model=contact_model, falx=True)
    p = draw_case_parameters(s, cfg, 3)
    r = simulate_case(s, cfg, p)
    assert r.meta["n_falx_nodes"] > 0
    for stage in r.meta["solves"]:
        assert stage["max_outward_mm"] <= 0.2
    assert r.meta["max_displacement_mm"] > 0.05


def test_hold_chattering_counts_changes_per_node():
    from brainshift.simulate.contact import MAX_NODE_CHANGES, hold_chattering

    changes = np.zeros(3, np.int64)
    frozen = np.zeros(3, bool)
    flip = np.array([True, False, False])
    for k in range(1, MAX_NODE_CHANGES + 1):
        held = hold_chattering(changes, flip, np.array([False, k % 2 == 0, False]), frozen)
    assert held.tolist() == [True, False, False] and changes.tolist() == [MAX_NODE_CHANGES, 2, 0]
    frozen |= held
    assert not hold_chattering(changes, flip, np.zeros(3, bool), frozen)[0]  # a frozen node is not returned again


def test_settle_fraction_holds_the_last_changing_nodes_in_contact():
    """With a settle fraction above the lid's share of the contact nodes, the lid nodes whose release is due in
    the first iteration are held in contact instead: the answer is then exactly the bilateral one (floor and lid
    normals fixed, sliding allowed), and the held nodes are counted."""
    rho_g = MAT.weight_density_pa_per_mm()
    m, pat, k, f, x, bottom, top = _column_system(-rho_g)
    cn, nn = _floor_and_lid(bottom, top)
    pinned = np.concatenate([bottom[:1], bottom[-1:]])
    b = F.rigid_body_modes(x)
    exact = ContactSolver(k, pat, b, cn, nn, pinned, rtol=1e-10).solve(f)
    assert not exact.active[np.isin(cn, top)].any()  # the lid is released without the settle fraction
    held = ContactSolver(k, pat, b, cn, nn, pinned, rtol=1e-10, settle_fraction=0.9).solve(f)
    assert held.active[~np.isin(cn, pinned)].all()
    assert held.held_nodes == top.size
    free = np.ones((m.n_nodes, 3), bool)
    free[pinned] = False
    free[cn, 2] = False
    ref, _ = F.solve_constrained(k, f, free, pattern=pat, near_null=b, rtol=1e-11)
    np.testing.assert_allclose(held.u, ref, atol=1e-7 * np.abs(ref).max())
    with pytest.raises(SolverError, match="settle_fraction"):
        ContactSolver(k, pat, b, cn, nn, pinned, settle_fraction=1.0)


def test_phantom_settle_fraction_fewer_solves_close_field_nothing_through_skull():
    s = ellipsoid_subject()
    cfg = SimulationConfig(resolution_mm=3.0, contact_model="no_slip")
    p = draw_case_parameters(s, cfg, 3)
    exact = simulate_case(s, cfg, p)
    fast = simulate_case(s, SimulationConfig(resolution_mm=3.0, contact_model="no_slip",
                                             contact_settle_fraction=0.02), p)
    its = [sum(st["contact_iterations"] for st in r.meta["solves"]) for r in (exact, fast)]
    assert its[1] < its[0]
    assert sum(st["contact_nodes_held"] for st in fast.meta["solves"]) > 0
    for stage in fast.meta["solves"]:
        assert stage["max_outward_mm"] <= 0.2
    a, b = exact.nodal_displacement_mm, fast.nodal_displacement_mm
    assert np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a)
    with pytest.raises(BrainshiftError, match="contact_settle_fraction"):
        SimulationConfig(contact_settle_fraction=0.1)
