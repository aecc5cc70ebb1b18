"""Keypoint files: displacement tables, 3D SIFT-Rank ``.key`` files, 3D Slicer markups; validation.

Every reader returns keypoints in brainshift's convention: ``points_vox`` ``(N, 3)`` float64 continuous
0-based voxel indices ``(i, j, k)`` of the preop image and ``disps_vox`` ``(N, 3)`` float64 displacements in
voxel units along ``i, j, k``: the preop point ``p`` moves to ``p + d`` intraop. World frames (RAS, LPS)
are converted with :mod:`brainshift.io.frames`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainshift.errors import InputFileError, KeypointError
from brainshift.io.atomic import atomic_output
from brainshift.io.frames import (
    check_frame,
    points_from_voxel,
    points_to_voxel,
    vectors_from_voxel,
    vectors_to_voxel,
)
from brainshift.io.paths import match_suffix, read_utf8_text

TABLE_COLUMNS = ("x", "y", "z", "dx", "dy", "dz")
TABLE_SUFFIXES = (".csv", ".txt")
MARKUP_SUFFIXES = (".fcsv", ".mrk.json")
KEY_SUFFIX = ".key"
#: 3D SIFT-Rank reports the centre of 0-based voxel ``i`` as ``i + 0.5`` (see shared/reference/biomechanics.md)
SIFT_KEY_OFFSET_VOX = 0.5
#: columns of a 3D SIFT-Rank row: x y z scale, 3x3 orientation, 3 eigenvalues, info flag, 64 descriptor values
SIFT_KEY_COLUMNS = 4 + 9 + 3 + 1 + 64


def _suffix(path: Path) -> str:
    return match_suffix(path, (".mrk.json", ".fcsv", ".csv", ".txt", ".key"))


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names the content without the word "file" (the messages add it)."""
    try:
        return read_utf8_text(path, what)
    except OSError as exc:
        raise InputFileError(f"expected a readable text {what} file, got {str(path)!r}: {exc}") from None


def _excerpt(line: str, limit: int = 80) -> str:
    """``repr`` of ``line`` cut to ``limit`` characters (an error message stays one readable line)."""
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _need_affine(frame: str, affine, path: Path) -> None:
    if frame != "voxel" and affine is None:
        raise KeypointError(f"expected the image affine to convert {frame} keypoints in {str(path)!r} to voxels, "
                            f"got none")


# ------------------------------------------------------------------------------------------------ tables


def _split(line: str) -> list[str]:
    if "," in line:
        tokens = [t.strip() for t in line.split(",")]
        while tokens and tokens[-1] == "":  # tolerate trailing commas (spreadsheet exports)
            tokens.pop()
        return tokens
    return line.split()


#: a decimal number as written in a table (Python's float() also takes "1_000" and non-ASCII digits; we do not),
#: or nan / inf spelled out (accepted here so that the message can say "finite")
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)


def _is_number(token: str) -> bool:
    return _NUMBER.fullmatch(token.strip()) is not None


def _strict_float(token: str) -> float:
    """``float(token)`` for a plain decimal number only; raises ValueError otherwise."""
    if not _is_number(token):
        raise ValueError(token)
    return float(token)


def read_keypoint_table(path: str | os.PathLike[str], frame: str = "voxel",
                        affine: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a keypoint displacement table ``x, y, z, dx, dy, dz``.

    Format: CSV or TXT, one keypoint per line, six numbers separated by commas, tabs or spaces; blank lines
    and lines starting with ``#`` are ignored. The first line may be a header naming the six columns
    ``x, y, z, dx, dy, dz`` (any order, case-insensitive), each exactly once; further named columns are ignored
    (e.g. the score columns of ``brainshift register``'s ``matches.csv``), and every row then has the header's
    column count; a header without the six is an error. The point
    ``(x, y, z)`` moves to ``(x + dx, y + dy, z + dz)``, all in ``frame``.

    Args:
        path: the table.
        frame: ``"voxel"`` (0-based ``i, j, k``, voxel units; default), ``"ras"`` or ``"lps"`` (mm).
        affine: the preop image's 4x4 voxel-to-RAS affine; required for ``ras`` / ``lps``.

    Returns:
        ``(points_vox, disps_vox)``: ``(N, 3)`` float64 voxel indices and voxel-unit displacements
        (points converted with ``frames.points_to_voxel``, displacements with ``frames.vectors_to_voxel``).

    Raises:
        InputFileError: missing or unreadable file.
        KeypointError: bad header, wrong column count, non-numeric, NaN or inf values (naming the line), no
            rows, or a world frame without an affine.
    """
    p = Path(path)
    frame = check_frame(frame)
    table, _ = _parse_keypoint_table(p)
    _need_affine(frame, affine, p)
    return points_to_voxel(table[:, :3], frame, affine), vectors_to_voxel(table[:, 3:], frame, affine)


def keypoint_table_lines(path: str | os.PathLike[str]) -> list[int]:
    """The 1-based line number in the file (header and comments counted) of each keypoint row of a table.

    Row ``n`` of :func:`read_keypoint_table`'s arrays came from line ``keypoint_table_lines(path)[n]``: what
    error messages name, since that is what a user sees in an editor.

    Raises:
        InputFileError, KeypointError: as :func:`read_keypoint_table`.
    """
    return _parse_keypoint_table(Path(path))[1]


def _parse_keypoint_table(p: Path) -> tuple[np.ndarray, list[int]]:
    """``(table (N, 6) in column order x, y, z, dx, dy, dz, 1-based line numbers)``; see read_keypoint_table."""
    text = _read_text(p, "keypoint table")
    linenos: list[int] = []
    rows: list[list[float]] = []
    order = list(range(6))
    n_cols = 6
    first = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()  # '#' starts a comment, on its own line or after a row
        if not line:
            continue
        tokens = _split(line)
        if first and not any(_is_number(t) for t in tokens):
            names = [t.strip().strip("\"'").lower() for t in tokens]
            if any(names.count(c) != 1 for c in TABLE_COLUMNS) or len(set(names)) != len(names) or not all(names):
                raise KeypointError(f"expected a header naming the columns {','.join(TABLE_COLUMNS)} (or no header) "
                                    f"on line {lineno} of {str(p)!r}, got {_excerpt(line)}")
            order = [names.index(c) for c in TABLE_COLUMNS]
            n_cols = len(names)
            first = False
            continue
        first = False
        if len(tokens) != n_cols:
            what = "6 columns x,y,z,dx,dy,dz" if n_cols == 6 else f"{n_cols} columns as in the header"
            raise KeypointError(f"expected {what} on line {lineno} of {str(p)!r}, got {len(tokens)}: {_excerpt(line)}")
        try:
            values = [_strict_float(tokens[i]) for i in order]
        except ValueError:
            raise KeypointError(f"expected numbers on line {lineno} of {str(p)!r}, got {_excerpt(line)}") from None
        if not all(np.isfinite(values)):
            raise KeypointError(f"expected finite numbers on line {lineno} of {str(p)!r}, got {_excerpt(line)}")
        rows.append(values)
        linenos.append(lineno)
    if not rows:
        raise KeypointError(f"expected at least one keypoint row x,y,z,dx,dy,dz in {str(p)!r}, got none")
    return np.asarray(rows, dtype=np.float64), linenos


def write_keypoint_table(path: str | os.PathLike[str], points_vox: np.ndarray, disps_vox: np.ndarray,
                         frame: str = "voxel", affine: np.ndarray | None = None) -> Path:
    """Write a keypoint table (header ``x,y,z,dx,dy,dz``, comma-separated, shortest exact float text).

    Args:
        path: output ``.csv`` / ``.txt`` path (written atomically).
        points_vox: ``(N, 3)`` voxel indices.
        disps_vox: ``(N, 3)`` voxel-unit displacements.
        frame: frame of the written values: ``"voxel"`` (default), ``"ras"`` or ``"lps"`` (mm).
        affine: 4x4 voxel-to-RAS affine; required for ``ras`` / ``lps``.

    Returns:
        The path written.

    Raises:
        KeypointError: arrays not ``(N, 3)`` of equal length, or a world frame without an affine.
    """
    p = Path(path)
    frame = check_frame(frame)
    pts, dsp = check_keypoint_pairs(points_vox, disps_vox)
    _need_affine(frame, affine, p)
    pts_out = points_from_voxel(pts, frame, affine)
    dsp_out = vectors_from_voxel(dsp, frame, affine)
    lines = [",".join(TABLE_COLUMNS)]
    for a, b in zip(pts_out, dsp_out, strict=True):
        lines.append(",".join(repr(float(v)) for v in (*a, *b)))
    with atomic_output(p) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return p


def write_detected_keypoints(path: str | os.PathLike[str], keypoints) -> Path:
    """Write detected keypoints as CSV: a ``#`` comment line, then ``x,y,z,scale_mm,response`` rows.

    ``x, y, z`` are 0-based voxel indices ``i, j, k`` of the image (voxel frame); ``scale_mm`` the DoG sigma in
    mm; ``response`` the normalised DoG contrast (see :class:`brainshift.keypoints.detect.Keypoints`).
    Written atomically. Read back by :func:`read_keypoint_positions`.
    """
    table = np.column_stack([keypoints.points_vox, keypoints.scales_mm, keypoints.responses])
    with atomic_output(path) as tmp:
        np.savetxt(tmp, table, fmt="%.4f", delimiter=",", comments="",
                   header="# brainshift keypoints: frame voxel (0-based i,j,k); scale_mm = DoG sigma in mm; "
                          "response = normalised DoG contrast\nx,y,z,scale_mm,response")
    return Path(path)


def read_keypoint_positions(path: str | os.PathLike[str]) -> np.ndarray:
    """Keypoint positions ``(M, 3)`` float64 (voxel frame) from a detected-keypoint table.

    The one reader of the ``keypoints.csv`` that :func:`write_detected_keypoints` writes (``brainshift
    keypoints`` and ``simulate-batch``): lines starting with ``#`` and blank lines are skipped; fields are
    separated by ``,`` (or ``;``); when the first row is not numeric it is a header and the columns named ``x``,
    ``y``, ``z`` are read, otherwise the first three columns. ``x, y, z`` are 0-based voxel indices ``i, j, k``.

    Raises:
        InputFileError: unreadable file, a header without ``x, y, z``, or a row with a missing or non-numeric
            ``x, y, z`` field (line number given).
    """
    p = Path(path)
    rows = [(n, [f.strip() for f in ln.replace(";", ",").split(",")])
            for n, ln in enumerate(_read_text(p, "keypoint table").splitlines(), start=1)
            if ln.strip() and not ln.lstrip().startswith("#")]
    cols = [0, 1, 2]
    if rows and not all(_is_number(f) for f in rows[0][1][:3]):
        header = [h.lower() for h in rows[0][1]]
        if not {"x", "y", "z"} <= set(header):
            raise InputFileError(f"expected columns x, y, z in {p}, got {header}")
        cols = [header.index(c) for c in ("x", "y", "z")]
        rows = rows[1:]
    out = np.empty((len(rows), 3), dtype=np.float64)
    for r, (n, fields) in enumerate(rows):
        try:
            out[r] = [float(fields[c]) for c in cols]
        except (IndexError, ValueError):
            raise InputFileError(f"expected numeric x, y, z in {p} line {n}, got {','.join(fields)!r}") from None
    return out


def check_keypoint_pairs(points_vox, disps_vox) -> tuple[np.ndarray, np.ndarray]:
    """``(points, displacements)`` as float64 ``(N, 3)`` arrays of equal shape.

    Raises:
        KeypointError: other shapes, naming both; values that are not real numbers (complex, objects, text
            that is not numbers).
    """
    arrays = []
    for what, values in (("keypoints", points_vox), ("displacements", disps_vox)):
        a = np.asarray(values)
        try:  # complex would silently lose its imaginary part; text or objects that are no numbers fail in numpy
            if a.dtype.kind == "c":
                raise TypeError
            arrays.append(np.asarray(a, dtype=np.float64))
        except (TypeError, ValueError):
            raise KeypointError(f"expected {what} as real numbers of shape (N, 3), got {a.dtype} values of shape "
                                f"{a.shape}") from None
    pts, dsp = arrays
    if pts.ndim != 2 or pts.shape[1] != 3 or dsp.shape != pts.shape:
        raise KeypointError(f"expected keypoints and displacements of equal shape (N, 3), got {pts.shape} and "
                            f"{dsp.shape}")
    return pts, dsp


# ------------------------------------------------------------------------------------------- SIFT-Rank .key


def _sift_key_start(p: Path, lines: list[str]) -> int:
    """Index of the first feature row of a ``.key`` file (after its ``Scale-space location...`` line).

    Raises:
        KeypointError: no header in the first 20 lines, or a file in world (millimetre) coordinate mode.
    """
    for n, line in enumerate(lines[:20]):
        low = line.strip().lower()
        if low.startswith("#") and "coordinate space" in low and ("millimet" in low or "mm" in low.split(":")[-1]):
            raise KeypointError(f"expected a .key file in voxel coordinates in {str(p)!r}, got "
                                f"{line.strip().lstrip('#').strip()!r}")
        if low.startswith("scale-space"):
            return n + 1
    raise KeypointError(f"expected a 3D SIFT-Rank .key header ending with a 'Scale-space location...' line "
                        f"in {str(p)!r}, got none in the first 20 lines")


def _check_sift_key_count(p: Path, lines: list[str], start: int, n_rows: int) -> None:
    """Warn when a ``.key`` file has another number of feature rows than its header's ``Features: N`` declares.

    featExtract writes the count of the rows that follow, so fewer rows usually mean a truncated file (an
    interrupted copy or write). Some tools write a fixed placeholder count, so this is a warning, not an error;
    a header without a readable count is accepted silently.
    """
    for line in lines[:start]:
        key, _, value = line.strip().partition(":")
        if key.strip().lower() == "features":
            try:
                declared = int(value.strip())
            except ValueError:
                return
            if n_rows != declared:
                warnings.warn(f"{str(p)!r} has {n_rows} feature rows but its header says 'Features: {declared}'"
                              f"{'; is the file truncated?' if n_rows < declared else ''}", stacklevel=3)
            return


#: header lines of a ``.key`` file that record the grid the features were extracted on (featExtract, ijk order)
_SIFT_KEY_GRID_LINES = {"extraction voxel resolution": "grid_shape", "extraction voxel size": "spacing_mm"}


def _sift_key_grid(p: Path, lines: list[str], start: int) -> dict:
    """``{"grid_shape": (I, J, K) | None, "spacing_mm": (3,) | None}`` from a ``.key`` header.

    featExtract writes ``# Extraction Voxel Resolution (ijk) : I J K`` (its extraction grid) and ``# Extraction
    Voxel Size (mm)  (ijk) : dx dy dz`` (the NIfTI pixdim). A line that is absent or all zeros (what
    :func:`write_sift_key` writes without ``shape`` / ``spacing_mm``) records nothing: None. A line that is not
    three such numbers is warned about and also gives None (the file's features are still readable).
    """
    grid: dict = {"grid_shape": None, "spacing_mm": None}
    for line in lines[:start]:
        low = line.strip().lstrip("#").strip().lower()
        name = next((v for k, v in _SIFT_KEY_GRID_LINES.items() if low.startswith(k)), None)
        if name is None:
            continue
        tokens = low.rpartition(":")[2].split()
        try:
            values = [_strict_float(t) for t in tokens]
        except ValueError:
            values = []
        ok = len(values) == 3 and all(np.isfinite(values)) and all(v >= 0 for v in values)
        if ok and name == "grid_shape":
            ok = all(v == int(v) for v in values)
        if not ok:
            warnings.warn(f"expected three non-negative numbers on the header line {line.strip()!r} of {str(p)!r}, "
                          f"got {tokens}; the .key file's grid is not compared with its image", stacklevel=3)
        elif any(v > 0 for v in values):
            grid[name] = tuple(int(v) for v in values) if name == "grid_shape" else tuple(values)
    return grid


def _sift_key_rows(p: Path, lines: list[str], start: int):
    """``(1-based line number, line, tokens)`` of each non-blank feature row from line index ``start`` on.

    Raises:
        KeypointError: a row with more than :data:`SIFT_KEY_COLUMNS` values (two rows run together, or another
            layout), naming its line, its feature-row number and both counts (such rows used to be cut to 81).
    """
    n_row = 0
    for lineno, raw in enumerate(lines[start:], start=start + 1):
        tokens = raw.split()
        if not tokens:
            continue
        n_row += 1
        if len(tokens) > SIFT_KEY_COLUMNS:
            raise KeypointError(f"expected at most {SIFT_KEY_COLUMNS} values (x y z scale, 9 orientation, 3 "
                                f"eigenvalues, info flag, 64 descriptor values) on line {lineno} of {str(p)!r} "
                                f"(feature row {n_row}), got {len(tokens)}")
        yield lineno, raw, tokens


@dataclass(frozen=True)
class SiftKeyFeatures:
    """The features of a 3D SIFT-Rank ``.key`` file, one per row (a location may repeat with another descriptor).

    Attributes:
        points_vox: ``(N, 3)`` float64 0-based voxel indices (the file's ``x y z`` minus 0.5).
        scales: ``(N,)`` float64 feature scales as written (featExtract: voxels; brainshift writes the DoG
            sigma in mm divided by the geometric-mean voxel size).
        descriptors: ``(N, 64)`` float32 descriptor values (SIFT-Rank: ranks 0..63).
        grid_shape: the header's ``Extraction Voxel Resolution (ijk)``: the grid the features were extracted on
            (featExtract: the image's shape, doubled with ``-2+``, halved with ``-2-``); None when not recorded.
        spacing_mm: the header's ``Extraction Voxel Size (mm) (ijk)`` (the image's voxel size); None when not
            recorded. Compared with an image by :func:`check_sift_key_grid`.
    """

    points_vox: np.ndarray
    scales: np.ndarray
    descriptors: np.ndarray
    grid_shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None


def read_sift_key_features(path: str | os.PathLike[str]) -> SiftKeyFeatures:
    """Locations, scales and descriptors of every feature row of a 3D SIFT-Rank ``.key`` file.

    The layout is described in :func:`read_sift_key` (which returns the unique locations only); here each row
    must have the full ``4 + 9 + 3 + 1 + 64`` columns, and rows are kept as they are (featExtract writes one
    row per orientation of a location).

    Raises:
        InputFileError: missing or unreadable file.
        KeypointError: no header, millimetre coordinate mode, a row with other than 81 numbers or non-finite
            values (naming the line), no features. A row count other than the header's ``Features: N`` is a warning.
    """
    p = Path(path)
    lines = _read_text(p, ".key").splitlines()
    start = _sift_key_start(p, lines)
    rows = []
    for lineno, raw, tokens in _sift_key_rows(p, lines, start):
        try:
            values = [float(t) for t in tokens[:SIFT_KEY_COLUMNS]]
        except ValueError:
            raise KeypointError(f"expected numbers on line {lineno} of {str(p)!r}, got {raw.strip()[:80]!r}") from None
        if len(values) < SIFT_KEY_COLUMNS:
            raise KeypointError(f"expected {SIFT_KEY_COLUMNS} finite numbers on line {lineno} of {str(p)!r}, got "
                                f"{len(values)}")
        if not np.all(np.isfinite(values)):
            bad = ", ".join(tokens[i] for i in np.flatnonzero(~np.isfinite(values))[:3])
            raise KeypointError(f"expected {SIFT_KEY_COLUMNS} finite numbers on line {lineno} of {str(p)!r}, got "
                                f"{bad}")
        rows.append(values)
    if not rows:
        raise KeypointError(f"expected at least one feature row in {str(p)!r}, got none")
    _check_sift_key_count(p, lines, start, len(rows))
    table = np.asarray(rows, dtype=np.float64)
    return SiftKeyFeatures(table[:, :3] - SIFT_KEY_OFFSET_VOX, table[:, 3].copy(),
                           table[:, SIFT_KEY_COLUMNS - 64 :].astype(np.float32), **_sift_key_grid(p, lines, start))


#: relative tolerance of the voxel-size comparison (the header has 6 decimals of a float32 pixdim)
SIFT_KEY_SPACING_RTOL = 1e-3


def check_sift_key_grid(features: SiftKeyFeatures, shape, spacing_mm, *, key_path: str | os.PathLike[str],
                        image: str) -> None:
    """Refuse ``.key`` features whose header records another grid than the image they are used with.

    The header's extraction grid (``features.grid_shape``) must be the image's ``shape``, or that shape
    doubled or halved on all three axes (featExtract's ``-2+`` / ``-2-`` extract on a resampled grid but write
    coordinates of the input grid); its voxel size (``features.spacing_mm``) must equal ``spacing_mm`` to a
    relative :data:`SIFT_KEY_SPACING_RTOL`. What the header does not record is not compared.

    Args:
        features: from :func:`read_sift_key_features`.
        shape: the image's grid size ``(I, J, K)``.
        spacing_mm: the image's voxel size along ``i, j, k`` (mm).
        key_path: the ``.key`` file (named in the message).
        image: how the message names the image (e.g. ``"-a 'preop.nii.gz'"``).

    Raises:
        KeypointError: a recorded shape or voxel size that disagrees, naming both.
    """
    shape = tuple(int(n) for n in shape)
    key = str(key_path)
    if features.grid_shape is not None:
        allowed = (shape, tuple(2 * n for n in shape), tuple(n // 2 for n in shape))
        if tuple(features.grid_shape) not in allowed:
            raise KeypointError(f"expected the header of {key!r} to record the grid of {image}: 'Extraction Voxel "
                                f"Resolution' {shape} (or doubled / halved: featExtract -2+ / -2-), got "
                                f"{tuple(features.grid_shape)}; was the .key file made from this image?")
    if features.spacing_mm is not None:
        sp = np.asarray(spacing_mm, dtype=np.float64)
        if not np.allclose(features.spacing_mm, sp, rtol=SIFT_KEY_SPACING_RTOL, atol=1e-6):
            raise KeypointError(f"expected the header of {key!r} to record the voxel size of {image}: 'Extraction "
                                f"Voxel Size' {_fmt(sp)} mm, got {_fmt(features.spacing_mm)} mm; was the .key file "
                                f"made from this image?")


def read_sift_key(path: str | os.PathLike[str]) -> np.ndarray:
    """Keypoint locations from a 3D SIFT-Rank ``.key`` file (Chauvin et al. 2020, ``featExtract``).

    Layout: a 6-line header (``# featExtract ...``, ``# Extraction Voxel Resolution (ijk) : ...``,
    ``# Extraction Voxel Size (mm) ...``, ``# Feature Coordinate Space: ...``, ``Features: N``,
    ``Scale-space location[x y z scale] orientation[...] ...``), then one tab-separated row per feature:
    ``x y z scale``, 9 orientation values, 3 eigenvalues, an info flag and 64 descriptor values (trailing
    tabs allowed). Voxel-mode ``x y z`` follow nibabel's ``i j k`` but report the centre of voxel ``i`` as
    ``i + 0.5`` (measured; shared/reference/biomechanics.md), so 0.5 is subtracted. Only the first four
    columns are used; a location listed several times (one row per orientation) is kept once, in order of
    first appearance.

    Args:
        path: the ``.key`` file (voxel coordinate mode).

    Returns:
        ``(N, 3)`` float64 unique 0-based voxel indices.

    Raises:
        InputFileError: missing or unreadable file.
        KeypointError: header not found, a file in world (millimetre) coordinate mode, rows with fewer than 4
            or more than 81 numbers or non-numeric/non-finite values (naming the line), no features. A row count
            other than the header's ``Features: N`` (a truncated file?) is a warning.
    """
    p = Path(path)
    lines = _read_text(p, ".key").splitlines()
    start = _sift_key_start(p, lines)
    locs = []
    for lineno, raw, tokens in _sift_key_rows(p, lines, start):
        if len(tokens) < 4:
            raise KeypointError(f"expected at least x y z scale on line {lineno} of {str(p)!r}, got {raw.strip()!r}")
        try:
            xyz = [float(t) for t in tokens[:3]]
        except ValueError:
            raise KeypointError(f"expected numbers on line {lineno} of {str(p)!r}, got {raw.strip()[:80]!r}") from None
        if not all(np.isfinite(xyz)):
            raise KeypointError(f"expected finite coordinates on line {lineno} of {str(p)!r}, got {tokens[:3]}")
        locs.append(xyz)
    if not locs:
        raise KeypointError(f"expected at least one feature row in {str(p)!r}, got none")
    _check_sift_key_count(p, lines, start, len(locs))
    pts = np.asarray(locs, dtype=np.float64) - SIFT_KEY_OFFSET_VOX
    _, first = np.unique(pts, axis=0, return_index=True)
    return pts[np.sort(first)]


def write_sift_key(path: str | os.PathLike[str], points_vox: np.ndarray, scales: np.ndarray | float = 1.0,
                   shape: tuple[int, int, int] | None = None,
                   spacing_mm: tuple[float, float, float] | None = None,
                   descriptors: np.ndarray | None = None) -> Path:
    """Write keypoint locations in the 3D SIFT-Rank ``.key`` text layout (voxel coordinate mode).

    The header has the six lines of ``featExtract 1.1`` (resolution and voxel size from ``shape`` and
    ``spacing_mm`` if given, else zeros: not recorded, so not compared with an image by
    :func:`check_sift_key_grid`); each row is tab-separated: ``x y z`` = ``points_vox + 0.5``
    (SIFT-Rank's voxel-centre convention), ``scale``, then an identity orientation, zero eigenvalues, a zero
    info flag and the 64 ``descriptors`` values (integers when they are, e.g. SIFT-Rank ranks from
    :func:`brainshift.keypoints.describe.describe_keypoints`; zeros when not given: a file for tools that read
    locations only). Read back by :func:`read_sift_key` (locations) and :func:`read_sift_key_features`.

    Args:
        path: output path (written atomically).
        points_vox: ``(N, 3)`` 0-based voxel indices.
        scales: ``(N,)`` feature scales in voxels, or one value for all.
        shape: image grid size for the header.
        spacing_mm: voxel size for the header.
        descriptors: optional ``(N, 64)`` descriptor values.

    Returns:
        The path written.

    Raises:
        KeypointError: malformed points, scales or descriptors, or non-finite values.
    """
    pts = np.asarray(points_vox, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise KeypointError(f"expected finite keypoints of shape (N, 3), got {pts.shape}")
    sc = np.broadcast_to(np.asarray(scales, dtype=np.float64), (len(pts),))
    if not np.all(np.isfinite(sc)):
        raise KeypointError("expected finite keypoint scales, got NaN or inf")
    res = " ".join(str(int(s)) for s in shape) if shape is not None else "0 0 0"
    vs = " ".join(f"{float(s):.6f}" for s in spacing_mm) if spacing_mm is not None else "0.000000 0.000000 0.000000"
    header = [
        "# featExtract 1.1",
        f"# Extraction Voxel Resolution (ijk) : {res}",
        f"# Extraction Voxel Size (mm)  (ijk) : {vs}",
        "# Feature Coordinate Space: voxels",
        f"Features: {len(pts)}",
        "Scale-space location[x y z scale] orientation[o11 o12 o13 o21 o22 o23 o31 o32 o33] "
        "2nd moment eigenvalues[e1 e2 e3] info flag[i1] descriptor[d1 .. d64]",
    ]
    tail = "\t".join(["1.000000", "0.000000", "0.000000", "0.000000", "1.000000", "0.000000", "0.000000",
                      "0.000000", "1.000000"] + ["0.000000"] * 3 + ["0"])
    if descriptors is None:
        desc_text = ["\t".join(["0"] * 64)] * len(pts)
    else:
        desc = np.asarray(descriptors, dtype=np.float64)
        if desc.shape != (len(pts), 64) or not np.all(np.isfinite(desc)):
            raise KeypointError(f"expected finite descriptors of shape ({len(pts)}, 64), got {desc.shape}")
        fmt = "{:.0f}" if np.all(desc == np.round(desc)) else "{:.6g}"
        desc_text = ["\t".join(fmt.format(v) for v in row) for row in desc]
    rows = []
    for (x, y, z), s, d in zip(pts + SIFT_KEY_OFFSET_VOX, sc, desc_text, strict=True):
        rows.append(f"{x:.6f}\t{y:.6f}\t{z:.6f}\t{s:.6f}\t{tail}\t{d}")
    p = Path(path)
    with atomic_output(p) as tmp:
        tmp.write_text("\n".join(header + rows) + "\n")
    return p


# --------------------------------------------------------------------------------------------- Slicer markups

#: column layout of Slicer's .fcsv files (version 4.6 and later) when no ``# columns =`` line is present
FCSV_DEFAULT_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
                        "associatedNodeID")
#: legacy numeric ``# CoordinateSystem`` values of .fcsv files (vtkMRMLStorageNode: 0 = RAS, 1 = LPS)
_FCSV_LEGACY_SYSTEMS = {"0": "RAS", "1": "LPS"}


def _read_fcsv(p: Path) -> tuple[np.ndarray, list[str]]:
    """World points ``(N, 3)`` in RAS mm and labels from a Slicer ``.fcsv`` file."""
    text = _read_text(p, "Slicer markups")
    system = None
    columns: list[str] | None = None
    data_lines: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            m = re.match(r"#\s*coordinatesystem\s*=\s*(.*)$", line, flags=re.IGNORECASE)
            if m:
                system = m.group(1).strip()
            m = re.match(r"#\s*columns\s*=\s*(.*)$", line, flags=re.IGNORECASE)
            if m:
                columns = [c.strip() for c in m.group(1).split(",")]
            continue
        data_lines.append((lineno, raw))
    if system is None:
        raise KeypointError(f"expected a '# CoordinateSystem = RAS' or '= LPS' line in {str(p)!r}, got none")
    frame = _FCSV_LEGACY_SYSTEMS.get(system, system).upper()
    if frame not in ("RAS", "LPS"):
        raise KeypointError(f"expected coordinate system RAS or LPS (or legacy 0/1) in {str(p)!r}, got {system!r}")
    cols = [c.lower() for c in (columns or FCSV_DEFAULT_COLUMNS)]
    missing = [c for c in ("x", "y", "z") if c not in cols]
    if missing:
        raise KeypointError(f"expected columns x, y, z in the '# columns =' line of {str(p)!r}, got {columns}")
    ix, iy, iz = (cols.index(c) for c in ("x", "y", "z"))
    il = cols.index("label") if "label" in cols else None
    pts, labels = [], []
    for (lineno, raw), row in zip(data_lines, csv.reader([r for _, r in data_lines]), strict=True):
        if len(row) <= max(ix, iy, iz):
            raise KeypointError(f"expected at least {max(ix, iy, iz) + 1} columns on line {lineno} of {str(p)!r}, "
                                f"got {len(row)}: {_excerpt(raw.strip())}")
        try:
            xyz = [float(row[i]) for i in (ix, iy, iz)]
        except ValueError:
            raise KeypointError(f"expected numeric x, y, z on line {lineno} of {str(p)!r}, "
                                f"got {_excerpt(raw.strip())}") from None
        if not all(np.isfinite(xyz)):
            raise KeypointError(f"expected finite x, y, z on line {lineno} of {str(p)!r}, got {_excerpt(raw.strip())}")
        pts.append(xyz)
        labels.append(row[il].strip() if il is not None and il < len(row) else "")
    if not pts:
        raise KeypointError(f"expected at least one control point in {str(p)!r}, got none")
    world = np.asarray(pts, dtype=np.float64)
    return _markup_points_to_ras(world, frame), labels


def _markup_points_to_ras(points: np.ndarray, frame: str) -> np.ndarray:
    """``(N, 3)`` world points declared ``RAS`` or ``LPS`` -> RAS mm (via :mod:`brainshift.io.frames`)."""
    from brainshift.io.frames import lps_to_ras

    return lps_to_ras(points) if frame.upper() == "LPS" else np.asarray(points, dtype=np.float64)


def _read_mrk_json(p: Path) -> tuple[np.ndarray, list[str]]:
    """World points ``(N, 3)`` in RAS mm and labels from a Slicer ``.mrk.json`` file (markups schema v1)."""
    text = _read_text(p, "Slicer markups")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"expected a JSON Slicer markups file, got {str(p)!r}: {exc}") from None
    except RecursionError:  # the json module recurses once per nesting level
        raise InputFileError(f"expected a JSON Slicer markups file, got {str(p)!r}: nested too deeply to read "
                             f"(thousands of levels)") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups:
        got = "an empty list" if isinstance(markups, list) else type(markups).__name__
        raise KeypointError(f"expected a non-empty 'markups' list in {str(p)!r}, got {got}")
    pts, labels = [], []
    for m_index, markup in enumerate(markups):
        system = markup.get("coordinateSystem") if isinstance(markup, dict) else None
        if system is None:
            raise KeypointError(f"expected a 'coordinateSystem' (RAS or LPS) in markup {m_index} of {str(p)!r}, "
                                f"got none")
        if str(system).upper() not in ("RAS", "LPS"):
            raise KeypointError(f"expected coordinateSystem RAS or LPS in markup {m_index} of {str(p)!r}, "
                                f"got {system!r}")
        units = markup.get("coordinateUnits", "mm")
        if str(units).lower() != "mm":
            raise KeypointError(f"expected coordinateUnits 'mm' in markup {m_index} of {str(p)!r}, got {units!r}")
        control_points = markup.get("controlPoints") or []
        if not isinstance(control_points, list):
            raise KeypointError(f"expected a 'controlPoints' list in markup {m_index} of {str(p)!r}, got "
                                f"{type(control_points).__name__}")
        for c_index, cp in enumerate(control_points):
            if not isinstance(cp, dict):
                raise KeypointError(f"expected control point {c_index} of markup {m_index} in {str(p)!r} to be an "
                                    f"object with a 'position', got {cp!r:.80}")
            status = str(cp.get("positionStatus", "defined")).lower()
            if status != "defined":
                warnings.warn(f"skipping control point {cp.get('label', c_index)!r} of {str(p)!r}: positionStatus "
                              f"{status!r}", stacklevel=3)
                continue
            pos = cp.get("position")
            try:
                xyz = [float(v) for v in pos]
            except (TypeError, ValueError):
                xyz = []
            if len(xyz) != 3 or not all(np.isfinite(xyz)):
                raise KeypointError(f"expected a finite 3-D 'position' for control point {c_index} of markup "
                                    f"{m_index} in {str(p)!r}, got {pos!r}")
            pts.append(_markup_points_to_ras(np.asarray([xyz]), str(system))[0])
            labels.append(str(cp.get("label", "")).strip())
    if not pts:
        raise KeypointError(f"expected at least one defined control point in {str(p)!r}, got none")
    return np.asarray(pts, dtype=np.float64), labels


def _read_markups_ras(p: Path) -> tuple[np.ndarray, list[str]]:
    suffix = _suffix(p)
    if suffix == ".fcsv":
        return _read_fcsv(p)
    if suffix == ".mrk.json":
        return _read_mrk_json(p)
    raise InputFileError(f"expected a Slicer markups file ending in .fcsv or .mrk.json, got {str(p)!r}")


def pair_points_by_label(pre_labels: list[str], intra_labels: list[str], pre_path: str | os.PathLike[str],
                         intra_path: str | os.PathLike[str], what: str = "markups") -> tuple[np.ndarray, np.ndarray]:
    """Pair two point lists (preop, intraop) by label, or by order when labels cannot pair them.

    By label when all labels are non-empty and unique in both lists and the lists share labels: points whose
    label has no partner in the other list are dropped with a warning naming them. Otherwise (a label missing,
    repeated, or no label in common) by order, which requires equal counts (a warning is issued if both label
    sets are unique but disjoint). Used for Slicer markups (:func:`read_slicer_markups`) and the landmark files
    of ``brainshift evaluate-landmarks``.

    Args:
        pre_labels, intra_labels: one label per point (``""`` for a point without a label).
        pre_path, intra_path: the files they come from (named in the messages).
        what: what the points are, for the messages (``"markups"``, ``"landmark"``).

    Returns:
        ``(pre_index, intra_index)``: integer arrays of equal length, the i-th preop point kept and its partner,
        in preop order.

    Raises:
        KeypointError: labels that cannot pair the points and different counts (order cannot pair them either).
    """

    def unique(labels: list[str]) -> bool:
        return all(labels) and len(set(labels)) == len(labels)

    common = set(pre_labels) & set(intra_labels) if unique(pre_labels) and unique(intra_labels) else set()
    if common:
        if common != set(pre_labels) or common != set(intra_labels):
            dropped = sorted((set(pre_labels) | set(intra_labels)) - common)
            warnings.warn(f"matching the {len(common)} {what} labels present in both files; dropped "
                          f"{len(dropped)} without a partner: {', '.join(dropped[:10])}"
                          f"{' ...' if len(dropped) > 10 else ''}", stacklevel=3)
        keep = [i for i, lab in enumerate(pre_labels) if lab in common]
        index = {lab: i for i, lab in enumerate(intra_labels)}
        return np.asarray(keep, dtype=np.intp), np.asarray([index[pre_labels[i]] for i in keep], dtype=np.intp)
    if len(pre_labels) != len(intra_labels):
        raise KeypointError(f"expected the same number of preop and intraop points to match by order (labels "
                            f"are not unique or differ), got {len(pre_labels)} in {str(pre_path)!r} and "
                            f"{len(intra_labels)} in {str(intra_path)!r}")
    if unique(pre_labels) and unique(intra_labels):
        warnings.warn(f"preop and intraop {what} share no label; matching {len(pre_labels)} points by order",
                      stacklevel=3)
    order = np.arange(len(pre_labels), dtype=np.intp)
    return order, order


def read_slicer_markups(preop_path: str | os.PathLike[str], intraop_path: str | os.PathLike[str],
                        affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoints from a pair of 3D Slicer markups files (preop points, intraop points).

    Each file is a ``.fcsv`` (coordinate system from the ``# CoordinateSystem = RAS|LPS`` header line, legacy
    numeric ``0`` = RAS, ``1`` = LPS; columns located by name from the ``# columns = ...`` line, Slicer's
    default layout ``id,x,y,z,...,label,...`` if absent) or a ``.mrk.json`` (``coordinateSystem`` per markup;
    every defined control point of every markup, in order; points whose ``positionStatus`` is not ``defined``,
    e.g. ``missing`` for a landmark not found intraop, are skipped). Points are matched by label when all
    labels are non-empty and unique in both files and the files share labels: points whose label has no
    partner in the other file are dropped with a warning naming them. Otherwise (labels repeated, empty, or
    no label in common) by order, which requires equal counts (a warning is issued if both label sets are
    unique but disjoint).

    Args:
        preop_path: markups of the points on the preop image.
        intraop_path: markups of the same points on the intraop image.
        affine: the preop image's 4x4 voxel-to-RAS affine.

    Returns:
        ``(points_vox, disps_vox)``: ``(N, 3)`` preop voxel indices and voxel-unit displacements
        ``A^-1 (intraop_ras - preop_ras)``, in preop-file order.

    Raises:
        InputFileError: missing, unreadable or non-markups file.
        KeypointError: missing or unknown coordinate system, missing x/y/z columns, bad values, or point sets
            that can be matched neither by label nor by order.
    """
    pre_p, intra_p = Path(preop_path), Path(intraop_path)
    pre, pre_labels = _read_markups_ras(pre_p)
    intra, intra_labels = _read_markups_ras(intra_p)
    keep, partner = pair_points_by_label(pre_labels, intra_labels, pre_p, intra_p, what="markups")
    pre, intra = pre[keep], intra[partner]
    points_vox = points_to_voxel(pre, "ras", affine)
    disps_vox = vectors_to_voxel(intra - pre, "ras", affine)
    return points_vox, disps_vox


# -------------------------------------------------------------------------------------------- dispatch


def read_keypoints(path: str | os.PathLike[str], *, frame: str = "voxel", affine: np.ndarray | None = None,
                   intraop_path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read matched keypoints from any supported file, chosen by extension.

    - ``.csv`` / ``.txt``: :func:`read_keypoint_table` in ``frame``.
    - ``.fcsv`` / ``.mrk.json``: :func:`read_slicer_markups` with ``intraop_path`` (required); ``frame`` is
      ignored (the files declare their own coordinate system).
    - ``.key``: rejected, since 3D SIFT-Rank files hold locations only, no displacements.

    Args:
        path: keypoint file (the preop markups for Slicer files).
        frame: frame of a table: ``voxel`` (default), ``ras`` or ``lps``.
        affine: the preop image's 4x4 voxel-to-RAS affine (needed for world frames and markups).
        intraop_path: the intraop markups file, for ``.fcsv`` / ``.mrk.json``.

    Returns:
        ``(points_vox, disps_vox)``: ``(N, 3)`` float64 voxel indices and voxel-unit displacements.

    Raises:
        InputFileError: missing file or unsupported extension.
        KeypointError: content errors (see the readers); markups without ``intraop_path``; a ``.key`` file.
    """
    p = Path(path)
    suffix = _suffix(p)
    if suffix in TABLE_SUFFIXES:
        return read_keypoint_table(p, frame=frame, affine=affine)
    if suffix in MARKUP_SUFFIXES:
        if intraop_path is None:
            raise KeypointError(f"expected an intraop markups file to match the preop markups {str(p)!r} "
                                f"(--kpt-intraop), got none")
        if affine is None:
            raise KeypointError(f"expected the image affine to convert the markups {str(p)!r} to voxels, got none")
        return read_slicer_markups(p, intraop_path, affine)
    if suffix == KEY_SUFFIX:
        raise KeypointError(f"expected keypoints with displacements (.csv/.txt table or a .fcsv/.mrk.json pair), "
                            f"got the 3D SIFT-Rank file {str(p)!r}, which holds locations only")
    raise InputFileError(f"expected a keypoint file ending in .csv, .txt, .fcsv or .mrk.json, got {str(p)!r}")


# ------------------------------------------------------------------------------------------- validation


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"
