"""One simulated case on the ellipsoid phantom: parameters, outputs, mirror symmetry, refinement, export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.simulate.case import CaseParameters, SimulationConfig, draw_case_parameters, simulate_case
from brainshift.simulate.dataset import Subject
from brainshift.simulate.export import export_vtu
from brainshift.volume import Volume

from .phantoms import ellipsoid_subject, mirror_subject


@pytest.fixture(scope="module")
def phantom():
    return ellipsoid_subject()


@pytest.fixture(scope="module")
def case4(phantom):
    cfg = SimulationConfig(resolution_mm=4.0)
    params = draw_case_parameters(phantom, cfg, 7)
    return cfg, params, simulate_case(phantom, cfg, params)


def test_draw_parameters(phantom):
    cfg = SimulationConfig(max_gravity_angle_deg=20.0, drainage_fraction_range=(0.3, 0.4))
    p = draw_case_parameters(phantom, cfg, 11)
    q = draw_case_parameters(phantom, cfg, np.random.default_rng(11))
    np.testing.assert_array_equal(p.gravity_direction_ras, q.gravity_direction_ras)
    assert p.seed == 11 and q.seed is None
    assert np.linalg.norm(p.gravity_direction_ras) == pytest.approx(1.0)
    assert 0.0 <= p.gravity_perturbation_deg <= 20.0
    cos = p.gravity_direction_ras @ p.approach_direction_ras
    assert np.rad2deg(np.arccos(min(cos, 1.0))) == pytest.approx(p.gravity_perturbation_deg, abs=1e-6)
    np.testing.assert_allclose(p.tumour_centre_ras, [12.0, 0.0, 6.0], atol=0.05)
    assert p.entry_point_ras[2] > p.tumour_centre_ras[2]  # entry above the tumour
    a = np.array([30.0, 35.0, 25.0])
    assert abs(np.sum((p.entry_point_ras / a) ** 2) - 1.0) < 0.15  # on the ellipsoid's surface
    assert 0.3 <= p.drainage_fraction <= 0.4
    assert json.loads(json.dumps(p.to_dict())) == p.to_dict()
    r = CaseParameters.from_dict(p.to_dict())
    np.testing.assert_array_equal(r.entry_point_ras, p.entry_point_ras)


def test_config_roundtrip_and_validation():
    cfg = SimulationConfig(resolution_mm=2.0, drainage_fraction_range=(0.1, 0.2))
    assert SimulationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(BrainshiftError, match="material"):
        SimulationConfig(material="rubber")
    with pytest.raises(BrainshiftError, match="unknown"):
        SimulationConfig.from_dict({"resolution": 3})
    with pytest.raises(BrainshiftError, match="drainage"):
        SimulationConfig(drainage_fraction_range=(0.5, 0.2))
    with pytest.raises(BrainshiftError, match="ventricle_model"):
        SimulationConfig(ventricle_model="water")


@pytest.mark.parametrize("field,value,message", [
    ("solver_rtol", -1.0, "expected solver_rtol in (0, 1), got -1.0"),
    ("solver_rtol", 0.0, "expected solver_rtol in (0, 1)"),
    ("newton_rtol", 2.0, "expected newton_rtol in (0, 1)"),
    ("tumour_stiffness_ratio", 0.0, "expected tumour_stiffness_ratio > 0"),
    ("tumour_element_fraction", 1.5, "expected tumour_element_fraction in (0, 1]"),
    ("min_brain_fraction", 0.0, "expected min_brain_fraction in (0, 1]"),
    ("contact_gap_tolerance_mm", 0.0, "expected contact_gap_tolerance_mm > 0"),
    ("contact_force_tolerance", -1e-3, "expected contact_force_tolerance > 0"),
    ("normal_smoothing_mm", -1.0, "expected non-negative normal_smoothing_mm"),
    ("coarse_start_min_elements", -5, "expected non-negative normal_smoothing_mm and coarse_start_min_elements"),
    ("newton_max_iterations", 0, "expected newton_max_iterations >= 1"),
])
def test_config_values_out_of_range_are_refused(field, value, message):
    # were accepted (a negative CG tolerance, a zero-stiffness tumour) and failed deep in the solver, or not at all
    with pytest.raises(BrainshiftError) as err:
        SimulationConfig(**{field: value})
    assert message in str(err.value)


def test_config_numbers_written_as_strings_are_numbers():
    # PyYAML reads YAML 1.1: `solver_rtol: 1e-6` (no dot) is the string '1e-6'; it was refused as not a number
    import yaml

    d = yaml.safe_load("solver_rtol: 1e-6\npoisson_ratio: '0.46'\nsolver_maxiter: '300'\n"
                       "drainage_fraction_range: [1e-1, '0.3']\n")
    assert d["solver_rtol"] == "1e-6"  # the premise: PyYAML's reading
    cfg = SimulationConfig.from_dict(d)
    assert cfg.solver_rtol == 1e-6 and cfg.poisson_ratio == 0.46 and cfg.solver_maxiter == 300
    assert cfg.drainage_fraction_range == (0.1, 0.3)
    with pytest.raises(BrainshiftError, match="expected solver_maxiter in the simulation config as an integer"):
        SimulationConfig.from_dict({"solver_maxiter": "2.5"})
    with pytest.raises(BrainshiftError, match="expected resection in the simulation config as true or false"):
        SimulationConfig.from_dict({"resection": "no"})


def test_case_outputs(phantom, case4):
    cfg, params, r = case4
    shape = phantom.image.shape
    assert r.field_vox.shape == (3,) + shape and r.field_vox.dtype == np.float32
    brain = phantom.brain_mask.data > 0
    assert np.all(r.field_vox[:, ~brain] == 0.0)
    mag = np.linalg.norm(r.field_vox, axis=0)  # 1 mm isotropic: voxel units are mm
    assert 0.3 < mag[brain].max() < 20.0
    assert r.meta["max_displacement_mm"] == pytest.approx(float(mag[brain & (r.cavity_mask.data == 0)].max()),
                                                          rel=1e-5)
    cav = r.cavity_mask.data > 0
    assert cav.sum() >= (phantom.tumour_mask.data > 0).sum()
    assert r.cavity_mask.same_grid(phantom.image)
    assert r.nodal_displacement_mm.shape == (r.mesh.n_nodes, 3)
    assert r.meta["n_resected_elements"] > 0 and r.meta["n_elements"] < r.meta["n_elements_preop"]
    for key in ("config", "params", "seed", "solves", "times_s", "n_nodes", "n_elements", "median_displacement_mm"):
        assert key in r.meta
    json.dumps(r.meta)
    # the largest displacements are near the craniotomy / cavity, nothing moves at the fixed brainstem
    x = r.mesh.nodes_ras
    un = np.linalg.norm(r.nodal_displacement_mm, axis=1)
    near = (np.linalg.norm(x - params.entry_point_ras, axis=1) < 30) | (
        np.linalg.norm(x - params.tumour_centre_ras, axis=1) < 15)
    assert un[near].mean() > 1.3 * un[~near].mean()
    low = x[:, 2] <= x[:, 2].min() + cfg.brainstem_fixation_depth_mm
    assert np.all(un[low] == 0.0)


def test_resection_changes_field_mostly_near_cavity(phantom, case4):
    cfg, params, r = case4
    cfg0 = SimulationConfig(**{**cfg.to_dict(), "resection": False})
    r0 = simulate_case(phantom, cfg0, params)
    assert r0.meta["n_resected_elements"] == 0 and not r0.cavity_mask.data.any()
    diff = np.linalg.norm(r.field_vox - r0.field_vox, axis=0)
    from scipy import ndimage

    cav = r.cavity_mask.data > 0
    dist = ndimage.distance_transform_edt(~cav)
    brain = (phantom.brain_mask.data > 0) & ~cav
    assert diff[brain & (dist < 8)].mean() > 1.3 * diff[brain & (dist > 25)].mean()


def test_mirror_symmetry(phantom):
    cfg = SimulationConfig(resolution_mm=4.0, solver_rtol=1e-11)
    p = draw_case_parameters(phantom, cfg, 5)
    flip = np.array([-1.0, 1.0, 1.0])
    pm = CaseParameters(**{**p.__dict__, **{k: getattr(p, k) * flip for k in (
        "gravity_direction_ras", "entry_point_ras", "tumour_centre_ras", "approach_direction_ras")}})
    a = simulate_case(phantom, cfg, p).field_vox
    b = simulate_case(mirror_subject(phantom), cfg, pm).field_vox
    # mirrored field: flip the grid along i and the i component's sign (affine x = i - c)
    b = b[:, ::-1] * flip[:, None, None, None]
    assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


@pytest.mark.slow  # ~8 s alone, ~20 s on the loaded 2-core machine (13,000 elements at 2 mm)
def test_refinement_3mm_to_2mm_changes_max_by_less_than_10_percent():
    # the standard phantom, ventricles included (fluid-filled ventricles, the default model; measured 8.3 %)
    s = ellipsoid_subject()
    params = draw_case_parameters(s, SimulationConfig(drainage_fraction_range=(0.5, 0.5)), 1)
    m3 = simulate_case(s, SimulationConfig(resolution_mm=3.0), params).meta["max_displacement_mm"]
    m2 = simulate_case(s, SimulationConfig(resolution_mm=2.0), params).meta["max_displacement_mm"]
    assert abs(m2 - m3) / m2 < 0.10


def test_export_vtu_roundtrip(case4, tmp_path):
    import meshio

    _, _, r = case4
    path = export_vtu(r, tmp_path / "case.vtu")
    m = meshio.read(path)
    np.testing.assert_allclose(m.points, r.mesh.nodes_ras)
    np.testing.assert_allclose(m.point_data["displacement_mm"], r.nodal_displacement_mm)
    assert m.cells_dict["hexahedron"].shape == (r.mesh.n_elements, 8)
    np.testing.assert_allclose(m.cell_data["tumour_fraction"][0], r.mesh.fractions[:, 1], atol=1e-6)


def test_bad_subjects_raise(phantom):
    cfg = SimulationConfig(resolution_mm=4.0)
    empty = Subject("e", phantom.image, phantom.brain_mask,
                    Volume(np.zeros(phantom.image.shape, np.uint8), phantom.image.affine, "label"),
                    phantom.ventricles_mask)
    with pytest.raises(GeometryError, match="tumour"):
        draw_case_parameters(empty, cfg, 0)
    moved = phantom.image.affine.copy()
    moved[0, 3] += 5.0
    off = Subject("o", phantom.image, Volume(phantom.brain_mask.data, moved, "label"), phantom.tumour_mask,
                  phantom.ventricles_mask)
    with pytest.raises(GeometryError, match="brain_mask"):
        draw_case_parameters(off, cfg, 0)


def test_coarse_contact_start_gives_the_same_equilibrium(phantom):
    cfg = SimulationConfig(resolution_mm=3.0, coarse_start_min_elements=0)
    params = draw_case_parameters(phantom, cfg, 3)
    plain = simulate_case(phantom, cfg, params)
    started = simulate_case(phantom, SimulationConfig(resolution_mm=3.0, coarse_start_min_elements=1), params)
    assert plain.meta["coarse_start"] == "off"
    # both stages start from the coarse case's active sets (the phantom's tumour is resected)
    assert started.meta["n_resected_elements"] > 0
    assert "fine contact nodes starting in contact: gravity" in started.meta["coarse_start"]
    assert ", resection " in started.meta["coarse_start"]
    # same contact conditions on the fine mesh (each stage's active set is checked on the fine solution). The
    # gravity equilibrium agrees to the contact tolerances (gap 1e-3 mm); the resection's to 1 % of the largest
    # displacement: started from the gravity stage's larger set, a few nodes whose reaction is tensile below the
    # force tolerance stay in contact, started from the coarse set they stay free with a gap below the gap
    # tolerance (both are equilibria within the tolerances; measured 0.012 mm of 1.5 mm here)
    for stage in ("gravity", "final"):
        a = plain.stage_displacements_local_mm[stage]
        b = started.stage_displacements_local_mm[stage]
        bound = (1e-3 if stage == "gravity" else 1e-2) * np.abs(a).max()
        assert np.abs(a - b).max() < bound, stage
    for stage in (0, 1):
        assert started.meta["solves"][stage]["max_outward_mm"] <= 0.2


def test_tilted_direction_and_cap_draws_have_the_asked_angles():
    from brainshift.simulate.loads import perturb_direction, tilted_direction

    d = np.array([0.3, -0.2, -0.9])
    for cos_t, phi in ((1.0, 0.3), (0.8, 1.0), (0.0, 4.0)):
        v, ang = tilted_direction(d, cos_t, phi)
        assert np.linalg.norm(v) == pytest.approx(1.0) and ang == pytest.approx(np.degrees(np.arccos(cos_t)))
        assert float(v @ d / np.linalg.norm(d)) == pytest.approx(cos_t, abs=1e-12)
    a, _ = tilted_direction(d, 0.5, 0.0)
    b, _ = tilted_direction(d, 0.5, np.pi)
    np.testing.assert_allclose(a + b, 2 * 0.5 * d / np.linalg.norm(d), atol=1e-12)  # opposite azimuths
    rng = np.random.default_rng(0)
    angles = [perturb_direction(d, 30.0, rng)[1] for _ in range(200)]
    assert max(angles) <= 30.0 + 1e-9 and max(angles) > 25.0


@pytest.mark.parametrize("contact", ["unilateral", "no_slip"])
def test_gravity_response_at_the_held_contact_state_reproduces_the_solve(phantom, contact):
    """The response to the solve's own gravity with its converged active set held is the solve itself."""
    cfg = SimulationConfig(resolution_mm=5.0, contact_model=contact, solver_rtol=1e-9)
    params = draw_case_parameters(phantom, cfg, 7)
    g = params.gravity_direction_ras / np.linalg.norm(params.gravity_direction_ras)
    res = simulate_case(phantom, cfg, params, response_directions_ras=g[None])
    st = res.stage_displacements_local_mm
    assert res.meta["n_resected_elements"] > 0
    for stage in ("gravity", "final"):
        scale = np.abs(st[stage]).max()
        assert scale > 0.1 and st[stage + "_responses"].shape == (1,) + st[stage].shape
        np.testing.assert_allclose(st[stage + "_responses"][0], st[stage], atol=1e-6 * scale)
    assert not np.allclose(st["final"], st["gravity"], atol=1e-3)


def test_gravity_response_along_another_direction_equals_that_solve_for_bilateral_contact(phantom):
    """Bilateral contact keeps one contact state, and with the whole brain below the fluid level every element
    carries the same buoyant weight whatever the direction: the response along q is the solve with gravity q,
    with the tumour in place and after resection."""
    import dataclasses

    cfg = SimulationConfig(resolution_mm=5.0, contact_model="bilateral", solver_rtol=1e-9,
                           buoyant_weight_fraction=0.05)
    params = dataclasses.replace(draw_case_parameters(phantom, cfg, 7), drainage_level_mm=-1000.0)
    g = params.gravity_direction_ras / np.linalg.norm(params.gravity_direction_ras)
    q = np.cross(g, [0.0, 1.0, 0.0])
    q /= np.linalg.norm(q)
    res = simulate_case(phantom, cfg, params, response_directions_ras=np.stack([q, -g]))
    other = simulate_case(phantom, cfg, dataclasses.replace(params, gravity_direction_ras=q))
    for stage in ("gravity", "final"):
        a = res.stage_displacements_local_mm[stage + "_responses"]
        b = other.stage_displacements_local_mm[stage]
        scale = np.abs(b).max()
        assert scale > 0.01
        np.testing.assert_allclose(a[0], b, atol=1e-6 * scale)
        np.testing.assert_allclose(a[1], -res.stage_displacements_local_mm[stage], atol=1e-6 * scale)
    assert "gravity_responses" not in other.stage_displacements_local_mm
    with pytest.raises(BrainshiftError, match="linear material"):
        simulate_case(phantom, SimulationConfig(resolution_mm=5.0, material="neo-hookean"), params,
                      response_directions_ras=q[None])
