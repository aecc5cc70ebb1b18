"""OutputSet with outputs in sub-folders (``cases/c00/meta.json``, as ``brainshift simulate`` writes): the same
all-or-nothing and ownership rules as for plain file names."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from brainshift.io.output_set import OutputError, OutputSet, is_output_name


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _run(out: Path, names: list[str], text: str = "x") -> None:
    with OutputSet(out, names) as outputs:
        for name in names:
            outputs.write(name, lambda p: p.write_text(f"{text} {p.name}"))
        outputs.commit({})


@pytest.mark.parametrize("name,ok", [
    ("a.txt", True), ("cases/c00/meta.json", True), ("../a.txt", False), ("/etc/passwd", False),
    ("a//b", False), ("./a", False), ("a\\b", False), ("", False), (".brainshift-staging-1-x/a", False),
])
def test_output_names_stay_below_the_folder(name, ok):
    assert is_output_name(name) is ok


def test_a_rerun_replaces_the_earlier_tree_and_removes_what_it_does_not_write_again(tmp_path):
    out = tmp_path / "out"
    _run(out, ["cases/a_c00/meta.json", "cases/a_c00/field.npz", "dataset.json"], "first")
    (out / "cases" / "notes.txt").write_text("user")  # a user's file beside our sub-folders
    _run(out, ["cases/b_c00/meta.json", "dataset.json"], "second")
    after = _snapshot(out)
    assert after == {"cases": None, "cases/b_c00": None, "cases/b_c00/meta.json": b"second meta.json",
                     "cases/notes.txt": b"user", "dataset.json": b"second dataset.json",
                     "summary.json": (out / "summary.json").read_bytes()}  # cases/a_c00 emptied, then removed
    assert json.loads(after["summary.json"])["outputs"] == ["cases/b_c00/meta.json", "dataset.json", "summary.json"]


def test_a_users_file_at_a_nested_output_name_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    (out / "cases" / "c00").mkdir(parents=True)
    (out / "cases" / "c00" / "meta.json").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(OutputError, match="brainshift did not write"):
        OutputSet(out, ["cases/c00/meta.json"])
    assert _snapshot(out) == before


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_file_or_link_where_a_sub_folder_goes_is_refused(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if kind == "file":
        (out / "cases").write_text("mine")
    else:
        (out / "cases").symlink_to(elsewhere, target_is_directory=True)
    before = _snapshot(out)
    with pytest.raises(OutputError, match=f"expected a folder or nothing at .*cases.*got a {kind}"):
        OutputSet(out, ["cases/c00/meta.json"])
    assert _snapshot(out) == before and not any(elsewhere.iterdir())


def test_a_manifest_naming_paths_outside_the_folder_touches_nothing_there(tmp_path):
    out = tmp_path / "out"
    _run(out, ["a.txt"])
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    summary = json.loads((out / "summary.json").read_text())
    summary["outputs"] += ["../outside.txt", str(outside)]
    (out / "summary.json").write_text(json.dumps(summary))
    _run(out, ["b.txt"])
    assert outside.read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "summary.json"]


def test_adopt_staged_takes_the_tree_with_the_markers_last(tmp_path):
    out = tmp_path / "out"
    with OutputSet(out) as outputs:
        for name in ["cases/c/meta.json", "cases/c/field.npz", "cases/c/png.png", "dataset.json", "s/subject.json",
                     "s/t1.nii.gz"]:
            p = outputs.staging / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(name)
        names = outputs.adopt_staged(recursive=True, last=("subject.json", "meta.json", "dataset.json"))
        outputs.commit({})
    assert names == ["cases/c/field.npz", "cases/c/png.png", "s/t1.nii.gz", "s/subject.json", "cases/c/meta.json",
                     "dataset.json"]
    assert json.loads((out / "summary.json").read_text())["outputs"] == [*names, "summary.json"]


def test_adopt_staged_refuses_a_sub_folder_unless_recursive(tmp_path):
    with pytest.raises(OutputError, match="got a folder sub"), OutputSet(tmp_path / "out") as outputs:
        (outputs.staging / "sub").mkdir()
        outputs.adopt_staged()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("step", range(6))
def test_a_failed_rename_of_a_tree_is_undone(tmp_path, monkeypatch, step):
    """The earlier run's 3 files are set aside, then 3 new ones moved in (new sub-folders made): a full disk at
    any rename leaves the folder as it was, the sub-folders made for the new set removed again."""
    out = tmp_path / "out"
    _run(out, ["cases/a/meta.json", "dataset.json"], "first")
    before = _snapshot(out)
    real_replace = os.replace
    count = {"n": 0}

    def replace(src, dst):
        count["n"] += 1
        if count["n"] - 1 == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError, match="No space left on device"):
        _run(out, ["cases/b/meta.json", "dataset.json"], "second")
    assert _snapshot(out) == before
