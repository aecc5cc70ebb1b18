"""Target registration error at landmark pairs on real patients' images (RESECT, BITE, ReMIND, your own).

``brainshift evaluate-landmarks`` (:func:`evaluate_landmarks`): preop landmarks are moved by a displacement field
(``brainshift infer`` / ``register`` output: forward Lagrangian on the preop grid) and compared with their intraop
counterparts; the TRE of each landmark before (``|intraop - preop|``) and after (``|intraop - moved preop|``) is
in world mm.

Landmark files (world coordinates; the format follows the extension):

- MNI ``.tag`` (MINC tag points, as RESECT and BITE ship them): ``Volumes = 1;`` lists one point per line,
  ``Volumes = 2;`` two (``x1 y1 z1 x2 y2 z2``: the first volume's point, then the second's) -- one file then holds
  both sets (``--intraop-landmarks`` may be omitted; the first volume is taken as preop unless
  ``tag_preop_volume=2``). Optional per-line extras (weight, structure id, patient id, a quoted label) are ignored
  except the label. MINC world coordinates are RAS mm.
- 3D Slicer ``.fcsv`` / ``.mrk.json``: read by :func:`brainshift.io.keypoints.read_slicer_markups` (their own
  coordinate system, RAS or LPS; matched by label when all labels are unique and shared, else by order).
- Tables ``.csv`` / ``.txt``: a header naming ``x, y, z`` (and optionally ``label``), RAS mm by default
  (``frame="lps"`` for LPS).

A preop and an intraop file (tables, one-volume tags) are paired by label when both label every point, each
label once, and they share labels (a point without a partner is dropped with a warning), else by order
(:func:`brainshift.io.keypoints.pair_points_by_label`, as Slicer markups).

Sources: RESECT (Xiao et al., Med Phys 2017) and BITE (Mercier et al., Med Phys 2012) landmark files.

Convention: the field is float32 ``(3, I, J, K)``, forward Lagrangian (preop voxel ``p`` moves to ``p + u(p)``),
voxel units along ``i, j, k`` of its grid; a preop landmark at world ``x`` (RAS mm) moves to ``A (q + u(q))``
with ``q = A^-1 x``, ``u`` sampled trilinearly.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainshift.errors import GeometryError, InputFileError, KeypointError

_MARKUPS = (".fcsv", ".mrk.json")
_TABLES = (".csv", ".txt", ".tsv")


@dataclass
class LandmarkTRE:
    """TRE per landmark (:func:`evaluate_landmarks`).

    Attributes:
        labels: landmark names (``"1"``, ``"2"``, ... when the files name none).
        preop_ras, intraop_ras, moved_ras: ``(N, 3)`` world RAS mm: preop, intraop and moved preop landmarks.
        before_mm, after_mm: ``(N,)`` TRE without and with the field (mm).
        outside: ``(N,)`` bool, preop landmarks outside the field's grid (moved by the edge value).
    """

    labels: list[str]
    preop_ras: np.ndarray
    intraop_ras: np.ndarray
    moved_ras: np.ndarray
    before_mm: np.ndarray
    after_mm: np.ndarray
    outside: np.ndarray

    def summary(self) -> dict:
        """Mean, median, max and standard deviation of the TRE before and after (mm), and the count."""
        out: dict = {"n_landmarks": len(self.labels), "n_outside_field": int(self.outside.sum())}
        for name, v in (("before", self.before_mm), ("after", self.after_mm)):
            out[name] = {"mean_mm": float(v.mean()), "median_mm": float(np.median(v)), "max_mm": float(v.max()),
                         "std_mm": float(v.std())}
        return out

    def table(self) -> str:
        """CSV text: ``label, x, y, z`` (preop RAS mm), ``tre_before_mm, tre_after_mm``."""
        lines = ["label,x,y,z,tre_before_mm,tre_after_mm"]
        for lab, p, b, a in zip(self.labels, self.preop_ras, self.before_mm, self.after_mm, strict=True):
            name = '"' + lab.replace('"', "'") + '"' if "," in lab else lab
            lines.append(f"{name},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f},{b:.4f},{a:.4f}")
        return "\n".join(lines) + "\n"


def _suffix(p: Path) -> str:
    name = p.name.lower()
    return ".mrk.json" if name.endswith(".mrk.json") else p.suffix.lower()


def read_tag_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Points of an MNI ``.tag`` file: ``(volume1 (N, 3), volume2 (N, 3) or None, labels)`` in RAS mm.

    A point without a quoted label is labelled by its 1-based number (``"1"``, ``"2"``, ...).

    Raises:
        InputFileError: unreadable file, not a tag file (no ``MNI Tag Point File`` line), or a malformed point line
            (its line number given).
    """
    v1, v2, labels = _read_tag(Path(path))
    return v1, v2, [lab or str(i + 1) for i, lab in enumerate(labels)]


def _read_tag(p: Path) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """:func:`read_tag_file` with ``""`` as the label of a point that has none."""
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:
        raise InputFileError(f"expected a readable .tag file, got {str(p)!r}: {exc.strerror or exc}") from None
    if "MNI Tag Point File" not in text:
        raise InputFileError(f"expected an MNI tag file starting with 'MNI Tag Point File', got {str(p)!r}")
    m = re.search(r"Volumes\s*=\s*(\d+)\s*;", text)
    n_vol = int(m.group(1)) if m else 1
    if n_vol not in (1, 2):
        raise InputFileError(f"expected Volumes = 1 or 2 in {str(p)!r}, got {n_vol}")
    start = re.search(r"Points\s*=", text)
    if start is None:
        raise InputFileError(f"expected a 'Points =' section in {str(p)!r}, got none")
    body = text[start.end():]
    first_line = text[: start.end()].count("\n") + 1
    pts, labels = [], []
    for offset, raw in enumerate(body.splitlines()):
        line = raw.split("%", 1)[0].strip()
        done = line.endswith(";")
        line = line.rstrip(";").strip()
        if line:
            try:
                tokens = shlex.split(line)
                values = [float(t) for t in tokens[: 3 * n_vol]]
            except ValueError:
                raise InputFileError(f"expected {3 * n_vol} coordinates on line {first_line + offset} of {str(p)!r}, "
                                     f"got {line[:80]!r}") from None
            if len(values) != 3 * n_vol or not np.all(np.isfinite(values)):
                raise InputFileError(f"expected {3 * n_vol} finite coordinates on line {first_line + offset} of "
                                     f"{str(p)!r}, got {line[:80]!r}")
            pts.append(values)
            extra = tokens[3 * n_vol:]
            quoted = [t for t in extra if not _is_number(t)]
            labels.append(quoted[-1] if quoted else "")
        if done:
            break
    if not pts:
        raise InputFileError(f"expected at least one tag point in {str(p)!r}, got none")
    a = np.asarray(pts, dtype=np.float64)
    return a[:, :3], (a[:, 3:6] if n_vol == 2 else None), labels


def _is_number(t: str) -> bool:
    try:
        float(t)
    except ValueError:
        return False
    return True


def read_point_table(path: str | os.PathLike[str], frame: str = "ras") -> tuple[np.ndarray, list[str]]:
    """Points ``(N, 3)`` RAS mm and labels from a table with a header naming ``x, y, z`` (and ``label``).

    A row without a label (no ``label`` column, or an empty cell) is labelled by its 1-based number.

    Raises:
        InputFileError: unreadable file, no ``x, y, z`` header, a malformed row (its line number given).
    """
    pts, labels = _read_table(Path(path), frame)
    return pts, [lab or str(i + 1) for i, lab in enumerate(labels)]


def _read_table(p: Path, frame: str) -> tuple[np.ndarray, list[str]]:
    """:func:`read_point_table` with ``""`` as the label of a row that has none."""
    if frame not in ("ras", "lps"):
        raise InputFileError(f"expected a table frame ras or lps, got {frame!r}")
    from brainshift.io.paths import read_utf8_text

    try:  # the byte-order mark of Excel's UTF-8 CSV is dropped; other bytes that are not UTF-8 are named by line
        lines = read_utf8_text(p, "landmark table").splitlines()
    except OSError as exc:
        raise InputFileError(f"expected a readable landmark table, got {str(p)!r}: {exc.strerror or exc}") from None
    rows = [(n, ln) for n, ln in enumerate(lines, start=1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise InputFileError(f"expected a header x,y,z and rows in {str(p)!r}, got an empty file")
    sep = "\t" if "\t" in rows[0][1] else ","
    names = [t.strip().strip("\"'").lower() for t in rows[0][1].split(sep)]
    if not {"x", "y", "z"} <= set(names):
        raise InputFileError(f"expected a header naming the columns x, y, z on line {rows[0][0]} of {str(p)!r}, "
                             f"got {rows[0][1][:80]!r}")
    ix = [names.index(c) for c in ("x", "y", "z")]
    il = names.index("label") if "label" in names else None
    pts, labels = [], []
    for n, ln in rows[1:]:
        tok = [t.strip().strip("\"'") for t in ln.split(sep)]
        try:
            xyz = [float(tok[i]) for i in ix]
        except (ValueError, IndexError):
            raise InputFileError(f"expected numbers x, y, z on line {n} of {str(p)!r}, got {ln[:80]!r}") from None
        if not np.all(np.isfinite(xyz)):
            raise InputFileError(f"expected finite x, y, z on line {n} of {str(p)!r}, got {ln[:80]!r}")
        pts.append(xyz)
        labels.append(tok[il] if il is not None and il < len(tok) else "")
    if not pts:
        raise InputFileError(f"expected at least one landmark row in {str(p)!r}, got none")
    a = np.asarray(pts, dtype=np.float64)
    if frame == "lps":
        a[:, :2] *= -1.0
    return a, labels


def read_landmark_pairs(preop_path: str | os.PathLike[str], intraop_path: str | os.PathLike[str] | None, *,
                        affine: np.ndarray, frame: str = "ras", tag_preop_volume: int = 1
                        ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Paired landmarks ``(preop_ras (N, 3), intraop_ras (N, 3), labels)`` from two files (or one 2-volume tag).

    Args:
        preop_path, intraop_path: landmark files (module docstring); ``intraop_path`` None only for a ``.tag``
            file with ``Volumes = 2``.
        affine: 4x4 voxel-to-RAS affine of the field's grid (Slicer markups are read through it).
        frame: frame of tables (``ras`` or ``lps``).
        tag_preop_volume: which volume (1 or 2) of a two-volume tag file holds the preop points.

    Raises:
        InputFileError: unreadable or unsupported files. KeypointError: different numbers of landmarks, or a
            missing intraop file for a one-volume file.
    """
    pre_p = Path(preop_path)
    s = _suffix(pre_p)
    if s in _MARKUPS:
        from brainshift.io.keypoints import read_slicer_markups

        if intraop_path is None:
            raise KeypointError(f"expected --intraop-landmarks for the Slicer markups {pre_p}, got none")
        pts_vox, disps_vox = read_slicer_markups(pre_p, intraop_path, affine)
        a = np.asarray(affine, dtype=np.float64)
        pre = pts_vox @ a[:3, :3].T + a[:3, 3]
        intra = (pts_vox + disps_vox) @ a[:3, :3].T + a[:3, 3]
        return pre, intra, [str(i + 1) for i in range(len(pre))]
    if s == ".tag":
        v1, v2, labels = _read_tag(pre_p)
        if intraop_path is None:
            if v2 is None:
                raise KeypointError(f"expected --intraop-landmarks or a two-volume tag file, got {pre_p} with "
                                    f"Volumes = 1")
            return (v1, v2, _numbered(labels)) if tag_preop_volume == 1 else (v2, v1, _numbered(labels))
        pre = v1 if (v2 is None or tag_preop_volume == 1) else v2
        intra, intra_labels = _read_single(Path(intraop_path), frame, volume=tag_preop_volume)
        return _paired(pre, intra, labels, intra_labels, pre_p, Path(intraop_path))
    if s in _TABLES:
        if intraop_path is None:
            raise KeypointError(f"expected --intraop-landmarks for the table {pre_p}, got none")
        pre, labels = _read_table(pre_p, frame)
        intra, intra_labels = _read_single(Path(intraop_path), frame, volume=1)
        return _paired(pre, intra, labels, intra_labels, pre_p, Path(intraop_path))
    raise InputFileError(f"expected landmarks as .tag, .fcsv, .mrk.json or a table (.csv/.txt), got {str(pre_p)!r}")


def _read_single(p: Path, frame: str, volume: int) -> tuple[np.ndarray, list[str]]:
    s = _suffix(p)
    if s == ".tag":
        v1, v2, labels = _read_tag(p)
        return (v2 if (v2 is not None and volume == 1) else v1), labels  # intraop: the other volume of a pair file
    if s in _TABLES:
        return _read_table(p, frame)
    raise InputFileError(f"expected intraop landmarks as .tag or a table (.csv/.txt), got {str(p)!r}")


def _paired(pre: np.ndarray, intra: np.ndarray, labels: list[str], intra_labels: list[str], p: Path, q: Path):
    """Preop and intraop landmarks paired by label when both files label every point uniquely and share labels
    (:func:`brainshift.io.keypoints.pair_points_by_label`), else by order (equal counts required)."""
    from brainshift.io.keypoints import pair_points_by_label

    if not (any(labels) and any(intra_labels)) and len(pre) != len(intra):
        raise KeypointError(f"expected as many intraop as preop landmarks ({len(pre)} in {p}), got {len(intra)}")
    keep, partner = pair_points_by_label(labels, intra_labels, p, q, what="landmarks")
    return pre[keep], intra[partner], _numbered([labels[i] for i in keep], keep)


def _numbered(labels: list[str], index=None) -> list[str]:
    """``labels`` with each empty one replaced by the point's 1-based number in its file (``index``: those numbers
    minus one; default the positions)."""
    index = range(len(labels)) if index is None else index
    return [lab or str(int(i) + 1) for lab, i in zip(labels, index, strict=True)]


def move_points(points_ras: np.ndarray, field_vox: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points moved by a forward field: ``A (q + u(q))``, ``q = A^-1 x`` (``u`` trilinear, edge held).

    Returns:
        ``(moved_ras (N, 3), outside (N,) bool)``: points outside the grid are moved by the nearest edge value.

    Convention: ``field_vox`` forward Lagrangian, voxel units along ``i, j, k`` of the grid ``affine``.
    """
    from scipy.ndimage import map_coordinates

    a = np.asarray(affine, dtype=np.float64)
    q = (np.asarray(points_ras, dtype=np.float64) - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    shape = np.array(field_vox.shape[1:])
    outside = np.any((q < -0.5) | (q > shape - 0.5), axis=1)
    u = np.stack([map_coordinates(np.asarray(field_vox[c], dtype=np.float64), q.T, order=1, mode="nearest")
                  for c in range(3)], axis=1)
    return (q + u) @ a[:3, :3].T + a[:3, 3], outside


def evaluate_landmarks(preop_landmarks: str | os.PathLike[str], intraop_landmarks: str | os.PathLike[str] | None,
                       field_path: str | os.PathLike[str], *, frame: str = "ras", tag_preop_volume: int = 1
                       ) -> LandmarkTRE:
    """TRE per landmark before and after applying a displacement field (module docstring).

    Args:
        preop_landmarks, intraop_landmarks: landmark files (see :func:`read_landmark_pairs`).
        field_path: the field (``.h5``, ``.nii.gz``, ``.npz``; :func:`brainshift.io.fields.read_field`).
        frame: frame of landmark tables (``ras`` or ``lps``).
        tag_preop_volume: the volume of a two-volume tag file that holds the preop points.

    Returns:
        :class:`LandmarkTRE`.

    Raises:
        InputFileError, KeypointError: unreadable or inconsistent files, a frame other than ras or lps.
        GeometryError: every preop landmark outside the field's grid (the wrong field, or landmarks of another
            image).
    """
    from brainshift.io.fields import read_field

    if frame not in ("ras", "lps"):  # a .tag file ignores it: checked here so that a typo is never silent
        raise InputFileError(f"expected the landmark frame ras or lps, got {frame!r}")
    field, affine = read_field(field_path)
    pre, intra, labels = read_landmark_pairs(preop_landmarks, intraop_landmarks, affine=affine, frame=frame,
                                             tag_preop_volume=tag_preop_volume)
    moved, outside = move_points(pre, field, affine)
    if outside.all():
        raise GeometryError(f"expected preop landmarks inside the field's grid {tuple(field.shape[1:])}, got all "
                            f"{len(pre)} outside (another image's landmarks, or LPS points read as RAS?)")
    return LandmarkTRE(labels=labels, preop_ras=pre, intraop_ras=intra, moved_ras=moved,
                       before_mm=np.linalg.norm(intra - pre, axis=1), after_mm=np.linalg.norm(intra - moved, axis=1),
                       outside=outside)
