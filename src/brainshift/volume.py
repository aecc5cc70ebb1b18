"""`Volume`: one image type that carries its geometry.

A :class:`Volume` is a 3-D array in nibabel's on-disk voxel order ``(i, j, k)``, a 4x4 voxel-to-RAS+ mm
affine and a ``kind`` (``"intensity"`` or ``"label"``) that decides how it is resampled (trilinear or
nearest neighbour). Resampling follows nibabel.processing (scipy ``map_coordinates`` underneath).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from brainshift.errors import GeometryError
from brainshift.geometry import check_affine, spacing_from_affine
from brainshift.geometry import mask_inside as geometry_mask_inside

Kind = Literal["intensity", "label"]


@dataclass
class Volume:
    """A 3-D image with its geometry.

    Attributes:
        data: ``(I, J, K)`` array in nibabel voxel order.
        affine: 4x4 float64 voxel-to-RAS+ mm affine.
        kind: ``"intensity"`` (resampled trilinearly) or ``"label"`` (nearest neighbour).

    Raises:
        GeometryError: if ``data`` is not 3-D or the affine is not an invertible 4x4 matrix.
    """

    data: np.ndarray
    affine: np.ndarray
    kind: Kind = "intensity"

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        if self.data.ndim != 3:
            raise GeometryError(f"expected a 3-D image (I, J, K), got an array of shape {self.data.shape}")
        self.affine = check_affine(self.affine)
        if self.kind not in ("intensity", "label"):
            raise GeometryError(f"expected kind 'intensity' or 'label', got {self.kind!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size ``(I, J, K)``."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along ``i, j, k``."""
        return spacing_from_affine(self.affine)

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        """True if ``other`` has the same shape and (to ``atol`` mm) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def to_nifti(self):
        """This volume as a ``nibabel.Nifti1Image`` (float32 for intensities, int16/int32 for labels)."""
        import nibabel as nib

        if self.kind == "label":
            dtype = np.int16 if self.data.max(initial=0) < 32767 and self.data.min(initial=0) > -32768 else np.int32
        else:
            dtype = np.float32
        img = nib.Nifti1Image(self.data.astype(dtype, copy=False), self.affine)
        img.header.set_xyzt_units("mm")
        return img

    def resample_to_grid(self, shape: tuple[int, int, int], affine: np.ndarray, cval: float = 0.0) -> Volume:
        """Resample onto the grid ``(shape, affine)`` (trilinear for intensity, nearest for labels).

        Points of the target grid outside this volume get ``cval``. Follows
        ``nibabel.processing.resample_from_to``.
        """
        from nibabel.processing import resample_from_to

        order = 0 if self.kind == "label" else 1
        src = self.to_nifti() if self.kind == "label" else _float_nifti(self)
        out = resample_from_to(src, (tuple(int(s) for s in shape), check_affine(affine)), order=order,
                               mode="constant", cval=cval)
        data = np.asarray(out.dataobj)
        if self.kind == "label":
            data = data.astype(self.data.dtype, copy=False)
        else:
            data = data.astype(np.float32, copy=False)
        return Volume(data, out.affine, self.kind)

    def resample_like(self, reference: Volume, cval: float = 0.0) -> Volume:
        """Resample onto ``reference``'s grid."""
        return self.resample_to_grid(reference.shape, reference.affine, cval=cval)

    def resample_to_spacing(self, spacing_mm: float | tuple[float, float, float] = 1.0) -> Volume:
        """Resample to voxel size ``spacing_mm`` keeping the orientation and the field of view.

        The new grid keeps the first voxel centre and the axis directions; the number of voxels along each
        axis is ``round(extent / spacing)`` so the field of view is covered (the published method works at
        1 mm isotropic). Use :meth:`resample_like` with the original volume to go back.
        """
        new_grid = grid_with_spacing(self.shape, self.affine, spacing_mm)
        return self.resample_to_grid(*new_grid)


def mask_inside(mask, what: str = "mask", *, nonempty: bool = False) -> np.ndarray:
    """The inside of a brain / tumour / region mask given as a :class:`Volume` or an array: every nonzero voxel.
    The rule itself (and its errors) is :func:`brainshift.geometry.mask_inside`, the one binarisation of a user's
    mask in brainshift.

    Args:
        mask: a :class:`Volume` or an array of booleans or real numbers.
        what: how messages name the mask (``"brain mask"``, ``"--mask"``).
        nonempty: refuse a mask with no voxel inside.

    Returns:
        bool array of the mask's shape.

    Raises:
        GeometryError: as :func:`brainshift.geometry.mask_inside`; with ``nonempty``, a mask with no voxel inside.
    """
    inside = geometry_mask_inside(mask.data if isinstance(mask, Volume) else mask, what)
    if nonempty and not inside.any():
        raise GeometryError(f"expected a {what} with at least one voxel inside (nonzero), got none")
    return inside


def grid_with_spacing(shape, affine, spacing_mm) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid ``(shape, affine)`` covering the same field of view as ``(shape, affine)`` at ``spacing_mm``.

    Raises:
        GeometryError: if a spacing is not positive.
    """
    new_sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    if np.any(new_sp <= 0) or not np.all(np.isfinite(new_sp)):
        raise GeometryError(f"expected positive voxel spacings in mm, got {spacing_mm}")
    a = check_affine(affine)
    old_sp = spacing_from_affine(a)
    extent = np.asarray(shape, dtype=np.float64) * old_sp
    new_shape = tuple(int(max(1, round(e / s))) for e, s in zip(extent, new_sp, strict=True))
    new_aff = a.copy()
    new_aff[:3, :3] = a[:3, :3] / old_sp * new_sp
    # keep the field of view's corner (edge of the first voxel) fixed
    corner_old = a[:3, :3] @ (-0.5 * np.ones(3)) + a[:3, 3]
    new_aff[:3, 3] = corner_old - new_aff[:3, :3] @ (-0.5 * np.ones(3))
    return new_shape, new_aff


def _float_nifti(vol: Volume):
    import nibabel as nib

    return nib.Nifti1Image(vol.data.astype(np.float32, copy=False), vol.affine)
