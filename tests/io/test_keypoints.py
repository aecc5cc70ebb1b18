"""Keypoint readers and writers (tables, 3D SIFT-Rank .key, Slicer markups) and validate_keypoints
(brainshift.keypoints.validate)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from _io_helpers import OBLIQUE_SHAPE, assert_one_line_error, write_small_case

from brainshift.errors import InputFileError, KeypointError
from brainshift.io.keypoints import (
    read_keypoint_positions,
    read_keypoint_table,
    read_keypoints,
    read_sift_key,
    read_sift_key_features,
    read_slicer_markups,
    write_keypoint_table,
    write_sift_key,
)
from brainshift.keypoints.validate import validate_keypoints

# ------------------------------------------------------------------------------------------------ tables


@pytest.mark.parametrize("sep", [",", "\t", " ", "  \t "])
@pytest.mark.parametrize("header", [True, False])
def test_table_separators_and_optional_header(tmp_path, sep, header):
    lines = (["# comment line", "x,y,z,dx,dy,dz".replace(",", sep)] if header else []) + [
        sep.join(["1", "2", "3", "0.5", "0", "-1"]), "", sep.join(["4", "5.5", "6", "0", "2", "1e-1"])]
    (tmp_path / "k.txt").write_text("\n".join(lines) + "\n")
    p, d = read_keypoint_table(tmp_path / "k.txt")
    np.testing.assert_array_equal(p, [[1, 2, 3], [4, 5.5, 6]])
    np.testing.assert_array_equal(d, [[0.5, 0, -1], [0, 2, 0.1]])


def test_table_trailing_commas_are_tolerated(tmp_path):
    (tmp_path / "k.csv").write_text("x,y,z,dx,dy,dz,\n1,2,3,4,5,6,\n")
    p, d = read_keypoint_table(tmp_path / "k.csv")
    np.testing.assert_array_equal(np.hstack([p, d]), [[1, 2, 3, 4, 5, 6]])


def test_table_header_in_another_order(tmp_path):
    (tmp_path / "k.csv").write_text("dx,dy,dz,x,y,z\n1,2,3,10,20,30\n")
    p, d = read_keypoint_table(tmp_path / "k.csv")
    np.testing.assert_array_equal(p, [[10, 20, 30]])
    np.testing.assert_array_equal(d, [[1, 2, 3]])


@pytest.mark.parametrize("body, pattern", [
    ("x,y,z,dx,dy,dz\n1,2,3,4,5,6\n1,2,3,4,5\n", r"expected 6 columns x,y,z,dx,dy,dz on line 3 .* got 5"),
    ("1,2,3,4,5,6,7\n", r"expected 6 columns .* on line 1 .* got 7"),
    ("1,2,3,4,5,6\n\n1,2,abc,4,5,6\n", r"expected numbers on line 3"),
    ("1,2,3,4,5,6\n1,2,nan,4,5,6\n", r"expected finite numbers on line 2"),
    ("1,2,3,4,5,6\n1,2,3,inf,5,6\n", r"expected finite numbers on line 2"),
    ("a,b,c,d,e,f\n1,2,3,4,5,6\n", r"expected a header naming the columns x,y,z,dx,dy,dz .* on line 1"),
    ("# only a comment\n", r"expected at least one keypoint row"),
])
def test_table_errors_name_the_line(tmp_path, body, pattern):
    (tmp_path / "k.csv").write_text(body)
    with pytest.raises(KeypointError, match=pattern):
        read_keypoint_table(tmp_path / "k.csv")


def test_table_world_frame_needs_affine(tmp_path):
    (tmp_path / "k.csv").write_text("1,2,3,4,5,6\n")
    with pytest.raises(KeypointError, match=r"expected the image affine to convert ras keypoints"):
        read_keypoint_table(tmp_path / "k.csv", frame="ras")


@pytest.mark.parametrize("frame", ["voxel", "ras", "lps"])
def test_table_write_read_round_trip(tmp_path, oblique_affine, frame):
    rng = np.random.default_rng(3)
    pts, dsp = rng.uniform(0, 10, (6, 3)), rng.normal(size=(6, 3))
    path = write_keypoint_table(tmp_path / "k.csv", pts, dsp, frame=frame, affine=oblique_affine)
    assert path.read_text().splitlines()[0] == "x,y,z,dx,dy,dz"
    p, d = read_keypoint_table(path, frame=frame, affine=oblique_affine)
    np.testing.assert_allclose(p, pts, atol=1e-10)
    np.testing.assert_allclose(d, dsp, atol=1e-10)
    if frame == "voxel":  # exact text round trip in voxel frame
        np.testing.assert_array_equal(p, pts)


# ---------------------------------------------------------------------------------------------------- .key

KEY_HEADER = """# featExtract 1.1
# Extraction Voxel Resolution (ijk) : 64 64 40
# Extraction Voxel Size (mm)  (ijk) : 1.000000 1.000000 1.000000
# Feature Coordinate Space: voxels
Features: 3
Scale-space location[x y z scale] orientation[o11 o12 o13 o21 o22 o23 o31 o32 o33] """ + \
    """2nd moment eigenvalues[e1 e2 e3] info flag[i1] descriptor[d1 .. d64]
"""


def _key_row(x, y, z, scale=2.0, o11=1.0):
    vals = [x, y, z, scale, o11, 0, 0, 0, 1, 0, 0, 0, 1, 3.0, 2.0, 1.0]
    return "\t".join(f"{v:.6f}" for v in vals) + "\t0\t" + "\t".join(str(i % 7) for i in range(64)) + "\t"


def test_sift_key_offset_and_duplicates(tmp_path):
    rows = [_key_row(10.5, 20.5, 30.5), _key_row(10.5, 20.5, 30.5, o11=-1.0), _key_row(3.25, 4.5, 5.75)]
    (tmp_path / "a.key").write_text(KEY_HEADER + "\n".join(rows) + "\n")
    pts = read_sift_key(tmp_path / "a.key")
    # the 2nd row repeats the 1st location with another orientation: kept once; order of first appearance
    np.testing.assert_array_equal(pts, [[10.0, 20.0, 30.0], [2.75, 4.0, 5.25]])


def test_sift_key_write_read_round_trip(tmp_path):
    pts = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 30.0], [1.25, 2.5, 63.0]])
    path = write_sift_key(tmp_path / "b.key", pts, scales=[1.0, 2.0, 3.5], shape=(64, 64, 64))
    lines = path.read_text().splitlines()
    assert len(lines) == 6 + 3
    assert lines[5].startswith("Scale-space location")
    row = lines[7].split("\t")
    assert len(row) == 81  # x y z scale + 9 + 3 + 1 + 64
    assert [float(v) for v in row[:4]] == [10.5, 20.5, 30.5, 2.0]  # +0.5 voxel-centre convention
    np.testing.assert_allclose(read_sift_key(path), pts, atol=1e-6)


def test_sift_key_errors(tmp_path):
    (tmp_path / "mm.key").write_text(KEY_HEADER.replace("voxels", "millimeters (gto_xyz)") + _key_row(1, 2, 3))
    with pytest.raises(KeypointError, match=r"expected a \.key file in voxel coordinates"):
        read_sift_key(tmp_path / "mm.key")
    (tmp_path / "nohdr.key").write_text(_key_row(1, 2, 3) + "\n")
    with pytest.raises(KeypointError, match=r"expected a 3D SIFT-Rank \.key header"):
        read_sift_key(tmp_path / "nohdr.key")
    (tmp_path / "bad.key").write_text(KEY_HEADER + _key_row(1, 2, 3) + "\n1.0\tx\t3\t4\n")
    with pytest.raises(KeypointError, match=r"expected numbers on line 8"):
        read_sift_key(tmp_path / "bad.key")
    (tmp_path / "empty.key").write_text(KEY_HEADER)
    with pytest.raises(KeypointError, match=r"expected at least one feature row"):
        read_sift_key(tmp_path / "empty.key")
    # a full row with a NaN descriptor value: the message names the value (it said "got 81" of 81)
    (tmp_path / "nan.key").write_text(KEY_HEADER + _key_row(1, 2, 3).replace("\t6\t", "\tnan\t", 1) + "\n")
    with pytest.raises(KeypointError, match=r"expected 81 finite numbers on line 7 .*, got nan$"):
        read_sift_key_features(tmp_path / "nan.key")


# ----------------------------------------------------------------------------------------- Slicer markups

FCSV_COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"


def _fcsv(path, points, labels, system="RAS", columns=FCSV_COLUMNS):
    lines = ["# Markups fiducial file version = 4.11"]
    if system is not None:
        lines.append(f"# CoordinateSystem = {system}")
    if columns is not None:
        lines.append(columns)
    for n, (p, lab) in enumerate(zip(points, labels, strict=True)):
        lines.append(f"vtkMRMLMarkupsFiducialNode_{n},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,{lab},,")
    path.write_text("\n".join(lines) + "\n")
    return path


def _mrk(path, points, labels, system="RAS"):
    markup = {"type": "Fiducial", "coordinateUnits": "mm", "controlPoints": [
        {"id": str(n), "label": lab, "position": list(map(float, p)), "positionStatus": "defined"}
        for n, (p, lab) in enumerate(zip(points, labels, strict=True))]}
    if system is not None:
        markup["coordinateSystem"] = system
    path.write_text(json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/"
                                "Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                                "markups": [markup]}))
    return path


@pytest.fixture(params=["fcsv", "mrk"])
def writer(request):
    return (_fcsv, ".fcsv") if request.param == "fcsv" else (_mrk, ".mrk.json")


def test_markups_ras_and_lps_parse_equal(tmp_path, oblique_affine, writer):
    write, ext = writer
    shift = np.array([1.0, -2.0, 0.5])  # RAS mm
    ras = np.array([[10.0, 20.0, 30.0]])
    lps = np.array([[-10.0, -20.0, 30.0]])
    a = read_slicer_markups(write(tmp_path / f"pre_ras{ext}", ras, ["A"]),
                            write(tmp_path / f"post_ras{ext}", ras + shift, ["A"]), oblique_affine)
    b = read_slicer_markups(write(tmp_path / f"pre_lps{ext}", lps, ["A"], "LPS"),
                            write(tmp_path / f"post_lps{ext}", lps + shift * [-1, -1, 1], ["A"], "LPS"),
                            oblique_affine)
    np.testing.assert_allclose(a[0], b[0], atol=1e-9)
    np.testing.assert_allclose(a[1], b[1], atol=1e-9)
    # and the values are the RAS point through the inverse affine (computed independently)
    expected = np.linalg.solve(oblique_affine, [10.0, 20.0, 30.0, 1.0])[:3]
    np.testing.assert_allclose(a[0][0], expected, atol=1e-9)
    np.testing.assert_allclose(a[1][0], np.linalg.solve(oblique_affine[:3, :3], shift), atol=1e-9)


def test_fcsv_legacy_numeric_system_and_column_layout(tmp_path, oblique_affine):
    pts = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    ref = read_slicer_markups(_fcsv(tmp_path / "a.fcsv", pts, ["p", "q"]),
                              _fcsv(tmp_path / "b.fcsv", pts + 1, ["p", "q"]), oblique_affine)
    legacy = read_slicer_markups(_fcsv(tmp_path / "c.fcsv", pts * [-1, -1, 1], ["p", "q"], system="1"),
                                 _fcsv(tmp_path / "d.fcsv", (pts + 1) * [-1, -1, 1], ["p", "q"], system="1"),
                                 oblique_affine)
    np.testing.assert_allclose(legacy[0], ref[0], atol=1e-9)
    np.testing.assert_allclose(legacy[1], ref[1], atol=1e-9)
    # a file whose header declares another column order: label first, then z, y, x
    lines = ["# CoordinateSystem = RAS", "# columns = label,z,y,x,desc"]
    lines += [f"{lab},{p[2]},{p[1]},{p[0]},\"a, quoted desc\"" for p, lab in zip(pts + 1, ["q", "p"][::-1],
                                                                                    strict=True)]
    (tmp_path / "e.fcsv").write_text("\n".join(lines) + "\n")
    reordered = read_slicer_markups(tmp_path / "a.fcsv", tmp_path / "e.fcsv", oblique_affine)
    np.testing.assert_allclose(reordered[1], ref[1], atol=1e-9)


@pytest.mark.parametrize("system, pattern", [
    (None, r"expected a .*(CoordinateSystem|coordinateSystem).*got none"),
    ("IJK", r"expected (coordinate system|coordinateSystem) RAS or LPS.*got 'IJK'"),
    ("2", r"expected (coordinate system|coordinateSystem) RAS or LPS.*got '2'"),
])
def test_markups_missing_or_unknown_coordinate_system(tmp_path, oblique_affine, writer, system, pattern):
    write, ext = writer
    good = write(tmp_path / f"good{ext}", [[1.0, 2.0, 3.0]], ["A"])
    bad = write(tmp_path / f"bad{ext}", [[1.0, 2.0, 3.0]], ["A"], system)
    with pytest.raises(KeypointError, match=pattern):
        read_slicer_markups(bad, good, oblique_affine)


def test_markups_label_matching_vs_order_matching(tmp_path, oblique_affine, writer):
    write, ext = writer
    pre = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    shift = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    perm = [2, 0, 1]
    # unique, equal labels: the intraop file lists the points in another order and is matched by label
    by_label = read_slicer_markups(write(tmp_path / f"a{ext}", pre, ["A", "B", "C"]),
                                   write(tmp_path / f"b{ext}", (pre + shift)[perm], ["C", "A", "B"]), oblique_affine)
    expected = np.linalg.solve(oblique_affine[:3, :3], shift.T).T
    np.testing.assert_allclose(by_label[1], expected, atol=1e-9)
    # duplicate labels: matched by order
    by_order = read_slicer_markups(write(tmp_path / f"c{ext}", pre, ["F", "F", "F"]),
                                   write(tmp_path / f"d{ext}", pre + shift, ["F", "F", "F"]), oblique_affine)
    np.testing.assert_allclose(by_order[1], expected, atol=1e-9)
    # disjoint unique labels: by order, with a warning
    with pytest.warns(UserWarning, match=r"share no label; matching 3 points by order"):
        read_slicer_markups(write(tmp_path / f"e{ext}", pre, ["A", "B", "C"]),
                            write(tmp_path / f"f{ext}", pre + shift, ["X", "Y", "Z"]), oblique_affine)
    # order matching needs equal counts
    with pytest.raises(KeypointError, match=r"expected the same number of preop and intraop points.*got 3 .* and 2"):
        read_slicer_markups(write(tmp_path / f"g{ext}", pre, ["F", "F", "F"]),
                            write(tmp_path / f"h{ext}", pre[:2], ["F", "F"]), oblique_affine)
    # a landmark missing intraop (e.g. Slicer's positionStatus "missing"): the others still match by label
    with pytest.warns(UserWarning, match=r"matching the 2 markups labels present in both files; dropped 1 .*: B"):
        pts, disps = read_slicer_markups(write(tmp_path / f"i{ext}", pre, ["A", "B", "C"]),
                                         write(tmp_path / f"j{ext}", (pre + shift)[[2, 0]], ["C", "A"]),
                                         oblique_affine)
    np.testing.assert_allclose(disps, expected[[0, 2]], atol=1e-9)
    assert pts.shape == (2, 3)


def test_mrk_json_skips_undefined_points_and_checks_units(tmp_path, oblique_affine):
    doc = {"markups": [{"coordinateSystem": "LPS", "controlPoints": [
        {"label": "A", "position": [1, 2, 3], "positionStatus": "defined"},
        {"label": "B", "position": [0, 0, 0], "positionStatus": "undefined"}]}]}
    (tmp_path / "a.mrk.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match=r"skipping control point 'B'"):
        p, _ = read_slicer_markups(tmp_path / "a.mrk.json", tmp_path / "a.mrk.json", oblique_affine)
    assert p.shape == (1, 3)
    doc["markups"][0]["coordinateUnits"] = "um"
    (tmp_path / "b.mrk.json").write_text(json.dumps(doc))
    with pytest.raises(KeypointError, match=r"expected coordinateUnits 'mm'"):
        read_slicer_markups(tmp_path / "b.mrk.json", tmp_path / "b.mrk.json", oblique_affine)


@pytest.mark.parametrize("markups, expected", [
    ([{"coordinateSystem": "RAS", "controlPoints": {"A": [1, 2, 3]}}], r"expected a 'controlPoints' list .* got dict"),
    ([{"coordinateSystem": "RAS", "controlPoints": [1, 2]}], r"expected control point 0 of markup 0 .* got 1"),
    ([], r"expected a non-empty 'markups' list .* got an empty list"),
])
def test_mrk_json_malformed_control_points_are_keypoint_errors(tmp_path, oblique_affine, markups, expected):
    # a hand-edited or foreign .mrk.json: a one-line KeypointError, never an AttributeError
    (tmp_path / "a.mrk.json").write_text(json.dumps({"markups": markups}))
    with pytest.raises(KeypointError, match=expected):
        read_slicer_markups(tmp_path / "a.mrk.json", tmp_path / "a.mrk.json", oblique_affine)


# ----------------------------------------------------------------------------------------------- dispatch


def test_read_keypoints_dispatch(tmp_path, oblique_affine):
    (tmp_path / "k.csv").write_text("1,2,3,4,5,6\n")
    p, d = read_keypoints(tmp_path / "k.csv")
    np.testing.assert_array_equal(p, [[1, 2, 3]])
    pre = _fcsv(tmp_path / "pre.fcsv", [[1.0, 2.0, 3.0]], ["A"])
    post = _fcsv(tmp_path / "post.fcsv", [[2.0, 2.0, 3.0]], ["A"])
    p, d = read_keypoints(pre, affine=oblique_affine, intraop_path=post)
    np.testing.assert_allclose(oblique_affine[:3, :3] @ d[0], [1.0, 0.0, 0.0], atol=1e-9)
    with pytest.raises(KeypointError, match=r"expected an intraop markups file"):
        read_keypoints(pre, affine=oblique_affine)
    write_sift_key(tmp_path / "k.key", np.zeros((1, 3)))
    with pytest.raises(KeypointError, match=r"holds locations only"):
        read_keypoints(tmp_path / "k.key")
    with pytest.raises(InputFileError, match=r"expected a keypoint file ending in"):
        read_keypoints(tmp_path / "k.json")
    with pytest.raises(InputFileError, match=r"not found"):
        read_keypoints(tmp_path / "missing.csv")


# ------------------------------------------------------------------------------------------- validation

TETRA = np.array([[1.0, 1.0, 1.0], [10.0, 1.0, 1.0], [1.0, 10.0, 1.0], [1.0, 1.0, 10.0], [5.0, 5.0, 5.0]])


def test_validate_accepts_good_keypoints():
    d = np.arange(15, dtype=float).reshape(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p, dd = validate_keypoints(TETRA, d, OBLIQUE_SHAPE)
    np.testing.assert_array_equal(p, TETRA)
    np.testing.assert_array_equal(dd, d)


def test_validate_non_finite():
    d = np.zeros((5, 3))
    d[2, 1] = np.nan
    with pytest.raises(KeypointError, match=r"expected finite keypoints and displacements, got NaN or inf in "
                                            r"keypoint 2"):
        validate_keypoints(TETRA, d, OBLIQUE_SHAPE)


@pytest.mark.parametrize("bad", [[-0.5, 1.0, 1.0], [1.0, 23.5, 1.0], [1.0, 1.0, 11.01]])
def test_validate_outside_image(bad):
    pts = np.vstack([TETRA, bad])
    with pytest.raises(KeypointError, match=r"expected keypoints inside the image .*image shape \(20, 24, 12\).*"
                                            r"got 1 outside, the first being keypoint 5 at voxel"):
        validate_keypoints(pts, np.zeros((6, 3)), OBLIQUE_SHAPE)
    # the last voxel centre itself is inside
    edge = np.vstack([TETRA, [19.0, 23.0, 11.0]])
    assert len(validate_keypoints(edge, np.zeros((6, 3)), OBLIQUE_SHAPE)[0]) == 6


def test_validate_identical_duplicates_merge_with_warning():
    pts = np.vstack([TETRA, TETRA[1]])
    d = np.vstack([np.ones((5, 3)), np.ones((1, 3))])
    with pytest.warns(UserWarning, match=r"merged 1 duplicate keypoint\(s\) with identical displacements: "
                                         r"keypoints 5 \(= 1 at \(10, 1, 1\)\)"):
        p, dd = validate_keypoints(pts, d, OBLIQUE_SHAPE)
    np.testing.assert_array_equal(p, TETRA)
    assert dd.shape == (5, 3)


def test_validate_conflicting_duplicates():
    pts = np.vstack([TETRA, TETRA[1]])
    d = np.zeros((6, 3))
    d[5] = [0.0, 2.0, 0.0]
    with pytest.raises(KeypointError, match=r"expected one displacement per keypoint location, got keypoints 1 and 5 "
                                            r"at voxel \(10, 1, 1\) with displacements \(0, 0, 0\) and \(0, 2, 0\)"):
        validate_keypoints(pts, d, OBLIQUE_SHAPE)


def test_validate_too_few():
    with pytest.raises(KeypointError, match=r"expected at least 4 distinct keypoints, got 3"):
        validate_keypoints(TETRA[:3], np.zeros((3, 3)), OBLIQUE_SHAPE)
    # duplicates do not count twice
    with pytest.raises(KeypointError, match=r"got 3"), pytest.warns(UserWarning):
        validate_keypoints(np.vstack([TETRA[:3], TETRA[:1]]), np.zeros((4, 3)), OBLIQUE_SHAPE)


def test_validate_coplanar():
    # six points all with k = 4 (the example: all with z = 40)
    pts = np.array([[1, 1, 4], [10, 1, 4], [1, 10, 4], [10, 10, 4], [5, 3, 4], [2, 7, 4]], dtype=float)
    with pytest.raises(KeypointError, match=r"all 6 keypoints lie in one plane"):
        validate_keypoints(pts, np.zeros((6, 3)), OBLIQUE_SHAPE)
    # an oblique plane too, and a line
    tilted = pts.copy()
    tilted[:, 2] = 1 + 0.5 * pts[:, 0]
    with pytest.raises(KeypointError, match=r"all 6 keypoints lie in one plane"):
        validate_keypoints(tilted, np.zeros((6, 3)), OBLIQUE_SHAPE)
    line = np.array([[t, t, 1.0] for t in range(1, 7)])
    with pytest.raises(KeypointError, match=r"all 6 keypoints lie on one line .*off that line$"):
        validate_keypoints(line, np.zeros((6, 3)), OBLIQUE_SHAPE)
    # one point off the plane is enough
    off = np.vstack([pts, [5.0, 5.0, 6.0]])
    assert len(validate_keypoints(off, np.zeros((7, 3)), OBLIQUE_SHAPE)[0]) == 7


def test_validate_shape_mismatch():
    with pytest.raises(KeypointError, match=r"expected keypoints and displacements of equal shape \(N, 3\)"):
        validate_keypoints(TETRA, np.zeros((4, 3)), OBLIQUE_SHAPE)


def test_table_comments_after_a_row_and_after_the_header(tmp_path):
    path = tmp_path / "kp.csv"
    path.write_text("x,y,z,dx,dy,dz  # voxel frame\n# a whole-line comment\n120,96,70,0,0,-4  # README example\n"
                    "1,2,3,0.5,0,0\n")
    pts, disps = read_keypoint_table(path)
    np.testing.assert_array_equal(pts, [[120, 96, 70], [1, 2, 3]])
    np.testing.assert_array_equal(disps, [[0, 0, -4], [0.5, 0, 0]])


def test_table_with_extra_named_columns_reads_the_six(tmp_path):
    """register's matches.csv (the six columns plus scores) is a valid -k table: extra named columns are
    ignored; a row must still have the header's column count, and each of the six must be named exactly once."""
    from brainshift.io.keypoints import read_keypoint_table

    p = tmp_path / "matches.csv"
    p.write_text("x,y,z,dx,dy,dz,ratio,note\n1,2,3,0.5,-0.5,0.25,0.4,good\n4,5,6,0,0,1,0.9,ok\n")
    pts, d = read_keypoint_table(p)
    np.testing.assert_array_equal(pts, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(d, [[0.5, -0.5, 0.25], [0, 0, 1]])
    p.write_text("x,y,z,dx,dy,dz,ratio\n1,2,3,0.5,-0.5,0.25\n")
    with pytest.raises(KeypointError, match="7 columns as in the header on line 2"):
        read_keypoint_table(p)
    p.write_text("x,y,z,dx,dy,dz,x\n1,2,3,0.5,-0.5,0.25,9\n")
    with pytest.raises(KeypointError, match="expected a header naming the columns"):
        read_keypoint_table(p)


def test_sift_key_row_with_more_than_81_values_is_refused_by_both_readers(tmp_path):
    # the 2nd feature row (line 9: a blank line 8 between) has one value too many, as when two rows run together;
    # read_sift_key_features cut it to its first 81 values and read_sift_key took its first 3, silently
    rows = [_key_row(10.5, 20.5, 30.5), "", _key_row(3.25, 4.5, 5.75) + "7", _key_row(7.5, 8.5, 9.5)]
    (tmp_path / "long.key").write_text(KEY_HEADER + "\n".join(rows) + "\n")
    for reader in (read_sift_key, read_sift_key_features):
        with pytest.raises(KeypointError, match=r"^expected at most 81 values \(x y z scale, 9 orientation, 3 "
                                                r"eigenvalues, info flag, 64 descriptor values\) on line 9 of "
                                                r"'.*long\.key' \(feature row 2\), got 82$"):
            reader(tmp_path / "long.key")


def test_sift_key_features_write_read_round_trip_with_descriptors(tmp_path):
    # the writer's rows have exactly 81 values: the refusal of longer rows keeps its own files readable
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 30, size=(7, 3))
    desc = np.argsort(rng.random((7, 64)), axis=1)
    path = write_sift_key(tmp_path / "d.key", pts, rng.uniform(1, 4, size=7), shape=(32, 32, 32),
                          spacing_mm=(1.0, 1.0, 1.5), descriptors=desc)
    assert {len(row.split("\t")) for row in path.read_text().splitlines()[6:]} == {81}
    feats = read_sift_key_features(path)
    np.testing.assert_allclose(feats.points_vox, pts, atol=1e-6)
    np.testing.assert_array_equal(feats.descriptors, desc.astype(np.float32))


def test_sift_key_header_grid_is_read_and_checked_against_an_image(tmp_path):
    from brainshift.io.keypoints import check_sift_key_grid

    row = _key_row(10.5, 20.5, 30.5)
    (tmp_path / "a.key").write_text(KEY_HEADER.replace("Features: 3", "Features: 1") + row + "\n")  # 64 64 40, 1 mm
    feats = read_sift_key_features(tmp_path / "a.key")
    assert feats.grid_shape == (64, 64, 40) and feats.spacing_mm == (1.0, 1.0, 1.0)
    # the image's shape, or (featExtract -2+ / -2-: extraction on a doubled / halved grid, coordinates of the
    # input grid) that shape doubled or halved; the voxel size to 0.1 %
    check_sift_key_grid(feats, (64, 64, 40), (1.0, 1.0, 1.0), key_path="a.key", image="-a 'i'")
    check_sift_key_grid(feats, (32, 32, 20), (1.0005, 1.0, 1.0), key_path="a.key", image="-a 'i'")
    check_sift_key_grid(feats, (129, 129, 81), (1.0, 1.0, 1.0), key_path="a.key", image="-a 'i'")  # 64 = 129 // 2
    with pytest.raises(KeypointError, match=r"^expected the header of 'a\.key' to record the grid of -a 'i': "
                                            r"'Extraction Voxel Resolution' \(64, 40, 64\) .* got \(64, 64, 40\); "
                                            r"was the \.key file made from this image\?$"):
        check_sift_key_grid(feats, (64, 40, 64), (1.0, 1.0, 1.0), key_path="a.key", image="-a 'i'")
    with pytest.raises(KeypointError, match=r"'Extraction Voxel Size' \(1, 1, 1\.2\) mm, got \(1, 1, 1\) mm"):
        check_sift_key_grid(feats, (64, 64, 40), (1.0, 1.0, 1.2), key_path="a.key", image="-a 'i'")


def test_sift_key_header_without_a_grid_records_nothing(tmp_path):
    from brainshift.io.keypoints import check_sift_key_grid

    # write_sift_key without shape / spacing writes zeros: not recorded, so not compared with any image
    path = write_sift_key(tmp_path / "z.key", np.zeros((1, 3)))
    assert "(ijk) : 0 0 0" in path.read_text() and "(ijk) : 0.000000 0.000000 0.000000" in path.read_text()
    feats = read_sift_key_features(path)
    assert feats.grid_shape is None and feats.spacing_mm is None
    check_sift_key_grid(feats, (5, 6, 7), (0.5, 0.5, 3.0), key_path=path, image="-a 'i'")
    # a header line that is no three numbers: a warning, the features are read, the grid is not compared
    header = KEY_HEADER.replace("64 64 40", "64 x 40").replace("Features: 3", "Features: 1")
    (tmp_path / "bad.key").write_text(header + _key_row(1, 2, 3) + "\n")
    with pytest.warns(UserWarning, match=r"expected three non-negative numbers on the header line "
                                         r"'# Extraction Voxel Resolution \(ijk\) : 64 x 40' .*not compared"):
        feats = read_sift_key_features(tmp_path / "bad.key")
    assert feats.grid_shape is None and feats.spacing_mm == (1.0, 1.0, 1.0)


def test_truncated_sift_key_warns_in_both_readers(tmp_path):
    """The header declares 3 features; a file cut after 2 rows is read with a warning naming both counts (some
    tools write a placeholder count, so not an error); 3 rows: no warning."""
    import warnings

    from brainshift.io.keypoints import read_sift_key_features

    rows = [_key_row(10.5, 20.5, 30.5), _key_row(3.25, 4.5, 5.75), _key_row(7.5, 8.5, 9.5)]
    (tmp_path / "cut.key").write_text(KEY_HEADER + "\n".join(rows[:2]) + "\n")
    for reader in (read_sift_key, read_sift_key_features):
        with pytest.warns(UserWarning, match=r"has 2 feature rows but its header says 'Features: 3'; is the file "
                                             r"truncated"):
            reader(tmp_path / "cut.key")
    (tmp_path / "full.key").write_text(KEY_HEADER + "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_sift_key(tmp_path / "full.key")) == 3
        assert len(read_sift_key_features(tmp_path / "full.key").points_vox) == 3


def test_check_keypoint_pairs_refuses_values_that_are_not_real_numbers():
    # complex keypoints lost their imaginary part silently; text raised numpy's ValueError
    from brainshift.io.keypoints import check_keypoint_pairs

    pts = np.arange(12, dtype=float).reshape(4, 3)
    with pytest.raises(KeypointError, match=r"^expected keypoints as real numbers of shape \(N, 3\), got complex128 "
                                            r"values of shape \(4, 3\)$"):
        check_keypoint_pairs(pts + 1j, pts)
    with pytest.raises(KeypointError, match=r"^expected displacements as real numbers of shape \(N, 3\), got <U1 "
                                            r"values of shape \(4, 3\)$"):
        check_keypoint_pairs(pts, np.full((4, 3), "x"))
    p, d = check_keypoint_pairs(pts.astype(str), pts.tolist())  # numbers as text or lists are numbers
    assert p.dtype == d.dtype == np.float64 and np.array_equal(p, pts)


# ------------------------------------------------------------- malformed keypoint files through the command line


def _infer_with(tmp_path, *kpt_args):
    from typer.testing import CliRunner

    from brainshift.cli import app

    image, _ = write_small_case(tmp_path)
    out = tmp_path / "out"
    return CliRunner().invoke(app, ["infer", "-p", str(image), *kpt_args, "--no-refine", "-q", "-o", str(out)]), out


def test_table_not_utf8_names_the_line_and_byte(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("x,y,z,dx,dy,dz\n# caf\xe9\n1,2,3,0,0,0\n".encode("latin-1"))
    res, out = _infer_with(tmp_path, "-k", str(tmp_path / "latin1.csv"))
    assert_one_line_error(res, out, "expected a UTF-8 text keypoint table", "byte 0xe9 on line 2 (column 6)")
    (tmp_path / "utf16.csv").write_bytes("x,y,z,dx,dy,dz\n1,2,3,0,0,0\n".encode("utf-16"))
    res, out = _infer_with(tmp_path, "-k", str(tmp_path / "utf16.csv"))
    assert_one_line_error(res, out, "expected a UTF-8 text keypoint table", "UTF-16")


def test_a_very_long_table_line_is_cut_in_the_message(tmp_path):
    (tmp_path / "long.csv").write_text("x,y,z,dx,dy,dz\n" + "1," * 50_000 + "1\n")
    res, out = _infer_with(tmp_path, "-k", str(tmp_path / "long.csv"))
    line = assert_one_line_error(res, out, "expected 6 columns", "got 50001", "...'")
    assert len(line) < 300


def test_deeply_nested_markups_json_is_one_line_error(tmp_path):
    (tmp_path / "deep.mrk.json").write_text("[" * 100_000 + "]" * 100_000)
    _mrk(tmp_path / "intra.mrk.json", np.zeros((4, 3)), ["a", "b", "c", "d"])
    res, out = _infer_with(tmp_path, "-k", str(tmp_path / "deep.mrk.json"), "--kpt-intraop",
                           str(tmp_path / "intra.mrk.json"))
    assert_one_line_error(res, out, "expected a JSON Slicer markups file", "nested too deeply")


def test_missing_keypoint_file_message_reads_naturally_on_the_command_line(tmp_path):
    # was "expected an existing keypoint table file file, got 'nonexist.csv' (not found)": the reader passed
    # "keypoint table file" to a helper that adds " file" itself
    res, out = _infer_with(tmp_path, "-k", str(tmp_path / "nonexist.csv"))
    line = assert_one_line_error(res, out, "expected an existing keypoint table file, got ")
    assert "file file" not in line and line.endswith("nonexist.csv' (not found)"), line


@pytest.mark.parametrize(("name", "read", "what"), [
    ("k.csv", lambda p: read_keypoint_table(p), "keypoint table"),
    ("k.csv", lambda p: read_keypoint_positions(p), "keypoint table"),
    ("k.key", lambda p: read_sift_key(p), ".key"),
    ("k.key", lambda p: read_sift_key_features(p), ".key"),
    ("k.fcsv", lambda p: read_slicer_markups(p, p, np.eye(4)), "Slicer markups"),
    ("k.mrk.json", lambda p: read_slicer_markups(p, p, np.eye(4)), "Slicer markups"),
])
def test_every_keypoint_reader_names_a_missing_directory_or_non_utf8_file_once(tmp_path, name, read, what):
    """Each reader's messages for a missing file, a directory and non-UTF-8 bytes say "file" once (the path
    helpers add the word to the reader's noun)."""
    missing, folder, latin1 = tmp_path / "missing" / name, tmp_path / "folder" / name, tmp_path / "latin1" / name
    folder.mkdir(parents=True)
    latin1.parent.mkdir()
    latin1.write_bytes("# caf\xe9\n".encode("latin-1"))
    for path, expected in ((missing, f"expected an existing {what} file, got {str(missing)!r} (not found)"),
                           (folder, f"expected the {what} to be a file, got a directory {str(folder)!r}"),
                           (latin1, f"expected a UTF-8 text {what} file, got {str(latin1)!r} with the byte 0xe9")):
        with pytest.raises(InputFileError) as info:
            read(path)
        assert str(info.value).startswith(expected) and "file file" not in str(info.value), str(info.value)
