"""Benchmark: accuracy of the classical interpolators and the network over a held-out simulated set (issue 6).

Runs :func:`brainshift.evaluate.run.evaluate_dataset` (the code behind ``brainshift evaluate``) on a
held-out dataset in the simulator's layout and writes to ``--out``:

- the main comparison at 20 keypoints (methods ``linear, tps, net-linear, net-tps``, Dice/HD95 included):
  ``metrics_per_case.csv``, ``summary.md``, ``boxplots.png``;
- the keypoint-count study (5, 10, 20, 40 keypoints, no noise) and the noise study (20 keypoints, Gaussian
  noise of 0, 0.5 and 1 mm on each world component of the keypoint displacements): ``sweep_*.md`` tables and
  ``sweep_*.png`` plots (Dice/HD95 skipped there);
- ``targets.md``: the issue's targets checked against the main comparison — network-refined MSE <= 0.5 x the
  better of linear and TPS, network TRE below both, % det J <= 0 at most 0.05 %.

    .venv/bin/python bench/accuracy.py --data data_test/ --weights weights/default.safetensors --out bench/accuracy

Deterministic for a seed (every case's keypoint draw comes from the seed and the case id).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from pathlib import Path

import numpy as np

MAIN_METHODS = ("linear", "tps", "net-linear", "net-tps")


def _mean(rows, method, column):
    v = np.asarray([float(r[column]) for r in rows if r["method"] == method], dtype=np.float64)
    return float(np.nanmean(v)) if v.size and np.isfinite(v).any() else math.nan


def check_targets(rows: list[dict]) -> str:
    """Markdown verdict of the issue's accuracy targets on the main comparison's rows."""
    best_classical = min(("linear", "tps"), key=lambda m: _mean(rows, m, "mse_mm2"))
    ref_mse = _mean(rows, best_classical, "mse_mm2")
    lines = ["| method | mean MSE mm² | x best classical | mean TRE mm | % det J <= 0 | targets met |",
             "|---|---|---|---|---|---|"]
    for m in sorted({r["method"] for r in rows}, key=lambda x: (x.startswith("net"), x)):
        mse, tre, jac = _mean(rows, m, "mse_mm2"), _mean(rows, m, "tre_mm"), _mean(rows, m, "pct_jacobian_nonpositive")
        ok = ""
        if m.startswith("net"):
            met = (mse <= 0.5 * ref_mse and tre < _mean(rows, "linear", "tre_mm") and tre < _mean(rows, "tps", "tre_mm")
                   and jac <= 0.05)
            ok = "yes" if met else "no"
        lines.append(f"| {m} | {mse:.4f} | {mse / ref_mse:.3f} | {tre:.3f} | {jac:.4f} | {ok} |")
    return (f"Best classical interpolator by MSE: `{best_classical}`. Targets for the network: MSE <= 0.5 x "
            f"that, TRE below both classical interpolators, % det J <= 0 <= 0.05 %.\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="held-out dataset (simulator layout)")
    ap.add_argument("--weights", default=None, help="network weights (default: weights/default.safetensors)")
    ap.add_argument("--out", default="bench/accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=None, help="only the first N cases")
    ap.add_argument("--methods", default=",".join(MAIN_METHODS))
    ap.add_argument("--no-sweeps", action="store_true", help="skip the keypoint-count and noise studies")
    ap.add_argument("--no-overlap", action="store_true", help="skip Dice/HD95 in the main comparison (faster)")
    args = ap.parse_args()

    from brainshift.evaluate.run import evaluate_dataset, evaluate_sweep
    from brainshift.evaluate.tables import plot_sweep, summary_markdown, sweep_markdown, write_tables
    from brainshift.io.atomic import atomic_output

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    common = {"weights": args.weights, "seed": args.seed, "cases": args.cases}
    rows = evaluate_dataset(args.data, methods, n_keypoints=20, overlap=not args.no_overlap, **common)
    write_tables(rows, out, title="Held-out accuracy, 20 keypoints")
    print(summary_markdown(rows, title="Held-out accuracy, 20 keypoints"))
    verdict = check_targets(rows)
    print(verdict)
    with atomic_output(out / "targets.md") as tmp:
        tmp.write_text(f"machine: {platform.machine()}, {os.cpu_count()} cores\n\n{verdict}")
    if args.no_sweeps:
        return
    # the 20-keypoint, noise-free setting of both studies is the main comparison (same seed, same draws):
    # reuse its rows (their Dice/HD95 columns are not used by the sweep tables) instead of recomputing them
    for name, kw, param in (("keypoints", {"n_keypoints": (5, 10, 40)}, "n_keypoints"),
                            ("noise", {"noise_mm": (0.5, 1.0)}, "noise_mm")):
        sweep = evaluate_sweep(args.data, methods, overlap=False, progress=False, **kw, **common) + rows
        table = sweep_markdown(sweep, param)
        print(table)
        with atomic_output(out / f"sweep_{name}.md") as tmp:
            tmp.write_text(table)
        plot_sweep(sweep, param, out / f"sweep_{name}.png")


if __name__ == "__main__":
    main()
