"""Validation of atlas designs: which atlas config spans a modelling family better (issue 15).

For each subject of a simulated dataset (``--data``, e.g. ``data/val_family``: cases of the full model family
of ``configs/simulate_family.yaml``) and each atlas config (``--configs NAME=PATH ...``), the subject's atlas is
built from its preop image and masks (``--atlases``/NAME/subject, resumable; the build time is each
``atlas.json``'s own record) and fitted to the case's keypoints as ``brainshift evaluate`` draws them (detected
DoG candidates seeded per case, held-out TRE targets), exact and with Gaussian noise per world component.
Prints and writes (``--out``) a table of the mean and worst per-case ratio of the atlas's MSE to the better
classical interpolator (linear, tps), and the build times; per case rows in ``per_case.jsonl``.

    .venv/bin/python bench/atlas_design_validation.py --data data/val_family --subjects s0170,s0171 \\
        --configs current=configs/atlas.yaml full=configs/atlas_full.yaml --atlases data/atlas_val \\
        --out bench/atlas_design

Deterministic for a seed (the builds too). Use it to choose a design on validation subjects; measure the chosen
one once on held-out data (``bench/atlas.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path


def build(data: Path, subject_id: str, config_path: Path, folder: Path, workers: int | None) -> dict:
    from brainshift.simulate.atlas import build_atlas, read_atlas_config
    from brainshift.simulate.dataset import read_subject

    rep = build_atlas(folder, read_subject(data, subject_id), read_atlas_config(config_path), n_workers=workers,
                      progress=False)
    info = json.loads((folder / "atlas.json").read_text())
    print(f"{folder}: {rep.summary()}", flush=True)
    return {"build_s": info.get("build_wall_s", math.nan), "solve_s": info.get("solve_seconds_total", math.nan),
            "components": info["n_components"], "reused": bool(rep.skipped) and not rep.solved}


def evaluate(data: Path, case_id: str, atlas_folder: Path, *, seed: int, n_keypoints: int, noise_mm: float) -> dict:
    from brainshift.atlas import load_atlas
    from brainshift.compensate import compensate
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.simulate.dataset import read_case, read_subject_keypoints

    case = read_case(data, case_id)
    subject = case.subject
    affine = subject.image.affine
    cands = read_subject_keypoints(data, subject.subject_id)
    kp = draw_case_keypoints(case.field, keypoint_mask(case), affine, rng=case_rng(seed, case.case_id),
                             n_keypoints=n_keypoints, noise_mm=noise_mm, candidates_vox=cands)
    region = evaluation_mask(case)
    out = {}
    for m in ("linear", "tps"):
        f = interpolate(m, kp.points_vox, kp.disps_vox, subject.image.shape, affine)
        out[m] = metrics.score_field(f, case.field, affine, region, kp.heldout_points_vox,
                                     kp.heldout_disps_vox)["mse_mm2"]
    res = compensate(subject.image, keypoints=(kp.points_vox, kp.disps_vox), method="atlas",
                     atlas=load_atlas(atlas_folder), safeguard_seed=seed)
    out["atlas"] = metrics.score_field(res.initial_field, case.field, affine, region, kp.heldout_points_vox,
                                       kp.heldout_disps_vox)["mse_mm2"]
    out["fit_residual_mm"] = res.atlas_fit["fit_residual_mm"]["mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--subjects", required=True, help="comma list of subject ids (their first case is used)")
    ap.add_argument("--configs", nargs="+", required=True, help="NAME=PATH atlas configs")
    ap.add_argument("--atlases", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--noise-mm", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-build", action="store_true", help="evaluate only the atlases already built")
    args = ap.parse_args()
    from brainshift.simulate.dataset import list_cases

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = dict(c.split("=", 1) for c in args.configs)
    subjects = args.subjects.split(",")
    cases = {s: next(c for c in list_cases(data) if c.startswith(s + "_")) for s in subjects}
    builds: dict = {}
    rows: list[dict] = []
    t0 = time.perf_counter()
    for sid in subjects:  # config by config per subject, so a stopped run compares like with like
        for name, path in configs.items():
            folder = Path(args.atlases) / name / sid
            if args.skip_build and not (folder / "atlas.json").is_file():
                continue
            builds[(name, sid)] = build(data, sid, Path(path), folder, args.workers)
            for noise in args.noise_mm:
                r = evaluate(data, cases[sid], folder, seed=args.seed, n_keypoints=args.n_keypoints, noise_mm=noise)
                best = min(r["linear"], r["tps"])
                rows.append({"config": name, "subject": sid, "case": cases[sid], "noise_mm": noise,
                             **{k: round(v, 5) for k, v in r.items()}, "ratio": round(r["atlas"] / best, 4),
                             "build_s": builds[(name, sid)]["build_s"]})
                print(json.dumps(rows[-1]), flush=True)
            with open(out / "per_case.jsonl", "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    lines = [f"`{args.data}`, subjects {args.subjects}, {args.n_keypoints} detected keypoints, seed {args.seed}; "
             f"{platform.machine()}, {os.cpu_count()} CPUs; {time.perf_counter() - t0:.0f} s.\n",
             "| config | noise mm | cases | mean ratio atlas / best classical | worst | mean atlas MSE mm² | "
             "build s (median, max) |", "|---|---|---|---|---|---|---|"]
    for name in configs:
        bs = [b["build_s"] for (n, _), b in builds.items() if n == name]
        for noise in args.noise_mm:
            sel = [r for r in rows if r["config"] == name and r["noise_mm"] == noise]
            if not sel:
                continue
            ratios = [r["ratio"] for r in sel]
            lines.append(f"| {name} | {noise:g} | {len(sel)} | {statistics.mean(ratios):.3f} | {max(ratios):.3f} | "
                         f"{statistics.mean(r['atlas'] for r in sel):.4f} | {statistics.median(bs):.0f}, "
                         f"{max(bs):.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
