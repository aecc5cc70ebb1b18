"""Validation of atlas variants from one set of builds: solves, tilted-gravity members, the fit's tau rule (issue 15).

Atlases built with ``gravity_response_tilt_deg`` (``bench/atlas_design_validation.py --configs tilt=...``) hold
every solve's held-state responses, so from one build this script reduces, in memory, the atlas of the first
``n`` solves (a sampled design is nested) with or without the tilted members, and fits each variant to the
keypoints of validation cases (detected DoG candidates seeded per case, as ``brainshift evaluate`` draws them)
with the regularisation chosen by the marginal likelihood (``evidence``) or by cross-validation (``cv``).
Prints and writes (``--out``) the mean and worst per-case ratio of the atlas's MSE to the better classical
interpolator (linear, tps), over all cases and per dataset; per case rows in ``per_case.jsonl``.

    .venv/bin/python bench/atlas_fit_validation.py --atlases data/atlas_val/tilt \\
        --data data/val_family data/bilateral_val_176_178 --subjects s0176,s0177 \\
        --variants n24=24:none:cv n24e=24:none:evidence n16t30=16:30:cv --noise-mm 0 0.5 --out bench/atlas_fit

A variant is ``NAME=N_SOLVES:TILT_DEG|none:RULE[:PRIOR[:HYPER_RULE[:SIGMA2S]]]`` (PRIOR: ``atlas``, the default,
``atlas+matern``, ``scaled-atlas+matern`` or ``scaled-atlas+matern+contact``, :data:`brainshift.atlas.fit.PRIORS`;
HYPER_RULE for the kernel priors: ``average``, the default, or ``map``, :data:`brainshift.atlas.fit.HYPER_RULES`;
SIGMA2S for ``+contact``: the skull-held prior's variances weighed by the marginal likelihood, ``/``-separated,
default :data:`brainshift.atlas.fit.CONTACT_SIGMA2S`). Deterministic for a
seed. Choose on validation data; measure the
choice once on held-out data (``bench/atlas.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import numpy as np


def subset_atlas(folder: Path, n_solves: int, tilt_deg: float | None):
    """The atlas of the build in ``folder`` reduced from its first ``n_solves`` solves, with tilted members at
    ``tilt_deg`` (None: without), exactly as :func:`brainshift.simulate.atlas.build_atlas` reduces them."""
    from brainshift.atlas import load_atlas
    from brainshift.atlas.basis import reduce_members
    from brainshift.simulate.atlas import AtlasConfig, collect_members

    build = json.loads((folder / "build.json").read_text())
    config = AtlasConfig.from_dict({**build["config"], "gravity_response_tilt_deg": tilt_deg})
    members, info, _, _ = collect_members(folder, build["solves"][:n_solves], config)
    mean, comps, coords, sv, _ = reduce_members(np.stack(members), config.energy, config.max_components)
    out = copy.copy(load_atlas(folder))
    out.mean, out.components, out.coordinates, out.singular_values, out.members = mean, comps, coords, sv, info
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlases", required=True, help="folder of tilted builds, one per subject")
    ap.add_argument("--data", nargs="+", required=True, help="simulated datasets of those subjects' brains")
    ap.add_argument("--subjects", required=True, help="comma list of subject ids")
    ap.add_argument("--variants", nargs="+", required=True,
                    help="NAME=N_SOLVES:TILT_DEG|none:evidence|cv[:PRIOR[:average|map]]")
    ap.add_argument("--noise-mm", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--n-keypoints", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--field-scale", type=float, default=1.0,
                    help="multiply every ground-truth field by this before drawing keypoints and scoring (a "
                         "stiffer or less drained brain than the atlas's members: in linear elasticity the "
                         "displacement scales with the load)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from brainshift.atlas import fit as atlas_fit
    from brainshift.atlas.fit import fit_atlas
    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    variants = {}
    for v in args.variants:
        name, spec = v.split("=", 1)
        n, tilt, rule, *rest = spec.split(":")
        variants[name] = (int(n), None if tilt == "none" else float(tilt), rule, rest[0] if rest else "atlas",
                          rest[1] if len(rest) > 1 else "average",
                          tuple(float(v) for v in rest[2].split("/")) if len(rest) > 2 else None)
    default_sigma2s = atlas_fit.CONTACT_SIGMA2S
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sid in args.subjects.split(","):
        atlases = {k: subset_atlas(Path(args.atlases) / sid, n, t) for k, (n, t, *_) in variants.items()}
        for data in map(Path, args.data):
            for cid in [c for c in list_cases(data) if c.startswith(sid + "_")]:
                case = read_case(data, cid)
                if args.field_scale != 1.0:
                    case.field = (case.field * args.field_scale).astype(case.field.dtype)
                subj, affine = case.subject, case.subject.image.affine
                region = evaluation_mask(case)
                for noise in args.noise_mm:
                    kp = draw_case_keypoints(case.field, keypoint_mask(case), affine, rng=case_rng(args.seed, cid),
                                             n_keypoints=args.n_keypoints, noise_mm=noise,
                                             candidates_vox=read_subject_keypoints(data, subj.subject_id))

                    def mse(f, kp=kp, case=case, region=region, affine=affine):
                        return metrics.score_field(f, case.field, affine, region, kp.heldout_points_vox,
                                                   kp.heldout_disps_vox)["mse_mm2"]

                    r = {m: mse(interpolate(m, kp.points_vox, kp.disps_vox, subj.image.shape, affine))
                         for m in ("linear", "tps")}
                    for name, at in atlases.items():
                        atlas_fit.CONTACT_SIGMA2S = variants[name][5] or default_sigma2s
                        r[name] = mse(fit_atlas(at, kp.points_vox, kp.disps_vox, seed=args.seed,
                                                tau_rule=variants[name][2],
                                                prior=variants[name][3],
                                                hyper_rule=variants[name][4]).field_vox)
                    best = min(r["linear"], r["tps"])
                    rows.append({"data": data.name, "case": cid, "noise_mm": noise,
                                 **{k: round(v, 5) for k, v in r.items()},
                                 **{f"{k}_ratio": round(r[k] / best, 4) for k in variants},
                                 "components": {k: a.n_components for k, a in atlases.items()}})
                    print(json.dumps(rows[-1]), flush=True)
        with open(out / "per_case.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    scaled = f", ground-truth fields x {args.field_scale:g}" if args.field_scale != 1.0 else ""
    lines = [f"Atlases `{args.atlases}`, subjects {args.subjects}, {args.n_keypoints} detected keypoints, seed "
             f"{args.seed}{scaled}. Mean (worst) per-case ratio of the atlas's MSE to the better classical "
             "interpolator.\n",
             "| variant (solves, tilt, tau rule, prior, hyperparameters) | noise mm | all | "
             + " | ".join(d.name for d in map(Path, args.data)) + " |", "|---|---|---|" + "---|" * len(args.data)]
    for name, (n, tilt, rule, prior, hyper_rule, sigma2s) in variants.items():
        for noise in args.noise_mm:
            sel = [r for r in rows if r["noise_mm"] == noise]
            cells = []
            for group in [sel] + [[r for r in sel if r["data"] == Path(d).name] for d in args.data]:
                vals = [r[f"{name}_ratio"] for r in group]
                cells.append(f"{statistics.mean(vals):.3f} ({max(vals):.2f}), {len(vals)}" if vals else "-")
            sig = f", sigma^2 {'/'.join(f'{v:g}' for v in sigma2s)}" if sigma2s else ""
            tilt_s = tilt if tilt is not None else "none"
            lines.append(f"| {name} ({n}, {tilt_s}, {rule}, {prior}, {hyper_rule}{sig}) | "
                         f"{noise:g} | "
                         + " | ".join(cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
