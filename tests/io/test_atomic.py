"""atomic_output / check_output_file: a file is written whole under a temporary name, or not at all."""

from __future__ import annotations

import pytest
from _io_helpers import assert_one_line_error, write_small_case
from typer.testing import CliRunner

from brainshift.cli import app
from brainshift.errors import InputFileError
from brainshift.io.atomic import atomic_output, check_output_file


def test_a_file_where_the_output_folder_should_be_is_named(tmp_path):
    """``-o notes.txt/table.csv`` failed in mkdir with "File exists". Expected: the file in the way named."""
    (tmp_path / "notes.txt").write_text("mine")
    target = tmp_path / "notes.txt" / "sub" / "table.csv"
    with pytest.raises(InputFileError, match=r"expected a folder to write .*table\.csv into, got .*notes\.txt, "
                                             r"an existing file"):
        check_output_file(target)
    with pytest.raises(InputFileError, match=r"an existing file"), atomic_output(target) as tmp:
        tmp.write_text("x")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    check_output_file(tmp_path / "new" / "folders" / "t.csv")  # missing folders are fine: created on writing


def test_match_and_evaluate_landmarks_refuse_it_before_any_work(tmp_path):
    image, _ = write_small_case(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "a.key").write_text("not read: the output is checked first\n")
    res = CliRunner().invoke(app, ["match", str(tmp_path / "a.key"), str(tmp_path / "a.key"), "-a", str(image),
                                   "-b", str(image), "-o", str(tmp_path / "notes.txt" / "m.csv")])
    assert_one_line_error(res, tmp_path / "notes.txt.d", "expected a folder to write", "an existing file")
    res = CliRunner().invoke(app, ["evaluate-landmarks", "--preop-landmarks", str(tmp_path / "a.tag"),
                                   "--field", str(tmp_path / "f.npz"), "-o", str(tmp_path / "notes.txt" / "t.csv")])
    assert_one_line_error(res, tmp_path / "notes.txt.d", "expected a folder to write", "an existing file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
