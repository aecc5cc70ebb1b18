"""Subjects for the simulator: real cohorts from files, or synthetic ones made from the MNI152 template.

A :class:`~brainshift.simulate.dataset.Subject` is a preop T1 image with brain, tumour and ventricle masks on
the image's grid.

**Real cohorts** (:func:`load_subject`): an image, a brain mask and a tumour mask or label map. BraTS /
UPENN-GBM label maps (1 = necrotic core, 2 = oedema, 4 (or 3) = enhancing tumour) are accepted as they are:
any non-zero label is tumour unless ``tumour_labels`` names the labels to use (e.g. ``(1, 4)`` for the
tumour core without oedema). Ventricles come from an optional mask or from a label map (e.g. SynthSeg's
lateral-ventricle labels 4 and 43) through ``ventricle_labels``.

**Synthetic subjects** (:func:`synthesize_subject`) start from the MNI152 2009 template shipped inside
nilearn (T1, brain mask, grey- and white-matter probability maps at 1 mm; no download). For a seed:

1. *Anatomy.* A random per-axis scaling (``scale_range``, default 0.9-1.1) about the brain centroid and a
   random smooth diffeomorphic warp: a stationary velocity field of white noise smoothed by a Gaussian
   (``warp_smoothness_mm``) and scaled to a maximum magnitude of ``warp_amplitude_mm`` (default 4 mm) on a
   coarse control grid (``warp_grid_mm``), exponentiated by scaling and squaring (Arsigny et al., MICCAI 2006)
   and interpolated trilinearly to 1 mm. The displacement of a flow of speed <= a is at most a, so
   ``warp_amplitude_mm`` bounds the warp's displacement. If the warp's minimum Jacobian determinant is below
   ``min_warp_jacobian`` its amplitude is halved (recorded). The template is pulled back through
   ``x -> c + (x + w(x) - c) / s`` (trilinear for the T1 and the probability maps, masks by thresholding the
   interpolated mask at 0.5), so image and masks move together.
2. *Ventricles* (computed once on the template, then warped with it): voxels inside the brain mask whose T1
   is below ``ventricle_intensity_fraction`` (0.4) x the median white-matter T1 and whose GM + WM
   probability is below ``ventricle_max_tissue_probability`` (0.5); of their 6-connected components, those
   with >= ``ventricle_min_voxels`` voxels, at most ``ventricle_max_surface_fraction`` (10 %) of them within
   ``ventricle_surface_band_mm`` (4 mm) of the brain surface (this drops the cisterns and sulcal CSF, which
   touch the surface) and a centroid within ``ventricle_max_centroid_distance_mm`` (35 mm) of the brain
   centroid. On MNI152 this keeps the two lateral ventricles (5,649 voxels each); the third and fourth
   ventricles are thin or merge with the cisterns at 1 mm and are left as parenchyma.
3. *Tumour.* A star-shaped blob ``|x - c| <= R' (1 + p(u))`` with ``u`` the direction from the centre ``c``
   and ``p`` a random low-frequency function on the sphere (a sum of ``tumour_shape_terms`` cosines
   ``cos(w u.d + phi)`` with ``w <= tumour_shape_max_frequency``), scaled to ``max |p| =
   tumour_shape_amplitude``; ``R'`` is set so the blob's volume equals that of a sphere of the drawn radius
   ``R ~ U(tumour_radius_range_mm)`` (8-25 mm). The centre is drawn uniformly among voxels with white-matter
   probability >= ``min_white_matter_probability`` (0.5), at least ``min_ventricle_distance_mm`` (3 mm) from
   the ventricles, and deep enough that *every* tumour voxel is at least ``min_surface_distance_mm`` (10 mm)
   from the brain surface (Euclidean distance transform of the brain mask). If no voxel qualifies the
   radius is shrunk by 10 % and the draw repeated (recorded). Ventricle voxels inside the tumour become
   tumour (the tumour displaces them).
4. *Tumour appearance on T1.* With ``s = |x - c| / (R' (1 + p(u)))`` (0 at the centre, 1 on the boundary):
   a hypointense core (``s <= core_fraction``) at the ``core_intensity_quantile`` (2 %) of the brain's
   intensities, rising smoothly (smoothstep) to a bright, enhancing-like rim (``s >= rim_fraction``) at the
   ``rim_intensity_quantile`` (100 %: the brain's brightest value); outside the boundary the rim falls over
   ``transition_mm`` (2 mm) to a darker oedema halo (``oedema_intensity_quantile``, 30 %) which blends into
   the tissue over a further ``oedema_mm`` (5 mm); smooth texture (``texture_amplitude`` x the intensity
   range) in the core. The tumour mask is the core and rim (the region resected), not the halo. All values
   are clipped to the original image's [min, max], so the intensity range is kept.
5. *Grid.* With ``crop`` the subject's 1 mm grid covers the scaled brain's bounding box plus the warp bound
   plus ``crop_margin_mm``, rounded up to a multiple of ``crop_multiple`` voxels (about 160 x 192 x 176), with
   the template's axes; otherwise the template grid (197 x 233 x 189). The MNI152 brain mask ends at the
   bottom of its field of view (the brainstem is cut flat there); the synthetic brains keep that cut.

All randomness comes from ``numpy.random.default_rng(seed)``: the same seed gives the same subject.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainshift.errors import GeometryError, InputFileError
from brainshift.simulate.dataset import Subject
from brainshift.volume import Volume, mask_inside

SYNTHETIC_SOURCE = "synthetic-mni152"


# --------------------------------------------------------------------------------------------- real cohorts


def load_subject(image_path: str | Path, brain_mask_path: str | Path, tumour_path: str | Path | None, *,
                 ventricles_path: str | Path | None = None, tumour_labels: tuple[int, ...] | list[int] | None = None,
                 ventricle_labels: tuple[int, ...] | list[int] | None = None,
                 subject_id: str | None = None) -> Subject:
    """Load a real subject: a preop image with brain, tumour and (optional) ventricle masks.

    Masks not on the image grid are resampled onto it (nearest neighbour, :meth:`Volume.resample_like`) as
    long as they lie inside the image's field of view. Tumour voxels outside the brain mask are added to the
    brain (skull-stripping tools often cut into tumours) when most of the tumour is inside it. Ventricle
    voxels are restricted to the brain and never overlap the tumour.

    Args:
        image_path: preop image (NIfTI, NRRD or MetaImage; read with :func:`brainshift.io.images.read_image`).
        brain_mask_path: brain mask (any nonzero voxel is brain: :func:`brainshift.volume.mask_inside`).
        tumour_path: tumour mask or label map (BraTS / UPENN-GBM style); any non-zero label is tumour unless
            ``tumour_labels`` is given. None: no tumour (an empty tumour mask; the deformation atlas accepts
            it, a simulated case needs a tumour).
        ventricles_path: optional ventricle / CSF mask or label map.
        tumour_labels: label values of ``tumour_path`` that are tumour.
        ventricle_labels: label values that are ventricles, taken from ``ventricles_path`` if given, else
            from ``tumour_path`` (one combined label map; then ``tumour_labels`` is required).
        subject_id: the subject's id; default: the image file name without its image suffix.

    Returns:
        A :class:`Subject` whose masks (uint8 0/1 label Volumes) share the image's grid; ``info`` records the
        source paths, labels and the voxel counts.

    Raises:
        InputFileError: missing or unreadable file (from ``read_image``); ``ventricle_labels`` from the tumour
            map without ``tumour_labels``.
        GeometryError: a mask read without labels that has negative or non-finite values (as
            :func:`brainshift.volume.mask_inside`), empty brain or tumour mask (after label selection), tumour
            mostly (> 50 %) outside the brain, or a mask whose foreground is not inside the image's field of
            view (more than 1 % of its voxels outside), i.e. a geometry mismatch beyond resampling.
    """
    from brainshift.io.images import check_intensities, read_image

    image = read_image(image_path, kind="intensity")
    check_intensities(image, image_path, "subject image")
    brain = _mask_on_grid(read_image(brain_mask_path, kind="label"), image, None, "brain mask", brain_mask_path)
    if tumour_path is None:
        if ventricle_labels is not None and ventricles_path is None:
            raise InputFileError("expected a tumour label map or a ventricles file with ventricle_labels, got "
                                 "neither")
        tumour_map, tumour = None, np.zeros(image.shape, dtype=bool)
    else:
        tumour_map = read_image(tumour_path, kind="label")
        tumour = _mask_on_grid(tumour_map, image, tumour_labels, "tumour mask", tumour_path)
    if ventricles_path is not None:
        ventricles = _mask_on_grid(read_image(ventricles_path, kind="label"), image, ventricle_labels,
                                   "ventricles mask", ventricles_path, allow_empty=True)
    elif ventricle_labels is not None:
        if tumour_labels is None:
            raise InputFileError("expected tumour_labels when the ventricles are taken from the tumour label map "
                                 "(ventricle_labels without ventricles_path), got none: every non-zero label "
                                 "would count as tumour")
        ventricles = _mask_on_grid(tumour_map, image, ventricle_labels, "ventricles mask", tumour_path,
                                   allow_empty=True)
    else:
        ventricles = np.zeros(image.shape, dtype=bool)

    n_tumour = int(tumour.sum())
    inside = int((tumour & brain).sum())
    if n_tumour and inside < 0.5 * n_tumour:
        raise GeometryError(f"expected the tumour inside the brain mask, got {n_tumour - inside} of {n_tumour} "
                            f"tumour voxels outside it ({tumour_path} vs {brain_mask_path})")
    added = n_tumour - inside
    brain = brain | tumour
    ventricles = ventricles & brain & ~tumour
    if subject_id is None:
        subject_id = subject_id_from_path(image_path)
    info = {
        "source": "file",
        "image": str(image_path), "brain_mask": str(brain_mask_path),
        "tumour": None if tumour_path is None else str(tumour_path),
        "ventricles": None if ventricles_path is None else str(ventricles_path),
        "tumour_labels": None if tumour_labels is None else [int(v) for v in tumour_labels],
        "ventricle_labels": None if ventricle_labels is None else [int(v) for v in ventricle_labels],
        "n_brain_voxels": int(brain.sum()), "n_tumour_voxels": n_tumour,
        "n_ventricle_voxels": int(ventricles.sum()), "tumour_voxels_added_to_brain": added,
    }
    return Subject(subject_id=subject_id, image=image, brain_mask=_label(brain, image.affine),
                   tumour_mask=_label(tumour, image.affine), ventricles_mask=_label(ventricles, image.affine),
                   info=info)


def subject_id_from_path(path: str | Path) -> str:
    """A subject id from an image file name: the name without its image suffix, characters outside
    ``[A-Za-z0-9_.-]`` replaced by ``_`` (``subject`` if nothing is left)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "subject"


def _label(mask: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(mask.astype(np.uint8), affine, "label")


def _select(data: np.ndarray, labels, what: str = "mask") -> np.ndarray:
    """The voxels with one of ``labels``, or without labels every nonzero voxel (:func:`mask_inside`)."""
    if labels is None:
        return mask_inside(data, what)
    return np.isin(data, np.asarray(list(labels)))


def _mask_on_grid(vol: Volume, image: Volume, labels, what: str, path, allow_empty: bool = False) -> np.ndarray:
    """Select ``labels`` of ``vol`` and bring the mask onto ``image``'s grid (nearest neighbour)."""
    sel = _select(vol.data, labels, f"{what} {str(path)!r}")
    n = int(sel.sum())
    if n == 0:
        if allow_empty:
            return np.zeros(image.shape, dtype=bool)
        got = "no non-zero voxel" if labels is None else f"no voxel with a label in {list(labels)}"
        raise GeometryError(f"expected a non-empty {what}, got {got} in {path}")
    if vol.same_grid(image):
        return sel
    # foreground voxel centres of the mask in the image's voxel frame: all must lie inside the image
    from brainshift.geometry import ras_to_voxel, voxel_to_ras

    pts = np.argwhere(sel).astype(np.float64)
    vox = ras_to_voxel(voxel_to_ras(pts, vol.affine), image.affine)
    inside = np.all((vox > -0.5) & (vox < np.asarray(image.shape) - 0.5), axis=1)
    if inside.mean() < 0.99:
        raise GeometryError(f"expected the {what} inside the image's field of view (resampled to its grid), got "
                            f"{int((~inside).sum())} of {n} foreground voxels outside it: {path} shape "
                            f"{vol.shape} vs image shape {image.shape}; check the files belong together")
    res = Volume(sel.astype(np.uint8), vol.affine, "label").resample_like(image).data > 0
    if not res.any():
        if allow_empty:
            return res
        raise GeometryError(f"expected a non-empty {what} after resampling to the image grid, got an empty one "
                            f"({path}: it is thinner than the image's voxels)")
    return res


# ------------------------------------------------------------------------------------- synthetic subjects


@dataclass(frozen=True)
class SynthesisConfig:
    """Parameters of :func:`synthesize_subject` (every length in mm; see the module docstring).

    Attributes:
        scale_range: per-axis scaling factor of the template about the brain centroid, drawn uniformly.
        warp_amplitude_mm: maximum magnitude of the stationary velocity field, which bounds the warp's
            displacement (mm).
        warp_smoothness_mm: standard deviation of the Gaussian smoothing the white-noise velocity (mm).
        warp_grid_mm: spacing of the control grid the warp is computed on, then interpolated to 1 mm.
        warp_steps: squaring steps of scaling and squaring (the velocity is divided by 2**steps).
        min_warp_jacobian: smallest accepted Jacobian determinant of the warp; below it the amplitude is halved.
        tumour_radius_range_mm: radius of the volume-equivalent sphere of the tumour, drawn uniformly.
        tumour_shape_amplitude: maximum relative deviation of the tumour radius from its mean shape (0-1).
        tumour_shape_terms: number of random cosine terms of the radial perturbation.
        tumour_shape_max_frequency: largest angular frequency (radians per unit of ``u . d``) of those terms.
        min_surface_distance_mm: minimum distance of every tumour voxel from the brain surface.
        min_ventricle_distance_mm: minimum distance of the tumour centre from the ventricles.
        min_white_matter_probability: white-matter probability required at the tumour centre.
        max_placement_attempts: radius reductions (10 % each) tried before giving up.
        core_fraction: normalised radius up to which the tumour has its core intensity.
        rim_fraction: normalised radius from which it has its rim intensity.
        core_intensity_quantile: quantile of the brain's intensities used for the hypointense core.
        rim_intensity_quantile: quantile used for the bright (enhancing-like) rim (1.0: the brain's maximum).
        oedema_intensity_quantile: quantile used for the darker oedema halo around the tumour.
        transition_mm: width outside the tumour boundary over which the rim falls to the oedema intensity.
        oedema_mm: further width over which the oedema halo blends into the tissue (0: no halo).
        texture_amplitude: amplitude of the smooth texture in the core, as a fraction of the intensity range.
        ventricle_intensity_fraction: ventricles are darker than this fraction of the median white-matter T1.
        ventricle_max_tissue_probability: and have GM + WM probability below this.
        ventricle_min_voxels: smallest kept ventricle component (voxels at 1 mm).
        ventricle_max_surface_fraction: largest fraction of a kept component within the surface band.
        ventricle_surface_band_mm: width of that band inside the brain surface.
        ventricle_max_centroid_distance_mm: largest distance of a kept component's centroid from the brain's.
        crop: crop the subject to the brain's bounding box (plus margins) instead of the full template grid.
        crop_margin_mm: margin around the (scaled, warped) brain's bounding box.
        crop_multiple: the cropped grid's size is rounded up to a multiple of this many voxels.
    """

    scale_range: tuple[float, float] = (0.9, 1.1)
    warp_amplitude_mm: float = 4.0
    warp_smoothness_mm: float = 15.0
    warp_grid_mm: float = 4.0
    warp_steps: int = 6
    min_warp_jacobian: float = 0.5
    tumour_radius_range_mm: tuple[float, float] = (8.0, 25.0)
    tumour_shape_amplitude: float = 0.3
    tumour_shape_terms: int = 6
    tumour_shape_max_frequency: float = 6.0
    min_surface_distance_mm: float = 10.0
    min_ventricle_distance_mm: float = 3.0
    min_white_matter_probability: float = 0.5
    max_placement_attempts: int = 30
    core_fraction: float = 0.55
    rim_fraction: float = 0.8
    core_intensity_quantile: float = 0.02
    rim_intensity_quantile: float = 1.0
    oedema_intensity_quantile: float = 0.3
    transition_mm: float = 2.0
    oedema_mm: float = 5.0
    texture_amplitude: float = 0.04
    ventricle_intensity_fraction: float = 0.4
    ventricle_max_tissue_probability: float = 0.5
    ventricle_min_voxels: int = 300
    ventricle_max_surface_fraction: float = 0.1
    ventricle_surface_band_mm: float = 4.0
    ventricle_max_centroid_distance_mm: float = 35.0
    crop: bool = True
    crop_margin_mm: float = 6.0
    crop_multiple: int = 16

    def __post_init__(self) -> None:
        lo, hi = self.tumour_radius_range_mm
        if not 0 < lo <= hi:
            raise GeometryError(f"expected 0 < min <= max tumour radius (mm), got {self.tumour_radius_range_mm}")
        slo, shi = self.scale_range
        if not 0 < slo <= shi:
            raise GeometryError(f"expected 0 < min <= max scale, got {self.scale_range}")
        if not 0 <= self.tumour_shape_amplitude < 1:
            raise GeometryError(f"expected a tumour shape amplitude in [0, 1), got {self.tumour_shape_amplitude}")
        if self.warp_amplitude_mm < 0 or self.warp_grid_mm <= 0 or self.warp_smoothness_mm <= 0:
            raise GeometryError("expected warp amplitude >= 0 and positive warp grid and smoothness (mm), got "
                                f"{self.warp_amplitude_mm}, {self.warp_grid_mm}, {self.warp_smoothness_mm}")
        if not 0 <= self.core_fraction < self.rim_fraction <= 1:
            raise GeometryError(f"expected 0 <= core_fraction < rim_fraction <= 1, got {self.core_fraction}, "
                                f"{self.rim_fraction}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SynthesisConfig:
        """Build from a dict (e.g. JSON / YAML); lists become tuples; unknown keys raise."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise GeometryError(f"expected synthesis parameters among {sorted(names)}, got unknown {unknown}")
        from brainshift.simulate.config_values import check_field_values

        d = check_field_values(d, cls, "the synthesis config")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class _Template:
    t1: np.ndarray          # float32 (I, J, K)
    brain: np.ndarray       # bool
    wm: np.ndarray          # float32 probability
    ventricles: np.ndarray  # bool
    support: np.ndarray     # bool: brain dilated by 2 voxels (where the template is sampled)
    affine: np.ndarray
    centroid_ras: np.ndarray
    bbox_ras: tuple[np.ndarray, np.ndarray]


@functools.lru_cache(maxsize=4)
def _template(vent_params: tuple) -> _Template:
    """The nilearn MNI152 template (1 mm) with its ventricle mask; cached per process."""
    import scipy.ndimage as ndi
    from nilearn import datasets

    from brainshift.geometry import voxel_to_ras

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    ventricles = _ventricles(t1, brain, gm, wm, affine, *vent_params)
    idx = np.argwhere(brain)
    centroid = voxel_to_ras(idx.mean(axis=0)[None], affine)[0]
    corners = voxel_to_ras(np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
                           * (idx.max(axis=0) - idx.min(axis=0)) + idx.min(axis=0), affine)
    support = ndi.binary_dilation(brain, iterations=2)
    return _Template(t1=t1, brain=brain, wm=wm, ventricles=ventricles, support=support, affine=affine,
                     centroid_ras=centroid, bbox_ras=(corners.min(axis=0), corners.max(axis=0)))


def _ventricles(t1, brain, gm, wm, affine, intensity_fraction, max_tissue_prob, min_voxels, max_surface_fraction,
                surface_band_mm, max_centroid_mm) -> np.ndarray:
    """Ventricle mask by the rule of the module docstring (step 2)."""
    import scipy.ndimage as ndi

    from brainshift.geometry import spacing_from_affine, voxel_to_ras

    sp = spacing_from_affine(affine)
    wm_median = float(np.median(t1[brain & (wm > 0.9)]))
    csf = brain & (t1 < intensity_fraction * wm_median) & (gm + wm < max_tissue_prob)
    lab, n = ndi.label(csf)
    if n == 0:
        return np.zeros_like(brain)
    ids = np.arange(1, n + 1)
    sizes = ndi.sum(csf, lab, ids)
    near = ndi.mean(ndi.distance_transform_edt(brain, sampling=sp) <= surface_band_mm, lab, ids)
    com = voxel_to_ras(np.array(ndi.center_of_mass(csf, lab, ids)), affine)
    centroid = voxel_to_ras(np.argwhere(brain).mean(axis=0)[None], affine)[0]
    keep = ids[(sizes >= min_voxels) & (near <= max_surface_fraction)
               & (np.linalg.norm(com - centroid, axis=1) <= max_centroid_mm)]
    return np.isin(lab, keep)


def synthesize_subject(seed: int, *, config: SynthesisConfig = SynthesisConfig(),
                       subject_id: str | None = None) -> Subject:
    """A synthetic subject: the MNI152 template, randomly scaled and warped, with a synthetic tumour.

    The method and every amplitude are in the module docstring and :class:`SynthesisConfig`.

    Args:
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same subject.
        config: synthesis parameters.
        subject_id: the subject's id (default ``"mni<seed>"``).

    Returns:
        A :class:`Subject` on a 1 mm grid (about 160 x 192 x 176 voxels with ``crop``): float32 T1 in the
        template's range [0, 1], uint8 brain / tumour / ventricle masks. ``info`` (JSON-serialisable) records
        the seed, the configuration, the drawn scales, warp amplitude, its maximum displacement and minimum
        Jacobian determinant, the tumour centre (RAS mm), drawn and volume-equivalent radius, volume and the
        minimum distance of a tumour voxel from the brain surface.

    Raises:
        GeometryError: no tumour placement satisfies the constraints within ``max_placement_attempts``.
    """
    return _synthesize(seed, config, subject_id)[0]


def _synthesize(seed: int, config: SynthesisConfig, subject_id: str | None = None):
    """:func:`synthesize_subject` plus intermediate maps ``{"wm", "warp_vox", "s", "t1_without_tumour"}``."""
    import scipy.ndimage as ndi

    from brainshift.field import jacobian_determinant
    from brainshift.geometry import spacing_from_affine

    rng = np.random.default_rng(seed)
    tpl = _template((config.ventricle_intensity_fraction, config.ventricle_max_tissue_probability,
                     config.ventricle_min_voxels, config.ventricle_max_surface_fraction,
                     config.ventricle_surface_band_mm, config.ventricle_max_centroid_distance_mm))
    scales = rng.uniform(*config.scale_range, size=3)
    shape, affine = _output_grid(tpl, scales, config)
    rot = affine[:3, :3]
    sp = spacing_from_affine(affine)

    # --- warp: scaling and squaring of a smooth random velocity on a coarse grid (voxel units of that grid)
    step = max(1, int(round(config.warp_grid_mm / float(sp.min()))))
    coarse = tuple(int(np.ceil((n - 1) / step)) + 1 for n in shape)
    noise = rng.standard_normal((3, *coarse))
    amplitude = config.warp_amplitude_mm
    halvings = 0
    while True:
        u_coarse = _velocity_to_displacement(noise, amplitude, config, rot, step)
        det_coarse = jacobian_determinant(u_coarse)
        if float(det_coarse.min()) >= config.min_warp_jacobian or amplitude == 0:
            break
        amplitude *= 0.5
        halvings += 1
    warp_vox = _upsample(u_coarse * step, shape, step)  # (3, I, J, K) fine voxel units

    # --- pull the template back through x -> c + (x + w(x) - c) / s
    tvox = _template_coordinates(warp_vox, affine, tpl, scales)
    t1, brain_p, wm, vent_p = _sample_template(tpl, tvox, shape)
    del tvox
    brain = brain_p >= 0.5
    lab, n = ndi.label(brain)
    if n > 1:  # keep the largest component (a warp never splits the brain; this removes interpolation specks)
        brain = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    ventricles = (vent_p >= 0.5) & brain
    wm = np.where(brain, wm, 0.0).astype(np.float32)
    t1 = np.where(brain, t1, 0.0).astype(np.float32)

    # --- tumour
    surf_dist = ndi.distance_transform_edt(brain, sampling=sp)
    tumour_info, tumour, s_map, box = _place_tumour(rng, config, brain, wm, ventricles, surf_dist, affine)
    image = _tumour_appearance(rng, config, t1, brain, s_map, box, tumour_info["tumour_equivalent_radius_mm"])
    ventricles &= ~tumour

    max_disp = float(np.sqrt((np.einsum("ab,b...->a...", rot, warp_vox) ** 2).sum(axis=0)).max())
    info = {
        "source": SYNTHETIC_SOURCE,
        "seed": int(seed),
        "synthesis": asdict(config),
        "scales": [float(v) for v in scales],
        "warp_amplitude_mm": float(amplitude),
        "warp_amplitude_halvings": halvings,
        "warp_max_displacement_mm": max_disp,
        "warp_min_jacobian": float(det_coarse.min()),
        "shape": list(shape),
        "n_brain_voxels": int(brain.sum()),
        "n_ventricle_voxels": int(ventricles.sum()),
        **tumour_info,
    }
    sid = subject_id if subject_id is not None else f"mni{seed}"
    subject = Subject(subject_id=sid, image=Volume(image, affine, "intensity"), brain_mask=_label(brain, affine),
                      tumour_mask=_label(tumour, affine), ventricles_mask=_label(ventricles, affine), info=info)
    s_full = np.full(shape, np.inf, dtype=np.float32)
    s_full[box] = s_map
    return subject, {"wm": wm, "warp_vox": warp_vox, "s": s_full, "t1_without_tumour": t1}


def _output_grid(tpl: _Template, scales: np.ndarray, config: SynthesisConfig):
    """The subject's grid: cropped around the scaled brain (plus margins) or the template's grid."""
    if not config.crop:
        return tpl.t1.shape, tpl.affine.copy()
    lo, hi = tpl.bbox_ras
    c = tpl.centroid_ras
    lo_s, hi_s = c + scales * (lo - c), c + scales * (hi - c)
    pad = config.warp_amplitude_mm + config.crop_margin_mm
    rot = tpl.affine[:3, :3]
    ext = np.abs(np.linalg.solve(rot, (hi_s - lo_s) + 2 * pad))  # extent along each voxel axis (voxels)
    m = max(1, int(config.crop_multiple))
    shape = tuple(int(np.ceil((np.ceil(e) + 1) / m) * m) for e in ext)
    centre = 0.5 * (lo_s + hi_s)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre - rot @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return shape, affine


def _velocity_to_displacement(noise: np.ndarray, amplitude_mm: float, config: SynthesisConfig, rot: np.ndarray,
                              step: int) -> np.ndarray:
    """Smooth ``noise`` into a velocity of max magnitude ``amplitude_mm`` and exponentiate it.

    Returns the displacement ``(3, *coarse)`` in coarse-grid voxel units (scaling and squaring).
    """
    import scipy.ndimage as ndi

    grid_mm = float(np.linalg.norm(rot, axis=0).min()) * step  # coarse spacing (mm)
    v = np.stack([ndi.gaussian_filter(noise[c], config.warp_smoothness_mm / grid_mm, mode="nearest")
                  for c in range(3)])  # world mm components (up to scale)
    vmax = float(np.sqrt((v ** 2).sum(axis=0)).max())
    v = v * (amplitude_mm / vmax) if vmax > 0 else v
    # world mm -> coarse voxel units: fine voxel vectors are rot^-1 v, a coarse voxel is `step` fine voxels
    u = np.einsum("ab,b...->a...", np.linalg.inv(rot), v) / step / 2 ** config.warp_steps
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in u.shape[1:]], indexing="ij"))
    for _ in range(config.warp_steps):  # u <- u + u o (id + u)
        pts = grid + u
        u = u + np.stack([ndi.map_coordinates(u[c], pts, order=1, mode="nearest") for c in range(3)])
    return u.astype(np.float32)


def _upsample(u_coarse: np.ndarray, shape: tuple[int, int, int], step: int) -> np.ndarray:
    """Exact trilinear upsampling of a coarse grid (node q at fine index q * step) to ``shape``, separably."""
    out = u_coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        nc = out.shape[axis + 1]
        x = np.arange(n, dtype=np.float64) / step
        i0 = np.clip(np.floor(x).astype(int), 0, nc - 1)
        i1 = np.clip(i0 + 1, 0, nc - 1)
        w = (x - i0).astype(np.float32)
        m = np.zeros((n, nc), dtype=np.float32)
        m[np.arange(n), i0] += 1 - w
        m[np.arange(n), i1] += w
        out = np.moveaxis(np.tensordot(m, np.moveaxis(out, axis + 1, 0), axes=(1, 0)), 0, axis + 1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _template_coordinates(warp_vox: np.ndarray, affine: np.ndarray, tpl: _Template, scales: np.ndarray):
    """Template voxel coordinates ``(3, I, J, K)`` of ``c + (x + w(x) - c) / s`` for every subject voxel x."""
    shape = warp_vox.shape[1:]
    # x + w(x) in world mm, then the inverse scaling about the centroid, then the template's voxel frame;
    # all affine after the warp, so fold it into one matrix applied to (p + w_vox(p))
    scale_inv = np.diag(1.0 / scales)
    m = np.linalg.inv(tpl.affine[:3, :3]) @ scale_inv @ affine[:3, :3]
    b = np.linalg.inv(tpl.affine[:3, :3]) @ (tpl.centroid_ras + scale_inv @ (affine[:3, 3] - tpl.centroid_ras)
                                              - tpl.affine[:3, 3])
    out = np.empty((3, *shape), dtype=np.float32)
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    for a in range(3):
        acc = np.full(shape, b[a], dtype=np.float32)
        for d in range(3):
            if m[a, d] != 0:
                acc += m[a, d] * (warp_vox[d] + idx[d].reshape([-1 if e == d else 1 for e in range(3)]))
        out[a] = acc
    return out


def _sample_template(tpl: _Template, tvox: np.ndarray, shape):
    """Trilinear samples of T1, brain mask, WM and ventricle mask at ``tvox``, only where the template has brain."""
    import scipy.ndimage as ndi

    near = np.rint(tvox).astype(np.int32)
    inb = np.ones(shape, dtype=bool)
    for a in range(3):
        inb &= (near[a] >= 0) & (near[a] < tpl.t1.shape[a])
    sel = np.zeros(shape, dtype=bool)
    sel[inb] = tpl.support[near[0][inb], near[1][inb], near[2][inb]]
    del near
    pts = tvox[:, sel]
    outs = []
    for arr in (tpl.t1, tpl.brain.astype(np.float32), tpl.wm, tpl.ventricles.astype(np.float32)):
        o = np.zeros(shape, dtype=np.float32)
        o[sel] = ndi.map_coordinates(arr, pts, order=1, mode="constant", cval=0.0)
        outs.append(o)
    return outs


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def _place_tumour(rng, config: SynthesisConfig, brain, wm, ventricles, surf_dist, affine):
    """Draw the tumour shape and centre; rasterise it. Returns (info, mask, s on the box, box slices)."""
    import scipy.ndimage as ndi

    from brainshift.geometry import spacing_from_affine, voxel_to_ras

    sp = spacing_from_affine(affine)
    n_terms = max(1, int(config.tumour_shape_terms))
    dirs = rng.standard_normal((n_terms, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = rng.uniform(0.5, config.tumour_shape_max_frequency, n_terms)
    phases = rng.uniform(0, 2 * np.pi, n_terms)
    weights = rng.standard_normal(n_terms)

    def perturb(u: np.ndarray) -> np.ndarray:  # u (..., 3) unit vectors -> p(u)
        return np.cos((u @ dirs.T) * freqs + phases) @ weights

    sphere = _fibonacci_sphere(4000)
    p_s = perturb(sphere)
    p_max = float(np.abs(p_s).max())
    gain = config.tumour_shape_amplitude / p_max if p_max > 0 else 0.0
    rho = 1 + gain * p_s
    volume_factor = float(np.mean(rho ** 3)) ** (1 / 3)  # blob volume = (4/3) pi R'^3 mean(rho^3)
    max_rho = float(rho.max())

    radius = float(rng.uniform(*config.tumour_radius_range_mm))
    if ventricles.any():
        vent_dist = ndi.distance_transform_edt(~ventricles, sampling=sp)
    else:
        vent_dist = np.full(brain.shape, np.inf)
    attempts = 0
    while True:
        r_mean = radius / volume_factor
        extent = r_mean * max_rho
        # every tumour voxel lies within `extent` (+ the centre's sub-voxel jitter) of the centre and the distance
        # transform is 1-Lipschitz, so this depth guarantees min_surface_distance for the whole tumour
        need = extent + config.min_surface_distance_mm + 0.5 * float(np.linalg.norm(sp))
        ok = (brain & (wm >= config.min_white_matter_probability) & (surf_dist >= need)
              & (vent_dist >= config.min_ventricle_distance_mm))
        if ok.any():
            break
        attempts += 1
        if attempts > config.max_placement_attempts:
            raise GeometryError(f"expected a white-matter position at least {config.min_surface_distance_mm} mm "
                                f"deep for a tumour, got none even for a radius of {radius:.1f} mm")
        radius *= 0.9
    cand = np.flatnonzero(ok)
    centre_vox = np.array(np.unravel_index(cand[rng.integers(len(cand))], brain.shape), dtype=np.float64)
    centre_vox += rng.uniform(-0.5, 0.5, 3)
    centre_ras = voxel_to_ras(centre_vox[None], affine)[0]

    # rasterise on a box around the centre: s = |x - c| / (R' (1 + p(u)))
    reach = extent + config.transition_mm + 2 * float(sp.max())
    half = np.ceil(reach / sp).astype(int)
    lo = np.maximum(np.floor(centre_vox).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre_vox).astype(int) + half + 2, brain.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi, strict=True)],
                                indexing="ij"), axis=-1)
    d = (grid - centre_vox) @ affine[:3, :3].T  # world mm offsets
    dist = np.linalg.norm(d, axis=-1)
    u = d / np.maximum(dist, 1e-9)[..., None]
    s = (dist / (r_mean * (1 + gain * perturb(u)))).astype(np.float32)
    tumour = np.zeros(brain.shape, dtype=bool)
    tumour[box] = s <= 1.0
    n_vox = int(tumour.sum())
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    r_eq = float((3 * n_vox * voxel_ml * 1000.0 / (4 * np.pi)) ** (1 / 3))
    info = {
        "tumour_centre_ras": [float(v) for v in centre_ras],
        "tumour_radius_mm": radius,
        "tumour_equivalent_radius_mm": r_eq,
        "tumour_max_extent_mm": float(extent),
        "tumour_volume_ml": n_vox * voxel_ml,
        "tumour_min_surface_distance_mm": float(surf_dist[tumour].min()),
        "tumour_placement_radius_reductions": attempts,
        "tumour_centre_white_matter_probability": float(
            ndi.map_coordinates(wm, centre_vox[:, None], order=1)[0]),
    }
    return info, tumour, s, box


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _tumour_appearance(rng, config: SynthesisConfig, t1, brain, s, box, r_eq) -> np.ndarray:
    """T1 with a hypointense core, a bright rim, a darker oedema halo and smooth transitions (docstring, step 4)."""
    import scipy.ndimage as ndi

    vals = t1[brain]
    lo_val, hi_val = float(t1.min()), float(t1.max())
    core, rim, oedema = (float(np.quantile(vals, q)) for q in (config.core_intensity_quantile,
                                                                config.rim_intensity_quantile,
                                                                config.oedema_intensity_quantile))
    ramp = (s - config.core_fraction) / (config.rim_fraction - config.core_fraction)
    outside_mm = (s - 1.0) * r_eq  # approximate distance outside the tumour boundary (mm), < 0 inside
    target = np.where(outside_mm <= 0, core + (rim - core) * _smoothstep(ramp),
                      oedema + (rim - oedema) * (1 - _smoothstep(outside_mm / max(config.transition_mm, 1e-6))))
    alpha = 1 - _smoothstep(outside_mm / max(config.transition_mm + config.oedema_mm, 1e-6))
    texture = ndi.gaussian_filter(rng.standard_normal(s.shape), 1.5)
    texture *= config.texture_amplitude * (hi_val - lo_val) / max(float(np.abs(texture).max()), 1e-12)
    texture *= 1 - _smoothstep(s / config.rim_fraction)  # in the core only
    out = t1.copy()
    sub = out[box]
    blended = np.clip((1 - alpha) * sub + alpha * (target + texture), lo_val, hi_val)
    out[box] = np.where(brain[box], blended, sub)
    return out.astype(np.float32)
