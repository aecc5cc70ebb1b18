"""Validation of the scale-normalisation floor of a model used alone (session 19): floor 0 against a candidate.

For each case of ``--data`` (validation data only), keypoints are drawn as ``bench/fold_rule_validation.py`` draws
them, the initial field interpolated with tps, and the network runs alone (no safeguards, as ``infer -i`` or
``--no-safeguards``) with each scale-normalisation floor of ``--floors`` (``min_field_rms_mm``). Prints per case
and in all the MSE ratio to the better classical interpolator (linear or tps) over brain minus cavity.

    .venv/bin/python bench/scale_floor_validation.py --data data/val_family --weights weights/default.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="validation dataset (simulate-batch output)")
    ap.add_argument("--weights", default="weights/default.safetensors")
    ap.add_argument("--floors", default="0,2.5", help="comma-separated floors in mm (0: off)")
    ap.add_argument("--noise-mm", type=float, default=0.0)
    ap.add_argument("--cases", type=int, default=None, help="first N cases")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fold_rule_validation import problems

    from brainshift.compensate import compensate
    from brainshift.evaluate.metrics import score_field
    from brainshift.interpolate import interpolate
    from brainshift.model.checkpoint import load_weights
    from brainshift.simulate.dataset import list_cases

    args = argparse.Namespace(data=a.data, keypoint_rule="detected", n_keypoints=20, noise_mm=a.noise_mm,
                              method="tps", seed=0, training_draws=None, cases=a.cases)
    model = load_weights(a.weights, device="cpu")
    floors = [float(f) for f in a.floors.split(",")]
    ratios: dict[float, list[float]] = {f: [] for f in floors}
    ids = list_cases(a.data)[: a.cases] if a.cases else list_cases(a.data)
    for cid, image, aff, gt, region, brain, pts, dsp, hp, hd, method, _rule, _noise in problems(args, ids):
        fields = {m: interpolate(m, pts, dsp, image.shape, aff) for m in ("linear", "tps")}
        best = min(score_field(f, gt, aff, region, hp, hd)["mse_mm2"] for f in fields.values())
        row = [cid]
        for fl in floors:
            out = compensate(image, initial_field=fields[method], model=model, mask=brain, safeguards=False,
                             min_field_rms_mm=fl).refined_field
            ratios[fl].append(score_field(out, gt, aff, region, hp, hd)["mse_mm2"] / best)
            row.append(f"{ratios[fl][-1]:.3f}")
        print(*row, flush=True)
    for fl, v in ratios.items():
        print(f"floor {fl:g} mm: mean ratio {np.mean(v):.3f}, worst {np.max(v):.3f} ({len(v)} cases)")


if __name__ == "__main__":
    main()
