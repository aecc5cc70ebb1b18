"""Benchmark the refinement network: forward pass, whole ``refine_field`` and a training step, per preset.

Usage::

    .venv/bin/python bench/network.py [--rows all|forward-published,refine-fast,...] [--repeats 3] [--threads 2]

Each row runs in a fresh Python process (``subprocess``), so its peak memory (``resource.getrusage``
``ru_maxrss``, the whole process including the ~0.4 GB of imported libraries) is its own. Random weights
(speed does not depend on them). Rows:

- ``forward-<preset>``: one forward pass under ``torch.inference_mode`` on a ``(1, 4) + size`` input at the
  size the network sees for a 160 x 192 x 144 1 mm image (published: 160 x 192 x 144; 2 mm presets:
  80 x 96 x 72). The published row has no warm-up (each call ~40 s); the others one untimed warm-up call.
- ``refine-<preset>``: the whole :func:`brainshift.model.inference.refine_field` on a synthetic 160 x 192 x 144
  1 mm image (ellipsoid "brain" with noise) and a smooth initial field: resampling, z-score, padding,
  network, crop, resampling back.
- ``train-<preset>``: one Adam step (forward, masked MSE, backward, update), batch 1, at the network-grid
  training size (2 mm presets: 80 x 96 x 72 = their full training volume; published: also 80 x 96 x 72, one
  eighth of its 160 x 192 x 144 training volume, since a full-size CPU step needs more memory than this
  shared machine has).

The table gives the median wall time of ``--repeats`` timed calls, the median CPU time of a call
(``time.process_time``: all threads of the process; on a machine shared by others it is the load-independent
figure, and wall time on an idle machine is roughly CPU time / threads), the peak RSS, and the 1-minute load
average before and after the row (the CPU is shared; compare rows as ratios against ``forward-fast``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

IMAGE_SHAPE = (160, 192, 144)
PRESET_NAMES = ("published", "fast", "fast-small", "fast-wide")


def _rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for kind in ("forward", "refine", "train"):
        for p in PRESET_NAMES:
            if kind == "refine" and p == "published":
                continue  # = forward-published + ~1 s of resampling; 3 x 40 s more adds nothing
            rows[f"{kind}-{p}"] = (kind, p)
    return rows


ROWS = _rows()


def _synthetic_case(shape):
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from brainshift.volume import Volume

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = ((grid / np.array([0.8, 0.85, 0.8])[:, None, None, None]) ** 2).sum(axis=0) <= 1
    img = np.where(inside, 100 + 20 * rng.standard_normal(shape), 0).astype(np.float32)
    small = [gaussian_filter(rng.standard_normal(tuple(s // 4 for s in shape)), 3) for _ in range(3)]
    from scipy.ndimage import zoom

    field = np.stack([zoom(c, 4, order=1) * 30 for c in small]).astype(np.float32)
    aff = np.eye(4)
    aff[:3, 3] = -(np.array(shape) - 1) / 2
    return Volume(img, aff), field, inside


def _net_shape(preset: str, kind: str):
    from brainshift.model.grid import network_grid
    from brainshift.model.network import get_preset

    cfg = get_preset(preset)
    if kind == "train":
        return (80, 96, 72)
    import numpy as np

    shape, _ = network_grid(IMAGE_SHAPE, np.eye(4), cfg)
    m = cfg.size_multiple
    return tuple(-(-s // m) * m for s in shape)


def child(spec: dict) -> dict:
    """Run one row in this process and return its measurements."""
    import resource

    import torch

    from brainshift.model.checkpoint import LoadedModel
    from brainshift.model.inference import refine_field
    from brainshift.model.network import build_network, count_parameters, get_preset

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(0)
    kind, preset, repeats = spec["kind"], spec["preset"], int(spec["repeats"])
    cfg = get_preset(preset)
    model = build_network(cfg)
    size = _net_shape(preset, kind) if kind != "refine" else IMAGE_SHAPE
    warmup = not (preset == "published" and kind == "forward")
    if kind == "forward":
        model.eval()
        x = torch.randn(1, 4, *size)

        def call():
            with torch.inference_mode():
                model(x)
    elif kind == "refine":
        model.eval()
        image, field, mask = _synthetic_case(IMAGE_SHAPE)
        loaded = LoadedModel(model, cfg, {})

        def call():
            refine_field(image, field, loaded, mask=mask)
    else:
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(1, 4, *size)
        target = torch.randn(1, 3, *size)
        mask = torch.rand(1, 1, *size) > 0.3

        def call():
            opt.zero_grad(set_to_none=True)
            loss = ((model(x) - target) ** 2 * mask).sum() / mask.sum()
            loss.backward()
            opt.step()
    if warmup:
        call()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "params": count_parameters(model),
        "size": list(size),
        "times_s": times,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="all", help=f"comma-separated among {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose among {list(ROWS)}")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{args.threads}, python {platform.python_version()}", flush=True)
    print("| row | network input (voxels) | parameters | median wall s | runs wall (s) | median CPU s | "
          "peak RSS GB | load before / after |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        kind, preset = ROWS[name]
        spec = {"kind": kind, "preset": preset, "repeats": args.repeats, "threads": args.threads}
        load0 = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        load1 = os.getloadavg()[0]
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            print(f"| {name} | failed: {tail[0][:100]} | | | | | | {load0:.1f} / {load1:.1f} |", flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        runs = ", ".join(f"{t:.2f}" for t in r["times_s"])
        print(f"| {name} | {' x '.join(map(str, r['size']))} | {r['params']:,} | {r['median_s']:.2f} | {runs} | "
              f"{r['median_cpu_s']:.2f} | {r['peak_rss_gb']:.2f} | {load0:.1f} / {load1:.1f} |", flush=True)


if __name__ == "__main__":
    main()
