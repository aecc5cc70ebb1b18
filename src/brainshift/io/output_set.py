"""All-or-nothing output of a run: stage every file in a hidden folder inside ``-o``, then move the set into place.

A command that writes several files (``infer``, ``register``) opens an :class:`OutputSet` on its output folder,
writes each file to :meth:`OutputSet.path` (a path in the staging folder ``-o/.brainshift-staging-*``) through
:meth:`OutputSet.write`, and calls :meth:`OutputSet.commit` with the run's manifest (``summary.json``). Until
the commit nothing in ``-o`` changes; any failure (a full disk at any write, an exception between writes, bad
input found late) removes the staging folder, and ``-o`` is left exactly as it was (a folder the run created is
removed again). The commit renames files (same file system, no new data written) and rolls back on failure.

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

MANIFEST = "summary.json"
STAGING_PREFIX = ".brainshift-staging-"


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


def read_manifest(out: Path) -> set[str] | None:
    """The file names the previous run's ``summary.json`` in ``out`` lists as its outputs.

    Returns:
        ``None`` when there is no ``summary.json``; the set of names (``summary.json`` included) otherwise.

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
    except (OSError, ValueError, TypeError, KeyError):
        ok = False
    if not ok or p.is_symlink() or not p.is_file():
        raise OutputError(f"expected {p} to be the summary.json of an earlier brainshift run (it would be replaced), "
                          f"got a file brainshift did not write; move it away or choose another -o")
    return {n for n in names if n and "/" not in n and n not in (".", "..")} | {MANIFEST}


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


class OutputSet:
    """A transaction over the files one run writes into ``out`` (see the module docstring).

    Args:
        out: the output folder (created if missing; removed again if the run fails).
        names: the file names the run plans to write (``summary.json`` is added); checked at once so a user's
            file in the way fails the run before any work.

    Raises:
        InputFileError: ``out`` is not usable as a folder. OutputError: a planned name is taken by a file
            brainshift did not write, or by a directory.
    """

    def __init__(self, out: str | os.PathLike[str], names: Iterable[str] = ()):
        self.out = Path(out)
        check_output_dir(self.out)
        self.owned = read_manifest(self.out) if self.out.is_dir() else None
        self.planned = set(names) | {MANIFEST}
        self.check_free(self.planned)
        self.staging: Path | None = None
        self.written: list[str] = []
        self._created: list[Path] = []

    def check_free(self, names: Iterable[str]) -> None:
        """Raise :class:`OutputError` if any of ``names`` in ``out`` is a directory or a file not ours."""
        owned = self.owned or set()
        for name in sorted(names):
            p = self.out / name
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
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None:
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
        return self.staging / name

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Call ``writer(staging_path)``; a failure becomes one :class:`OutputError` line naming the file and cause.

        Returns:
            The staging path written.
        """
        p = self.path(name)
        try:
            writer(p)
        except BrainshiftError:
            raise
        except (OSError, RuntimeError, MemoryError) as exc:  # full disk (h5py reports it as RuntimeError too)
            raise OutputError(f"expected to write {self.out / name}, got: {one_line_cause(exc)}; "
                              f"nothing in {self.out} was changed") from None
        if not p.is_file():
            raise OutputError(f"expected the writer to create {self.out / name}, got no file")
        self.written.append(name)
        return p

    def adopt_staged(self) -> list[str]:
        """Count every plain file a writer put directly in the staging folder as written (for commands such as
        the demo that write a whole folder through their own writers, given :attr:`staging` as their output
        folder). Returns the adopted names.

        Raises:
            OutputError: a writer left a sub-folder in the staging folder (outputs are plain files).
        """
        if self.staging is None:
            raise RuntimeError("OutputSet.adopt_staged outside its with-block")
        names = []
        for p in sorted(self.staging.iterdir()):
            if p.is_dir():
                raise OutputError(f"expected only files among the outputs for {self.out}, got a folder {p.name}")
            if p.name not in self.written and p.name != MANIFEST:
                names.append(p.name)
        self.written.extend(names)
        return names

    def commit(self, summary: dict) -> None:
        """Write ``summary`` (strict JSON: no NaN or Infinity) as ``summary.json`` and move the set into ``out``.

        ``summary["outputs"]`` is set to the files written plus ``summary.json``. Files an earlier run listed but
        this run did not write are removed; on any failure every rename is undone.

        Raises:
            OutputError: a file could not be written or moved (the folder is then as before the run);
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
        self.check_free(names)
        old = self.owned or set()
        backup = self.staging / ".replaced"
        backup.mkdir()
        moved_away: list[str] = []
        placed: list[str] = []
        try:
            for name in sorted(old):  # our earlier outputs: set aside (renames, restorable)
                p = self.out / name
                if p.is_file() or p.is_symlink():
                    os.replace(p, backup / name)
                    moved_away.append(name)
            for name in names:  # summary.json last: the folder lists the set only once it is complete
                os.replace(self.staging / name, self.out / name)
                placed.append(name)
        except OSError as exc:
            for name in reversed(placed):
                with contextlib.suppress(OSError):
                    os.unlink(self.out / name)
            for name in reversed(moved_away):
                with contextlib.suppress(OSError):
                    os.replace(backup / name, self.out / name)
            where = self.out / (names[len(placed)] if len(placed) < len(names) else MANIFEST)
            raise OutputError(f"expected to move {where} into place, got: {one_line_cause(exc)}; "
                              f"nothing in {self.out} was changed") from None

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
