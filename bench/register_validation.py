"""Validation of ``register``'s outlier-rejection threshold on simulated cases with synthetic intraop MRI.

For each case (default: training subjects of ``data/lomo_train``, not the held-out benchmark of
``bench/register.py``), the synthetic intraop MRI is made as ``simulate`` makes it, keypoints are detected and
described once in both images, and the matches are made and filtered for each ``threshold_mm`` of
:func:`brainshift.keypoints.match.reject_outliers`; the inliers' ``tps`` field is scored (MSE over brain minus
cavity, TRE at 100 held-out detected keypoints; also with the ridge chosen by cross-validation over the
matches, :func:`brainshift.interpolate.tps.choose_tps_lam`) and their precision (displacement within 1 mm of the ground
truth) counted. Prints one JSON line per case and threshold.

    .venv/bin/python bench/register_validation.py --thresholds 1.0,1.5,2.0 --local-models median,affine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/lomo_train")
    ap.add_argument("--cases", default=",".join(f"s{i:04d}_c0{(i + 2) % 5}" for i in range(20, 28)))
    ap.add_argument("--thresholds", default="1.0,1.5,2.0")
    ap.add_argument("--local-models", default="median", help="comma-separated local_model values")
    args = ap.parse_args()
    from brainshift.evaluate.metrics import score_field
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.interpolate.tps import choose_tps_lam
    from brainshift.keypoints.describe import describe_keypoints
    from brainshift.keypoints.detect import detect_keypoints
    from brainshift.keypoints.sampling import trilinear_sample
    from brainshift.register import _intraop_region, match_features
    from brainshift.simulate.dataset import case_intraop_image, read_case, read_subject_keypoints

    root = Path(args.data)
    for cid in args.cases.split(","):
        case = read_case(root, cid)
        subject, gt = case.subject, case.field
        aff = subject.image.affine
        intraop, _ = case_intraop_image(subject, gt, case.cavity_mask, int(case.meta.get("case_seed", 0)))
        brain = subject.brain_mask.data > 0
        region = evaluation_mask(case)
        kp = draw_case_keypoints(gt, keypoint_mask(case), aff, rng=case_rng(0, cid), n_keypoints=20,
                                 candidates_vox=read_subject_keypoints(root, subject.subject_id))
        k_pre = detect_keypoints(subject.image, brain)
        k_in = detect_keypoints(intraop, _intraop_region(brain, subject.image, intraop, 5.0))
        d_pre = describe_keypoints(subject.image, k_pre.points_vox, k_pre.scales_mm)
        d_in = describe_keypoints(intraop, k_in.points_vox, k_in.scales_mm)
        for model, thr in ((m, float(x)) for m in args.local_models.split(",") for x in args.thresholds.split(",")):
            t = match_features(k_pre.points_vox, d_pre, aff, k_in.points_vox, d_in, intraop.affine,
                               max_matches=2000, reject_options={"threshold_mm": thr, "local_model": model})
            err = np.linalg.norm((t.disps_vox - trilinear_sample(gt, t.points_vox)) @ aff[:3, :3].T, axis=1)
            f = interpolate("tps", t.points_vox, t.disps_vox, gt.shape[1:], aff)
            s = score_field(f, gt, aff, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            lam, _ = choose_tps_lam(t.points_vox, t.disps_vox, gt.shape[1:], aff)
            f_cv = interpolate("tps", t.points_vox, t.disps_vox, gt.shape[1:], aff, lam=lam)
            s_cv = score_field(f_cv, gt, aff, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            print(json.dumps({"case": cid, "local_model": model, "threshold_mm": thr, "inliers": int(len(err)),
                              "tps_lam_cv": lam, "mse_mm2_lam_cv": s_cv["mse_mm2"], "tre_mm_lam_cv": s_cv["tre_mm"],
                              "candidates": int(t.counts["candidate_matches"]),
                              "precision_1mm": float((err < 1).mean()), "mse_mm2": s["mse_mm2"],
                              "tre_mm": s["tre_mm"], "max_disp_mm": float(case.meta.get("max_displacement_mm", 0))}),
                  flush=True)


if __name__ == "__main__":
    main()
