"""Tables and plots of evaluation rows (brainshift.evaluate.tables)."""

from __future__ import annotations

import json
import math

import pytest

from brainshift.errors import BrainshiftError
from brainshift.evaluate.run import ROW_COLUMNS
from brainshift.evaluate.tables import (
    plot_sweep,
    read_per_case_csv,
    summarize,
    summary_markdown,
    sweep_markdown,
    write_tables,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(case: str, method: str, mse: float, tre: float, **extra) -> dict:
    r = {c: 0.0 for c in ROW_COLUMNS}
    r.update(case=case, subject="s", method=method, n_keypoints=20, n_heldout=100, seed=0, mse_mm2=mse,
             tre_mm=tre, dice_tumour=float("nan"), hd95_tumour_mm=float("nan"), model="", weights="", safeguards="",
             safeguard_alpha=float("nan"), safeguard_beta=float("nan"), safeguard_learnt_correction="")
    r.update(extra)
    return r


def _net(case: str, method: str, mse: float, alpha: float, beta: float, safeguards: str = "on",
         learnt: str = "yes") -> dict:
    """A ``net-*`` row as evaluate_case writes it: the model's name and path, the safeguards' blend."""
    return _row(case, method, mse, 1.0, model="default (shipped)", weights="/x/weights/default.safetensors",
                safeguards=safeguards, safeguard_alpha=alpha, safeguard_beta=beta,
                safeguard_learnt_correction=learnt if safeguards == "on" else "")


def _rows() -> list[dict]:
    return [
        _row("c0", "linear", 1.0, 2.0), _row("c1", "linear", 3.0, 4.0),
        _row("c0", "tps", 4.0, 1.0), _row("c1", "tps", 4.0, 1.0),
        _row("c0", "net-linear", 0.5, 0.5), _row("c1", "net-linear", 0.5, 1.5),
    ]


def test_summarize_mean_std_and_ratio_to_best_classical():
    s = {x["method"]: x for x in summarize(_rows())}
    assert s["linear"]["mse_mm2_mean"] == 2.0
    assert s["linear"]["mse_mm2_std"] == pytest.approx(math.sqrt(2.0))  # sample std of (1, 3)
    assert s["tps"]["mse_mm2_std"] == 0.0
    # best classical = linear (mean MSE 2 < 4): ratios 1, 2, 0.25
    assert s["net-linear"]["best_classical"] == "linear"
    assert s["linear"]["mse_ratio_to_best_classical"] == 1.0
    assert s["tps"]["mse_ratio_to_best_classical"] == 2.0
    assert s["net-linear"]["mse_ratio_to_best_classical"] == 0.25
    assert s["net-linear"]["n_cases"] == 2
    assert math.isnan(s["linear"]["dice_tumour_mean"])


def test_gp_is_reported_but_not_the_classical_baseline():
    """``gp`` rows get their ratio to the best of linear / tps / tps3d, even when gp has the lowest MSE."""
    rows = _rows() + [_row("c0", "gp", 0.8, 1.0), _row("c1", "gp", 1.2, 1.0), _net("c0", "net-gp", 0.4, 1.0, 1.0),
                      _net("c1", "net-gp", 0.6, 1.0, 1.0)]
    s = {x["method"]: x for x in summarize(rows)}
    assert s["gp"]["best_classical"] == "linear"
    assert s["gp"]["mse_ratio_to_best_classical"] == pytest.approx(0.5)
    assert s["net-gp"]["mse_ratio_to_best_classical"] == pytest.approx(0.25)


def test_summary_markdown_lists_methods_and_ratio_and_drops_all_nan_columns():
    md = summary_markdown(_rows(), title="test")
    lines = [x for x in md.splitlines() if x.startswith("| net-linear")]
    assert len(lines) == 1 and lines[0].rstrip(" |").endswith("0.25")
    assert "MSE / linear" in md
    assert "2 ± 1.414" in md  # linear MSE
    assert "Dice tumour" not in md  # all NaN


def test_no_classical_method_gives_nan_ratio():
    rows = [_row("c0", "net-tps", 1.0, 1.0)]
    assert math.isnan(summarize(rows)[0]["mse_ratio_to_best_classical"])
    assert "MSE / best classical" in summary_markdown(rows)


def test_write_report_files_and_csv_round_trip(tmp_path):
    rows = _rows()
    paths = write_tables(rows, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"metrics_per_case.csv", "summary.md", "boxplots.png"}
    assert paths["boxplots"].read_bytes()[:8] == PNG_MAGIC
    back = read_per_case_csv(paths["csv"])
    assert len(back) == len(rows)
    assert back[1]["mse_mm2"] == 3.0 and back[1]["method"] == "linear" and back[1]["n_keypoints"] == 20
    assert math.isnan(back[0]["dice_tumour"])
    assert list(back[0])[: len(ROW_COLUMNS)] == list(ROW_COLUMNS)
    # one set with its manifest; no temporary files or staging folder left behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["boxplots.png", "metrics_per_case.csv",
                                                                   "summary.json", "summary.md"]
    # a re-run replaces its own outputs; a user's file at an output name is refused and kept
    write_tables(rows, tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.md").write_text("my notes")
    with pytest.raises(BrainshiftError, match="did not write"):
        write_tables(rows, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["summary.md"]


def test_sweep_table_and_plot(tmp_path):
    rows = [_row("c0", m, mse * k, 1.0, n_keypoints=k) for k in (5, 10) for m, mse in (("linear", 2.0),
                                                                                          ("tps", 3.0))]
    md = sweep_markdown(rows, "n_keypoints")
    # one case per setting: the mean alone (a sample std of one value is undefined, not 0)
    assert "| 5 | 10 | 15 |" in md and "| 10 | 20 | 30 |" in md and "±" not in md
    assert plot_sweep(rows, "n_keypoints", tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(BrainshiftError, match="column"):
        sweep_markdown(rows, "nonexistent")


def test_empty_rows_raise():
    with pytest.raises(BrainshiftError, match="at least one"):
        summarize([])


def test_one_case_shows_the_mean_alone_not_plus_minus_zero():
    """With one case the sample std (ddof=1) is undefined: NaN in the summary, the mean alone in summary.md (which
    said "± 0", as if the methods had been measured on several cases and agreed)."""
    rows = [_row("c0", "linear", 1.5, 2.0), _row("c0", "tps", 0.5, 1.0)]
    s = {x["method"]: x for x in summarize(rows)}
    assert s["linear"]["mse_mm2_mean"] == 1.5 and math.isnan(s["linear"]["mse_mm2_std"])
    md = summary_markdown(rows)
    assert "| linear | 1 | 1.5 | 0 | 0 | 2 |" in md and "± 0" not in md
    assert "Mean ± sample std over cases (the mean alone for one case: the sample std is undefined)." in md
    # two cases: mean ± std as before
    assert "| linear | 2 | 2 ± 1.414 |" in summary_markdown(_rows())


def test_summary_names_the_model_and_the_safeguards_blend(tmp_path):
    """summary.md and summary.json say which model refined the net-* rows, that the safeguards were on, and their
    alpha / beta per method (the mean over the cases; per case in the CSV)."""
    rows = [*_rows()[:2], _net("c0", "net-tps", 0.5, 0.25, 1.0), _net("c1", "net-tps", 0.7, 0.75, 0.5)]
    rows[2]["safeguard_learnt_correction"] = "no"  # e.g. clustered keypoints: alpha fixed at 0 (not checked here)
    md = summary_markdown(rows, title="data (20 keypoints)")
    assert md.splitlines()[:3] == [
        "### data (20 keypoints)", "",
        "Model of the network methods: default (shipped) (/x/weights/default.safetensors); safeguards on (alpha: "
        "share of the network's correction kept, beta: how closely the keypoints are honoured; mean over 2 cases): "
        "net-tps alpha 0.5, beta 0.75."]
    paths = write_tables(rows, tmp_path / "out", title="data (20 keypoints)")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == {"name": "default (shipped)", "weights": "/x/weights/default.safetensors",
                                "safeguards": True}
    assert summary["safeguards"] == {"net-tps": {"alpha_mean": 0.5, "beta_mean": 0.75, "n_cases": 2,
                                                 "n_no_learnt_correction": 1}}
    back = read_per_case_csv(paths["csv"])
    assert [(r["model"], r["safeguards"], r["safeguard_alpha"]) for r in back[2:]] == [
        ("default (shipped)", "on", 0.25), ("default (shipped)", "on", 0.75)]
    assert [r["safeguard_learnt_correction"] for r in back] == ["", "", "no", "yes"]  # text, read back as written
    assert back[0]["model"] == "" and math.isnan(back[0]["safeguard_alpha"])
    # the network alone: said so, no alpha / beta; no network: no model line, model null in summary.json
    off = [_net("c0", "net-tps", 0.5, float("nan"), float("nan"), safeguards="off")]
    assert "Model of the network methods: default (shipped) (/x/weights/default.safetensors); safeguards off (the " \
           "network alone)." in summary_markdown(off)
    assert summary_markdown(_rows()[:2]).startswith("| method |")
    write_tables(_rows()[:2], tmp_path / "classical")
    summary = json.loads((tmp_path / "classical" / "summary.json").read_text())
    assert summary["model"] is None and summary["safeguards"] is None
