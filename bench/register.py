"""Benchmark: ``brainshift register`` on simulated cases with synthetic intraoperative MRI (issue 13).

For each case of a simulated dataset (default: the held-out subjects of ``data/heldout/in_family``, 1 mm grids),
the case's synthetic intraop MRI (``intraop_t1.nii.gz`` when the dataset has it, else made the same way:
:func:`brainshift.simulate.dataset.case_intraop_image`, seeded from the case seed: the preop moved by the ground
truth, fluid-filled cavity, bias field, Rician noise, its own grid of 1-1.5 mm rotated up to 10 degrees) is
registered to the preop image, and the methods are scored against the ground truth:

- ``none``: the zero field (how far the tissue moved);
- ``register``: :func:`brainshift.register.register` with the subject's brain mask (as ``--mask``), ``-m tps``,
  ``--no-refine`` (and, with ``--refine``, refined by the shipped model under the safeguards);
- ``oracle-tps``: the pipeline given 20 true keypoints (detected candidates with ground-truth displacements, drawn
  as ``brainshift evaluate`` draws them), ``tps``, refined likewise with ``--refine``.

Matches: count of inliers and precision (fraction whose displacement is within 1 mm of the ground truth at the
preop keypoint, world mm). Scores (:func:`brainshift.evaluate.metrics.score_field`): MSE over brain minus cavity,
TRE at 100 held-out points (the same for every method), time.

    .venv/bin/python bench/register.py --data data/heldout/in_family --cases 3 --out bench/register

Writes ``per_case.csv`` and ``summary.md`` to ``--out``. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

METHODS = ("none", "register", "oracle-tps")


def run_case(data_dir: Path, case_id: str, *, seed: int, refine_model) -> list[dict]:
    from brainshift.compensate import compensate
    from brainshift.evaluate.metrics import score_field
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.io.images import read_image
    from brainshift.keypoints.sampling import trilinear_sample
    from brainshift.register import register
    from brainshift.simulate.dataset import INTRAOP_FILE, case_intraop_image, read_case, read_subject_keypoints

    case = read_case(data_dir, case_id)
    subject = case.subject
    affine = subject.image.affine
    gt = case.field
    t0 = time.perf_counter()
    path = data_dir / "cases" / case_id / INTRAOP_FILE
    if path.is_file():
        intraop = read_image(path)
    else:
        intraop, _ = case_intraop_image(subject, gt, case.cavity_mask, int(case.meta.get("case_seed", 0)))
    t_intraop = time.perf_counter() - t0
    region = evaluation_mask(case)
    kp = draw_case_keypoints(gt, keypoint_mask(case), affine, rng=case_rng(seed, case_id), n_keypoints=20,
                             candidates_vox=read_subject_keypoints(data_dir, subject.subject_id))
    brain = subject.brain_mask.data > 0

    t0 = time.perf_counter()
    reg = register(subject.image, intraop, mask=brain, method="tps", model=refine_model, statistics=False)
    t_reg = time.perf_counter() - t0
    true_d = trilinear_sample(gt, reg.points_vox)
    err_mm = np.linalg.norm((reg.disps_vox - true_d) @ affine[:3, :3].T, axis=1)

    t0 = time.perf_counter()
    oracle = compensate(subject.image, keypoints=(kp.points_vox, kp.disps_vox), method="tps", model=refine_model,
                        mask=brain)
    t_oracle = time.perf_counter() - t0

    fields = {"none": np.zeros_like(gt), "register": reg.field, "oracle-tps": oracle.field}
    times = {"none": 0.0, "register": t_reg, "oracle-tps": t_oracle}
    rows = []
    for m in METHODS:
        s = score_field(fields[m], gt, affine, region, kp.heldout_points_vox, kp.heldout_disps_vox)
        row = {"case": case_id, "method": m, "mse_mm2": s["mse_mm2"], "tre_mm": s["tre_mm"],
               "pct_jacobian_nonpositive": s["pct_jacobian_nonpositive"], "time_s": times[m]}
        if m == "register":
            c = reg.counts
            row.update({"keypoints_preop": c["keypoints_preop"], "keypoints_intraop": c["keypoints_intraop"],
                        "candidate_matches": c["candidate_matches"], "inliers": c["inliers"],
                        "inlier_ratio": c["inlier_ratio"], "precision_1mm": float((err_mm < 1.0).mean()),
                        "median_match_error_mm": float(np.median(err_mm)),
                        "timings": json.dumps({k: round(v, 2) for k, v in reg.timings_s.items()})})
        rows.append(row)
    print(f"  {case_id}: intraop {t_intraop:.1f} s, {reg.counts['inliers']} inliers "
          f"(precision {rows[1]['precision_1mm']:.2f}), register {t_reg:.1f} s; TRE none / register / oracle "
          + " / ".join(f"{r['tre_mm']:.2f}" for r in rows) + " mm; MSE "
          + " / ".join(f"{r['mse_mm2']:.2f}" for r in rows), flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| method | cases | mean MSE mm² | mean TRE mm | mean time s | inliers (mean, min) | precision < 1 mm "
             "(mean, min) |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = [x for x in rows if x["method"] == m]
        if not r:
            continue
        extra = "- | -"
        if m == "register":
            inl = [x["inliers"] for x in r]
            pr = [x["precision_1mm"] for x in r]
            extra = f"{np.mean(inl):.0f}, {min(inl)} | {np.mean(pr):.3f}, {min(pr):.3f}"
        lines.append(f"| {m} | {len(r)} | {np.mean([x['mse_mm2'] for x in r]):.3f} | "
                     f"{np.mean([x['tre_mm'] for x in r]):.3f} | {np.mean([x['time_s'] for x in r]):.1f} | {extra} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/heldout/in_family", help="simulated dataset folder")
    ap.add_argument("--cases", type=int, default=3, help="first N cases")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine", action="store_true", help="refine both pipelines with the shipped model")
    ap.add_argument("--out", default="bench/register")
    args = ap.parse_args()
    from brainshift.simulate.dataset import list_cases

    data = Path(args.data)
    model = None
    if args.refine:
        from brainshift.model.checkpoint import load_weights
        from brainshift.resources import resolve_weights

        model = load_weights(resolve_weights(None, required=True), device="cpu")
    rows = []
    for cid in list_cases(data)[: args.cases]:
        rows += run_case(data, cid, seed=args.seed, refine_model=model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "per_case.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    text = summarise(rows)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
