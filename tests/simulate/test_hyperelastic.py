"""Neo-Hookean option: consistent tangent, small-strain limit, Newton solve against the linear model."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.simulate import fem as F
from brainshift.simulate import hyperelastic as H
from brainshift.simulate import materials as MAT
from brainshift.simulate import mesh as M

from .phantoms import box_volume


def _column():
    m = M.build_mesh(box_volume((6, 6, 24)), resolution_mm=3.0)
    mu = np.full(m.n_elements, MAT.MU_PARENCHYMA_PA)
    return m, mu, MAT.lame_lambda(mu, 0.45)


def test_tangent_is_derivative_of_internal_forces():
    m, mu, lam = _column()
    rng = np.random.default_rng(0)
    u = rng.normal(size=(m.n_nodes, 3)) * 0.05
    k = H.tangent_stiffness(m, u, lam, mu, np.ones(m.n_elements, bool), F.block_pattern(m))
    np.testing.assert_allclose(k.toarray(), k.toarray().T, atol=1e-8 * np.abs(k.data).max())
    du = rng.normal(size=(m.n_nodes, 3)) * 1e-6
    fd = (H.internal_forces(m, u + du, lam, mu) - H.internal_forces(m, u - du, lam, mu)) / 2.0
    assert np.abs(fd.ravel() - k @ du.ravel()).max() < 1e-6 * np.abs(fd).max()


def test_small_strain_limit_is_linear_elasticity():
    m, mu, lam = _column()
    u = np.random.default_rng(1).normal(size=(m.n_nodes, 3))
    k = F.assemble_stiffness(m, lam, mu)
    lin = (k @ u.ravel()).reshape(-1, 3)
    nl = H.internal_forces(m, 1e-5 * u, lam, mu) / 1e-5
    assert np.abs(nl - lin).max() < 1e-4 * np.abs(lin).max()


def test_newton_solve_matches_linear_at_small_load():
    m, mu, lam = _column()
    x = m.nodes_local_mm
    base = np.nonzero(np.isclose(x[:, 2], x[:, 2].min()))[0]
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -0.01 * MAT.weight_density_pa_per_mm()], (m.n_elements, 1)))
    u, _, info = H.solve_neo_hookean(m, lam, mu, np.ones(m.n_elements, bool), lambda s: s * f,
                                     u0=np.zeros((m.n_nodes, 3)), contact_nodes=np.zeros(0, np.int64),
                                     normals=np.zeros((0, 3)), fixed_nodes=base, load_steps=2, rtol=1e-10)
    free = np.ones((m.n_nodes, 3), bool)
    free[base] = False
    lin, _ = F.solve_constrained(F.assemble_stiffness(m, lam, mu), f, free, pattern=F.block_pattern(m),
                                 near_null=F.rigid_body_modes(x), rtol=1e-11)
    top = np.isclose(x[:, 2], x[:, 2].max())
    assert abs(u[top, 2].mean() / lin[top, 2].mean() - 1.0) < 0.01
    assert max(info["newton_iterations"]) <= 4  # quadratic convergence at small load


def _column_solve(f, base, m, mu, lam, **kw):
    return H.solve_neo_hookean(m, lam, mu, np.ones(m.n_elements, bool), lambda s: s * f,
                               u0=np.zeros((m.n_nodes, 3)), contact_nodes=np.zeros(0, np.int64),
                               normals=np.zeros((0, 3)), fixed_nodes=base, rtol=1e-10, **kw)


def test_load_step_cutback_reaches_the_same_equilibrium():
    """A load too large for one load step of at most 6 Newton iterations: the solve cuts the increment back and
    ends at the equilibrium an 8-step solve finds; without cutbacks it fails with a one-line error."""
    m, mu, lam = _column()
    x = m.nodes_local_mm
    base = np.nonzero(np.isclose(x[:, 2], x[:, 2].min()))[0]
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -10.0 * MAT.weight_density_pa_per_mm()], (m.n_elements, 1)))
    ref, _, ref_info = _column_solve(f, base, m, mu, lam, load_steps=8)
    assert ref_info["load_cutbacks"] == 0
    assert np.abs(ref[:, 2]).max() > 5.0  # large enough to be nonlinear
    with pytest.raises(H.SolverError, match="after 0 load-step cutbacks"):
        _column_solve(f, base, m, mu, lam, load_steps=1, max_newton=6, max_cutbacks=0)
    u, _, info = _column_solve(f, base, m, mu, lam, load_steps=1, max_newton=6)
    assert info["load_cutbacks"] >= 1
    assert np.abs(u - ref).max() < 1e-6 * np.abs(ref).max()


@pytest.mark.slow  # ~10 s: Newton with an AMG rebuild per iteration
@pytest.mark.parametrize("contact", ["unilateral", "tied"])
def test_phantom_case_close_to_linear_at_moderate_load(contact):
    """The Newton solve of a moderate case is within 5 % of the linear one, for the default contact and for tied
    contact (every DOF held, never released: its holding itself is test_contact.py's clamped solve); nothing
    moves outward through the skull."""
    from brainshift.simulate.case import SimulationConfig, draw_case_parameters, simulate_case

    from .phantoms import ellipsoid_subject

    s = ellipsoid_subject()
    out = []
    for material in ("linear", "neo-hookean"):
        cfg = SimulationConfig(resolution_mm=4.0, material=material, contact_model=contact,
                               drainage_fraction_range=(0.1, 0.1))
        r = simulate_case(s, cfg, draw_case_parameters(s, cfg, 7))
        tol = 1e-6 if contact == "tied" else 0.2  # tied: held exactly; unilateral: the gap tolerance
        assert all(stage["max_outward_mm"] <= tol for stage in r.meta["solves"])
        out.append(r.meta["max_displacement_mm"])
    assert out[0] > 0.05
    assert abs(out[1] / out[0] - 1.0) < 0.05
