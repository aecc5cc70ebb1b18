"""Benchmark: does the refinement hold up on biomechanical models it was not trained on? (issue 11)

Leave-one-model-out: each dataset under ``--families`` was simulated with one modelling choice that the
training family (``configs/simulate_family_lomo_train.yaml``) never contains (``configs/family_heldout/*.yaml``:
bilateral contact, compressible ventricles, buoyant whole-brain gravity, stiff tumours), on held-out subjects
and seeds; ``in_family`` is the training family itself on those subjects. ``--indist`` is today's test set
(``simulate-batch --seed 1000``, the configuration the shipped model was trained on). Every family folder shares
subjects and geometric draws (same batch seed), so families differ only in the modelling choice.

For every case (keypoints drawn as by ``brainshift evaluate``: detected DoG candidates, 20 driving keypoints,
held-out TRE targets, seeded per case), methods:

- ``linear``, ``tps``: the classical interpolators;
- ``net-tps``: the network's own refinement (mirror-averaged), what ``infer`` returned before the safeguards;
- ``safe-tps``: the refinement under :mod:`brainshift.model.safeguards` (cross-validated fallback, keypoint
  consistency, uncertainty), what ``infer -m tps`` returns now.

Writes to ``--out``: ``per_case.csv``; ``summary.md`` (per family: mean MSE, mean of per-case ratios to the
best classical interpolator of that case and the worst case's ratio, TRE, mean keypoint residual, % det J <= 0,
mean alpha); ``ratios.png`` (per-case MSE ratios by family); ``reliability.png`` and ``reliability.md`` (the
uncertainty map's calibration: voxels binned by predicted sigma, RMS error per bin).

    .venv/bin/python bench/generalization.py --families data/heldout --indist data/test --out bench/generalization

Deterministic for a seed (keypoint draws from the seed and case id; fold splits seeded).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

METHODS = ("linear", "tps", "net-tps", "safe-tps")
CLASSICAL = ("linear", "tps")


def evaluate_family(data_dir: Path, family: str, loaded, *, seed: int, n_keypoints: int, cases: int | None,
                    rng_voxels: np.random.Generator, calib: list) -> list[dict]:
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.model.safeguards import keypoint_residuals_mm, safe_refine
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    rows = []
    ids = list_cases(data_dir)[:cases] if cases else list_cases(data_dir)
    for case_id in ids:
        case = read_case(data_dir, case_id)
        subject = case.subject
        affine = subject.image.affine
        gt = case.field
        region = evaluation_mask(case)
        cands = read_subject_keypoints(data_dir, subject.subject_id)
        kp = draw_case_keypoints(gt, keypoint_mask(case), affine, rng=case_rng(seed, case.case_id),
                                 n_keypoints=n_keypoints, candidates_vox=cands)
        brain = subject.brain_mask.data > 0
        fields, extra = {}, {}
        for m in CLASSICAL:
            t0 = time.perf_counter()
            fields[m] = interpolate(m, kp.points_vox, kp.disps_vox, subject.image.shape, affine)
            extra[m] = {"time_s": time.perf_counter() - t0, "alpha": math.nan}
        for m in ("tps",):
            t0 = time.perf_counter()
            res = safe_refine(subject.image, kp.points_vox, kp.disps_vox, fields[m], loaded, method=m, mask=brain,
                              seed=seed)
            fields[f"safe-{m}"] = res.field_vox
            extra[f"safe-{m}"] = {"time_s": time.perf_counter() - t0 + extra[m]["time_s"], "alpha": res.alpha}
            # the network alone (mirror-averaged, = refine_field with mirror averaging): its two passes are the
            # safeguards' own, so it is not run twice
            fields[f"net-{m}"] = res.network_field_vox
            extra[f"net-{m}"] = {"time_s": res.info["times_s"]["network_s"] + extra[m]["time_s"], "alpha": 1.0}
            if m == "tps":
                err = np.linalg.norm(np.einsum("ij,j...->i...", affine[:3, :3], (res.field_vox - gt)
                                               .astype(np.float64)), axis=0)
                idx = np.flatnonzero(region)
                pick = rng_voxels.choice(idx, size=min(4000, idx.size), replace=False)
                calib.append((family, res.uncertainty_mm.ravel()[pick], err.ravel()[pick]))
        meta = case.meta if hasattr(case, "meta") else {}
        model = (meta.get("params") or {}).get("model") or {}
        for m in METHODS:
            s = metrics.score_field(fields[m], gt, affine, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            kres = keypoint_residuals_mm(fields[m], kp.points_vox, kp.disps_vox, affine)
            rows.append({"family": family, "case": case.case_id, "method": m, "mse_mm2": s["mse_mm2"],
                         "tre_mm": s["tre_mm"], "kp_residual_mm": float(kres.mean()),
                         "kp_residual_max_mm": float(kres.max()),
                         "pct_jacobian_nonpositive": s["pct_jacobian_nonpositive"],
                         "alpha": extra[m]["alpha"], "time_s": extra[m]["time_s"],
                         "contact": model.get("contact_model", "unilateral"),
                         "ventricles": model.get("ventricle_model", "fluid"),
                         "gravity": model.get("gravity_model", "drained"),
                         "tumour_stiffness": model.get("tumour_stiffness_ratio", 3.0)})
        print(f"  {family} {case.case_id}: " + ", ".join(
            f"{r['method']} {r['mse_mm2']:.3f}" for r in rows[-len(METHODS):]), flush=True)
    return rows


def summarise(rows: list[dict]) -> str:
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["| family | cases | method | mean MSE mm² | mean ratio to best classical | worst case ratio | "
             "mean TRE mm | kp residual mm (mean / max) | % det J <= 0 | mean alpha |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in fams:
        fr = [r for r in rows if r["family"] == fam]
        cases = list(dict.fromkeys(r["case"] for r in fr))
        best = {c: min(r["mse_mm2"] for r in fr if r["case"] == c and r["method"] in CLASSICAL) for c in cases}
        for m in METHODS:
            mr = [r for r in fr if r["method"] == m]
            ratios = [r["mse_mm2"] / best[r["case"]] for r in mr if best[r["case"]] > 0]

            def mean(k, mr=mr):
                return float(np.nanmean([r[k] for r in mr]))

            lines.append(f"| {fam} | {len(cases)} | {m} | {mean('mse_mm2'):.4f} | {np.mean(ratios):.3f} | "
                         f"{np.max(ratios):.3f} | {mean('tre_mm'):.3f} | {mean('kp_residual_mm'):.3f} / "
                         f"{max(r['kp_residual_max_mm'] for r in mr):.3f} | {mean('pct_jacobian_nonpositive'):.4f} | "
                         f"{mean('alpha'):.2f} |")
    return "\n".join(lines) + "\n"


def reliability(calib: list, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = np.concatenate([c[1] for c in calib])
    err = np.concatenate([c[2] for c in calib])
    edges = np.unique(np.quantile(sig, np.linspace(0, 1, 11)))
    which = np.clip(np.searchsorted(edges, sig, side="right") - 1, 0, len(edges) - 2)
    lines = ["| predicted sigma bin mm | voxels | mean predicted sigma mm | RMS error per component mm | "
             "fraction with error <= 2 sigma (3-D) |", "|---|---|---|---|---|"]
    xs, ys = [], []
    for b in range(len(edges) - 1):
        sel = which == b
        if not sel.any():
            continue
        ps = float(sig[sel].mean())
        rms = float(np.sqrt((err[sel] ** 2).mean() / 3.0))
        cover = float((err[sel] <= 2.0 * np.sqrt(3.0) * np.maximum(sig[sel], 1e-9)).mean())
        xs.append(ps)
        ys.append(rms)
        lines.append(f"| {edges[b]:.3f}-{edges[b + 1]:.3f} | {int(sel.sum())} | {ps:.3f} | {rms:.3f} | {cover:.2f} |")
    corr = float(np.corrcoef(sig, err)[0, 1]) if sig.std() > 0 else math.nan
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(xs, ys, "o-", label="safe-tps, all families")
    lim = max(max(xs), max(ys)) * 1.1
    ax.plot([0, lim], [0, lim], "k--", lw=1, label="calibrated")
    ax.set_xlabel("predicted sigma per component (mm)")
    ax.set_ylabel("RMS error per component (mm)")
    ax.set_title("Uncertainty reliability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    return (f"Pearson correlation of predicted sigma and 3-D error over voxels: {corr:.3f}. Here sigma is read as "
            "the standard deviation of each world component, so a calibrated map has RMS error per component = "
            "sigma.\n\n" + "\n".join(lines) + "\n")


def plot_ratios(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(fams) + 2, 4))
    for j, m in enumerate(("net-tps", "safe-tps")):
        for i, fam in enumerate(fams):
            fr = [r for r in rows if r["family"] == fam]
            cases = list(dict.fromkeys(r["case"] for r in fr))
            best = {c: min(r["mse_mm2"] for r in fr if r["case"] == c and r["method"] in CLASSICAL) for c in cases}
            ratios = [r["mse_mm2"] / best[r["case"]] for r in fr if r["method"] == m and best[r["case"]] > 0]
            ax.scatter(np.full(len(ratios), i + (j - 0.5) * 0.25), ratios, s=12, color=f"C{j}",
                       label=m if i == 0 else None)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(0.7, color="k", lw=1, ls="--")
    ax.set_xticks(range(len(fams)), fams, rotation=20)
    ax.set_ylabel("MSE / best classical (per case)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="data/heldout", help="folder of held-out family datasets")
    ap.add_argument("--indist", default=None, help="in-distribution test set (simulate-batch --seed 1000)")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--out", default="bench/generalization")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--cases", type=int, default=None, help="first N cases of each dataset")
    args = ap.parse_args()
    import torch

    from brainshift.model.checkpoint import load_weights

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_weights(args.weights, device="cpu")
    sets = [(p.name, p) for p in sorted(Path(args.families).iterdir()) if (p / "cases").is_dir()]
    if args.indist:
        sets.append(("in_distribution", Path(args.indist)))
    rows, calib = [], []
    rng_vox = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for name, path in sets:
        rows += evaluate_family(path, name, loaded, seed=args.seed, n_keypoints=args.n_keypoints, cases=args.cases,
                                rng_voxels=rng_vox, calib=calib)
        write_results(out, rows, calib, args, time.perf_counter() - t0)  # after every family: partial runs count
    print((out / "summary.md").read_text())
    print((out / "reliability.md").read_text())


def write_results(out: Path, rows: list[dict], calib: list, args, seconds: float) -> None:
    with open(out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = (f"Weights: `{args.weights}`; {args.n_keypoints} keypoints (detected DoG candidates), seed {args.seed}; "
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU; "
              f"{seconds:.0f} s.\n\n")
    (out / "summary.md").write_text(header + summarise(rows))
    plot_ratios(rows, out)
    (out / "reliability.md").write_text(reliability(calib, out))


if __name__ == "__main__":
    main()
