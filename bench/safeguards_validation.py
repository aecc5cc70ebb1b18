"""Validation of the safeguards' rule (session 8): ``infer --refine -m tps`` under the safeguards on simulated cases.

For each case (default: ``data/lomo_train`` s0010_c00, s0011_c01, ..., s0017_c02: training subjects of the
leave-one-model-out dataset, never seen by the shipped model) and each keypoint setting (count, noise per
component in mm), keypoints are drawn as ``brainshift evaluate`` draws them (among the subject's detected
keypoints, 100 others held out for TRE) and the field is made with :func:`brainshift.compensate.compensate`
(``tps``, the shipped model, the subject's brain mask). Prints one JSON line per case and setting: MSE over brain
minus cavity and TRE of the initial (tps) and refined fields, ``alpha`` and ``beta``. To compare rules, run it on
two source trees (``PYTHONPATH=<tree>/src``), e.g. a ``git archive`` of an earlier commit.

    .venv/bin/python bench/safeguards_validation.py --tag now > /tmp/now.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/lomo_train")
    ap.add_argument("--cases", default=",".join(f"s{i:04d}_c0{i % 5}" for i in range(10, 18)))
    ap.add_argument("--settings", default="20:0,300:0.3,20:0.5", help="count:noise_mm,...")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from brainshift.compensate import compensate
    from brainshift.evaluate.metrics import score_field
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.model.checkpoint import load_weights
    from brainshift.simulate.dataset import read_case, read_subject_keypoints

    root = Path(args.data)
    model = load_weights(Path(args.weights), device="cpu")
    settings = [(int(a), float(b)) for a, b in (s.split(":") for s in args.settings.split(","))]
    for cid in args.cases.split(","):
        case = read_case(root, cid)
        aff = case.subject.image.affine
        region = evaluation_mask(case)
        cand = read_subject_keypoints(root, case.subject.subject_id)
        for n, noise in settings:
            n_use = min(n, len(cand) - 120)
            kp = draw_case_keypoints(case.field, keypoint_mask(case), aff, rng=case_rng(0, cid), n_keypoints=n_use,
                                     noise_mm=noise, candidates_vox=cand)
            t = time.perf_counter()
            r = compensate(case.subject.image, keypoints=(kp.points_vox, kp.disps_vox), method="tps", model=model,
                           mask=case.subject.brain_mask.data > 0, statistics=False)
            dt = time.perf_counter() - t
            s0 = score_field(r.initial_field, case.field, aff, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            s1 = score_field(r.field, case.field, aff, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            print(json.dumps({"tag": args.tag, "case": cid, "n": n_use, "noise": noise, "mse_tps": s0["mse_mm2"],
                              "mse_safe": s1["mse_mm2"], "tre_tps": s0["tre_mm"], "tre_safe": s1["tre_mm"],
                              "alpha": r.safeguards["alpha"], "beta": r.safeguards.get("beta"), "s": dt}),
                  flush=True)


if __name__ == "__main__":
    main()
