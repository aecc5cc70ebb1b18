"""Training throughput on this machine: data stages per sample and one optimiser step per network preset.

Builds one synthetic subject at 160 x 192 x 144 (1 mm; ellipsoid brain, textured image, analytic smooth
field) in a temporary folder, then times (median of ``--repeats`` runs, torch threads = 2):

- ``prepare_case`` (read + network grid; cached once per case in training),
- ``draw_variant`` with ``linear`` and ``tps`` (keypoint draw + interpolation + network grid; what
  ``variants_per_case > 0`` caches),
- ``assemble_sample`` with MONAI intensity augmentation (paid for every sample),
- ``train_step`` (forward + backward + Adam, batch 1) per preset at its whole padded network grid.

Samples/s is ``1 / (step + per-sample data time)`` with the variant pool (cached) or fresh draws (mixed:
mean of linear and tps). Prints a Markdown table; ``--append`` adds it to bench/RESULTS.md.

    .venv/bin/python bench/train_step.py --repeats 3 --append
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def make_dataset(root: Path, shape=(160, 192, 144)) -> None:
    from brainshift.simulate.dataset import Subject, write_case, write_subject
    from brainshift.volume import Volume

    aff = np.eye(4)
    aff[:3, 3] = -np.asarray(shape) / 2.0
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    c = (np.asarray(shape) - 1) / 2.0
    r = sum(((g[a] - c[a]) / (0.42 * shape[a])) ** 2 for a in range(3))
    brain = (r <= 1).astype(np.uint8)
    tumour = (sum((g[a] - (c[a] + 20)) ** 2 for a in range(3)) <= 15.0**2).astype(np.uint8)
    img = (brain * (100 + 20 * np.sin(g[0] / 6) * np.cos(g[1] / 7))).astype(np.float32)
    write_subject(root, Subject("s0", Volume(img, aff), Volume(brain, aff, "label"), Volume(tumour, aff, "label"),
                                Volume(np.zeros(shape, np.uint8), aff, "label")))
    bump = np.exp(-sum((g[a] - c[a] - 20) ** 2 for a in range(3)) / (2 * 25.0**2))
    field = (np.stack([4 * bump, 2 * bump, -3 * bump]) * brain).astype(np.float32)
    write_case(root, "s0_c0", "s0", field, aff, Volume(tumour, aff, "label"), {})


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    from brainshift.model import build_network, get_preset
    from brainshift.train.config import from_dict
    from brainshift.train.data import assemble_sample, draw_variant, intensity_augmentation, prepare_case
    from brainshift.train.loop import train_step

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--presets", default="fast-small,fast,fast-wide")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = from_dict({"device": "cpu"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp))
        for name in args.presets.split(","):
            net = get_preset(name)
            t_prep, case = timed(partial(prepare_case, tmp, "s0_c0", net), args.repeats)
            rng = np.random.default_rng(0)
            t_lin, var = timed(partial(draw_variant, case, rng, net, interp="linear"), args.repeats)
            t_tps, _ = timed(partial(draw_variant, case, rng, net, interp="tps"), args.repeats)
            t_asm, sample = timed(partial(assemble_sample, case, var, None, intensity_augmentation(), rng),
                                  args.repeats)
            batch = {k: v[None] for k, v in sample.items()}
            model = build_network(net)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            step = partial(train_step, model, batch, opt, cfg, net.field_units, torch.device("cpu"))
            step()  # warm-up
            t_step, _ = timed(step, args.repeats)
            fresh = (t_lin + t_tps) / 2
            rows.append((name, "x".join(map(str, sample["input"].shape[1:])), t_prep, t_lin, t_tps, t_asm, t_step,
                         1 / (t_step + t_asm), 1 / (t_step + t_asm + fresh)))
    load = os.getloadavg()
    head = ("| preset | network grid | prepare_case s | variant linear s | variant tps s | assemble+aug s | "
            "train step s | samples/s (cached variants) | samples/s (fresh draws) |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.2f} | "
                      f"{r[7]:.2f} | {r[8]:.2f} |" for r in rows]
    note = (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 2, "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine: noisy); "
            f"median of {args.repeats}; input 160 x 192 x 144 at 1 mm, batch 1, no image loss.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    print(text)
    if args.append:
        res = Path(__file__).resolve().parent / "RESULTS.md"
        with open(res, "a") as fh:
            fh.write("\n## Training throughput (issue 5, bench/train_step.py)\n\n" + text)


if __name__ == "__main__":
    main()
