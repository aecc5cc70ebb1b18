"""Atomic, durable output: write to a temporary name beside the target, fsync it, rename it, fsync the folder.

No command leaves a partial output file behind, and a file that has appeared under its name survives a power
loss or an operating-system crash with its complete content: the data are flushed to the disk (``os.fsync``)
before the rename that publishes the file, and the folder (which holds the new name) after it.

:class:`brainshift.io.output_set.OutputSet` publishes a whole set of files at once: its staging folder is marked
with :func:`defer_sync`, so a file written there with :func:`atomic_output` is synced once, by the set's commit,
not twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Folders whose files are synced by their owner when it publishes them (:func:`defer_sync`), as absolute paths.
_DEFERRED: set[str] = set()

#: errno values with which a platform or file system says it cannot fsync a directory (nothing to be done).
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM,
                         errno.EISDIR, errno.ENOSYS}


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush the data of the written (closed) file ``path`` to the disk (one ``os.fsync``).

    Raises:
        OSError: the file cannot be opened or the disk reports an error (``EIO``, ``ENOSPC`` on some file systems).
    """
    # Windows' fsync (_commit) needs a handle open for writing; POSIX syncs through any descriptor of the file
    flags = (os.O_RDWR | getattr(os, "O_BINARY", 0)) if os.name == "nt" else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names created, replaced or removed in folder ``path`` durable (one ``os.fsync`` of the folder).

    Skipped where the platform cannot sync a folder: Windows (a folder cannot be opened as a file; NTFS journals
    its renames), or a file system that refuses it (``EINVAL``, ``ENOTSUP``, ...).

    Raises:
        OSError: the disk reports an error (``EIO``).
    """
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _DIR_SYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def defer_sync(folder: str | os.PathLike[str]) -> None:
    """Leave the syncing of files written under ``folder`` with :func:`atomic_output` to the caller, which syncs
    them when it publishes them (:class:`~brainshift.io.output_set.OutputSet`); undone by :func:`end_defer_sync`."""
    _DEFERRED.add(os.path.abspath(folder))


def end_defer_sync(folder: str | os.PathLike[str]) -> None:
    """Undo :func:`defer_sync` of ``folder``."""
    _DEFERRED.discard(os.path.abspath(folder))


def _sync_deferred(folder: Path) -> bool:
    if not _DEFERRED:
        return False
    d = os.path.abspath(folder)
    return any(d == root or d.startswith(root + os.sep) for root in tuple(_DEFERRED))  # a copy: threads may add


def check_output_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~brainshift.errors.InputFileError` if ``path`` cannot be written as a file: it is an existing
    directory, or the nearest existing folder above it is a file (``-o notes.txt/out.csv``, which ``mkdir`` only
    reported as "File exists"). Missing folders are fine: :func:`atomic_output` creates them."""
    from brainshift.errors import InputFileError

    target = Path(path)
    if target.is_dir():
        raise InputFileError(f"expected to write the file {target}, got an existing directory of that name")
    for folder in target.parents:
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise InputFileError(f"expected a folder to write {target} into, got {folder}, an existing file")
            return


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success fsync it, rename it to ``path`` and fsync
    the directory (both syncs are left to the owner under a :func:`defer_sync` folder).

    The temporary name keeps the target's full suffix (``.nii.gz``, ``.h5``) so libraries that choose a format
    from the extension still work. If the body (or the sync) raises, the temporary file is removed and ``path``
    is untouched.
    """
    target = Path(path)
    check_output_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    sync = not _sync_deferred(target.parent)
    try:
        yield tmp
        # again: a writer may have replaced the file with its own (safetensors' save_file creates it 0600)
        os.chmod(tmp, 0o666 & ~umask)
        if sync:
            fsync_file(tmp)  # the data on disk before the name points at them
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sync:
        fsync_dir(target.parent)  # the new name itself
