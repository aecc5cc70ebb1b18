"""Training data: subject-level splits, per-case preprocessing (cached), keypoint/interpolation variants,
crops and intensity augmentation.

A training sample is built in three stages:

1. **Case** (deterministic, cached with MONAI ``CacheDataset`` in memory or ``PersistentDataset`` on disk,
   :func:`prepare_case`): read the case and its subject (:mod:`brainshift.simulate.dataset`), the region
   allowed for keypoints (brain minus tumour minus cavity), keypoint candidates (``subjects/<id>/keypoints.csv``
   if present, columns ``x, y, z`` in 0-based voxels of the subject grid), and the image, ground-truth field
   and masks on the network grid through :func:`brainshift.model.grid.to_network_grid` /
   :func:`~brainshift.model.grid.field_to_network_grid`: the SAME preprocessing as inference.
2. **Variant** (:func:`draw_variant`, random but reproducible from ``(seed, case, index)``): k keypoints
   (uniform in ``[min_kpts, max_kpts]``) drawn by :func:`brainshift.keypoints.sampling.sample_keypoints`
   among the candidates (or, without ``keypoints.csv``, among ``max_kpts + heldout_kpts`` random voxels of the
   allowed region), displacements sampled from the ground truth, an initial field by the interpolator
   (``linear``, ``tps``, or a random choice per sample: the published "mixed") on the subject grid, then taken
   to the network grid. The candidates not chosen are the held-out targets for TRE. With
   ``variants_per_case > 0`` a pool of that many variants per case is computed once per case together with
   its network-grid arrays (:class:`PrepareVariantPool`) and cached as one small item (no subject-grid
   arrays), so CPU training is neither dominated by interpolation nor by reading whole 1 mm cases; with 0
   every sample draws a fresh variant from the cached whole case (:class:`PrepareCase`).
3. **Sample** (:func:`assemble_sample`): crop/pad to the training ``size`` centred on the brain, and MONAI
   intensity augmentation of the image channel only (:func:`intensity_augmentation`).

**Several dataset folders.** Every ``data_dir`` below may also be a list of folders (the training config's
``data``, :func:`brainshift.train.config.data_folders`). Cases are then named by a *case key*
``"<folder index>-<case id>"`` (0-based position in the list, e.g. ``"1-s0000_c00"``; :func:`case_key`), read
back with :func:`case_source`, so equal case ids in two folders stay distinct and each is read from its own
folder. With one folder (a string, a path or a one-element list) the key is the case id itself, so splits,
variant draws (seeded by the key) and cache keys are those of a single folder. Subjects are matched by id
across folders (:func:`split_cases`).

Convention: fields on the subject grid are forward Lagrangian in voxel units; on the network grid in the
network's ``field_units`` (see :mod:`brainshift.model.grid`).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

from brainshift.errors import BrainshiftError, InputFileError
from brainshift.train.config import KEYPOINT_RULES, data_folders

#: One dataset folder, or a list of them (see the module docstring).
DataFolders = str | Path | Sequence[str | Path]


# ------------------------------------------------------------------------------------------------ case keys
def case_key(data_dir: DataFolders, index: int, case_id: str) -> str:
    """The key of case ``case_id`` of folder ``index`` of ``data_dir``: the case id itself with one folder,
    else ``"<index>-<case id>"`` (file-name safe when the case id is)."""
    return case_id if len(data_folders(data_dir)) == 1 else f"{int(index)}-{case_id}"


def case_source(data_dir: DataFolders, key: str) -> tuple[str, str]:
    """The dataset folder and the case id a case key names (inverse of :func:`case_key`).

    Raises:
        BrainshiftError: with several folders, a key not of the form ``"<folder index>-<case id>"`` with an
            index of a listed folder.
    """
    folders = data_folders(data_dir)
    if len(folders) == 1:
        return folders[0], key
    index, sep, case_id = str(key).partition("-")
    if not (sep and case_id and index.isdigit() and int(index) < len(folders)):
        raise BrainshiftError(f"expected a case key '<folder index>-<case id>' with a folder index in 0.."
                              f"{len(folders) - 1}, got {key!r}")
    return folders[int(index)], case_id


def describe_data(data_dir: DataFolders) -> str | list[str]:
    """``data_dir`` as recorded in metadata and messages: the folder (a string) or the list of folders."""
    folders = data_folders(data_dir)
    return folders[0] if len(folders) == 1 else list(folders)


def _keyed_cases(data_dir: DataFolders, require: bool) -> dict[str, str]:
    """Case key -> subject id of every complete case of every folder (in folder, then case id order).

    Raises (with ``require``):
        InputFileError: a folder that does not exist or has no complete case (naming it).
    """
    from brainshift.simulate.dataset import case_subject_id, list_cases

    folders = data_folders(data_dir)
    out: dict[str, str] = {}
    for i, folder in enumerate(folders):
        if require and not Path(folder).is_dir():
            raise InputFileError(f"expected a dataset folder at {folder}, it does not exist")
        cases = list_cases(folder)
        if require and not cases:
            raise InputFileError(f"expected complete cases under {Path(folder) / 'cases'}, found none")
        out.update({case_key(folders, i, c): case_subject_id(folder, c) for c in cases})
    return out


# --------------------------------------------------------------------------------------------------- splits
@dataclass
class Splits:
    """Case keys per split; no subject appears in two splits.

    Attributes:
        train, val, test: case keys (sorted; the case ids with one dataset folder, see :func:`case_key`).
        subjects: ``{"train": [...], "val": [...], "test": [...]}`` subject ids.
        case_subject: case key -> subject id for every listed case.
        folders: the dataset folders, in the order the keys' indices refer to.
    """

    train: list[str]
    val: list[str]
    test: list[str]
    subjects: dict[str, list[str]]
    case_subject: dict[str, str]
    folders: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (written to ``save_dir/splits.json``); with several dataset folders also
        ``folders``, the list the keys' folder indices refer to."""
        out: dict[str, Any] = {"train": self.train, "val": self.val, "test": self.test, "subjects": self.subjects}
        if len(self.folders) > 1:
            out["folders"] = self.folders
        return out


def _n_for(frac: float, n: int) -> int:
    return 0 if frac <= 0 else max(1, int(round(frac * n)))


def split_cases(data_dir: DataFolders, split: tuple[float, float] = (0.10, 0.15), seed: int = 0,
                val_subjects: tuple[str, ...] | list[str] = ()) -> Splits:
    """Split the complete cases of a dataset (or of several) by SUBJECT into train / validation / test.

    With several folders the subjects are the union of their subject ids: an id present in two folders is one
    subject (the same synthetic brain when the folders were simulated with the same ``--seed``; otherwise the
    grouping is merely conservative), whose cases from every folder go to the same split.
    The subjects are shuffled with ``numpy.random.default_rng(seed)``; ``round(fraction * n_subjects)``
    subjects (at least one when the fraction is positive) go to validation, then to test, as long as at least
    one subject remains for training (validation is served before test). Given ``val_subjects``, exactly
    those subjects are the validation split (its fraction is ignored) and the test fraction is taken from the
    others, in the same shuffled order.

    Args:
        data_dir: dataset folder (layout of :mod:`brainshift.simulate.dataset`) or a list of them.
        split: ``(validation, test)`` fractions of the subjects.
        seed: shuffle seed.
        val_subjects: explicit validation subject ids (empty: use the fraction).

    Returns:
        :class:`Splits` (of case keys, :func:`case_key`).

    Raises:
        InputFileError: a folder that does not exist or has no complete case, a ``val_subjects`` id with no
            complete case in any folder, or ``val_subjects`` naming every subject (none left to train on).
        BrainshiftError: a malformed list of folders (:func:`brainshift.train.config.data_folders`).
    """
    case_subject = _keyed_cases(data_dir, require=True)
    cases = sorted(case_subject)
    where = describe_data(data_dir)
    subjects = sorted(set(case_subject.values()))
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    if val_subjects:
        missing = sorted(set(val_subjects) - set(subjects))
        if missing:
            raise InputFileError(f"expected val_subjects among the subjects with complete cases in {where}, "
                                 f"got {', '.join(missing)} (found {len(subjects)} subjects: "
                                 f"{', '.join(subjects[:5])}{' ...' if len(subjects) > 5 else ''})")
        if len(set(val_subjects)) >= len(subjects):
            raise InputFileError(f"expected val_subjects to leave at least one subject for training, got all "
                                 f"{len(subjects)} subjects of {where}")
        order = sorted(set(val_subjects)) + [s for s in order if s not in set(val_subjects)]
        split = (len(set(val_subjects)) / len(subjects), split[1])
    n = len(order)
    n_val = min(_n_for(split[0], n), n - 1)
    n_test = min(_n_for(split[1], n), n - 1 - n_val)
    groups = {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
              "train": sorted(order[n_val + n_test:])}
    by = {k: sorted(c for c in cases if case_subject[c] in set(v)) for k, v in groups.items()}
    return Splits(train=by["train"], val=by["val"], test=by["test"], subjects=groups, case_subject=case_subject,
                  folders=list(data_folders(data_dir)))


def cases_of(data_dir: DataFolders) -> tuple[list[str], dict[str, str]]:
    """All complete cases of a dataset (or of several: case keys, :func:`case_key`) and their subjects, for a
    separate test dataset; empty lists when there are none."""
    case_subject = _keyed_cases(data_dir, require=False)
    return sorted(case_subject), case_subject


# ----------------------------------------------------------------------------------------------- keypoints
def read_keypoint_candidates(subject_dir: str | Path) -> np.ndarray | None:
    """Detected keypoints of a subject folder, ``(M, 3)`` float64 voxel indices, or None if it has no file:
    :func:`brainshift.io.keypoints.read_keypoint_positions` of ``subject_dir/keypoints.csv`` (kept for callers
    holding a subject folder; datasets use :func:`brainshift.simulate.dataset.read_subject_keypoints`).

    Raises:
        InputFileError: a malformed table.
    """
    from brainshift.io.keypoints import read_keypoint_positions
    from brainshift.simulate.dataset import SUBJECT_KEYPOINTS_FILE

    p = Path(subject_dir) / SUBJECT_KEYPOINTS_FILE
    return read_keypoint_positions(p) if p.is_file() else None


# ----------------------------------------------------------------------------------------------- case stage
def as_numpy(x: Any) -> Any:
    """Tensors (from a MONAI persistent cache) back to numpy; everything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def craniotomy_entry_vox(meta, affine: np.ndarray) -> np.ndarray:
    """The craniotomy centre of a case, ``(3,)`` 0-based voxel indices of the grid ``affine`` (voxel -> RAS mm):
    ``params.entry_point_ras`` of its ``meta.json`` mapped through the inverse affine; nan when not recorded."""
    entry = (meta.get("params") or {}).get("entry_point_ras") if isinstance(meta, dict) else None
    if entry is None:
        return np.full(3, np.nan)
    return (np.linalg.inv(np.asarray(affine, np.float64)) @ np.r_[np.asarray(entry, float), 1.0])[:3]


def prepare_case(data_dir: DataFolders, case_id: str, net_config) -> dict[str, Any]:
    """Deterministic per-case arrays on the subject grid and on the network grid.

    Args:
        data_dir: dataset folder, or a list of them.
        case_id: the key of a complete case (:func:`case_key`: the case id with one folder).
        net_config: the :class:`brainshift.model.NetworkConfig` (spacing, units, padding multiple).

    Returns:
        dict with ``case_id`` (the key as given), ``subject_id``; subject grid: ``image`` (I, J, K) float32,
        ``affine`` (4, 4), ``gt`` (3, I, J, K) float32 voxel units, ``brain``, ``allowed`` (brain minus tumour
        minus cavity), ``eval_mask`` (brain minus cavity), ``tumour`` (uint8), ``surface_depth_mm`` (distance to
        the brain surface, float32), ``entry_vox`` (3,) craniotomy centre (nan if not recorded), ``candidates``
        (M, 3) (empty when the subject has no keypoints file; ``has_candidates`` says which); network grid
        (padded): ``net_image``
        (1, I', J', K') z-scored, ``net_gt`` (3, I', J', K') network units, zero outside the brain,
        ``net_mask`` (1, I', J', K') uint8, ``net_spacing`` (3,) mm, ``brain_centre`` (3,) padded-grid voxel.

    Raises:
        InputFileError: an incomplete case or subject; BrainshiftError: a malformed case key.

    Convention: ``gt`` forward Lagrangian voxel units; ``net_gt`` in ``net_config.field_units``.
    """
    from scipy.ndimage import distance_transform_edt

    from brainshift.evaluate.metrics import evaluation_region, keypoint_region
    from brainshift.model.grid import field_to_network_grid, to_network_grid
    from brainshift.simulate.dataset import read_case, read_subject_keypoints

    folder, raw_id = case_source(data_dir, case_id)
    case = read_case(folder, raw_id)
    sub = case.subject
    image = sub.image
    brain = sub.brain_mask.data > 0
    entry_vox = craniotomy_entry_vox(case.meta, image.affine)
    tumour = sub.tumour_mask.data > 0
    cavity = case.cavity_mask.data > 0
    allowed = keypoint_region(brain, tumour, cavity)
    cands = read_subject_keypoints(folder, sub.subject_id)
    zero = np.zeros((3, *image.shape), np.float32)
    net = to_network_grid(image, zero, brain, grid_config(net_config))
    gt_net = field_to_network_grid(case.field, net, zero_outside=True)[0]
    mask = net.mask.numpy()
    idx = np.argwhere(mask)
    centre = (idx.min(0) + idx.max(0)) / 2.0 if len(idx) else (np.asarray(mask.shape) - 1) / 2.0
    from brainshift.geometry import spacing_from_affine

    return {
        "case_id": case_id,
        "subject_id": sub.subject_id,
        "image": image.data.astype(np.float32),
        "affine": image.affine.astype(np.float64),
        "gt": case.field.astype(np.float32),
        "brain": brain.astype(np.uint8),
        "allowed": allowed.astype(np.uint8),
        "eval_mask": evaluation_region(brain, cavity).astype(np.uint8),
        "tumour": tumour.astype(np.uint8),
        "surface_depth_mm": distance_transform_edt(brain, sampling=spacing_from_affine(image.affine)
                                                   ).astype(np.float32),
        "entry_vox": np.asarray(entry_vox, np.float64),
        "candidates": np.zeros((0, 3)) if cands is None else cands,
        "has_candidates": cands is not None,
        "net_image": net.image[0].numpy().astype(np.float32),
        "net_gt": gt_net.numpy().astype(np.float32),
        "net_mask": mask[None].astype(np.uint8),
        "net_spacing": spacing_from_affine(net.net_affine).astype(np.float64),
        "net_affine": np.asarray(net.net_affine, np.float64),
        "net_shape": np.asarray(net.net_shape, np.int64),
        "pad": np.asarray(net.pad, np.int64),
        "same_grid": bool(net.same_grid),
        "brain_centre": np.asarray(centre, np.float64),
    }


def grid_config(net_config):
    """``net_config`` without its keypoint channel: what the grid, image and field arrays of a prepared case depend
    on (the keypoint channel is made per variant, from its keypoints)."""
    return net_config.without_keypoint_channel() if getattr(net_config, "uses_keypoints", False) else net_config


def network_input_of(case: dict[str, Any], net_config, init_net: np.ndarray | None = None):
    """Rebuild the :class:`brainshift.model.grid.NetworkInput` of a prepared case (no resampling).

    ``init_net`` (3, I', J', K') fills the field channels (zeros when None). Equal to what
    :func:`~brainshift.model.grid.to_network_grid` returns for that initial field, except ``image_mean`` /
    ``image_std`` (not kept; set to nan).
    """
    from brainshift.model.grid import NetworkInput

    c = {k: as_numpy(case[k]) for k in ("net_image", "net_mask", "pad", "net_shape", "net_affine", "image", "affine",
                                    "same_grid")}
    img = torch.as_tensor(np.asarray(c["net_image"], np.float32))
    field = torch.zeros((3, *img.shape[1:])) if init_net is None else torch.as_tensor(np.asarray(as_numpy(init_net),
                                                                                                  np.float32))
    pad = tuple((int(b), int(a)) for b, a in np.asarray(c["pad"]))
    net_config = grid_config(net_config)
    return NetworkInput(tensor=torch.cat([field, img])[None].contiguous(),
                        mask=torch.as_tensor(np.asarray(c["net_mask"])[0] > 0), pad=pad,  # type: ignore[arg-type]
                        net_shape=tuple(int(s) for s in c["net_shape"]),
                        net_affine=np.asarray(c["net_affine"], np.float64),
                        input_shape=tuple(int(s) for s in np.asarray(c["image"]).shape),
                        input_affine=np.asarray(c["affine"], np.float64), config=net_config,
                        image_mean=float("nan"), image_std=float("nan"), same_grid=bool(c["same_grid"]))


class PrepareCase(Transform):
    """MONAI transform ``{"case_id": key} -> prepare_case(data_dir, key, ...)`` (picklable, deterministic).

    A :class:`monai.transforms.Transform` subclass on purpose: MONAI's ``CacheDataset`` / ``PersistentDataset``
    cache the result of the leading transforms that are deterministic ``Transform`` instances only; a plain
    callable would be re-run on every access.
    """

    def __init__(self, data_dir: DataFolders, net_config) -> None:
        self.data_dir = _picklable(data_dir)
        self.net_config = net_config

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return prepare_case(self.data_dir, item["case_id"], self.net_config)


#: What a training sample needs from a prepared case (network grid only): the variant pool keeps just these.
SAMPLE_KEYS = ("case_id", "subject_id", "net_image", "net_gt", "net_mask", "net_spacing", "brain_centre")


class PrepareVariantPool(Transform):
    """MONAI transform ``{"case_id": key}`` -> the case's network-grid arrays (:data:`SAMPLE_KEYS`) and a pool
    of ``n_variants`` initial fields ``init_nets`` (V, 3, I', J', K') float32 with their ``methods`` (and, for
    networks with a keypoint channel, ``proximities`` (V, I', J', K') float16).

    The case is prepared once (:func:`prepare_case`), then variant ``v`` is :func:`draw_variant` with
    :func:`variant_rng` ``(seed, key, v)``. The result is small (no subject-grid arrays), so a
    ``PersistentDataset`` keeps it on disk and a training sample reads one file.
    """

    def __init__(self, data_dir: DataFolders, net_config, *, n_variants: int, seed: int, interp: str | None,
                 k_range: tuple[int, int], heldout_kpts: int, variant_options: dict | None = None) -> None:
        self.variant_options = dict(variant_options or {})
        self.data_dir = _picklable(data_dir)
        self.net_config = net_config
        self.n_variants = int(n_variants)
        self.seed = int(seed)
        self.interp = interp
        self.k_range = k_range
        self.heldout_kpts = heldout_kpts

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        case = prepare_case(self.data_dir, item["case_id"], self.net_config)
        variants = [draw_variant(case, variant_rng(self.seed, item["case_id"], v), self.net_config,
                                 interp=self.interp, k_range=self.k_range, heldout_kpts=self.heldout_kpts,
                                 **self.variant_options)
                    for v in range(self.n_variants)]
        out = {k: case[k] for k in SAMPLE_KEYS}
        out["init_nets"] = np.stack([v["init_net"] for v in variants]).astype(np.float32)
        if variants and "proximity_net" in variants[0]:  # half precision: a smooth map in (0, 1]
            out["proximities"] = np.stack([v["proximity_net"] for v in variants]).astype(np.float16)
        out["methods"] = [v["method"] for v in variants]
        return out


def _picklable(data_dir: DataFolders) -> str | tuple[str, ...]:
    """One folder as a string (as before lists were accepted), several as a tuple of strings."""
    folders = data_folders(data_dir)
    return folders[0] if len(folders) == 1 else folders


# -------------------------------------------------------------------------------------------- variant stage
def variant_rng(seed: int, case_id: str, index: int) -> np.random.Generator:
    """The generator of variant ``index`` of ``case_id``: ``default_rng([seed, crc32(case_id), index])``.

    ``case_id`` is the case key (:func:`case_key`), so with several folders equal case ids of two folders draw
    different variants, and with one folder the draws are those of the case id."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode()), int(index)])


def keypoint_candidates(case: dict[str, Any], rule: str, rng: np.random.Generator, n_random: int) -> np.ndarray:
    """Candidate keypoints ``(M, 3)`` (subject voxels) of one keypoint rule (issue 11: randomised keypoints).

    - ``detected``: the subject's detected (DoG) keypoints, or ``n_random`` random allowed voxels without them;
    - ``random``: ``n_random`` random voxels of the allowed region (brain minus tumour minus cavity);
    - ``cortex``: random allowed voxels within ``CORTEX_DEPTH_MM`` of the brain surface (what a surface scan or
      intraoperative ultrasound near the surface sees);
    - ``craniotomy``: random allowed voxels within ``CRANIOTOMY_RADIUS_MM`` of the case's craniotomy centre
      (``entry_vox`` from ``meta.json``), clustered where the surgeon measures; the whole region if the case
      has no recorded entry point.
    A rule whose region has fewer than ``n_random / 2`` voxels falls back to the whole allowed region.
    """
    allowed = np.asarray(case["allowed"]) > 0
    if rule == "detected" and bool(case["has_candidates"]):
        return np.asarray(case["candidates"], np.float64)
    region = allowed
    if rule == "cortex":
        region = allowed & (np.asarray(case["surface_depth_mm"]) <= CORTEX_DEPTH_MM)
    elif rule == "craniotomy" and np.all(np.isfinite(np.asarray(case.get("entry_vox", [np.nan] * 3), float))):
        aff = np.asarray(case["affine"], np.float64)
        idx = np.argwhere(allowed)
        d = np.linalg.norm((idx - np.asarray(case["entry_vox"], float)) @ aff[:3, :3].T, axis=1)
        near = idx[d <= CRANIOTOMY_RADIUS_MM]
        vox = near if len(near) >= n_random // 2 else idx
        n = min(len(vox), n_random)
        return vox[rng.choice(len(vox), size=n, replace=False)].astype(np.float64) if n else np.zeros((0, 3))
    vox = np.argwhere(region)
    if len(vox) < n_random // 2:
        vox = np.argwhere(allowed)
    n = min(len(vox), n_random)
    return vox[rng.choice(len(vox), size=n, replace=False)].astype(np.float64) if n else np.zeros((0, 3))


#: Depth (mm) below the brain surface of the ``cortex`` keypoint rule.
CORTEX_DEPTH_MM = 10.0
#: Radius (mm) around the craniotomy centre of the ``craniotomy`` keypoint rule.
CRANIOTOMY_RADIUS_MM = 40.0


def draw_variant(case: dict[str, Any], rng: np.random.Generator, net_config, *, interp: str | None = None,
                 k_range: tuple[int, int] = (20, 20), heldout_kpts: int = 50,
                 keep_native: bool = False, rules: tuple[str, ...] = ("detected",),
                 noise_mm: tuple[float, float] = (0.0, 0.0),
                 methods: tuple[str, ...] = ("linear", "tps")) -> dict[str, Any]:
    """One (keypoint draw, interpolation) variant of a prepared case.

    Args:
        case: output of :func:`prepare_case`.
        rng: the generator for every draw (keypoints, interpolator choice).
        net_config: the network configuration.
        interp: an interpolator name, or ``None`` / ``"mixed"`` for a random choice among ``methods``.
        k_range: ``(min, max)`` keypoints, k drawn uniformly in it.
        heldout_kpts: random held-out points when the candidates are random voxels.
        keep_native: also return the initial field on the subject grid (validation).
        rules: keypoint rules (:func:`keypoint_candidates`), one drawn uniformly per variant.
        noise_mm: range of the standard deviation (mm) of Gaussian noise added to each world component of the
            driving displacements (drawn uniformly per variant; the held-out targets stay exact).
        methods: the interpolators of the ``mixed`` choice (``linear``, ``tps``, ``tps3d``).

    With the defaults the draws are exactly those of earlier versions (no extra random numbers are used).

    Returns:
        dict with ``method``, ``points``/``disps`` (k, 3) and ``heldout_points``/``heldout_disps`` (voxel units
        of the subject grid), ``init_net`` (3, I', J', K') network units on the padded network grid,
        ``proximity_net`` (I', J', K') the keypoint channel for networks that take one
        (:func:`brainshift.model.grid.keypoint_proximity` of the driving keypoints), and ``init`` (3, I, J, K)
        voxel units when ``keep_native``.

    Raises:
        KeypointError: too few allowed candidates.

    Convention: forward Lagrangian fields.
    """
    from brainshift.interpolate import interpolate
    from brainshift.keypoints.sampling import sample_keypoints
    from brainshift.model.grid import field_to_network_grid

    case = {k: as_numpy(v) for k, v in case.items()}
    allowed = case["allowed"] > 0
    kmin, kmax = k_range
    rules = tuple(rules)
    bad = set(rules) - set(KEYPOINT_RULES)
    if not rules or bad:
        raise BrainshiftError(f"expected keypoint rules among {list(KEYPOINT_RULES)}, got {list(rules)}")
    rule = rules[int(rng.integers(len(rules)))] if len(rules) > 1 else rules[0]
    cands = keypoint_candidates(case, rule, rng, kmax + int(heldout_kpts))
    pts, disps, h_pts, h_disps = sample_keypoints(case["gt"], cands, allowed, k_min=kmin, k_max=kmax, rng=rng)
    sigma = float(rng.uniform(*noise_mm)) if noise_mm[1] > 0 else 0.0
    if sigma > 0:
        a_inv = np.linalg.inv(np.asarray(case["affine"], np.float64)[:3, :3])
        disps = np.asarray(disps, np.float64) + rng.normal(0.0, sigma, size=np.shape(disps)) @ a_inv.T
    methods = tuple(methods)
    method = interp if interp not in (None, "mixed") else methods[int(rng.integers(len(methods)))]
    shape = tuple(int(s) for s in case["image"].shape)
    init = interpolate(method, pts, disps, shape, case["affine"])
    net_in = network_input_of(case, net_config)
    init_net = field_to_network_grid(init, net_in, zero_outside=True)[0].numpy()
    out = {"method": method, "points": pts, "disps": disps, "heldout_points": h_pts, "heldout_disps": h_disps,
           "init_net": init_net.astype(np.float32), "rule": rule, "noise_mm": sigma}
    if getattr(net_config, "uses_keypoints", False):  # the keypoint channel (no random draw: draws unchanged)
        from brainshift.geometry import voxel_to_ras
        from brainshift.model.grid import keypoint_proximity

        out["proximity_net"] = keypoint_proximity(voxel_to_ras(pts, case["affine"]), init_net.shape[1:],
                                                  net_in.padded_affine, net_config.keypoint_scale_mm).numpy()
    if keep_native:
        out["init"] = init
    return out


# --------------------------------------------------------------------------------------------- sample stage
def crop_window(centre: np.ndarray, shape: tuple[int, ...], size: tuple[int, int, int]) -> np.ndarray:
    """Start index per axis of a ``size`` window centred on ``centre`` (voxel), kept inside ``shape`` when it
    fits, otherwise covering the whole axis (padding on both sides). Returns ``(3,)`` ints (may be < 0)."""
    start = np.empty(3, dtype=np.int64)
    for a in range(3):
        n, s = int(shape[a]), int(size[a])
        st = int(np.floor(float(centre[a]) - (s - 1) / 2.0 + 0.5))
        st = min(max(st, 0), n - s) if n >= s else min(max(st, n - s), 0)
        start[a] = st
    return start


def crop_or_pad(arr: np.ndarray, start: np.ndarray, size: tuple[int, int, int], value: float = 0.0) -> np.ndarray:
    """The ``size`` window starting at ``start`` of the last three axes of ``arr``; outside filled with
    ``value``."""
    out = np.full(arr.shape[:-3] + tuple(int(s) for s in size), value, dtype=arr.dtype)
    src, dst = [], []
    for a in range(3):
        n = arr.shape[-3 + a]
        lo, hi = max(int(start[a]), 0), min(int(start[a]) + int(size[a]), n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(start[a]), hi - int(start[a])))
    out[(..., *dst)] = arr[(..., *src)]
    return out


def intensity_augmentation():
    """MONAI intensity augmentation for the z-scored image channel ``(1, I, J, K)`` (never the field).

    ``RandGaussianNoise`` (p 0.2, std 0.05), ``RandGaussianSmooth`` (p 0.2, sigma 0.5-1 voxel),
    ``RandScaleIntensity`` (p 0.3, factor +-0.1), ``RandShiftIntensity`` (p 0.3, offset +-0.1),
    ``RandSimulateLowResolution`` (p 0.2, zoom 0.5-1), ``RandAdjustContrast`` (p 0.3, gamma 0.7-1.5).
    Seed it with ``set_random_state``.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSimulateLowResolution,
    )

    return Compose([
        RandGaussianNoise(prob=0.2, std=0.05),
        RandGaussianSmooth(prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensity(prob=0.3, factors=0.1),
        RandShiftIntensity(prob=0.3, offsets=0.1),
        RandSimulateLowResolution(prob=0.2, zoom_range=(0.5, 1.0)),
        RandAdjustContrast(prob=0.3, gamma=(0.7, 1.5)),
    ])


def assemble_sample(case: dict[str, Any], variant: dict[str, Any], size: tuple[int, int, int] | None,
                    augment=None, rng: np.random.Generator | None = None,
                    flip_axes: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Network input and targets of one sample, cropped/padded to ``size`` centred on the brain.

    Args:
        case: from :func:`prepare_case`; variant: from :func:`draw_variant`.
        size: crop ``(I, J, K)`` in network-grid voxels (multiples of the network's size multiple), or None
            for the whole padded grid.
        augment: optional MONAI transform applied to the image channel (see :func:`intensity_augmentation`).
        rng: seeds ``augment`` (``set_random_state``) and the mirroring for reproducibility.
        flip_axes: network-grid axes each mirrored with probability 1/2 (needs ``rng``): image, initial field,
            ground truth and mask together (:func:`brainshift.model.grid.mirror_network_tensor`).

    Returns:
        dict of float32 tensors: ``input`` (4, ...) = init field then (augmented) image (then the keypoint channel
        when the variant has ``proximity_net``: 5, ...), ``target`` (3, ...),
        ``mask`` (1, ...), ``image`` (1, ...) un-augmented (for the image loss), and ``spacing`` (3,) mm.

    Convention: fields forward Lagrangian in the network's units on the network grid.
    """
    img = np.asarray(as_numpy(case["net_image"]), np.float32)
    gt = np.asarray(as_numpy(case["net_gt"]), np.float32)
    mask = np.asarray(as_numpy(case["net_mask"]), np.float32)
    init = np.asarray(as_numpy(variant["init_net"]), np.float32)
    extra = [] if variant.get("proximity_net") is None else \
        [np.asarray(as_numpy(variant["proximity_net"]), np.float32).reshape(1, *init.shape[1:])]
    if size is not None:
        start = crop_window(np.asarray(as_numpy(case["brain_centre"])), img.shape[-3:], size)
        background = float(img.min())
        img = crop_or_pad(img, start, size, background)
        gt, mask, init = (crop_or_pad(a, start, size) for a in (gt, mask, init))
        extra = [crop_or_pad(a, start, size) for a in extra]
    if flip_axes and rng is not None:
        from brainshift.model.grid import mirror_network_tensor

        axes = tuple(int(a) for a in flip_axes if rng.random() < 0.5)
        img, gt, mask, init, *extra = (mirror_network_tensor(torch.from_numpy(np.ascontiguousarray(a))[None], axes,
                                                             field=is_field)[0].numpy()
                                       for a, is_field in ((img, False), (gt, True), (mask, False), (init, True),
                                                           *((e, False) for e in extra)))
    aug_img = img
    if augment is not None:
        if rng is not None:
            augment.set_random_state(seed=int(rng.integers(2**31 - 1)))
        aug_img = np.asarray(as_numpy(augment(img.copy())), np.float32)
    return {
        "input": torch.from_numpy(np.concatenate([init, aug_img, *extra]).astype(np.float32)),
        "target": torch.from_numpy(gt),
        "mask": torch.from_numpy(mask),
        "image": torch.from_numpy(img.copy()),
        "spacing": torch.as_tensor(np.asarray(as_numpy(case["net_spacing"]), np.float32)),
    }


# ------------------------------------------------------------------------------------------------- datasets
def config_key(data_dir: DataFolders, net_config, extra: dict[str, Any] | None = None) -> str:
    """Hash naming everything a cached item depends on (so a persistent cache is never reused wrongly): the
    resolved dataset folder (one folder: as before lists were accepted, so earlier caches stay valid; several:
    the list, in order, since the case keys' indices refer to it), the network config, ``extra`` and the
    network-grid preprocessing version (:data:`brainshift.model.grid.PREPROCESSING_VERSION`)."""
    from brainshift.model.grid import PREPROCESSING_VERSION

    folders = [str(Path(f).resolve()) for f in data_folders(data_dir)]
    payload = {"data": folders[0] if len(folders) == 1 else folders, "net": net_config.to_dict(), **(extra or {}),
               "grid": PREPROCESSING_VERSION}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_store(items: list[dict[str, Any]], transform, cache_dir: str | Path | None, num_workers: int,
               progress: bool):
    """MONAI ``PersistentDataset`` in ``cache_dir`` (lazy, on disk) or an in-memory ``CacheDataset``."""
    from monai.data import CacheDataset, PersistentDataset

    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform, cache_dir=str(cache_dir))
    return CacheDataset(items, transform, num_workers=max(int(num_workers), 1), progress=progress,
                        copy_cache=False)


class TrainDataset(torch.utils.data.Dataset):
    """Training samples, indexed by subject: item ``idx`` picks subject ``idx % n_subjects``, one of its cases
    and one variant (from the pool when ``variants_per_case > 0``, else a fresh draw), then crops and augments.

    Every draw of item ``idx`` in epoch ``e`` uses ``default_rng([seed, e, idx])``, so samples do not depend on
    the number of workers or processes; call :meth:`set_epoch` each epoch.

    Args:
        data_dir: dataset folder, or a list of them.
        case_ids: the training cases' keys (:func:`case_key`; :attr:`Splits.train`).
        case_subject: case key -> subject id (a subject's cases from every folder are drawn from together).
        net_config: network configuration.
        size: crop size (network-grid voxels) or None.
        interp, k_range, heldout_kpts: as in :func:`draw_variant`.
        variant_options: further :func:`draw_variant` options (``rules``, ``noise_mm``, ``methods``;
            :attr:`brainshift.train.config.TrainConfig.variant_options`).
        variants_per_case: pool size per case (0: fresh draws).
        augment: apply :func:`intensity_augmentation`.
        flip_axes: random mirroring axes (:func:`assemble_sample`).
        samples_per_epoch: dataset length (None: number of subjects).
        seed: base seed.
        cache_dir, num_workers, progress: caching (see :func:`make_store`).
    """

    def __init__(self, data_dir: DataFolders, case_ids: list[str], case_subject: dict[str, str], net_config, *,
                 size: tuple[int, int, int] | None, interp: str | None, k_range: tuple[int, int],
                 heldout_kpts: int = 50, variants_per_case: int = 0, augment: bool = False,
                 flip_axes: tuple[int, ...] = (), samples_per_epoch: int | None = None, seed: int = 0,
                 cache_dir: str | Path | None = None,
                 num_workers: int = 0, progress: bool = False, variant_options: dict | None = None) -> None:
        self.variant_options = dict(variant_options or {})
        if not case_ids:
            raise BrainshiftError("expected at least one training case, got none")
        self.net_config = net_config
        self.size = size
        self.interp = interp
        self.k_range = k_range
        self.heldout_kpts = heldout_kpts
        self.seed = int(seed)
        self.epoch = 0
        self.augment = intensity_augmentation() if augment else None
        self.flip_axes = tuple(int(a) for a in flip_axes)
        self.case_index = {c: i for i, c in enumerate(case_ids)}
        by_subject: dict[str, list[str]] = {}
        for c in case_ids:
            by_subject.setdefault(case_subject[c], []).append(c)
        self.subjects = sorted(by_subject)
        self.subject_cases = {s: sorted(v) for s, v in by_subject.items()}
        self.length = int(samples_per_epoch) if samples_per_epoch else len(self.subjects)
        self.variants_per_case = int(variants_per_case)
        if self.variants_per_case > 0:  # one cached item per case: network-grid arrays + its variant pool
            extra = {"seed": self.seed, "interp": interp, "k": list(k_range), "heldout": heldout_kpts,
                     "variants": self.variants_per_case}
            if self.variant_options:  # earlier caches (no options) keep their keys
                extra["options"] = {k: list(v) for k, v in self.variant_options.items()}
            key = config_key(data_dir, net_config, extra)
            make = PrepareVariantPool(data_dir, net_config, n_variants=self.variants_per_case, seed=self.seed,
                                      interp=interp, k_range=k_range, heldout_kpts=heldout_kpts,
                                      variant_options=self.variant_options)
            cache = None if cache_dir is None else Path(cache_dir) / "variant_pools"
        else:  # fresh draws need the whole prepared case (subject grid included)
            key = config_key(data_dir, grid_config(net_config))  # prepared cases do not depend on the channel
            make = PrepareCase(data_dir, net_config)
            cache = None if cache_dir is None else Path(cache_dir) / "cases"
        self.cases = make_store([{"case_id": c, "key": key} for c in case_ids], make, cache, num_workers, progress)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes every random draw)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(idx)])
        subject = self.subjects[int(idx) % len(self.subjects)]
        cases = self.subject_cases[subject]
        case_id = cases[int(rng.integers(len(cases)))]
        ci = self.case_index[case_id]
        case = self.cases[ci]
        if self.variants_per_case > 0:
            v = int(rng.integers(self.variants_per_case))
            variant = {"init_net": as_numpy(case["init_nets"])[v]}
            if "proximities" in case:
                variant["proximity_net"] = np.asarray(as_numpy(case["proximities"])[v], np.float32)
        else:
            variant = draw_variant(case, rng, self.net_config, interp=self.interp, k_range=self.k_range,
                                   heldout_kpts=self.heldout_kpts, **self.variant_options)
        return assemble_sample(case, variant, self.size, self.augment, rng, self.flip_axes)


def validation_items(data_dir: DataFolders, case_ids: list[str], net_config, *, seed: int, interp: str | None,
                     k_range: tuple[int, int], heldout_kpts: int, variant_options: dict | None = None
                     ) -> list[tuple[dict, dict]]:
    """``(case, variant)`` pairs for validation: one fixed variant per case (index ``-1`` of
    :func:`variant_rng`, never used in training pools) with its subject-grid initial field. Not cached on disk:
    validation sets are small. ``data_dir`` a folder or a list of them, ``case_ids`` case keys
    (:func:`case_key`); ``variant_options`` as in :class:`TrainDataset`."""
    out = []
    for c in case_ids:
        case = prepare_case(data_dir, c, net_config)
        rng = np.random.default_rng([int(seed), zlib.crc32(c.encode()), 2**31 - 1])
        out.append((case, draw_variant(case, rng, net_config, interp=interp, k_range=k_range,
                                       heldout_kpts=heldout_kpts, keep_native=True, **(variant_options or {}))))
    return out
