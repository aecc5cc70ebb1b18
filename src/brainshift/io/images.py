"""Read and write 3-D images as :class:`~brainshift.volume.Volume`.

Readers:

- NIfTI (``.nii``, ``.nii.gz``) through nibabel; the affine is nibabel's ``img.affine`` (sform if set, else
  qform), which is the voxel-to-RAS+ mm map. Geometry is checked (:func:`check_nifti_geometry`): no sform
  and no qform, or an sform and a qform that disagree, warn naming both and the one used; a degenerate
  affine (zero or non-finite spacing) is refused.
- NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK; ITK's LPS geometry
  (origin, spacing, direction) becomes a voxel-to-RAS affine with :func:`brainshift.io.frames.affine_from_itk`
  and the ``(z, y, x)`` NumPy view becomes nibabel order with :func:`~brainshift.io.frames.array_from_itk_order`.

Only NIfTI is written. Conversions between :class:`Volume` and SimpleITK images (used for ITK resampling)
are :func:`volume_to_sitk` and :func:`volume_from_sitk`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import numpy as np

from brainshift.errors import GeometryError, InputFileError
from brainshift.io.atomic import atomic_output
from brainshift.io.frames import affine_from_itk, affine_to_itk, array_from_itk_order, array_to_itk_order
from brainshift.io.paths import check_gzip_stream, check_readable, match_suffix
from brainshift.volume import Kind, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def image_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case image suffix of ``path`` (``.nii.gz`` counted as one suffix), or ``""`` if unknown."""
    return match_suffix(path, IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike[str], kind: Kind = "intensity") -> Volume:
    """Read a 3-D image file into a :class:`Volume`.

    Trailing singleton dimensions (e.g. ``(I, J, K, 1)``) are dropped. Intensity images become float32
    (NIfTI scaling ``scl_slope/scl_inter`` applied); label images keep their integer type (float files whose
    values are all integers are converted to int32).

    Args:
        path: ``.nii``, ``.nii.gz`` (nibabel), ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` (SimpleITK).
        kind: ``"intensity"`` or ``"label"``.

    Returns:
        The volume: data ``(I, J, K)`` in nibabel voxel order, 4x4 voxel-to-RAS mm affine.

    Raises:
        InputFileError: missing, unreadable or unsupported file (a ``.nii.gz`` whose gzip stream is truncated or
            fails its checksum included); a genuine 4-D (or 2-D, or vector-valued) image; voxels that are not one
            real number (RGB, complex); intensities beyond float32's range; label image with non-integer values.
            The message names the path.
    """
    p = Path(path)
    suffix = image_suffix(p)
    if not suffix:
        raise InputFileError(f"expected an image file ending in {', '.join(IMAGE_SUFFIXES)}, got {str(p)!r}")
    check_readable(p, "image")
    if kind not in ("intensity", "label"):
        raise InputFileError(f"expected image kind 'intensity' or 'label', got {kind!r}")
    if suffix in NIFTI_SUFFIXES:
        data, affine = _read_nifti(p)
    else:
        data, affine = _read_itk(p)
    data = _squeeze_to_3d(data, p)
    _check_voxel_type(data, p)
    _check_affine_of(affine, p)
    return Volume(_cast(data, kind, p), affine, kind)


def _check_voxel_type(data: np.ndarray, p: Path) -> None:
    """Refuse voxels that are not one real number: RGB / structured records (a traceback in the cast before) and
    complex values (whose imaginary part the cast to float32 dropped with only a numpy warning)."""
    dtype = data.dtype
    if dtype.names:
        raise InputFileError(f"expected a scalar image (one real number per voxel) in {str(p)!r}, got "
                             f"{len(dtype.names)} values per voxel ({', '.join(dtype.names)}): a colour or vector "
                             f"image")
    if dtype.kind == "c":
        raise InputFileError(f"expected real voxel values in {str(p)!r}, got complex values ({dtype}); give its "
                             f"magnitude image")
    if dtype.kind not in "biuf":
        raise InputFileError(f"expected numeric voxel values in {str(p)!r}, got values of type {dtype}")


def _check_affine_of(affine: np.ndarray, p: Path) -> None:
    """Refuse a degenerate voxel-to-world map (non-finite, a zero spacing, singular), naming the file."""
    a = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((a[:3, :3] ** 2).sum(axis=0)) if a.shape == (4, 4) else np.zeros(3)
    with np.errstate(all="ignore"):  # a NaN affine: refused below, without numpy's own warnings first
        singular = a.shape != (4, 4) or not np.isfinite(a).all() or not (spacing > 1e-6).all() \
            or not abs(np.linalg.det(a[:3, :3])) >= 1e-12 * float(np.prod(spacing))
    if singular:
        raise GeometryError(f"expected a non-degenerate voxel-to-world geometry (finite, non-zero spacing, "
                            f"invertible) in {str(p)!r}, got spacing {_fmt_vec(spacing)} mm and affine "
                            f"{_fmt_affine(a)}")


def check_intensities(volume: Volume, path: str | os.PathLike[str], what: str = "image") -> None:
    """Refuse an intensity image that is unusable as input: non-finite values, or a constant (or empty) image.

    Args:
        volume: the image as read.
        path: its file (named in the message).
        what: what the image is, for the message (``"preop image"``).

    Raises:
        InputFileError: NaN or inf voxels (their count); all voxels equal (e.g. an all-zero image).
    """
    data = np.asarray(volume.data)
    if data.size == 0:
        raise InputFileError(f"expected a non-empty {what}, got shape {data.shape} in {str(path)!r}")
    finite = np.isfinite(data)
    if not finite.all():
        raise InputFileError(f"expected finite intensities in the {what} {str(path)!r}, got "
                             f"{int(data.size - finite.sum())} NaN or inf voxels of {data.size}")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise InputFileError(f"expected some structure in the {what} {str(path)!r}, got a constant image "
                             f"(every voxel {lo:g})")


def check_nifti_geometry(img, p: Path) -> None:
    """Warn about an ambiguous NIfTI geometry, naming the file, both affines and the one nibabel (and brainshift) uses.

    - no sform and no qform (both codes 0): only the voxel sizes are known; nibabel's default affine is used;
    - sform and qform both set but differing by more than 1e-3 mm: the sform is used (ITK-based tools may
      use the qform, so results would differ between tools).
    """
    hdr = img.header
    try:
        s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    except (KeyError, TypeError, ValueError):
        return  # not a NIfTI-1/2 header (nothing to compare)
    if s_code == 0 and q_code == 0:
        warnings.warn(f"{str(p)!r} has no sform and no qform (both codes 0): its position and orientation are "
                      f"unknown; using nibabel's default affine {_fmt_affine(img.affine)} from the voxel sizes",
                      stacklevel=4)
    elif s_code > 0 and q_code > 0:
        sform, qform = hdr.get_sform(), hdr.get_qform()
        diff = float(np.abs(np.asarray(sform) - np.asarray(qform)).max())
        if not np.isfinite(diff) or diff > 1e-3:
            warnings.warn(f"{str(p)!r} has an sform and a qform that disagree (by up to {diff:.4g}): sform "
                          f"{_fmt_affine(sform)}, qform {_fmt_affine(qform)}; using the sform (as nibabel does; "
                          f"ITK-based tools may use the qform)", stacklevel=4)


def _fmt_vec(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in np.asarray(v).ravel()) + ")"


def _fmt_affine(a) -> str:
    a = np.round(np.asarray(a, dtype=np.float64), 4) + 0.0  # no 4e-08 from a float32 qform, no -0
    return "[" + "; ".join(" ".join(f"{float(x):.4g}" for x in row) for row in a[:3]) + "]"


def _read_nifti(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if p.name.lower().endswith(".gz"):
        check_gzip_stream(p, "NIfTI image")
    try:
        with _nibabel_fixes() as fixes:
            img = nib.load(str(p))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error...)
        raise InputFileError(f"expected a readable NIfTI image, got {str(p)!r}: {_one_line(exc)}") from None
    if any("pixdim[1,2,3]" in f for f in fixes) and int(img.header["sform_code"]) == 0:
        # nibabel silently replaced a zero voxel size by 1 mm, and the grid comes from those voxel sizes
        raise GeometryError(f"expected a non-degenerate voxel-to-world geometry in {str(p)!r}, got a zero voxel "
                            f"size in the header's pixdim and no sform")
    for fix in fixes:
        if "pixdim[1,2,3]" not in fix:
            warnings.warn(f"{str(p)!r}: {fix} (nibabel)", stacklevel=3)
    check_nifti_geometry(img, p)
    return data, affine


@contextlib.contextmanager
def _nibabel_fixes():
    """Collect the header fixes nibabel logs while loading (instead of printing them on stderr)."""
    import logging

    logger = logging.getLogger("nibabel.global")
    fixes: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fixes.append(record.getMessage())

    handler, propagate, saved = _Collect(), logger.propagate, list(logger.handlers)
    logger.handlers, logger.propagate = [handler], False
    try:
        yield fixes
    finally:
        logger.handlers, logger.propagate = saved, propagate


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_itk(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    with _captured_stderr() as diagnostics:
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            img, error = None, exc
    if img is None:
        raise InputFileError(f"expected a readable image, got {str(p)!r}: "
                             f"{_itk_read_error(error, diagnostics.text)}") from None
    diagnostics.replay()  # a successful read: ITK's warnings reach stderr as before
    ncomp = img.GetNumberOfComponentsPerPixel()
    size = list(img.GetSize())  # ITK index order (i, j, k[, t])
    if ncomp != 1:
        raise InputFileError(f"expected a scalar 3-D image, got {ncomp} components per voxel in {str(p)!r}")
    dim = img.GetDimension()
    if dim < 3:
        raise InputFileError(f"expected a 3-D image, got a {dim}-D image of size {tuple(size)} in {str(p)!r}")
    # ITK's NumPy view is C-ordered (t, k, j, i): reverse the index to nibabel order (i, j, k, t)
    arr = np.transpose(sitk.GetArrayFromImage(img), tuple(range(dim))[::-1])
    if dim > 3:
        # keep the spatial 3x3 block of the N-D geometry; extra dims must be singletons (checked by the caller)
        direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
        affine = affine_from_itk(img.GetOrigin()[:3], img.GetSpacing()[:3], direction.ravel())
    else:
        affine = affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return np.ascontiguousarray(arr), affine


class _Captured:
    """What a C library wrote to file descriptor 2 inside :func:`_captured_stderr`."""

    def __init__(self) -> None:
        self.text = ""

    def replay(self) -> None:
        """Write the captured text to stderr (where it would have gone)."""
        if self.text:
            import sys

            sys.stderr.write(self.text)
            sys.stderr.flush()


@contextlib.contextmanager
def _captured_stderr():
    """Collect what C code (ITK's MetaIO, NRRD readers) prints on file descriptor 2 while the block runs.

    A damaged MetaImage makes ITK print lines such as ``MetaImage: M_ReadElementsData: data not read completely``
    straight to the C stderr before it raises an exception whose own text blames ``errno`` ("No such file or
    directory"): the command would print several lines and a misleading cause. The lines are kept for the
    message instead (or written back to stderr by :meth:`_Captured.replay` after a successful read). Where file
    descriptor 2 cannot be redirected, nothing is captured.
    """
    import sys
    import tempfile

    captured = _Captured()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read(1 << 16).decode("utf-8", "replace")


def _itk_read_error(exc: BaseException, diagnostics: str) -> str:
    """The cause of a failed ``sitk.ReadImage`` in one line: ITK's own diagnostics if it printed any (MetaIO's
    "data not read completely", whose exception then blames ``errno``), else the ``ITK ERROR`` text without
    its source location and object address."""
    import re

    lines = [" ".join(ln.split()) for ln in diagnostics.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("WARNING:", "WARNING "))]
    if lines:
        return " ".join(lines)[:300]
    text = str(exc)
    m = re.search(r"ITK ERROR: \w+\(0x[0-9a-fA-F]+\):\s*(.*)", text, re.S)
    body = m.group(1) if m else (text.strip().splitlines() or [type(exc).__name__])[-1]
    return " ".join(body.split())[:300]


def _squeeze_to_3d(data: np.ndarray, p: Path) -> np.ndarray:
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputFileError(f"expected a 3-D image, got shape {tuple(shape)} in {str(p)!r}")
    return data


def _cast(data: np.ndarray, kind: str, p: Path) -> np.ndarray:
    if kind == "intensity":
        data = np.asarray(data)
        with np.errstate(over="ignore"):  # values beyond float32's range: refused below with a message
            out = np.asarray(data, dtype=np.float32)  # no copy when the file is float32 already
        if data.dtype.kind == "f" and data.dtype.itemsize > 4:
            over = np.isfinite(data) & ~np.isfinite(out)
            if over.any():
                raise InputFileError(f"expected intensities within float32's range (|value| <= "
                                     f"{float(np.finfo(np.float32).max):.3g}) in {str(p)!r}, got {int(over.sum())} "
                                     f"voxels beyond it (up to {float(np.abs(data[over]).max()):.3g})")
        return out
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return np.asarray(data) if data.dtype != bool else data.astype(np.uint8)
    finite = np.isfinite(data)
    if not finite.all():
        raise InputFileError(f"expected integer labels (a mask or label map) in {str(p)!r}, got "
                             f"{int(finite.size - finite.sum())} NaN or inf voxels")
    fractional = data != np.round(data)
    if fractional.any():
        raise InputFileError(f"expected integer labels (a mask or label map) in {str(p)!r}, got non-integer values "
                             f"(e.g. {float(data[fractional].flat[0]):g})")
    info = np.iinfo(np.int32)
    if data.size and (float(data.min()) < info.min or float(data.max()) > info.max):
        raise InputFileError(f"expected integer labels within int32's range in {str(p)!r}, got values from "
                             f"{float(data.min()):g} to {float(data.max()):g}")
    return data.astype(np.int32)


def write_image(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` as NIfTI (``.nii`` or ``.nii.gz``) atomically.

    The affine goes into both the sform and the qform (code 1, scanner) when it has no shear, so readers that
    prefer either (nibabel, ITK, FSL) agree; float32 for intensities, int16/int32 for labels
    (:meth:`Volume.to_nifti`).

    Args:
        volume: the image to write.
        path: target path ending in ``.nii`` or ``.nii.gz``.

    Returns:
        The path written.

    Raises:
        InputFileError: if ``path`` is not a NIfTI path.
    """
    import nibabel as nib

    p = Path(path)
    if image_suffix(p) not in NIFTI_SUFFIXES:
        raise InputFileError(f"expected an output image path ending in .nii or .nii.gz, got {str(p)!r}")
    img = volume.to_nifti()
    set_nifti_affine(img, volume.affine)
    with atomic_output(p) as tmp:
        nib.save(img, str(tmp))
    return p


def set_nifti_affine(img, affine: np.ndarray) -> None:
    """Put ``affine`` in a nibabel NIfTI image's sform (code 1) and, if it has no shear, its qform (code 1)."""
    a = np.asarray(affine, dtype=np.float64)
    img.set_sform(a, code=1)
    m = a[:3, :3]
    gram = m.T @ m
    off = gram - np.diag(np.diag(gram))
    if np.abs(off).max() <= 1e-6 * np.abs(np.diag(gram)).max():
        img.set_qform(a, code=1)
    else:
        img.set_qform(None, code=0)


def volume_to_sitk(volume: Volume):
    """A SimpleITK image (LPS geometry) holding ``volume``'s data; the inverse of :func:`volume_from_sitk`."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array_to_itk_order(np.asarray(volume.data)))
    origin, spacing, direction = affine_to_itk(volume.affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def volume_from_sitk(image, kind: Kind = "intensity") -> Volume:
    """A :class:`Volume` from a scalar 3-D SimpleITK image (LPS geometry converted to a voxel-to-RAS affine)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputFileError(f"expected a scalar 3-D SimpleITK image, got dimension {image.GetDimension()} with "
                             f"{image.GetNumberOfComponentsPerPixel()} components")
    data = array_from_itk_order(sitk.GetArrayFromImage(image))
    affine = affine_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(data, affine, kind)
