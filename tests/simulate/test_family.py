"""The model family: per-case draws of the modelling choices, their record, and leave-one-model-out configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainshift.errors import BrainshiftError
from brainshift.simulate.batch import read_config_file
from brainshift.simulate.case import SimulationConfig, draw_case_parameters, simulate_case
from brainshift.simulate.family import ModelFamily, draw_model

from .phantoms import ellipsoid_subject

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_draws_are_reproducible_and_within_ranges():
    fam = ModelFamily()
    a = [draw_model(fam, np.random.default_rng(s)) for s in range(200)]
    b = [draw_model(fam, np.random.default_rng(s)) for s in range(200)]
    assert a == b
    mu = np.array([m["shear_modulus_pa"] for m in a])
    nu = np.array([m["poisson_ratio"] for m in a])
    assert 500 <= mu.min() and mu.max() <= 3000 and 0.40 <= nu.min() and nu.max() <= 0.49
    # every option of every choice occurs in 200 draws (each has probability >= 0.2)
    for key, options in (("contact_model", {"unilateral", "bilateral", "no_slip"}),
                         ("ventricle_model", {"fluid", "compressible"}), ("gravity_model", {"drained", "buoyant"}),
                         ("material", {"linear", "neo-hookean"}), ("resolution_mm", {3.0, 4.0}),
                         ("falx", {True, False}), ("resection", {True, False})):
        assert {m[key] for m in a} == options, key
    for m in a:  # the dependent settings follow the drawn option
        assert (m["buoyant_weight_fraction"] > 0) == (m["gravity_model"] == "buoyant")
        assert (m["volumetric_integration"] == "reduced") == (m["material"] == "linear" and m["poisson_ratio"] >= 0.47)
        assert m["drainage_fraction_range"][0] == m["drainage_fraction_range"][1]
    json.dumps(a)  # recorded in meta.json


def test_tied_contact_is_drawn_only_when_weighted():
    """``tied`` is a family option (opt-in: the default family's draws are unchanged, above)."""
    fam = ModelFamily(contact={"unilateral": 1.0, "tied": 1.0}, material=["linear"])
    seen = {draw_model(fam, np.random.default_rng(s))["contact_model"] for s in range(50)}
    assert seen == {"unilateral", "tied"}
    assert "tied" not in ModelFamily().contact


def test_zero_weight_options_are_never_drawn():
    fam = ModelFamily(contact={"unilateral": 1.0, "bilateral": 0.0}, material=["linear"],
                      tumour_stiffness_ratio=[1.0, 3.0])
    draws = [draw_model(fam, np.random.default_rng(s)) for s in range(100)]
    assert {m["contact_model"] for m in draws} == {"unilateral"}
    assert max(m["tumour_stiffness_ratio"] for m in draws) <= 3.0


def test_family_roundtrip_and_validation():
    fam = ModelFamily(resolution_mm={2.0: 1.0, 4.0: 3.0})
    assert ModelFamily.from_dict(json.loads(json.dumps(fam.to_dict()))) == fam
    with pytest.raises(BrainshiftError, match="contact"):
        ModelFamily(contact=["glued"])
    with pytest.raises(BrainshiftError, match="poisson_ratio"):
        ModelFamily(poisson_ratio=[0.3, 0.5])
    with pytest.raises(BrainshiftError, match="unknown"):
        ModelFamily.from_dict({"friction": 0.3})
    with pytest.raises(BrainshiftError, match="weights"):
        ModelFamily(material={"linear": -1.0})


def test_case_with_family_records_and_applies_its_model():
    s = ellipsoid_subject()
    fam = ModelFamily(contact=["bilateral"], material=["linear"], resolution_mm=[4.0], falx_probability=1.0,
                      resection_probability=0.0, shear_modulus_pa=[1684.0, 1684.0])
    cfg = SimulationConfig(family=fam.to_dict())
    p = draw_case_parameters(s, cfg, 4)
    assert p.model["contact_model"] == "bilateral" and p.model["falx"] and p.model["resolution_mm"] == 4.0
    r = simulate_case(s, cfg, p)
    eff = r.meta["config"]
    assert eff["contact_model"] == "bilateral" and eff["family"] is None
    assert abs(eff["shear_modulus_pa"] - 1684.0) < 1e-9
    assert r.meta["params"]["model"] == p.model and r.meta["n_falx_nodes"] > 0
    assert r.meta["n_resected_elements"] == 0
    # the same draw without the family but with the drawn settings gives the same field
    q = draw_case_parameters(s, cfg.with_model(p.model), 4)
    q.model = {}
    q.gravity_direction_ras, q.drainage_level_mm = p.gravity_direction_ras, p.drainage_level_mm
    np.testing.assert_array_equal(simulate_case(s, cfg.with_model(p.model), q).field_vox, r.field_vox)


def test_without_family_the_draws_are_unchanged():
    """Configs without a family draw exactly as before (today's datasets stay reproducible)."""
    s = ellipsoid_subject()
    p = draw_case_parameters(s, SimulationConfig(), 11)
    assert p.model == {}
    np.testing.assert_allclose(p.gravity_perturbation_deg, draw_case_parameters(s, SimulationConfig(), 11)
                               .gravity_perturbation_deg)


def test_shipped_family_configs_parse_and_hold_out_their_family():
    train, _ = read_config_file(CONFIGS / "simulate_family_lomo_train.yaml")
    t = ModelFamily.from_dict(train.family)
    held = {"bilateral": ("contact", "bilateral"), "compressible_ventricles": ("ventricles", "compressible"),
            "buoyant_gravity": ("gravity", "buoyant")}
    for name, (key, option) in held.items():
        assert getattr(t, key).get(option, 0.0) == 0.0, name
        test, _ = read_config_file(CONFIGS / "family_heldout" / f"{name}.yaml")
        assert set(getattr(ModelFamily.from_dict(test.family), key)) == {option}
    stiff, _ = read_config_file(CONFIGS / "family_heldout" / "stiff_tumour.yaml")
    assert ModelFamily.from_dict(stiff.family).tumour_stiffness_ratio[0] > t.tumour_stiffness_ratio[1]
    full, _ = read_config_file(CONFIGS / "simulate_family.yaml")
    assert ModelFamily.from_dict(full.family) == ModelFamily()
