"""QC figures and the HTML report (brainshift.evaluate.case_report), rendered in a real headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from brainshift.errors import GeometryError, KeypointError
from brainshift.evaluate.case_report import FIGURES, REPORT_NAME, _Display, metrics_table_html, write_case_report
from brainshift.volume import Volume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPE = (30, 36, 28)
#: LAS-oriented, anisotropic grid (i runs right -> left) so the display reorientation is exercised
AFFINE = np.array([[-1.2, 0, 0, 17.0], [0, 1.0, 0, -18.0], [0, 0, 1.1, -15.0], [0, 0, 0, 1]])
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def tiny_case():
    """Ellipsoid brain, spherical tumour/cavity, analytic smooth GT field and two 'methods' (voxel units)."""
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in SHAPE], indexing="ij")
    c = (np.asarray(SHAPE) - 1) / 2
    brain = (((i - c[0]) / 13) ** 2 + ((j - c[1]) / 16) ** 2 + ((k - c[2]) / 12) ** 2) <= 1.0
    tumour = ((i - 18) ** 2 + (j - 20) ** 2 + (k - 16) ** 2) <= 9.0
    image = brain * (100 + 30 * np.sin(i / 3.0) * np.cos(j / 4.0) + 20 * np.cos(k / 2.5)) + tumour * 50
    bump = np.exp(-((i - 18) ** 2 + (j - 20) ** 2 + (k - 22) ** 2) / 60.0) * brain
    gt = np.stack([0.2 * bump, 0.5 * bump, -2.0 * bump]).astype(np.float32)
    lin = (0.8 * gt).astype(np.float32)
    fold = gt.copy()
    fold[2, 15, 18, 14] += 3.0  # a spike: folds its neighbours (det J <= 0)
    kp = np.array([[15.0, 18, 14], [18, 20, 18], [10, 12, 10], [20, 25, 15], [14, 18, 20]])
    held = np.array([[16.0, 17, 13], [12, 20, 16]])
    rows = [{"method": "linear", "mse_mm2": 0.4, "mae_mm": 0.5, "p95_mm": 1.2, "tre_mm": 0.7,
             "pct_jacobian_nonpositive": 0.0, "time_s": 0.5},
            {"method": "spiky", "mse_mm2": 0.1, "mae_mm": 0.2, "p95_mm": 0.4, "tre_mm": 0.9,
             "pct_jacobian_nonpositive": 0.01, "time_s": 1.5}]
    vol = Volume(image.astype(np.float32), AFFINE, "intensity")
    masks = {"brain": brain, "tumour": tumour, "cavity": tumour}
    return vol, gt, {"linear": lin, "spiky": fold}, kp, held, rows, masks


def _report(tmp_path: Path, **info) -> Path:
    vol, gt, fields, kp, held, rows, masks = tiny_case()
    info = {"title": "tiny case", "notes": ["no trained model shipped yet; classical methods only"],
            "seed": 3, "max displacement (mm)": 2.2, "files": [("keypoints.csv", "driving keypoints")], **info}
    return write_case_report(tmp_path / "rep", image=vol, gt_field=gt, fields=fields, keypoints=kp, heldout=held,
                        rows=rows, masks=masks, info=info,
                        images={"preop": vol, "intraop": Volume(vol.data * 0.9, AFFINE)},
                        uncertainty={"linear": np.full(vol.shape, 0.2, np.float32)})


def test_report_writes_figures_table_and_no_external_resources(tmp_path):
    path = _report(tmp_path)
    assert path == tmp_path / "rep" / REPORT_NAME
    text = path.read_text()
    for name in FIGURES.values():
        png = path.parent / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in text
    assert len(re.findall(r"<img ", text)) == 5
    assert len(re.findall(r'<img [^>]*alt="[^"]{10,}"', text)) == 5  # every image has alt text
    assert '<table id="metrics">' in text
    assert "no trained model shipped yet; classical methods only" in text
    # nothing fetched from the network: no http(s) URL anywhere in the page
    assert not re.search(r"(src|href)=\"(https?:)?//", text)
    assert "http://" not in text and "https://" not in text
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([REPORT_NAME, *FIGURES.values()])


def test_metrics_table_marks_lowest_error_and_formats_values():
    _, _, _, _, _, rows, _ = tiny_case()
    table = metrics_table_html(rows + [{"method": "none", "mse_mm2": 0.0, "tre_mm": float("nan")}])
    body = table.split("<tbody>")[1]
    lines = [x for x in body.splitlines() if x.startswith("<tr>")]
    assert len(lines) == 3
    # MSE: spiky (0.1) is best ("none" never counts); TRE: linear (0.7) is best; NaN shows as "-"
    assert '<td class="best">0.1</td>' in lines[1]
    assert '<td class="best">0.7</td>' in lines[0]
    assert "<td>-</td>" in lines[2]
    assert "<th>det J &le; 0 (%)</th>" in table


def test_display_orientation_maps_points_with_the_array():
    # an LAS grid: display x (left -> right) is voxel i reversed; a marked voxel and its point must coincide
    disp = _Display(SHAPE, AFFINE)
    a = np.zeros(SHAPE)
    a[3, 5, 7] = 1
    d = disp.array(a)
    assert tuple(np.argwhere(d)[0]) == (SHAPE[0] - 1 - 3, 5, 7)
    np.testing.assert_array_equal(disp.points(np.array([[3.0, 5, 7]])), [[SHAPE[0] - 1 - 3, 5, 7]])
    np.testing.assert_allclose(disp.spacing, [1.2, 1.0, 1.1])
    # a permuted grid (voxel axes = S, R, A): display axes take voxel axes (1, 2, 0)
    perm = np.array([[0, 2.0, 0, 0], [0, 0, 3.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    dp = _Display((4, 5, 6), perm)
    b = np.zeros((4, 5, 6))
    b[1, 2, 3] = 1
    assert tuple(np.argwhere(dp.array(b))[0]) == (2, 3, 1)
    np.testing.assert_array_equal(dp.points(np.array([[1.0, 2, 3]])), [[2, 3, 1]])
    np.testing.assert_allclose(dp.spacing, [2.0, 3.0, 1.0])


def test_slices_are_named_by_the_image_files_voxel_index():
    """Slice labels name the 0-based voxel index along the image's own axis ("sagittal x=112" was a display-array
    index: on this LAS grid the display x runs against voxel i; on a permuted grid it is another voxel axis)."""
    from brainshift.evaluate.case_report import _slices

    disp = _Display(SHAPE, AFFINE)
    views = _slices(np.array([20.0, 14, 9]), disp)
    assert [v[0] for v in views] == [f"sagittal, voxel i={SHAPE[0] - 1 - 20}", "coronal, voxel j=14",
                                     "axial, voxel k=9"]
    assert [(v[1], v[2]) for v in views] == [(0, (1, 2)), (1, (0, 2)), (2, (0, 1))]
    perm = np.array([[0, 2.0, 0, 0], [0, 0, 3.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])  # voxel axes S, R, A
    assert [v[0] for v in _slices(np.array([2.0, 3, 1]), _Display((4, 5, 6), perm))] == [
        "sagittal, voxel j=2", "coronal, voxel k=3", "axial, voxel i=1"]


def test_backticks_render_as_code_and_text_is_escaped():
    from brainshift.evaluate.case_report import _text

    assert _text("run `brainshift register` on <a> & b") == (
        "run <code>brainshift register</code> on &lt;a&gt; &amp; b")
    assert _text("no code here") == "no code here"


def test_jacobian_colour_bar_says_when_it_clips():
    from brainshift.evaluate.case_report import _jacobian_label

    assert _jacobian_label(np.array([0.0, 0.1, 0.2]), 0.5) == "Jacobian determinant (1 = volume kept)"
    assert _jacobian_label(np.array([0.0, 0.1, 0.3, 0.6]), 0.25) == (
        "Jacobian determinant (1 = volume kept), one scale, clipped to [0.75, 1.25] (50 % of voxels beyond)")


def test_orientation_letters_have_a_dark_outline():
    """White letters alone vanished on light panels (the register report's difference images)."""
    from brainshift.evaluate.case_report import _figure, _side_labels

    _, axes = _figure(1, 1)
    _side_labels(axes[0][0], 1)
    texts = axes[0][0].texts
    assert [t.get_text() for t in texts] == ["L", "R", "S"]
    for t in texts:
        assert t.get_color() == "w" and t.get_path_effects(), t.get_text()


def test_report_links_other_pages_and_states_what_the_uncertainty_map_plots(tmp_path):
    path = _report(tmp_path, files=[("keypoints.csv", "input of `brainshift register`")],
                   links=[("register/report.html", "the `register` report")])
    text = path.read_text()
    assert "<li><a href=\"keypoints.csv\"><code>keypoints.csv</code></a> &mdash; input of <code>brainshift " \
           "register</code></li>" in text
    assert "<h2>See also</h2>" in text and '<a href="register/report.html">' in text
    assert "<td>links</td>" not in text and "`" not in text
    assert "Plotted: sqrt(3)·σ in mm, the expected 3-D error magnitude" in text
    assert "is sqrt(3) ≈ 1.73 times smaller" in text and "Shown over brain minus cavity only" in text


def test_report_bad_inputs(tmp_path):
    vol, gt, fields, kp, held, rows, masks = tiny_case()
    kw = {"image": vol, "gt_field": gt, "fields": fields, "keypoints": kp, "heldout": held, "rows": rows}
    with pytest.raises(GeometryError, match="brain"):
        write_case_report(tmp_path, masks={"tumour": masks["tumour"]}, **kw)
    with pytest.raises(GeometryError, match="mask 'brain' on the image grid"):
        write_case_report(tmp_path, masks={"brain": masks["brain"][:-1]}, **kw)
    with pytest.raises(KeypointError, match=r"\(N, 3\)"):
        write_case_report(tmp_path, masks=masks, **{**kw, "keypoints": np.zeros((4, 2))})
    with pytest.raises(GeometryError):
        write_case_report(tmp_path, masks=masks, **{**kw, "fields": {"bad": gt[:, :-1]}})
    assert not (tmp_path / REPORT_NAME).exists()


# --------------------------------------------------------------------------------------------- browser


def _chromium() -> str:
    """Path of Debian's chromium; FAIL in CI when missing (CI installs it), skip locally with the reason."""
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if exe is None:
        msg = ("headless Chromium is needed to render the HTML report: install Debian's package with "
               "`apt-get install -y chromium` (.ci/run installs it in CI)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg + "; skipped because CI is not set")
    return exe


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_report_renders_in_headless_chromium(tmp_path):
    exe = _chromium()
    path = _report(tmp_path)
    url = path.resolve().as_uri()
    # 1. the DOM after every image had the chance to load: the report's own script counts them
    dom = _run_chromium(exe, tmp_path / "profile-dom", "--run-all-compositor-stages-before-draw",
                        "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = re.search(r'<div id="img-status"[^>]*>([^<]*)</div>', dom.stdout)
    assert status is not None, dom.stdout[:2000]
    assert status.group(1) == "5/5 images loaded", status.group(1)
    assert 'data-loaded="5"' in status.group(0) and 'data-total="5"' in status.group(0)
    assert re.search(r'<table id="metrics">.*?<td>linear</td>.*?<td>spiky</td>', dom.stdout, re.S)
    # 2. a screenshot: written, a valid PNG, and not blank
    shot = tmp_path / "shot.png"
    res = _run_chromium(exe, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000",
                        "--virtual-time-budget=5000", url)
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1280)
    assert float(pixels[..., :3].std()) > 0.05  # a blank (single-colour) page has std 0


def test_broken_image_is_reported_by_the_page(tmp_path):
    # the check above can fail: remove one figure and the page's own count says 3/4
    exe = _chromium()
    path = _report(tmp_path)
    (path.parent / FIGURES["errors"]).unlink()
    dom = _run_chromium(exe, tmp_path / "profile", "--run-all-compositor-stages-before-draw",
                        "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "4/5 images loaded" in dom.stdout
