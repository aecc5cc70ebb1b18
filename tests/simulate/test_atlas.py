"""Building a deformation atlas on the phantom: members, stiffness scaling, resume, recovery of a member."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.simulate.phantoms import ellipsoid_subject

from brainshift.atlas import fit_atlas, load_atlas
from brainshift.errors import BrainshiftError
from brainshift.simulate.atlas import AtlasConfig, build_atlas, plan_solves, solve_member

CFG = AtlasConfig(design="grid", gravity_cone_deg=25.0,
                  resolution_mm=5.0, contact_models=["unilateral"], drainage_fractions=[0.3, 0.6],
                  n_ring_directions=2)


def test_plan_covers_directions_drainage_and_contact():
    subj = ellipsoid_subject()
    plan = plan_solves(subj, AtlasConfig(design="grid", contact_models=["unilateral", "no_slip"],
                                         drainage_fractions=[0.2, 0.5],
                                         n_ring_directions=4, gravity_cone_deg=25.0))
    assert len(plan) == 2 * 2 * 5 and len({p["id"] for p in plan}) == 20
    tilts = sorted({p["gravity_tilt_deg"] for p in plan})
    assert tilts == pytest.approx([0.0, 25.0], abs=1e-6)
    g = np.array([p["gravity_direction_ras"] for p in plan])
    np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0, atol=1e-12)
    # no tumour: directions over the upper hemisphere, each with its own craniotomy at the top
    subj.tumour_mask.data[:] = 0
    plan = plan_solves(subj, AtlasConfig(design="grid", contact_models=["unilateral"], drainage_fractions=[0.3],
                                         no_tumour_directions=7))
    g = np.array([p["gravity_direction_ras"] for p in plan])
    assert len(plan) == 7 and (g[:, 2] < 0).all()
    entries = np.array([p["entry_point_ras"] for p in plan])
    assert np.all(np.einsum("ij,ij->i", entries, -g) > 15.0)  # on the side opposite to gravity


SAMPLE = dict(design="sample", contact_models=["unilateral", "no_slip"], gravity_cone_deg=45.0,
              drainage_range=[0.05, 0.7], craniotomy_radius_range_mm=[15.0, 45.0],
              poisson_ratio_range=[0.40, 0.49], tumour_stiffness_ratio_range=[1.0, 3.0], falx_probability=None)


def test_sampled_plan_covers_its_ranges_is_nested_and_seeded():
    subj = ellipsoid_subject()
    plan = plan_solves(subj, AtlasConfig(**SAMPLE, n_solves=16, seed=3))
    assert len(plan) == 16 and len({p["id"] for p in plan}) == 16
    contact = np.array([p["contact_model"] for p in plan])
    assert (contact == "unilateral").sum() == 8  # balanced
    tilt = np.array([p["gravity_tilt_deg"] for p in plan])
    # the contact model is not tied to the tilt (each model gets small and large tilts)
    for c in ("unilateral", "no_slip"):
        assert tilt[contact == c].min() < 25.0 < tilt[contact == c].max()
    drain = np.array([p["drainage_fraction"] for p in plan])
    crani = np.array([p["craniotomy_radius_mm"] for p in plan])
    assert tilt.max() <= 45.0 + 1e-6 and tilt.max() > 35.0 and tilt.min() < 20.0
    assert drain.min() >= 0.05 and drain.max() <= 0.7 and drain.max() - drain.min() > 0.5
    assert crani.min() >= 15.0 and crani.max() <= 45.0 and crani.max() - crani.min() > 20.0
    nu = np.array([p["poisson_ratio"] for p in plan])
    assert nu.min() >= 0.40 and nu.max() <= 0.49
    g = np.array([p["gravity_direction_ras"] for p in plan])
    a = np.array(plan[0]["approach_direction_ras"])
    np.testing.assert_allclose(np.degrees(np.arccos(np.clip(g @ a, -1, 1))), tilt, atol=0.01)
    # nested: the first k solves of a larger sample are the sample of size k; the seed changes the draw
    assert plan_solves(subj, AtlasConfig(**SAMPLE, n_solves=24, seed=3))[:16] == plan
    assert plan_solves(subj, AtlasConfig(**SAMPLE, n_solves=16, seed=4)) != plan
    # a sampled solve runs with its own draw (here: the craniotomy radius)
    cfg = AtlasConfig(**SAMPLE, n_solves=2).simulation_config(plan[1]["contact_model"], plan[1])
    assert cfg.craniotomy_radius_mm == plan[1]["craniotomy_radius_mm"] and cfg.contact_model == plan[1]["contact_model"]
    assert cfg.poisson_ratio == plan[1]["poisson_ratio"]
    # the falx drawn per solve on its own dimension: the other draws stay as they were
    assert all("falx" not in p for p in plan)
    with_falx = plan_solves(subj, AtlasConfig(**{**SAMPLE, "falx_probability": 0.5}, n_solves=16, seed=3))
    falx = [p.pop("falx") for p in with_falx]
    assert with_falx == plan and 4 <= sum(falx) <= 12
    k = falx.index(True)
    assert AtlasConfig(**{**SAMPLE, "falx_probability": 0.5}).simulation_config(with_falx[k]["contact_model"],
                                                                       {**with_falx[k], "falx": True}).falx


def test_sampled_plan_draws_ventricle_and_gravity_models_without_changing_other_draws():
    subj = ellipsoid_subject()
    base = plan_solves(subj, AtlasConfig(**SAMPLE, n_solves=16, seed=3))
    full = AtlasConfig(**{**SAMPLE, "contact_models": ["unilateral", "bilateral", "no_slip"]},
                       ventricle_models=["fluid", "compressible"], gravity_models=["drained", "buoyant"],
                       ventricle_poisson_ratio_range=[0.0, 0.4], buoyant_weight_fraction_range=[0.02, 0.06],
                       reduced_integration_from_nu=0.47, n_solves=16, seed=3)
    plan = plan_solves(subj, full)
    vm = np.array([p["ventricle_model"] for p in plan])
    bw = np.array([p["buoyant_weight_fraction"] for p in plan])
    assert 4 <= (vm == "compressible").sum() <= 12 and 4 <= (bw > 0).sum() <= 12
    nu_v = np.array([p["ventricle_poisson_ratio"] for p in plan if p["ventricle_model"] == "compressible"])
    assert nu_v.min() >= 0.0 and nu_v.max() <= 0.4 and nu_v.max() - nu_v.min() > 0.1
    assert all("ventricle_poisson_ratio" not in p for p in plan if p["ventricle_model"] == "fluid")
    assert bw[bw > 0].min() >= 0.02 and bw.max() <= 0.06
    assert {p["contact_model"] for p in plan} == {"unilateral", "bilateral", "no_slip"}
    # reduced volumetric integration exactly where the drawn Poisson ratio reaches 0.47 (the family's rule)
    for p in plan:
        assert p["volumetric_integration"] == ("reduced" if p["poisson_ratio"] >= 0.47 else "full")
    # the geometry and material draws are those of the plan without the new choices (own dimensions, last)
    same = ("gravity_direction_ras", "drainage_fraction", "craniotomy_radius_mm", "poisson_ratio")
    assert [{k: p[k] for k in same} for p in plan] == [{k: p[k] for k in same} for p in base]
    # a solve runs with its own draw
    k = int(np.argmax((vm == "compressible") & (bw > 0)))
    cfg = full.simulation_config(plan[k]["contact_model"], plan[k])
    assert cfg.ventricle_model == "compressible" and cfg.ventricle_poisson_ratio == plan[k]["ventricle_poisson_ratio"]
    assert cfg.buoyant_weight_fraction == plan[k]["buoyant_weight_fraction"] > 0
    assert cfg.volumetric_integration == plan[k]["volumetric_integration"]


@pytest.mark.parametrize("bad", [
    {"design": "sample", "ventricle_models": ["fluid", "gel"]},
    {"design": "sample", "gravity_models": []},
    {"design": "grid", "gravity_models": ["drained", "buoyant"]},
    {"design": "sample", "ventricle_models": ["fluid"], "simulation": {"ventricle_model": "fluid"}},
    {"design": "sample", "ventricle_poisson_ratio_range": [0.3, 0.6]},
    {"design": "sample", "reduced_integration_from_nu": 0.5},
    {"design": "grid", "reduced_integration_from_nu": 0.47},
    {"design": "sample", "reduced_integration_from_nu": 0.47, "simulation": {"volumetric_integration": "full"}}])
def test_per_solve_model_choices_reject_bad_values(bad):
    with pytest.raises(BrainshiftError, match="expected"):
        AtlasConfig(**bad)


def test_stiffness_scaling_holds_for_bilateral_contact_compressible_ventricles_and_buoyant_gravity():
    """The members' scaling to other moduli stays exact up to the ventricles' fixed shear modulus (4.54 Pa)."""
    subj = ellipsoid_subject()
    cfg = AtlasConfig(**{**CFG.to_dict(), "contact_models": ["bilateral"],
                         "simulation": {"ventricle_model": "compressible", "ventricle_poisson_ratio": 0.2,
                                        "buoyant_weight_fraction": 0.04}})
    solve = plan_solves(subj, cfg)[1]
    a = solve_member(subj, cfg, solve)
    b = solve_member(subj, AtlasConfig(**{**cfg.to_dict(), "shear_modulus_pa": cfg.shear_modulus_pa / 2}), solve)
    scale = np.abs(a["final"]).max()
    assert scale > 0.05
    np.testing.assert_allclose(b["final"], 2.0 * a["final"], atol=1e-2 * scale)
    assert not np.allclose(b["final"], 2.0 * a["final"], atol=1e-9 * scale)  # not exact: the ventricles


def test_atlas_solves_settle_the_contact_tail_unless_configured_otherwise():
    from brainshift.simulate.atlas import ATLAS_CONTACT_SETTLE_FRACTION, ATLAS_SOLVER_RTOL

    assert 0.0 < ATLAS_CONTACT_SETTLE_FRACTION < 0.01
    assert AtlasConfig().simulation_config().contact_settle_fraction == ATLAS_CONTACT_SETTLE_FRACTION
    assert AtlasConfig().simulation_config().solver_rtol == ATLAS_SOLVER_RTOL == 1e-4
    assert AtlasConfig(simulation={"solver_rtol": 1e-6}).simulation_config().solver_rtol == 1e-6
    exact = AtlasConfig(simulation={"contact_settle_fraction": 0.0})
    assert exact.simulation_config("no_slip").contact_settle_fraction == 0.0


@pytest.mark.parametrize("bad", [{"design": "lattice"}, {"design": "sample", "n_solves": 0},
                                 {"drainage_range": [0.7, 0.1]}, {"poisson_ratio_range": [0.4, 0.5]},
                                 {"craniotomy_radius_range_mm": [20.0]}, {"falx_probability": 1.5}])
def test_sampled_config_rejects_bad_fields(bad):
    with pytest.raises(BrainshiftError, match="expected"):
        AtlasConfig(**bad)


def test_shipped_default_config_is_the_dataclass_default():
    from brainshift.resources import config_path
    from brainshift.simulate.atlas import read_atlas_config

    assert read_atlas_config(config_path("atlas")) == AtlasConfig()
    assert AtlasConfig().design == "sample" and AtlasConfig().n_solves == 24


def test_stiffness_scaling_is_exact_for_the_linear_model():
    """Halving every modulus doubles the solution (frictionless contact with no gap is positively homogeneous)."""
    subj = ellipsoid_subject()
    solve = plan_solves(subj, CFG)[1]
    a = solve_member(subj, CFG, solve)
    half = AtlasConfig(**{**CFG.to_dict(), "shear_modulus_pa": CFG.shear_modulus_pa / 2})
    b = solve_member(subj, half, solve)
    scale = np.abs(a["final"]).max()
    assert scale > 0.1
    np.testing.assert_allclose(b["gravity"], 2.0 * a["gravity"], atol=2e-3 * scale)
    np.testing.assert_allclose(b["final"], 2.0 * a["final"], atol=2e-3 * scale)
    assert a["resected"] and not np.allclose(a["final"], a["gravity"])


def test_build_resume_and_recover_a_member(tmp_path):
    subj = ellipsoid_subject()
    out = tmp_path / "atlas"
    rep = build_atlas(out, subj, CFG, n_workers=1, processes=False, progress=False)
    n_solves = 2 * 3
    assert len(rep.solved) == n_solves and not rep.failed
    assert rep.n_members == n_solves * 2 * 3  # with/without resection x 3 stiffnesses
    atlas = load_atlas(out)
    assert atlas.info["retained_energy"] >= CFG.energy and atlas.n_components < rep.n_members
    atlas.check_image(subj.image.shape, subj.image.affine, subj.image.data)
    # resumed: nothing is solved again and the atlas is the same
    before = (out / "basis.npz").read_bytes()
    rep2 = build_atlas(out, subj, CFG, n_workers=1, processes=False, progress=False)
    assert rep2.solved == [] and len(rep2.skipped) == n_solves
    assert (out / "basis.npz").read_bytes() == before
    # another config into the same folder is refused
    with pytest.raises(BrainshiftError, match="same image and config"):
        build_atlas(out, subj, AtlasConfig(**{**CFG.to_dict(), "drainage_fractions": [0.4]}), n_workers=1,
                    processes=False, progress=False)
    assert json.loads((out / "atlas.json").read_text())["n_members"] == rep.n_members
    # only the basis settings changed: re-reduced from the stored solves, no solve run
    rep3 = build_atlas(out, subj, AtlasConfig(**{**CFG.to_dict(), "energy": 0.9}), n_workers=1, processes=False,
                       progress=False)
    assert rep3.solved == [] and rep3.n_components <= atlas.n_components
    # a record written before the sampled design existed (no design / range fields) resumes as the grid it was
    rec = json.loads((out / "build.json").read_text())
    for key in ("design", "n_solves", "drainage_range", "craniotomy_radius_range_mm", "poisson_ratio_range",
                "tumour_stiffness_ratio_range", "seed"):
        del rec["config"][key]
    (out / "build.json").write_text(json.dumps(rec))
    rep4 = build_atlas(out, subj, AtlasConfig(**{**CFG.to_dict(), "energy": 0.9}), n_workers=1, processes=False,
                       progress=False)
    assert rep4.solved == [] and len(rep4.skipped) == n_solves
    # a member (resected, stiffest) is recovered from 20 of its keypoints far better than by TPS
    from brainshift.interpolate import interpolate
    from brainshift.simulate.rasterise import rasterise_displacement

    solve = plan_solves(subj, CFG)[4]
    u = solve_member(subj, CFG, solve)["final"] * (CFG.shear_modulus_pa / 3000.0)
    region = (subj.brain_mask.data > 0) & (subj.tumour_mask.data == 0)
    from brainshift.simulate.mesh import build_mesh

    mesh = build_mesh(subj.brain_mask, subj.tumour_mask, subj.ventricles_mask, resolution_mm=CFG.resolution_mm)
    truth = rasterise_displacement(mesh, u, region | (subj.tumour_mask.data > 0))
    idx = np.argwhere(region)
    pts = idx[np.random.default_rng(0).choice(len(idx), 20, replace=False)].astype(float)
    d = truth[(slice(None),) + tuple(pts.astype(int).T)].T
    fit = fit_atlas(atlas, pts, d)
    tps = interpolate("tps", pts, d, subj.image.shape)

    def mse(f):
        return float(((f - truth) ** 2).sum(0)[region].mean())

    assert mse(fit.field_vox) < 0.1 * mse(tps)


def test_a_folder_with_foreign_atlas_files_is_refused(tmp_path):
    subj = ellipsoid_subject()
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "atlas.json").write_text("{}")  # a user's file of that name
    with pytest.raises(BrainshiftError, match="empty or an atlas build"):
        build_atlas(out, subj, CFG, n_workers=1, processes=False, progress=False)
    assert (out / "atlas.json").read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["atlas.json"]


def test_perpendicular_directions_are_orthonormal_and_perpendicular():
    from brainshift.simulate.atlas import perpendicular_directions

    for g in ([0.0, 0.0, -1.0], [0.3, -0.2, -0.9], [1.0, 1.0, 0.0]):
        e = perpendicular_directions(np.asarray(g))
        np.testing.assert_allclose(e @ e.T, np.eye(2), atol=1e-12)
        np.testing.assert_allclose(e @ (np.asarray(g) / np.linalg.norm(g)), 0.0, atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, 90.0, -5.0, True])
def test_gravity_response_tilt_rejects_bad_angles(bad):
    with pytest.raises(BrainshiftError, match="gravity_response_tilt_deg"):
        AtlasConfig(gravity_response_tilt_deg=bad)


def test_tilted_gravity_members_are_the_rotated_load_at_the_solve_contact_state(tmp_path):
    """With gravity_response_tilt_deg each solve and stage gains 4 members cos(t) u +- sin(t) r_k; changing the
    angle only re-reduces the build; a build without responses is not resumed with them (nor the reverse)."""
    subj = ellipsoid_subject()
    cfg = AtlasConfig(**{**CFG.to_dict(), "contact_models": ["no_slip"], "drainage_fractions": [0.4], "energy": 1.0,
                         "gravity_response_tilt_deg": 30.0})
    out = tmp_path / "atlas"
    rep = build_atlas(out, subj, cfg, n_workers=1, processes=False, progress=False)
    n_solves = 3
    assert len(rep.solved) == n_solves and rep.n_members == n_solves * 2 * (3 + 4)
    atlas = load_atlas(out)
    tilted = [m for m in atlas.members if "response_tilt_deg" in m]
    assert len(tilted) == n_solves * 2 * 4 and {m["response_tilt_deg"] for m in tilted} == {30.0}
    # one tilted member, rebuilt from the basis, against its definition from the stored solve
    solve = plan_solves(subj, cfg)[1]
    with np.load(out / "members" / f"{solve['id']}.npz") as z:
        u, r = z["final"].astype(np.float64), z["final_responses"].astype(np.float64)
    k = next(i for i, m in enumerate(atlas.members) if m["solve"] == solve["id"] and m["resection"]
             and m.get("response_tilt_about") == 2)
    want = np.cos(np.pi / 6) * u + np.sin(np.pi / 6) * r[1]
    got = atlas.nodal(atlas.coordinates[k])
    assert np.abs(r[1]).max() > 0.1 * np.abs(u).max()
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
    rep2 = build_atlas(out, subj, AtlasConfig(**{**cfg.to_dict(), "gravity_response_tilt_deg": 15.0}),
                       n_workers=1, processes=False, progress=False)
    assert rep2.solved == [] and rep2.n_members == rep.n_members
    with pytest.raises(BrainshiftError, match="same image and config"):
        build_atlas(out, subj, AtlasConfig(**{**cfg.to_dict(), "gravity_response_tilt_deg": None}), n_workers=1,
                    processes=False, progress=False)


def _world_ellipsoid(affine: np.ndarray, shape: tuple[int, int, int]):
    """The phantom brain (ellipsoid, tumour, ventricles) defined in world (RAS) mm and sampled on any grid."""
    from brainshift.simulate.dataset import Subject
    from brainshift.volume import Volume

    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    x, y, z = (idx @ affine[:3, :3].T + affine[:3, 3]).T
    brain = (x / 30) ** 2 + (y / 35) ** 2 + (z / 25) ** 2 <= 1
    tum = ((x - 12) ** 2 + y ** 2 + (z - 6) ** 2 <= 49) & brain
    ven = ((x / 4) ** 2 + (y / 10) ** 2 + ((z - 2) / 5) ** 2 <= 1) & ~tum

    def lab(m):
        return Volume(m.reshape(shape).astype(np.uint8), affine, "label")

    image = (np.where(brain, 100.0, 0.0) - 40.0 * tum).reshape(shape).astype(np.float32)
    return Subject("world", Volume(image, affine), lab(brain), lab(tum), lab(ven))


def test_atlas_members_and_fit_follow_the_world_frame_on_an_oblique_anisotropic_grid(tmp_path):
    """The same world-space brain on an axis-aligned 1 mm grid and on an oblique grid with 0.9 x 1.3 x 2 mm
    voxels: one solve's member, mapped to RAS, moves the brain the same way (up to the different
    discretisation), and the atlas built on the oblique grid recovers one of its members from 20 keypoints."""
    from brainshift.interpolate import interpolate
    from brainshift.simulate.mesh import build_mesh
    from brainshift.simulate.rasterise import rasterise_displacement

    a1 = np.eye(4)
    a1[:3, 3] = -40.0
    s1 = _world_ellipsoid(a1, (81, 81, 81))
    c, s, c2, s2 = np.cos(0.5), np.sin(0.5), np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    spacing = np.array([0.9, 1.3, 2.0])
    shape2 = tuple(int(v) for v in np.ceil(100 / spacing))
    a2 = np.eye(4)
    a2[:3, :3] = rot @ np.diag(spacing)
    a2[:3, 3] = -a2[:3, :3] @ ((np.array(shape2) - 1) / 2)
    s2 = _world_ellipsoid(a2, shape2)
    cfg = AtlasConfig(design="grid", gravity_cone_deg=25.0, resolution_mm=5.0, contact_models=["unilateral"],
                      drainage_fractions=[0.5], n_ring_directions=2)
    solve = plan_solves(s1, cfg)[0]

    def member_ras(subj):
        u = solve_member(subj, cfg, solve)["final"]
        region = (subj.brain_mask.data > 0) & (subj.tumour_mask.data == 0)
        mesh = build_mesh(subj.brain_mask, subj.tumour_mask, subj.ventricles_mask, resolution_mm=cfg.resolution_mm)
        f = rasterise_displacement(mesh, u, region | (subj.tumour_mask.data > 0))
        return f, region, np.einsum("ij,jxyz->ixyz", subj.image.affine[:3, :3], f)[:, region].mean(1)

    _, _, m1 = member_ras(s1)
    truth, region, m2 = member_ras(s2)
    assert m1 @ np.asarray(solve["gravity_direction_ras"]) > 0.8 * np.linalg.norm(m1)  # it sags along gravity
    assert m1 @ m2 / (np.linalg.norm(m1) * np.linalg.norm(m2)) > 0.98
    assert 0.7 < np.linalg.norm(m2) / np.linalg.norm(m1) < 1.4
    # the atlas of the oblique grid: a member from 20 of its keypoints, far better than tps (errors in mm)
    build_atlas(tmp_path / "atlas", s2, cfg, n_workers=1, processes=False, progress=False)
    atlas = load_atlas(tmp_path / "atlas")
    idx = np.argwhere(region)
    pts = idx[np.random.default_rng(0).choice(len(idx), 20, replace=False)].astype(float)
    d = truth[(slice(None),) + tuple(pts.astype(int).T)].T
    fit = fit_atlas(atlas, pts, d)
    tps = interpolate("tps", pts, d, s2.image.shape, s2.image.affine)

    def mse_mm2(f):
        return float((np.einsum("ij,jxyz->ixyz", a2[:3, :3], f - truth) ** 2).sum(0)[region].mean())

    assert mse_mm2(fit.field_vox) < 0.1 * mse_mm2(tps)
