"""Benchmark: one simulated brain-shift case on the MNI152 brain (issue 4, "Performance").

Subject: nilearn's MNI152 1 mm brain mask and T1 template, a 15 mm spherical tumour in the right-hemisphere
white matter (RAS 28, -10, 25 mm) and ventricles = the darkest 8 % of the brain's T1 within 35 mm of the
ventricular centre. Prints the split of one linear-elastic case (mesh, assembly, each contact iteration,
resection, rasterisation), wall and CPU seconds, and peak memory; ``--png`` saves the displacement magnitude
on three orthogonal slices through the tumour centre. ``--markdown`` prints the table for bench/RESULTS.md.

Usage: ``.venv/bin/python bench/simulate_case.py --repeats 1 --png /tmp/sim_case.png --markdown``
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def mni_subject(tumour_ras=(28.0, -10.0, 25.0), radius_mm: float = 15.0):
    """A quick MNI152 subject with a spherical tumour (see the module docstring)."""
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template
    from nilearn.image import resample_to_img

    from brainshift.geometry import voxel_to_ras
    from brainshift.simulate.dataset import Subject
    from brainshift.volume import Volume

    mask = load_mni152_brain_mask(resolution=1)
    aff = mask.affine
    brain = np.asarray(mask.dataobj) > 0
    t1 = np.asarray(resample_to_img(load_mni152_template(resolution=1), mask).dataobj, dtype=np.float32)
    idx = np.argwhere(np.ones(brain.shape, bool))
    ras = voxel_to_ras(idx.astype(np.float64), aff).reshape(brain.shape + (3,))
    tum = (np.linalg.norm(ras - np.asarray(tumour_ras), axis=-1) <= radius_mm) & brain
    ven = brain & ~tum & (t1 < np.percentile(t1[brain], 8)) & (np.linalg.norm(ras - [0.0, -10.0, 15.0], axis=-1) < 35)

    def lab(m):
        return Volume(m.astype(np.uint8), aff, "label")

    return Subject("mni152_sphere", Volume(t1, aff), lab(brain), lab(tum), lab(ven))


def save_png(subject, result, params, path: str) -> None:
    """Displacement magnitude (mm) on axial / coronal / sagittal slices through the tumour centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainshift.field import displacement_magnitude_mm
    from brainshift.geometry import ras_to_voxel

    mag = displacement_magnitude_mm(result.field_vox, subject.image.affine)
    c = np.round(ras_to_voxel(params.tumour_centre_ras[None], subject.image.affine)[0]).astype(int)
    e = ras_to_voxel(params.entry_point_ras[None], subject.image.affine)[0]
    vmax = float(np.percentile(mag[mag > 0], 99.9))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    views = [(f"sagittal (i = {c[0]})", np.s_[c[0], :, :], (1, 2)),
             (f"coronal (j = {c[1]})", np.s_[:, c[1], :], (0, 2)),
             (f"axial (k = {c[2]})", np.s_[:, :, c[2]], (0, 1))]
    for ax, (title, sl, (a, b)) in zip(axes, views, strict=True):
        ax.imshow(subject.image.data[sl].T, cmap="gray", origin="lower")
        im = ax.imshow(np.ma.masked_equal(mag[sl], 0).T, cmap="inferno", origin="lower", alpha=0.85, vmin=0,
                       vmax=vmax)
        ax.contour(result.cavity_mask.data[sl].T, levels=[0.5], colors="cyan", linewidths=1)
        ax.plot(e[a], e[b], "c^", ms=8)
        ax.set_title(title)
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="displacement magnitude (mm)")
    fig.suptitle(f"brainshift simulate: max {result.meta['max_displacement_mm']:.1f} mm, median "
                 f"{result.meta['median_displacement_mm']:.2f} mm (cyan: cavity, triangle: entry point)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--resolution", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--material", default="linear")
    args = ap.parse_args()

    from brainshift.simulate.case import SimulationConfig, draw_case_parameters, simulate_case

    subject = mni_subject()
    cfg = SimulationConfig(resolution_mm=args.resolution, material=args.material)
    params = draw_case_parameters(subject, cfg, args.seed)
    rows = []
    result = None
    for rep in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = simulate_case(subject, cfg, params, progress=True)
        rows.append((time.perf_counter() - w0, time.process_time() - c0, result.meta))
        print(f"repeat {rep}: wall {rows[-1][0]:.1f} s, cpu {rows[-1][1]:.1f} s")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    walls = [r[0] for r in rows]
    cpus = [r[1] for r in rows]
    meta = rows[int(np.argsort(walls)[len(walls) // 2])][2]
    t = meta["times_s"]
    lines = ["| step | wall s (median run) |", "|---|---|"]
    lines.append(f"| mesh + loads + normals ({meta['n_elements_preop']} elements, {meta['n_nodes_preop']} nodes) | "
                 f"{t['mesh_s']:.1f} |")
    if "coarse_start_s" in t:
        lines.append(f"| coarse start: {meta['coarse_start']} | {t['coarse_start_s']:.1f} |")
    if "assembly_s" in t:  # the neo-Hookean solve assembles its tangent inside Newton
        lines.append(f"| assembly + frame rotation | {t['assembly_s']:.1f} |")
    for stage in meta["solves"]:
        if "cg_iterations" not in stage or not isinstance(stage["cg_iterations"], list):
            lines.append(f"| {stage['stage']}: Newton iterations {stage['newton_iterations']} | "
                         f"{stage['seconds']:.1f} |")
            continue
        its = ", ".join(f"{i} ({s:.1f} s)" for i, s in zip(stage["cg_iterations"], stage["solve_times_s"],
                                                             strict=True))
        lines.append(f"| {stage['stage']}: {stage['contact_iterations']} contact solves, {stage['amg_setups']} AMG "
                     f"setups; CG its (s): {its} | {stage['seconds']:.1f} |")
    if "resection_setup_s" in t:
        lines.append(f"| resection bookkeeping (interface forces, K_T) | {t['resection_setup_s']:.1f} |")
    lines.append(f"| rasterise to 1 mm | {t['rasterise_s']:.1f} |")
    lines.append(f"| **total** (median of {len(walls)}; all runs {', '.join(f'{w:.1f}' for w in walls)}) | "
                 f"**{np.median(walls):.1f}** (CPU {np.median(cpus):.1f} s) |")
    lines.append(f"| peak memory (RSS) | {peak_gb:.2f} GB |")
    lines.append(f"| max / median displacement | {meta['max_displacement_mm']:.2f} / "
                 f"{meta['median_displacement_mm']:.2f} mm |")
    import os

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    if args.png and result is not None:
        save_png(subject, result, params, args.png)
        print(f"saved {args.png}")


if __name__ == "__main__":
    main()
