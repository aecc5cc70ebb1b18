"""Validation of the safeguards' per-voxel shrinkage by the mirror spread (issue 11, session 27).

For each case of the ``--data`` folders (validation data only: never ``data/heldout``, ``data/test`` or a fresh
test set), keypoints are drawn as ``bench/generalization.py`` draws them (``--keypoint-rule``, ``--n-keypoints``,
``--noise-mm``, seeded per case), the classical fields are made (``linear``, ``tps``), and the initial field
``--method`` is refined by :func:`brainshift.model.safeguards.safe_refine` once per variant of ``--variants``
(``NAME=K1/K2/...``: the candidate ``spread_kappas``; ``0`` alone is the rule before). Prints one JSON line per
case and a table per variant: mean and worst per-case MSE ratio to the better classical interpolator, cases
above 1.05, mean MSE, TRE, mean alpha and the kappa chosen.

    .venv/bin/python bench/spread_shrinkage_validation.py --data data/bilateral_val_170_172 \\
        --weights weights/family_lomo.safetensors --variants base=0 grid=0/1/4/16 --out /tmp/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, nargs="+", help="validation datasets (simulate-batch output)")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--keypoint-rule", default="detected", choices=("detected", "random", "cortex", "craniotomy"))
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--noise-mm", type=float, default=0.0)
    ap.add_argument("--method", default="tps", choices=("linear", "tps", "tps3d"))
    ap.add_argument("--variants", nargs="+", default=["base=0", "grid=0/1/4/16"])
    ap.add_argument("--cases", type=int, default=None, help="first N cases of each dataset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON lines (one per case)")
    args = ap.parse_args()
    args.training_draws = None
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fold_rule_validation import problems

    from brainshift.evaluate.metrics import score_field
    from brainshift.interpolate import interpolate
    from brainshift.model.checkpoint import load_weights
    from brainshift.model.safeguards import safe_refine
    from brainshift.simulate.dataset import list_cases

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    model = load_weights(args.weights, device="cpu")
    variants = {v.split("=")[0]: tuple(float(k) for k in v.split("=")[1].split("/")) for v in args.variants}
    rows = []
    fout = open(args.out, "w") if args.out else None
    for data in args.data:
        args.data_one = data
        ids = list_cases(data)[: args.cases] if args.cases else list_cases(data)
        args_one = argparse.Namespace(**{**vars(args), "data": data})
        for problem in problems(args_one, ids):
            cid, image, aff, gt, region, brain, pts, dsp, hp, hd, method, rule, noise = problem

            def score(f, gt=gt, aff=aff, region=region, hp=hp, hd=hd):
                return score_field(f, gt, aff, region, hp, hd)

            classical = {m: interpolate(m, pts, dsp, image.shape, aff)
                         for m in dict.fromkeys(("linear", "tps", method))}
            row = {"case": f"{Path(data).name}/{cid}", "n": len(pts), "noise": round(float(noise), 3)}
            for m, f in classical.items():
                s = score(f)
                row[f"mse_{m}"], row[f"tre_{m}"] = s["mse_mm2"], s["tre_mm"]
            for name, kappas in variants.items():
                res = safe_refine(image, pts, dsp, classical[method], model, method=method, mask=brain,
                                  seed=args.seed, spread_kappas=kappas)
                s = score(res.field_vox)
                row[f"mse_{name}"], row[f"tre_{name}"] = s["mse_mm2"], s["tre_mm"]
                row[f"alpha_{name}"], row[f"kappa_{name}"] = res.alpha, res.info.get("spread_kappa", 0.0)
            row["mse_net"] = score(res.network_field_vox)["mse_mm2"]
            rows.append(row)
            line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
            print(line, flush=True)
            if fout:
                fout.write(line + "\n")
                fout.flush()
    table(rows, list(variants), f"{args.weights}; rule {args.keypoint_rule}, {args.n_keypoints} keypoints, "
          f"noise {args.noise_mm} mm, initial field {args.method}")


def table(rows: list[dict], names: list[str], what: str) -> None:
    """Print the per-variant table of the module docstring."""
    best = np.array([min(r["mse_linear"], r["mse_tps"]) for r in rows])
    print(f"\n{len(rows)} cases; {what}\n")
    print("| field | mean MSE mm² | mean ratio to best classical | worst ratio | cases > 1.05 | mean TRE mm | "
          "mean alpha | kappa chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ["linear", "tps", "net", *names]:
        mse = np.array([x[f"mse_{r}"] for x in rows])
        tre = np.mean([x[f"tre_{r}"] for x in rows]) if f"tre_{r}" in rows[0] else float("nan")
        alpha = np.mean([x[f"alpha_{r}"] for x in rows]) if f"alpha_{r}" in rows[0] else float("nan")
        kap = ""
        if f"kappa_{r}" in rows[0]:
            ks, ns = np.unique([x[f"kappa_{r}"] for x in rows], return_counts=True)
            kap = ", ".join(f"{k:g}: {n}" for k, n in zip(ks, ns, strict=True))
        ratio = mse / best
        print(f"| {r} | {mse.mean():.4f} | {ratio.mean():.3f} | {ratio.max():.3f} | {(ratio > 1.05).sum()} | "
              f"{tre:.3f} | {alpha:.2f} | {kap} |")


if __name__ == "__main__":
    main()
