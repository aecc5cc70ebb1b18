"""Displacement-field files, ITK transforms, inversion and warping.

Convention (every field in memory, argument or return value here): float32 ``(3, I, J, K)`` on a grid with a
voxel-to-RAS ``affine``, components in voxel units along ``i, j, k``; a *forward Lagrangian* field ``u``
moves the preop point at voxel ``p`` to ``p + u(p)`` (intraop). :func:`invert_field` returns the *backward*
field ``v`` on the same grid: the intraop point at voxel ``y`` came from the preop point ``y + v(y)``.

On disk (details and the reasons in ``docs/fields.md``):

- ``.h5``: an ITK ``DisplacementFieldTransform`` (HDF5 transform file in ITK's layout, float32 and compressed
  by default) whose
  displacement image lies on the field's grid with vectors in LPS mm, so ``TransformPoint(x_lps)`` of a
  preop point returns its intraop position ``x_lps + flip(A u)``.
- ``.nii`` / ``.nii.gz``: 5-D ``(I, J, K, 1, 3)`` float64 NIfTI, intent ``NIFTI_INTENT_VECTOR`` (1007),
  vector components in LPS mm: exactly what ITK's own NIfTI writer (and so ANTs) produces, so ITK-based
  tools read it back unchanged as a displacement field.
- ``.npz``: ``field`` float32 ``(3, I, J, K)`` in voxel units and ``affine`` float64 ``(4, 4)``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, InputFileError
from brainshift.field import check_field
from brainshift.geometry import check_affine, spacing_from_affine
from brainshift.io.atomic import atomic_output
from brainshift.io.frames import (
    affine_from_itk,
    affine_to_itk,
    array_from_itk_order,
    array_to_itk_order,
    field_to_world_vectors,
    world_vectors_to_field,
)
from brainshift.io.paths import check_gzip_stream, check_readable, match_suffix
from brainshift.volume import Volume

FIELD_SUFFIXES = (".h5", ".hdf5", ".nii", ".nii.gz", ".npz")

#: NIfTI intent codes for vector images (nifti1.h)
NIFTI_INTENT_DISPVECT = 1006
NIFTI_INTENT_VECTOR = 1007

#: SimpleITK ``InvertDisplacementField`` settings (measured in bench/bench_io.py): iterations, max and mean
#: residual tolerance in mm. ITK stops as soon as *either* tolerance is met, so the mean tolerance is set so
#: low that the max tolerance decides (with a mean tolerance of 1e-4 mm it stopped at a 0.04 mm max residual).
#: ``IterativeInverseDisplacementField`` was slower and less accurate on 160 x 192 x 144.
INVERT_ITERATIONS = 50
INVERT_MAX_ERROR_MM = 0.01
INVERT_MEAN_ERROR_MM = 1e-6
#: an inverse whose worst residual exceeds this (mm) is reported with a warning (the forward field may fold)
INVERT_WARN_MM = 0.1


def field_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case field suffix of ``path`` (``.nii.gz`` counted as one), or ``""`` if unsupported."""
    return match_suffix(path, FIELD_SUFFIXES)


def _check_suffix(path: Path) -> str:
    suffix = field_suffix(path)
    if not suffix:
        raise InputFileError(f"expected a displacement field file ending in {', '.join(FIELD_SUFFIXES)}, "
                             f"got {str(path)!r}")
    return suffix


# ----------------------------------------------------------------------------------------------- SimpleITK


def _field_image(field_vox: np.ndarray, affine: np.ndarray):
    """SimpleITK float64 vector image of LPS mm displacements on the grid ``(field.shape[1:], affine)``."""
    import SimpleITK as sitk

    vectors_lps = field_to_world_vectors(field_vox, affine, "lps")  # (I, J, K, 3)
    img = sitk.GetImageFromArray(array_to_itk_order(vectors_lps), isVector=True)
    origin, spacing, direction = affine_to_itk(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    return img


def _field_from_image(img) -> tuple[np.ndarray, np.ndarray]:
    """``(field_vox, affine)`` from a 3-D SimpleITK vector image of LPS mm displacements."""
    import SimpleITK as sitk

    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise InputFileError(f"expected a 3-D displacement field with 3 components, got dimension "
                             f"{img.GetDimension()} with {img.GetNumberOfComponentsPerPixel()} components")
    affine = affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    vectors_lps = array_from_itk_order(sitk.GetArrayFromImage(img))  # (I, J, K, 3)
    return world_vectors_to_field(vectors_lps, affine, "lps"), affine


def field_to_sitk_transform(field_vox: np.ndarray, affine: np.ndarray):
    """The ITK ``DisplacementFieldTransform`` of a field (SimpleITK object, float64, linear interpolation).

    Args:
        field_vox: ``(3, I, J, K)`` field in voxel units.
        affine: 4x4 voxel-to-RAS affine of the field's grid.

    Returns:
        ``sitk.DisplacementFieldTransform`` whose displacement image is the field's grid in ITK (LPS) geometry
        with vectors ``diag(-1, -1, 1) @ A @ u`` in mm, so ``TransformPoint(x)`` returns ``x + flip(A u(x))``
        (linearly interpolated; zero displacement outside the grid). For a forward field this maps a preop
        LPS point to its intraop position; resampling an image with it pulls the *intraop* image into preop
        space. For the backward field of :func:`invert_field` it maps intraop points to preop points and
        resampling the *preop* image with it gives the preop image warped into intraop space.

    Convention: field forward (or backward) Lagrangian in voxel units along ``i, j, k``; transform in LPS mm.

    Raises:
        GeometryError: malformed field or affine.
    """
    import SimpleITK as sitk

    f = check_field(field_vox)
    a = check_affine(affine)
    return sitk.DisplacementFieldTransform(_field_image(f, a))


def _displacement_transform(tx, path: Path):
    """The ``DisplacementFieldTransform`` inside ``tx`` (itself, or the only transform of a composite)."""
    import SimpleITK as sitk

    name = tx.GetName()
    if name == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        n = comp.GetNumberOfTransforms()
        inner = [comp.GetNthTransform(i) for i in range(n)]
        names = [t.GetName() for t in inner]
        if n != 1 or names[0] != "DisplacementFieldTransform":
            raise InputFileError(f"expected a DisplacementFieldTransform (or a composite holding exactly one) in "
                                 f"{str(path)!r}, got a composite of {names}")
        tx, name = inner[0], names[0]
    if name != "DisplacementFieldTransform":
        raise InputFileError(f"expected a DisplacementFieldTransform in {str(path)!r}, got a {name}")
    return sitk.DisplacementFieldTransform(tx)


# ---------------------------------------------------------------------------------------------- write / read


#: ``.h5`` precisions of :func:`write_field`: ITK's ``DisplacementFieldTransform_<type>_3_3``.
H5_DTYPES = ("float32", "float64")
#: Default gzip level of the ``.h5`` displacement vectors (1: the fastest; 0: uncompressed). Measured in
#: bench/fields_io.py: on smooth fields the byte shuffle + deflate level 1 stores a float32 field in ~0.77x of
#: its raw size (~0.38x of today's float64 file) at ~1.3 s per 160 x 192 x 144 field on this CPU; higher levels
#: gain < 1 %.
H5_COMPRESSION = 1
#: Vectors per HDF5 chunk of the parameters (x 3 components x 4 bytes = 3 MB for float32).
H5_CHUNK_VECTORS = 1 << 18


def write_field(path: str | os.PathLike[str], field_vox: np.ndarray, affine: np.ndarray, *,
                h5_dtype: str = "float32", compression: int = H5_COMPRESSION) -> Path:
    """Write a displacement field atomically; the format follows the extension.

    - ``.h5`` / ``.hdf5``: an ITK transform file holding one ``DisplacementFieldTransform_<h5_dtype>_3_3``
      (see :func:`field_to_sitk_transform` for what ``TransformPoint`` returns), written with h5py in ITK's
      own HDF5 layout (``/TransformGroup/0/{TransformType, TransformFixedParameters, TransformParameters}``,
      as ``itk::HDF5TransformIOTemplate`` writes it): fixed parameters float64 ``size, origin, spacing,
      direction`` (LPS), parameters the LPS mm vectors ``diag(-1, -1, 1) @ A @ u`` interleaved per voxel in
      ITK's buffer order (``i`` fastest), stored as ``h5_dtype``, chunked, byte-shuffled and deflated with
      gzip ``compression`` (0: uncompressed). SimpleITK / ITK / ANTs read it (a float transform is promoted
      to double on reading; tested in tests/io/test_fields.py and tests/io/test_ants.py).
    - ``.nii`` / ``.nii.gz``: float64 ``(I, J, K, 1, 3)`` vector image, intent ``NIFTI_INTENT_VECTOR``
      (1007), components LPS mm (``diag(-1, -1, 1) @ A @ u``, ``A`` as stored in the header's float32 sform,
      so :func:`read_field` returns ``u`` bit for bit), sform and qform = ``affine`` (code 1), units mm.
      This is the layout ITK's NIfTI writer produces for a vector image (ANTs warps included); SimpleITK 2.5
      reads such a file back without touching the components. (Intent ``DISPVECT`` (1006)
      would make ITK >= 5.4 flip the first two components on reading, i.e. 1006 files hold RAS vectors.)
    - ``.npz``: ``field`` float32 ``(3, I, J, K)`` (voxel units), ``affine`` float64 ``(4, 4)``.

    Args:
        path: output path.
        field_vox: ``(3, I, J, K)`` field in voxel units.
        affine: 4x4 voxel-to-RAS affine of the field's grid.
        h5_dtype: ``float32`` (default; the vectors are computed in float64 and rounded once, ~1e-6 mm on a
            10 mm displacement) or ``float64`` (``.h5`` only).
        compression: gzip level 0-9 of the ``.h5`` vectors (0: none; default :data:`H5_COMPRESSION`).

    Returns:
        The path written.

    Convention: forward (or backward) Lagrangian field in voxel units along ``i, j, k``; stored as such in
    ``.npz``, as LPS mm vectors in ``.h5`` and ``.nii``.

    Raises:
        InputFileError: unsupported extension. GeometryError: malformed field or affine.
        BrainshiftError: ``h5_dtype`` not in :data:`H5_DTYPES` or ``compression`` not in 0-9.
    """
    p = Path(path)
    suffix = _check_suffix(p)
    if h5_dtype not in H5_DTYPES:
        raise BrainshiftError(f"expected an .h5 precision in {H5_DTYPES}, got {h5_dtype!r}")
    if not (isinstance(compression, int | np.integer) and 0 <= int(compression) <= 9):
        raise BrainshiftError(f"expected a gzip level 0-9 for the .h5 field, got {compression!r}")
    f = check_field(field_vox)
    a = check_affine(affine)
    if suffix in (".h5", ".hdf5"):
        import io

        # built in memory, then written with Python's file I/O: HDF5 crashes the process (SIGSEGV, in
        # H5Fclose) when its own writes fail on a full disk; a failed Python write is a clean OSError
        buf = io.BytesIO()
        _write_itk_h5(buf, f, a, np.dtype(h5_dtype), int(compression))
        with atomic_output(p) as tmp, open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
    elif suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        from brainshift.io.images import set_nifti_affine

        img = nib.Nifti1Image(np.zeros((1, 1, 1, 1, 3), np.float64), a)
        set_nifti_affine(img, a)
        # components from the affine exactly as the header stores it (float32 sform) and kept in float64, so
        # that read_field(write_field(u)) == u bit for bit
        a_stored = img.header.get_best_affine()
        vectors_lps = field_to_world_vectors(f, a_stored, "lps")[:, :, :, None, :]
        img = nib.Nifti1Image(vectors_lps, a_stored, header=img.header)
        set_nifti_affine(img, a_stored)
        img.header.set_intent(NIFTI_INTENT_VECTOR, (), name="")
        img.header.set_xyzt_units("mm", "sec")
        with atomic_output(p) as tmp:
            nib.save(img, str(tmp))
    else:  # .npz
        with atomic_output(p) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, field=f, affine=a)
    return p


def itk_field_parameters(field_vox: np.ndarray, affine: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The ``TransformParameters`` of a field's ITK ``DisplacementFieldTransform``: ``(K, J, I, 3)`` ``dtype``.

    ``out[k, j, i] = diag(-1, -1, 1) @ A @ u[:, i, j, k]`` (LPS mm), i.e. ITK's pixel buffer (``i`` fastest,
    components interleaved) of the displacement image; computed in float64 and rounded once to ``dtype``.

    Convention: ``field_vox`` ``(3, I, J, K)`` voxel units along ``i, j, k`` (forward or backward Lagrangian).
    """
    m = np.diag([-1.0, -1.0, 1.0]) @ check_affine(affine)[:3, :3]
    f = check_field(field_vox)
    out = np.empty(f.shape[:0:-1] + (3,), dtype=dtype)  # (K, J, I, 3)
    ft = f.transpose(0, 3, 2, 1)  # (3, K, J, I) view: no copy; the sums below read it strided once
    for c in range(3):
        out[..., c] = m[c, 0] * ft[0].astype(np.float64) + m[c, 1] * ft[1] + m[c, 2] * ft[2]
    return out


def _write_itk_h5(path, field_vox: np.ndarray, affine: np.ndarray, dtype: np.dtype, compression: int) -> None:
    """The HDF5 transform file of ``itk::HDF5TransformIOTemplate`` for one displacement-field transform.

    ``path``: a file path or a binary file object (h5py writes either).
    """
    import h5py

    origin, spacing, direction = affine_to_itk(affine)
    size = [float(s) for s in field_vox.shape[1:]]
    fixed = np.asarray([*size, *origin, *spacing, *direction], dtype=np.float64)
    params = itk_field_parameters(field_vox, affine, dtype).reshape(-1)
    type_name = f"DisplacementFieldTransform_{'float' if dtype == np.float32 else 'double'}_3_3"
    vlen = h5py.string_dtype("ascii")
    with h5py.File(path, "w", libver="earliest") as h5:
        for key, text in (("HDFVersion", "HDF5 library version: " + ".".join(map(str, h5py.h5.get_libversion()))),
                          ("ITKVersion", "5.4"), ("OSName", "brainshift (h5py)"), ("OSVersion", "")):
            h5.create_dataset(key, data=np.array([text.encode()], dtype=object), dtype=vlen)
        g = h5.create_group("TransformGroup").create_group("0")
        g.create_dataset("TransformType", data=np.array([type_name.encode()], dtype=object), dtype=vlen)
        g.create_dataset("TransformFixedParameters", data=fixed)
        kw = {}
        if compression > 0:
            kw = {"chunks": (min(params.size, 3 * H5_CHUNK_VECTORS),), "compression": "gzip",
                  "compression_opts": compression, "shuffle": True}
        g.create_dataset("TransformParameters", data=params, **kw)


def read_field(path: str | os.PathLike[str], reference: Volume | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a displacement field written by :func:`write_field` or by ITK-based tools.

    - ``.h5`` / ``.hdf5``: ``sitk.ReadTransform``; a ``DisplacementFieldTransform`` or a composite holding
      exactly one; its displacement image gives the grid and the LPS mm vectors.
    - ``.nii`` / ``.nii.gz``: 5-D ``(I, J, K, 1, 3)`` vector NIfTI read with nibabel (grid = nibabel's affine).
      Components are read the way ITK 5.4 reads them: intent ``DISPVECT`` (1006) holds RAS mm vectors,
      any other intent (``VECTOR`` 1007, as written by ITK/ANTs and by :func:`write_field`) LPS mm vectors.
    - ``.npz``: arrays ``field`` ``(3, I, J, K)`` (voxel units) and ``affine`` ``(4, 4)``.

    Args:
        path: field file.
        reference: if given, the field's grid must be this volume's grid (shape equal, affine to 1e-3 mm).

    Returns:
        ``(field_vox, affine)``: float32 ``(3, I, J, K)`` field in voxel units and its 4x4 voxel-to-RAS affine.

    Convention: the field is returned exactly as stored (forward Lagrangian for brainshift's own outputs),
    components converted to voxel units along ``i, j, k``.

    Raises:
        InputFileError: missing, unreadable or unsupported file, or not a 3-D 3-component field.
        GeometryError: the field's grid differs from ``reference``'s.
    """
    p = Path(path)
    suffix = _check_suffix(p)
    check_readable(p, "displacement field")
    try:  # the readers' own geometry checks (an .h5 whose fixed parameters hold NaN) name the file here
        if suffix in (".h5", ".hdf5"):
            field, affine = _read_h5(p)
        elif suffix in (".nii", ".nii.gz"):
            field, affine = _read_nifti_field(p)
        else:
            field, affine = _read_npz(p)
        field = check_field(field)
        affine = check_affine(affine)
    except GeometryError as exc:
        raise InputFileError(f"expected a valid displacement field in {str(p)!r}: {exc}") from None
    if reference is not None:
        check_same_grid(field.shape[1:], affine, reference, what=f"field {str(p)!r}")
    return field, affine


def check_same_grid(shape, affine: np.ndarray, reference: Volume, what: str = "field") -> None:
    """Raise :class:`GeometryError` unless ``(shape, affine)`` is ``reference``'s grid (affine to 1e-3 mm)."""
    shape = tuple(int(s) for s in shape)
    a = check_affine(affine)
    if shape == reference.shape and np.allclose(a, reference.affine, atol=1e-3, rtol=0):
        return
    sp_ref = tuple(round(float(s), 4) for s in reference.spacing)
    sp = tuple(round(float(s), 4) for s in spacing_from_affine(a))
    detail = ""
    if shape == reference.shape and sp == sp_ref:
        diff = float(np.abs(a - reference.affine).max())
        detail = f" (same shape and spacing but the affines differ by up to {diff:.4g} mm)"
    raise GeometryError(f"expected a field on the image grid (shape {reference.shape}, spacing {sp_ref} mm), "
                        f"got {what} with shape {shape}, spacing {sp} mm{detail}")


def _read_h5(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    _check_hdf5(p)
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputFileError(f"expected a readable ITK transform file, got {str(p)!r}: "
                             f"{lines[-1].strip() if lines else exc}") from None
    dft = _displacement_transform(tx, p)
    return _field_from_image(dft.GetDisplacementField())


def _check_hdf5(p: Path) -> None:
    """Refuse an empty, non-HDF5, truncated or corrupt ``.h5`` with a message saying which (ITK's is unclear).

    Raises:
        InputFileError: naming the file and the cause.
    """
    import h5py

    if p.stat().st_size == 0:
        raise InputFileError(f"expected an ITK transform file (HDF5) in {str(p)!r}, got an empty file (0 bytes)")
    if not h5py.is_hdf5(str(p)):
        raise InputFileError(f"expected an ITK transform file (HDF5) in {str(p)!r}, got a file that is not HDF5")
    try:
        with h5py.File(str(p), "r") as fh:
            fh.visit(lambda name: None)
            group = fh.get("TransformGroup")
            if group is not None:
                for key in group:
                    params = group[key].get("TransformParameters")
                    if params is not None and params.size:
                        np.asarray(params[-1:])  # reading the last values checks that the data is all there
            problem = _itk_layout_problem(fh)
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        cause = " ".join(str(exc).split()) or type(exc).__name__
        raise InputFileError(f"expected a complete ITK transform file (HDF5) in {str(p)!r}, got a truncated or "
                             f"corrupt file ({cause[:160]})") from None
    if problem:
        raise InputFileError(f"expected an ITK transform file in ITK's HDF5 layout in {str(p)!r}, got {problem}")


def _itk_layout_problem(fh) -> str | None:
    """What in an open HDF5 file ITK's transform reader would fail on, or None.

    ITK (SimpleITK, Slicer, ANTs) needs ``/TransformGroup/<n>/TransformType`` as a variable-length ASCII string
    (h5py's default strings are UTF-8, which ITK's HDF5 cannot convert) and, except for a composite's own
    entry, ``TransformParameters`` and ``TransformFixedParameters``. Checked here because ITK's HDF5 prints
    dozens of diagnostic lines to stderr before it fails on such a file.
    """
    import h5py

    group = fh.get("TransformGroup")
    if not isinstance(group, h5py.Group) or not len(group):
        return "no transform in /TransformGroup"
    for key in group:
        entry = group[key]
        if not isinstance(entry, h5py.Group):
            return f"/TransformGroup/{key} that is not a group"
        ttype = entry.get("TransformType")
        info = h5py.check_string_dtype(ttype.dtype) if isinstance(ttype, h5py.Dataset) else None
        if info is None or info.length is not None or info.encoding != "ascii" or ttype.size < 1:
            what = "none" if ttype is None else f"dtype {ttype.dtype}"
            if info is not None:
                what += f" ({info.encoding}, {'variable' if info.length is None else 'fixed'} length)"
            return (f"/TransformGroup/{key}/TransformType {what}; ITK reads it only as a variable-length ASCII "
                    f"string")
        name = np.ravel(ttype[()])[0]
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        if not name.startswith("CompositeTransform"):
            missing = [d for d in ("TransformParameters", "TransformFixedParameters")
                       if not isinstance(entry.get(d), h5py.Dataset)]
            if missing:
                return f"no {' and no '.join(missing)} in /TransformGroup/{key} ({name})"
    return None


def _read_nifti_field(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if p.name.lower().endswith(".gz"):
        check_gzip_stream(p, "NIfTI vector field")
    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float64)
        affine = np.asarray(img.affine, dtype=np.float64)
        intent = int(img.header["intent_code"])
    except Exception as exc:  # nibabel raises many types
        raise InputFileError(f"expected a readable NIfTI vector field, got {str(p)!r}: {exc}") from None
    if data.ndim != 5 or data.shape[3] != 1 or data.shape[4] != 3:
        raise InputFileError(f"expected a 5-D NIfTI vector field of shape (I, J, K, 1, 3), got shape {data.shape} "
                             f"in {str(p)!r}")
    frame = "ras" if intent == NIFTI_INTENT_DISPVECT else "lps"
    try:
        return world_vectors_to_field(data[:, :, :, 0, :], affine, frame), affine
    except GeometryError as exc:
        raise InputFileError(f"expected a valid NIfTI vector field in {str(p)!r}: {exc}") from None


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import zipfile

    if not zipfile.is_zipfile(p):  # np.load would take it for a pickle and say "contains pickled (object) data"
        raise InputFileError(f"expected a .npz field file (a zip archive of 'field' and 'affine'), got {str(p)!r}, "
                             f"which is not a zip archive (empty, truncated or another format)")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"field", "affine"} <= keys:
                raise InputFileError(f"expected arrays 'field' and 'affine' in {str(p)!r}, got {sorted(keys)}")
            return np.asarray(z["field"]), np.asarray(z["affine"], dtype=np.float64)
    except InputFileError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError (pickled arrays)
        raise InputFileError(f"expected a readable .npz field file, got {str(p)!r}: {exc}") from None


# ------------------------------------------------------------------------------------------ invert and warp


def invert_field(field_vox: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse (backward, Eulerian) field of a forward field, on the same grid.

    Uses SimpleITK ``InvertDisplacementField`` (ITK ``InvertDisplacementFieldImageFilter``, fixed-point
    iteration of Chen et al. 2008 as implemented for ANTs; boundary displacement held at zero) with
    ``INVERT_ITERATIONS`` iterations and tolerances ``INVERT_MAX_ERROR_MM`` / ``INVERT_MEAN_ERROR_MM``.
    It was measured more accurate and faster than ``IterativeInverseDisplacementField`` on 160 x 192 x 144
    (bench/bench_io.py). A warning is issued if the worst residual stays above ``INVERT_WARN_MM`` mm, which
    happens where the forward field folds (no inverse exists there).

    Args:
        field_vox: ``(3, I, J, K)`` forward field in voxel units.
        affine: 4x4 voxel-to-RAS affine of its grid.

    Returns:
        ``(3, I, J, K)`` float32 backward field ``v`` in voxel units on the same grid: the intraop point at
        voxel ``y`` is the preop point ``y + v(y)``; equivalently ``p + u(p) + v(p + u(p)) = p``.

    Convention: input forward Lagrangian (preop ``p`` -> intraop ``p + u(p)``); output backward Eulerian
    (intraop ``y`` -> preop ``y + v(y)``), both voxel units along ``i, j, k``.

    Raises:
        GeometryError: malformed field or affine.
    """
    import SimpleITK as sitk

    f = check_field(field_vox)
    a = check_affine(affine)
    flt = sitk.InvertDisplacementFieldImageFilter()
    flt.SetMaximumNumberOfIterations(INVERT_ITERATIONS)
    flt.SetMaxErrorToleranceThreshold(INVERT_MAX_ERROR_MM)
    flt.SetMeanErrorToleranceThreshold(INVERT_MEAN_ERROR_MM)
    flt.SetEnforceBoundaryCondition(True)
    inv_img = flt.Execute(_field_image(f, a))
    if flt.GetMaxErrorNorm() > INVERT_WARN_MM:
        boundary_mm = _boundary_displacement_mm(f, a)
        if boundary_mm > INVERT_WARN_MM:  # the usual cause: ITK holds the inverse at zero on the grid boundary
            cause = (f"the field moves the grid boundary by up to {boundary_mm:.3g} mm while the inverse is held at "
                     f"zero there, so it is inexact near the image edge")
        else:
            cause = "the forward field may fold or be too large to invert there"
        warnings.warn(f"the inverse field's worst residual is {flt.GetMaxErrorNorm():.3g} mm (tolerance "
                      f"{INVERT_MAX_ERROR_MM} mm): {cause}", stacklevel=2)
    inv, _ = _field_from_image(inv_img)
    return inv


def _boundary_displacement_mm(field_vox: np.ndarray, affine: np.ndarray) -> float:
    """The largest displacement (mm) on the six faces of the grid."""
    a = affine[:3, :3]
    worst = 0.0
    for axis in range(3):
        for idx in (0, -1):
            face = np.take(field_vox, idx, axis=axis + 1).reshape(3, -1)
            if face.size:
                worst = max(worst, float(np.linalg.norm(a @ face, axis=0).max()))
    return worst


#: Default subsampling of :func:`coarse_inverse_field`.
INVERSE_SUBSAMPLING = 2


def coarse_inverse_field(field_vox: np.ndarray, affine: np.ndarray, factor: int = INVERSE_SUBSAMPLING) -> np.ndarray:
    """The backward field of a forward field, inverted on every ``factor``-th voxel and upsampled trilinearly.

    :func:`brainshift.io.fields.invert_field` (SimpleITK ``InvertDisplacementField``, 50 fixed-point
    iterations) costs about 25 s on a 160 x 208 x 176 grid on this 2-core CPU; on the grid subsampled by 2
    (the samples ``field[:, ::2, ::2, ::2]``, exactly, with the affine's columns scaled by 2) it is 8x fewer
    voxels. The coarse inverse is converted back to fine voxel units and interpolated trilinearly
    (``scipy.ndimage.map_coordinates``, order 1, edge values held) at every fine voxel. Smooth fields lose
    nothing visible; a displacement jump (the ground truth is zero outside the brain) is smeared over one
    coarse voxel. The demo uses it only to make the warped images.

    Args:
        field_vox: ``(3, I, J, K)`` forward field, voxel units.
        affine: 4x4 voxel-to-RAS affine of its grid.
        factor: integer subsampling (1 = :func:`invert_field` itself).

    Returns:
        ``(3, I, J, K)`` float32 backward field in voxel units on the same grid.

    Convention: input forward Lagrangian; output backward Eulerian (intraop ``y`` -> preop ``y + v(y)``),
    both in voxel units along ``i, j, k``.
    """
    from scipy.ndimage import map_coordinates


    f = check_field(field_vox)
    if factor <= 1:
        return invert_field(f, affine)
    a = np.asarray(affine, dtype=np.float64).copy()
    a[:3, :3] *= factor  # coarse voxel n is fine voxel factor * n; same origin
    with warnings.catch_warnings(record=True):  # residuals at the field's jumps / grid border are expected here
        warnings.simplefilter("always")
        inv_c = invert_field(np.ascontiguousarray(f[:, ::factor, ::factor, ::factor]) / factor, a)
    shape = f.shape[1:]
    coords = np.meshgrid(*[np.arange(n, dtype=np.float32) / factor for n in shape], indexing="ij", sparse=False)
    out = np.empty_like(f)
    for c in range(3):
        out[c] = map_coordinates(inv_c[c], coords, order=1, mode="nearest", prefilter=False) * factor
    return out


def warp_image(volume: Volume, field_vox: np.ndarray, affine: np.ndarray, *,
               inverse_field: np.ndarray | None = None) -> Volume:
    """The preop image resampled into intraop space: ``out(y) = volume(y + v(y))``.

    The backward field ``v`` (``inverse_field``, or :func:`invert_field` of ``field_vox`` if not given) is
    turned into an ITK ``DisplacementFieldTransform`` and ``sitk.Resample`` pulls ``volume`` through it onto
    the field's grid: linear interpolation for intensity volumes, nearest neighbour for labels; points that
    fall outside ``volume`` get 0.

    Args:
        volume: the preop image (any grid; usually the field's grid).
        field_vox: ``(3, I, J, K)`` forward field in voxel units on the grid ``affine``.
        affine: 4x4 voxel-to-RAS affine of the field's grid (also the output grid).
        inverse_field: the backward field of ``field_vox`` on the same grid, if already computed.

    Returns:
        A :class:`Volume` on the field's grid (float32 for intensity, the input's integer type for labels).

    Convention: ``field_vox`` forward Lagrangian, ``inverse_field`` backward Eulerian (intraop ``y`` ->
    preop ``y + v(y)``), both in voxel units along ``i, j, k``.

    Raises:
        GeometryError: malformed fields, or an inverse field on another grid.
    """
    import SimpleITK as sitk

    from brainshift.io.images import volume_from_sitk, volume_to_sitk

    f = check_field(field_vox)
    a = check_affine(affine)
    inv = invert_field(f, a) if inverse_field is None else check_field(inverse_field, f.shape[1:])
    tx = field_to_sitk_transform(inv, a)
    ref = sitk.Image([int(s) for s in f.shape[1:]], sitk.sitkUInt8)
    origin, spacing, direction = affine_to_itk(a)
    ref.SetOrigin(origin)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    if volume.kind == "label":
        src = volume_to_sitk(volume)
        out = sitk.Resample(src, ref, tx, sitk.sitkNearestNeighbor, 0, src.GetPixelID())
    else:
        src = volume_to_sitk(Volume(np.asarray(volume.data, dtype=np.float32), volume.affine))
        out = sitk.Resample(src, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return volume_from_sitk(out, volume.kind)
