"""Benchmark field inversion, warping and field file I/O on the published grid (160 x 192 x 144, 1 mm).

Usage::

    .venv/bin/python bench/fields_io.py [--repeats 3] [--shape 160 192 144] [--markdown]

The field is a smooth analytic brain sag (peak ~5 mm toward inferior plus a lateral ripple) inside an
ellipsoid with semi-axes 0.4 x the grid, zero outside. Rows:

- inversion: brainshift's :func:`invert_field` settings (SimpleITK ``InvertDisplacementField``, 50 iterations,
  max tolerance 0.01 mm, mean tolerance 1e-6 mm), the same filter with SimpleITK's defaults (10 iterations,
  0.1 / 0.001 mm) and ``IterativeInverseDisplacementField`` (5 and 20 iterations). Accuracy inside the
  ellipsoid: ``grid`` = max over intraop voxels y of ``|x + u(x) - y|`` with ``x = y + v(y)`` (what the
  filters solve), ``composed`` = max over preop voxels p of ``|y + v(y) - p|`` with ``y = p + u(p)`` (v
  linearly interpolated), both in mm.
- warp: :func:`warp_image` of a float32 image with the inverse given.
- write / read of the field in each format, with the file size, for the sag field and for a dense TPS field
  (non-zero everywhere, like the fields ``infer`` writes); ``.h5`` four ways: SimpleITK float64 (the writer
  before issue 12), h5py float64, float32 uncompressed (``infer``'s default), float32 gzip level 1 + shuffle.
- baseline: one ``scipy.ndimage.map_coordinates`` trilinear resampling of a float32 volume on the grid, in the
  same run, so that timings on a busy shared machine can be compared as ratios.

Timings are medians of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def sag_field(shape, affine, sag_mm=5.0):
    """Smooth forward field (voxel units) and the ellipsoid mask where it is non-zero."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    centre = (np.array(shape) - 1) / 2.0
    r2 = (((idx - centre) / (np.array(shape) * 0.4)) ** 2).sum(-1)
    bump = ((np.exp(-1.5 * r2) - np.exp(-1.5)) / (1 - np.exp(-1.5))).clip(min=0)
    d_ras = np.zeros(shape + (3,))
    d_ras[..., 2] = -sag_mm * bump
    d_ras[..., 0] = 0.3 * sag_mm * bump * np.sin(idx[..., 1] / 20.0)
    field = np.einsum("ab,ijkb->aijk", np.linalg.inv(affine[:3, :3]), d_ras).astype(np.float32)
    return field, r2 < 1.0


def timed(fn, repeats):
    fn()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def accuracy(field, inverse, mask, affine):
    from scipy.ndimage import map_coordinates

    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    y = np.argwhere(mask)[::7].T.astype(np.float64)
    x = y + inverse[:, mask][:, ::7]
    res = x + np.stack([map_coordinates(field[c], x, order=1) for c in range(3)]) - y
    grid = float(np.sqrt(((res * spacing[:, None]) ** 2).sum(0)).max())
    p = y
    yp = p + field[:, mask][:, ::7]
    back = yp + np.stack([map_coordinates(inverse[c], yp, order=1) for c in range(3)]) - p
    composed = float(np.sqrt(((back * spacing[:, None]) ** 2).sum(0)).max())
    return grid, composed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 192, 144))
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)

    import SimpleITK as sitk
    from scipy.ndimage import map_coordinates

    from brainshift.io import fields
    from brainshift.volume import Volume

    shape = tuple(args.shape)
    affine = np.eye(4)
    affine[:3, 3] = -np.array(shape) / 2.0
    field, mask = sag_field(shape, affine)
    rows = []

    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")) + field
    t, _ = timed(lambda: map_coordinates(img, coords, order=1), args.repeats)
    base = t
    rows.append(("baseline: scipy map_coordinates trilinear", t, "", ""))

    t, inv = timed(lambda: fields.invert_field(field, affine), args.repeats)
    g, c = accuracy(field, inv, mask, affine)
    rows.append(("invert_field (InvertDisplacementField 50 it, 0.01 / 1e-6 mm)", t, f"{g:.4f}", f"{c:.4f}"))

    image = fields._field_image(field, affine)

    def sitk_inverse(fn):
        out, _ = fields._field_from_image(fn())
        return out

    for label, fn in [
        ("InvertDisplacementField defaults (10 it, 0.1 / 0.001 mm)", lambda: sitk.InvertDisplacementField(image)),
        ("IterativeInverseDisplacementField 5 it", lambda: sitk.IterativeInverseDisplacementField(image, 5, 0.0)),
        ("IterativeInverseDisplacementField 20 it", lambda: sitk.IterativeInverseDisplacementField(image, 20, 0.0)),
    ]:
        t, v = timed(lambda fn=fn: sitk_inverse(fn), max(1, args.repeats - 2))
        g, c = accuracy(field, v, mask, affine)
        rows.append((label, t, f"{g:.4f}", f"{c:.4f}"))

    vol = Volume(img, affine)
    t, _ = timed(lambda: fields.warp_image(vol, field, affine, inverse_field=inv), args.repeats)
    rows.append(("warp_image (inverse given, linear)", t, "", ""))

    # a dense field, non-zero everywhere like the interpolated fields infer writes: TPS of 20 keypoints
    from brainshift.interpolate import interpolate

    rng = np.random.default_rng(0)
    kp = rng.uniform(10, np.array(shape) - 10, size=(20, 3))
    dense = np.asarray(interpolate("tps", kp, rng.normal(0, 2.0, size=(20, 3)), shape, affine), np.float32)

    def write_h5_sitk_float64(path, f):  # the writer before issue 12: SimpleITK, float64, uncompressed
        sitk.WriteTransform(fields.field_to_sitk_transform(f, affine), str(path))

    writers = [
        (".h5", "float64 SimpleITK (before)", write_h5_sitk_float64),
        (".h5", "float64 h5py", lambda p, f: fields.write_field(p, f, affine, h5_dtype="float64", compression=0)),
        (".h5", "float32 (infer default)", lambda p, f: fields.write_field(p, f, affine, compression=0)),
        (".h5", "float32 gzip 1 (write_field default)", lambda p, f: fields.write_field(p, f, affine)),
        (".nii.gz", "", lambda p, f: fields.write_field(p, f, affine)),
        (".nii", "", lambda p, f: fields.write_field(p, f, affine)),
        (".npz", "", lambda p, f: fields.write_field(p, f, affine)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for fname, f in (("sag (zero outside an ellipsoid)", field), ("dense TPS", dense)):
            for ext, label, writer in writers:
                path = Path(tmp) / f"field{ext}"
                t_w, _ = timed(lambda path=path, writer=writer, f=f: writer(path, f), args.repeats)
                size = os.path.getsize(path) / 2**20
                t_r, _ = timed(lambda path=path: fields.read_field(path), args.repeats)
                rows.append((f"{fname}: write {ext} {label} ({size:.1f} MiB)", t_w, "", ""))
                rows.append((f"{fname}: read {ext} {label}", t_r, "", ""))

    print(f"# fields_io benchmark: grid {shape}, 1 mm, repeats {args.repeats}; {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, SimpleITK {sitk.Version.VersionString()}")
    if args.markdown:
        print("| step | median s | x baseline | max residual on grid (mm) | max forward-then-inverse error (mm) |")
        print("|---|---|---|---|---|")
        for name, t, g, c in rows:
            print(f"| {name} | {t:.2f} | {t / base:.1f} | {g} | {c} |")
    else:
        for name, t, g, c in rows:
            print(f"{name:70s} {t:7.2f} s  x{t / base:5.1f}  {g:>8s} {c:>8s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
