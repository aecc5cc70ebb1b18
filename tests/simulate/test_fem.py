"""Verification of the linear-elastic FE core: reference element, column under gravity, patch test, errors."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import SolverError
from brainshift.simulate import fem as F
from brainshift.simulate import materials as MAT
from brainshift.simulate import mesh as M

from .phantoms import box_volume

MU = MAT.MU_PARENCHYMA_PA


def test_unit_cube_stiffness_symmetric_with_rigid_null_space():
    for vi in ("full", "reduced"):
        k_lam, k_mu = F.unit_cube_stiffness(vi)
        k = MAT.lame_lambda(MU, 0.45) * k_lam + MU * k_mu
        np.testing.assert_allclose(k, k.T, atol=1e-9)
        corners = M.HEX_OFFSETS.astype(float)
        b = F.rigid_body_modes(corners)
        assert np.abs(k @ b).max() < 1e-9 * np.abs(k).max()
        assert np.linalg.matrix_rank(k_mu, tol=1e-9) == 18  # 24 - 6 rigid modes: no hourglass mode
    # full integration of K_lambda of a unit cube: its row sums of the volumetric part for a uniform dilation
    k_lam, _ = F.unit_cube_stiffness("full")
    u = M.HEX_OFFSETS.astype(float).ravel()  # u = x: div u = 3, energy = lambda/2 * 9 * volume
    assert u @ k_lam @ u == pytest.approx(9.0)


def _column(h_mm=3.0, height_vox=60, vi="full"):
    m = M.build_mesh(box_volume((6, 6, height_vox)), resolution_mm=h_mm)
    pat = F.block_pattern(m)
    return m, pat


@pytest.mark.parametrize("vi", ["full", "reduced"])
def test_column_under_gravity_matches_uniaxial_strain(vi):
    """Fixed base, roller sides: u(z) = -rho g (H z - z^2 / 2) / (lambda + 2 mu) (z up from the base)."""
    m, pat = _column(vi=vi)
    nu = 0.45
    lam = MAT.lame_lambda(MU, nu)
    k = F.assemble_stiffness(m, np.full(m.n_elements, lam), np.full(m.n_elements, MU), volumetric_integration=vi,
                             pattern=pat)
    rho_g = MAT.weight_density_pa_per_mm()
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -rho_g], (m.n_elements, 1)))
    x = m.nodes_local_mm
    free = np.ones((m.n_nodes, 3), bool)
    free[np.isclose(x[:, 2], x[:, 2].min())] = False
    for d in range(2):
        free[np.isclose(x[:, d], x[:, d].min()), d] = False
        free[np.isclose(x[:, d], x[:, d].max()), d] = False
    u, info = F.solve_constrained(k, f, free, pattern=pat, near_null=F.rigid_body_modes(x), rtol=1e-10)
    z = x[:, 2] - x[:, 2].min()
    big_h = z.max()
    analytic = -rho_g * (big_h * z - z ** 2 / 2) / (lam + 2 * MU)
    top = z == big_h
    assert abs(u[top, 2].mean() / analytic[top].mean() - 1.0) < 0.02
    np.testing.assert_allclose(u[:, 2], analytic, atol=1e-6 * abs(analytic).max())  # nodally exact in 1-D
    np.testing.assert_allclose(u[:, :2], 0.0, atol=1e-9)
    assert info.residual < 1e-9


def test_patch_test_affine_field_reproduced():
    m = M.build_mesh(box_volume((12, 12, 12)), resolution_mm=3.0)
    pat = F.block_pattern(m)
    mu = np.full(m.n_elements, MU)  # homogeneous: an affine field is then an exact equilibrium
    k = F.assemble_stiffness(m, MAT.lame_lambda(mu, 0.45), mu, pattern=pat)
    x = m.nodes_local_mm
    a = np.array([[0.01, -0.02, 0.005], [0.003, 0.02, -0.01], [0.0, 0.015, -0.012]])
    exact = x @ a.T + np.array([0.1, -0.2, 0.3])
    boundary = np.zeros(m.n_nodes, bool)
    boundary[M.outer_surface_nodes(m)] = True
    free = np.repeat(~boundary[:, None], 3, axis=1)
    u, _ = F.solve_constrained(k, np.zeros((m.n_nodes, 3)), free, exact, pattern=pat,
                               near_null=F.rigid_body_modes(x), rtol=1e-13)
    inner = ~boundary
    assert inner.sum() == 27
    err = np.abs(u[inner] - exact[inner]).max() / np.abs(exact[inner]).max()
    assert err < 1e-8


def test_element_forces_equal_assembled_product():
    m = M.build_mesh(box_volume((9, 9, 6)), resolution_mm=3.0)
    rng = np.random.default_rng(0)
    mu = rng.uniform(100, 1000, m.n_elements)
    lam = MAT.lame_lambda(mu, 0.4)
    u = rng.normal(size=(m.n_nodes, 3))
    k = F.assemble_stiffness(m, lam, mu)
    np.testing.assert_allclose(F.element_forces(m, u, lam, mu, np.ones(m.n_elements, bool)),
                               (k @ u.ravel()).reshape(-1, 3), rtol=1e-10, atol=1e-9)
    which = rng.random(m.n_elements) < 0.5
    np.testing.assert_allclose((F.assemble_stiffness(m, lam, mu, which=which) @ u.ravel()).reshape(-1, 3),
                               F.element_forces(m, u, lam, mu, which), rtol=1e-10, atol=1e-9)


def test_body_force_total_is_weight():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -9.81], (m.n_elements, 1)))
    assert f[:, 2].sum() == pytest.approx(-9.81 * 9 ** 3)


def test_under_constrained_and_unconverged_raise():
    m = M.build_mesh(box_volume((9, 9, 9)), resolution_mm=3.0)
    pat = F.block_pattern(m)
    k = F.assemble_stiffness(m, np.full(m.n_elements, 7000.0), np.full(m.n_elements, MU), pattern=pat)
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -9.81], (m.n_elements, 1)))
    b = F.rigid_body_modes(m.nodes_local_mm)
    free = np.ones((m.n_nodes, 3), bool)
    with pytest.raises(SolverError, match="under-constrained"):
        F.solve_constrained(k, f, free, pattern=pat, near_null=b)
    free[0] = False  # one pinned node leaves the 3 rotations free
    with pytest.raises(SolverError, match="rank 3"):
        F.solve_constrained(k, f, free, pattern=pat, near_null=b)
    free[m.nodes_local_mm[:, 2] == m.nodes_local_mm[:, 2].min()] = False
    with pytest.raises(SolverError, match="relative residual"):
        F.solve_constrained(k, f, free, pattern=pat, near_null=b, maxiter=1, rtol=1e-12)


def test_single_precision_cycle_same_solution_as_double():
    """The float32 V-cycle is only the preconditioner: CG in float64 reaches the same tolerance and solution."""
    m = M.build_mesh(box_volume((36, 30, 24)), resolution_mm=3.0)
    pat = F.block_pattern(m)
    mu = MU * np.random.default_rng(1).uniform(0.05, 2.0, m.n_elements)  # soft and stiff elements
    k = F.assemble_stiffness(m, MAT.lame_lambda(mu, 0.45), mu, pattern=pat)
    x = m.nodes_local_mm
    free = np.repeat(~np.isclose(x[:, 2], x[:, 2].min())[:, None], 3, axis=1)
    f = F.body_force_nodal(m, np.tile([0.0, 0.0, -9.81e-3], (m.n_elements, 1)))
    near_null = F.rigid_body_modes(x)
    us, info_s = F.solve_constrained(k, f, free, pattern=pat, near_null=near_null, rtol=1e-10, precision="single")
    ud, info_d = F.solve_constrained(k, f, free, pattern=pat, near_null=near_null, rtol=1e-10, precision="double")
    assert info_s.residual < 1e-9 and info_d.residual < 1e-9
    assert abs(info_s.iterations - info_d.iterations) <= 2
    np.testing.assert_allclose(us, ud, atol=1e-8 * np.abs(ud).max())
    kc = F.apply_constraints(k, free, pat.diag_pos, pat.rows)
    b = near_null * free.reshape(-1, 1)
    # pyamg's setup draws a random start vector; AMGSolver seeds it, so both hierarchies are identical
    state = np.random.get_state()  # noqa: NPY002
    single = F.AMGSolver(kc, b, precision="single")
    double = F.AMGSolver(kc, b, precision="double")
    assert all(np.array_equal(x, y) for x, y in zip(state, np.random.get_state(), strict=True))  # noqa: NPY002
    for ls, ld in zip(single.ml.levels, double.ml.levels, strict=True):
        assert (ls.A != ld.A).nnz == 0
        assert not hasattr(ls, "P") or (ls.P != ld.P).nnz == 0
    assert len(single.ml.levels) >= 2  # a real hierarchy (not just the coarse solver)
    r = np.random.default_rng(2).normal(size=kc.shape[0])
    v32, v64 = single.vcycle(r), double.vcycle(r)
    assert v32.dtype == np.float64
    assert np.linalg.norm(v32 - v64) < 1e-5 * np.linalg.norm(v64)  # the same cycle up to float32 rounding (~5e-7)
    with pytest.raises(ValueError, match="precision"):
        F.AMGSolver(kc, b, precision="half")


def test_update_constraints_equals_a_fresh_application():
    """Updating a constrained matrix for a changed constraint set gives apply_constraints' matrix bit for bit,
    including nodes that were held and are now free (their rows come back from the unconstrained matrix)."""
    m = M.build_mesh(box_volume((24, 21, 18)), resolution_mm=3.0)
    pat = F.block_pattern(m)
    mu = MU * np.random.default_rng(3).uniform(0.05, 2.0, m.n_elements)
    k = F.assemble_stiffness(m, MAT.lame_lambda(mu, 0.45), mu, pattern=pat)
    rng = np.random.default_rng(4)
    diag = np.einsum("bii->bi", k.data[pat.diag_pos]) * 2.0  # a given diagonal, not k's own
    free_a = rng.random((m.n_nodes, 3)) > 0.2
    free_b = free_a.copy()
    flip = rng.choice(m.n_nodes, size=m.n_nodes // 10, replace=False)
    free_b[flip] = rng.random((flip.size, 3)) > 0.5  # some released, some newly held, some partly
    for d in (None, diag):
        kc_a = F.apply_constraints(k, free_a, pat.diag_pos, pat.rows, diag=d)
        updated = F.update_constraints(kc_a, k, free_b, free_a, pat.diag_pos, pat.rows, diag=d)
        fresh = F.apply_constraints(k, free_b, pat.diag_pos, pat.rows, diag=d)
        assert np.array_equal(updated.data, fresh.data)
        assert not np.array_equal(fresh.data, F.apply_constraints(k, free_a, pat.diag_pos, pat.rows, diag=d).data)
    same = F.apply_constraints(k, free_b, pat.diag_pos, pat.rows)
    assert F.update_constraints(same, k, free_b, free_b, pat.diag_pos, pat.rows) is same  # nothing changed
