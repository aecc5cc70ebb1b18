"""Small path helpers shared by the readers: suffix matching, the "is it a readable file" check and the check of a
gzip-compressed file's stream."""

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
    """Raise :class:`InputFileError` naming ``what`` if ``path`` does not exist or is a directory.

    ``what`` names the content without the word "file" (``"image"``, ``"keypoint table"``): the messages add it
    ("expected an existing image file, ...").
    """
    if not path.exists():
        raise InputFileError(f"expected an existing {what} file, got {str(path)!r} (not found)")
    if path.is_dir():
        raise InputFileError(f"expected the {what} to be a file, got a directory {str(path)!r}")


def check_gzip_stream(path: Path, what: str) -> None:
    """Refuse a gzip-compressed file whose stream is truncated, corrupt or fails its CRC-32, naming ``what``.

    nibabel stops reading a ``.nii.gz`` once it has the voxels it needs, so the gzip trailer (the CRC-32 and
    length of the whole stream) is checked only when that read happens to reach it: damaged voxel data could be
    read without an error, or be reported as NaN voxels. Decompressing the stream once to its end checks it (about
    0.1 s for a 1 mm brain image). An empty file passes (the reader names it).

    Raises:
        InputFileError: not gzip data, data ending early, a corrupt deflate stream or a CRC-32 / length mismatch.
    """
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except EOFError:
        raise InputFileError(f"expected a complete gzip-compressed {what} in {str(path)!r}, got a truncated file "
                             f"(the compressed data end early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:  # not gzip, a bad CRC-32 or length, a corrupt deflate stream
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise InputFileError(f"expected an intact gzip-compressed {what} in {str(path)!r}, got a corrupt or "
                             f"non-gzip file ({cause})") from None


def read_utf8_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped, as Excel's "CSV UTF-8" writes one).

    ``what`` names the content without the word "file" (``"keypoint table"``), as for :func:`check_readable`.

    Raises:
        InputFileError: missing file or a directory (:func:`check_readable`); bytes that are not UTF-8, naming
            the line and column of the first one as an editor shows them (1-based), or UTF-16 text.
    """
    check_readable(path, what)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            found = "UTF-16 text (its byte-order mark)"
        else:
            line_start = raw.rfind(b"\n", 0, exc.start) + 1
            line = raw.count(b"\n", 0, exc.start) + 1
            found = (f"the byte 0x{raw[exc.start]:02x} on line {line} (column {exc.start - line_start + 1}), which is "
                     f"not UTF-8 (Latin-1 or another encoding?)")
        raise InputFileError(f"expected a UTF-8 text {what} file, got {str(path)!r} with {found}; save it as UTF-8") \
            from None
