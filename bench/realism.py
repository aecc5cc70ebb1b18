"""Realism check of the simulator over random built-in cases (issue 4, "Verification: realism").

Usage::

    .venv/bin/python bench/realism.py [--cases 20] [--workers 2] [--resolution 3] [--seed 0]
                                      [--out /tmp/bench_realism] [--markdown]

Simulates ``--cases`` synthetic MNI152 subjects with one case each through ``simulate_batch`` (resumable: an
interrupted run continues), then measures every case on its 1 mm grid, over the brain minus the resection
cavity:

- the maximum displacement (target 3-20 mm per case, median of the maxima 4-12 mm);
- where it is: distance (mm) from the voxel of maximum displacement to the craniotomy entry point and to the
  cavity, against the median distance of all brain voxels to them (largest near the craniotomy and cavity:
  the first distances well below the second);
- the minimum Jacobian determinant of ``p -> p + u(p)`` (target > 0 everywhere in the brain).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np


def analyse(root: Path, case_id: str) -> dict:
    import scipy.ndimage as ndi

    from brainshift.field import displacement_magnitude_mm, jacobian_determinant
    from brainshift.io.frames import voxel_to_ras
    from brainshift.simulate.dataset import read_case

    case = read_case(root, case_id)
    subj = case.subject
    aff = subj.image.affine
    brain = (subj.brain_mask.data > 0) | (subj.tumour_mask.data > 0)
    cavity = case.cavity_mask.data > 0
    tissue = brain & ~cavity
    mag = displacement_magnitude_mm(case.field, aff)
    det = jacobian_determinant(case.field)
    # Jacobian over tissue voxels whose central-difference stencil stays in tissue (the field is cut to zero
    # outside the brain and filled in the cavity, so the one-voxel rim mixes in non-physical values)
    interior = ndi.binary_erosion(tissue)
    peak = np.unravel_index(int(np.argmax(np.where(tissue, mag, -1))), mag.shape)
    pts = voxel_to_ras(np.argwhere(tissue).astype(np.float64), aff)
    entry = np.asarray(case.meta["params"]["entry_point_ras"])
    peak_ras = voxel_to_ras(np.array([peak], dtype=np.float64), aff)[0]
    row = {
        "case": case_id,
        "max_mm": float(mag[tissue].max()),
        "median_mm": float(np.median(mag[tissue])),
        "peak_to_entry_mm": float(np.linalg.norm(peak_ras - entry)),
        "brain_to_entry_median_mm": float(np.median(np.linalg.norm(pts - entry, axis=1))),
        "min_det_j_interior": float(det[interior].min()),
        "min_det_j_tissue": float(det[tissue].min()),
        "tumour_radius_mm": float(subj.info.get("tumour_radius_mm", float("nan"))),
        "solve_s": float(case.meta.get("times_s", {}).get("total_s", float("nan"))),
    }
    if cavity.any():
        d_cav = ndi.distance_transform_edt(~cavity, sampling=subj.image.spacing)
        row["peak_to_cavity_mm"] = float(d_cav[peak])
        row["brain_to_cavity_median_mm"] = float(np.median(d_cav[tissue]))
    else:
        row["peak_to_cavity_mm"] = row["brain_to_cavity_median_mm"] = float("nan")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_realism"))
    args = ap.parse_args()

    from brainshift.simulate.batch import simulate_batch
    from brainshift.simulate.case import SimulationConfig
    from brainshift.simulate.dataset import list_cases

    load = os.getloadavg()[0]
    report = simulate_batch(args.out, subjects=args.cases, cases_per_subject=1,
                            config=SimulationConfig(resolution_mm=args.resolution), seed=args.seed,
                            n_workers=args.workers)
    print(report.summary(), flush=True)
    rows = [analyse(args.out, cid) for cid in list_cases(args.out)]
    cols = ["case", "max_mm", "median_mm", "peak_to_entry_mm", "brain_to_entry_median_mm", "peak_to_cavity_mm",
            "brain_to_cavity_median_mm", "min_det_j_interior", "min_det_j_tissue", "tumour_radius_mm", "solve_s"]
    print()
    print(f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, load average {load:.1f} at start; "
          f"{len(rows)} cases (seed {args.seed}, linear, {args.resolution:g} mm elements), batch wall "
          f"{report.wall_s:.0f} s.")
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.2f}" for c in cols) + " |")
    maxima = np.array([r["max_mm"] for r in rows])
    if len(rows):
        in_range = int(((maxima >= 3) & (maxima <= 20)).sum())
        near_entry = np.mean([r["peak_to_entry_mm"] < r["brain_to_entry_median_mm"] for r in rows])
        near_cav = np.mean([r["peak_to_cavity_mm"] < r["brain_to_cavity_median_mm"] for r in rows])
        print()
        print(f"Maxima: {in_range}/{len(rows)} in 3-20 mm (min {maxima.min():.2f}, max {maxima.max():.2f}); median "
              f"of maxima {np.median(maxima):.2f} mm (target 4-12). Peak closer to the entry point than the median "
              f"brain voxel in {near_entry:.0%} of cases, closer to the cavity in {near_cav:.0%}. Min det J "
              f"(interior tissue) {min(r['min_det_j_interior'] for r in rows):.3f}, (all tissue voxels) "
              f"{min(r['min_det_j_tissue'] for r in rows):.3f}.")


if __name__ == "__main__":
    main()
