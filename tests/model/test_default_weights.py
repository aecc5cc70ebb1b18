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
    # trained as published: 20 keypoints per case, mixed linear/TPS initial fields, Jacobian regularisation
    assert tc["min_kpts"] == tc["max_kpts"] == 20 and tc["interp"] is None
    assert tc["jdet"] is True and tc["jdet_mode"] == "negative"
    n_subjects, n_cases = md["dataset"]["n_subjects"], md["dataset"]["n_cases"]
    assert n_subjects["train"] + n_subjects["val"] >= 60 and n_cases["train"] + n_cases["val"] >= 200
    assert n_subjects["test"] == 0  # the held-out test set is a separate dataset (seed 1000)
    assert np.isfinite(md["val"]["mse_mm2"]) and md["step"] > 0


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
