"""The shipped default model ``weights/default.safetensors``: present, small, the documented network and
training setup (issue 6), and usable by the inference path."""

from __future__ import annotations

import numpy as np

from brainshift.model import load_weights
from brainshift.resources import DEFAULT_WEIGHTS


def test_default_model_ships_small_and_loads_as_documented():
    assert DEFAULT_WEIGHTS.is_file(), "weights/default.safetensors must ship with the repository"
    assert DEFAULT_WEIGHTS.stat().st_size <= 25 * 2**20
    loaded = load_weights(DEFAULT_WEIGHTS)
    cfg = loaded.config
    # the `fast` preset's architecture on a 3 mm grid (weights/README.md, configs/train_default.yaml)
    assert cfg.features == (16, 32, 64, 128) and cfg.spacing_mm == 3.0
    assert cfg.in_channels == 4 and cfg.out_channels == 3 and cfg.predict_residual and cfg.se_mode == "scse"
    md = loaded.metadata
    tc = md["train_config"]
    # its last stage (configs/train_default_stage5.yaml, issue 11): randomised keypoints and initial fields, the
    # relative MSE, Jacobian regularisation, left-right mirroring
    assert (tc["min_kpts"], tc["max_kpts"]) == (5, 60) and tc["interp"] is None
    assert set(tc["keypoint_rules"]) == {"detected", "random", "cortex", "craniotomy"}
    assert tc["noise_mm"] == [0.0, 1.0] and set(tc["interp_methods"]) == {"linear", "tps", "tps3d"}
    assert tc["mse_relative"] is True and tc["jdet"] is True and tc["jdet_mode"] == "negative"
    assert tc["flip_axes"] == [0]
    assert md["dataset"]["n_subjects"]["test"] == 0  # the held-out test set is a separate dataset (seed 1000)
    assert np.isfinite(md["val"]["mse_ratio"]) and md["step"] > 0
    # the whole lineage (issue 11: >= 600 simulations of >= 120 subjects), stage by stage
    lineage = md["lineage"]
    stages = lineage["stages"]
    # distinct simulations: a stage that trains again on an earlier stage's cases counts only its new ones
    assert lineage["simulations_trained"] == sum(s.get("new_simulations", s["simulations_trained"])
                                                 for s in stages) >= 600
    assert stages[-1]["simulations_trained"] == md["dataset"]["n_cases"]["train"]
    assert stages[-1]["subjects_trained"] == md["dataset"]["n_subjects"]["train"]
    assert lineage["distinct_subjects_trained"] >= 120
    # the scale-normalisation floor of the network used alone, chosen on validation for this model
    assert md["inference"]["min_field_rms_mm"] == 2.5


def test_default_configuration_model_ships_beside_it():
    """The previous default (trained on the default simulator configuration only) stays available with -w."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "weights" / "default_configuration.safetensors"
    md = load_weights(path).metadata
    tc = md["train_config"]
    assert tc["min_kpts"] == tc["max_kpts"] == 20 and md["dataset"]["n_cases"]["train"] == 228

def test_default_model_refines_a_field_on_the_builtin_brain():
    from brainshift.model.inference import refine_field
    from brainshift.simulate.template import load_mni152

    t1, brain = load_mni152()
    t1, brain = t1.resample_to_spacing(3.0), brain.resample_to_spacing(3.0)
    init = np.zeros((3, *t1.shape), np.float32)
    init[2][brain.data > 0] = -1.0  # a 3 mm sag along -k inside the brain, in voxel units (= 3 mm)
    loaded = load_weights(DEFAULT_WEIGHTS)
    a = refine_field(t1, init, loaded, mask=brain.data > 0)
    b = refine_field(t1, init, loaded, mask=brain.data > 0)
    assert a.shape == init.shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # deterministic
    # a refinement, not a new field: the correction stays within a few millimetres of the input
    assert float(np.abs(a - init).max()) * 3.0 < 10.0
