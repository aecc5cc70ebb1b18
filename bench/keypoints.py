"""Benchmark the 3-D keypoint detector on the 1 mm MNI152 template (issue 4, "Keypoints").

Usage::

    .venv/bin/python bench/keypoints.py [--repeats 3] [--no-baseline]

Measured on ``nilearn.datasets.load_mni152_template(resolution=1)`` masked by ``load_mni152_brain_mask``
(197 x 233 x 189 voxels), default parameters of :func:`brainshift.keypoints.detect_keypoints`:

- wall time: one untimed warm-up call, then the median of ``--repeats`` timed calls (target <= 5 s on
  2 cores; 3D SIFT-Rank: 2,473 features, each location repeated per orientation, in 3.6 s on this machine),
  and the process CPU time (less sensitive to other users of the shared CPU);
- count, bright/dark split, scale percentiles, median nearest-neighbour distance;
- spread: keypoints per octant of the brain mask's bounding box (smallest and largest share), fraction of
  keypoints at depth < 10 mm (distance to the nearest voxel outside the mask) against the fraction of brain
  voxels at depth 5-10 mm plus the 0-5 mm shell that ``border_mm = 5`` excludes;
- repeatability: the template with Gaussian noise (2 % of the intensity range) and the template shifted by a
  sub-voxel translation (0.4, -0.3, 0.25) voxels (``scipy.ndimage.shift``, cubic spline): fraction of the clean
  keypoints re-detected within 2 mm (after undoing the shift) and the median localisation difference;
- other grids: the template resampled to 2 mm isotropic and to 1 x 1 x 3 mm (each voxel the box average over
  its extent, then sampled) with the mask resampled alike: count, CPU time, and the fraction of the 1 mm
  keypoints with a keypoint within 3 mm (world) and vice versa;
- baseline in the same run: ``skimage.feature.blob_dog`` (bright blobs only, full resolution, no edge test)
  with comparable sigmas, once, so that timings on the busy shared machine can be compared as a ratio.

Prints a Markdown table; the recorded result is in bench/RESULTS.md ("Keypoint detection (issue 4)").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def _load():
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    from brainshift.volume import Volume

    t1 = load_mni152_template(resolution=1)
    mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
    return Volume(np.asarray(t1.dataobj, dtype=np.float32), t1.affine), mask


def _depth_mm(mask: np.ndarray) -> np.ndarray:
    """Distance (mm, 1 mm voxels) from each voxel to the nearest voxel outside the mask (image edge counts)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]


def _match(reference: np.ndarray, other: np.ndarray, radius: float) -> tuple[float, float]:
    """Fraction of ``reference`` points with an ``other`` point within ``radius`` and the median distance."""
    from scipy.spatial import cKDTree

    if len(reference) == 0 or len(other) == 0:
        return 0.0, float("nan")
    dist, _ = cKDTree(other).query(reference)
    hit = dist <= radius
    return float(hit.mean()), float(np.median(dist[hit])) if hit.any() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true", help="skip the skimage blob_dog baseline")
    args = parser.parse_args()

    from scipy.ndimage import shift as nd_shift

    from brainshift.keypoints import detect_keypoints
    from brainshift.volume import Volume

    volume, mask = _load()
    load_before = os.getloadavg()[0]
    detect_keypoints(volume, mask)  # warm-up (imports, caches)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        kp = detect_keypoints(volume, mask)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    wall = statistics.median(times)

    pts = kp.points_vox
    depth = _depth_mm(mask)
    kp_depth = depth[tuple(np.rint(pts).astype(int).T)]
    brain_depth = depth[mask]
    idx = np.argwhere(mask)
    centre = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
    octants = np.bincount(((pts > centre) * np.array([1, 2, 4])).sum(axis=1), minlength=8)
    from scipy.spatial import cKDTree

    nn = cKDTree(pts).query(pts, k=2)[0][:, 1]  # 1 mm isotropic: voxel distance = mm

    rng = np.random.default_rng(0)
    lo, hi = np.percentile(volume.data[mask], [0.5, 99.5])
    noisy = Volume(volume.data + rng.normal(0, 0.02 * (hi - lo), volume.shape).astype(np.float32), volume.affine)
    rep_noise = _match(pts, detect_keypoints(noisy, mask).points_vox, 2.0)
    offset = np.array([0.4, -0.3, 0.25])
    shifted = Volume(nd_shift(volume.data, offset, order=3, mode="nearest"), volume.affine)
    shifted_mask = nd_shift(mask.astype(np.float32), offset, order=1) > 0.5
    rep_shift = _match(pts, detect_keypoints(shifted, shifted_mask).points_vox - offset, 2.0)

    other = []
    world = pts @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    from scipy.ndimage import uniform_filter1d

    from brainshift.volume import Volume as _V

    mask_volume = _V(mask.astype(np.uint8), volume.affine, "label")
    for grid in ((2.0, 2.0, 2.0), (1.0, 1.0, 3.0)):
        data = volume.data
        for axis, size in enumerate(grid):
            if size > 1:
                data = uniform_filter1d(data, int(size), axis=axis)  # the voxel's box average (slice profile)
        resampled = _V(data, volume.affine).resample_to_spacing(grid)
        rmask = mask_volume.resample_like(resampled)
        cpu_start = time.process_time()
        kp_g = detect_keypoints(resampled, rmask)
        cpu = time.process_time() - cpu_start
        world_g = kp_g.points_vox @ resampled.affine[:3, :3].T + resampled.affine[:3, 3]
        recall = _match(world, world_g, 3.0)[0]
        precision = _match(world_g, world, 3.0)[0]
        other.append((grid, len(kp_g), cpu, recall, precision))

    baseline = None
    if not args.no_baseline:
        from skimage.feature import blob_dog

        start = time.perf_counter()
        blobs = blob_dog(volume.data, min_sigma=1.6, max_sigma=13.0, threshold=0.02, exclude_border=5)
        baseline = (time.perf_counter() - start, int(mask[tuple(blobs[:, :3].astype(int).T)].sum()))
    load_after = os.getloadavg()[0]

    rows = [
        ("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"1-min load {load_before:.1f} -> {load_after:.1f}"),
        ("keypoints (bright / dark)", f"{len(kp)} ({int((kp.polarity > 0).sum())} / {int((kp.polarity < 0).sum())})"),
        (f"wall time, median of {args.repeats} (runs)", f"{wall:.2f} s ({', '.join(f'{t:.2f}' for t in times)})"),
        ("CPU time of this process, median", f"{statistics.median(cpu_times):.2f} s"),
        ("scale sigma mm (p10 / p50 / p90)", " / ".join(f"{v:.1f}" for v in np.percentile(kp.scales_mm, [10, 50, 90]))),
        ("nearest-neighbour distance mm (min / median)", f"{nn.min():.1f} / {np.median(nn):.1f}"),
        ("octants of the brain bbox (min / max share)",
         f"{octants.min() / len(kp):.1%} / {octants.max() / len(kp):.1%} ({' '.join(map(str, octants))})"),
        ("keypoints at depth < 10 mm", f"{np.mean(kp_depth < 10):.1%} (brain voxels: {np.mean(brain_depth < 10):.1%}"
                                       f", of which 0-5 mm excluded: {np.mean(brain_depth < 5):.1%})"),
        ("min depth of a keypoint", f"{kp_depth.min():.1f} mm"),
        ("repeatability, 2 % noise (within 2 mm / median)", f"{rep_noise[0]:.1%} / {rep_noise[1]:.2f} mm"),
        ("repeatability, sub-voxel shift (within 2 mm / median)", f"{rep_shift[0]:.1%} / {rep_shift[1]:.2f} mm"),
    ]
    for grid, n, cpu, recall, precision in other:
        rows.append((f"MNI152 at {' x '.join(f'{g:g}' for g in grid)} mm (count / CPU / 1 mm kps re-found / "
                     "found near a 1 mm kp, 3 mm)", f"{n} / {cpu:.2f} s / {recall:.0%} / {precision:.0%}"))
    if baseline is not None:
        rows.append(("baseline skimage blob_dog (bright only, no edge test)",
                     f"{baseline[0]:.2f} s, {baseline[1]} blobs in the mask; ours / baseline time = "
                     f"{wall / baseline[0]:.2f}"))
    print("| quantity | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
