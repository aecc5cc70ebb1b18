"""Interpolators at the keypoint counts ``brainshift register`` finds: N = 20 ... 2,000 on the 1 mm MNI152 grid.

Usage::

    .venv/bin/python bench/interpolate_scaling.py [--repeats 3] [--before-rev REV] [--no-before] [--ns 20,200,1000,2000]

Grid and keypoints: nilearn's MNI152 1 mm template grid (``load_mni152_template(resolution=1)``, the demo's
brain: 197 x 233 x 189 with nilearn >= 0.10, 8.7 M voxels; the older 182 x 218 x 182 grid has 7.2 M), keypoints
drawn (seed 0) uniformly among the brain-mask voxels with a sub-voxel jitter; displacements are a smooth sag bump
(up to 5 voxels, like ``bench/interpolate.py``) plus 0.5-voxel Gaussian noise, as matched keypoints carry.

Each row runs in a fresh process. The current code: one untimed warm-up call, during which the peak RSS growth
is measured (``VmHWM - VmRSS`` from ``/proc/self/status``, the peak reset first), then ``--repeats`` timed
calls (median reported). The code *before* (the interpolator modules at ``--before-rev``, loaded from git into
the same process layout) runs in the same script run, so the before/after ratio is measured under the same
machine load; it gets ``--before-repeats`` timed calls (default 1, its first call also gives its memory), and
rows that it refuses (memory guard) or that would take longer than ``--before-max-s`` (extrapolated from the
previous N, linear in N) are reported as such.

Accuracy: ``max |after - before|`` over the whole grid when both ran, and for ``tps3d`` the largest deviation
from term-by-term evaluation of the same spline at 20,000 random voxels plus the voxels next to 2,000 keypoints.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("linear", "tps", "tps3d")
MODULE = {"linear": "linear", "tps": "tps", "tps3d": "tps3d"}
FUNCTION = {"linear": "linear_interpolate", "tps": "tps_interpolate", "tps3d": "tps3d_interpolate"}
TARGET_S = {"linear": 5.0, "tps": 10.0, "tps3d": 10.0}
TARGET_GB = 3.0


def mni_grid():
    """``(shape, affine, brain_mask bool array)`` of nilearn's MNI152 1 mm template (shipped, no download)."""
    import numpy as np
    from nilearn.datasets import load_mni152_brain_mask

    m = load_mni152_brain_mask(resolution=1)
    return tuple(int(s) for s in m.shape), np.asarray(m.affine), np.asarray(m.get_fdata()) > 0


def draw_keypoints(n: int, mask, seed: int = 0):
    """``n`` keypoints (voxel coords) in the brain mask and their displacements (sag bump + 0.5-voxel noise)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vox = np.argwhere(mask)
    pts = vox[rng.choice(len(vox), size=n, replace=False)] + rng.uniform(-0.5, 0.5, size=(n, 3))
    shape = np.array(mask.shape)
    centre = (shape - 1) / 2
    bump = centre + np.array([0.0, 0.2, 0.25]) * shape
    amp = 5.0 * np.exp(-((pts - bump) ** 2).sum(axis=1) / (2 * 40.0**2))
    disps = np.stack([0.1 * amp, -amp, -0.3 * amp], axis=1) + rng.normal(scale=0.5, size=(n, 3))
    return pts, disps


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1e3
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _load_function(method: str, before_dir: str | None):
    if before_dir is None:
        import brainshift.interpolate as interp

        return getattr(interp, FUNCTION[method])
    path = Path(before_dir) / f"{MODULE[method]}.py"
    spec = importlib.util.spec_from_file_location(f"before_{MODULE[method]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, FUNCTION[method])


def _run_row(method: str, n: int, repeats: int, warmup: bool, before_dir: str | None, save: str | None, queue):
    import numpy as np
    import scipy.interpolate  # noqa: F401  (imports outside the timed calls, for both versions)
    import scipy.linalg  # noqa: F401
    import scipy.spatial  # noqa: F401

    from brainshift.errors import BrainshiftError

    shape, affine, mask = mni_grid()
    pts, disps = draw_keypoints(n, mask)
    fn = _load_function(method, before_dir)
    kwargs = {"affine": affine} if method == "tps3d" else {}
    result = {"method": method, "n": n, "version": "before" if before_dir else "after", "times": []}
    rss0 = _status_mb("VmRSS")
    _reset_peak_rss()
    try:
        t0 = time.perf_counter()
        field = fn(pts, disps, shape, **kwargs)
        first = time.perf_counter() - t0
    except BrainshiftError as exc:
        result["refused"] = str(exc)
        queue.put(result)
        return
    result["peak_rss_mb"] = _status_mb("VmHWM") - rss0
    if not warmup:
        result["times"].append(first)
    if save:
        np.save(save, field)
    del field
    for _ in range(repeats - (0 if warmup else 1)):
        t0 = time.perf_counter()
        field = fn(pts, disps, shape, **kwargs)
        result["times"].append(time.perf_counter() - t0)
        del field
    if method == "tps3d" and before_dir is None:
        from brainshift.interpolate import tps3d as t3

        field = fn(pts, disps, shape, **kwargs)
        spline = t3._Spline(*__import__("brainshift.interpolate.base", fromlist=["x"]).check_keypoints(pts, disps),
                            0.0, affine)
        rng = np.random.default_rng(1)
        flat = np.unique(np.concatenate([rng.integers(0, field[0].size, 20000), t3._check_voxels(spline, shape)]))
        ref = spline.exact(t3._voxel_indices(flat, shape))
        result["max_err_vs_exact_vox"] = float(np.abs(field.reshape(3, -1)[:, flat].T - ref).max())
    result["load"] = os.getloadavg()[0]
    queue.put(result)


def measure(method, n, repeats, warmup, before_dir=None, save=None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_row, args=(method, n, repeats, warmup, before_dir, save, q))
    p.start()
    out = q.get()
    p.join()
    return out


def export_before(rev: str, dest: str) -> None:
    """Write the interpolator modules of git revision ``rev`` into ``dest``."""
    for name in set(MODULE.values()):
        src = subprocess.run(["git", "show", f"{rev}:src/brainshift/interpolate/{name}.py"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        (Path(dest) / f"{name}.py").write_text(src)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import scipy

    return (f"{model}, {os.cpu_count()} cores, no GPU; Python {platform.python_version()}, numpy {numpy.__version__}, "
            f"scipy {scipy.__version__}; load average at start {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ns", default="20,200,1000,2000")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--before-rev", default="1b52468^", help="git revision of the code before (default: the "
                    "parent of the commit that introduced the kernel-split tps3d)")
    ap.add_argument("--before-repeats", type=int, default=1)
    ap.add_argument("--before-max-s", type=float, default=200.0, help="skip a before row extrapolated to take longer")
    ap.add_argument("--no-before", action="store_true")
    args = ap.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    shape = mni_grid()[0]
    print(f"# machine: {machine()}")
    print(f"# grid {shape[0]}x{shape[1]}x{shape[2]} (nilearn MNI152 1 mm); after: median of {args.repeats} after "
          f"a warm-up; before ({args.before_rev}): {args.before_repeats} run(s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before_dir = None
        if not args.no_before:
            before_dir = os.path.join(tmp, "before")
            os.makedirs(before_dir)
            export_before(args.before_rev, before_dir)
        for method in methods:
            last_before = None  # (n, seconds)
            for n in ns:
                fa = os.path.join(tmp, "after.npy")
                after = measure(method, n, args.repeats, True, None, fa)
                print(f"# after  {method} N={n}: {after.get('times')} {after.get('refused', '')}", file=sys.stderr,
                      flush=True)
                before = None
                if before_dir is not None:
                    guess = None if last_before is None else last_before[1] * n / last_before[0]
                    if guess is not None and guess > args.before_max_s:
                        before = {"skipped": f"~{guess:.0f} s extrapolated"}
                    else:
                        fb = os.path.join(tmp, "before.npy")
                        before = measure(method, n, args.before_repeats, False, before_dir, fb)
                        print(f"# before {method} N={n}: {before.get('times')} {before.get('refused', '')}",
                              file=sys.stderr, flush=True)
                        if before.get("times"):
                            last_before = (n, statistics.median(before["times"]))
                            if after.get("times"):
                                before["max_diff_vox"] = float(np.abs(np.load(fa) - np.load(fb)).max())
                        for f in (fb,):
                            if os.path.exists(f):
                                os.remove(f)
                if os.path.exists(fa):
                    os.remove(fa)
                rows.append((method, n, after, before))

    print("| method | N | after median s | after peak RSS MB | before s | before peak RSS MB | before/after | "
          "max abs(after - before) vox | max err vs exact vox | target | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, n, after, before in rows:
        med = statistics.median(after["times"]) if after.get("times") else None
        a_s = f"{med:.2f}" if med is not None else "refused"
        a_mem = f"{after.get('peak_rss_mb', float('nan')):.0f}"
        if before is None:
            b_s, b_mem, ratio, diff = "", "", "", ""
        elif "skipped" in before:
            b_s, b_mem, ratio, diff = f"not run ({before['skipped']})", "", "", ""
        elif "refused" in before:
            b_s, b_mem, ratio, diff = f"refused: {before['refused'].split(';')[0]}", "", "", ""
        else:
            bm = statistics.median(before["times"])
            b_s, b_mem = f"{bm:.2f}", f"{before.get('peak_rss_mb', float('nan')):.0f}"
            ratio = f"{bm / med:.1f}x" if med else ""
            diff = f"{before['max_diff_vox']:.1e}" if "max_diff_vox" in before else ""
        err = f"{after['max_err_vs_exact_vox']:.1e}" if "max_err_vs_exact_vox" in after else ""
        target = ""
        if n == 2000 and med is not None:
            ok = med <= TARGET_S[method] and after.get("peak_rss_mb", 0) <= TARGET_GB * 1e3
            target = f"<= {TARGET_S[method]:g} s, {TARGET_GB:g} GB: {'met' if ok else 'missed'}"
        print(f"| {method} | {n} | {a_s} | {a_mem} | {b_s} | {b_mem} | {ratio} | {diff} | {err} | {target} | "
              f"{after.get('load', float('nan')):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
