"""A given initial field (``infer -i`` with ``-k``) under the safeguards: the fold rule before session 24 (folds from
a tps of the kept keypoints) against :func:`brainshift.model.safeguards.given_field_folds` (issue 11).

For each case of the datasets given (20 detected exact keypoints, seed 0, the default model) it refines two given
fields: the ground truth itself (a right field should come back unchanged) and the tps of the keypoints (should
match ``net-tps``, the interpolated path), and prints per-case MSE (mm^2) and the chosen alpha, then means and
maxima. The old rule is emulated by making ``given_field_folds`` return None (compensate then folds with tps).

    .venv/bin/python bench/given_field_validation.py data/val_family data/default_val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", help="simulated datasets")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import brainshift.model.safeguards as sg
    from brainshift.compensate import compensate
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.model.checkpoint import load_weights
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    model = load_weights(args.weights)
    new_rule = sg.given_field_folds
    rules = {"old": lambda *a, **k: None, "new": new_rule}
    rows = []
    for data in map(Path, args.data):
        for cid in list_cases(data):
            case = read_case(data, cid)
            subj, aff = case.subject, case.subject.image.affine
            kp = draw_case_keypoints(case.field, keypoint_mask(case), aff, rng=case_rng(args.seed, cid),
                                     n_keypoints=20, noise_mm=0,
                                     candidates_vox=read_subject_keypoints(data, subj.subject_id))
            brain, region = subj.brain_mask.data > 0, evaluation_mask(case)

            def mse(f, kp=kp, case=case, region=region, aff=aff):
                return metrics.score_field(f, case.field, aff, region, kp.heldout_points_vox,
                                           kp.heldout_disps_vox)["mse_mm2"]

            keypoints = (kp.points_vox, kp.disps_vox)
            tps = np.asarray(interpolate("tps", kp.points_vox, kp.disps_vox, subj.image.shape, aff), np.float32)
            r = {"data": data.name, "case": cid, "tps": mse(tps),
                 "net_tps": mse(compensate(subj.image, keypoints=keypoints, method="tps", model=model, mask=brain,
                                           safeguard_seed=args.seed).refined_field)}
            try:
                for rule_name, rule in rules.items():
                    sg.given_field_folds = rule
                    for init_name, init in (("truth", case.field), ("tps", tps)):
                        res = compensate(subj.image, keypoints=keypoints, initial_field=init, model=model,
                                         mask=brain, safeguard_seed=args.seed)
                        r[f"{rule_name}_{init_name}"] = mse(res.refined_field)
                        r[f"{rule_name}_{init_name}_alpha"] = round(res.safeguards["alpha"], 3)
            finally:
                sg.given_field_folds = new_rule
            rows.append(r)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    print("| quantity | mean | max |\n|---|---|---|")
    for k in ("tps", "net_tps", "old_truth", "new_truth", "old_tps", "new_tps"):
        vals = [r[k] for r in rows]
        print(f"| {k} MSE mm² | {np.mean(vals):.4f} | {np.max(vals):.4f} |")
    for k in ("old_tps", "new_tps"):
        print(f"| {k} / net_tps | {np.mean([r[k] / r['net_tps'] for r in rows]):.4f} | "
              f"{np.max([r[k] / r['net_tps'] for r in rows]):.4f} |")


if __name__ == "__main__":
    main()
