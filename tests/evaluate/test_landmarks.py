"""TRE at landmark pairs (brainshift.evaluate.landmarks, ``brainshift evaluate-landmarks``)."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.errors import GeometryError, InputFileError
from brainshift.evaluate.landmarks import evaluate_landmarks, move_points, read_tag_file
from brainshift.io.fields import write_field

runner = CliRunner()
# grid: 2 mm voxels, origin (-20, -20, -20) RAS; field: +1 voxel along i everywhere = +2 mm along R (x)
AFFINE = np.array([[2.0, 0, 0, -20], [0, 2.0, 0, -20], [0, 0, 2.0, -20], [0, 0, 0, 1]])
PRE = np.array([[0.0, 0.0, 0.0], [4.0, -6.0, 2.0], [-8.0, 10.0, 6.0]])
# intraop: moved by exactly +2 mm in x, except the third, 1 mm further in y (a residual the field cannot explain)
INTRA = PRE + [[2.0, 0, 0], [2.0, 0, 0], [2.0, 1.0, 0]]


@pytest.fixture
def field_file(tmp_path):
    f = np.zeros((3, 20, 20, 20), np.float32)
    f[0] = 1.0
    return write_field(tmp_path / "field.npz", f, AFFINE)


def _tag(path, *sets, labels=None):
    lines = ["MNI Tag Point File", f"Volumes = {len(sets)};", "% made by the test", "", "Points ="]
    for i in range(len(sets[0])):
        xyz = " ".join(f"{v:g}" for s in sets for v in s[i])
        lines.append(f" {xyz}" + (f' 1 1 1 "{labels[i]}"' if labels else ""))
    lines[-1] += ";"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_volume_tag_file_gives_tre_before_and_after(tmp_path, field_file):
    tag = _tag(tmp_path / "pairs.tag", PRE, INTRA, labels=["a", "b", "c d"])
    res = evaluate_landmarks(tag, None, field_file)
    assert res.labels == ["a", "b", "c d"]
    # by hand: before |INTRA - PRE| = 2, 2, sqrt(5); after the 2 mm shift: 0, 0, 1
    np.testing.assert_allclose(res.before_mm, [2.0, 2.0, np.sqrt(5.0)], atol=1e-6)
    np.testing.assert_allclose(res.after_mm, [0.0, 0.0, 1.0], atol=1e-5)
    assert not res.outside.any() and res.summary()["after"]["max_mm"] == pytest.approx(1.0, abs=1e-5)
    # tag_preop_volume=2 swaps the roles: the field now moves the intraop points further away
    swapped = evaluate_landmarks(tag, None, field_file, tag_preop_volume=2)
    np.testing.assert_allclose(swapped.after_mm[:2], [4.0, 4.0], atol=1e-5)


def test_one_volume_tags_tables_and_slicer_markups_agree(tmp_path, field_file):
    t1 = _tag(tmp_path / "pre.tag", PRE)
    t2 = _tag(tmp_path / "intra.tag", INTRA)
    ref = evaluate_landmarks(t1, t2, field_file).after_mm
    lps = lambda a: a * [-1, -1, 1]  # noqa: E731
    for name, pts in (("pre", PRE), ("intra", INTRA)):  # tables in LPS mm
        rows = "\n".join(f"{x:g},{y:g},{z:g}" for x, y, z in lps(pts))
        (tmp_path / f"{name}.csv").write_text("x,y,z\n" + rows + "\n")
        fc = "\n".join(f"F_{i},{x:g},{y:g},{z:g},0,0,0,1,1,1,0,L{i},," for i, (x, y, z) in enumerate(lps(pts)))
        (tmp_path / f"{name}.fcsv").write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                                               "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,"
                                               "associatedNodeID\n" + fc + "\n")
    table = evaluate_landmarks(tmp_path / "pre.csv", tmp_path / "intra.csv", field_file, frame="lps")
    fcsv = evaluate_landmarks(tmp_path / "pre.fcsv", tmp_path / "intra.fcsv", field_file)
    np.testing.assert_allclose(table.after_mm, ref, atol=1e-5)
    np.testing.assert_allclose(fcsv.after_mm, ref, atol=1e-5)
    np.testing.assert_allclose(fcsv.preop_ras, PRE, atol=1e-5)


def test_move_points_is_the_forward_field_in_world_mm():
    f = np.zeros((3, 5, 5, 5), np.float32)
    f[2] = 0.5  # half a voxel along k
    aff = np.diag([1.0, 1.0, -3.0, 1.0])  # k points inferior, 3 mm voxels: +0.5 voxel = 1.5 mm inferior
    moved, outside = move_points(np.array([[1.0, 2.0, -6.0], [50.0, 0.0, 0.0]]), f, aff)
    np.testing.assert_allclose(moved[0], [1.0, 2.0, -7.5])
    assert list(outside) == [False, True]


def test_bad_files_raise_and_the_cli_reports(tmp_path, field_file):
    (tmp_path / "bad.tag").write_text("not a tag file\n")
    with pytest.raises(InputFileError, match="MNI tag file"):
        read_tag_file(tmp_path / "bad.tag")
    far = _tag(tmp_path / "far.tag", PRE + 500.0, INTRA + 500.0)
    with pytest.raises(GeometryError, match="inside the field's grid"):
        evaluate_landmarks(far, None, field_file)
    tag = _tag(tmp_path / "pairs.tag", PRE, INTRA)
    out = tmp_path / "tre.csv"
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tag), "--field", str(field_file),
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 landmarks: TRE before 2.08" in r.output and "after 0.33" in r.output
    assert out.read_text().splitlines()[0] == "label,x,y,z,tre_before_mm,tre_after_mm"
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(far), "--field", str(field_file)])
    assert r.exit_code == 2 and r.output.startswith("error: expected preop landmarks inside")


def test_tables_with_a_byte_order_mark_or_not_utf8(tmp_path, field_file):
    # Excel's "CSV UTF-8" starts with a byte-order mark; a Latin-1 label is not UTF-8: an error, not a traceback
    pre = "x,y,z,label\n" + "".join(f"{x:g},{y:g},{z:g},p{i}\n" for i, (x, y, z) in enumerate(PRE))
    intra = "x,y,z\n" + "".join(f"{x:g},{y:g},{z:g}\n" for x, y, z in INTRA)
    (tmp_path / "pre.csv").write_bytes(b"\xef\xbb\xbf" + pre.encode())
    (tmp_path / "intra.csv").write_text(intra)
    tre = evaluate_landmarks(tmp_path / "pre.csv", tmp_path / "intra.csv", field_file)
    assert tre.labels == ["p0", "p1", "p2"]
    (tmp_path / "latin1.csv").write_bytes(pre.replace("p0", "caf\xe9").encode("latin-1"))
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tmp_path / "latin1.csv"),
                            "--intraop-landmarks", str(tmp_path / "intra.csv"), "--field", str(field_file)])
    assert r.exit_code == 2 and r.output.startswith("error: expected a UTF-8 text landmark table"), r.output


@pytest.mark.parametrize("name,message", [
    ("pre.csv", "expected -o/--output to be another file than the inputs, got the input"),
    ("field.npz", "expected -o/--output a table file (.csv or .txt), got"),
    ("tre.npz", "expected -o/--output a table file (.csv or .txt), got"),
    ("adir", "expected -o/--output a table file (.csv or .txt), got a directory"),
])
def test_output_that_is_an_input_or_not_a_table_is_refused_before_the_work(tmp_path, field_file, name, message):
    # -o naming an input overwrote it with the CSV table (exit 0); a directory was refused only after the table
    # was printed; 'tre.npz' got CSV text
    (tmp_path / "pre.csv").write_text("x,y,z\n" + "".join(f"{x:g},{y:g},{z:g}\n" for x, y, z in PRE))
    (tmp_path / "intra.csv").write_text("x,y,z\n" + "".join(f"{x:g},{y:g},{z:g}\n" for x, y, z in INTRA))
    (tmp_path / "adir").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tmp_path / "pre.csv"),
                            "--intraop-landmarks", str(tmp_path / "intra.csv"), "--field", str(field_file),
                            "-o", str(tmp_path / name)])
    assert r.exit_code == 2 and r.output.startswith("error: " + message), r.output
    assert len(r.output.splitlines()) == 1  # nothing printed before the error
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "adir"])


def test_a_frame_other_than_ras_or_lps_is_refused_also_with_a_tag_file(tmp_path, field_file):
    # a .tag file does not use --frame, so '--frame voxel' was silently read as RAS
    tag = _tag(tmp_path / "pairs.tag", PRE, INTRA)
    with pytest.raises(InputFileError, match="expected the landmark frame ras or lps, got 'voxel'"):
        evaluate_landmarks(tag, None, field_file, frame="voxel")
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tag), "--field", str(field_file),
                            "--frame", "voxel"])
    assert r.exit_code == 2 and r.output == "error: expected the landmark frame ras or lps, got 'voxel'\n"
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tag), "--field", str(field_file),
                            "--frame", "LPS"])
    assert r.exit_code == 0, r.output


def _table(path, points, labels=None):
    head = "x,y,z" + (",label" if labels else "")
    rows = [f"{x:g},{y:g},{z:g}" + (f",{labels[i]}" if labels else "") for i, (x, y, z) in enumerate(points)]
    path.write_text(head + "\n" + "\n".join(rows) + "\n")
    return path


def test_labelled_tables_and_tags_are_paired_by_label_not_by_row_order(tmp_path, field_file):
    # the intraop file lists the same labelled landmarks in another order: they were paired by row order (exit 0,
    # TRE before 2, 2, sqrt(5) became |INTRA[2] - PRE[0]| ...), now by label, as Slicer markups are
    order = [2, 0, 1]
    pre = _table(tmp_path / "pre.csv", PRE, labels=["a", "b", "c"])
    intra = _table(tmp_path / "intra.csv", INTRA[order], labels=[["a", "b", "c"][i] for i in order])
    res = evaluate_landmarks(pre, intra, field_file)
    assert res.labels == ["a", "b", "c"]
    np.testing.assert_allclose(res.before_mm, [2.0, 2.0, np.sqrt(5.0)], atol=1e-6)  # as in the tag test above
    np.testing.assert_allclose(res.after_mm, [0.0, 0.0, 1.0], atol=1e-5)
    tag_pre = _tag(tmp_path / "pre.tag", PRE, labels=["a", "b", "c"])
    tag_intra = _tag(tmp_path / "intra.tag", INTRA[order], labels=[["a", "b", "c"][i] for i in order])
    np.testing.assert_allclose(evaluate_landmarks(tag_pre, tag_intra, field_file).after_mm, [0.0, 0.0, 1.0],
                               atol=1e-5)
    # a landmark missing intraop is dropped with a warning naming it; labels shared by none pair by order, warned
    short = _table(tmp_path / "short.csv", INTRA[[2, 0]], labels=["c", "a"])
    with pytest.warns(UserWarning, match="dropped 1 without a partner: b"):
        res = evaluate_landmarks(pre, short, field_file)
    assert res.labels == ["a", "c"]
    np.testing.assert_allclose(res.after_mm, [0.0, 1.0], atol=1e-5)
    other = _table(tmp_path / "other.csv", INTRA, labels=["x", "y", "z"])
    with pytest.warns(UserWarning, match="share no label; matching 3 points by order"):
        np.testing.assert_allclose(evaluate_landmarks(pre, other, field_file).after_mm, [0.0, 0.0, 1.0], atol=1e-5)
    # without labels in one file: by order, equal counts required
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(pre), "--intraop-landmarks",
                            str(_table(tmp_path / "two.csv", INTRA[:2])), "--field", str(field_file)])
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
    assert r.output.startswith("error: expected as many intraop as preop landmarks (3 in ")


def test_not_utf8_table_names_its_line_and_an_output_under_a_file_is_refused_first(tmp_path, field_file):
    """The UTF-8 error gave a byte offset ("position 13"); -o below a file failed after the work with "File
    exists". Expected: the line and column of the byte; the file in the way named before any output."""
    pre = "x,y,z,label\n" + "".join(f"{x:g},{y:g},{z:g},p{i}\n" for i, (x, y, z) in enumerate(PRE))
    (tmp_path / "latin1.csv").write_bytes(pre.replace("p1", "caf\xe9").encode("latin-1"))
    (tmp_path / "intra.csv").write_text("x,y,z\n" + "".join(f"{x:g},{y:g},{z:g}\n" for x, y, z in INTRA))
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tmp_path / "latin1.csv"),
                            "--intraop-landmarks", str(tmp_path / "intra.csv"), "--field", str(field_file)])
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
    assert r.output.startswith("error: expected a UTF-8 text landmark table")
    assert "byte 0xe9 on line 3 (column 11)" in r.output  # line 3 is '4,-6,2,caf' and then the byte
    (tmp_path / "pre.csv").write_text(pre)
    (tmp_path / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tmp_path / "pre.csv"),
                            "--intraop-landmarks", str(tmp_path / "intra.csv"), "--field", str(field_file),
                            "-o", str(tmp_path / "notes.txt" / "tre.csv")])
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output  # refused before the table is printed
    assert r.output.startswith("error: expected a folder to write") and "notes.txt, an existing file" in r.output
    assert (tmp_path / "notes.txt").read_text() == "mine"
