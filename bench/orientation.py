"""Benchmark: is the refinement the same world answer whatever the image grid's voxel orientation?

The same case (image, ground-truth field, brain mask, keypoints in the world) is presented on grids that differ only
in how the voxel axes run: RAS (as simulated), LPS (axes i and j reversed: how ITK / DICOM-derived volumes are
often stored), sagittal axis orders (voxel axes along A, S, R or P, I, L). These reorientations are exact (flips
and permutations of the arrays, the field's voxel components permuted with them; nibabel's orientation tools), so
every interpolator that works in world or normalised per-axis coordinates gives the same world field on each, and
any difference in a refined field is the network's. `OBLIQUE` adds a resampled oblique anisotropic grid
(`--oblique`: spacing and rotation), where the image, the ground truth and the published `tps` (normalised voxel
coordinates) change too. Reported per case and grid: world MSE (mm², over the case's evaluation region) of `tps`,
the network alone on it (`net-tps`, mirror-averaged) and `infer`'s default (`safe-tps`), and the ratio of each to
the first grid's.

    python bench/orientation.py --data data/sg_val --cases 6 --out bench/orientation/sg_val_after
    python bench/orientation.py --data data/sg_val --cases 6 --orientations RAS,OBLIQUE --out ...
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import numpy as np


def reorient(vol_data: np.ndarray, affine: np.ndarray, target: str):
    """Reorder and flip ``vol_data``'s first three axes so that its voxel axes run along ``target`` (three letters of
    nibabel's axis codes, e.g. ``"LPS"``, ``"ASR"``). Returns ``(data, affine, M, t)`` with ``old_vox = M new_vox +
    t`` (``M`` a signed permutation): a field's voxel components go ``u_new = M^T u_old``."""
    import nibabel.orientations as nio

    cur = nio.io_orientation(affine)
    tgt = nio.axcodes2ornt(tuple(target))
    tr = nio.ornt_transform(cur, tgt)
    shape = vol_data.shape[:3]
    data = nio.apply_orientation(vol_data, tr)
    new_affine = affine @ nio.inv_ornt_aff(tr, shape)
    m_t = np.linalg.inv(affine) @ new_affine  # old_vox = (A_old^-1 A_new) new_vox
    return np.ascontiguousarray(data), new_affine, np.round(m_t[:3, :3]), m_t[:3, 3]


def reorient_case(image, field, masks: dict, points, disps, hpoints, hdisps, target: str):
    """The case on the ``target`` orientation: image, field ``(3, I, J, K)`` (voxel units), masks, keypoints."""
    from brainshift.volume import Volume

    img, aff, m, t = reorient(image.data, image.affine, target)
    fld = np.stack([reorient(field[c], image.affine, target)[0] for c in range(3)])
    fld = np.einsum("ji,j...->i...", m, fld).astype(np.float32)  # u_new = M^T u_old
    out_masks = {k: reorient(v, image.affine, target)[0] for k, v in masks.items()}
    minv = m.T

    def pts(p):
        return (p - t) @ minv.T

    def vec(d):
        return d @ minv.T

    return (Volume(img, aff), np.ascontiguousarray(fld), out_masks, pts(points), vec(disps), pts(hpoints),
            vec(hdisps))


def rotation(deg_x: float, deg_z: float) -> np.ndarray:
    """Rotation by ``deg_x`` about world x, then ``deg_z`` about world z."""
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def oblique_case(image, field, masks: dict, points, disps, hpoints, hdisps, spacing, deg_x, deg_z,
                 margin_mm: float = 8.0):
    """The case resampled onto an oblique anisotropic grid whose field of view is the head's box along its axes (plus
    ``margin_mm``), as an oblique acquisition would frame it: image trilinear, the
    ground-truth field as world vectors (trilinear per world component, then the new grid's voxel units), masks by
    nearest neighbour; keypoints and their displacements mapped through the world exactly."""
    from brainshift.volume import Volume

    a = image.affine
    rot = rotation(deg_x, deg_z)
    head = np.argwhere(image.data > image.data.min())  # the field of view is the head's box along the new axes
    world = head @ a[:3, :3].T + a[:3, 3]
    local = world @ rot  # coordinates along the rotated axes
    lo, hi = local.min(axis=0) - margin_mm, local.max(axis=0) + margin_mm
    sp = np.asarray(spacing, np.float64)
    shape = tuple(int(np.ceil((h - l_) / s_)) for l_, h, s_ in zip(lo, hi, sp, strict=True))
    new = np.eye(4)
    new[:3, :3] = rot @ np.diag(sp)
    new[:3, 3] = rot @ (lo + 0.5 * sp)
    img = image.resample_to_grid(shape, new).data
    world_u = np.einsum("ij,j...->i...", a[:3, :3], field)
    comps = [Volume(world_u[c].astype(np.float32), a).resample_to_grid(shape, new).data for c in range(3)]
    fld = np.einsum("ij,j...->i...", np.linalg.inv(new[:3, :3]), np.stack(comps)).astype(np.float32)
    out_masks = {k: Volume(v.astype(np.uint8), a, "label").resample_to_grid(shape, new).data for k, v in masks.items()}
    to_new = np.linalg.inv(new) @ a

    def pts(p):
        return p @ to_new[:3, :3].T + to_new[:3, 3]

    def vec(d):
        return d @ to_new[:3, :3].T

    return (Volume(img, new), fld, out_masks, pts(points), vec(disps), pts(hpoints), vec(hdisps))


def padded_case(image, field, masks: dict, points, disps, hpoints, hdisps, pad_vox: int):
    """The case with ``pad_vox`` voxels of background (the image's minimum; zero field and masks) added on every
    side: a larger field of view around the same head, nothing resampled."""
    from brainshift.volume import Volume

    widths = [(pad_vox, pad_vox)] * 3
    img = np.pad(image.data, widths, constant_values=float(image.data.min()))
    aff = image.affine.copy()
    aff[:3, 3] -= aff[:3, :3] @ np.full(3, float(pad_vox))
    fld = np.pad(field, ((0, 0), *widths))
    out_masks = {k: np.pad(v, widths) for k, v in masks.items()}
    return Volume(img, aff), fld, out_masks, points + pad_vox, disps, hpoints + pad_vox, hdisps


def main() -> None:
    import torch

    from brainshift.evaluate import metrics
    from brainshift.evaluate.run import case_rng, draw_case_keypoints, evaluation_mask, keypoint_mask
    from brainshift.interpolate import interpolate
    from brainshift.model.checkpoint import load_weights
    from brainshift.model.inference import refine_field
    from brainshift.model.safeguards import safe_refine
    from brainshift.resources import default_weights
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--weights", default=None, help="network weights (default: the shipped model)")
    ap.add_argument("--orientations", default="RAS,LPS,ASR,PIL",
                    help="storage orders (nibabel axis codes), OBLIQUE (the grid of --oblique) and/or PADn (the "
                         "first grid with n voxels of background added on every side, the same tps field)")
    ap.add_argument("--oblique", default="1,1,2,15,20",
                    help="the OBLIQUE grid: spacing i,j,k (mm) and rotations about world x then z (degrees)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_weights(args.weights or default_weights())
    data = Path(args.data)
    rows = []
    t_start = time.time()
    for case_id in list_cases(data)[: args.cases]:
        case = read_case(data, case_id)
        subject = case.subject
        kp = draw_case_keypoints(case.field, keypoint_mask(case), subject.image.affine,
                                 rng=case_rng(args.seed, case.case_id), n_keypoints=20,
                                 candidates_vox=read_subject_keypoints(data, subject.subject_id))
        masks = {"region": evaluation_mask(case).astype(np.uint8), "brain": (subject.brain_mask.data > 0)
                 .astype(np.uint8)}
        for target in args.orientations.split(","):
            make = reorient_case
            extra = (target,)
            if target == "OBLIQUE":
                ob = [float(v) for v in args.oblique.split(",")]
                make, extra = oblique_case, (ob[:3], ob[3], ob[4])
            pad = int(target[3:]) if target.startswith("PAD") else 0
            if pad:  # the RAS grid with `pad` mm of background added on every side; the same initial field
                make, extra = padded_case, (pad,)
            image, gt, m, p, d, hp, hd = make(subject.image, case.field, masks, kp.points_vox, kp.disps_vox,
                                              kp.heldout_points_vox, kp.heldout_disps_vox, *extra)
            region, brain = m["region"] > 0, m["brain"] > 0
            if pad:
                tps0 = interpolate("tps", kp.points_vox, kp.disps_vox, subject.image.shape, subject.image.affine)
                tps = np.pad(tps0, ((0, 0), *[(pad, pad)] * 3))
            else:
                tps = interpolate("tps", p, d, image.shape, image.affine)
            net = refine_field(image, tps, loaded, mask=brain, mirror_average=True, points_vox=p)
            safe = safe_refine(image, p, d, tps, loaded, method="tps", mask=brain, seed=args.seed)
            for name, f in (("tps", tps), ("net-tps", net), ("safe-tps", safe.field_vox)):
                s = metrics.score_field(f, gt, image.affine, region, hp, hd)
                rows.append({"case": case_id, "orientation": target, "method": name, "mse_mm2": s["mse_mm2"],
                             "tre_mm": s["tre_mm"], "alpha": safe.alpha if name == "safe-tps" else float("nan")})
            print(f"  {case_id} {target}: " + ", ".join(f"{r['method']} {r['mse_mm2']:.4f}" for r in rows[-3:])
                  + f" (alpha {safe.alpha:.2f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_case.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ref = {(r["case"], r["method"]): r["mse_mm2"] for r in rows if r["orientation"] == rows[0]["orientation"]}
    lines = [f"Data `{args.data}`, {args.cases} cases, 20 detected keypoints, seed {args.seed}; OBLIQUE grid "
             f"(spacing i,j,k mm, rotation about x then z, degrees) {args.oblique}; weights "
             f"`{args.weights or 'default (shipped)'}`; machine: {platform.machine()}, no GPU; "
             f"{time.time() - t_start:.0f} s.", "",
             "| orientation | method | mean MSE mm² | mean ratio to the same method on the first grid | worst |",
             "|---|---|---|---|---|"]
    for target in args.orientations.split(","):
        for name in ("tps", "net-tps", "safe-tps"):
            rs = [r for r in rows if r["orientation"] == target and r["method"] == name]
            rat = [r["mse_mm2"] / ref[(r["case"], name)] for r in rs]
            lines.append(f"| {target} | {name} | {np.mean([r['mse_mm2'] for r in rs]):.4f} | {np.mean(rat):.3f} | "
                         f"{max(rat):.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
