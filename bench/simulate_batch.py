"""Benchmark: a batch of simulated cases through a Dask LocalCluster (2 workers) versus the same cases serially.

Usage::

    .venv/bin/python bench/simulate_batch.py [--subjects 2] [--cases 4] [--workers 2] [--resolution 3]
                                             [--seed 0] [--out /tmp/bench_simulate_batch]

Serial: one Python loop in this process, making each synthetic subject (``synthesize_subject``), detecting its
keypoint candidates (as ``simulate-batch`` does by default) and simulating and writing its cases
(``draw_case_parameters``, ``simulate_case``, ``write_case``), exactly the work of a batch.
Dask: ``simulate_batch`` with a fresh ``LocalCluster`` of ``--workers`` single-threaded worker processes
(cluster start-up included). Both write complete datasets under ``--out`` (``serial/`` and ``dask/``; deleted
first). The issue's target: the Dask batch of 8 cases on 2 workers takes <= 0.6 x the serial time. Prints a
Markdown table with the machine, both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    load = os.getloadavg()[0]
    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {mem_gb:.0f} GB RAM, load average "
            f"{load:.1f} at start, Python {platform.python_version()}")


def run_serial(out: Path, n_subjects: int, n_cases: int, config, seed: int) -> float:
    from brainshift.simulate.batch import _write_subject_keypoints, case_id, case_seed, normalise_subjects
    from brainshift.simulate.case import draw_case_parameters, simulate_case
    from brainshift.simulate.dataset import write_case, write_subject
    from brainshift.simulate.subject import synthesize_subject

    t0 = time.perf_counter()
    for e in normalise_subjects(n_subjects, seed):
        subject = synthesize_subject(e["seed"], subject_id=e["subject_id"])
        write_subject(out, subject)
        _write_subject_keypoints(out, e["subject_id"])
        for j in range(n_cases):
            params = draw_case_parameters(subject, config, case_seed(seed, e["index"], j))
            result = simulate_case(subject, config, params)
            write_case(out, case_id(e["subject_id"], j), e["subject_id"], result.field_vox, subject.image.affine,
                       result.cavity_mask, result.meta)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--cases", type=int, default=4, help="cases per subject")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resolution", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_simulate_batch"))
    args = ap.parse_args()

    from brainshift.simulate.batch import simulate_batch
    from brainshift.simulate.case import SimulationConfig

    config = SimulationConfig(resolution_mm=args.resolution)
    n = args.subjects * args.cases
    info = machine()
    for sub in ("serial", "dask"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    t_serial = run_serial(args.out / "serial", args.subjects, args.cases, config, args.seed)
    print(f"serial: {t_serial:.1f} s", flush=True)
    report = simulate_batch(args.out / "dask", subjects=args.subjects, cases_per_subject=args.cases, config=config,
                            seed=args.seed, n_workers=args.workers, progress=True)
    t_dask = report.wall_s
    print(f"dask: {t_dask:.1f} s ({len(report.simulated)} simulated, {len(report.failed)} failed)", flush=True)
    print()
    print(f"Machine: {info}. {n} cases = {args.subjects} synthetic subjects x {args.cases}, linear, "
          f"{args.resolution:g} mm elements, seed {args.seed}.")
    print()
    print("| run | wall s | s / case | x serial |")
    print("|---|---|---|---|")
    print(f"| serial (one process) | {t_serial:.1f} | {t_serial / n:.1f} | 1.00 |")
    print(f"| Dask LocalCluster, {args.workers} workers x 1 thread | {t_dask:.1f} | {t_dask / n:.1f} | "
          f"{t_dask / t_serial:.2f} |")


if __name__ == "__main__":
    main()
