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
  as ``brainshift evaluate`` draws them), ``tps``;
- with ``--refine``, also ``register-refined`` and ``oracle-refined``: the same initial fields refined by the
  shipped model under the safeguards (``infer --refine``'s default);
- with ``--ants``, ``ants-syn``: a classical intensity-based registration as the baseline (antspyx, installed by
  ``make install`` but not a runtime dependency of brainshift): ``ants.registration(fixed=preop, moving=intraop,
  type_of_transform="SyN", mask=brain mask)`` (affine then SyN, Mattes mutual information, SyN iterations
  (40, 20, 0): antspyx's defaults; seeded), its forward transforms composed into one displacement field on
  the preop grid (``ants.apply_transforms(..., compose=...)``): the same forward Lagrangian meaning as
  brainshift's fields (tests/io/test_ants.py pins it), read back with :func:`brainshift.io.fields.read_field`.

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

METHODS = ("none", "register", "register-refined", "oracle-tps", "oracle-refined", "ants-syn")


def ants_syn(preop, intraop, brain: np.ndarray, seed: int, threads: int) -> np.ndarray:
    """Forward Lagrangian voxel-unit field ``(3, I, J, K)`` on the preop grid from ANTs SyN (intraop -> preop)."""
    import os
    import tempfile

    import ants
    import nibabel as nib

    from brainshift.io.fields import read_field

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, arr, aff in (("preop", preop.data, preop.affine), ("intraop", intraop.data, intraop.affine),
                               ("mask", brain.astype(np.uint8), preop.affine)):
            paths[name] = f"{tmp}/{name}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), aff), paths[name])
        fixed, moving, mask = (ants.image_read(paths[k]) for k in ("preop", "intraop", "mask"))
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN", mask=mask,
                                random_seed=seed, outprefix=f"{tmp}/syn_")
        comp = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=reg["fwdtransforms"],
                                     compose=f"{tmp}/comp_")
        field, _ = read_field(comp, reference=preop)
    return field


def run_case(data_dir: Path, case_id: str, *, seed: int, refine_model, ants: bool = False, threads: int = 2
             ) -> list[dict]:
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

    fields = {"none": np.zeros_like(gt), "register": reg.compensation.initial_field,
              "oracle-tps": oracle.initial_field}
    # the refined rows' time is the whole call; the unrefined rows' time excludes the refinement
    times = {"none": 0.0, "register": t_reg - reg.compensation.timings_s.get("refine with the network", 0.0),
             "oracle-tps": t_oracle - oracle.timings_s.get("refine with the network", 0.0)}
    if refine_model is not None:
        fields.update({"register-refined": reg.field, "oracle-refined": oracle.field})
        times.update({"register-refined": t_reg, "oracle-refined": t_oracle})
    if ants:
        t0 = time.perf_counter()
        fields["ants-syn"] = ants_syn(subject.image, intraop, brain, seed, threads)
        times["ants-syn"] = time.perf_counter() - t0
    rows = []
    for m in (m for m in METHODS if m in fields):
        s = score_field(fields[m], gt, affine, region, kp.heldout_points_vox, kp.heldout_disps_vox)
        row = {"case": case_id, "method": m, "mse_mm2": s["mse_mm2"], "tre_mm": s["tre_mm"],
               "pct_jacobian_nonpositive": s["pct_jacobian_nonpositive"], "time_s": times[m]}
        if m.startswith("register"):
            c = reg.counts
            row.update({"keypoints_preop": c["keypoints_preop"], "keypoints_intraop": c["keypoints_intraop"],
                        "candidate_matches": c["candidate_matches"], "inliers": c["inliers"],
                        "inlier_ratio": c["inlier_ratio"], "precision_1mm": float((err_mm < 1.0).mean()),
                        "median_match_error_mm": float(np.median(err_mm)),
                        "timings": json.dumps({k: round(v, 2) for k, v in reg.timings_s.items()})})
        rows.append(row)
    print(f"  {case_id}: intraop {t_intraop:.1f} s, {reg.counts['inliers']} inliers "
          f"(precision {rows[1]['precision_1mm']:.2f}), register {t_reg:.1f} s; TRE "
          + ", ".join(f"{r['method']} {r['tre_mm']:.2f}" for r in rows) + " mm; MSE "
          + ", ".join(f"{r['method']} {r['mse_mm2']:.3f}" for r in rows) + "; time "
          + ", ".join(f"{r['method']} {r['time_s']:.1f}" for r in rows[1:]) + " s", flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| method | cases | mean MSE mm² | mean TRE mm | mean time s | inliers (mean, min) | precision < 1 mm "
             "(mean, min) |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = [x for x in rows if x["method"] == m]
        if not r:
            continue
        extra = "- | -"
        if m.startswith("register"):
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
    ap.add_argument("--ants", action="store_true", help="also run the ANTs SyN baseline (antspyx)")
    ap.add_argument("--threads", type=int, default=2, help="ITK threads for ANTs")
    ap.add_argument("--skip", type=int, default=0, help="skip the first N cases (resume)")
    ap.add_argument("--ants-from", default=None,
                    help="an earlier run's cases.jsonl (same data and seed): take its ants-syn rows instead of "
                         "re-running SyN (they do not depend on brainshift's code)")
    ap.add_argument("--out", default="bench/register")
    args = ap.parse_args()
    from brainshift.simulate.dataset import list_cases

    data = Path(args.data)
    model = None
    if args.refine:
        from brainshift.model.checkpoint import load_weights
        from brainshift.resources import resolve_weights

        model = load_weights(resolve_weights(None, required=True), device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "cases.jsonl"  # one line per finished case: the run resumes where it stopped
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    finished = {r["case"] for r in rows}
    for cid in list_cases(data)[args.skip: args.skip + args.cases]:
        if cid in finished:
            continue
        new = run_case(data, cid, seed=args.seed, refine_model=model, ants=args.ants, threads=args.threads)
        if args.ants_from:
            new += [r for r in (json.loads(line) for line in Path(args.ants_from).read_text().splitlines())
                    if r["case"] == cid and r["method"] == "ants-syn"]
        with open(done, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in new)
        rows += new
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
