"""Realism check of the simulator over random built-in cases (issue 4, "Verification: realism").

Usage::

    .venv/bin/python bench/realism.py [--cases 20] [--workers 2] [--resolution 3] [--seed 0]
                                      [--out /tmp/bench_realism]
    .venv/bin/python bench/realism.py --data data/train [--cases 20] [--match '*_c00']   # existing dataset only

Without ``--data``: simulates ``--cases`` synthetic MNI152 subjects with one case each through
``simulate_batch`` (resumable: an interrupted run continues). With ``--data DIR``: simulates nothing and
only reads the first ``--cases`` complete cases (sorted ids, optionally only those matching the glob
``--match``) of the dataset ``DIR`` (read-only). Every case
is measured on its 1 mm grid, over the tissue = brain (with tumour) minus the resection cavity:

- the maximum displacement (target 3-20 mm per case, median of the maxima 4-12 mm);
- where it is: distance (mm) from the voxel of maximum displacement to the craniotomy entry point and to the
  cavity, against the median distance of all brain voxels to them (largest near the craniotomy and cavity:
  the first distances well below the second);
- the minimum Jacobian determinant of ``p -> p + u(p)`` over every tissue voxel, with the mask-aware
  differences of :func:`brainshift.field.jacobian_determinant` (``mask=tissue``: one-sided at the brain
  surface and the cavity wall, where the field is cut; target > 0 everywhere in the brain), and the number
  of tissue voxels with det J <= 0; where the minimum lies (distance to the brain surface, the cavity, the
  ventricles, the entry point, and height above the lowest brain voxel, where the brainstem is fixed);
- for comparison, central differences (no mask): the minimum over the eroded tissue (stencil inside the
  tissue) and over all tissue voxels (the one-voxel rim mixes in the zero field outside the brain).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import platform
from pathlib import Path

import numpy as np


def analyse(root: Path, case_id: str) -> dict:
    import scipy.ndimage as ndi

    from brainshift.field import displacement_magnitude_mm, jacobian_determinant
    from brainshift.geometry import voxel_to_ras
    from brainshift.simulate.dataset import read_case

    case = read_case(root, case_id)
    subj = case.subject
    aff = subj.image.affine
    spacing = subj.image.spacing
    brain = (subj.brain_mask.data > 0) | (subj.tumour_mask.data > 0)
    cavity = case.cavity_mask.data > 0
    tissue = brain & ~cavity
    mag = displacement_magnitude_mm(case.field, aff)
    det_mask = jacobian_determinant(case.field, mask=tissue)
    det_central = jacobian_determinant(case.field)
    # central differences over tissue voxels whose stencil stays in tissue (the field is cut to zero outside
    # the brain and filled in the cavity, so the one-voxel rim mixes in non-physical values)
    interior = ndi.binary_erosion(tissue)
    peak = np.unravel_index(int(np.argmax(np.where(tissue, mag, -1))), mag.shape)
    pts = voxel_to_ras(np.argwhere(tissue).astype(np.float64), aff)
    entry = np.asarray(case.meta["params"]["entry_point_ras"])
    peak_ras = voxel_to_ras(np.array([peak], dtype=np.float64), aff)[0]
    worst = np.unravel_index(int(np.argmin(np.where(tissue, det_mask, np.inf))), det_mask.shape)
    worst_ras = voxel_to_ras(np.array([worst], dtype=np.float64), aff)[0]
    d_surface = ndi.distance_transform_edt(brain, sampling=spacing)  # mm to the nearest voxel outside the brain
    vent = subj.ventricles_mask.data > 0
    d_vent = ndi.distance_transform_edt(~vent, sampling=spacing)[worst] if vent.any() else float("nan")
    row = {
        "case": case_id,
        "max_mm": float(mag[tissue].max()),
        "median_mm": float(np.median(mag[tissue])),
        "peak_to_entry_mm": float(np.linalg.norm(peak_ras - entry)),
        "brain_to_entry_median_mm": float(np.median(np.linalg.norm(pts - entry, axis=1))),
        "min_det_j_tissue_masked": float(det_mask[tissue].min()),
        "n_det_j_nonpos_masked": int((det_mask[tissue] <= 0).sum()),
        "min_det_j_interior_central": float(det_central[interior].min()),
        "min_det_j_tissue_central": float(det_central[tissue].min()),
        "worst_to_surface_mm": float(d_surface[worst]),
        "worst_to_ventricles_mm": float(d_vent),
        "worst_to_entry_mm": float(np.linalg.norm(worst_ras - entry)),
        "worst_above_lowest_mm": float(worst_ras[2] - pts[:, 2].min()),
        "tumour_radius_mm": float(subj.info.get("tumour_radius_mm", float("nan"))),
        "solve_s": float(case.meta.get("times_s", {}).get("total_s", float("nan"))),
    }
    if cavity.any():
        d_cav = ndi.distance_transform_edt(~cavity, sampling=spacing)
        row["peak_to_cavity_mm"] = float(d_cav[peak])
        row["brain_to_cavity_median_mm"] = float(np.median(d_cav[tissue]))
        row["worst_to_cavity_mm"] = float(d_cav[worst])
    else:
        row["peak_to_cavity_mm"] = row["brain_to_cavity_median_mm"] = row["worst_to_cavity_mm"] = float("nan")
    return row


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_realism"))
    ap.add_argument("--data", type=Path, default=None,
                    help="analyse the first --cases complete cases of this existing dataset (read-only), "
                         "simulate nothing")
    ap.add_argument("--match", default="*", help="with --data: only case ids matching this glob (e.g. '*_c00')")
    args = ap.parse_args()

    from brainshift.simulate.dataset import list_cases

    load = os.getloadavg()[0]
    if args.data is not None:
        root = args.data
        case_ids = [c for c in list_cases(root) if fnmatch.fnmatch(c, args.match)][: args.cases]
        if not case_ids:
            raise SystemExit(f"expected complete cases (with meta.json) under {root / 'cases'}, found none")
        source = (f"first {len(case_ids)} complete cases (sorted ids matching {args.match!r}) of the dataset {root}, "
                  "no simulation")
    else:
        from brainshift.simulate.batch import simulate_batch
        from brainshift.simulate.case import SimulationConfig

        report = simulate_batch(args.out, subjects=args.cases, cases_per_subject=1,
                                config=SimulationConfig(resolution_mm=args.resolution), seed=args.seed,
                                n_workers=args.workers)
        print(report.summary(), flush=True)
        root = args.out
        case_ids = list_cases(root)
        source = (f"{len(case_ids)} cases (seed {args.seed}, linear, {args.resolution:g} mm elements), batch wall "
                  f"{report.wall_s:.0f} s")
    rows = [analyse(root, cid) for cid in case_ids]
    cols = ["case", "max_mm", "median_mm", "peak_to_entry_mm", "brain_to_entry_median_mm", "peak_to_cavity_mm",
            "brain_to_cavity_median_mm", "min_det_j_tissue_masked", "n_det_j_nonpos_masked",
            "min_det_j_interior_central", "min_det_j_tissue_central", "tumour_radius_mm", "solve_s"]
    where = ["case", "min_det_j_tissue_masked", "worst_to_surface_mm", "worst_to_cavity_mm",
             "worst_to_ventricles_mm", "worst_to_entry_mm", "worst_above_lowest_mm"]
    print()
    print(f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average {load:.1f} at start; "
          f"{source}.")
    for table in (cols, where):
        print()
        print("| " + " | ".join(table) + " |")
        print("|" + "---|" * len(table))
        for r in rows:
            print("| " + " | ".join(_fmt(r[c]) for c in table) + " |")
    maxima = np.array([r["max_mm"] for r in rows])
    if len(rows):
        in_range = int(((maxima >= 3) & (maxima <= 20)).sum())
        near_entry = np.mean([r["peak_to_entry_mm"] < r["brain_to_entry_median_mm"] for r in rows])
        near_cav = np.mean([r["peak_to_cavity_mm"] < r["brain_to_cavity_median_mm"] for r in rows])
        folded = [r["case"] for r in rows if r["n_det_j_nonpos_masked"] > 0]
        print()
        print(f"Maxima: {in_range}/{len(rows)} in 3-20 mm (min {maxima.min():.2f}, max {maxima.max():.2f}); median "
              f"of maxima {np.median(maxima):.2f} mm (target 4-12). Peak closer to the entry point than the median "
              f"brain voxel in {near_entry:.0%} of cases, closer to the cavity in {near_cav:.0%}.")
        print(f"det J > 0 in every tissue voxel (mask-aware differences): {len(rows) - len(folded)}/{len(rows)} "
              f"cases (min {min(r['min_det_j_tissue_masked'] for r in rows):.3f}"
              + (f"; det J <= 0 in {', '.join(folded)}" if folded else "") + "). Central differences: min "
              f"{min(r['min_det_j_interior_central'] for r in rows):.3f} over interior tissue, "
              f"{min(r['min_det_j_tissue_central'] for r in rows):.3f} over all tissue voxels (rim artefact).")


if __name__ == "__main__":
    main()
