"""Benchmark: the whole ``brainshift infer`` command on the built-in MNI152 brain (issue 3 / issue 6 targets).

Runs the real console command in a subprocess (so start-up and imports count) under ``/usr/bin/time`` for
wall time and peak resident memory, ``--repeats`` times per configuration, and prints a Markdown table of
medians. A baseline measured in the same run — a subprocess that only loads the T1 with nibabel and writes
it back — gives a ratio that is stable when the shared machine is busy.

    .venv/bin/python bench/infer.py [--repeats 5] [--refine] [--weights W]

Targets (2-core CPU): ``infer --no-refine`` (20 keypoints, 197 x 233 x 189 MNI152 grid) <= 5 s wall and
<= 1.5 GB peak; ``infer --refine`` on a 160 x 192 x 144 volume <= 8 s and <= 2.5 GB.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("brainshift")


def _timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall s, peak RSS MB) of ``cmd`` via GNU time (``env``: the environment, default inherited)."""
    res = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    m = re.findall(r"TIME ([\d.]+) (\d+)", res.stderr)[-1]
    return float(m[0]), int(m[1]) / 1024.0


def _prepare(tmp: Path, shape_crop: bool) -> tuple[Path, Path]:
    import nibabel as nib

    from brainshift.io.images import write_image
    from brainshift.io.keypoints import write_keypoint_table
    from brainshift.simulate.analytic import analytic_sag_field
    from brainshift.simulate.template import load_mni152
    from brainshift.volume import Volume

    t1, brain = load_mni152()
    if shape_crop:  # the 160 x 192 x 144 volume: centred crop of the MNI grid
        lo = [(s - c) // 2 for s, c in zip(t1.shape, (160, 192, 144), strict=True)]
        sl = tuple(slice(a, a + c) for a, c in zip(lo, (160, 192, 144), strict=True))
        aff = t1.affine.copy()
        aff[:3, 3] = t1.affine[:3, :3] @ np.asarray(lo, float) + t1.affine[:3, 3]
        t1 = Volume(t1.data[sl], aff)
        brain = Volume(brain.data[sl], aff, "label")
    gt, _ = analytic_sag_field(brain)
    inside = np.argwhere(brain.data > 0)
    pts = inside[np.random.default_rng(0).choice(len(inside), 20, replace=False)].astype(float)
    from scipy.ndimage import map_coordinates

    disps = np.stack([map_coordinates(gt[c], pts.T, order=1) for c in range(3)], axis=1)
    img = tmp / "t1.nii.gz"
    write_image(t1, img)
    kp = tmp / "kp.csv"
    write_keypoint_table(kp, pts, disps)
    assert nib.load(str(img)).shape == t1.shape
    return img, kp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--refine", action="store_true", help="also time --refine (needs weights)")
    ap.add_argument("--weights", default=None)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        img, kp = _prepare(tmp, shape_crop=False)
        (tmp / "crop").mkdir()
        img_c, kp_c = _prepare(tmp / "crop", shape_crop=True)
        baseline_cmd = [sys.executable, "-c",
                        f"import nibabel as nib; i = nib.load({str(img)!r}); nib.save(nib.Nifti1Image(i.get_fdata(), "
                        f"i.affine), {str(tmp / 'copy.nii.gz')!r})"]
        configs = [
            ("baseline: nibabel load + save of the T1", baseline_cmd),
            ("infer --no-refine -m linear -f h5 (MNI 197x233x189)",
             [str(EXE), "infer", "-p", str(img), "-k", str(kp), "-m", "linear", "--no-refine", "-q", "-o"]),
            ("infer --no-refine -m tps -f h5 (MNI 197x233x189)",
             [str(EXE), "infer", "-p", str(img), "-k", str(kp), "-m", "tps", "--no-refine", "-q", "-o"]),
            ("infer --no-refine -m linear -f npz (MNI 197x233x189)",
             [str(EXE), "infer", "-p", str(img), "-k", str(kp), "-m", "linear", "--no-refine", "-q", "-f", "npz",
              "-o"]),
        ]
        if args.refine:
            w = ["-w", args.weights] if args.weights else []
            configs.append(("infer --refine -m linear -f h5 (160x192x144)",
                            [str(EXE), "infer", "-p", str(img_c), "-k", str(kp_c), "-m", "linear", "--refine",
                             "-d", "cpu", "-q", *w, "-o"]))
        base_med = None
        for name, cmd in configs:
            walls, mems = [], []
            for r in range(args.repeats):
                out = tmp / f"out{r}"
                full = cmd + [str(out)] if cmd[0] == str(EXE) else cmd
                wall, mem = _timed(full)
                walls.append(wall)
                mems.append(mem)
                shutil.rmtree(out, ignore_errors=True)
            med = statistics.median(walls)
            if base_med is None:
                base_med = med
            rows.append((name, med, min(walls), max(walls), max(mems), med / base_med))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; repeats {args.repeats}")
    print("| command | median wall s | min s | max s | peak RSS MB | x baseline |")
    print("|---|---|---|---|---|---|")
    for name, med, lo, hi, mem, ratio in rows:
        print(f"| {name} | {med:.2f} | {lo:.2f} | {hi:.2f} | {mem:.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
