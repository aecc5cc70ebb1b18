"""Durability of the output writers: one ``os.fsync`` of each file before the rename that publishes it, one of
each changed folder after the renames (``brainshift.io.atomic``, ``brainshift.io.output_set``).

``os.fsync`` and ``os.replace`` are replaced by recorders; a file is recognised by its inode, which a rename keeps.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from brainshift.io import atomic
from brainshift.io.atomic import atomic_output, fsync_dir, fsync_file
from brainshift.io.output_set import OutputError, OutputSet


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def events(monkeypatch):
    """Record ``("fsync", inode, is_dir)`` and ``("replace", src, dst)`` in call order."""
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        log.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def _syncs_of(log, path: Path) -> list[int]:
    ino = path.stat().st_ino
    return [i for i, e in enumerate(log) if e[0] == "fsync" and e[1] == ino]


def _rename_to(log, path: Path) -> int:
    hits = [i for i, e in enumerate(log) if e[0] == "replace" and e[2] == path]
    assert len(hits) == 1, f"expected one rename to {path}, got {len(hits)}"
    return hits[0]


def _earlier_run(out: Path) -> None:
    with OutputSet(out, ["a.txt", "old.txt"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("first a"))
        outputs.write("old.txt", lambda p: p.write_text("first old"))
        outputs.commit({"command": "test"})


def test_commit_syncs_each_file_once_before_its_rename_and_the_folder_once_after(tmp_path, events):
    out = tmp_path / "out"
    _earlier_run(out)
    events.clear()
    with OutputSet(out, ["a.txt", "b.bin", "c.json"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("second a"))
        outputs.write("b.bin", lambda p: p.write_bytes(b"\x00" * 4096))
        with atomic_output(outputs.staging / "c.json") as tmp:  # a writer of its own, as the demo's
            tmp.write_text("{}")
        outputs.adopt_staged()
        outputs.commit({"command": "test"})
    published = ["a.txt", "b.bin", "c.json", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["outputs"] == published
    assert not (out / "old.txt").exists()  # listed by the earlier run, not written again
    for name in published:
        syncs = _syncs_of(events, out / name)
        assert len(syncs) == 1, f"{name}: expected one fsync (atomic_output defers to the commit), got {len(syncs)}"
        assert syncs[0] < _rename_to(events, out / name), f"{name} was published before its data were synced"
    last_rename = max(i for i, e in enumerate(events) if e[0] == "replace")
    folder = _syncs_of(events, out)
    assert len(folder) == 1 and folder[0] > last_rename, "the folder is synced once, after every rename"
    assert events[folder[0]][2] is True
    # cheap: one fsync per published file and one for the folder, nothing else
    assert sum(e[0] == "fsync" for e in events) == len(published) + 1


def test_a_new_output_folder_is_synced_in_its_parent(tmp_path, events):
    out = tmp_path / "new" / "out"
    with OutputSet(out, ["a.txt"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("a"))
        outputs.commit({})
    last_rename = max(i for i, e in enumerate(events) if e[0] == "replace")
    for folder in (out, out.parent, tmp_path):  # each holds a new name: a file, out, new
        syncs = _syncs_of(events, folder)
        assert len(syncs) == 1 and syncs[0] > last_rename, folder


def test_nested_outputs_sync_each_folder_that_changed_once(tmp_path, events):
    out = tmp_path / "out"
    out.mkdir()
    names = ["cases/c00/field.npz", "cases/c00/meta.json", "subjects/s0/t1.nii.gz", "dataset.json"]
    with OutputSet(out, names) as outputs:
        for name in names:
            outputs.write(name, lambda p: p.write_text(p.name))
        outputs.commit({})
    last_rename = max(i for i, e in enumerate(events) if e[0] == "replace")
    for folder in (out / "cases" / "c00", out / "cases", out / "subjects" / "s0", out / "subjects", out):
        syncs = _syncs_of(events, folder)
        assert len(syncs) == 1 and syncs[0] > last_rename, folder
    for name in [*names, "summary.json"]:
        syncs = _syncs_of(events, out / name)
        assert len(syncs) == 1 and syncs[0] < _rename_to(events, out / name), name


def test_atomic_output_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, events):
    target = tmp_path / "x.json"
    with atomic_output(target) as tmp:
        tmp.write_text('{"a": 1}')
    rename = _rename_to(events, target)
    assert _syncs_of(events, target) == [rename - 1]
    assert _syncs_of(events, tmp_path) == [rename + 1]


def test_atomic_output_leaves_no_file_when_the_sync_fails(tmp_path, monkeypatch):
    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    (tmp_path / "x.json").write_text("old")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="Input/output error"), atomic_output(tmp_path / "x.json") as tmp:
        tmp.write_text("new")
    assert _snapshot(tmp_path) == {"x.json": b"old"}


def _fail_fsync(monkeypatch, *, dirs: bool, err: int):
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode) == dirs:
            raise OSError(err, os.strerror(err))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_file_that_cannot_be_synced_fails_the_run_and_changes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_run(out)
    (out / "mine.txt").write_text("user")
    before = _snapshot(out)
    _fail_fsync(monkeypatch, dirs=False, err=errno.EIO)
    with pytest.raises(OutputError) as info, OutputSet(out, ["a.txt"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("second"))
        outputs.commit({})
    message = str(info.value)
    assert str(out / "a.txt") in message and "Input/output error" in message and "\n" not in message
    assert _snapshot(out) == before


def test_a_folder_that_cannot_be_synced_is_rolled_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_run(out)
    before = _snapshot(out)
    _fail_fsync(monkeypatch, dirs=True, err=errno.EIO)
    with pytest.raises(OutputError, match="sync the folder .*Input/output error"), \
            OutputSet(out, ["a.txt", "sub/b.txt"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("second"))
        outputs.write("sub/b.txt", lambda p: p.write_text("b"))
        outputs.commit({})
    assert _snapshot(out) == before


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOTSUP])
def test_a_file_system_that_cannot_sync_folders_is_no_error(tmp_path, monkeypatch, err):
    out = tmp_path / "out"
    _fail_fsync(monkeypatch, dirs=True, err=err)
    with OutputSet(out, ["a.txt"]) as outputs:
        outputs.write("a.txt", lambda p: p.write_text("a"))
        outputs.commit({})
    assert (out / "a.txt").read_text() == "a"


def test_a_folder_that_cannot_be_opened_is_not_synced(tmp_path, monkeypatch):
    """Windows refuses to open a folder as a file (PermissionError); fsync_dir then does nothing."""
    real_open = os.open

    def open_(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    fsync_dir(tmp_path)  # no error


def test_no_folder_sync_on_windows_and_a_writable_handle_for_files(tmp_path, monkeypatch):
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def open_(path, flags, *args):
        opened.append((str(path), flags))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(atomic.os, "name", "nt")
    try:
        fsync_dir(tmp_path)
        fsync_file(f)
    finally:
        monkeypatch.undo()
    assert opened == [(str(f), os.O_RDWR | getattr(os, "O_BINARY", 0))]  # Windows' fsync needs a write handle
