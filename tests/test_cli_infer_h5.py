"""``brainshift infer --h5-dtype / --h5-compression``: the precision and compression of the written .h5."""

from __future__ import annotations

import h5py
import numpy as np
import SimpleITK as sitk
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.io.images import write_image
from brainshift.volume import Volume


def _inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_image(Volume(rng.uniform(0, 1, (14, 16, 12)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                tmp_path / "t1.nii.gz")
    pts = rng.uniform(2, 10, size=(8, 3))
    rows = ["x,y,z,dx,dy,dz"] + [",".join(f"{v:.4f}" for v in [*p, 0.5, -0.25, 1.0]) for p in pts]
    (tmp_path / "kp.csv").write_text("\n".join(rows) + "\n")
    return ["infer", "-p", str(tmp_path / "t1.nii.gz"), "-k", str(tmp_path / "kp.csv"), "--no-refine", "-q"]


def test_h5_precision_and_compression_options(tmp_path):
    base = _inputs(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "-o", str(tmp_path / "b"), "--h5-dtype", "float64", "--h5-compression", "1"])
    assert res.exit_code == 0, res.output
    with h5py.File(tmp_path / "a" / "initial_disp_field.h5") as h5:  # default: float32, uncompressed
        assert h5["TransformGroup/0/TransformType"][0].decode() == "DisplacementFieldTransform_float_3_3"
        assert h5["TransformGroup/0/TransformParameters"].compression is None
    with h5py.File(tmp_path / "b" / "initial_disp_field.h5") as h5:
        assert h5["TransformGroup/0/TransformType"][0].decode() == "DisplacementFieldTransform_double_3_3"
        assert h5["TransformGroup/0/TransformParameters"].compression == "gzip"
    ta = sitk.ReadTransform(str(tmp_path / "a" / "initial_disp_field.h5"))
    tb = sitk.ReadTransform(str(tmp_path / "b" / "initial_disp_field.h5"))
    for x in [(-5.0, -7.0, 9.0), (-12.5, -20.25, 4.0)]:
        np.testing.assert_allclose(ta.TransformPoint(x), tb.TransformPoint(x), atol=1e-4)
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "c"), "--h5-dtype", "float16"])
    assert bad.exit_code == 2 and "expected --h5-dtype one of ('float32', 'float64'), got 'float16'" in bad.output
