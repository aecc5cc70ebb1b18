"""Tables and plots of evaluation rows (:func:`brainshift.evaluate.run.evaluate_dataset` output).

- :func:`write_per_case_csv` / :func:`read_per_case_csv`: one line per (case, method), every metric.
- :func:`summarize` / :func:`summary_markdown`: mean ± sample standard deviation (``ddof=1``; NaN, undefined,
  for a single case: the table then shows the mean alone) per method over the cases, NaNs ignored, and the
  ratio of each method's mean MSE to that of the best classical interpolator (lowest mean MSE among
  ``linear``, ``tps``, ``tps3d`` that were run); :func:`summary_markdown` opens with the model that refined the
  ``net-*`` rows and the safeguards' mean ``alpha`` / ``beta`` (:func:`models_of_rows`).
- :func:`plot_boxplots`: MSE, TRE and % det J <= 0 per method (matplotlib, Agg canvas, no pyplot state).
- :func:`sweep_markdown` / :func:`plot_sweep`: how MSE and TRE vary with a setting (``n_keypoints`` or
  ``noise_mm``) across runs, per method (the accuracy benchmark's keypoint-count and noise studies).
- :func:`write_tables`: ``metrics_per_case.csv``, ``summary.md`` and ``boxplots.png`` in one folder.

Every file is written atomically (:func:`brainshift.io.atomic.atomic_output`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError
from brainshift.evaluate.run import CLASSICAL_METHODS, ROW_COLUMNS, model_line
from brainshift.io.atomic import atomic_output

#: Summarised metrics: column -> table header.
SUMMARY_METRICS = {
    "mse_mm2": "MSE (mm^2)",
    "mae_mm": "MAE (mm)",
    "p95_mm": "P95 (mm)",
    "tre_mm": "TRE (mm)",
    "pct_jacobian_nonpositive": "det J <= 0 (%)",
    "std_log_jac": "std log det J",
    "dice_brain": "Dice brain",
    "hd95_brain_mm": "HD95 brain (mm)",
    "dice_tumour": "Dice tumour",
    "hd95_tumour_mm": "HD95 tumour (mm)",
    "time_s": "time (s)",
}
_TEXT_COLUMNS = ("case", "subject", "method", "model", "weights", "safeguards", "safeguard_learnt_correction")
_INT_COLUMNS = ("n_keypoints", "n_heldout", "seed")


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise BrainshiftError("expected at least one evaluation row, got none")
    missing = [c for c in ("method", "mse_mm2") if c not in rows[0]]
    if missing:
        raise BrainshiftError(f"expected evaluation rows with columns {', '.join(missing)}, got {sorted(rows[0])}")


def _methods(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _values(rows: Sequence[dict], method: str, column: str) -> np.ndarray:
    return np.asarray([float(r[column]) for r in rows if r["method"] == method and column in r], dtype=np.float64)


def _mean_std(v: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) of the finite values; the deviation is NaN (undefined)
    for fewer than two."""
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _mean_pm_std(mean: float, std: float) -> str:
    """``mean ± std``, the mean alone when the deviation is undefined (one case), ``-`` without a mean."""
    if not math.isfinite(mean):
        return "-"
    return f"{_fmt(mean)} ± {_fmt(std)}" if math.isfinite(std) else _fmt(mean)


def write_per_case_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write one CSV line per row (columns :data:`~brainshift.evaluate.run.ROW_COLUMNS` first, then any
    extra keys); floats at full precision, NaN as ``nan``. Returns ``path``."""
    _check_rows(rows)
    columns = [c for c in ROW_COLUMNS if c in rows[0]]
    columns += [c for r in rows for c in r if c not in columns]
    columns = list(dict.fromkeys(columns))
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: repr(float(v)) if isinstance(v, float | np.floating) else v for k, v in r.items()})
    return path


def read_per_case_csv(path: str | Path) -> list[dict]:
    """Read a :func:`write_per_case_csv` file back (numbers as float/int, ``case/subject/method`` as str)."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out: dict = {}
            for k, v in r.items():
                if k in _TEXT_COLUMNS or v == "":
                    out[k] = v
                elif k in _INT_COLUMNS:
                    out[k] = int(float(v))
                else:
                    try:
                        out[k] = float(v)
                    except ValueError:
                        out[k] = v
            rows.append(out)
    return rows


def models_of_rows(rows: Sequence[dict]) -> list[dict]:
    """The models that refined the ``net-*`` rows (their :data:`~brainshift.evaluate.run.MODEL_COLUMNS`), one
    record per distinct ``(model, weights, safeguards)``, first-seen order: ``name``, ``weights`` (path),
    ``safeguards`` (bool) and ``methods``: method -> ``{"alpha_mean", "beta_mean", "n_cases",
    "n_no_learnt_correction"}`` (the safeguards' mean over that method's rows, NaN when off; the number of rows where
    the safeguards kept none of the network's correction without running it, keypoints clustered in one region).
    Empty when no row names a model (no network ran, or rows
    written before these columns)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        name = r.get("model") or ""
        if not name:
            continue
        key = (name, str(r.get("weights", "")), r.get("safeguards") == "on")
        rec = groups.setdefault(key, {"name": key[0], "weights": key[1], "safeguards": key[2], "methods": {}})
        rec["methods"].setdefault(r["method"], []).append(r)
    out = []
    for rec in groups.values():
        methods = {}
        for method, rs in rec["methods"].items():
            a = _mean_std(_values(rs, method, "safeguard_alpha"))[0]
            b = _mean_std(_values(rs, method, "safeguard_beta"))[0]
            off = sum(r.get("safeguard_learnt_correction") == "no" for r in rs)
            methods[method] = {"alpha_mean": a, "beta_mean": b, "n_cases": len(rs), "n_no_learnt_correction": off}
        out.append({**rec, "methods": methods})
    return out


def _model_lines(rows: Sequence[dict]) -> list[str]:
    """The ``summary.md`` header lines naming each model (:func:`~brainshift.evaluate.run.model_line`)."""
    lines = []
    for rec in models_of_rows(rows):
        n = max(m["n_cases"] for m in rec["methods"].values())
        blend = {m: (v["alpha_mean"], v["beta_mean"]) for m, v in rec["methods"].items()}
        of = "the values of the one case" if n == 1 else f"mean over {n} cases"
        lines.append("Model of the network methods: " + model_line(rec, blend, of=of) + ".")
    return lines


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per method (first-seen order): ``n_cases`` (its row count), ``<metric>_mean``, ``<metric>_std`` for each of
    :data:`SUMMARY_METRICS` present, and ``mse_ratio_to_best_classical`` (mean MSE / the lowest mean MSE of
    the classical methods run; NaN when none ran), ``best_classical`` (its name or "")."""
    _check_rows(rows)
    out = []
    for method in _methods(rows):
        s: dict = {"method": method, "n_cases": sum(r["method"] == method for r in rows)}
        for col in SUMMARY_METRICS:
            if col in rows[0]:
                s[f"{col}_mean"], s[f"{col}_std"] = _mean_std(_values(rows, method, col))
        out.append(s)
    classical = [s for s in out if s["method"] in CLASSICAL_METHODS and np.isfinite(s["mse_mm2_mean"])]
    best = min(classical, key=lambda s: s["mse_mm2_mean"]) if classical else None
    for s in out:
        s["best_classical"] = best["method"] if best else ""
        ok = best is not None and best["mse_mm2_mean"] > 0
        s["mse_ratio_to_best_classical"] = s["mse_mm2_mean"] / best["mse_mm2_mean"] if ok else float("nan")
    return out


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:.4g}"


def summary_markdown(rows: Sequence[dict], title: str | None = None) -> str:
    """A Markdown table: one line per method, ``mean ± std`` of each metric over cases, and the MSE ratio to
    the best classical method. Metrics that are NaN for every row (e.g. Dice when overlap was skipped) are
    left out."""
    summary = summarize(rows)
    cols = [c for c in SUMMARY_METRICS if f"{c}_mean" in summary[0]
            and any(math.isfinite(s[f"{c}_mean"]) for s in summary)]
    best = summary[0]["best_classical"]
    ratio_header = f"MSE / {best}" if best else "MSE / best classical"
    header = ["method", "cases", *[SUMMARY_METRICS[c] for c in cols], ratio_header]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    models = _model_lines(rows)
    if models:
        lines += [*models, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for s in summary:
        cells = [s["method"], str(s["n_cases"])]
        cells += [_mean_pm_std(s[f"{c}_mean"], s[f"{c}_std"]) for c in cols]
        cells.append(_fmt(s["mse_ratio_to_best_classical"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample std over cases (the mean alone for one case: the sample std is undefined). "
                  f"MSE/MAE/P95 over brain minus cavity (Euclidean error in mm); "
                  f"TRE = mean over held-out keypoints per case; ratio = method's mean MSE / "
                  f"{best or 'best classical'} mean MSE."]
    return "\n".join(lines) + "\n"


def _figure(ncols: int, width_per: float = 4.2, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_per * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_boxplots(rows: Sequence[dict], path: str | Path) -> Path:
    """Box plots per method of MSE (mm^2), TRE (mm) and % det J <= 0 over cases, saved as PNG."""
    _check_rows(rows)
    methods = _methods(rows)
    panels = [("mse_mm2", "MSE (mm$^2$)"), ("tre_mm", "TRE (mm)"), ("pct_jacobian_nonpositive", "det J <= 0 (%)")]
    fig, axes = _figure(len(panels))
    for ax, (col, label) in zip(axes, panels, strict=True):
        data = [(_values(rows, m, col)) for m in methods]
        data = [v[np.isfinite(v)] for v in data]
        ax.boxplot([v if len(v) else [np.nan] for v in data], showmeans=True)
        ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("per-case values: box = quartiles, line = median, triangle = mean", fontsize=9)
    return _save(fig, Path(path))


def _sweep_groups(rows: Sequence[dict], param: str) -> tuple[list, list[str]]:
    _check_rows(rows)
    if param not in rows[0]:
        raise BrainshiftError(f"expected rows with a {param!r} column to sweep over, got {sorted(rows[0])}")
    values = sorted({float(r[param]) for r in rows})
    return values, _methods(rows)


def sweep_markdown(rows: Sequence[dict], param: str, metrics: Sequence[str] = ("mse_mm2", "tre_mm")) -> str:
    """Markdown tables of ``mean ± std`` of each metric per value of ``param`` (rows) and method (columns)."""
    values, methods = _sweep_groups(rows, param)
    lines = []
    for metric in metrics:
        lines += [f"#### {SUMMARY_METRICS.get(metric, metric)} vs {param}", "",
                  "| " + " | ".join([param, *methods]) + " |", "|" + "|".join(["---"] * (len(methods) + 1)) + "|"]
        for v in values:
            sub = [r for r in rows if float(r[param]) == v]
            cells = [_mean_pm_std(*_mean_std(_values(sub, m, metric))) for m in methods]
            lines.append("| " + " | ".join([f"{v:g}", *cells]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], param: str, path: str | Path,
               metrics: Sequence[str] = ("mse_mm2", "tre_mm")) -> Path:
    """Mean (± std error bars) of each metric against ``param``, one line per method, saved as PNG."""
    values, methods = _sweep_groups(rows, param)
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        for m in methods:
            stats = [_mean_std(_values([r for r in rows if float(r[param]) == v], m, metric)) for v in values]
            means = np.array([s[0] for s in stats])
            stds = np.nan_to_num(np.array([s[1] for s in stats]))  # one case: no error bar
            ok = np.isfinite(means)
            if ok.any():
                ax.errorbar(np.asarray(values)[ok], means[ok], yerr=stds[ok], marker="o", capsize=3, label=m)
        ax.set_xlabel(param)
        ax.set_ylabel(SUMMARY_METRICS.get(metric, metric))
        ax.set_title(f"{SUMMARY_METRICS.get(metric, metric)} vs {param}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def write_tables(rows: Sequence[dict], out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``metrics_per_case.csv``, ``summary.md`` and ``boxplots.png`` into ``out_dir`` (created) as one set
    with a ``summary.json`` manifest (:class:`brainshift.io.output_set.OutputSet`: a failure leaves ``out_dir``
    as it was; a user's file at one of these names is an error, never overwritten).

    Returns:
        ``{"csv": path, "summary": path, "boxplots": path}`` (their final paths).

    Raises:
        OutputError: a file could not be written, or a file brainshift did not write is in the way.
    """
    from brainshift.io.output_set import OutputSet

    _check_rows(rows)
    out = Path(out_dir)
    names = {"csv": "metrics_per_case.csv", "summary": "summary.md", "boxplots": "boxplots.png"}
    with OutputSet(out, names.values()) as outputs:
        outputs.write(names["csv"], lambda p: write_per_case_csv(rows, p))
        outputs.write(names["summary"], lambda p: p.write_text(summary_markdown(rows, title=title)))
        outputs.write(names["boxplots"], lambda p: plot_boxplots(rows, p))
        outputs.commit(_json_safe({"command": "brainshift evaluate", "title": title, "rows": len(rows),
                                   **_model_summary(rows)}))
    return {k: out / v for k, v in names.items()}


def _model_summary(rows: Sequence[dict]) -> dict:
    """``summary.json``'s record of the network methods: ``model`` (``name``, ``weights``, ``safeguards``; None
    without a network; a list when the rows hold several) and ``safeguards``: method -> ``alpha_mean``,
    ``beta_mean``, ``n_cases`` (the safeguards' mean over the method's cases; None when off),
    ``n_no_learnt_correction`` (cases where the safeguards kept none of the network's correction without running it:
    keypoints clustered in one region)."""
    recs = models_of_rows(rows)
    models = [{k: r[k] for k in ("name", "weights", "safeguards")} for r in recs]
    blend = {m: v for r in recs for m, v in r["methods"].items() if r["safeguards"]}
    return {"model": (models[0] if len(models) == 1 else models) if models else None,
            "safeguards": blend or None}


def _json_safe(obj):
    """``obj`` with non-finite floats replaced by None (``summary.json`` is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
