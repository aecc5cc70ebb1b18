"""Atomic output: write to a temporary name beside the target, rename on success, delete on failure.

No command leaves a partial output file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success rename it to ``path``.

    The temporary name keeps the target's full suffix (``.nii.gz``, ``.h5``) so libraries that choose a format
    from the extension still work. If the body raises, the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    if target.is_dir():
        from brainshift.errors import InputFileError

        raise InputFileError(f"expected to write the file {target}, got an existing directory of that name")
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
