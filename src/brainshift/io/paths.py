"""Small path helpers shared by the readers: suffix matching and the "is it a readable file" check."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from brainshift.errors import InputFileError


def match_suffix(path: str | os.PathLike[str], suffixes: Iterable[str]) -> str:
    """The lower-case suffix among ``suffixes`` that ``path`` ends with (longest first, so ``.nii.gz`` and
    ``.mrk.json`` count as one suffix), or ``""`` if none matches."""
    name = Path(path).name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def check_readable(path: Path, what: str) -> None:
    """Raise :class:`InputFileError` naming ``what`` if ``path`` does not exist or is a directory."""
    if not path.exists():
        raise InputFileError(f"expected an existing {what} file, got {str(path)!r} (not found)")
    if path.is_dir():
        raise InputFileError(f"expected a {what} file, got a directory {str(path)!r}")
