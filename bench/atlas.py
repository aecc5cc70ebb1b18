"""Benchmark: the per-patient deformation atlas (``-m atlas``) on modelling families it never saw (issue 15).

Data: the leave-one-model-out families of ``bench/generalization.py`` (``configs/family_heldout/*.yaml``,
``simulate-batch --subjects 10 --cases-per-subject 1 --seed 2000 --no-intraop``): every family folder holds
the same 10 synthetic subjects and geometric draws, simulated with one modelling choice the atlas does not
contain (bilateral contact, compressible ventricles, buoyant whole-brain gravity, stiff tumours > 3x) or, for
``in_family``, with the training family itself. One atlas per subject is built (``--atlases``, resumable) with
``--atlas-config`` (``configs/atlas_lomo.yaml``: only the training family's choices), from the subject's preop
image, brain, tumour and ventricle masks; the craniotomy centre is found by the simulator's own rule (the
brain-surface point nearest the tumour, above it), as a user would mark it.

Per case (keypoints as ``brainshift evaluate`` draws them: detected DoG candidates, seeded per case, held-out
TRE targets), methods: ``linear``, ``tps`` (classical); ``atlas`` (:func:`brainshift.compensate.compensate`
with ``method="atlas"``); ``safe-tps`` (the shipped network under the safeguards, ``infer -m tps``'s default);
``safe-atlas`` (the network refining the atlas field under the safeguards, ``net-atlas``).

Outputs in ``--out``: ``builds.md`` (build time, members, components, retained energy, size per atlas),
``per_case.csv`` and ``summary.md`` (per family: mean MSE, mean and worst per-case ratio to the best classical
interpolator, TRE, keypoint residual, det J); ``sweep.csv``, ``sweep.md`` and ``sweep.png`` (5/10/20/40
keypoints x 0/0.5/1 mm noise on the first ``--sweep-cases`` cases of every family: mean ratio to the best
classical per method); ``timing.md`` (``infer -m atlas`` against ``infer -m tps``, both ``--no-refine``,
median of 3 runs on one case, same run).

    .venv/bin/python bench/atlas.py --families data/heldout --atlases data/atlases --out bench/atlas

Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSICAL = ("linear", "tps")
METHODS = ("linear", "tps", "atlas", "safe-tps", "safe-atlas")
SWEEP_METHODS = ("linear", "tps", "atlas", "safe-tps")


def build_atlases(families: Path, atlases: Path, config_path: Path, workers: int | None,
                  n_subjects: int | None = None) -> list[dict]:
    from brainshift.simulate.atlas import build_atlas, read_atlas_config
    from brainshift.simulate.dataset import read_subject

    cfg = read_atlas_config(config_path)
    first = next(p for p in sorted(families.iterdir()) if (p / "subjects").is_dir())
    rows = []
    sdirs = [d for d in sorted((first / "subjects").iterdir()) if (d / "subject.json").is_file()]
    for sdir in sdirs[:n_subjects] if n_subjects else sdirs:
        sid = sdir.name
        folder = atlases / sid
        reused = (folder / "atlas.json").is_file()
        subject = read_subject(first, sid)
        rep = build_atlas(folder, subject, cfg, n_workers=workers, progress=False)
        rows.append({**build_row(folder), "reused": reused})
        print(f"atlas {sid}: {rep.summary()}", flush=True)
    return rows


def build_row(folder: Path) -> dict:
    """One row of ``builds.md`` from a finished atlas folder (its own record of the build)."""
    info = json.loads((folder / "atlas.json").read_text())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    return {"subject": folder.name, "solves": info["n_solves"], "members": info["n_members"],
            "components": info["n_components"], "retained_energy": info["retained_energy"],
            "build_s": info.get("build_wall_s", math.nan), "solve_s": info.get("solve_seconds_total", math.nan),
            "reused": True, "size_mb": size, "basis_mb": (folder / "basis.npz").stat().st_size / 1e6}


def _fields(case, kp, atlas, loaded, seed: int, methods) -> tuple[dict, dict]:
    from brainshift.compensate import compensate
    from brainshift.interpolate import interpolate

    subject = case.subject
    image, affine = subject.image, subject.image.affine
    brain = subject.brain_mask.data > 0
    fields, extra = {}, {}
    for m in CLASSICAL:
        t0 = time.perf_counter()
        fields[m] = interpolate(m, kp.points_vox, kp.disps_vox, image.shape, affine)
        extra[m] = {"time_s": time.perf_counter() - t0, "alpha": math.nan}
    if "atlas" in methods or "safe-atlas" in methods:
        t0 = time.perf_counter()
        res = compensate(image, keypoints=(kp.points_vox, kp.disps_vox), method="atlas", atlas=atlas,
                         safeguard_seed=seed)
        fields["atlas"] = res.initial_field
        extra["atlas"] = {"time_s": time.perf_counter() - t0, "alpha": math.nan,
                          "tau": res.atlas_fit["tau_mm2"], "fit_residual_mm": res.atlas_fit["fit_residual_mm"]["mean"]}
    if "safe-tps" in methods:
        t0 = time.perf_counter()
        res = compensate(image, keypoints=(kp.points_vox, kp.disps_vox), initial_field=fields["tps"], model=loaded,
                         mask=brain, safeguard_seed=seed)
        fields["safe-tps"] = res.refined_field
        extra["safe-tps"] = {"time_s": time.perf_counter() - t0 + extra["tps"]["time_s"],
                             "alpha": res.safeguards["alpha"]}
    if "safe-atlas" in methods:
        t0 = time.perf_counter()
        res = compensate(image, keypoints=(kp.points_vox, kp.disps_vox), method="atlas", atlas=atlas, model=loaded,
                         mask=brain, safeguard_seed=seed)
        fields["safe-atlas"] = res.refined_field
        extra["safe-atlas"] = {"time_s": time.perf_counter() - t0, "alpha": res.safeguards["alpha"]}
    return fields, extra


def evaluate_family(data_dir: Path, family: str, atlases: Path, loaded, *, seed: int, n_keypoints: int,
                    noise_mm: float, cases: int | None, methods=METHODS) -> list[dict]:
    from brainshift.atlas import load_atlas
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.model.safeguards import keypoint_residuals_mm
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    rows = []
    ids = list_cases(data_dir)[:cases] if cases else list_cases(data_dir)
    for case_id in ids:
        case = read_case(data_dir, case_id)
        subject = case.subject
        affine = subject.image.affine
        atlas = load_atlas(atlases / subject.subject_id)
        cands = read_subject_keypoints(data_dir, subject.subject_id)
        kp = draw_case_keypoints(case.field, keypoint_mask(case), affine, rng=case_rng(seed, case.case_id),
                                 n_keypoints=n_keypoints, noise_mm=noise_mm, candidates_vox=cands)
        fields, extra = _fields(case, kp, atlas, loaded, seed, methods)
        region = evaluation_mask(case)
        model = (case.meta.get("params") or {}).get("model") or {}
        for m in methods:
            s = metrics.score_field(fields[m], case.field, affine, region, kp.heldout_points_vox,
                                    kp.heldout_disps_vox)
            kres = keypoint_residuals_mm(fields[m], kp.points_vox, kp.disps_vox, affine)
            rows.append({"family": family, "case": case.case_id, "method": m, "n_keypoints": n_keypoints,
                         "noise_mm": noise_mm, "mse_mm2": s["mse_mm2"], "tre_mm": s["tre_mm"],
                         "kp_residual_mm": float(kres.mean()), "kp_residual_max_mm": float(kres.max()),
                         "pct_jacobian_nonpositive": s["pct_jacobian_nonpositive"],
                         "alpha": extra[m]["alpha"], "time_s": extra[m]["time_s"],
                         "tau": extra[m].get("tau", math.nan),
                         "atlas_fit_residual_mm": extra[m].get("fit_residual_mm", math.nan),
                         "contact": model.get("contact_model"), "drainage": model.get("drainage_fraction"),
                         "median_displacement_mm": case.meta.get("median_displacement_mm")})
        print(f"  {family} {case.case_id} n={n_keypoints} noise={noise_mm}: " + ", ".join(
            f"{r['method']} {r['mse_mm2']:.3f}" for r in rows[-len(methods):]), flush=True)
    return rows


def _ratios(rows: list[dict], key=("family", "case", "n_keypoints", "noise_mm")) -> dict:
    """``{(id...): best classical MSE}``."""
    best: dict = {}
    for r in rows:
        if r["method"] in CLASSICAL:
            k = tuple(r[c] for c in key)
            best[k] = min(best.get(k, math.inf), r["mse_mm2"])
    return best


def summarise(rows: list[dict], methods=METHODS) -> str:
    best = _ratios(rows)
    fams = list(dict.fromkeys(r["family"] for r in rows))
    lines = ["| family | cases | method | mean MSE mm² | mean ratio to best classical | worst case ratio | "
             "mean TRE mm | kp residual mm (mean / max) | % det J <= 0 | mean alpha |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in fams:
        for m in methods:
            mr = [r for r in rows if r["family"] == fam and r["method"] == m]
            if not mr:
                continue
            ratios = [r["mse_mm2"] / best[(r["family"], r["case"], r["n_keypoints"], r["noise_mm"])] for r in mr]

            def mean(k, mr=mr):
                return float(np.nanmean([r[k] for r in mr])) if any(not math.isnan(r[k]) for r in mr) else math.nan

            lines.append(f"| {fam} | {len(mr)} | {m} | {mean('mse_mm2'):.4f} | {np.mean(ratios):.3f} | "
                         f"{np.max(ratios):.3f} | {mean('tre_mm'):.3f} | {mean('kp_residual_mm'):.3f} / "
                         f"{max(r['kp_residual_max_mm'] for r in mr):.3f} | {mean('pct_jacobian_nonpositive'):.4f} | "
                         f"{mean('alpha'):.2f} |")
    return "\n".join(lines) + "\n"


def sweep_table(rows: list[dict]) -> str:
    best = _ratios(rows)
    settings = sorted({(r["n_keypoints"], r["noise_mm"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| keypoints | noise mm | cases | " + " | ".join(f"{m} ratio (MSE mm²)" for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for n, noise in settings:
        cells = []
        for m in methods:
            mr = [r for r in rows if r["method"] == m and r["n_keypoints"] == n and r["noise_mm"] == noise]
            ratio = np.mean([r["mse_mm2"] / best[(r["family"], r["case"], n, noise)] for r in mr])
            cells.append(f"{ratio:.3f} ({np.mean([r['mse_mm2'] for r in mr]):.3f})")
        ncases = len({(r["family"], r["case"]) for r in rows if r["n_keypoints"] == n and r["noise_mm"] == noise})
        lines.append(f"| {n} | {noise:g} | {ncases} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _ratios(rows)
    noises = sorted({r["noise_mm"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(noises), figsize=(4.2 * len(noises), 3.8), sharey=True)
    for ax, noise in zip(np.atleast_1d(axes), noises, strict=True):
        for j, m in enumerate(methods):
            ns = sorted({r["n_keypoints"] for r in rows if r["noise_mm"] == noise})
            vals = [np.mean([r["mse_mm2"] for r in rows if r["method"] == m and r["n_keypoints"] == n
                             and r["noise_mm"] == noise]) for n in ns]
            ax.plot(ns, vals, "o-", color=f"C{j}", label=m)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([5, 10, 20, 40], ["5", "10", "20", "40"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("keypoints")
        ax.set_title(f"keypoint noise {noise:g} mm")
    np.atleast_1d(axes)[0].set_ylabel("mean MSE in the brain (mm²)")
    np.atleast_1d(axes)[0].legend()
    del best
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)


def plot_ratios(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _ratios(rows)
    fams = list(dict.fromkeys(r["family"] for r in rows))
    shown = [m for m in ("atlas", "safe-tps", "safe-atlas") if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(1.8 * len(fams) + 2, 4))
    for j, m in enumerate(shown):
        for i, fam in enumerate(fams):
            ratios = [r["mse_mm2"] / best[(r["family"], r["case"], r["n_keypoints"], r["noise_mm"])]
                      for r in rows if r["family"] == fam and r["method"] == m]
            ax.scatter(np.full(len(ratios), i + (j - (len(shown) - 1) / 2) * 0.22), ratios, s=12, color=f"C{j}",
                       label=m if i == 0 else None)
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(0.6, color="k", lw=1, ls="--")
    ax.set_xticks(range(len(fams)), fams, rotation=20)
    ax.set_ylabel("MSE / best classical (per case)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)


def timing(case_dir: Path, subject_dir: Path, atlas: Path, out: Path, repeats: int = 3) -> str:
    """``infer -m atlas`` vs ``infer -m tps`` (``--no-refine``, npz) on one case, medians of ``repeats`` runs."""
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, keypoint_mask
    from brainshift.simulate.dataset import read_case

    case = read_case(case_dir.parent.parent, case_dir.name)
    kp = draw_case_keypoints(case.field, keypoint_mask(case), case.subject.image.affine, rng=case_rng(0, "t"),
                             n_keypoints=20)
    table = out / "timing_keypoints.csv"
    table.write_text("x,y,z,dx,dy,dz\n" + "\n".join(",".join(f"{v:.5f}" for v in row)
                                                  for row in np.c_[kp.points_vox, kp.disps_vox]) + "\n")
    preop = subject_dir / "t1.nii.gz"
    exe = [sys.executable, "-m", "brainshift", "infer", "-p", str(preop), "-k", str(table), "--no-refine", "-f",
           "npz", "-q"]
    times: dict[str, list[float]] = {"tps": [], "atlas": []}
    for i in range(repeats):
        for m in ("tps", "atlas"):
            extra = ["-m", m] + (["--atlas", str(atlas)] if m == "atlas" else [])
            o = out / f"timing_run_{m}_{i}"
            t0 = time.perf_counter()
            subprocess.run(exe + extra + ["-o", str(o)], check=True, capture_output=True)
            times[m].append(time.perf_counter() - t0)
            for f in o.iterdir():
                f.unlink()
            o.rmdir()
    table.unlink()
    med = {m: statistics.median(v) for m, v in times.items()}
    grid = "x".join(map(str, case.subject.image.shape))
    return (f"`infer --no-refine -f npz`, 20 keypoints, case {case_dir.name} ({grid} voxels), {repeats} runs each, "
            "interleaved, wall time of the whole command:\n\n"
            f"| method | median s | runs s |\n|---|---|---|\n"
            + "\n".join(f"| {m} | {med[m]:.2f} | {', '.join(f'{t:.2f}' for t in times[m])} |" for m in times)
            + f"\n\nRatio atlas / tps: **{med['atlas'] / med['tps']:.2f}** (target <= 1.5).\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="data/heldout")
    ap.add_argument("--atlases", default="data/atlases")
    ap.add_argument("--atlas-config", default="configs/atlas_lomo.yaml")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--out", default="bench/atlas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--cases", type=int, default=None,
                    help="first N cases of each family (and atlases of the first N subjects)")
    ap.add_argument("--sweep-cases", type=int, default=2, help="first N cases of each family for the sweep")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list among build,main,sweep,timing")
    ap.add_argument("--atlas-prior", default=None,
                    help="the atlas fit's prior (brainshift.atlas.fit.PRIORS); default: the library's DEFAULT_PRIOR")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"methods of the main table and the sweep, among {','.join(METHODS)} (the classical "
                         "ones always run)")
    args = ap.parse_args()
    import torch

    from brainshift.model.checkpoint import load_weights

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.atlas_prior is not None:
        import brainshift.atlas.fit as atlas_fit

        if args.atlas_prior not in atlas_fit.PRIORS:
            ap.error(f"--atlas-prior: expected one of {list(atlas_fit.PRIORS)}, got {args.atlas_prior!r}")
        atlas_fit.DEFAULT_PRIOR = args.atlas_prior
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families, atlases = Path(args.families), Path(args.atlases)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU"
    if "build" not in skip:
        builds = build_atlases(families, atlases, Path(args.atlas_config), args.workers, args.cases)
    else:  # the atlases as built earlier (each atlas.json records its own build)
        folders = sorted(d for d in atlases.iterdir() if (d / "atlas.json").is_file()) if atlases.is_dir() else []
        builds = [build_row(d) for d in (folders[:args.cases] if args.cases else folders)]
    lines = [f"Atlases built with `{args.atlas_config}` on {machine} (build time and the sum of the solves' own "
             "times from each atlas.json; 'reused' = built by an earlier run, whose wall time a re-reduction "
             "replaces).\n",
             "| subject | solves | members | components | retained energy | build s | solves s (sum) | reused | "
             "folder MB | basis MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b['subject']} | {b['solves']} | {b['members']} | {b['components']} | {b['retained_energy']:.4f} "
              f"| {b['build_s']:.0f} | {b['solve_s']:.0f} | {b['reused']} | {b['size_mb']:.1f} | {b['basis_mb']:.1f} |"
              for b in builds]
    (out / "builds.md").write_text("\n".join(lines) + "\n")
    loaded = load_weights(args.weights, device="cpu")
    sets = [(p.name, p) for p in sorted(families.iterdir()) if (p / "cases").is_dir()]
    t0 = time.perf_counter()
    methods = tuple(dict.fromkeys(CLASSICAL + tuple(m for m in args.methods.split(",") if m)))
    if not set(methods) <= set(METHODS):
        ap.error(f"--methods: expected among {','.join(METHODS)}, got {args.methods}")
    if "main" not in skip:
        rows: list[dict] = []
        for name, path in sets:
            rows += evaluate_family(path, name, atlases, loaded, seed=args.seed, n_keypoints=args.n_keypoints,
                                    noise_mm=0.0, cases=args.cases, methods=methods)
            write_csv(out / "per_case.csv", rows)
            (out / "summary.md").write_text(
                f"Atlas config `{args.atlas_config}`; weights `{args.weights}` (safe-tps, safe-atlas); "
                f"{args.n_keypoints} keypoints (detected DoG candidates), no noise, seed {args.seed}; {machine}; "
                f"{time.perf_counter() - t0:.0f} s.\n\n" + summarise(rows))
            plot_ratios(rows, out)
        print((out / "summary.md").read_text(), flush=True)
    if "sweep" not in skip:
        srows: list[dict] = []
        for n in (5, 10, 20, 40):
            for noise in (0.0, 0.5, 1.0):
                for name, path in sets:
                    srows += evaluate_family(path, name, atlases, loaded, seed=args.seed, n_keypoints=n,
                                             noise_mm=noise, cases=args.sweep_cases,
                                             methods=tuple(m for m in SWEEP_METHODS if m in methods))
                write_csv(out / "sweep.csv", srows)
                (out / "sweep.md").write_text(
                    f"First {args.sweep_cases} case(s) of each family ({len(sets)} families); mean over cases of the "
                    "ratio to the best classical interpolator of that case and setting (mean MSE in brackets); "
                    "noise: N(0, sigma^2) per world component added to the driving displacements.\n\n"
                    + sweep_table(srows))
                plot_sweep(srows, out)
        print((out / "sweep.md").read_text(), flush=True)
    if "timing" not in skip:
        name, path = sets[0]
        from brainshift.simulate.dataset import list_cases

        cid = list_cases(path)[0]
        sid = json.loads((path / "cases" / cid / "meta.json").read_text()).get("subject", cid.split("_")[0])
        (out / "timing.md").write_text(timing(path / "cases" / cid, path / "subjects" / sid, atlases / sid, out))
        print((out / "timing.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
