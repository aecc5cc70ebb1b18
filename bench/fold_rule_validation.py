"""Validation of the safeguards' fold rule (session 15): ``blocks`` / ``random`` / ``knndm`` on validation cases.

For each case of ``--data`` (validation data only: never ``data/heldout`` or ``data/test``), keypoints are drawn
as ``bench/generalization.py`` draws them (``--keypoint-rule``, ``--n-keypoints``, ``--noise-mm``, seeded per
case), the classical fields are made (``linear``, ``tps``), and the initial field ``--method`` is refined by
:func:`brainshift.model.safeguards.safe_refine` under each fold rule of ``--fold-rules``. Prints one JSON line
per case and a table: mean and worst per-case MSE ratio to the better classical interpolator, mean MSE, TRE,
mean alpha, and which kNNDM candidate was chosen (clusters ``q``: ``q = k`` blocks, ``q = N`` random).

    .venv/bin/python bench/fold_rule_validation.py --data data/sg_val --out /tmp/fold_val_detected.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="validation dataset (simulate-batch output)")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--keypoint-rule", default="detected", choices=("detected", "random", "cortex", "craniotomy"))
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--noise-mm", type=float, default=0.0)
    ap.add_argument("--method", default="tps", choices=("linear", "tps", "tps3d"))
    ap.add_argument("--fold-rules", default="blocks,random,knndm")
    ap.add_argument("--cases", type=int, default=None, help="first N cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON lines (one per case)")
    ap.add_argument("--training-draws", default=None, metavar="TRAIN_CONFIG",
                    help="draw each case's keypoints as the training config's validation does (its keypoint rules, "
                    "counts, noise and interpolator per case: brainshift.train.data.validation_items) instead of "
                    "--keypoint-rule / --n-keypoints / --noise-mm / --method")
    args = ap.parse_args()
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from brainshift.evaluate.metrics import score_field
    from brainshift.interpolate import interpolate
    from brainshift.model.checkpoint import load_weights
    from brainshift.model.safeguards import safe_refine
    from brainshift.simulate.dataset import list_cases

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = load_weights(args.weights, device="cpu")
    rules = args.fold_rules.split(",")
    ids = list_cases(args.data)[: args.cases] if args.cases else list_cases(args.data)
    rows = []
    fout = open(args.out, "w") if args.out else None
    for problem in problems(args, ids):
        cid, image, aff, gt, region, brain, pts, dsp, hp, hd, method, rule, noise = problem

        def score(f, gt=gt, aff=aff, region=region, hp=hp, hd=hd):
            return score_field(f, gt, aff, region, hp, hd)

        classical = {m: interpolate(m, pts, dsp, image.shape, aff) for m in dict.fromkeys(("linear", "tps", method))}
        row = {"case": cid, "rule": rule, "n": len(pts), "noise": round(float(noise), 3), "method": method}
        for m, f in classical.items():
            s = score(f)
            row[f"mse_{m}"], row[f"tre_{m}"] = s["mse_mm2"], s["tre_mm"]
        for r in rules:
            t = time.perf_counter()
            res = safe_refine(image, pts, dsp, classical[method], model, method=method, mask=brain, seed=args.seed,
                              fold_rule=r)
            s = score(res.field_vox)
            row[f"mse_{r}"], row[f"tre_{r}"] = s["mse_mm2"], s["tre_mm"]
            row[f"alpha_{r}"], row[f"s_{r}"] = res.alpha, time.perf_counter() - t
            if r == "knndm":
                row["knndm_q"] = res.info.get("fold_clusters")
        row["mse_net"] = score(res.network_field_vox)["mse_mm2"]
        rows.append(row)
        line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        print(line, flush=True)
        if fout:
            fout.write(line + "\n")
            fout.flush()
    best = np.array([min(r["mse_linear"], r["mse_tps"]) for r in rows])
    what = (f"keypoints as the validation of {args.training_draws}" if args.training_draws else
            f"rule {args.keypoint_rule}, {args.n_keypoints} keypoints, noise {args.noise_mm} mm, initial field "
            f"{args.method}")
    print(f"\n{len(rows)} cases of {args.data}, {what}\n")
    print("| field | mean MSE mm² | mean ratio to best classical | worst ratio | mean TRE mm | mean alpha |")
    print("|---|---|---|---|---|---|")
    for r in ["linear", "tps", "net", *rules]:
        mse = np.array([x[f"mse_{r}"] for x in rows])
        tre = np.mean([x[f"tre_{r}"] for x in rows]) if f"tre_{r}" in rows[0] else float("nan")
        alpha = np.mean([x[f"alpha_{r}"] for x in rows]) if f"alpha_{r}" in rows[0] else float("nan")
        ratio = mse / best
        print(f"| {r} | {mse.mean():.4f} | {ratio.mean():.3f} | {ratio.max():.3f} | {tre:.3f} | {alpha:.2f} |")
    if "knndm" in rules:
        qs = [x["knndm_q"] for x in rows]
        print(f"\nkNNDM chose q = {dict(zip(*np.unique(qs, return_counts=True), strict=True))} (clusters: count)")


def problems(args, ids):
    """Per case: ``(case id, image, affine, ground truth, evaluation region, brain mask, points, displacements,
    held-out points, held-out displacements, interpolator, keypoint rule, noise mm)`` (voxel units)."""
    from generalization import rule_candidates

    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.simulate.dataset import read_case, read_subject_keypoints
    from brainshift.volume import Volume

    if args.training_draws:
        from brainshift.train.config import load_config
        from brainshift.train.data import as_numpy, validation_items
        from brainshift.train.loop import network_config

        cfg = load_config(args.training_draws)
        items = validation_items(args.data, ids, network_config(cfg), seed=cfg.seed, interp=cfg.interp,
                                 k_range=cfg.k_range, heldout_kpts=cfg.heldout_kpts,
                                 variant_options=cfg.variant_options)
        for case, var in items:
            c = {k: as_numpy(v) for k, v in case.items()}
            yield (c["case_id"], Volume(c["image"], c["affine"]), c["affine"], c["gt"], c["eval_mask"] > 0,
                   c["brain"], np.asarray(var["points"], float), np.asarray(var["disps"], float),
                   np.asarray(var["heldout_points"], float).reshape(-1, 3),
                   np.asarray(var["heldout_disps"], float).reshape(-1, 3), var["method"], var["rule"],
                   float(var["noise_mm"]))
        return
    for cid in ids:
        case = read_case(args.data, cid)
        sub = case.subject
        aff = sub.image.affine
        cands = rule_candidates(case, args.keypoint_rule, args.seed)
        if cands is None:
            cands = read_subject_keypoints(args.data, sub.subject_id)
        kp = draw_case_keypoints(case.field, keypoint_mask(case), aff, rng=case_rng(args.seed, cid),
                                 n_keypoints=args.n_keypoints, candidates_vox=cands, noise_mm=args.noise_mm)
        yield (cid, sub.image, aff, case.field, evaluation_mask(case), sub.brain_mask.data > 0, kp.points_vox,
               kp.disps_vox, kp.heldout_points_vox, kp.heldout_disps_vox, args.method, args.keypoint_rule,
               args.noise_mm)


if __name__ == "__main__":
    main()
