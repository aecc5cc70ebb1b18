"""Benchmark: ``brainshift infer --refine`` with the default model, whole command, split by step (issue 6).

Runs the real console command in a subprocess (start-up and imports count) on a 160 x 192 x 144 1 mm volume
(centred crop of the built-in MNI152 T1) with 20 keypoints, under ``/usr/bin/time`` for wall time and peak
resident memory, ``--repeats`` times, and prints a Markdown table of medians; then the split of the median
run taken from the command's own ``summary.json`` timings:

- **start-up**: interpreter start and imports (wall time minus the command's own total);
- **load**: preop image, keypoints and network weights;
- **interpolate**: the initial field from the keypoints (``-m linear`` or ``tps``);
- **network**: resampling to the network grid, the forward pass, the residual back on the 1 mm grid;
- **statistics**: max / mean displacement and det J of each field;
- **write**: the output files (``.h5`` by default).

Since issue 12 the network loads in a background thread while the image is read and interpolated, so
**load** counts only the wait for it.

A baseline measured in the same run (a subprocess that only loads the T1 with nibabel and writes it back)
gives a ratio that stays meaningful when the shared machine is busy.

    .venv/bin/python bench/speed.py [--repeats 5] [--weights weights/default.safetensors] [--method tps]
        [--before /tmp/before]   # also an older tree (git archive), interleaved: before/after in one run

Both ``--no-refine`` and ``--refine`` are timed (issue 12's target: ``--refine`` at most 1.5 x ``--no-refine``).

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
    "statistics": ("field statistics",),
    "write": ("write outputs",),
}


def _split(timings: dict[str, float]) -> dict[str, float]:
    out = {k: sum(v for name, v in timings.items() if name.startswith(prefixes)) for k, prefixes in SPLIT.items()}
    out["total (command)"] = timings["total"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--weights", default=str(ROOT / "weights" / "default.safetensors"))
    ap.add_argument("--method", default="tps", choices=("linear", "tps", "gp"))
    ap.add_argument("--before", default=None, help="another source tree (e.g. `git archive` of an older commit) "
                    "run the same way with PYTHONPATH=BEFORE/src, interleaved with this one")
    ap.add_argument("--after", default=None, help="the tree to measure instead of this checkout (PYTHONPATH=AFTER/src)")
    args = ap.parse_args()
    if not Path(args.weights).is_file():
        sys.exit(f"expected network weights at {args.weights}, not found (pass --weights)")
    versions = {"after": str(Path(args.after).resolve() / "src") if args.after else None}
    if args.before:
        versions = {"before": str(Path(args.before).resolve() / "src"), **versions}

    runs: dict[tuple[str, str], list] = {(v, m): [] for v in versions for m in ("--no-refine", "--refine")}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        img, kp = _prepare(tmp, shape_crop=True)
        baseline_cmd = [sys.executable, "-c",
                        f"import nibabel as nib; i = nib.load({str(img)!r}); nib.save(nib.Nifti1Image(i.get_fdata(), "
                        f"i.affine), {str(tmp / 'copy.nii.gz')!r})"]
        base = []
        for r in range(args.repeats):  # interleaved: every version and mode sees the same machine load
            base.append(_timed(baseline_cmd)[0])
            for (version, mode), rec in runs.items():
                out = tmp / f"out{r}"
                cmd = [str(EXE), "infer", "-p", str(img), "-k", str(kp), "-m", args.method, mode, "-w",
                       args.weights, "-d", "cpu", "-q", "-o", str(out)]
                env = dict(os.environ, PYTHONPATH=versions[version]) if versions[version] else None
                wall, mem = _timed(cmd, env=env)
                rec.append((wall, mem, json.loads((out / "summary.json").read_text())["timings_s"]))
                shutil.rmtree(out, ignore_errors=True)

    base_med = statistics.median(base)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; repeats {args.repeats}; weights {Path(args.weights).name}; "
          f"-m {args.method}, 160 x 192 x 144, 20 keypoints")
    print("| version | command | median wall s | min s | max s | peak RSS MB | x baseline |")
    print("|---|---|---|---|---|---|---|")
    print(f"| | baseline: nibabel load + save of the T1 | {base_med:.2f} | {min(base):.2f} | {max(base):.2f} | - "
          "| 1.00 |")
    med = {}
    for (version, mode), rec in runs.items():
        walls = [w for w, _, _ in rec]
        med[(version, mode)] = statistics.median(walls)
        print(f"| {version} | infer {mode} | {med[(version, mode)]:.2f} | {min(walls):.2f} | {max(walls):.2f} | "
              f"{max(m for _, m, _ in rec):.0f} | {med[(version, mode)] / base_med:.2f} |")
    print()
    for version in versions:
        print(f"{version}: --refine / --no-refine = {med[(version, '--refine')] / med[(version, '--no-refine')]:.2f}")
    print("\nsplit of the median run (s):\n")
    head = None
    for (version, mode), rec in runs.items():
        median_run = min(rec, key=lambda r: abs(r[0] - med[(version, mode)]))
        split = _split(median_run[2])
        split = {"start-up (imports)": median_run[0] - split["total (command)"], **split}
        if head is None:
            head = list(split)
            print("| version | command | " + " | ".join(head) + " |")
            print("|" + "---|" * (len(head) + 2))
        print(f"| {version} | {mode} | " + " | ".join(f"{split[k]:.2f}" for k in head) + " |")


if __name__ == "__main__":
    main()
