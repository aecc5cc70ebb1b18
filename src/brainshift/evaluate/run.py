"""Evaluate interpolators and the refinement network on a simulated dataset (``brainshift evaluate``).

For every complete case of a dataset (:mod:`brainshift.simulate.dataset` layout) and every method, the
ground-truth field is sampled at a seeded keypoint draw, the method turns the keypoints into a dense field,
and :mod:`brainshift.evaluate.metrics` scores it against the ground truth. All methods of a case see the
SAME keypoints (and the same noise), so their differences are the methods' own.

Per case:

- keypoint candidates: the subject's detected keypoints when ``subjects/<id>/keypoints.csv`` exists (first
  three columns ``x, y, z`` in the voxel frame, as ``brainshift keypoints`` writes them), else
  ``n_keypoints + n_heldout`` distinct random voxels; only candidates inside brain minus tumour minus cavity
  are used. ``n_keypoints`` of them drive the interpolation
  (:func:`brainshift.keypoints.sampling.sample_keypoints`, ground truth sampled trilinearly), the others are
  the held-out targets for TRE;
- optional Gaussian noise on the driving keypoints' displacements: independent, zero mean, standard
  deviation ``noise_mm`` per world (RAS mm) component, drawn after the keypoint choice, so a noise study
  keeps the keypoints of the noise-free run; held-out targets keep their true displacements;
- the random generator of a case is ``numpy.random.default_rng([seed, crc32(case_id)])``: results do not
  depend on which other cases are evaluated or in which order.

Methods: ``none`` (zero field: how far the tissue moved), ``linear``, ``tps``, ``tps3d``, ``gp``
(interpolators, :func:`brainshift.interpolate.interpolate` with their defaults), ``net-linear``, ``net-tps`` and
``net-gp`` (network refinement, :func:`brainshift.model.inference.refine_field`, of the linear / TPS / Gaussian-
process field), and with a folder of per-subject atlases (``atlases``, ``brainshift atlas -o DIR/<subject_id>``)
``atlas`` (the subject's deformation atlas fitted to the keypoints plus a thin-plate spline of the
residuals, :func:`brainshift.atlas.fit.fit_atlas`) and ``net-atlas`` (the network refining the atlas
field; under the safeguards their cross-validation re-fits the atlas without each fold's keypoints). A
``net-*`` method's time includes its initial interpolation (or atlas fit).

Metrics (see :mod:`brainshift.evaluate.metrics`): MSE / MAE / 95th-percentile error (mm) and the Jacobian
statistics over brain minus cavity; TRE over the held-out keypoints (mean, median, max); Dice and HD95
(mm) of the brain and tumour masks warped into intraop space by the method's field vs by the ground truth.
A ``net-*`` row also records which model refined it (:data:`MODEL_COLUMNS`: its machine-independent name and
path, safeguards on or off, and the safeguards' ``alpha`` and ``beta`` chosen for that case).

Convention: every field is float32 ``(3, I, J, K)`` on the subject grid, forward Lagrangian, voxel units.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, InputFileError, KeypointError

CLASSICAL_METHODS = ("linear", "tps", "tps3d")
#: Interpolators evaluated as they are: the classical ones (the baseline of ``summary.md``'s ratio) and ``gp``.
INTERPOLATOR_METHODS = (*CLASSICAL_METHODS, "gp")
#: Methods that need the patient's deformation atlas (``brainshift atlas``; ``evaluate --atlases DIR``).
ATLAS_METHODS = ("atlas", "net-atlas")
#: Methods that need the network.
NETWORK_METHODS = ("net-linear", "net-tps", "net-gp", "net-atlas")
METHODS = ("none", *INTERPOLATOR_METHODS, "net-linear", "net-tps", "net-gp", *ATLAS_METHODS)

#: Columns of every result row, in CSV order.
ROW_COLUMNS = (
    "case", "subject", "method", "n_keypoints", "n_heldout", "noise_mm", "seed",
    "mse_mm2", "mae_mm", "p95_mm", "tre_mm", "tre_median_mm", "tre_max_mm",
    "pct_jacobian_nonpositive", "std_log_jac",
    "dice_brain", "hd95_brain_mm", "dice_tumour", "hd95_tumour_mm",
    "gt_max_mm", "gt_mean_mm", "time_s",
    "model", "weights", "safeguards", "safeguard_alpha", "safeguard_beta", "safeguard_learnt_correction",
)
#: Columns of :data:`ROW_COLUMNS` that say which model refined a ``net-*`` row and how (:func:`model_columns`); ""
#: (text) or NaN in the other rows.
MODEL_COLUMNS = ("model", "weights", "safeguards", "safeguard_alpha", "safeguard_beta", "safeguard_learnt_correction")


@dataclass
class CaseKeypoints:
    """One case's keypoint draw (voxel frame, voxel units).

    ``points_vox``/``disps_vox`` ``(k, 3)`` drive the interpolation (``disps_vox`` includes the noise);
    ``heldout_points_vox``/``heldout_disps_vox`` ``(M, 3)`` are the TRE targets with true displacements.
    """

    points_vox: np.ndarray
    disps_vox: np.ndarray
    heldout_points_vox: np.ndarray
    heldout_disps_vox: np.ndarray


def model_record(weights: str | Path, *, safeguards: bool) -> dict:
    """Which model refined the ``net-*`` fields and whether under the safeguards, as ``demo`` and ``evaluate``
    record it: ``{"name": ..., "weights": ..., "safeguards": bool}``, ``name`` machine-independent
    (:func:`brainshift.resources.weights_name`: ``"default (shipped)"`` or the file name), ``weights`` the path
    (the key under which ``infer`` and ``register`` record it in ``summary.json``'s ``inputs``)."""
    from brainshift.resources import weights_name

    return {"name": weights_name(weights), "weights": str(weights), "safeguards": bool(safeguards)}


def model_columns(loaded, safeguards: dict | None, *, on: bool) -> dict:
    """The :data:`MODEL_COLUMNS` of a ``net-*`` row: the model's name and path (:func:`model_record`, from the
    loaded network's ``source_path``), ``safeguards`` ``"on"``/``"off"``, and the safeguards' ``alpha`` (share
    of the network's correction kept) and ``beta`` (how closely the keypoints are honoured) of this case (NaN
    when off). ``safeguards`` is :attr:`brainshift.compensate.Result.safeguards`."""
    meta = getattr(loaded, "metadata", None)
    path = meta.get("source_path", "") if isinstance(meta, dict) else ""
    rec = model_record(path, safeguards=on) if path else {"name": "", "weights": ""}
    blend = safeguards or {}
    return {"model": rec["name"], "weights": rec["weights"], "safeguards": "on" if on else "off",
            "safeguard_alpha": float(blend.get("alpha", float("nan"))),
            "safeguard_beta": float(blend.get("beta", float("nan"))),
            "safeguard_learnt_correction": ("" if not on or "learnt_correction" not in blend
                                            else ("yes" if blend["learnt_correction"] else "no"))}


def model_line(model: dict | None, blend: dict[str, tuple[float, float]] | None = None, *, of: str = "") -> str:
    """One line naming the model that refined the ``net-*`` methods and the safeguards, shared by the demo's report
    and ``evaluate``'s ``summary.md``: ``default (shipped) (PATH); safeguards on (...): net-tps alpha 0.62,
    beta 0.91; ...`` (``alpha``: share of the network's correction kept; ``beta``: how closely the output honours
    the keypoints; ``of`` qualifies the values, e.g. ``"mean over 3 cases"``), or ``no network model``.

    Args:
        model: :func:`model_record` (None: no network ran).
        blend: method -> ``(alpha, beta)``.
    """
    if not model:
        return "no network model"
    head = f"{model['name']} ({model['weights']})"
    if not model.get("safeguards"):
        return head + "; safeguards off (the network alone)"
    parts = [f"{m} alpha {a:.3g}, beta {b:.3g}" for m, (a, b) in (blend or {}).items()]
    text = head + "; safeguards on (alpha: share of the network's correction kept, beta: how closely the keypoints " \
                  "are honoured"
    text += f"; {of})" if of else ")"
    return text + (": " + "; ".join(parts) if parts else "")


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """Validate method names (a comma-separated string or a list); keep their order, drop repeats.

    Raises:
        BrainshiftError: empty list or an unknown name (the message lists the choices).
    """
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods)]
    names = [m for m in dict.fromkeys(names) if m]
    if not names:
        raise BrainshiftError(f"expected at least one method among {', '.join(METHODS)}, got none")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise BrainshiftError(f"expected methods among {', '.join(METHODS)}, got {', '.join(unknown)}")
    return names


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The random generator of one case: ``default_rng([seed, crc32(case_id)])``."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode("utf-8"))])


def evaluation_mask(case) -> np.ndarray:
    """Boolean ``(I, J, K)``: brain minus the resection cavity of a case
    (:func:`brainshift.evaluate.metrics.evaluation_region`)."""
    from brainshift.evaluate.metrics import evaluation_region

    return evaluation_region(case.subject.brain_mask.data, case.cavity_mask.data)


def keypoint_mask(case) -> np.ndarray:
    """Boolean ``(I, J, K)``: brain minus tumour minus cavity of a case, where keypoints may lie
    (:func:`brainshift.evaluate.metrics.keypoint_region`)."""
    from brainshift.evaluate.metrics import keypoint_region

    return keypoint_region(case.subject.brain_mask.data, case.subject.tumour_mask.data, case.cavity_mask.data)


def draw_case_keypoints(field_vox: np.ndarray, allowed_mask: np.ndarray, affine: np.ndarray, *,
                        rng: np.random.Generator, n_keypoints: int = 20, n_heldout: int = 100,
                        noise_mm: float = 0.0, candidates_vox: np.ndarray | None = None) -> CaseKeypoints:
    """Draw the driving and held-out keypoints of one case from its ground-truth field.

    Candidates inside ``allowed_mask`` (the detected ``candidates_vox`` if given, else ``n_keypoints +
    n_heldout`` distinct random voxels of the mask) go to
    :func:`brainshift.keypoints.sampling.sample_keypoints` with ``k_min = k_max = n_keypoints``; then noise
    ``N(0, noise_mm^2)`` per world component is added to the driving displacements (converted to voxel units
    with the affine).

    Convention: ``field_vox`` forward Lagrangian, voxel units ``(3, I, J, K)``.

    Raises:
        KeypointError: fewer allowed voxels/candidates than ``n_keypoints``, or ``n_keypoints < 1``.
    """
    from brainshift.io.frames import vectors_to_voxel
    from brainshift.keypoints.sampling import sample_keypoints

    if n_keypoints < 1 or n_heldout < 0:
        raise KeypointError(f"expected n_keypoints >= 1 and n_heldout >= 0, got {n_keypoints} and {n_heldout}")
    allowed = np.asarray(allowed_mask, dtype=bool)
    if candidates_vox is None:
        idx = np.flatnonzero(allowed)
        want = n_keypoints + n_heldout
        if len(idx) < n_keypoints:
            raise KeypointError(f"expected at least {n_keypoints} voxels in brain minus tumour and cavity, "
                                f"got {len(idx)}")
        pick = rng.choice(idx, size=min(want, len(idx)), replace=False)
        candidates_vox = np.stack(np.unravel_index(pick, allowed.shape), axis=1).astype(np.float64)
    pts, disps, held_pts, held_disps = sample_keypoints(field_vox, candidates_vox, allowed, k_min=n_keypoints,
                                                        k_max=n_keypoints, rng=rng)
    disps = np.asarray(disps, dtype=np.float64)
    if noise_mm > 0:
        noise_ras = rng.normal(0.0, float(noise_mm), size=disps.shape)
        disps = disps + vectors_to_voxel(noise_ras, "ras", affine)
    return CaseKeypoints(np.asarray(pts, np.float64), disps, np.asarray(held_pts, np.float64).reshape(-1, 3),
                         np.asarray(held_disps, np.float64).reshape(-1, 3))


def evaluate_case(case, methods: list[str], *, seed: int = 0, n_keypoints: int = 20, n_heldout: int = 100,
                  noise_mm: float = 0.0, candidates_vox: np.ndarray | None = None, loaded=None,
                  device: str = "cpu", overlap: bool = True, mirror_average: bool | None = None,
                  safeguards: bool = True, atlas=None, bar=None) -> list[dict]:
    """Evaluate ``methods`` on one :class:`~brainshift.simulate.dataset.SimCase` (rows in ``methods`` order).

    Args:
        case: the case (subject, ground-truth field, cavity).
        methods: validated method names (:func:`parse_methods`).
        seed: global seed (the case's generator is :func:`case_rng`).
        n_keypoints: driving keypoints per case.
        n_heldout: held-out TRE targets when random candidates are drawn.
        noise_mm: std of the Gaussian displacement noise per world component (mm).
        candidates_vox: ``(M, 3)`` detected keypoints of the subject (voxel frame), or None for random ones.
        loaded: the network (:func:`brainshift.model.checkpoint.load_weights`), needed by ``net-*``.
        device: torch device of the network.
        overlap: compute Dice/HD95 (one field inversion per method; ``nan`` columns when False).
        mirror_average: for ``net-*``, as in :func:`brainshift.model.inference.refine_field` (None: the
            model's default; only without safeguards).
        safeguards: ``net-*`` refine under :mod:`brainshift.model.safeguards` with the case's driving
            keypoints (as ``infer`` does by default); False: the network alone.
        atlas: the subject's :class:`~brainshift.atlas.basis.DeformationAtlas`, needed by ``atlas`` and
            ``net-atlas`` (one fit serves both: ``net-atlas`` refines the ``atlas`` field).
        bar: a tqdm bar (or None) advanced by one when the ground truth's masks are warped (with ``overlap``)
            and after each method, its postfix naming the step under way (:func:`case_steps` steps in all). With
            ``overlap`` most of a case's time is the field inversions of Dice/HD95 (one per method and one for
            the ground truth; 30 s each on a 160 x 192 x 144 grid on a loaded 2-core CPU).

    Returns:
        One dict per method with the keys :data:`ROW_COLUMNS`; a ``net-*`` row's :data:`MODEL_COLUMNS` name the
        model and the safeguards' ``alpha`` / ``beta`` of this case (:func:`model_columns`), "" / NaN elsewhere.

    Raises:
        BrainshiftError: a ``net-*`` method without ``loaded``, an atlas method without ``atlas``.
        GeometryError: an atlas built for another image. KeypointError: keypoints outside the atlas's brain.
    """
    from brainshift.compensate import compensate
    from brainshift.evaluate import metrics
    from brainshift.field import displacement_magnitude_mm

    gt = case.field
    if not np.all(np.isfinite(gt)):
        raise InputFileError(f"expected a finite ground-truth field in case {case.case_id}, got "
                             f"{int((~np.isfinite(gt)).sum())} NaN or infinite values")
    subject = case.subject
    affine = subject.image.affine
    eval_mask = evaluation_mask(case)
    kp = draw_case_keypoints(gt, keypoint_mask(case), affine, rng=case_rng(seed, case.case_id),
                             n_keypoints=n_keypoints, n_heldout=n_heldout, noise_mm=noise_mm,
                             candidates_vox=candidates_vox)
    def step(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{case.case_id}: {text}", refresh=True)

    def done() -> None:
        if bar is not None:
            bar.update(1)

    masks = {"brain": subject.brain_mask, "tumour": subject.tumour_mask} if overlap else None
    gt_warped = None
    if overlap:
        step("ground truth: warp the masks (field inversion)")
        gt_warped = metrics.warp_masks(gt, masks)
        done()
    gt_mag = displacement_magnitude_mm(gt, affine)[eval_mask]

    init_cache: dict[str, tuple[np.ndarray, float]] = {}
    sg_cache: dict[str, dict | None] = {}  # net-* method -> the safeguards' record (None when off)

    def initial(kind: str) -> tuple[np.ndarray, float]:
        if kind not in init_cache:
            res = compensate(subject.image, keypoints=(kp.points_vox, kp.disps_vox), method=kind)
            init_cache[kind] = (res.initial_field, res.timings_s[f"interpolate ({kind})"])
        return init_cache[kind]

    if any(m in ATLAS_METHODS for m in methods):
        if atlas is None:
            raise BrainshiftError(f"expected the atlas of subject {subject.subject_id} for the methods "
                                  f"{', '.join(ATLAS_METHODS)}, got none")
        if "net-atlas" in methods and loaded is None:
            raise BrainshiftError("expected a loaded network for method 'net-atlas', got none")
        # one fit for both: with the network, compensate refines the atlas field it has just fitted (and its
        # safeguards re-fit the atlas without each fold's keypoints)
        res = compensate(subject.image, keypoints=(kp.points_vox, kp.disps_vox), method="atlas", atlas=atlas,
                         model=loaded if "net-atlas" in methods else None, safeguards=safeguards,
                         mask=subject.brain_mask.data > 0, device=device, mirror_average=mirror_average)
        t_fit = res.timings_s["interpolate (atlas)"]
        init_cache["atlas"] = (res.initial_field, t_fit)
        if res.refined_field is not None:
            init_cache["net-atlas"] = (res.refined_field, t_fit + res.timings_s["refine with the network"])
            sg_cache["net-atlas"] = res.safeguards

    rows = []
    for method in methods:
        step(method)
        if method == "none":
            pred, dt = np.zeros_like(gt), 0.0
        elif method in INTERPOLATOR_METHODS or method in ATLAS_METHODS:
            pred, dt = initial(method)
        else:
            if loaded is None:
                raise BrainshiftError(f"expected a loaded network for method {method!r}, got none")
            kind = method.removeprefix("net-")  # a classical method (net-atlas is fitted and refined above)
            _, t_init = initial(kind)
            # from the keypoints, as infer -m <kind> runs it: the safeguards' folds then re-interpolate with the same
            # interpolator (given a ready field they would use tps); the initial field is the same
            res = compensate(subject.image, keypoints=(kp.points_vox, kp.disps_vox), method=kind,
                             safeguards=safeguards, model=loaded, mask=subject.brain_mask.data > 0,
                             device=device, mirror_average=mirror_average)
            pred, dt = res.refined_field, t_init + res.timings_s["refine with the network"]
            sg_cache[method] = res.safeguards
        pred = np.asarray(pred, dtype=np.float32)
        step(f"{method}: score" + (" (Dice/HD95: field inversion)" if overlap else ""))
        row = {
            "case": case.case_id, "subject": subject.subject_id, "method": method,
            "n_keypoints": int(len(kp.points_vox)), "n_heldout": int(len(kp.heldout_points_vox)),
            "noise_mm": float(noise_mm), "seed": int(seed),
            **metrics.score_field(pred, gt, affine, eval_mask, kp.heldout_points_vox, kp.heldout_disps_vox,
                                  masks=masks, gt_warped_masks=gt_warped),
        }
        if not overlap:
            row.update({k: float("nan") for k in metrics.OVERLAP_KEYS})
        row["gt_max_mm"] = float(gt_mag.max())
        row["gt_mean_mm"] = float(gt_mag.mean())
        row["time_s"] = float(dt)
        if method in NETWORK_METHODS:
            row.update(model_columns(loaded, sg_cache.get(method), on=safeguards))
        else:
            row.update({"model": "", "weights": "", "safeguards": "", "safeguard_alpha": float("nan"),
                        "safeguard_beta": float("nan"), "safeguard_learnt_correction": ""})
        rows.append({k: row[k] for k in ROW_COLUMNS})
        done()
    return rows


def case_steps(methods: list[str], overlap: bool) -> int:
    """Progress steps of one :func:`evaluate_case`: one per method, one for the ground truth's masks (``overlap``)."""
    return len(methods) + int(bool(overlap))


#: The largest keypoint noise (mm, standard deviation per world component) ``evaluate`` accepts: localisation
#: errors of centimetres are not keypoints any more, and larger values are far likelier a typo.
MAX_NOISE_MM = 20.0


def evaluate_dataset(data_dir: str | Path, methods: list[str] | str, *, weights: str | Path | None = None,
                     seed: int = 0, n_keypoints: int = 20, noise_mm: float = 0.0, cases: int | None = None,
                     device: str = "cpu", progress: bool = True, n_heldout: int = 100,
                     overlap: bool = True, mirror_average: bool | None = None, safeguards: bool = True,
                     atlases: str | Path | None = None) -> list[dict]:
    """Evaluate methods on every complete case of a simulated dataset.

    Args:
        data_dir: dataset root (``subjects/`` and ``cases/``, see :mod:`brainshift.simulate.dataset`).
        methods: names among :data:`METHODS` (list or comma-separated string).
        weights: network weights for ``net-*`` (default: the shipped ``weights/default.safetensors``).
        seed: global seed; every draw of a case comes from :func:`case_rng`.
        n_keypoints: driving keypoints per case (the published setting: 20).
        noise_mm: std (mm) of Gaussian noise per world component on the driving displacements.
        cases: evaluate only the first ``cases`` case ids (sorted); None = all.
        device: ``cpu``, ``cuda`` or ``auto`` for the network.
        progress: a tqdm progress bar over the cases' steps (:func:`case_steps`: each method, and with
            ``overlap`` the ground truth's warped masks), naming the case and step under way.
        n_heldout: held-out targets per case when no detected keypoints exist.
        overlap: compute Dice/HD95 (the slowest metrics).
        mirror_average: left-right mirror averaging of the network (None: the model's default, see
            :func:`brainshift.model.inference.refine_field`).
        safeguards: as in :func:`evaluate_case`.
        atlases: folder holding one atlas folder per subject id (``brainshift atlas -o DIR/<subject_id>``),
            needed by the methods ``atlas`` and ``net-atlas``; each subject's atlas is loaded once and must be
            built on that subject's preop image.

    Returns:
        One dict per (case, method), keys :data:`ROW_COLUMNS`, cases in sorted order, methods in the
        given order. Deterministic given ``seed`` except ``time_s``.

    Raises:
        InputFileError: no ``data_dir`` folder or no complete case in it, missing weights for ``net-*``, a
            missing or unreadable atlas of a subject (the message names the subject).
        BrainshiftError: unknown method, bad counts, noise outside 0-:data:`MAX_NOISE_MM` mm, atlas methods
            without ``atlases``, a device name that is unknown, or a device that is not available when a network
            method runs (without network methods an unavailable ``cuda`` is only a warning, as in ``infer
            --no-refine``).
        GeometryError: an atlas built for another image than its subject's.
    """
    from brainshift.device import resolve_device
    from brainshift.resources import resolve_weights
    from brainshift.simulate.dataset import list_cases, read_case, read_subject_keypoints

    names = parse_methods(methods)
    if n_keypoints < 4:
        raise KeypointError(f"expected --num-kpts >= 4 (the interpolators need 4 keypoints not on one plane), got "
                            f"{n_keypoints}")
    if not 0 <= noise_mm <= MAX_NOISE_MM:
        raise BrainshiftError(f"expected a noise level of 0-{MAX_NOISE_MM:g} mm, got {noise_mm}")
    from brainshift.device import check_device, check_device_name

    if any(m in NETWORK_METHODS for m in names):
        check_device(device)  # refused before any work when the network will run on it
    elif check_device_name(device) not in ("cpu", "auto"):  # a misspelt name is refused all the same
        warnings.warn(f"--device {device} has no effect without network methods ({', '.join(names)}): only the "
                      "network runs on a device; the interpolators run on the CPU", stacklevel=2)
    if not Path(data_dir).is_dir():
        raise InputFileError(f"expected a dataset folder (brainshift simulate-batch --out) at {data_dir}, got "
                             f"{'a file' if Path(data_dir).exists() else 'no such folder'}")
    if cases is not None and cases < 1:
        raise BrainshiftError(f"expected --cases >= 1, got {cases}")
    wants_atlas = [m for m in names if m in ATLAS_METHODS]
    if wants_atlas and atlases is None:
        raise BrainshiftError(f"expected --atlases DIR (one `brainshift atlas` folder per subject id) for the "
                              f"methods {', '.join(wants_atlas)}, got none")
    if atlases is not None and not Path(atlases).is_dir():
        raise InputFileError(f"expected --atlases to be a folder of per-subject atlases, got {atlases} "
                             f"({'a file' if Path(atlases).exists() else 'no such folder'})")
    ids = list_cases(data_dir)
    if not ids:
        raise InputFileError(f"expected a dataset with complete cases under {Path(data_dir) / 'cases'}, found none")
    ids = ids[:cases] if cases is not None else ids
    loaded = None
    if any(m in NETWORK_METHODS for m in names):
        from brainshift.model.checkpoint import load_weights

        device = str(resolve_device(device))
        loaded = load_weights(resolve_weights(weights, required=True), device=device)
    from tqdm.auto import tqdm

    rows: list[dict] = []
    subject = None
    candidates = None
    atlas = None
    bar = tqdm(total=len(ids) * case_steps(names, overlap), desc=f"evaluate {len(ids)} case(s)", unit="step",
               disable=not progress)
    with bar:
        for case_id in ids:
            bar.set_postfix_str(f"{case_id}: read", refresh=True)
            case = read_case(data_dir, case_id, subject=subject)
            if subject is None or case.subject.subject_id != subject.subject_id:
                candidates = read_subject_keypoints(data_dir, case.subject.subject_id)
                if wants_atlas:
                    atlas = load_subject_atlas(atlases, case.subject)
            subject = case.subject
            rows.extend(evaluate_case(case, names, seed=seed, n_keypoints=n_keypoints, n_heldout=n_heldout,
                                      noise_mm=noise_mm, candidates_vox=candidates, loaded=loaded, device=device,
                                      overlap=overlap, mirror_average=mirror_average, safeguards=safeguards,
                                      atlas=atlas, bar=bar if progress else None))
    return rows


def load_subject_atlas(atlases: str | Path, subject):
    """The deformation atlas of one subject: ``atlases/<subject_id>`` (:func:`brainshift.atlas.basis.load_atlas`),
    checked against the subject's preop image.

    Raises:
        InputFileError: no atlas folder for the subject, or a corrupt one (one line naming the subject).
        GeometryError: the atlas was built on another image or grid (one line naming the subject).
    """
    from brainshift.atlas.basis import load_atlas
    from brainshift.errors import GeometryError

    sid = subject.subject_id
    folder = Path(atlases) / sid
    if not folder.is_dir():
        raise InputFileError(f"expected an atlas of subject {sid} at {folder} (brainshift atlas -o {folder}), got "
                             f"{'a file' if folder.exists() else 'no such folder'}")
    try:
        atlas = load_atlas(folder)
        image = subject.image
        atlas.check_image(image.shape, image.affine, image.data, f"the preop image of subject {sid}")
    except (InputFileError, GeometryError) as exc:
        msg = str(exc).splitlines()[0]
        raise type(exc)(msg if sid in msg else f"subject {sid}: {msg}") from None
    return atlas


def evaluate_sweep(data_dir: str | Path, methods: list[str] | str, *, n_keypoints=(20,), noise_mm=(0.0,),
                   **kwargs) -> list[dict]:
    """:func:`evaluate_dataset` for every combination of keypoint count and noise level, rows concatenated.

    For the accuracy benchmark's studies (e.g. ``n_keypoints=(5, 10, 20, 40)`` at no noise, or
    ``noise_mm=(0, 0.5, 1)`` at 20 keypoints); each row carries its ``n_keypoints`` and ``noise_mm``, so
    :func:`brainshift.evaluate.tables.sweep_markdown` / ``plot_sweep`` can tabulate and plot them. Other
    keyword arguments go to :func:`evaluate_dataset` (same seed for every setting: at one keypoint count the
    noise levels share their keypoints).
    """
    rows: list[dict] = []
    for k in n_keypoints:
        for sigma in noise_mm:
            rows.extend(evaluate_dataset(data_dir, methods, n_keypoints=int(k), noise_mm=float(sigma), **kwargs))
    return rows
