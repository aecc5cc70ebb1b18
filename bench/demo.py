"""Benchmark of ``brainshift demo``: wall time per step, and the coarse inversion behind its warped images.

Runs :func:`brainshift.demo.run_demo` (the full MNI152 case unless ``--quick``) ``--repeats`` times into a
temporary folder and prints, as a Markdown table, the median seconds of each step (the demo's own
:class:`~brainshift.progress.StepTimer` timings, stored in ``metrics.json``) and of the whole run. With
``--inverse`` it then compares, on the last run's ground truth and best-method fields, the exact inversion
(:func:`brainshift.io.fields.invert_field`) with :func:`brainshift.io.fields.coarse_inverse_field` (inversion on the
grid subsampled by 2): time, and the difference of the warped preop image inside the brain.

Usage: ``.venv/bin/python bench/demo.py [--repeats 1] [--resolution 3] [--quick] [--inverse]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import numpy as np


def _inverse_comparison(out: Path) -> list[tuple[str, float, float, float, float]]:
    from brainshift.io.fields import coarse_inverse_field, invert_field, read_field, warp_image
    from brainshift.io.images import read_image

    preop = read_image(out / "preop_t1.nii.gz")
    brain = read_image(out / "brain_mask.nii.gz", kind="label").data > 0
    best = json.loads((out / "metrics.json").read_text())["info"]["summary"].rsplit("Lowest MSE: ", 1)[1].rstrip(".")
    rows = []
    for name in ("ground_truth", best):
        field, affine = read_field(out / f"field_{name}.h5", reference=preop)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exact = invert_field(field, affine)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        coarse = coarse_inverse_field(field, affine)
        t_coarse = time.perf_counter() - t0
        a = warp_image(preop, field, affine, inverse_field=exact).data
        b = warp_image(preop, field, affine, inverse_field=coarse).data
        d = np.abs(a - b)[brain]
        rows.append((name, t_exact, t_coarse, float(d.mean()), float(np.percentile(d, 99))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--resolution", type=float, default=None, help="simulation element edge (mm)")
    parser.add_argument("--quick", action="store_true", help="the small test case instead of the full demo")
    parser.add_argument("--inverse", action="store_true", help="also compare exact and coarse field inversion")
    args = parser.parse_args()

    from brainshift.demo import DEMO_RESOLUTION_MM, run_demo

    res = args.resolution if args.resolution is not None else DEMO_RESOLUTION_MM
    steps: dict[str, list[float]] = {}
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            run_demo(out, seed=0, quick=args.quick, resolution_mm=res, verbose=False)
            totals.append(time.perf_counter() - t0)
            info = json.loads((out / "metrics.json").read_text())["info"]
            for k, v in info["step times (s)"].items():
                steps.setdefault(k, []).append(float(v))
        print(f"### brainshift demo ({'quick case' if args.quick else f'MNI152, {res:g} mm elements'}), "
              f"median of {args.repeats} run(s)\n")
        print("| step | median s |\n|---|---|")
        for k, v in steps.items():
            print(f"| {k} | {median(v):.2f} |")
        print(f"| **whole demo (wall)** | **{median(totals):.1f}** |")
        if args.inverse:
            print("\n| field | invert_field s | coarse_inverse_field s | warped image mean abs diff in brain | "
                  "p99 |\n|---|---|---|---|---|")
            for name, te, tc, mean, p99 in _inverse_comparison(out):
                print(f"| {name} | {te:.1f} | {tc:.1f} | {mean:.4f} | {p99:.4f} |")


if __name__ == "__main__":
    main()
