"""Benchmark: ``brainshift infer --refine`` with the default model, whole command, split by step (issue 6).

Runs the real console command in a subprocess (start-up and imports count) on a 160 x 192 x 144 1 mm volume
(centred crop of the built-in MNI152 T1) with 20 keypoints, under ``/usr/bin/time`` for wall time and peak
resident memory, ``--repeats`` times, and prints a Markdown table of medians; then the split of the median
run taken from the command's own ``summary.json`` timings:

- **start-up**: interpreter start and imports (wall time minus the command's own total);
- **load**: preop image, keypoints and network weights;
- **interpolate**: the initial field from the keypoints (``-m linear`` or ``tps``);
- **network**: resampling to the network grid, the forward pass, the residual back on the 1 mm grid;
- **write**: field statistics and the output files (``.h5`` by default).

A baseline measured in the same run (a subprocess that only loads the T1 with nibabel and writes it back)
gives a ratio that stays meaningful when the shared machine is busy.

    .venv/bin/python bench/speed.py [--repeats 5] [--weights weights/default.safetensors] [--method tps]

Target (2-core CPU): <= 8 s wall and <= 2.5 GB peak (the published network alone: 38.9 s and 4.1 GB here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer import EXE, ROOT, _prepare, _timed  # noqa: E402  (bench/infer.py: same inputs, same timing)

SPLIT = {
    "load": ("load preop image", "load keypoints", "load network weights"),
    "interpolate": ("interpolate",),
    "network": ("refine with the network",),
    "write": ("field statistics", "write outputs"),
}


def _split(timings: dict[str, float]) -> dict[str, float]:
    out = {k: sum(v for name, v in timings.items() if name.startswith(prefixes)) for k, prefixes in SPLIT.items()}
    out["total (command)"] = timings["total"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", default=str(ROOT / "weights" / "default.safetensors"))
    ap.add_argument("--method", default="tps", choices=("linear", "tps"))
    args = ap.parse_args()
    if not Path(args.weights).is_file():
        sys.exit(f"expected network weights at {args.weights}, not found (pass --weights)")

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        img, kp = _prepare(tmp, shape_crop=True)
        baseline_cmd = [sys.executable, "-c",
                        f"import nibabel as nib; i = nib.load({str(img)!r}); nib.save(nib.Nifti1Image(i.get_fdata(), "
                        f"i.affine), {str(tmp / 'copy.nii.gz')!r})"]
        infer_cmd = [str(EXE), "infer", "-p", str(img), "-k", str(kp), "-m", args.method, "--refine", "-w",
                     args.weights, "-d", "cpu", "-q", "-o"]
        base = [_timed(baseline_cmd)[0] for _ in range(args.repeats)]
        runs = []
        for r in range(args.repeats):
            out = tmp / f"out{r}"
            wall, mem = _timed(infer_cmd + [str(out)])
            timings = json.loads((out / "summary.json").read_text())["timings_s"]
            runs.append((wall, mem, timings))
            shutil.rmtree(out, ignore_errors=True)

    walls = [w for w, _, _ in runs]
    med = statistics.median(walls)
    median_run = min(runs, key=lambda r: abs(r[0] - med))
    base_med = statistics.median(base)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; repeats {args.repeats}; weights {Path(args.weights).name}")
    print("| command | median wall s | min s | max s | peak RSS MB | x baseline |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline: nibabel load + save of the T1 | {base_med:.2f} | {min(base):.2f} | {max(base):.2f} | - "
          "| 1.00 |")
    print(f"| infer --refine -m {args.method} (160x192x144, 20 keypoints) | {med:.2f} | {min(walls):.2f} | "
          f"{max(walls):.2f} | {max(m for _, m, _ in runs):.0f} | {med / base_med:.2f} |")
    split = _split(median_run[2])
    split = {"start-up (imports)": median_run[0] - split["total (command)"], **split}
    print("\nsplit of the median run (s):\n")
    print("| " + " | ".join(split) + " |")
    print("|" + "---|" * len(split))
    print("| " + " | ".join(f"{v:.2f}" for v in split.values()) + " |")
    ok = med <= 8.0 and max(m for _, m, _ in runs) <= 2500
    print(f"\ntarget <= 8 s and <= 2.5 GB: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
