"""Property-based fuzzing of ``brainshift infer`` through the CLI (typer's CliRunner, in process).

Malformed keypoint tables, images and initial fields are generated with hypothesis (derandomized: the same
inputs on every run, so CI is reproducible); every run must keep the contract of
:func:`_fuzz_helpers.check_contract`: exit 0 or 2, no traceback, one ``error:`` line on failure, the output
folder untouched on failure, and on success the user's files kept and exactly the listed outputs written.
160 + 80 + 80 + 60 = 380 generated inputs per run, on a 12^3 image without refinement (about a minute on 2
cores).
"""

from __future__ import annotations

import gzip
import io
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fuzz_helpers import AFFINE, SHAPE, check_contract, fresh_out, good_rows, make_workspace, runner, snapshot
from brainshift.cli import app

#: warnings (odd NIfTI geometry, merged duplicate keypoints) are expected output here, not test failures
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("fuzz"))


def _run(ws, args: list[str]) -> str:
    out = fresh_out(ws)
    before = snapshot(out)
    res = runner.invoke(app, ["infer", *args, "--no-refine", "-q", "-o", str(out)])
    return check_contract(res, out, before)


# ------------------------------------------------------------------------------------------ keypoint tables

_ODD_TOKENS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400", "1_0", "", " ", "abc", "0x10",
               "\u0661\u0662", "1e", "--1", "+.5", ".", "1.5.2", "1,5", "\u00bd", "\x00", "1e30", "-0", "+3", "٣"]
_number = st.one_of(
    st.floats(min_value=-3, max_value=15).map(lambda v: f"{v:.6g}"),
    st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(_ODD_TOKENS),
)
_sep = st.sampled_from([",", "\t", " ", ";", ", ", ",,"])
_row = st.builds(lambda toks, sep, tail: sep.join(toks) + tail,
                 st.lists(_number, min_size=0, max_size=8), _sep, st.sampled_from(["", ",", " # note", "\r"]))
_header = st.sampled_from(["x,y,z,dx,dy,dz", "X Y Z DX DY DZ", "dz,dy,dx,z,y,x", "x,y,z,dx,dy", "a,b,c,d,e,f",
                           "x,y,z,dx,dy,dz,extra", "\ufeffx,y,z,dx,dy,dz", "# comment", ""])


@st.composite
def _valid_rows(draw):
    """Mostly valid tables, perturbed: duplicates, coplanar, outside, huge or NaN displacements, too few rows."""
    n = draw(st.integers(0, 12))
    rows = good_rows(max(n, 1), seed=draw(st.integers(0, 1000)))[:n].copy()
    kind = draw(st.sampled_from(["none", "duplicate", "conflict", "coplanar", "outside", "huge", "large", "tiny"]))
    if n and kind == "duplicate":
        rows = np.vstack([rows, rows[:1]])
    elif n and kind == "conflict":
        rows = np.vstack([rows, rows[:1] + [0, 0, 0, 1, 1, 1]])
    elif kind == "coplanar":
        rows[:, 2] = 5.0
    elif n and kind == "outside":
        rows[0, draw(st.integers(0, 2))] = draw(st.sampled_from([-1.0, 11.5, 12.0, 1e6]))
    elif n and kind == "huge":
        rows[-1, 3:] = draw(st.sampled_from([1e30, 1e300, 60.0, -51.0]))
    elif kind == "large":
        rows[:, 3:] *= draw(st.floats(0, 20))
    elif n and kind == "tiny":
        rows[:, :3] = rows[0, :3] + draw(st.floats(0, 1e-9))
    return ["x,y,z,dx,dy,dz"] + [",".join(repr(float(v)) for v in r) for r in rows]


@st.composite
def keypoint_files(draw):
    """``(file name, bytes)`` of a keypoint file: malformed text, perturbed valid tables, or random bytes."""
    kind = draw(st.sampled_from(["text", "text", "valid", "valid", "valid", "valid", "valid", "bytes"]))
    if kind == "bytes":
        content = draw(st.binary(max_size=300))
    else:
        lines = draw(_valid_rows()) if kind == "valid" else [draw(_header), *draw(st.lists(_row, max_size=12))]
        lines = draw(st.permutations(lines)) if kind == "text" and draw(st.booleans()) else lines
        content = "\n".join(lines).encode(draw(st.sampled_from(["utf-8"] * 6 + ["latin-1", "utf-16"])),
                                          errors="replace")
    name = "kp" + draw(st.sampled_from([".csv"] * 6 + [".txt", ".CSV", ".fcsv", ".key", ".mrk.json", ".tsv"]))
    return name, content


@settings(FUZZ, max_examples=160)
@given(kp=keypoint_files(), method=st.sampled_from(["linear", "linear", "tps", "tps3d"]),
       coords=st.sampled_from(["voxel"] * 4 + ["ras", "lps"]), fmt=st.sampled_from(["npz", "h5", "nii"]))
def test_fuzz_keypoint_tables(ws, kp, method, coords, fmt):
    name, content = kp
    path = fresh_out(ws).parent / name
    path.write_bytes(content)
    _run(ws, ["-p", str(ws["image"]), "-k", str(path), "-m", method, "--coords", coords, "-f", fmt])


# ---------------------------------------------------------------------------------------------------- images

@st.composite
def image_files(draw):
    """``(file name, bytes)`` of an image: odd shapes, values, geometry (affine, sform/qform codes), corruption."""
    shape = draw(st.sampled_from([SHAPE] * 8 + [(12, 12), (12, 12, 12, 2), (12, 12, 12, 1), (1, 12, 12),
                                  (12, 12, 1), (0, 12, 12), (12, 12, 12, 3, 1)]))
    values = draw(st.sampled_from(["random"] * 5 + ["zeros", "constant", "nan", "inf", "one_nan", "int16",
                                   "huge", "bool"]))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    data = rng.random(shape).astype(np.float32) + 0.2
    if values == "zeros":
        data[...] = 0
    elif values == "constant":
        data[...] = 7.5
    elif values == "nan":
        data[...] = np.nan
    elif values == "inf":
        data[data > 0.8] = np.inf
    elif values == "one_nan" and data.size:
        data.flat[0] = np.nan
    elif values == "int16":
        data = (data * 1000).astype(np.int16)
    elif values == "huge":
        data = (data.astype(np.float64) * 3e38).astype(np.float32)  # inf where above float32 range
    elif values == "bool":
        data = data > 0.7
    affine = AFFINE.copy()
    geometry = draw(st.sampled_from(["good"] * 6 + ["zero_column", "nan", "shear", "tiny", "flip", "no_forms",
                                     "qform_only", "disagree"]))
    if geometry == "zero_column":
        affine[:, draw(st.integers(0, 2))] = 0
    elif geometry == "nan":
        affine[0, 3] = np.nan
    elif geometry == "shear":
        affine[0, 1] = 0.8
    elif geometry == "tiny":
        affine[:3, :3] *= 1e-9
    elif geometry == "flip":
        affine[0, :] *= -1
    img = nib.Nifti1Image(data if data.dtype != bool else data.astype(np.uint8), None)
    img.set_sform(affine, code=1)
    try:
        img.set_qform(affine, code=1)
    except Exception:  # noqa: BLE001 - a singular affine has no qform: a zero voxel size in the header instead
        img.header.set_zooms((0.0,) * min(3, data.ndim) + img.header.get_zooms()[3:])
    if geometry == "no_forms":
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    elif geometry == "qform_only":
        img.set_sform(None, code=0)
        img.set_qform(AFFINE, code=1)
    elif geometry == "disagree":
        other = AFFINE.copy()
        other[:3, 3] += 5
        img.set_sform(AFFINE, code=1)
        img.set_qform(other, code=1)
    buf = io.BytesIO()
    try:
        buf.write(img.to_bytes())
    except Exception:  # noqa: BLE001 - nibabel refuses some headers itself: write random bytes then
        buf.write(rng.bytes(400))
    raw = buf.getvalue()
    corruption = draw(st.sampled_from(["none"] * 6 + ["truncate", "random", "empty"]))
    if corruption == "truncate":
        raw = raw[: int(len(raw) * draw(st.floats(0, 0.99)))]
    elif corruption == "random":
        raw = rng.bytes(draw(st.integers(1, 2000)))
    elif corruption == "empty":
        raw = b""
    suffix = draw(st.sampled_from([".nii.gz"] * 6 + [".nii", ".nii", ".nrrd", ".mha", ".png"]))
    if suffix == ".nii.gz" and corruption != "random":
        raw = gzip.compress(raw)
    return "img" + suffix, raw


@settings(FUZZ, max_examples=80)
@given(image=image_files())
def test_fuzz_images(ws, image):
    name, content = image
    path = fresh_out(ws).parent / name
    path.write_bytes(content)
    _run(ws, ["-p", str(path), "-k", str(ws["kp"]), "-f", "npz"])


# ---------------------------------------------------------------------------------------------------- fields

@st.composite
def field_files(draw):
    """``(file name, bytes)`` of an initial field: wrong grids, odd values, missing arrays, corruption."""
    fmt = draw(st.sampled_from(["npz", "npz", "h5", "nii"]))
    shape = draw(st.sampled_from([(3, *SHAPE)] * 6 + [(2, *SHAPE), (3, 12, 12, 11), (3, 12, 12), (3, 0, 12, 12)]))
    values = draw(st.sampled_from(["small"] * 4 + ["zeros", "nan", "inf", "huge", "large"]))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    fld = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    if values == "zeros":
        fld[...] = 0
    elif values == "nan" and fld.size:
        fld.flat[draw(st.integers(0, fld.size - 1))] = np.nan
    elif values == "inf" and fld.size:
        fld.flat[0] = np.inf
    elif values == "huge":
        fld *= np.float32(1e30)
    elif values == "large":
        fld += np.float32(draw(st.floats(10, 80)))
    affine = AFFINE.copy()
    if draw(st.integers(0, 3)) == 0:
        affine = draw(st.sampled_from([np.eye(4), AFFINE * np.array([[1], [1], [1], [0]]) + np.diag([0, 0, 0, 1]),
                                       AFFINE + np.array([[0, 0, 0, 0.5], [0] * 4, [0] * 4, [0] * 4])]))
    buf = io.BytesIO()
    if fmt == "npz":
        keys = draw(st.sampled_from(["both"] * 6 + ["field_only", "other"]))
        arrays = {"both": {"field": fld, "affine": affine}, "field_only": {"field": fld},
                  "other": {"disp": fld, "affine": affine}}[keys]
        np.savez(buf, **arrays)
        raw = buf.getvalue()
    elif fmt == "nii" or fld.ndim != 4 or fld.shape[0] != 3:
        data = np.moveaxis(fld, 0, -1)[..., None, :] if fld.ndim == 4 else fld
        raw = gzip.compress(nib.Nifti1Image(data, affine).to_bytes())
        fmt = "nii.gz"
    else:
        from brainshift.io.fields import write_field

        with tempfile.TemporaryDirectory() as tmp:
            try:
                write_field(Path(tmp) / "f.h5", fld, affine)
                raw = (Path(tmp) / "f.h5").read_bytes()
            except Exception:  # noqa: BLE001 - write_field refuses non-finite or singular input: random bytes then
                raw = rng.bytes(500)
    corruption = draw(st.sampled_from(["none"] * 6 + ["truncate", "random", "empty"]))
    if corruption == "truncate":
        raw = raw[: int(len(raw) * draw(st.floats(0, 0.99)))]
    elif corruption == "random":
        raw = rng.bytes(draw(st.integers(1, 1000)))
    elif corruption == "empty":
        raw = b""
    return f"field.{fmt}", raw


@settings(FUZZ, max_examples=80)
@given(fld=field_files(), fmt=st.sampled_from(["npz", "h5"]))
def test_fuzz_initial_fields(ws, fld, fmt):
    name, content = fld
    path = fresh_out(ws).parent / name
    path.write_bytes(content)
    _run(ws, ["-p", str(ws["image"]), "-i", str(path), "-f", fmt])


# ------------------------------------------------------------------------------------------ command lines

_TOKENS = ["-p", "-k", "-i", "-o", "-m", "-f", "-w", "-d", "--coords", "--h5-compression", "--h5-dtype",
           "--max-displacement", "--refine", "--no-refine", "--save-inverse", "--bogus", "-q", "--", "tps", "npz",
           "nan", "-1", "1e400", "cuda", "lps", "", "x.csv", "infer", "keypoints", "version", "--octaves", "0"]


@settings(FUZZ, max_examples=60)
@given(argv=st.lists(st.one_of(st.sampled_from(_TOKENS), st.text(max_size=6)), max_size=8),
       command=st.sampled_from(["infer", "infer", "infer", "keypoints", "zzz"]))
def test_fuzz_command_lines(ws, argv, command):
    """Random command lines: exit 0 or 2, one line on failure (usage errors included), nothing written."""
    out = fresh_out(ws)
    before = snapshot(out)
    args = [command, *argv]
    if command == "infer":
        args += ["-o", str(out), "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code in (0, 2), f"exit {res.exit_code} for {args}: {res.output}\n{res.exception!r}"
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.stderr)
    if res.exit_code == 2 or command != "infer":
        assert snapshot(out) == before
