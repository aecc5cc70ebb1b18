"""Benchmark: does the refinement hold up on biomechanical models it was not trained on? (issue 11)

Leave-one-model-out: each dataset under ``--families`` was simulated with one modelling choice that the
training family (``configs/simulate_family_lomo_train.yaml``) never contains (``configs/family_heldout/*.yaml``:
bilateral contact, compressible ventricles, buoyant whole-brain gravity, stiff tumours), on held-out subjects
and seeds; ``in_family`` is the training family itself on those subjects. ``--indist`` is today's test set
(``simulate-batch --seed 1000``, the configuration the shipped model was trained on). Every family folder shares
subjects and geometric draws (same batch seed), so families differ only in the modelling choice.

For every case (keypoints drawn as by ``brainshift evaluate``: 20 driving keypoints among the candidates of
``--keypoint-rule`` (``detected``: the subject's DoG keypoints; ``random``, ``cortex``, ``craniotomy``: the
training's rules, :func:`brainshift.train.data.keypoint_candidates`), held-out TRE targets the other candidates,
optional ``--noise-mm``, seeded per case; identical for every method and model), methods:

- ``linear``, ``tps``: the classical interpolators;
- ``net-tps [model]``: the network's own refinement (mirror-averaged), what ``infer --no-safeguards`` returns
  (with the model's scale normalisation floor, e.g. 2.5 mm for the default model; session 16);
- ``safe-tps [model]``: the refinement under :mod:`brainshift.model.safeguards` (cross-validated fallback,
  keypoint consistency, uncertainty), what ``infer -m tps`` returns (``--min-field-rms``: the floor under the
  safeguards, default 0 as in ``infer``; ``bench/generalization_scaled/`` was made with 2.5 in both paths, before
  the floor became the network-alone-only default);
- ``safe-auto [model]``: what ``infer`` returns by default (``-m auto``:
  :func:`brainshift.compensate.choose_interpolator` takes ``linear`` for clustered keypoints, else ``tps``, and
  the safeguards refine that field, with no learnt correction of a linear field from clustered keypoints since
  session 31, :func:`brainshift.compensate.learnt_correction_allowed`; the same as ``safe-tps`` where it takes
  ``tps``);
- ``safe-linear [model]``: only for the cases where ``auto`` took ``linear`` (so its family means may cover fewer
  cases than the other rows'), that field refined with the learnt correction allowed (``safe-auto`` before
  session 31);

for each model of ``--weights NAME=PATH ...``. Writes to ``--out``: ``per_case.csv``; ``summary.md`` (per family
and method: mean MSE, mean of per-case ratios to the best classical interpolator of that case and the worst
case's ratio, TRE, keypoint residual, % det J <= 0, mean alpha); ``ratios.png`` (per-case MSE ratios by family);
``reliability.png`` and ``reliability.md`` (the uncertainty map's calibration per model: voxels binned by
predicted sigma, RMS error per bin; held-out families and the in-distribution set apart).

    .venv/bin/python bench/generalization.py --families data/heldout --indist data/test --out bench/generalization \
        --weights default=weights/default.safetensors family_lomo=weights/family_lomo.safetensors

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

CLASSICAL = ("linear", "tps")


def rule_candidates(case, rule: str, seed: int) -> np.ndarray | None:
    """Keypoint candidates (subject voxels) of a keypoint ``rule`` other than ``detected`` (None for it): the
    training's rules (:func:`brainshift.train.data.keypoint_candidates`), drawn with a generator of their own."""
    if rule == "detected":
        return None
    from scipy.ndimage import distance_transform_edt

    from brainshift.evaluate.run import keypoint_mask
    from brainshift.geometry import spacing_from_affine
    from brainshift.train.data import craniotomy_entry_vox, keypoint_candidates, variant_rng

    affine = case.subject.image.affine
    brain = case.subject.brain_mask.data > 0
    info = {"allowed": keypoint_mask(case), "has_candidates": False, "affine": affine,
            "entry_vox": craniotomy_entry_vox(case.meta, affine),
            "surface_depth_mm": (distance_transform_edt(brain, sampling=spacing_from_affine(affine))
                                 if rule == "cortex" else None)}
    return keypoint_candidates(info, rule, variant_rng(seed, case.case_id, 7), n_random=400)


def evaluate_family(data_dir: Path, family: str, models: dict, *, seed: int, n_keypoints: int, cases: int | None,
                    rng_voxels: np.random.Generator, calib: list, rule: str = "detected",
                    noise_mm: float = 0.0, safe_floor_mm: float = 0.0, local_alphas=(), no_network_alone=False,
                    initials=()) -> list[dict]:
    from brainshift.compensate import choose_interpolator, learnt_correction_allowed
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.model.inference import refine_field
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
        cands = rule_candidates(case, rule, seed)
        if cands is None:
            cands = read_subject_keypoints(data_dir, subject.subject_id)
        kp = draw_case_keypoints(gt, keypoint_mask(case), affine, rng=case_rng(seed, case.case_id),
                                 n_keypoints=n_keypoints, candidates_vox=cands, noise_mm=noise_mm)
        brain = subject.brain_mask.data > 0
        auto_method, hull = choose_interpolator(subject.image, kp.points_vox)  # infer's default -m auto
        fields, extra = {}, {}
        for m in CLASSICAL:
            t0 = time.perf_counter()
            fields[m] = interpolate(m, kp.points_vox, kp.disps_vox, subject.image.shape, affine)
            extra[m] = {"time_s": time.perf_counter() - t0, "alpha": math.nan}
        for m in initials:  # other initial fields (not in the best-classical baseline), also refined below
            t0 = time.perf_counter()
            fields[m] = interpolate(m, kp.points_vox, kp.disps_vox, subject.image.shape, affine)
            extra[m] = {"time_s": time.perf_counter() - t0, "alpha": math.nan}
        idx = np.flatnonzero(region)
        pick = rng_voxels.choice(idx, size=min(4000, idx.size), replace=False)  # the same voxels for every model
        for name, loaded in models.items():
            t0 = time.perf_counter()
            res = safe_refine(subject.image, kp.points_vox, kp.disps_vox, fields["tps"], loaded, method="tps",
                              mask=brain, seed=seed, min_field_rms_mm=safe_floor_mm)
            fields[f"safe-tps:{name}"] = res.field_vox
            extra[f"safe-tps:{name}"] = {"time_s": time.perf_counter() - t0 + extra["tps"]["time_s"],
                                        "alpha": res.alpha, "consistency": res.info.get("consistency", "")}
            for m in initials:
                t0 = time.perf_counter()
                res_i = safe_refine(subject.image, kp.points_vox, kp.disps_vox, fields[m], loaded, method=m,
                                    mask=brain, seed=seed, min_field_rms_mm=safe_floor_mm)
                fields[f"safe-{m}:{name}"] = res_i.field_vox
                extra[f"safe-{m}:{name}"] = {"time_s": time.perf_counter() - t0 + extra[m]["time_s"],
                                            "alpha": res_i.alpha, "consistency": res_i.info.get("consistency", "")}
            for h_mm, k_prior in local_alphas:  # a spatially varying alpha (safe_refine's local_alpha)
                t0 = time.perf_counter()
                res_l = safe_refine(subject.image, kp.points_vox, kp.disps_vox, fields["tps"], loaded, method="tps",
                                    mask=brain, seed=seed, min_field_rms_mm=safe_floor_mm,
                                    local_alpha=(h_mm, k_prior))
                key = f"safe-tps-la{h_mm:g}/{k_prior:g}:{name}"
                fields[key] = res_l.field_vox
                extra[key] = {"time_s": time.perf_counter() - t0 + extra["tps"]["time_s"],
                              "alpha": res_l.info.get("local_alpha", {}).get("mean", res_l.alpha),
                              "consistency": res_l.info.get("consistency", "")}
            if not no_network_alone:
                # the network alone, as `infer --no-safeguards` runs it (the model's scale normalisation floor) but
                # always mirror-averaged, as the safeguards' own passes are
                t0 = time.perf_counter()
                fields[f"net-tps:{name}"] = refine_field(subject.image, fields["tps"], loaded, mask=brain,
                                                         mirror_average=True, points_vox=kp.points_vox)
                extra[f"net-tps:{name}"] = {"time_s": time.perf_counter() - t0 + extra["tps"]["time_s"],
                                            "alpha": 1.0}
            if auto_method != "tps":  # -m auto took linear (clustered keypoints): refine that instead
                runs = [(f"safe-auto:{name}", learnt_correction_allowed(auto_method, hull, len(kp.points_vox)))]
                if auto_method not in initials:  # the correction allowed (safe-auto before session 31)
                    runs.append((f"safe-{auto_method}:{name}", True))
                for key, learnt in runs:
                    t0 = time.perf_counter()
                    res_a = safe_refine(subject.image, kp.points_vox, kp.disps_vox, fields[auto_method], loaded,
                                        method=auto_method, mask=brain, seed=seed, min_field_rms_mm=safe_floor_mm,
                                        learnt_correction=learnt)
                    fields[key] = res_a.field_vox
                    extra[key] = {"time_s": time.perf_counter() - t0 + extra[auto_method]["time_s"],
                                  "alpha": res_a.alpha, "consistency": res_a.info.get("consistency", "")}
            else:
                fields[f"safe-auto:{name}"] = res.field_vox
                extra[f"safe-auto:{name}"] = extra[f"safe-tps:{name}"]
            err = np.linalg.norm(np.einsum("ij,j...->i...", affine[:3, :3], (res.field_vox - gt)
                                           .astype(np.float64)), axis=0)
            calib.append((family, name, res.uncertainty_mm.ravel()[pick], err.ravel()[pick]))
        meta = case.meta if hasattr(case, "meta") else {}
        model = (meta.get("params") or {}).get("model") or {}
        for m in fields:
            s = metrics.score_field(fields[m], gt, affine, region, kp.heldout_points_vox, kp.heldout_disps_vox)
            kres = keypoint_residuals_mm(fields[m], kp.points_vox, kp.disps_vox, affine)
            rows.append({"family": family, "case": case.case_id, "method": m.split(":")[0],
                         "model": m.split(":")[1] if ":" in m else "", "keypoint_rule": rule,
                         "noise_mm": noise_mm, "mse_mm2": s["mse_mm2"],
                         "tre_mm": s["tre_mm"], "kp_residual_mm": float(kres.mean()),
                         "kp_residual_max_mm": float(kres.max()),
                         "pct_jacobian_nonpositive": s["pct_jacobian_nonpositive"],
                         "alpha": extra[m]["alpha"], "time_s": extra[m]["time_s"],
                         "auto_interpolator": auto_method, "keypoint_hull_fraction": hull,
                         "consistency": extra[m].get("consistency", ""),
                         "contact": model.get("contact_model", "unilateral"),
                         "ventricles": model.get("ventricle_model", "fluid"),
                         "gravity": model.get("gravity_model", "drained"),
                         "tumour_stiffness": model.get("tumour_stiffness_ratio", 3.0)})
        print(f"  {family} {case.case_id}: " + ", ".join(
            f"{r['method']}{':' + r['model'] if r['model'] else ''} {r['mse_mm2']:.3f}"
            for r in rows[-len(fields):]), flush=True)
    return rows


def row_methods(rows: list[dict]) -> list[tuple[str, str]]:
    """(method, model) pairs in the order they first appear."""
    return list(dict.fromkeys((r["method"], r["model"]) for r in rows))


def label(method: str, model: str) -> str:
    return f"{method} [{model}]" if model else method


def best_classical(fr: list[dict]) -> dict[str, float]:
    cases = list(dict.fromkeys(r["case"] for r in fr))
    return {c: min(r["mse_mm2"] for r in fr if r["case"] == c and r["method"] in CLASSICAL) for c in cases}


def summarise(rows: list[dict]) -> str:
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["| family | cases | method [model] | mean MSE mm² | mean ratio to best classical | worst case ratio | "
             "mean TRE mm | kp residual mm (mean / max) | % det J <= 0 | mean alpha |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in fams:
        fr = [r for r in rows if r["family"] == fam]
        best = best_classical(fr)
        for m, model in row_methods(fr):
            mr = [r for r in fr if r["method"] == m and r["model"] == model]
            ratios = [r["mse_mm2"] / best[r["case"]] for r in mr if best[r["case"]] > 0]

            def mean(k, mr=mr):
                return float(np.nanmean([r[k] for r in mr]))

            lines.append(f"| {fam} | {len(best)} | {label(m, model)} | {mean('mse_mm2'):.4f} | {np.mean(ratios):.3f} | "
                         f"{np.max(ratios):.3f} | {mean('tre_mm'):.3f} | {mean('kp_residual_mm'):.3f} / "
                         f"{max(r['kp_residual_max_mm'] for r in mr):.3f} | {mean('pct_jacobian_nonpositive'):.4f} | "
                         f"{mean('alpha'):.2f} |")
    return "\n".join(lines) + "\n"


def calibration_table(sig: np.ndarray, err: np.ndarray) -> tuple[list[str], list[float], list[float], float]:
    """Voxels binned by predicted sigma (deciles): table rows, mean sigma and RMS error per bin, Pearson r."""
    edges = np.unique(np.quantile(sig, np.linspace(0, 1, 11)))
    which = np.clip(np.searchsorted(edges, sig, side="right") - 1, 0, len(edges) - 2)
    lines, xs, ys = [], [], []
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
    return lines, xs, ys, corr


def reliability(calib: list, out: Path) -> str:
    """Calibration of safe-tps's uncertainty map per model (held-out families pooled; the in-distribution set
    apart), as a table and ``reliability.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = ["Here sigma is read as the standard deviation of each world component, so a calibrated map has RMS "
            "error per component = sigma.\n"]
    fig, ax = plt.subplots(figsize=(5, 5))
    lim = 0.0
    groups = list(dict.fromkeys((c[1], c[0] == "in_distribution") for c in calib))
    for i, (model, indist) in enumerate(groups):
        sel = [c for c in calib if c[1] == model and (c[0] == "in_distribution") == indist]
        sig = np.concatenate([c[2] for c in sel])
        err = np.concatenate([c[3] for c in sel])
        lines, xs, ys, corr = calibration_table(sig, err)
        what = "in distribution" if indist else "held-out families"
        text += [f"### safe-tps [{model}], {what}\n", f"Pearson correlation of predicted sigma and 3-D error over "
                 f"{sig.size} voxels: {corr:.3f}.\n", "| predicted sigma bin mm | voxels | mean predicted sigma mm | "
                 "RMS error per component mm | fraction with error <= 2 sigma (3-D) |", "|---|---|---|---|---|",
                 *lines, ""]
        ax.plot(xs, ys, "o-" if not indist else "s--", color=f"C{i}", label=f"{model}, {what}")
        lim = max(lim, max(xs), max(ys))
    ax.plot([0, lim * 1.1], [0, lim * 1.1], "k--", lw=1, label="calibrated")
    ax.set_xlabel("predicted sigma per component (mm)")
    ax.set_ylabel("RMS error per component (mm)")
    ax.set_title("Uncertainty reliability (safe-tps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    return "\n".join(text) + "\n"


def plot_ratios(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    learnt = [mm for mm in row_methods(rows) if mm[0] not in CLASSICAL]
    fig, ax = plt.subplots(figsize=(1.8 * len(fams) + 2, 4))
    width = 0.7 / max(1, len(learnt))
    for j, (m, model) in enumerate(learnt):
        for i, fam in enumerate(fams):
            fr = [r for r in rows if r["family"] == fam]
            best = best_classical(fr)
            ratios = [r["mse_mm2"] / best[r["case"]] for r in fr
                      if r["method"] == m and r["model"] == model and best[r["case"]] > 0]
            ax.scatter(np.full(len(ratios), i + (j - (len(learnt) - 1) / 2) * width), ratios, s=10,
                       color=f"C{j}", label=label(m, model) if i == 0 else None)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(0.7, color="k", lw=1, ls="--")
    ax.set_xticks(range(len(fams)), fams, rotation=20)
    ax.set_ylabel("MSE / best classical (per case)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="data/heldout", help="folder of held-out family datasets")
    ap.add_argument("--indist", default=None, help="in-distribution test set (simulate-batch --seed 1000)")
    ap.add_argument("--weights", nargs="+", default=["default=weights/default.safetensors"],
                    help="NAME=PATH of each model (or one PATH); every model sees the same keypoints")
    ap.add_argument("--out", default="bench/generalization")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--keypoint-rule", default="detected", choices=("detected", "random", "cortex", "craniotomy"),
                    help="where the driving keypoints come from (the training's rules; brainshift.train.data)")
    ap.add_argument("--noise-mm", type=float, default=0.0, help="Gaussian noise per world component of the "
                    "driving displacements")
    ap.add_argument("--cases", type=int, default=None, help="first N cases of each dataset")
    ap.add_argument("--min-field-rms", type=float, default=0.0,
                    help="scale normalisation floor (mm) under the safeguards (default 0: off, as infer runs them; "
                         "the net-tps rows always use each model's own floor, as infer --no-safeguards does)")
    ap.add_argument("--local-alpha", nargs="*", default=[], metavar="H,K",
                    help="also run safe-tps with a spatially varying alpha (safe_refine local_alpha: bandwidth H mm, "
                         "prior weight K keypoints), one row per setting")
    ap.add_argument("--no-network-alone", action="store_true", help="skip the net-tps rows")
    ap.add_argument("--initial", nargs="*", default=[], metavar="METHOD",
                    help="other initial interpolators (e.g. gp) to report and to refine under the safeguards "
                         "(rows METHOD and safe-METHOD); the baseline stays the better of linear and tps")
    args = ap.parse_args()
    import torch

    from brainshift.model.checkpoint import load_weights

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = [w.split("=", 1) if "=" in w else (Path(w).stem, w) for w in args.weights]
    models = {name: load_weights(path, device="cpu") for name, path in named}
    sets = [(p.name, p) for p in sorted(Path(args.families).iterdir()) if (p / "cases").is_dir()]
    if args.indist:
        sets.append(("in_distribution", Path(args.indist)))
    rows, calib = [], []
    rng_vox = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for name, path in sets:
        rows += evaluate_family(path, name, models, seed=args.seed, n_keypoints=args.n_keypoints, cases=args.cases,
                                rng_voxels=rng_vox, calib=calib, rule=args.keypoint_rule, noise_mm=args.noise_mm,
                                safe_floor_mm=args.min_field_rms,
                                local_alphas=[tuple(float(v) for v in la.split(",")) for la in args.local_alpha],
                                no_network_alone=args.no_network_alone, initials=tuple(args.initial))
        write_results(out, rows, calib, args, time.perf_counter() - t0)  # after every family: partial runs count
    print((out / "summary.md").read_text())
    print((out / "reliability.md").read_text())


def write_results(out: Path, rows: list[dict], calib: list, args, seconds: float) -> None:
    with open(out / "per_case.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = (f"Weights: {', '.join(f'`{w}`' for w in args.weights)}; {args.n_keypoints} keypoints (rule "
              f"`{args.keypoint_rule}`, noise {args.noise_mm} mm), seed {args.seed}; scale normalisation floor "
              f"under the safeguards {args.min_field_rms:g} mm (net-tps: each model's own); "
              f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU; "
              f"{seconds:.0f} s.\n\n")
    (out / "summary.md").write_text(header + summarise(rows))
    plot_ratios(rows, out)
    (out / "reliability.md").write_text(reliability(calib, out))


if __name__ == "__main__":
    main()
