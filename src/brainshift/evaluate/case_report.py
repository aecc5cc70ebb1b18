"""QC figures and a self-contained HTML report of one case: ground truth, each method's field, its errors.

:func:`write_case_report` writes PNG figures (matplotlib, Agg canvas, no pyplot state) next to ``report.html``
and references them by relative path, so the folder opens in any browser with no network: no CDN, no web
fonts, no external script. The report holds

1. ``fig_overview.png``: orthogonal slices through the tumour / cavity centre of the preop image with the
   ground-truth displacement magnitude (mm) overlaid, the cavity (or tumour) outlined, and the keypoints
   within ``KEYPOINT_SLAB_MM`` of each slice drawn as markers (driving keypoints and held-out targets);
2. ``fig_errors.png``: per method, the error magnitude ``|A (u_method - u_gt)|`` (mm) over brain minus
   cavity, one colour scale for all methods;
3. ``fig_jacobian.png``: per method (and the ground truth), ``det J`` of ``p -> p + u(p)`` over brain minus
   cavity, diverging colour map centred at 1, folding (``det J <= 0``) outlined; the ground truth's with
   mask-aware differences inside that region (it is zero outside the brain by construction);
4. optionally ``fig_images.png``: extra images on the same slices (e.g. the intraop image and the preop
   image warped by the best method);
5. optionally ``fig_uncertainty.png``: a safeguarded method's predicted error magnitude ``sqrt(3) sigma`` (mm,
   ``sigma`` the per-component standard deviation) beside its actual error, over brain minus cavity;
6. the metrics table (``<table id="metrics">``), notes, case information, the list of output files and links
   to other pages.

Slices are named by their 0-based voxel index along the image's own axis (``sagittal, voxel i=112``); the
colour bars say where their scale clips; text in backticks is rendered as ``<code>``.

A small inline script (no network) writes ``<div id="img-status">N/M images loaded</div>`` after the page's
``load`` event, counting ``img.complete && img.naturalWidth > 0``; a headless browser's DOM dump shows it.

Display only: slices are shown in the image's nearest-RAS orientation (``nibabel.orientations.
io_orientation``): sagittal views with anterior to the right, coronal and axial views with the subject's
right on the right (neurological convention), superior / anterior up. Arrays and fields are never
reoriented outside the plotting code.

Convention: every field is float32 ``(3, I, J, K)`` on ``image``'s grid, forward Lagrangian (preop voxel
``p`` moves to ``p + u(p)``), voxel units along ``i, j, k``; keypoints are 0-based voxel ``(i, j, k)``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, KeypointError
from brainshift.volume import Volume

#: Keypoints closer than this (mm, along the slice normal) to a slice are drawn on it.
KEYPOINT_SLAB_MM = 3.0
#: Report file name.
REPORT_NAME = "report.html"
#: Figure file names (relative to the report).
FIGURES = {"overview": "fig_overview.png", "errors": "fig_errors.png", "jacobian": "fig_jacobian.png",
           "images": "fig_images.png", "uncertainty": "fig_uncertainty.png"}
#: Title of ``fig_uncertainty.png``: what its maps are, in mm.
UNCERTAINTY_TITLE = ("predicted error magnitude sqrt(3)·σ (σ: per-component SD, as in uncertainty_mm.nii.gz) beside "
                     "the actual error |u - u_gt|, in mm, over brain minus cavity")
#: Caption of ``fig_uncertainty.png`` in the report.
UNCERTAINTY_CAPTION = (
    "Uncertainty of the safeguarded refinement. Plotted: sqrt(3)·σ in mm, the expected 3-D error magnitude of an "
    "isotropic error whose standard deviation per world component is σ, beside the actual error magnitude "
    "|u - u_gt| (mm), one colour scale. σ itself, the per-voxel standard deviation per world component that "
    "`brainshift infer --save-uncertainty` writes to `uncertainty_mm.nii.gz`, is sqrt(3) ≈ 1.73 times smaller "
    "(it comes from the spread of the mirrored network passes and the distance to the nearest keypoint, scaled "
    "by the keypoints' cross-validation). Shown over brain minus cavity only: the map extends outside the brain "
    "(its distance term grows there), where the field has no meaning.")
#: Metric columns of the HTML table: row key -> header (shown when present in the rows).
TABLE_COLUMNS = {
    "mse_mm2": "MSE (mm&sup2;)",
    "mae_mm": "mean error (mm)",
    "p95_mm": "P95 error (mm)",
    "tre_mm": "TRE mean (mm)",
    "tre_median_mm": "TRE median (mm)",
    "tre_max_mm": "TRE max (mm)",
    "pct_jacobian_nonpositive": "det J &le; 0 (%)",
    "std_log_jac": "std log det J",
    "kp_residual_mm": "keypoint residual (mm)",
    "time_s": "time (s)",
}
#: Columns where lower is better (the best method's cell is marked).
_LOWER_IS_BETTER = ("mse_mm2", "mae_mm", "p95_mm", "tre_mm", "tre_median_mm", "tre_max_mm")
_VIEWS = ("sagittal", "coronal", "axial")


# --------------------------------------------------------------------------------------------- geometry


class _Display:
    """Nearest-RAS display orientation of a grid: reorients arrays and voxel points for plotting only."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray) -> None:
        from nibabel.orientations import io_orientation

        from brainshift.geometry import spacing_from_affine

        self.shape = tuple(int(s) for s in shape)
        self.ornt = io_orientation(np.asarray(affine, dtype=np.float64))  # row i: (RAS axis, +-1) of voxel axis i
        self.axis_of = np.zeros(3, dtype=int)  # display axis d <- voxel axis axis_of[d]
        for i, (d, _) in enumerate(self.ornt):
            self.axis_of[int(d)] = i
        self.spacing = spacing_from_affine(affine)[self.axis_of]  # mm along display axes x, y, z

    def array(self, a: np.ndarray) -> np.ndarray:
        """An ``(I, J, K)`` array in display order (x = left->right, y = posterior->anterior, z = up)."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(np.asarray(a), self.ornt)

    def voxel_index(self, axis: int, index: int) -> tuple[str, int]:
        """Display slice ``index`` along display ``axis`` as the image's own voxel axis and index: ``("i", 112)``
        (the display flips and permutes axes; the label names what the user finds in the file)."""
        i = int(self.axis_of[axis])
        flip = self.ornt[i][1]
        return "ijk"[i], int(index) if flip > 0 else (self.shape[i] - 1) - int(index)

    def points(self, p_vox: np.ndarray) -> np.ndarray:
        """``(N, 3)`` voxel points -> display-array indices ``(N, 3)``."""
        p = np.asarray(p_vox, dtype=np.float64).reshape(-1, 3)
        out = np.empty_like(p)
        for i, (d, flip) in enumerate(self.ornt):
            out[:, int(d)] = p[:, i] if flip > 0 else (self.shape[i] - 1) - p[:, i]
        return out


def _slices(centre: np.ndarray, disp: _Display) -> list[tuple[str, int, tuple[int, int]]]:
    """``(view, normal axis, (horizontal axis, vertical axis))`` in display axes; the view names the slice by its
    voxel index in the image file (``sagittal, voxel i=112``: 0-based, along the image's own axis)."""
    c = [int(round(v)) for v in centre]
    out = []
    for axis, (view, hv) in enumerate((("sagittal", (1, 2)), ("coronal", (0, 2)), ("axial", (0, 1)))):
        name, index = disp.voxel_index(axis, c[axis])
        out.append((f"{view}, voxel {name}={index}", axis, hv))
    return out


def _cut(a: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2-D slice of a display array, indexed ``[horizontal, vertical]``."""
    return np.take(a, index, axis=axis)


def _centre(disp: _Display, masks: Mapping[str, np.ndarray], mag: np.ndarray) -> np.ndarray:
    """Display-array centre of the cavity, else the tumour, else the largest displacement."""
    for name in ("cavity", "tumour"):
        m = masks.get(name)
        if m is not None and m.any():
            return disp.points(np.argwhere(m).mean(axis=0))[0]
    return disp.points(np.asarray(np.unravel_index(int(np.argmax(mag)), mag.shape), dtype=np.float64))[0]


# --------------------------------------------------------------------------------------------- checks


def _as_bool(mask, shape: tuple[int, ...], name: str) -> np.ndarray:
    m = np.asarray(mask.data if isinstance(mask, Volume) else mask)
    if m.shape != tuple(shape):
        raise GeometryError(f"expected mask {name!r} on the image grid {tuple(shape)}, got shape {m.shape}")
    return m > 0


def _as_points(points, name: str) -> np.ndarray:
    p = np.zeros((0, 3)) if points is None else np.asarray(points, dtype=np.float64)
    if p.size == 0:
        return np.zeros((0, 3))
    if p.ndim != 2 or p.shape[1] < 3:
        raise KeypointError(f"expected {name} of shape (N, 3) (voxel frame), got {p.shape}")
    return p[:, :3]


# --------------------------------------------------------------------------------------------- figures


def _figure(nrows: int, ncols: int, width: float = 12.0, row_height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, row_height * nrows + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path: Path) -> Path:
    from brainshift.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _show(ax, base: np.ndarray, spacing: tuple[float, float], overlay=None, **kw):
    """Grey ``base`` (2-D ``[h, v]``) with an optional masked overlay; returns the overlay's image."""
    extent = (-0.5 * spacing[0], (base.shape[0] - 0.5) * spacing[0], -0.5 * spacing[1],
              (base.shape[1] - 0.5) * spacing[1])
    lo, hi = np.percentile(base, [1, 99.5]) if base.size else (0.0, 1.0)
    ax.imshow(base.T, origin="lower", cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent,
              interpolation="nearest")
    im = None
    if overlay is not None:
        im = ax.imshow(overlay.T, origin="lower", extent=extent, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _contour(ax, mask2d: np.ndarray, spacing: tuple[float, float], color: str, lw: float = 0.9) -> None:
    if mask2d.any() and not mask2d.all():
        h = np.arange(mask2d.shape[0]) * spacing[0]
        v = np.arange(mask2d.shape[1]) * spacing[1]
        ax.contour(h, v, mask2d.T.astype(np.float32), [0.5], colors=color, linewidths=lw)


def _side_labels(ax, view_axis: int) -> None:
    """Orientation letters on a display slice (display x = R at the right, y = A up/right, z = S up): white with
    a black outline, readable on dark and light panels alike."""
    from matplotlib import patheffects

    left, right = ("P", "A") if view_axis == 0 else ("L", "R")
    kw = {"transform": ax.transAxes, "color": "w", "fontsize": 8, "fontweight": "bold",
          "path_effects": [patheffects.withStroke(linewidth=2.0, foreground="k")]}
    ax.text(0.01, 0.5, left, ha="left", va="center", **kw)
    ax.text(0.99, 0.5, right, ha="right", va="center", **kw)
    ax.text(0.5, 0.99, "A" if view_axis == 2 else "S", ha="center", va="top", **kw)


def _overview_figure(path: Path, t1, mag, brain, outline, outline_name, disp: _Display, centre, kp, held):
    views = _slices(centre, disp)
    fig, axes = _figure(1, 3, row_height=4.2)
    vmax = max(float(np.percentile(mag[brain], 99.9)) if brain.any() else float(mag.max()), 1e-3)
    im = None
    shown = {"held": 0, "kp": 0}
    styles = {"held": {"marker": "x", "color": "#7fdbff", "s": 22, "linewidths": 1.0},
              "kp": {"marker": "o", "facecolors": "#39ff14", "edgecolors": "k", "s": 34, "linewidths": 0.8}}
    for ax, (name, axis, (h, v)) in zip(axes[0], views, strict=True):
        idx = int(round(centre[axis]))
        sp = (float(disp.spacing[h]), float(disp.spacing[v]))
        ov = np.ma.masked_where(~_cut(brain, axis, idx), _cut(mag, axis, idx))
        im = _show(ax, _cut(t1, axis, idx), sp, ov, cmap="inferno", alpha=0.65, vmin=0.0, vmax=vmax)
        _contour(ax, _cut(outline, axis, idx), sp, "cyan")
        for key, pts in (("held", held), ("kp", kp)):  # driving keypoints drawn last (on top)
            near = np.abs(pts[:, axis] - idx) * disp.spacing[axis] <= KEYPOINT_SLAB_MM
            if near.any():
                ax.scatter(pts[near, h] * sp[0], pts[near, v] * sp[1], zorder=3, **styles[key])
            shown[key] += int(near.sum())
        _side_labels(ax, axis)
        ax.set_title(name, fontsize=10)
    n_kp, n_held = shown["kp"], shown["held"]
    fig.colorbar(im, ax=list(axes[0]), shrink=0.85, label="ground-truth displacement (mm)")
    fig.suptitle(f"preop image, ground-truth displacement magnitude; {outline_name} outlined (cyan); "
                 f"keypoints within {KEYPOINT_SLAB_MM:g} mm of a slice: driving (green o), held-out (blue x)",
                 fontsize=9)
    return _save(fig, path), n_kp, n_held


def _errors_figure(path: Path, t1, errors: dict[str, np.ndarray], region, outline, disp: _Display, centre,
                   label: str = "error |u - u_gt| (mm)",
                   title: str = "error magnitude against the ground truth over brain minus cavity (cavity outlined)"):
    views = _slices(centre, disp)
    names = list(errors)
    fig, axes = _figure(len(names), 3)
    vals = np.concatenate([e[region] for e in errors.values()]) if region.any() else np.zeros(1)
    vmax = max(float(np.percentile(vals, 99.5)), 1e-3)
    # blank the image inside the excluded cavity: its bright tumour rim would read as the top of the error scale
    t1 = np.where(outline & ~region, float(np.min(t1)), t1)
    im = None
    for r, name in enumerate(names):
        for ax, (view, axis, (h, v)) in zip(axes[r], views, strict=True):
            idx = int(round(centre[axis]))
            sp = (float(disp.spacing[h]), float(disp.spacing[v]))
            ov = np.ma.masked_where(~_cut(region, axis, idx), _cut(errors[name], axis, idx))
            im = _show(ax, _cut(t1, axis, idx), sp, ov, cmap="magma", vmin=0.0, vmax=vmax)
            _contour(ax, _cut(outline, axis, idx), sp, "cyan")
            ax.set_title(f"{name}: {view}", fontsize=9)
            _side_labels(ax, axis)
        med = float(np.median(errors[name][region])) if region.any() else float("nan")
        axes[r][0].set_ylabel(f"{name}\nmedian {med:.2f} mm", fontsize=9)
    fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.8,
                 label=f"{label}, one scale, clipped at {vmax:.2f} mm")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _jacobian_figure(path: Path, t1, dets: dict[str, np.ndarray], region, outline, disp: _Display, centre):
    from matplotlib.colors import TwoSlopeNorm

    views = _slices(centre, disp)
    names = list(dets)
    fig, axes = _figure(len(names), 3)
    dev = np.concatenate([np.abs(d[region] - 1.0) for d in dets.values()]) if region.any() else np.zeros(1)
    r = float(np.clip(np.percentile(dev, 99.5), 0.02, 1.0))
    norm = TwoSlopeNorm(vmin=1.0 - r, vcenter=1.0, vmax=1.0 + r)
    im = None
    for row, name in enumerate(names):
        det = dets[name]
        for ax, (view, axis, (h, v)) in zip(axes[row], views, strict=True):
            idx = int(round(centre[axis]))
            sp = (float(disp.spacing[h]), float(disp.spacing[v]))
            ov = np.ma.masked_where(~_cut(region, axis, idx), _cut(det, axis, idx))
            im = _show(ax, _cut(t1, axis, idx), sp, ov, cmap="RdBu_r", norm=norm)
            _contour(ax, _cut(outline, axis, idx), sp, "k", lw=0.8)
            _contour(ax, _cut((det <= 0) & region, axis, idx), sp, "lime", lw=1.2)
            ax.set_title(f"{name}: {view}", fontsize=9)
            _side_labels(ax, axis)
        pct = 100.0 * float(np.mean(det[region] <= 0)) if region.any() else float("nan")
        axes[row][0].set_ylabel(f"{name}\ndet J <= 0: {pct:.3f} %", fontsize=9)
    fig.colorbar(im, ax=[a for rr in axes for a in rr], shrink=0.8, label=_jacobian_label(dev, r))
    fig.suptitle("Jacobian determinant over brain minus cavity (blue: compression, red: expansion; folding "
                 "outlined in green, cavity in black)", fontsize=10)
    return _save(fig, path)


def _jacobian_label(dev: np.ndarray, r: float) -> str:
    """The Jacobian colour bar's label: the scale ``1 +- r`` and, when some ``|det J - 1|`` of ``dev`` exceeds
    ``r``, that it clips and how many voxels (all maps together) lie beyond."""
    n_out = int(np.count_nonzero(dev > r))
    label = "Jacobian determinant (1 = volume kept)"
    if n_out:
        label += (f", one scale, clipped to [{1.0 - r:.2f}, {1.0 + r:.2f}] "
                  f"({100.0 * n_out / max(dev.size, 1):.2g} % of voxels beyond)")
    return label


def _images_figure(path: Path, images: dict[str, np.ndarray], disp: _Display, centre):
    views = _slices(centre, disp)
    names = list(images)
    fig, axes = _figure(len(names), 3)
    for row, name in enumerate(names):
        for ax, (view, axis, (h, v)) in zip(axes[row], views, strict=True):
            idx = int(round(centre[axis]))
            _show(ax, _cut(images[name], axis, idx), (float(disp.spacing[h]), float(disp.spacing[v])))
            ax.set_title(f"{name}: {view}", fontsize=9)
            _side_labels(ax, axis)
    fig.suptitle("images on the same slices", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- HTML

_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #e6f4e6; }
table.info td { text-align: left; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 0.8em; margin: 0.5em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #444; }
#img-status { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var el = document.getElementById('img-status');
  el.textContent = ok + '/' + imgs.length + ' images loaded';
  el.setAttribute('data-loaded', String(ok));
  el.setAttribute('data-total', String(imgs.length));
});
"""


def _fmt(v) -> str:
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = float(v)
        if not math.isfinite(v):
            return "-"
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 100 else f"{v:.1f}"
    return html.escape(str(v))


def _text(value) -> str:
    """``value`` as HTML text: escaped, with `` `code` `` spans rendered as ``<code>`` (never shown as literal
    backticks)."""
    import re

    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(value)))


def metrics_table_html(rows: Sequence[Mapping]) -> str:
    """The metrics rows as ``<table id="metrics">``: one line per method, columns of :data:`TABLE_COLUMNS`
    present in the rows; the lowest error of each error column is marked ``class="best"``."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    best = {}
    for c in cols:
        if c in _LOWER_IS_BETTER:
            vals = [(float(r[c]), i) for i, r in enumerate(rows)
                    if c in r and r.get("method") != "none" and math.isfinite(float(r[c]))]
            if vals:
                best[c] = min(vals)[1]
    out = ['<table id="metrics">', "<thead><tr><th>method</th>"
           + "".join(f"<th>{TABLE_COLUMNS[c]}</th>" for c in cols) + "</tr></thead>", "<tbody>"]
    for i, r in enumerate(rows):
        cells = [f"<td>{html.escape(str(r.get('method', '')))}</td>"]
        for c in cols:
            cls = ' class="best"' if best.get(c) == i else ""
            cells.append(f"<td{cls}>{_fmt(r[c]) if c in r else '-'}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>"]
    return "\n".join(out)


def _info_html(info: Mapping) -> str:
    rows = []
    for k, v in info.items():
        if k in ("title", "notes", "files", "summary", "links"):
            continue
        if isinstance(v, float | np.floating):
            text = _fmt(v)
        elif isinstance(v, list | tuple) and all(isinstance(x, float | int | np.number) for x in v):
            text = "(" + ", ".join(_fmt(x) for x in v) + ")"
        elif isinstance(v, Mapping):
            text = "; ".join(f"{html.escape(str(a))}: {_fmt(b)}" for a, b in v.items())
        else:
            text = _text(v)
        rows.append(f"<tr><td>{html.escape(str(k))}</td><td>{text}</td></tr>")
    return '<table class="info">\n' + "\n".join(rows) + "\n</table>" if rows else ""


def _files_html(files: Sequence) -> str:
    items = []
    for f in files:
        if isinstance(f, tuple | list):
            name, what = str(f[0]), str(f[1])
        else:
            name, what = str(f), ""
        rel = Path(name).as_posix()
        link = f'<a href="{html.escape(rel, quote=True)}"><code>{html.escape(rel)}</code></a>'
        items.append(f"<li>{link}{' &mdash; ' + _text(what) if what else ''}</li>")
    return "<ul>\n" + "\n".join(items) + "\n</ul>" if items else ""


def _img(name: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(name, quote=True)}" alt="{html.escape(alt, quote=True)}">'
            f"<figcaption>{_text(caption)}</figcaption></figure>")


# --------------------------------------------------------------------------------------------- public


def write_case_report(out_dir: str | Path, *, image: Volume, gt_field: np.ndarray, fields: Mapping[str, np.ndarray],
                 keypoints: np.ndarray, heldout: np.ndarray | None, rows: Sequence[Mapping],
                 masks: Mapping[str, np.ndarray | Volume], info: Mapping | None = None,
                 images: Mapping[str, Volume | np.ndarray] | None = None,
                 uncertainty: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write the QC figures and ``report.html`` (module docstring) into ``out_dir``.

    Args:
        out_dir: folder (created); figures ``fig_*.png`` and ``report.html`` are written there, atomically.
        image: the preop intensity image (the grid of every field and mask).
        gt_field: ``(3, I, J, K)`` ground-truth field.
        fields: method name -> ``(3, I, J, K)`` predicted field (at least one).
        keypoints: ``(N, 3)`` driving keypoints, 0-based voxel ``(i, j, k)`` (extra columns are ignored).
        heldout: ``(M, 3)`` held-out target keypoints (voxel frame) or None.
        rows: metrics rows, one dict per method with ``method`` and any of :data:`TABLE_COLUMNS`.
        masks: ``brain`` (required), optional ``tumour`` and ``cavity`` (the resected region, left out of the
            error maps): ``(I, J, K)`` arrays or label Volumes on the image grid.
        info: optional ``title`` (str), ``notes`` (list of str, shown highlighted at the top), ``summary``
            (str, a paragraph), ``files`` (list of ``name`` or ``(name, description)`` relative to
            ``out_dir``, linked), ``links`` (the same, other pages: "See also") and any other key -> value shown
            in the "case" table. Text in backticks is shown as code.
        images: optional extra images on the image grid (name -> Volume or array) shown on the same slices.
        uncertainty: optional method name -> ``(I, J, K)`` per-voxel standard deviation (mm per world component,
            :mod:`brainshift.model.safeguards`); plotted as the expected error magnitude ``sqrt(3) sigma`` (mm, said
            so in the figure and its caption) beside that method's actual error, one colour scale, over brain minus
            cavity only (``fig_uncertainty.png``).

    Returns:
        The path of ``report.html``.

    Raises:
        GeometryError: a field or mask not on the image grid, no brain mask, or no field.
        KeypointError: keypoints not ``(N, 3)``.

    Convention: fields forward Lagrangian, voxel units along ``i, j, k`` of ``image``'s grid.
    """
    from brainshift.field import check_field, displacement_magnitude_mm, field_voxel_to_ras, jacobian_determinant
    from brainshift.io.atomic import atomic_output

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    shape = image.shape
    if "brain" not in masks:
        raise GeometryError(f"expected a 'brain' mask among the report masks, got {sorted(masks)}")
    if not fields:
        raise GeometryError("expected at least one method field for the report, got none")
    if not rows:
        raise BrainshiftError("expected at least one metrics row for the report, got none")
    m = {k: _as_bool(v, shape, k) for k, v in masks.items() if v is not None}
    gt = check_field(gt_field, shape)
    preds = {name: check_field(f, shape) for name, f in fields.items()}
    kp = _as_points(keypoints, "keypoints")
    held = _as_points(heldout, "heldout")
    brain = m["brain"]
    cavity = m.get("cavity", np.zeros(shape, dtype=bool))
    region = brain & ~cavity

    disp = _Display(shape, image.affine)
    t1 = disp.array(np.asarray(image.data, dtype=np.float32))
    mag = displacement_magnitude_mm(gt, image.affine)
    centre = _centre(disp, m, mag)
    outline_name = "cavity" if cavity.any() else "tumour"
    outline = disp.array(cavity if cavity.any() else m.get("tumour", np.zeros(shape, dtype=bool)))
    d_brain, d_region = disp.array(brain), disp.array(region)

    _, n_kp, n_held = _overview_figure(out / FIGURES["overview"], t1, disp.array(mag), d_brain, outline,
                                       outline_name, disp, centre, disp.points(kp), disp.points(held))
    gt_ras = field_voxel_to_ras(gt, image.affine)
    errors = {name: disp.array(np.sqrt(((field_voxel_to_ras(f, image.affine) - gt_ras) ** 2).sum(axis=0)))
              for name, f in preds.items()}
    del gt_ras
    _errors_figure(out / FIGURES["errors"], t1, errors, d_region, outline, disp, centre)
    unc_fig = None
    if uncertainty:
        pairs = {}
        for name, sig in uncertainty.items():
            sig = np.asarray(sig, dtype=np.float32)
            if sig.shape != shape:
                raise GeometryError(f"expected the uncertainty map of {name!r} on the image grid {shape}, got "
                                    f"{sig.shape}")
            pairs[f"{name}: predicted sqrt(3)·σ"] = disp.array(np.sqrt(3.0) * sig)
            if name in errors:
                pairs[f"{name}: actual |u - u_gt|"] = errors[name]
        unc_fig = _errors_figure(out / FIGURES["uncertainty"], t1, pairs, d_region, outline, disp, centre,
                                 label="mm: predicted error magnitude sqrt(3)·σ, or actual error |u - u_gt|",
                                 title=UNCERTAINTY_TITLE)
    del errors
    # the ground truth is defined in the brain only (zero outside): mask-aware differences, so its map does not
    # show the non-physical rim that central differences across that cut produce
    dets = {"ground truth": disp.array(jacobian_determinant(gt, mask=region))}
    dets.update({name: disp.array(jacobian_determinant(f)) for name, f in preds.items()})
    _jacobian_figure(out / FIGURES["jacobian"], t1, dets, d_region, outline, disp, centre)
    del dets
    figs = [
        _img(FIGURES["overview"], "Orthogonal slices of the preop image with the ground-truth displacement "
             "magnitude overlaid and keypoints marked",
             f"Preop image with the ground-truth displacement magnitude (mm); slices through the {outline_name} "
             f"centre; {n_kp} driving keypoint(s) and {n_held} held-out target(s) lie within "
             f"{KEYPOINT_SLAB_MM:g} mm of a slice."),
        _img(FIGURES["errors"], "Error magnitude maps of each method against the ground truth",
             "Error magnitude |u - u_gt| (mm) of each method over brain minus cavity, one colour scale."),
        _img(FIGURES["jacobian"], "Jacobian determinant maps of the ground truth and of each method",
             "Jacobian determinant of each field over brain minus cavity (diverging colour map centred at 1); "
             "folding (det J <= 0) outlined in green."),
    ]
    if unc_fig is not None:
        figs.append(_img(FIGURES["uncertainty"], "Predicted uncertainty maps beside the actual error maps",
                         UNCERTAINTY_CAPTION))
    if images:
        arrs = {}
        for name, vol in images.items():
            a = np.asarray(vol.data if isinstance(vol, Volume) else vol, dtype=np.float32)
            if a.shape != tuple(shape):
                raise GeometryError(f"expected image {name!r} on the image grid {tuple(shape)}, got {a.shape}")
            arrs[name] = disp.array(a)
        _images_figure(out / FIGURES["images"], arrs, disp, centre)
        figs.append(_img(FIGURES["images"], "Extra images on the same slices: " + ", ".join(arrs),
                         "Images on the same slices: " + ", ".join(arrs) + "."))

    path = out / REPORT_NAME
    with atomic_output(path) as tmp:
        tmp.write_text(_html_page(info, rows, figs), encoding="utf-8")
    return path


def _html_page(info: Mapping, rows: Sequence[Mapping], figs: list[str]) -> str:
    """The text of ``report.html``: title, notes, summary, metrics table, figures, case and file tables."""
    title = str(info.get("title", "brainshift report"))
    notes = [str(n) for n in info.get("notes", [])]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>{html.escape(title)}</h1>",
        *[f'<p class="note">{_text(n)}</p>' for n in notes],
    ]
    if info.get("summary"):
        parts.append(f"<p>{_text(info['summary'])}</p>")
    parts += ["<h2>Metrics</h2>", metrics_table_html(rows),
              "<p>MSE, mean and P95 error: Euclidean error in world mm over brain minus cavity; TRE at the held-out "
              "keypoints; det J &le; 0: percentage of folded voxels over brain minus cavity; keypoint residual: mean "
              "distance between a field at the driving keypoints and their displacements (0 for a method that "
              "honours them); time: interpolation (or atlas fit, and refinement) wall time. The lowest error per "
              "column is highlighted.</p>",
              "<h2>Figures</h2>", '<div id="img-status">images not checked yet</div>', *figs]
    case_table = _info_html(info)
    if case_table:
        parts += ["<h2>Case</h2>", case_table]
    files = _files_html(info.get("files", []))
    if files:
        parts += ["<h2>Files</h2>", files]
    links = _files_html(info.get("links", []))
    if links:
        parts += ["<h2>See also</h2>", links]
    parts += ["<p>Display: slices in the nearest-RAS orientation of the image (subject's right on the right, "
              "anterior / superior up). Fields: forward Lagrangian, preop voxel p moves to p + u(p).</p>",
              f"<script>{_SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
