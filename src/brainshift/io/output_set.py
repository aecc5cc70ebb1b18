"""All-or-nothing output of a run: stage every file in a hidden folder inside ``-o``, then move the set into place.

A command that writes several files (``infer``, ``register``) opens an :class:`OutputSet` on its output folder,
writes each file to :meth:`OutputSet.path` (a path in the staging folder ``-o/.brainshift-staging-*``) through
:meth:`OutputSet.write`, and calls :meth:`OutputSet.commit` with the run's manifest (``summary.json``). Until
the commit nothing in ``-o`` changes; any failure (a full disk at any write, an exception between writes, bad
input found late) removes the staging folder, and ``-o`` is left exactly as it was (a folder the run created is
removed again). The commit renames files (same file system, no new data written) and rolls back on failure.

Durability: before the first rename the commit flushes every staged file's data to the disk (one ``os.fsync`` per
file; :func:`brainshift.io.atomic.atomic_output` inside the staging folder leaves this to the commit), and after
the renames it syncs each folder that gained or lost a name (one ``os.fsync`` per folder, skipped where the
platform cannot sync a folder, e.g. Windows), so a set that has appeared survives a power loss complete.

Output names are file names or relative paths with ``/`` (``cases/s0000_c00/meta.json``, for commands that write
a folder tree such as ``simulate``); the sub-folders are created by the commit (and removed again on failure).

Ownership: ``summary.json`` lists, under ``"outputs"``, every file a run wrote. A re-run replaces only files
that the previous ``summary.json`` lists (and removes those it lists but does not write again); any other file
or directory at an output path belongs to the user and is an error, never deleted or overwritten.

Usage (what ``brainshift register`` and any new multi-file command should do)::

    with OutputSet(out, names) as outputs:          # refuses a user's file in the way, before any work
        outputs.write("field.h5", lambda p: write_field(p, field, affine))
        outputs.commit({"outputs": [...], ...})     # summary.json last; the whole set appears at once
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.io.atomic import defer_sync, end_defer_sync, fsync_dir, fsync_file

MANIFEST = "summary.json"
STAGING_PREFIX = ".brainshift-staging-"
_BACKUP = ".replaced"  # inside the staging folder: an earlier run's outputs, set aside during the commit


class OutputError(BrainshiftError):
    """An output file could not be written (full disk, permissions, a user's file in the way)."""


def one_line_cause(exc: BaseException) -> str:
    """A one-line description of why a write failed (``strerror`` of an ``OSError``, else its last line)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    if "errno = 28" in text or "No space left" in text:
        return os.strerror(errno.ENOSPC)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def is_output_name(name: str) -> bool:
    """True for a file name or a relative ``/``-separated path below the output folder (no ``..``, ``.``, empty
    or absolute parts, no backslash): the names a manifest may list and a run may write."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/")) and not name.startswith(STAGING_PREFIX)


def read_manifest(out: Path) -> set[str] | None:
    """The file names the previous run's ``summary.json`` in ``out`` lists as its outputs.

    Returns:
        ``None`` when there is no ``summary.json``; the set of names (``summary.json`` included) otherwise;
        names that do not stay below ``out`` (:func:`is_output_name`) are left out.

    Raises:
        OutputError: ``summary.json`` exists but is not a brainshift manifest (a user's file of that name, a
            directory, unreadable JSON): it is never overwritten.
    """
    p = out / MANIFEST
    if not p.exists() and not p.is_symlink():
        return None
    try:
        data = json.loads(p.read_text())
        names = data["outputs"]
        ok = isinstance(names, list) and all(isinstance(n, str) for n in names) and "brainshift_version" in data
    except (OSError, ValueError, TypeError, KeyError, RecursionError):  # RecursionError: JSON nested too deeply
        ok = False
    if not ok or p.is_symlink() or not p.is_file():
        raise OutputError(f"expected {p} to be the summary.json of an earlier brainshift run (it would be replaced), "
                          f"got a file brainshift did not write; move it away or choose another -o")
    return {n for n in names if is_output_name(n)} | {MANIFEST}


def check_output_dir(out: Path) -> None:
    """Raise :class:`InputFileError` unless ``out`` is, or can be created as, a writable directory."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputFileError(f"expected -o/--output to be a directory, got {out} "
                                     f"({p} is an existing file)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise InputFileError(f"expected a writable output directory, got {p} (permission denied)")
            return


def _folders_between(out: Path, name: str) -> list[Path]:
    """The sub-folders of ``out`` that hold output ``name``, outermost first (none for a plain file name)."""
    parts = name.split("/")[:-1]
    return [out.joinpath(*parts[: i + 1]) for i in range(len(parts))]


def _in_real_folders(out: Path, name: str) -> bool:
    """True when every sub-folder of ``out`` holding ``name`` that exists is a directory and not a link."""
    return all(not q.is_symlink() and (q.is_dir() or not q.exists()) for q in _folders_between(out, name))


class OutputSet:
    """A transaction over the files one run writes into ``out`` (see the module docstring).

    Args:
        out: the output folder (created if missing; removed again if the run fails).
        names: the file names (or relative paths, :func:`is_output_name`) the run plans to write
            (``summary.json`` is added); checked at once so a user's file in the way fails the run before any work.

    Raises:
        InputFileError: ``out`` is not usable as a folder. OutputError: a planned name is taken by a file
            brainshift did not write, or by a directory.
    """

    def __init__(self, out: str | os.PathLike[str], names: Iterable[str] = ()):
        self.out = Path(out)
        check_output_dir(self.out)
        self.owned = read_manifest(self.out) if self.out.is_dir() else None
        self.planned = set(names) | {MANIFEST}
        bad = sorted(n for n in self.planned if not is_output_name(n))
        if bad:
            raise OutputError(f"expected output names below the output folder {self.out}, got {bad}")
        self.check_free(self.planned)
        self.staging: Path | None = None
        self.written: list[str] = []
        self._created: list[Path] = []

    def check_free(self, names: Iterable[str]) -> None:
        """Raise :class:`OutputError` if any of ``names`` in ``out`` is a directory or a file not ours, or sits
        below something other than a plain folder (a file or a link where a sub-folder goes)."""
        owned = self.owned or set()
        for name in sorted(names):
            p = self.out / name
            for q in _folders_between(self.out, name):
                if q.is_symlink() or (q.exists() and not q.is_dir()):
                    raise OutputError(f"expected a folder or nothing at {q} (to write {p}), got a "
                                      f"{'link' if q.is_symlink() else 'file'}; move it away or choose another -o")
            if p.is_dir() and not p.is_symlink():
                raise OutputError(f"expected to write the file {p}, got an existing directory of that name; "
                                  f"move it away or choose another -o")
            if (p.exists() or p.is_symlink()) and name not in owned:
                raise OutputError(f"expected no file at {p} or one an earlier brainshift run wrote (listed in "
                                  f"{MANIFEST}), got a file brainshift did not write; move it or choose another -o")

    def __enter__(self) -> OutputSet:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed in this order on failure
        self._remove_abandoned_staging()
        try:  # the process id in the name marks it (no file to write: that could fail on a full disk)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out))
        except OSError as exc:
            self.__exit__(OSError, exc, None)
            raise OutputError(f"expected to create a staging folder in {self.out}, got: {one_line_cause(exc)}; "
                              f"nothing in {self.out} was changed") from None
        defer_sync(self.staging)  # files are synced once, by the commit
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
            end_defer_sync(self.staging)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if exc_type is not None:
            for d in self._created:
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty: never a file of anyone's

    def path(self, name: str) -> Path:
        """The staging path of output ``name`` (write the file there; :meth:`commit` moves it into ``out``)."""
        if self.staging is None:
            raise RuntimeError("OutputSet.path outside its with-block")
        if not is_output_name(name):
            raise ValueError(f"expected an output name below the output folder, got {name!r}")
        return self.staging / name

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Call ``writer(staging_path)``; a failure becomes one :class:`OutputError` line naming the file and cause.

        ``name`` may be a relative path (``cases/c00/meta.json``); its staging sub-folders are created first.

        Returns:
            The staging path written.
        """
        p = self.path(name)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            writer(p)
        except BrainshiftError:
            raise
        except (OSError, RuntimeError, MemoryError) as exc:  # full disk (h5py reports it as RuntimeError too)
            raise OutputError(f"expected to write {self.out / name}, got: {one_line_cause(exc)}; "
                              f"nothing in {self.out} was changed") from None
        if not p.is_file():
            raise OutputError(f"expected the writer to create {self.out / name}, got no file")
        if name not in self.written:
            self.written.append(name)
        return p

    def adopt_staged(self, *, recursive: bool = False, last: Iterable[str] = ()) -> list[str]:
        """Count every plain file a writer put in the staging folder as written (for commands such as the demo
        that write a whole folder through their own writers, given :attr:`staging` as their output folder).

        Args:
            recursive: also adopt the files in sub-folders (as relative paths ``sub/file``); otherwise a
                sub-folder is an error.
            last: file names (the last part of a path) that the commit moves after all the others, in this order,
                e.g. the ``meta.json`` whose presence marks a folder complete.

        Returns:
            The adopted names, in the order the commit moves them.

        Raises:
            OutputError: a writer left a sub-folder in the staging folder and ``recursive`` is off.
        """
        if self.staging is None:
            raise RuntimeError("OutputSet.adopt_staged outside its with-block")
        found = []
        for p in sorted(self.staging.rglob("*") if recursive else self.staging.iterdir()):
            rel = p.relative_to(self.staging).as_posix()
            if p.is_dir():
                if recursive:
                    continue
                raise OutputError(f"expected only files among the outputs for {self.out}, got a folder {p.name}")
            if rel not in self.written and rel != MANIFEST:
                found.append(rel)
        order = list(last)
        names = sorted(found, key=lambda n: order.index(n.rsplit("/", 1)[-1]) if n.rsplit("/", 1)[-1] in order
                       else -1)  # stable: the others keep their sorted order, first
        self.written.extend(names)
        return names

    def commit(self, summary: dict) -> None:
        """Write ``summary`` (strict JSON: no NaN or Infinity) as ``summary.json`` and move the set into ``out``.

        ``summary["outputs"]`` is set to the files written plus ``summary.json``. Every staged file is synced to
        the disk before the first rename, and every folder that changed after the last one. Files an earlier
        run listed but this run did not write are removed (and sub-folders they leave empty); on any failure
        every rename is undone.

        Raises:
            OutputError: a file could not be written, synced or moved (the folder is then as before the run);
                BrainshiftError: ``summary`` holds a non-finite number.
        """
        names = [*self.written, MANIFEST]
        summary["outputs"] = names
        if "brainshift_version" not in summary:  # what marks a manifest as ours (read_manifest)
            from brainshift import __version__

            summary["brainshift_version"] = __version__
        try:
            text = json.dumps(summary, indent=2, allow_nan=False)
        except ValueError as exc:
            raise BrainshiftError(f"expected finite numbers in {MANIFEST}, got {exc}") from None
        self.write(MANIFEST, lambda p: p.write_text(text))
        for name in names:  # the data on disk before any name points at them
            try:
                fsync_file(self.staging / name)
            except OSError as exc:
                raise OutputError(f"expected to write {self.out / name} to the disk, got: {one_line_cause(exc)}; "
                                  f"nothing in {self.out} was changed") from None
        self.check_free(names)
        old = self.owned or set()
        backup = self.staging / _BACKUP
        moved_away: list[str] = []
        placed: list[str] = []
        made: list[Path] = []  # sub-folders of out created here, outermost first
        doing = f"set the earlier outputs in {self.out} aside"
        try:
            backup.mkdir()
            for name in sorted(old):  # our earlier outputs: set aside (renames, restorable)
                p = self.out / name
                if (p.is_file() or p.is_symlink()) and _in_real_folders(self.out, name):
                    doing = f"move the earlier {p} aside"
                    (backup / name).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(p, backup / name)
                    moved_away.append(name)
            for name in names:  # summary.json last: the folder lists the set only once it is complete
                doing = f"move {self.out / name} into place"
                for q in _folders_between(self.out, name):
                    if not q.is_dir():
                        q.mkdir()
                        made.append(q)
                os.replace(self.staging / name, self.out / name)
                placed.append(name)
            for d in self._folders_to_sync([*placed, *moved_away], made):
                doing = f"sync the folder {d} to the disk"
                fsync_dir(d)
        except OSError as exc:
            for name in reversed(placed):
                with contextlib.suppress(OSError):
                    os.unlink(self.out / name)
            for name in reversed(moved_away):
                with contextlib.suppress(OSError):
                    os.replace(backup / name, self.out / name)
            for q in reversed(made):
                with contextlib.suppress(OSError):
                    q.rmdir()
            raise OutputError(f"expected to {doing}, got: {one_line_cause(exc)}; "
                              f"nothing in {self.out} was changed") from None
        gone = [n for n in moved_away if n not in names]
        for q in sorted({q for n in gone for q in _folders_between(self.out, n)}, key=lambda q: -len(q.parts)):
            with contextlib.suppress(OSError):
                q.rmdir()  # a sub-folder only the earlier run's files were in, now empty

    def _folders_to_sync(self, names: list[str], made: list[Path]) -> list[Path]:
        """Each folder that gained or lost a name in the commit (and the parents of folders created for the set),
        deepest first so that a parent is synced after what it holds."""
        folders = {(self.out / n).parent for n in names} | {q.parent for q in made}
        folders |= {d.parent for d in self._created}
        return sorted(folders, key=lambda d: (-len(d.parts), str(d)))

    def _remove_abandoned_staging(self) -> None:
        """Remove staging folders of killed runs (``.brainshift-staging-<pid>-*`` whose process is gone)."""
        for d in self.out.glob(STAGING_PREFIX + "*"):
            pid_text = d.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if not pid_text.isdigit() or not d.is_dir() or d.is_symlink():
                continue  # not one of ours: leave it
            pid = int(pid_text)
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
