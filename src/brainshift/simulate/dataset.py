"""On-disk layout of a simulated dataset: what ``brainshift simulate`` / ``simulate-batch`` write and the
training and evaluation loaders read.

Layout::

    DATASET/
      subjects/<subject_id>/
        t1.nii.gz               preop image (intensity)
        brain_mask.nii.gz       uint8 0/1
        tumour_mask.nii.gz      uint8 0/1
        ventricles_mask.nii.gz  uint8 0/1 (may be all zero)
        subject.json            how the subject was made (seed, source, synthesis parameters)
      cases/<case_id>/          one simulation of one subject
        field.npz               ``field`` float32 (3, I, J, K) on the subject's grid, ``affine`` (4, 4)
        cavity_mask.nii.gz      uint8 0/1: resection cavity (the removed tumour), preop grid
        intraop_t1.nii.gz       synthetic intraoperative MRI (:func:`case_intraop_image`: the preop image moved by
                                the ground truth, fluid-filled cavity, bias field, Rician noise, its own grid);
                                its drawn parameters are ``meta.json["intraop"]``
        meta.json               every simulation parameter, seed, solver iterations, residual, time,
                                max / median displacement (mm), and ``"subject": <subject_id>``

Convention (``field.npz``): forward Lagrangian, voxel units along ``i, j, k`` of the subject grid: the preop
point at voxel ``p`` moves to ``p + u(p)`` after brain shift; zero outside the brain.

A case directory is complete only when its ``meta.json`` exists (written last, atomically), which is what
makes batch generation resumable.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path

import numpy as np

from brainshift.errors import InputFileError
from brainshift.volume import Volume

#: A subject's detected keypoint candidates (``subjects/<id>/keypoints.csv``, :func:`read_subject_keypoints`).
SUBJECT_KEYPOINTS_FILE = "keypoints.csv"

SUBJECT_FILES = {
    "image": "t1.nii.gz",
    "brain_mask": "brain_mask.nii.gz",
    "tumour_mask": "tumour_mask.nii.gz",
    "ventricles_mask": "ventricles_mask.nii.gz",
}


@dataclass
class Subject:
    """A preop subject: image and masks on one grid (all :class:`Volume`)."""

    subject_id: str
    image: Volume
    brain_mask: Volume
    tumour_mask: Volume
    ventricles_mask: Volume
    info: dict = dc_field(default_factory=dict)


@dataclass
class SimCase:
    """One simulation: the subject plus the ground-truth field.

    ``field`` is float32 ``(3, I, J, K)``. Convention: forward Lagrangian, voxel units along ``i, j, k``
    of ``subject.image``'s grid.
    """

    case_id: str
    subject: Subject
    field: np.ndarray
    cavity_mask: Volume
    meta: dict


def _read_nifti(path: Path, kind: str) -> Volume:
    import nibabel as nib

    if not path.exists():
        raise InputFileError(f"expected dataset file {path}, it does not exist")
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if kind == "label":
        data = (data > 0).astype(np.uint8)
    else:
        data = data.astype(np.float32)
    return Volume(data, img.affine, kind)  # type: ignore[arg-type]


def _write_nifti(vol: Volume, path: Path) -> None:
    import nibabel as nib

    from brainshift.io.atomic import atomic_output

    data = vol.data.astype(np.uint8 if vol.kind == "label" else np.float32)
    img = nib.Nifti1Image(data, vol.affine)
    img.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


def _write_json(obj: dict, path: Path) -> None:
    from brainshift.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def subject_writers(subject: Subject) -> list[tuple[str, Callable[[Path], None]]]:
    """The files of a subject folder as ``(file name, writer(path))`` in the order written, ``subject.json`` last
    (for a caller that writes them one by one, e.g. through :class:`brainshift.io.output_set.OutputSet`)."""
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (name, functools.partial(_write_nifti, getattr(subject, attr))) for attr, name in SUBJECT_FILES.items()]
    writers.append(("subject.json", functools.partial(_write_json, {"subject_id": subject.subject_id, **subject.info})))
    return writers


def write_subject(root: str | Path, subject: Subject) -> Path:
    """Write ``subject`` under ``root/subjects/<subject_id>/`` (``subject.json`` last). Returns its folder."""
    d = Path(root) / "subjects" / subject.subject_id
    d.mkdir(parents=True, exist_ok=True)
    for name, writer in subject_writers(subject):
        writer(d / name)
    return d


#: File name of a case's synthetic intraoperative MRI.
INTRAOP_FILE = "intraop_t1.nii.gz"
#: Stream of the case seed that draws the intraop image (:func:`intraop_seed`); the simulation uses the seed itself.
_INTRAOP_STREAM = 1


def intraop_seed(case_seed: int) -> int:
    """The seed of a case's synthetic intraop image, derived from the case seed (an independent stream:
    ``numpy.random.SeedSequence([case_seed, 1])``), so the image is reproducible from ``meta.json`` alone."""
    return int(np.random.SeedSequence([int(case_seed), _INTRAOP_STREAM]).generate_state(1)[0])


def case_intraop_image(subject: Subject, field: np.ndarray, cavity_mask: Volume, case_seed: int
                       ) -> tuple[Volume, dict]:
    """The synthetic intraop MRI of a case: :func:`brainshift.simulate.intraop.synthesize_intraop_image` of the
    subject's image with the case's ground truth and cavity, seeded by :func:`intraop_seed` of ``case_seed``.

    Returns:
        ``(intraop, params)``: the image on its drawn grid and the JSON-serialisable drawn parameters.

    Convention: ``field`` float32 (3, I, J, K), forward Lagrangian, voxel units on the subject grid.
    """
    from brainshift.simulate.intraop import synthesize_intraop_image

    return synthesize_intraop_image(subject.image, field, cavity_mask, intraop_seed(case_seed),
                                    brain_mask=subject.brain_mask)


def write_case(root: str | Path, case_id: str, subject_id: str, field: np.ndarray, affine: np.ndarray,
               cavity_mask: Volume, meta: dict, *, intraop: tuple[Volume, dict] | None = None) -> Path:
    """Write one simulation under ``root/cases/<case_id>/``; ``meta.json`` is written last.

    ``intraop``: the case's synthetic intraop image and its parameters (:func:`case_intraop_image`), written as
    ``intraop_t1.nii.gz`` with the parameters in ``meta.json["intraop"]``.

    Convention: ``field`` float32 (3, I, J, K), forward Lagrangian, voxel units on the subject grid.
    """
    d = Path(root) / "cases" / case_id
    d.mkdir(parents=True, exist_ok=True)
    # a case is complete only while its meta.json exists: an earlier one goes first, so a case being rewritten
    # (and killed half-way) is never taken for a complete one by --resume or the training loader
    (d / "meta.json").unlink(missing_ok=True)
    for name, writer in case_writers(case_id, subject_id, field, affine, cavity_mask, meta, intraop=intraop):
        writer(d / name)
    return d


def case_writers(case_id: str, subject_id: str, field: np.ndarray, affine: np.ndarray, cavity_mask: Volume,
                 meta: dict, *, intraop: tuple[Volume, dict] | None = None
                 ) -> list[tuple[str, Callable[[Path], None]]]:
    """The files of a case folder (:func:`write_case`) as ``(file name, writer(path))`` in the order written,
    ``meta.json`` last (for a caller that writes them one by one, e.g. through
    :class:`brainshift.io.output_set.OutputSet`).

    Convention: ``field`` float32 (3, I, J, K), forward Lagrangian, voxel units on the subject grid.
    """
    writers: list[tuple[str, Callable[[Path], None]]] = [
        ("field.npz", functools.partial(_write_field_npz, field, affine)),
        ("cavity_mask.nii.gz", functools.partial(_write_nifti, cavity_mask))]
    extra = {}
    if intraop is not None:
        writers.append((INTRAOP_FILE, functools.partial(_write_nifti, intraop[0])))
        extra["intraop"] = {"file": INTRAOP_FILE, **intraop[1]}
    writers.append(("meta.json", functools.partial(_write_json, {**meta, **extra, "case_id": case_id,
                                                                  "subject": subject_id})))
    return writers


def _write_field_npz(field: np.ndarray, affine: np.ndarray, path: Path) -> None:
    from brainshift.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, field=np.asarray(field, dtype=np.float32), affine=np.asarray(affine, np.float64))


def read_subject(root: str | Path, subject_id: str) -> Subject:
    """Read ``root/subjects/<subject_id>``."""
    d = Path(root) / "subjects" / subject_id
    if not (d / "subject.json").exists():
        raise InputFileError(f"expected a subject folder with subject.json at {d}, found none")
    vols = {attr: _read_nifti(d / name, "intensity" if attr == "image" else "label")
            for attr, name in SUBJECT_FILES.items()}
    info = json.loads((d / "subject.json").read_text())
    return Subject(subject_id=subject_id, info=info, **vols)


def read_subject_keypoints(root: str | Path, subject_id: str) -> np.ndarray | None:
    """The detected keypoint candidates of a subject, ``(M, 3)`` float64 voxel indices, or None without a file.

    Reads ``root/subjects/<subject_id>/keypoints.csv`` with :func:`brainshift.io.keypoints.read_keypoint_positions`
    (the one reader used by evaluation and training).

    Raises:
        InputFileError: a malformed table.
    """
    from brainshift.io.keypoints import read_keypoint_positions

    p = Path(root) / "subjects" / subject_id / SUBJECT_KEYPOINTS_FILE
    return read_keypoint_positions(p) if p.is_file() else None


def list_cases(root: str | Path) -> list[str]:
    """Sorted ids of the complete cases (those with ``meta.json``) under ``root/cases``."""
    d = Path(root) / "cases"
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "meta.json").exists())


def case_subject_id(root: str | Path, case_id: str) -> str:
    """The subject id a case was simulated from (from its ``meta.json``)."""
    return json.loads((Path(root) / "cases" / case_id / "meta.json").read_text())["subject"]


def read_case(root: str | Path, case_id: str, subject: Subject | None = None) -> SimCase:
    """Read one complete case (and its subject, unless given)."""
    d = Path(root) / "cases" / case_id
    if not (d / "meta.json").exists():
        raise InputFileError(f"expected a complete case with meta.json at {d}, found none")
    meta = json.loads((d / "meta.json").read_text())
    if subject is None or subject.subject_id != meta["subject"]:
        subject = read_subject(root, meta["subject"])
    with np.load(d / "field.npz") as z:
        field = z["field"].astype(np.float32)
    return SimCase(case_id=case_id, subject=subject, field=field,
                   cavity_mask=_read_nifti(d / "cavity_mask.nii.gz", "label"), meta=meta)
