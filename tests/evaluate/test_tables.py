"""Tables and plots of evaluation rows (brainshift.evaluate.tables)."""

from __future__ import annotations

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
             tre_mm=tre, dice_tumour=float("nan"), hd95_tumour_mm=float("nan"))
    r.update(extra)
    return r


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
    assert "| 5 | 10 ± 0 | 15 ± 0 |" in md and "| 10 | 20 ± 0 | 30 ± 0 |" in md
    assert plot_sweep(rows, "n_keypoints", tmp_path / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(BrainshiftError, match="column"):
        sweep_markdown(rows, "nonexistent")


def test_empty_rows_raise():
    with pytest.raises(BrainshiftError, match="at least one"):
        summarize([])
