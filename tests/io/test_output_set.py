"""OutputSet's manifest (``summary.json`` of an earlier run in ``-o``): what is not brainshift's is refused."""

from __future__ import annotations

from _io_helpers import assert_one_line_error, write_small_case
from typer.testing import CliRunner

from brainshift.cli import app


def test_a_deeply_nested_summary_json_in_the_output_folder_is_refused_and_kept(tmp_path):
    """json recursed once per nesting level: a RecursionError traceback. Expected: refused as not brainshift's
    manifest, and the folder left as it was."""
    image, table = write_small_case(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    deep = "[" * 100_000 + "]" * 100_000
    (out / "summary.json").write_text(deep)
    res = CliRunner().invoke(app, ["infer", "-p", str(image), "-k", str(table), "--no-refine", "-q", "-o", str(out)])
    # the folder holds the user's file only, so the "nothing left" check is on the file list instead
    assert_one_line_error(res, tmp_path / "not_used", "summary.json of an earlier brainshift run",
                          "got a file brainshift did not write")
    assert [p.name for p in out.iterdir()] == ["summary.json"] and (out / "summary.json").read_text() == deep
