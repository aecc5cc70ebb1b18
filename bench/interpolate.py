"""Benchmark the classical interpolators on the published grid (160 x 192 x 144).

Usage::

    .venv/bin/python bench/interpolate.py [--repeats 5] [--rows linear,tps,...] [--markdown]

Each row runs in a fresh Python process (so its peak memory is its own): keypoints are drawn (seeded)
uniformly inside an ellipsoid with semi-axes 0.35 x the grid size centred in the grid, their displacements
come from a smooth analytic sag field (up to 5 voxels); one untimed warm-up call (traced with
``tracemalloc`` for the NumPy allocation peak), then ``--repeats`` timed calls. Each timed call is followed
by one call of a fixed *baseline* workload in the same process, a one-shot
``scipy.interpolate.LinearNDInterpolator`` over the whole grid (the 20 keypoints + 8 corners, float64), so
that timings on a busy shared machine can be read as ratios ("x baseline"). The table gives the median and
minimum wall time, the baseline median, the peak RSS growth of the warm-up call over the process's RSS
after imports (``VmHWM`` - ``VmRSS`` from ``/proc/self/status``, the peak reset through
``/proc/self/clear_refs`` first, read before any baseline call), the NumPy peak, and the 1-minute load
average at the end of the row.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

SHAPE = (160, 192, 144)

#: name -> (method or "baseline", N keypoints, options, target seconds or None)
ROWS: dict[str, tuple[str, int, dict, float | None]] = {
    "linear": ("linear", 20, {}, 1.0),
    "linear-nearest": ("linear", 20, {"outside": "nearest"}, None),
    "tps": ("tps", 20, {}, 0.3),
    "tps3d": ("tps3d", 20, {}, None),
    "tps3d-100": ("tps3d", 100, {}, None),
    "tps3d-1000": ("tps3d", 1000, {}, None),
}


def draw_keypoints(n: int, seed: int = 0):
    """``n`` keypoints (voxel coords) inside a centred ellipsoid and their sag-field displacements (voxels)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centre = (np.array(SHAPE) - 1) / 2
    semi = 0.35 * np.array(SHAPE)
    pts = []
    while len(pts) < n:
        q = rng.uniform(-1, 1, size=3)
        if (q**2).sum() <= 1:
            pts.append(centre + q * semi)
    pts = np.array(pts)
    # smooth sag: a Gaussian bump of 5 voxels along -j (posterior, "gravity") centred high in the brain
    bump = centre + np.array([0.0, 0.2, 0.25]) * np.array(SHAPE)
    amp = 5.0 * np.exp(-((pts - bump) ** 2).sum(axis=1) / (2 * 40.0**2))
    disps = np.stack([0.1 * amp, -amp, -0.3 * amp], axis=1)
    return pts, disps


def _status_mb(key: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak of this process image) from ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1e3  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak also covers the imports, an overestimate


def _run_row(name: str, repeats: int, queue) -> None:
    import tracemalloc

    import numpy as np

    from brainshift.interpolate import interpolate
    from brainshift.interpolate.linear import volume_corners

    method, n, options, _ = ROWS[name]
    pts, disps = draw_keypoints(n)

    from scipy.interpolate import LinearNDInterpolator

    def baseline():
        p = np.concatenate([pts, volume_corners(SHAPE)])
        d = np.concatenate([disps, np.zeros((8, 3))])
        g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij"), -1)
        return LinearNDInterpolator(p, d)(g.reshape(-1, 3)).T.reshape(3, *SHAPE).astype(np.float32)

    def call():
        return interpolate(method, pts, disps, SHAPE, **options)

    rss0 = _status_mb("VmRSS")
    _reset_peak_rss()
    tracemalloc.start()
    field = call()  # warm-up (untimed), traced for the NumPy peak
    traced = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    peak_rss = _status_mb("VmHWM") - rss0  # before any baseline call, so the baseline's memory is not counted
    del field
    times, base_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        field = call()
        times.append(time.perf_counter() - t0)
        del field
        t0 = time.perf_counter()
        baseline()
        base_times.append(time.perf_counter() - t0)
    queue.put({"row": name, "times": times, "base_times": base_times, "rss_mb": peak_rss, "traced_mb": traced,
               "load": os.getloadavg()[0]})


def measure(name: str, repeats: int) -> dict:
    """Run one row in a fresh process; returns its timings and memory."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_row, args=(name, repeats, q))
    p.start()
    out = q.get()
    p.join()
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import numpy
    import scipy
    import torch

    return (
        f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, no GPU used; Python {platform.python_version()}, "
        f"numpy {numpy.__version__}, scipy {scipy.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average at start {os.getloadavg()[0]:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row (median reported)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    ap.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")

    print(f"# machine: {machine()}")
    print(f"# grid {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, median of {args.repeats} runs, each row in a fresh process")
    results = []
    for r in rows:
        res = measure(r, args.repeats)
        results.append(res)
        print(f"# done {r}: median {statistics.median(res['times']):.3f} s", file=sys.stderr, flush=True)
    header = ("| row | method | options | N | median s | min s | baseline median s | x baseline | target s "
              "| peak RSS MB | numpy peak MB | load avg |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for res in results:
        method, n, options, target = ROWS[res["row"]]
        med, base = statistics.median(res["times"]), statistics.median(res["base_times"])
        tgt = "" if target is None else f"{target:.1f} ({'met' if med <= target else 'missed'})"
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        print(
            f"| {res['row']} | {method} | {opts} | {n} | {med:.3f} | {min(res['times']):.3f} | {base:.3f} | "
            f"{med / base:.2f} | {tgt} | {res['rss_mb']:.0f} | {res['traced_mb']:.0f} | {res['load']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "repeats": args.repeats, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
