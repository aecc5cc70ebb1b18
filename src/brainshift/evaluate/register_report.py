"""The QC report of ``brainshift register``: matches on both images, differences and checkerboards, the field.

:func:`register_report` renders, in memory (matplotlib Agg canvas, no pyplot state), the PNG figures and the
self-contained ``report.html`` that references them by relative path (no network); the caller writes them
(``brainshift register`` through its all-or-nothing output set). Figures, on orthogonal slices through the
voxel of largest displacement, in the nearest-RAS display orientation of :mod:`brainshift.evaluate.case_report`
(whose display helpers, page style and load-check script are reused):

1. ``fig_matches.png``: top row, the preop image with the inlier keypoints within ``KEYPOINT_SLAB_MM`` of each
   slice and their displacements as arrows (in-plane components, true length in mm); bottom row, the intraop
   image resampled onto the preop grid (world coordinates) with the matched intraop keypoints;
2. ``fig_compare.png``: ``intraop - preop`` before registration, ``intraop - warped preop`` after (the preop
   image pulled into intraop space by the field), and the checkerboards (``CHECKER_MM`` squares) of the same
   pairs; intensities are each divided by their 99th percentile in the brain mask first (the intraop image has
   another scale and a bias field). Each difference is shown only inside the preop brain as that image has it:
   the brain mask before, the brain mask carried by the field (``warped_mask``) after. Outside it one of the two
   images is background (a skull-stripped preop image is 0 where the intraop image shows the fluid that fills
   the gap left by the sinking brain, or the skull), and its difference would read as a registration error;
3. ``fig_field.png``: the displacement magnitude (mm) over the preop image, the brain mask outlined.

Convention: fields float32 ``(3, I, J, K)`` on the preop grid, forward Lagrangian (preop voxel ``p`` moves to
``p + u(p)``), voxel units along ``i, j, k``; keypoints 0-based preop voxel ``(i, j, k)``.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping

import numpy as np

from brainshift.evaluate.case_report import (
    _SCRIPT,
    _STYLE,
    KEYPOINT_SLAB_MM,
    REPORT_NAME,
    _contour,
    _cut,
    _Display,
    _figure,
    _files_html,
    _img,
    _info_html,
    _show,
    _side_labels,
    _slices,
    _text,
)
from brainshift.volume import Volume

#: Side (mm) of the checkerboard squares.
CHECKER_MM = 12.0
#: Figure file names.
FIGURES = {"matches": "fig_matches.png", "compare": "fig_compare.png", "field": "fig_field.png"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _normalised(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    v = a[mask] if mask.any() else a.ravel()
    scale = float(np.percentile(v, 99)) if v.size else 1.0
    return (a / scale if scale > 0 else a).astype(np.float32)


def _checker(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    idx = np.indices(a.shape)
    tiles = sum((idx[d] * spacing[d] // CHECKER_MM).astype(int) for d in range(3)) % 2
    return np.where(tiles == 0, a, b)


def _points_on_slice(disp: _Display, p_vox: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Indices of the points within ``KEYPOINT_SLAB_MM`` of display slice ``index`` along ``axis``."""
    if len(p_vox) == 0:
        return np.zeros(0, dtype=int)
    d = disp.points(p_vox)
    return np.nonzero(np.abs(d[:, axis] - index) * disp.spacing[axis] <= KEYPOINT_SLAB_MM)[0]


def _matches_figure(disp, centre, pre, intra, points_vox, disps_vox):
    views = _slices(centre, disp)
    fig, axes = _figure(2, 3)
    targets = points_vox + disps_vox
    for col, (view, axis, (h, v)) in enumerate(views):
        idx = int(round(centre[axis]))
        sp = (float(disp.spacing[h]), float(disp.spacing[v]))
        sel = _points_on_slice(disp, points_vox, axis, idx)
        a = disp.points(points_vox[sel]) * disp.spacing
        b = disp.points(targets[sel]) * disp.spacing
        ax = axes[0][col]
        _show(ax, _cut(pre, axis, idx), sp)
        ax.scatter(a[:, h], a[:, v], s=9, c="#00e5ff", edgecolors="k", linewidths=0.3)
        if len(sel):
            ax.quiver(a[:, h], a[:, v], b[:, h] - a[:, h], b[:, v] - a[:, v], angles="xy", scale_units="xy",
                      scale=1.0, color="#ffcc00", width=0.006)
        ax.set_title(f"preop: {view} ({len(sel)} matches)", fontsize=9)
        _side_labels(ax, axis)
        ax = axes[1][col]
        _show(ax, _cut(intra, axis, idx), sp)
        sel_b = _points_on_slice(disp, targets, axis, idx)
        bb = disp.points(targets[sel_b]) * disp.spacing
        ax.scatter(bb[:, h], bb[:, v], s=9, c="#ff4fd8", edgecolors="k", linewidths=0.3)
        ax.set_title(f"intraop (on the preop grid): {view} ({len(sel_b)} matches)", fontsize=9)
        _side_labels(ax, axis)
    fig.suptitle("inlier matches: preop keypoints with their displacements (top), matched intraop keypoints "
                 "(bottom)", fontsize=10)
    return _png(fig)


#: Title of ``fig_compare.png``.
COMPARE_TITLE = ("before / after registration, intensities normalised to their 99th percentile in the brain; "
                 "differences inside the brain only (grey: outside)")
#: Caption of ``fig_compare.png`` in the report.
COMPARE_CAPTION = (
    "Difference and checkerboard images before and after registration, intensities each normalised to their 99th "
    "percentile in the brain. The differences are shown only inside the brain: the preop brain mask for intraop - "
    "preop, the same mask carried into intraop space by the field for intraop - warped preop; outside it (grey) one "
    "image is background (a skull-stripped preop image is 0 where the intraop image shows the fluid filling the gap "
    "left by the sinking brain at the craniotomy), so a difference there says nothing about the registration. A "
    "resection cavity (fluid in the intraop image, tissue in the preop one) remains a real difference.")


def compare_panels(pre_n: np.ndarray, intra_n: np.ndarray, warped_n: np.ndarray, mask: np.ndarray,
                   warped_mask: np.ndarray, spacing) -> dict[str, tuple[np.ndarray, dict]]:
    """The rows of ``fig_compare.png`` on the preop grid: name -> ``(array, imshow options)``. The differences are
    masked arrays, shown only inside the brain: ``intraop - preop`` inside ``mask`` (the preop brain),
    ``intraop - warped preop`` inside ``warped_mask`` (that brain carried into intraop space by the field); the
    checkerboards are plain arrays (options empty: grey)."""
    diff_kw = {"cmap": "RdBu_r", "vmin": -0.5, "vmax": 0.5}
    m, wm = np.asarray(mask, dtype=bool), np.asarray(warped_mask, dtype=bool)
    return {"intraop - preop (before)": (np.ma.masked_where(~m, intra_n - pre_n), diff_kw),
            "intraop - warped preop (after)": (np.ma.masked_where(~wm, intra_n - warped_n), diff_kw),
            "checkerboard before": (_checker(pre_n, intra_n, spacing), {}),
            "checkerboard after": (_checker(warped_n, intra_n, spacing), {})}


def _compare_figure(disp, centre, rows: dict[str, tuple[np.ndarray, dict]]):
    """Rows ``name -> (display array, imshow options)`` (:func:`compare_panels`, in display order): a difference row
    (options given) is drawn where it is not masked, on grey."""
    views = _slices(centre, disp)
    fig, axes = _figure(len(rows), 3)
    for r, (name, (arr, kw)) in enumerate(rows.items()):
        for col, (view, axis, (h, v)) in enumerate(views):
            idx = int(round(centre[axis]))
            ax = axes[r][col]
            sp = (float(disp.spacing[h]), float(disp.spacing[v]))
            if kw:
                a2 = _cut(arr, axis, idx)
                ax.set_facecolor("0.75")  # masked voxels: grey, neither a difference colour nor white
                im = ax.imshow(a2.T, origin="lower", interpolation="nearest",
                               extent=(-0.5 * sp[0], (arr.shape[h] - 0.5) * sp[0], -0.5 * sp[1],
                                       (arr.shape[v] - 0.5) * sp[1]), **kw)
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 2:
                    fig.colorbar(im, ax=ax, shrink=0.8, label="normalised difference (clipped at ±0.5)")
            else:
                _show(ax, _cut(arr, axis, idx), sp)
            ax.set_title(f"{name}: {view}", fontsize=9)
            _side_labels(ax, axis)
    fig.suptitle(COMPARE_TITLE, fontsize=9)
    return _png(fig)


def _display_masked(disp, a):
    """``a`` (a plain or masked ``(I, J, K)`` array) in display order, its mask carried along."""
    if np.ma.isMaskedArray(a):
        return np.ma.masked_array(disp.array(np.ma.getdata(a)), mask=disp.array(np.ma.getmaskarray(a)))
    return disp.array(a)


def _field_figure(disp, centre, pre, mag, mask):
    views = _slices(centre, disp)
    fig, axes = _figure(1, 3)
    vmax = float(np.percentile(mag[mask], 99.9)) if mask.any() else float(mag.max())
    for col, (view, axis, (h, v)) in enumerate(views):
        idx = int(round(centre[axis]))
        sp = (float(disp.spacing[h]), float(disp.spacing[v]))
        ax = axes[0][col]
        m2 = _cut(mask, axis, idx)
        im = _show(ax, _cut(pre, axis, idx), sp, overlay=np.ma.masked_where(~m2, _cut(mag, axis, idx)),
                   cmap="inferno", vmin=0, vmax=max(vmax, 1e-6), alpha=0.75)
        _contour(ax, m2, sp, "#00e5ff")
        ax.set_title(f"|u| (mm): {view}", fontsize=9)
        _side_labels(ax, axis)
        if col == 2:
            fig.colorbar(im, ax=ax, shrink=0.8, label="mm")
    fig.suptitle("displacement magnitude of the final field (brain mask outlined)", fontsize=10)
    return _png(fig)


def register_report(preop: Volume, intraop_on_preop: np.ndarray, warped_preop: np.ndarray, field_vox: np.ndarray,
                    points_vox: np.ndarray, disps_vox: np.ndarray, mask: np.ndarray, info: Mapping, *,
                    warped_mask: np.ndarray | None = None) -> dict[str, bytes]:
    """The figures and ``report.html`` of a registration (module docstring), as ``{file name: bytes}``.

    Args:
        preop: the preop image (defines the grid).
        intraop_on_preop: ``(I, J, K)`` the intraop image resampled onto the preop grid (world coordinates).
        warped_preop: ``(I, J, K)`` the preop image pulled into intraop space by the final field (on the preop grid).
        field_vox: ``(3, I, J, K)`` the final field.
        points_vox: ``(M, 3)`` inlier preop keypoints (preop voxel frame).
        disps_vox: ``(M, 3)`` their displacements (preop voxel units).
        mask: ``(I, J, K)`` brain mask.
        info: ``title``, ``summary``, ``notes``, ``files`` and case facts for the page (as in
            :func:`brainshift.evaluate.case_report.write_case_report`).
        warped_mask: ``(I, J, K)`` the brain mask pulled into intraop space by the same field (as
            ``warped_preop``), where the "after" difference is shown; None: ``mask`` (only right for a small field).

    Returns:
        ``{"fig_matches.png": ..., "fig_compare.png": ..., "fig_field.png": ..., "report.html": ...}``.

    Convention: ``field_vox`` forward Lagrangian, voxel units along ``i, j, k`` of the preop grid.
    """
    disp = _Display(preop.shape, preop.affine)
    m = np.asarray(mask, dtype=bool)
    a3 = preop.affine[:3, :3]
    mag = np.sqrt(sum(np.square(np.tensordot(a3[r], field_vox, axes=(0, 0))) for r in range(3)))
    pick = np.where(m, mag, -1.0)
    centre_vox = np.asarray(np.unravel_index(int(np.argmax(pick)), pick.shape), dtype=np.float64)
    centre = disp.points(centre_vox)[0]
    pre_n = _normalised(np.asarray(preop.data, np.float32), m)
    intra_n = _normalised(np.asarray(intraop_on_preop, np.float32), m)
    warped_n = _normalised(np.asarray(warped_preop, np.float32), m)
    d = disp.array
    panels = compare_panels(pre_n, intra_n, warped_n, m, m if warped_mask is None else warped_mask, preop.spacing)
    rows = {name: (_display_masked(disp, arr), kw) for name, (arr, kw) in panels.items()}
    out = {FIGURES["matches"]: _matches_figure(disp, centre, d(pre_n), d(intra_n), points_vox, disps_vox),
           FIGURES["compare"]: _compare_figure(disp, centre, rows),
           FIGURES["field"]: _field_figure(disp, centre, d(pre_n), d(mag), d(m))}
    out[REPORT_NAME] = _page(info).encode()
    return out


def _page(info: Mapping) -> str:
    title = str(info.get("title", "brainshift register"))
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>",
             *[f'<p class="note">{_text(n)}</p>' for n in info.get("notes", [])]]
    if info.get("summary"):
        parts.append(f"<p>{_text(info['summary'])}</p>")
    parts += ["<h2>Figures</h2>", '<div id="img-status">images not checked yet</div>',
              _img(FIGURES["matches"], "matches", "Inlier matches drawn on both images."),
              _img(FIGURES["compare"], "before and after", COMPARE_CAPTION),
              _img(FIGURES["field"], "field", "The final displacement field.")]
    table = _info_html(info)
    if table:
        parts += ["<h2>Registration</h2>", table]
    files = _files_html(info.get("files", []))
    if files:
        parts += ["<h2>Files</h2>", files]
    parts += ["<p>Display: slices in the nearest-RAS orientation of the preop image (subject's right on the right, "
              "anterior / superior up). Fields: forward Lagrangian, preop voxel p moves to p + u(p).</p>",
              f"<script>{_SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"
