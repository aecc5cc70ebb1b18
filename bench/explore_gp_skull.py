"""Exploratory (session 30): a Gaussian-process interpolator (Matern 5/2 kernel, hyperparameters averaged by the
marginal likelihood) with and without the skull-held prior (no normal motion at the brain surface outside the
craniotomy), against linear and tps, on validation cases. Uses the atlas fit's machinery with an empty atlas.

usage: python bench/explore_gp_skull.py DATA_DIR [DATA_DIR ...] [--cases N] [--craniotomy meta|none]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def surface_points(brain: np.ndarray, spacing: np.ndarray, affine: np.ndarray, entry_ras, radius_mm,
                   spacing_mm=12.0, margin_mm=6.0, smooth_mm=4.0):
    from scipy import ndimage

    inner = ndimage.binary_erosion(brain)
    surf = brain & ~inner
    idx = np.argwhere(surf)
    ras = idx @ affine[:3, :3].T + affine[:3, 3]
    keep = np.ones(len(idx), bool)
    if entry_ras is not None:
        keep &= np.linalg.norm(ras - np.asarray(entry_ras), axis=1) >= radius_mm + margin_mm
    idx = idx[keep]
    pos = idx * spacing
    cell = np.floor(pos / spacing_mm).astype(np.int64)
    _, first = np.unique(cell, axis=0, return_index=True)
    first = np.sort(first)
    idx, pos = idx[first], pos[first]
    sm = ndimage.gaussian_filter(brain.astype(np.float64), smooth_mm / spacing)
    grad = np.stack([np.gradient(sm, axis=a) / spacing[a] for a in range(3)])
    g = grad[:, idx[:, 0], idx[:, 1], idx[:, 2]].T
    n = np.linalg.norm(g, axis=1)
    ok = n > 1e-9
    return pos[ok], -g[ok] / n[ok, None]


def gp_field(points_vox, disps_vox, spacing, shape, region, skull=None):
    from brainshift.atlas import fit as F

    p = points_vox * spacing
    r = (disps_vox * spacing).ravel()
    m = len(p)
    bw = np.zeros((3 * m, 1))
    sk = None
    if skull is not None:
        sk = F._Skull(points_mm=skull[0], normals=skull[1], bn=np.zeros((len(skull[0]), 1)))
    post, info = F._averaged_kernel_posterior(bw, np.ones(1), r, p, skull=sk)
    idx = np.argwhere(region)
    vals = post.kernel_at(idx * spacing)
    out = np.zeros((3,) + tuple(shape), np.float32)
    for a in range(3):
        out[a][tuple(idx.T)] = vals[:, a] / spacing[a]
    return out, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="+")
    ap.add_argument("--cases", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skull", action="store_true")
    args = ap.parse_args()
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    rows = []
    for d in args.data:
        d = Path(d)
        ids = list_cases(d)[: args.cases] if args.cases else list_cases(d)
        for cid in ids:
            case = read_case(d, cid)
            subject = case.subject
            affine = subject.image.affine
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            gt = case.field
            region = evaluation_mask(case)
            cands = read_subject_keypoints(d, subject.subject_id)
            kp = draw_case_keypoints(gt, keypoint_mask(case), affine, rng=case_rng(args.seed, case.case_id),
                                     n_keypoints=20, candidates_vox=cands, noise_mm=0.0)
            brain = subject.brain_mask.data > 0
            meta = case.meta
            params = meta.get("params", {})
            entry = params.get("entry_point_ras")
            radius = params.get("model", {}).get("craniotomy_radius_mm", 30.0)
            fields, infos = {}, {}
            for mth in ("linear", "tps"):
                fields[mth] = interpolate(mth, kp.points_vox, kp.disps_vox, subject.image.shape, affine)
            t0 = time.perf_counter()
            fields["gp"], infos["gp"] = gp_field(kp.points_vox, kp.disps_vox, spacing, subject.image.shape, brain)
            t1 = time.perf_counter()
            skull = args.skull
            if skull:
                sk = surface_points(brain, spacing, affine, entry, radius)
                fields["gp-skull"], infos["gp-skull"] = gp_field(kp.points_vox, kp.disps_vox, spacing,
                                                                 subject.image.shape, brain, skull=sk)
            t2 = time.perf_counter()
            res = {}
            for mth, f in fields.items():
                s = metrics.score_field(f, gt, affine, region, kp.heldout_points_vox, kp.heldout_disps_vox)
                res[mth] = s["mse_mm2"]
            best = min(res["linear"], res["tps"])
            row = {"data": d.name, "case": cid, "contact": params.get("model", {}).get("contact_model", "unilateral"),
                   **{k: v for k, v in res.items()}, "best": best,
                   "t_gp": t1 - t0, "t_skull": t2 - t1,
                   "median_mm": meta.get("median_displacement_mm")}
            rows.append(row)
            print(f"{d.name} {cid} {row['contact']}: " + " ".join(f"{k} {v / best:.3f}" for k, v in res.items())
                  + f"  best {best:.4f} t {row['t_gp']:.1f}s", flush=True)
    meths = [m for m in ("linear", "tps", "gp", "gp-skull") if m in rows[0]]
    for grp in sorted({r["contact"] for r in rows}) + ["all"]:
        sel = [r for r in rows if grp == "all" or r["contact"] == grp]
        print(grp, len(sel), " ".join(f"{m} {np.mean([r[m] / r['best'] for r in sel]):.3f}"
                                      f"({max(r[m] / r['best'] for r in sel):.2f})" for m in meths))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
