"""``brainshift demo``: the classical pipeline end to end on the built-in MNI152 brain.

What it does (v1, until the simulator and the trained network ship):

1. Loads the MNI152 T1 template and its brain mask through nilearn's own loader (the files ship inside the
   nilearn package; nothing is downloaded) and writes the T1 as ``demo_output/mni152_t1.nii.gz``.
2. Builds a smooth analytic *sag field* (see :func:`analytic_sag_field`): a Gaussian-weighted sinking of the
   brain under a right-superior craniotomy, peak ``amplitude_mm`` at the craniotomy, direction from the
   craniotomy toward the brain centroid, zero far from it.
3. Draws 20 keypoints at random inside the brain (seeded), takes their displacements from the analytic field
   and writes them as a keypoint table (voxel frame) ``demo_output/keypoints.csv``.
4. Runs ``brainshift infer --no-refine`` for each interpolator (``linear``, ``tps``, ``tps3d``) into
   ``demo_output/<method>/`` and prints each interpolator's error against the analytic field inside the
   brain (MSE, mean and 95th-percentile error, TRE at 500 held-out points, % det J <= 0, time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainshift.volume import Volume


@dataclass
class SagFieldParameters:
    """Parameters of :func:`analytic_sag_field` (all in mm in the RAS world frame)."""

    amplitude_mm: float = 8.0
    """Peak displacement at the craniotomy centre."""
    width_mm: float = 35.0
    """Standard deviation of the Gaussian fall-off with distance from the craniotomy centre."""


def load_mni152() -> tuple[Volume, Volume]:
    """The MNI152 T1 template (1 mm, 197 x 233 x 189, skull-stripped) and its brain mask, from nilearn's files.

    Returns:
        ``(t1, brain_mask)`` as :class:`Volume` (intensity float32 in [0, 1]; label uint8).
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    mask = load_mni152_brain_mask(resolution=1)
    return (Volume(np.asarray(t1.get_fdata(), dtype=np.float32), t1.affine, "intensity"),
            Volume((np.asarray(mask.get_fdata()) > 0).astype(np.uint8), mask.affine, "label"))


def analytic_sag_field(brain_mask: Volume, params: SagFieldParameters | None = None) -> tuple[np.ndarray, dict]:
    """A smooth analytic brain-sag displacement field under a right-superior craniotomy.

    With ``c`` the craniotomy centre (the brain-mask voxel maximising ``z + 0.6 x`` in RAS mm, i.e. the
    right-superior convexity) and ``g`` the unit vector from ``c`` toward the brain-mask centroid, the world
    displacement of a point ``x`` is ``d(x) = amplitude * exp(-|x - c|^2 / (2 width^2)) * g`` (mm, RAS).
    It is infinitely smooth and diffeomorphic for these parameters (max |grad d| = amplitude / (width
    sqrt(e)) ~ 0.14 < 1).

    Returns:
        ``(field_vox, info)``: float32 ``(3, I, J, K)``; info has ``craniotomy_ras`` and ``direction_ras``.
        Convention: forward Lagrangian, voxel units along i, j, k of ``brain_mask``'s grid.
    """
    from brainshift.field import field_ras_to_voxel, voxel_grid
    from brainshift.io.frames import voxel_to_ras

    p = params or SagFieldParameters()
    idx = np.argwhere(brain_mask.data > 0)
    ras = voxel_to_ras(idx.astype(np.float64), brain_mask.affine)
    c = ras[np.argmax(ras[:, 2] + 0.6 * ras[:, 0])]
    g = ras.mean(axis=0) - c
    g /= np.linalg.norm(g)
    grid = voxel_grid(brain_mask.shape).reshape(3, -1).T
    x = voxel_to_ras(grid, brain_mask.affine)
    w = p.amplitude_mm * np.exp(-((x - c) ** 2).sum(axis=1) / (2.0 * p.width_mm ** 2))
    d_ras = (w[:, None] * g[None, :]).T.reshape((3,) + brain_mask.shape)
    return field_ras_to_voxel(d_ras, brain_mask.affine), {"craniotomy_ras": c.tolist(), "direction_ras": g.tolist()}


def draw_points_in_mask(mask: np.ndarray, n: int, rng: np.random.Generator, erode_vox: int = 3) -> np.ndarray:
    """``n`` distinct random voxel positions (``(n, 3)`` float, voxel frame) inside ``mask`` eroded by ``erode_vox``."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask > 0, iterations=erode_vox) if erode_vox > 0 else mask > 0
    idx = np.argwhere(inner)
    pick = rng.choice(len(idx), size=n, replace=False)
    return idx[pick].astype(np.float64)


def run_demo(out_dir: str | Path = "demo_output", *, seed: int = 0, n_keypoints: int = 20,
             methods: tuple[str, ...] = ("linear", "tps", "tps3d"), verbose: bool = True) -> list[dict]:
    """Run the v1 demo (module docstring) and return one metrics row per interpolator."""
    from scipy.ndimage import map_coordinates

    from brainshift.field import field_voxel_to_ras, jacobian_determinant
    from brainshift.io.fields import read_field
    from brainshift.io.images import write_image
    from brainshift.io.keypoints import write_keypoint_table
    from brainshift.pipeline import InferOptions, run_infer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    say = print if verbose else (lambda *a, **k: None)

    say("brainshift demo: classical interpolation on the built-in MNI152 brain (analytic sag field)")
    t1, brain = load_mni152()
    t1_path = out / "mni152_t1.nii.gz"
    write_image(t1, t1_path)
    gt, info = analytic_sag_field(brain)
    gt_ras = field_voxel_to_ras(gt, brain.affine)
    mask = brain.data > 0

    pts = draw_points_in_mask(brain.data, n_keypoints, rng)
    disps = np.stack([map_coordinates(gt[c], pts.T, order=1) for c in range(3)], axis=1)
    kp_path = out / "keypoints.csv"
    write_keypoint_table(kp_path, pts, disps, frame="voxel")
    held = draw_points_in_mask(brain.data, 500, np.random.default_rng(seed + 1))
    say(f"  {n_keypoints} keypoints -> {kp_path}; craniotomy at RAS {np.round(info['craniotomy_ras'], 1).tolist()} mm")

    rows = []
    for method in methods:
        t0 = time.perf_counter()
        summary = run_infer(InferOptions(preop_scan=t1_path, kpt_disps=kp_path, interp_mode=method,
                                         output=out / method, output_fmt="h5", refine=False, verbose=False))
        wall = time.perf_counter() - t0
        field, _ = read_field(out / method / "initial_disp_field.h5", reference=t1)
        err = np.sqrt(((field_voxel_to_ras(field, t1.affine) - gt_ras) ** 2).sum(axis=0))[mask]
        pred_h = np.stack([map_coordinates(field[c], held.T, order=1) for c in range(3)], axis=1)
        gt_h = np.stack([map_coordinates(gt[c], held.T, order=1) for c in range(3)], axis=1)
        tre = np.linalg.norm((pred_h - gt_h) @ t1.affine[:3, :3].T, axis=1)
        jac = jacobian_determinant(field)[mask]
        rows.append({"method": method, "mse_mm2": float(np.mean(err ** 2)), "mean_error_mm": float(err.mean()),
                     "p95_error_mm": float(np.percentile(err, 95)), "tre_mm": float(tre.mean()),
                     "pct_jac_nonpositive": float(100 * np.mean(jac <= 0)),
                     "interp_time_s": float(summary["timings_s"].get(f"interpolate ({method})", np.nan)),
                     "infer_wall_s": wall})
    say("")
    say(format_table(rows))
    say(f"\nmax ground-truth displacement {np.sqrt((gt_ras ** 2).sum(0))[mask].max():.2f} mm; "
        f"fields (.h5, ITK/Slicer) in {out}/<method>/")
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of demo metrics rows."""
    head = f"{'method':<8} {'MSE mm^2':>9} {'mean mm':>8} {'p95 mm':>7} {'TRE mm':>7} {'detJ<=0 %':>9} {'time s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<8} {r['mse_mm2']:>9.3f} {r['mean_error_mm']:>8.3f} {r['p95_error_mm']:>7.3f} "
                     f"{r['tre_mm']:>7.3f} {r['pct_jac_nonpositive']:>9.4f} {r['infer_wall_s']:>7.2f}")
    return "\n".join(lines)
