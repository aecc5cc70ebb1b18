"""The QC report of ``brainshift register`` (brainshift.evaluate.register_report) on small arrays."""

from __future__ import annotations

import numpy as np

from brainshift.evaluate.register_report import COMPARE_CAPTION, FIGURES, compare_panels, register_report
from brainshift.volume import Volume

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pair(shape=(24, 26, 22)):
    """A skull-stripped preop (0 outside an ellipsoid brain) and an intraop image whose brain sank 2 voxels along
    -k with fluid (0.6) filling the gap above it, as the synthetic intraop image of the demo."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    c = (np.asarray(shape) - 1) / 2

    def brain(dk):
        return (((i - c[0]) / 9) ** 2 + ((j - c[1]) / 10) ** 2 + ((k - c[2] + dk) / 8) ** 2) <= 1.0

    pre_mask = brain(0)
    tex = 0.8 + 0.2 * np.sin(i / 2.0) * np.cos(j / 3.0)
    pre = np.where(pre_mask, tex, 0.0).astype(np.float32)
    intra_mask = brain(2)
    intra = np.where(intra_mask, np.roll(tex, -2, axis=2), np.where(pre_mask, 0.6, 0.0)).astype(np.float32)
    return pre, intra, pre_mask, intra_mask


def test_differences_only_inside_the_brain_before_and_after():
    """Outside the brain one image is background (the preop 0 where the intraop shows the fluid filling the gap):
    the "after" difference is masked by the brain mask carried by the field, the "before" one by the preop mask;
    inside, the values are the plain differences. Checkerboards are not masked."""
    pre, intra, pre_mask, intra_mask = _pair()
    warped = np.where(intra_mask, intra, 0.0).astype(np.float32)  # a perfect registration of the brain
    panels = compare_panels(pre, intra, warped, pre_mask, intra_mask, (1.0, 1.0, 1.0))
    assert list(panels) == ["intraop - preop (before)", "intraop - warped preop (after)", "checkerboard before",
                            "checkerboard after"]
    before, kw = panels["intraop - preop (before)"]
    after, _ = panels["intraop - warped preop (after)"]
    assert kw == {"cmap": "RdBu_r", "vmin": -0.5, "vmax": 0.5}
    np.testing.assert_array_equal(np.ma.getmaskarray(before), ~pre_mask)
    np.testing.assert_array_equal(np.ma.getmaskarray(after), ~intra_mask)
    np.testing.assert_array_equal(before.compressed(), (intra - pre)[pre_mask])
    # the vacated gap (fluid in the intraop image, 0 in the warped preop) is masked after: not shown as an error
    gap = pre_mask & ~intra_mask
    assert gap.any() and np.all(np.abs((intra - warped)[gap]) >= 0.5) and after.mask[gap].all()
    assert np.abs(after.compressed()).max() == 0.0
    assert not np.ma.isMaskedArray(panels["checkerboard after"][0])


def test_register_report_renders_with_the_warped_mask(tmp_path):
    pre, intra, pre_mask, intra_mask = _pair()
    vol = Volume(pre, np.diag([1.0, 1.0, 1.2, 1.0]), "intensity")
    field = np.zeros((3,) + pre.shape, np.float32)
    field[2] = -2.0 * pre_mask
    pts = np.array([[12.0, 13, 11], [10, 12, 12], [14, 14, 10], [11, 15, 11]])
    info = {"title": "register", "summary": "4 inliers", "files": [("summary.json", "from `brainshift register`")]}
    out = register_report(vol, intra, np.where(intra_mask, intra, 0.0), field, pts, np.tile([0, 0, -2.0], (4, 1)),
                          pre_mask, info, warped_mask=intra_mask)
    assert sorted(out) == sorted([*FIGURES.values(), "report.html"])
    for name in FIGURES.values():
        assert out[name][:8] == PNG_MAGIC
    page = out["report.html"].decode()
    assert COMPARE_CAPTION.split(". ")[1] in page  # "The differences are shown only inside the brain: ..."
    assert "from <code>brainshift register</code>" in page
