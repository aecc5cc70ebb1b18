"""evaluate_dataset on a tiny synthetic dataset (analytic fields written in the simulator's layout)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainshift.errors import BrainshiftError, InputFileError, KeypointError
from brainshift.evaluate.run import (
    MODEL_COLUMNS,
    ROW_COLUMNS,
    draw_case_keypoints,
    evaluate_case,
    evaluate_dataset,
    keypoint_mask,
    parse_methods,
)
from brainshift.field import field_voxel_to_ras
from brainshift.simulate.dataset import read_case, read_subject_keypoints

from .conftest import AFFINE


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _equal_rows(a, b) -> bool:
    if len(a) != len(b):
        return False
    for ra, rb in zip(_strip_time(a), _strip_time(b), strict=True):
        for k in ra:
            x, y = ra[k], rb[k]
            if isinstance(x, float) and math.isnan(x):
                if not (isinstance(y, float) and math.isnan(y)):
                    return False
            elif x != y:
                return False
    return True


@pytest.fixture(scope="module")
def classical_rows(tiny_dataset):
    return evaluate_dataset(tiny_dataset, ["none", "linear", "tps"], seed=3, n_keypoints=12, progress=False)


def test_rows_are_complete_and_finite(classical_rows):
    assert len(classical_rows) == 3 * 3
    assert [r["case"] for r in classical_rows[:3]] == ["a_000"] * 3
    assert [r["method"] for r in classical_rows[:3]] == ["none", "linear", "tps"]
    for r in classical_rows:
        assert tuple(r) == ROW_COLUMNS
        assert r["n_keypoints"] == 12 and r["n_heldout"] == 100
        for k in ROW_COLUMNS[7:]:
            if k not in MODEL_COLUMNS:
                assert math.isfinite(r[k]), (r["method"], k)
        # no network refined these rows: its columns are empty
        assert (r["model"], r["weights"], r["safeguards"]) == ("", "", "")
        assert math.isnan(r["safeguard_alpha"]) and math.isnan(r["safeguard_beta"])
        assert r["safeguard_learnt_correction"] == ""
        assert 0 <= r["dice_brain"] <= 1 and 0 <= r["dice_tumour"] <= 1
    # interpolating the keypoints beats doing nothing on a smooth field
    for case in ("a_000", "a_001", "b_000"):
        by = {r["method"]: r for r in classical_rows if r["case"] == case}
        assert by["linear"]["mse_mm2"] < by["none"]["mse_mm2"]
        assert by["tps"]["tre_mm"] < by["none"]["tre_mm"]


def test_zero_method_error_is_the_ground_truth_itself(tiny_dataset, classical_rows):
    # the 'none' prediction is the zero field: its MSE is the mean squared GT displacement (mm^2) over
    # brain minus cavity, and it does not fold
    case = read_case(tiny_dataset, "a_001")
    mask = (case.subject.brain_mask.data > 0) & ~(case.cavity_mask.data > 0)
    gt_sq = (field_voxel_to_ras(case.field, AFFINE).astype(np.float64) ** 2).sum(0)[mask]
    row = next(r for r in classical_rows if r["case"] == "a_001" and r["method"] == "none")
    assert row["mse_mm2"] == pytest.approx(gt_sq.mean(), rel=1e-6)
    assert row["gt_max_mm"] == pytest.approx(np.sqrt(gt_sq.max()), rel=1e-6)
    assert row["pct_jacobian_nonpositive"] == 0.0 and row["std_log_jac"] == 0.0
    assert row["time_s"] == 0.0


def test_deterministic_for_a_seed_and_case_order_independent(tiny_dataset, classical_rows):
    again = evaluate_dataset(tiny_dataset, "none,linear,tps", seed=3, n_keypoints=12, progress=False)
    assert _equal_rows(again, classical_rows)
    # the first case alone gives the same rows as within the whole dataset
    first = evaluate_dataset(tiny_dataset, ["none", "linear", "tps"], seed=3, n_keypoints=12, cases=1,
                             progress=False)
    assert _equal_rows(first, classical_rows[:3])
    other = evaluate_dataset(tiny_dataset, ["linear"], seed=4, n_keypoints=12, cases=1, progress=False,
                             overlap=False)
    assert other[0]["mse_mm2"] != classical_rows[1]["mse_mm2"]
    assert math.isnan(other[0]["dice_brain"])


def test_keypoint_draw_same_points_with_noise_and_inside_allowed(tiny_dataset):
    case = read_case(tiny_dataset, "a_000")
    allowed = keypoint_mask(case)
    kw = dict(n_keypoints=10, n_heldout=30)
    clean = draw_case_keypoints(case.field, allowed, AFFINE, rng=np.random.default_rng(1), **kw)
    noisy = draw_case_keypoints(case.field, allowed, AFFINE, rng=np.random.default_rng(1), noise_mm=1.0, **kw)
    np.testing.assert_array_equal(clean.points_vox, noisy.points_vox)
    np.testing.assert_array_equal(clean.heldout_disps_vox, noisy.heldout_disps_vox)
    noise_mm = (noisy.disps_vox - clean.disps_vox) @ AFFINE[:3, :3].T
    assert 0.2 < noise_mm.std() < 2.0
    assert clean.points_vox.shape == (10, 3) and clean.heldout_points_vox.shape == (30, 3)
    idx = np.rint(np.concatenate([clean.points_vox, clean.heldout_points_vox])).astype(int)
    assert allowed[tuple(idx.T)].all()  # never in the tumour, cavity or outside the brain
    assert len(np.unique(idx, axis=0)) == 40


def test_detected_keypoint_candidates_are_used(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    case = read_case(root, "b_000")
    pts = np.argwhere(keypoint_mask(case))[::97][:25].astype(float) + 0.25
    lines = ["# keypoints in the voxel frame", "x,y,z,scale_mm,response"]
    lines += [f"{p[0]},{p[1]},{p[2]},2.0,1.0" for p in pts]
    (root / "subjects" / "b" / "keypoints.csv").write_text("\n".join(lines) + "\n")
    np.testing.assert_allclose(read_subject_keypoints(root, "b"), pts)
    rows = evaluate_dataset(root, ["linear"], n_keypoints=10, overlap=False, progress=False)
    by = {r["case"]: r for r in rows}
    assert by["b_000"]["n_heldout"] == 15  # 25 detected candidates - 10 driving keypoints
    assert by["a_000"]["n_heldout"] == 100  # no file for subject a: random candidates


def test_bad_requests_raise(tiny_dataset, tmp_path):
    with pytest.raises(BrainshiftError, match="expected methods among"):
        parse_methods("linear,cubic")
    with pytest.raises(InputFileError, match="complete cases"):
        evaluate_dataset(tmp_path, ["linear"], progress=False)
    with pytest.raises(InputFileError, match="weights file"):
        evaluate_dataset(tiny_dataset, ["net-linear"], weights=tmp_path / "missing.safetensors", progress=False)
    with pytest.raises(KeypointError):
        evaluate_dataset(tiny_dataset, ["linear"], n_keypoints=0, progress=False)
    case = read_case(tiny_dataset, "a_000")
    case.field[0, 3, 3, 3] = np.nan  # a corrupt ground truth is refused, not scored
    with pytest.raises(InputFileError, match="finite ground-truth field in case a_000, got 1 NaN"):
        evaluate_case(case, ["linear"], n_keypoints=4)


def _tiny_weights(path, zero_residual: bool):
    import torch

    from brainshift.model.checkpoint import save_weights
    from brainshift.model.network import NetworkConfig, build_network

    cfg = NetworkConfig(features=(4, 8), spacing_mm=2.0)
    torch.manual_seed(0)
    net = build_network(cfg)
    if zero_residual:
        with torch.no_grad():
            net.final_conv.weight.zero_()
            net.final_conv.bias.zero_()
    save_weights(path, net, cfg, {"test": True})
    return path


def test_network_methods_with_a_tiny_network(tiny_dataset, tmp_path, classical_rows):
    # a network whose residual head is zero returns the initial field: net-linear == linear exactly
    w0 = _tiny_weights(tmp_path / "zero.safetensors", zero_residual=True)
    rows = evaluate_dataset(tiny_dataset, ["linear", "net-linear", "net-tps"], weights=w0, seed=3, n_keypoints=12,
                            cases=1, progress=False, overlap=False, safeguards=False)  # the network alone
    lin, net_lin = rows[0], rows[1]
    for k in ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "pct_jacobian_nonpositive", "std_log_jac"):
        assert net_lin[k] == pytest.approx(lin[k], rel=1e-6, abs=1e-9), k
    assert lin["mse_mm2"] == pytest.approx(classical_rows[1]["mse_mm2"], rel=1e-9)  # same keypoints
    tps = next(r for r in classical_rows if r["case"] == "a_000" and r["method"] == "tps")
    assert rows[2]["mse_mm2"] == pytest.approx(tps["mse_mm2"], rel=1e-6)
    assert net_lin["time_s"] >= lin["time_s"]
    # the net-* rows name the model (its file name: not the shipped one) and say the safeguards were off
    assert {k: net_lin[k] for k in MODEL_COLUMNS[:3]} == {"model": "zero.safetensors", "weights": str(w0),
                                                          "safeguards": "off"}
    assert math.isnan(net_lin["safeguard_alpha"]) and math.isnan(net_lin["safeguard_beta"])
    assert net_lin["safeguard_learnt_correction"] == ""  # safeguards off: the rule does not apply
    assert lin["model"] == "" and lin["safeguards"] == ""
    # the same for the Gaussian-process interpolator: net-gp (zero residual) == gp, a field of its own
    gp, net_gp = evaluate_dataset(tiny_dataset, ["gp", "net-gp"], weights=w0, seed=3, n_keypoints=12, cases=1,
                                  progress=False, overlap=False, safeguards=False)
    assert (gp["method"], net_gp["method"]) == ("gp", "net-gp") and net_gp["model"] == "zero.safetensors"
    assert net_gp["mse_mm2"] == pytest.approx(gp["mse_mm2"], rel=1e-6)
    assert gp["mse_mm2"] != pytest.approx(lin["mse_mm2"], rel=1e-3) and math.isfinite(gp["tre_mm"])
    # a random network changes the field and still gives finite metrics
    w1 = _tiny_weights(tmp_path / "rand.safetensors", zero_residual=False)
    rows = evaluate_dataset(tiny_dataset, ["net-tps"], weights=w1, seed=3, n_keypoints=12, cases=1,
                            progress=False)
    assert all(math.isfinite(rows[0][k]) for k in ROW_COLUMNS[7:]
               if k not in MODEL_COLUMNS[:3] and k != "safeguard_learnt_correction")
    assert rows[0]["mse_mm2"] != pytest.approx(tps["mse_mm2"], rel=1e-3)
    # under the safeguards (the default): on, with this case's alpha and beta in [0, 1]
    assert (rows[0]["model"], rows[0]["weights"], rows[0]["safeguards"]) == ("rand.safetensors", str(w1), "on")
    assert 0.0 <= rows[0]["safeguard_alpha"] <= 1.0 and 0.0 <= rows[0]["safeguard_beta"] <= 1.0
    # random keypoints spread over the brain: the learnt correction was allowed
    assert rows[0]["safeguard_learnt_correction"] == "yes"


def test_sweep_over_keypoints_and_noise(tiny_dataset, classical_rows):
    from brainshift.evaluate.run import evaluate_sweep
    from brainshift.evaluate.tables import sweep_markdown

    rows = evaluate_sweep(tiny_dataset, ["linear"], n_keypoints=(6, 12), noise_mm=(0.0, 1.0), cases=1,
                          overlap=False, progress=False, seed=3)
    assert [(r["n_keypoints"], r["noise_mm"]) for r in rows] == [(6, 0.0), (6, 1.0), (12, 0.0), (12, 1.0)]
    # noise-free with 12 keypoints is the same draw as the module's run with seed 3; noise changes the result
    assert rows[2]["mse_mm2"] == pytest.approx(classical_rows[1]["mse_mm2"], rel=1e-12)
    assert rows[2]["mse_mm2"] != rows[3]["mse_mm2"]
    assert "| 6 |" in sweep_markdown([r for r in rows if r["noise_mm"] == 0], "n_keypoints")


def test_model_record_names_the_shipped_model_the_same_everywhere(tmp_path):
    """The shipped model is "default (shipped)" however it is reached (the package's file, the repository's link
    weights/default.safetensors, a relative path); another file is named by its file name; the path is kept."""
    from pathlib import Path

    from brainshift.evaluate.run import model_line, model_record
    from brainshift.resources import DEFAULT_WEIGHTS

    repo_link = Path(__file__).resolve().parents[2] / "weights" / "default.safetensors"
    for path in (DEFAULT_WEIGHTS, repo_link):
        assert model_record(path, safeguards=True) == {"name": "default (shipped)", "weights": str(path),
                                                       "safeguards": True}
    mine = tmp_path / "default.safetensors"  # same file name, another file
    mine.write_bytes(b"x")
    assert model_record(mine, safeguards=False)["name"] == "default.safetensors"
    line = model_line(model_record(mine, safeguards=True), {"net-tps": (0.25, 1.0)}, of="one case")
    assert line == (f"default.safetensors ({mine}); safeguards on (alpha: share of the network's correction "
                    f"kept, beta: how closely the keypoints are honoured; one case): net-tps alpha 0.25, beta 1")
    assert model_line(None) == "no network model"


def test_progress_names_each_step_of_a_case(tiny_dataset):
    """The bar advances once for the ground truth's masks and once per method, its postfix naming the step
    under way (a one-case run said "0/1 case" for minutes while the field inversions of Dice/HD95 ran)."""
    from brainshift.evaluate.run import case_steps

    class Bar:
        def __init__(self):
            self.n, self.posts = 0, []

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text, refresh=True):
            self.posts.append((self.n, text))

    bar = Bar()
    case = read_case(tiny_dataset, "a_000")
    evaluate_case(case, ["linear", "tps"], n_keypoints=8, bar=bar)
    assert bar.n == case_steps(["linear", "tps"], overlap=True) == 3
    assert bar.posts == [(0, "a_000: ground truth: warp the masks (field inversion)"), (1, "a_000: linear"),
                         (1, "a_000: linear: score (Dice/HD95: field inversion)"), (2, "a_000: tps"),
                         (2, "a_000: tps: score (Dice/HD95: field inversion)")]
    bar = Bar()
    evaluate_case(case, ["linear"], n_keypoints=8, overlap=False, bar=bar)
    assert bar.n == case_steps(["linear"], overlap=False) == 1 and bar.posts[-1] == (0, "a_000: linear: score")
