#!/usr/bin/env python
# Usage: .venv/bin/python bench/lomo_validation.py [--run RUN | --data DIR] [--weights NAME=PATH ...]
# (after a part of configs/train_family_lomo.yaml; writes --out, default /tmp/val_compare.json)
"""Shipped default vs the parts of the leave-one-model-out model on the run's validation subjects: the same
(case, variant) items the training validates on (one fixed keypoint draw per case, never in a training pool),
network alone and under the safeguards (infer's default; mirror averaging as each model's default)."""
import argparse
import json
import time

import numpy as np
import torch

from brainshift.compensate import compensate
from brainshift.evaluate.metrics import score_field
from brainshift.model import load_weights
from brainshift.model.safeguards import safe_refine
from brainshift.train.config import load_config
from brainshift.train.data import as_numpy, cases_of, validation_items
from brainshift.train.loop import network_config
from brainshift.volume import Volume

ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--run", default=None, help="training run folder (its resolved config and splits)")
ap.add_argument("--config", default="configs/train_family_lomo.yaml",
                help="without --run: the training config (its keypoint rules, seed, validation subjects)")
ap.add_argument("--data", default=None, help="without --run: dataset holding the validation subjects' cases "
                "(default: the config's data)")
ap.add_argument("--weights", nargs="+", default=["default=weights/default.safetensors",
                                                 "family_lomo=weights/family_lomo.safetensors"],
                help="NAME=PATH of each model compared")
ap.add_argument("--out", default="/tmp/val_compare.json")
args = ap.parse_args()
torch.set_num_threads(2)
if args.run:
    cfg = load_config(f"{args.run}/config_resolved.yaml")
    val = json.load(open(f"{args.run}/splits.json"))["val"]
    data = cfg.data
else:  # the validation subjects' cases of the config (e.g. re-simulated with --subjects 11:12 and 27:28)
    cfg = load_config(args.config)
    data = args.data or cfg.data
    _, case_subject = cases_of(data)  # one folder or several (case keys, brainshift.train.data.case_key)
    val = sorted(c for c, s in case_subject.items() if s in set(cfg.val_subjects or []))
net = network_config(cfg)
t = time.perf_counter()
items = validation_items(data, val, net, seed=cfg.seed, interp=cfg.interp, k_range=cfg.k_range,
                         heldout_kpts=cfg.heldout_kpts, variant_options=cfg.variant_options)
print(f"{len(items)} items in {time.perf_counter()-t:.0f} s", flush=True)
models = {w.split("=", 1)[0]: load_weights(w.split("=", 1)[1], device="cpu") for w in args.weights}
rows = []
for case, var in items:
    c = {k: as_numpy(v) for k, v in case.items()}
    img = Volume(c["image"], c["affine"])
    hp = np.asarray(var["heldout_points"], float).reshape(-1, 3)
    hd = np.asarray(var["heldout_disps"], float).reshape(-1, 3)

    def ev(f, c=c, hp=hp, hd=hd):
        return score_field(f, c["gt"], c["affine"], c["eval_mask"] > 0, hp, hd)

    s0 = ev(var["init"])
    row = {"case": c["case_id"], "init": var["method"], "k": len(var["points"]), "rule": var["rule"],
           "noise": round(float(var["noise_mm"]), 2), "mse_init": s0["mse_mm2"], "tre_init": s0["tre_mm"]}
    for name, m in models.items():
        for sg in (False, True):
            if sg:  # as infer does for a field it interpolated: the folds re-interpolate with the case's method
                f = safe_refine(img, var["points"], var["disps"], var["init"], m, method=var["method"],
                                mask=c["brain"]).field_vox
            else:
                f = compensate(img, keypoints=(var["points"], var["disps"]), initial_field=var["init"], model=m,
                               mask=c["brain"], safeguards=False).refined_field
            s = ev(f)
            tag = f"{name}{'_safe' if sg else ''}"
            row[f"mse_{tag}"] = s["mse_mm2"]
            row[f"tre_{tag}"] = s["tre_mm"]
            row[f"detj_{tag}"] = s["pct_jacobian_nonpositive"]
    rows.append(row)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
json.dump(rows, open(args.out, "w"), indent=1)
keys = [k for k in rows[0] if k.startswith("mse_")]
print("| weights | MSE mm² (mean) | ratio to initial field (mean per case) | TRE mm | detJ<=0 % |")
for k in keys:
    tag = k[4:]
    r = np.mean([x[k] / x["mse_init"] for x in rows])
    tre = np.nanmean([x["tre_" + tag] for x in rows])
    print(f"| {tag} | {np.mean([x[k] for x in rows]):.3f} | {r:.3f} | {tre:.3f} | "
          f"{np.mean([x.get('detj_'+tag, 0) for x in rows]):.4f} |")
