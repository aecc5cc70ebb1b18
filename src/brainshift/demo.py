"""``brainshift demo``: the whole method end to end on the built-in MNI152 brain, with an HTML report.

Steps of :func:`run_demo` (each announced and timed on stderr by :class:`brainshift.progress.StepTimer`):

1. **Subject.** The MNI152 template shipped inside nilearn (loaded by nilearn's own loader, nothing is
   downloaded) with a synthetic tumour: :func:`brainshift.simulate.subject.synthesize_subject` with the
   anatomical scaling and warp switched off (:data:`DEMO_SYNTHESIS`), so the brain is the template itself
   and ``seed`` draws the tumour (position, size, shape, appearance).
2. **Ground truth.** Brain shift simulated by the biomechanical model
   (:func:`brainshift.simulate.case.simulate_case`: gravity along the surgical approach, CSF drainage, skull
   contact, tumour resection) with hexahedral elements of ``resolution_mm`` (:data:`DEMO_RESOLUTION_MM`,
   the simulator's default 3 mm; the whole demo fits its 3-minute budget on a 2-core CPU with it); the
   case's random draws come from ``seed``.
3. **Keypoints.** 3-D DoG keypoints detected in the preop image inside brain minus tumour
   (:func:`brainshift.keypoints.detect_keypoints`); ``n_keypoints`` (20, as published) of them drive the
   interpolation, their displacements sampled trilinearly from the ground truth; all other detected
   keypoints are held-out targets for the TRE (:func:`brainshift.evaluate.run.draw_case_keypoints`).
4. **Atlas** (``atlas=True``, the default): the subject's deformation atlas
   (:func:`brainshift.simulate.atlas.build_atlas`, as ``brainshift atlas`` builds it) from the preop image and
   masks alone, with the light config ``configs/atlas_demo.yaml`` (:data:`DEMO_ATLAS_CONFIG`; the quick case
   uses :data:`QUICK_ATLAS_CONFIG`), written to ``atlas/`` in the output folder.
5. **Methods.** Delaunay-linear and thin-plate-spline interpolation (:func:`brainshift.interpolate.
   interpolate`) and the atlas fitted to the keypoints (``atlas``: :func:`brainshift.atlas.fit.fit_atlas`, a
   Gaussian-prior fit plus a thin-plate spline of the residuals) through :func:`brainshift.compensate.compensate`
   (:func:`run_methods`); when a trained model exists (``weights`` or the shipped default,
   :func:`brainshift.resources.resolve_weights`) each is refined by the network under the safeguards
   (``net-linear``, ``net-tps``, ``net-atlas``). Without weights the demo says so and shows the classical methods
   and the atlas only.
6. **Metrics** (:func:`brainshift.evaluate.metrics.score_field`, as in ``brainshift evaluate``): MSE, mean and
   95th-percentile error (mm) over brain minus the resection cavity, TRE at the held-out keypoints,
   % det J <= 0, the mean keypoint residual (mm: how far each field is from the driving keypoints' own
   displacements), time per method; a ``none`` row (zero field) shows how far the tissue moved.
7. **Outputs** in ``out_dir`` (every file written atomically): ``preop_t1.nii.gz``, masks
   (``brain_mask``, ``tumour_mask``, ``cavity_mask`` ``.nii.gz``), ``field_ground_truth`` and
   ``field_<method>`` as ITK ``.h5`` and NIfTI ``.nii.gz`` (see the README for what they mean),
   ``intraop_t1_ground_truth.nii.gz`` (the synthetic intraoperative image: the preop image with the cavity
   emptied, warped by the ground truth), ``intraop_t1.nii.gz`` (a synthetic intraop MRI on its own grid with
   noise and bias, :func:`brainshift.simulate.intraop.synthesize_intraop_image`: ``make demo`` registers it
   with ``brainshift register``), ``preop_t1_warped_<best>.nii.gz`` (the preop image warped into
   intraop space by the method with the lowest MSE; both warps pull through an inverse computed on a grid
   subsampled by 2, :func:`brainshift.io.fields.coarse_inverse_field`), ``keypoints.csv`` and ``heldout_keypoints.csv``
   (voxel frame, ``x,y,z,dx,dy,dz``), ``atlas/`` (the deformation atlas: ``atlas.json``, ``basis.npz``,
   ``build.json``; ``brainshift infer -m atlas --atlas`` reads it; the solves' member files are dropped once
   reduced), ``metrics.csv``, ``metrics.json`` (with the atlas fit's record) and ``report.html`` with its figures
   (:func:`brainshift.evaluate.case_report.write_case_report`; it links to ``register/report.html``, which
   ``make demo`` writes next); ``brainshift demo`` prints the metrics table. ``summary.json`` and
   ``metrics.json`` record the model (``model``: :func:`brainshift.evaluate.run.model_record`, its
   machine-independent name and path, safeguards on) and per refined method the safeguards' record
   (``safeguards``: ``alpha``, ``beta``, cross-validation errors, as ``infer`` writes it); the atlas's config
   only with the keys its design reads (:func:`atlas_config_record`).

``quick=True`` replaces steps 1-2 by a small case for tests (about 1-3 minutes on a 2-core CPU): the template
resampled to :data:`QUICK_SPACING_MM`, a spherical tumour placed by ``seed``, and the analytic sag field
(:func:`brainshift.simulate.analytic.analytic_sag_field`, zero outside the brain; the cavity is the tumour)
instead of the simulation; its atlas (:data:`QUICK_ATLAS_CONFIG`, 6 solves at 6 mm on the 3 mm grid, one
in-process worker) takes 20-80 s depending on the machine's load, and the analytic field is no member of it.

Convention: every field is float32 ``(3, I, J, K)`` on the subject's grid, forward Lagrangian (preop voxel
``p`` moves to ``p + u(p)``), voxel units along ``i, j, k``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from brainshift.io.fields import coarse_inverse_field
from brainshift.simulate.analytic import analytic_sag_field
from brainshift.simulate.template import load_mni152
from brainshift.volume import Volume

if TYPE_CHECKING:
    from brainshift.evaluate.run import CaseKeypoints
    from brainshift.simulate.dataset import Subject

#: Hexahedral element edge (mm) of the demo's simulation: the simulator's default. The whole demo took 81 s with it
#: (48 s with 4 mm) on the shared 2-core CPU; ``--resolution 4`` halves the simulation time.
DEMO_RESOLUTION_MM = 3.0
#: Voxel size (mm) of the quick test case.
QUICK_SPACING_MM = 3.0
#: Classical methods of the demo (each is refined as ``net-<name>`` when a model is available).
DEMO_METHODS = ("linear", "tps")
#: Shipped atlas config of the demo (``configs/atlas_demo.yaml``: 16 solves at 5 mm; see the file for its time).
DEMO_ATLAS_CONFIG = "atlas_demo"
#: Atlas of the quick test case: 1 contact model x 2 drainage levels x 3 gravity directions at 6 mm.
QUICK_ATLAS_CONFIG = {"design": "grid", "resolution_mm": 6.0, "contact_models": ["unilateral"],
                      "drainage_fractions": [0.2, 0.5], "gravity_cone_deg": 25.0, "n_ring_directions": 2}
#: Sub-folder of the demo output holding the atlas.
ATLAS_DIR = "atlas"
#: The report of ``make demo``'s ``brainshift register`` step, relative to the demo's output folder (linked from the
#: demo's report; not part of the demo's own output set).
REGISTER_REPORT = "register/report.html"
#: Fewest held-out TRE targets; random brain voxels are added to the detected keypoints if there are fewer.
MIN_HELDOUT = 20
NO_MODEL_NOTE = "no trained model shipped yet; classical methods only"


@dataclass
class DemoCase:
    """The demo's subject and ground truth.

    Attributes:
        subject: preop image and brain / tumour / ventricle masks on one grid.
        field_vox: ground-truth ``(3, I, J, K)`` field. Convention: forward Lagrangian, voxel units.
        cavity_mask: label Volume of the resected region (excluded from the dense errors).
        info: how the case was made (JSON-serialisable).
    """

    subject: Subject
    field_vox: np.ndarray
    cavity_mask: Volume
    info: dict


def demo_synthesis_config():
    """The :class:`~brainshift.simulate.subject.SynthesisConfig` of the demo: no scaling, no warp (the
    template's own anatomy), the default tumour model."""
    from brainshift.simulate.subject import SynthesisConfig

    return SynthesisConfig(scale_range=(1.0, 1.0), warp_amplitude_mm=0.0)


def make_demo_case(seed: int = 0, *, resolution_mm: float = DEMO_RESOLUTION_MM, progress: bool = False,
                   timer=None) -> DemoCase:
    """The MNI152 brain with a seeded synthetic tumour and its simulated brain shift (steps 1-2 of the module
    docstring).

    Args:
        seed: seed of the tumour and of the case's random draws (gravity perturbation, drainage level).
        resolution_mm: element edge of the simulation (mm).
        progress: let the simulator print its stages.
        timer: optional :class:`~brainshift.progress.StepTimer` to time the two steps.

    Returns:
        :class:`DemoCase` on the subject's 1 mm grid. Convention: ``field_vox`` forward Lagrangian, voxel units.

    Raises:
        GeometryError, SolverError: from the synthesis or the simulation.
    """
    import contextlib

    from brainshift.simulate.case import SimulationConfig, draw_case_parameters, simulate_case
    from brainshift.simulate.subject import synthesize_subject

    def step(name):
        return timer.step(name) if timer is not None else contextlib.nullcontext()

    with step("synthesise the subject (MNI152 + tumour)"):
        subject = synthesize_subject(seed, config=demo_synthesis_config(), subject_id=f"mni152-demo-seed{seed}")
    config = SimulationConfig(resolution_mm=float(resolution_mm))
    with step(f"simulate brain shift (FEM, {resolution_mm:g} mm elements)"):
        params = draw_case_parameters(subject, config, int(seed))
        result = simulate_case(subject, config, params, progress=progress)
    meta = result.meta
    info = {
        "ground truth": f"biomechanical simulation, {resolution_mm:g} mm hexahedra, "
                        f"{meta['n_elements_preop']} elements, {meta['n_resected_elements']} resected",
        "tumour centre (RAS mm)": [round(float(v), 1) for v in subject.info["tumour_centre_ras"]],
        "tumour radius (mm, volume-equivalent)": float(subject.info["tumour_equivalent_radius_mm"]),
        "gravity perturbation (deg)": float(meta["params"]["gravity_perturbation_deg"]),
        "drained CSF fraction": float(meta["params"]["drainage_fraction"]),
        "simulation time (s)": float(meta["times_s"]["total_s"]),
    }
    return DemoCase(subject=subject, field_vox=result.field_vox, cavity_mask=result.cavity_mask, info=info)


def make_quick_case(seed: int = 0, *, spacing_mm: float = QUICK_SPACING_MM, tumour_radius_mm: float = 10.0) -> DemoCase:
    """A small case for tests: the template at ``spacing_mm``, a spherical tumour, the analytic sag field.

    The tumour centre is drawn (``seed``) among brain voxels at least ``tumour_radius_mm + 10`` mm from the
    brain surface; the cavity is the tumour; the ground truth is
    :func:`~brainshift.simulate.analytic.analytic_sag_field`, set to zero outside the brain.

    Returns:
        :class:`DemoCase`. Convention: ``field_vox`` forward Lagrangian, voxel units.
    """
    import scipy.ndimage as ndi

    from brainshift.field import voxel_grid
    from brainshift.geometry import voxel_to_ras
    from brainshift.simulate.dataset import Subject

    t1, brain = load_mni152()
    t1 = t1.resample_to_spacing(spacing_mm)
    brain = brain.resample_to_spacing(spacing_mm)
    a = t1.affine
    inside = brain.data > 0
    depth = ndi.distance_transform_edt(inside, sampling=t1.spacing)
    candidates = np.argwhere(depth >= tumour_radius_mm + 10.0)
    centre = candidates[np.random.default_rng(seed).integers(len(candidates))].astype(np.float64)
    x = voxel_to_ras(voxel_grid(t1.shape).reshape(3, -1).T.astype(np.float64), a)
    c_ras = voxel_to_ras(centre[None], a)[0]
    tumour = (np.linalg.norm(x - c_ras, axis=1) <= tumour_radius_mm).reshape(t1.shape) & inside
    image = np.where(tumour, 0.2 * float(t1.data[inside].max()), t1.data).astype(np.float32)
    field, sag = analytic_sag_field(brain)
    field *= inside[None]
    subject = Subject(subject_id=f"quick-seed{seed}", image=Volume(image, a, "intensity"), brain_mask=brain,
                      tumour_mask=Volume(tumour.astype(np.uint8), a, "label"),
                      ventricles_mask=Volume(np.zeros(t1.shape, np.uint8), a, "label"),
                      info={"tumour_centre_ras": c_ras.tolist(), "tumour_equivalent_radius_mm": tumour_radius_mm})
    info = {"ground truth": f"analytic sag field (quick test case, {spacing_mm:g} mm voxels)",
            "tumour centre (RAS mm)": [round(float(v), 1) for v in c_ras],
            "craniotomy (RAS mm)": [round(float(v), 1) for v in sag["craniotomy_ras"]]}
    return DemoCase(subject=subject, field_vox=field, cavity_mask=Volume(tumour.astype(np.uint8), a, "label"),
                    info=info)


def demo_keypoints(case: DemoCase, *, seed: int, n_keypoints: int = 20) -> tuple[CaseKeypoints, int]:
    """Detect keypoints in brain minus tumour (and cavity) and draw the driving / held-out sets.

    If fewer than ``n_keypoints + MIN_HELDOUT`` keypoints are detected, random voxels of the same region are
    added as candidates (recorded in the returned count).

    Returns:
        ``(CaseKeypoints, n_detected)``: points and displacements in voxel units (voxel frame).

    Convention: displacements sampled trilinearly from the forward Lagrangian ground truth (voxel units).
    """
    from brainshift.evaluate.metrics import keypoint_region
    from brainshift.evaluate.run import draw_case_keypoints
    from brainshift.keypoints import detect_keypoints

    subject = case.subject
    allowed = keypoint_region(subject.brain_mask.data, subject.tumour_mask.data, case.cavity_mask.data)
    detected = detect_keypoints(subject.image, allowed).points_vox
    rng = np.random.default_rng(seed)
    candidates = detected
    if len(detected) < n_keypoints + MIN_HELDOUT:
        idx = np.argwhere(allowed)
        extra = idx[rng.choice(len(idx), size=n_keypoints + MIN_HELDOUT - len(detected), replace=False)]
        candidates = np.concatenate([detected, extra.astype(np.float64)])
    kp = draw_case_keypoints(case.field_vox, allowed, subject.image.affine, rng=rng, n_keypoints=n_keypoints,
                             candidates_vox=candidates)
    return kp, len(detected)


def score(field_vox: np.ndarray, case: DemoCase, kp: CaseKeypoints) -> dict:
    """:func:`brainshift.evaluate.metrics.score_field` of a field on the demo case: errors and det J over
    brain minus cavity (:func:`~brainshift.evaluate.metrics.evaluation_region`), TRE at the held-out keypoints.

    Convention: ``field_vox`` forward Lagrangian, voxel units, on the case's grid.
    """
    from brainshift.evaluate.metrics import evaluation_region, score_field

    region = evaluation_region(case.subject.brain_mask.data, case.cavity_mask.data)
    return score_field(field_vox, case.field_vox, case.subject.image.affine, region, kp.heldout_points_vox,
                       kp.heldout_disps_vox)


def run_methods(case: DemoCase, kp: CaseKeypoints, loaded, *, device: str = "cpu", timer=None,
                progress: bool = False, uncertainty: dict | None = None, atlas=None,
                atlas_fit: dict | None = None,
                safeguards: dict | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every demo method's field and time: :data:`DEMO_METHODS` by :func:`brainshift.compensate.compensate`,
    ``atlas`` when an atlas is given, each refined as ``net-<name>`` when ``loaded`` is a network (its time
    includes the interpolation or atlas fit), under the safeguards as ``infer`` runs it.

    Args:
        uncertainty: if a dict, filled with ``net-<name>`` -> ``(I, J, K)`` uncertainty map (mm).
        atlas: the subject's :class:`~brainshift.atlas.basis.DeformationAtlas` (None: no atlas methods). One
            :func:`~brainshift.compensate.compensate` call gives ``atlas`` and, with a network, ``net-atlas``
            (whose safeguards re-fit the atlas without each fold's keypoints).
        atlas_fit: if a dict, filled with the atlas fit's record (:attr:`brainshift.compensate.Result.atlas_fit`).
        safeguards: if a dict, filled with ``net-<name>`` -> the safeguards' record
            (:attr:`brainshift.compensate.Result.safeguards`: ``alpha``, ``beta``, the cross-validation errors), as
            ``infer`` writes it to ``summary.json``.

    Returns:
        ``(fields, times_s)`` keyed by method name: the classical methods and ``atlas`` first, then the refined
        ones (``net-linear``, ``net-tps``, ``net-atlas``).

    Convention: fields float32 ``(3, I, J, K)``, forward Lagrangian, voxel units on the case's grid.
    """
    from brainshift.compensate import compensate
    from brainshift.progress import StepTimer

    timer = timer or StepTimer(verbose=False)
    image = case.subject.image
    brain = case.subject.brain_mask.data > 0
    keypoints = (kp.points_vox, kp.disps_vox)
    results = {}
    for method in DEMO_METHODS:
        with timer.step(f"interpolate ({method})"):
            results[method] = compensate(image, keypoints=keypoints, method=method)
    fields = {m: r.initial_field for m, r in results.items()}
    times = {m: r.timings_s[f"interpolate ({m})"] for m, r in results.items()}
    refined: dict[str, np.ndarray] = {}
    if atlas is not None:
        step = "fit the atlas" + (" and refine it with the network" if loaded is not None else "")
        with timer.step(step):
            res = compensate(image, keypoints=keypoints, method="atlas", atlas=atlas, model=loaded, mask=brain,
                             device=device, progress=progress)
        fields["atlas"] = res.initial_field
        times["atlas"] = res.timings_s["interpolate (atlas)"]
        if atlas_fit is not None:
            atlas_fit.update(res.atlas_fit or {})
        if res.refined_field is not None:
            refined["net-atlas"] = res.refined_field
            times["net-atlas"] = times["atlas"] + res.timings_s["refine with the network"]
            if uncertainty is not None and res.uncertainty is not None:
                uncertainty["net-atlas"] = res.uncertainty
            if safeguards is not None:
                safeguards["net-atlas"] = res.safeguards
    if loaded is not None:
        for method in DEMO_METHODS:
            with timer.step(f"refine {method} with the network"):
                # from the keypoints, as infer -m <method> runs it: the safeguards' folds then re-interpolate with
                # the same interpolator (given a ready initial field they would use tps); the field is the same
                res = compensate(image, keypoints=keypoints, method=method,
                                 model=loaded, mask=brain, device=device, progress=progress)
            fields[f"net-{method}"] = res.refined_field
            if uncertainty is not None and res.uncertainty is not None:
                uncertainty[f"net-{method}"] = res.uncertainty
            if safeguards is not None:
                safeguards[f"net-{method}"] = res.safeguards
            times[f"net-{method}"] = times[method] + res.timings_s["refine with the network"]
    fields.update(refined)  # net-atlas after net-linear and net-tps
    return fields, times


def load_demo_atlas_config(atlas_config=None, *, quick: bool = False):
    """The :class:`~brainshift.simulate.atlas.AtlasConfig` of the demo's atlas.

    Args:
        atlas_config: an ``AtlasConfig``, a YAML/JSON file (:func:`~brainshift.simulate.atlas.read_atlas_config`)
            or None: :data:`QUICK_ATLAS_CONFIG` with ``quick``, else the shipped :data:`DEMO_ATLAS_CONFIG`.

    Raises:
        InputFileError: an unreadable file. BrainshiftError: invalid keys.
    """
    from brainshift.simulate.atlas import AtlasConfig, read_atlas_config

    if isinstance(atlas_config, AtlasConfig):
        return atlas_config
    if atlas_config is not None:
        return read_atlas_config(atlas_config)
    if quick:
        return AtlasConfig.from_dict(QUICK_ATLAS_CONFIG)
    from brainshift.resources import config_path

    return read_atlas_config(config_path(DEMO_ATLAS_CONFIG))


#: :class:`~brainshift.simulate.atlas.AtlasConfig` keys that only a ``"grid"`` / only a ``"sample"`` design reads
#: (:func:`brainshift.simulate.atlas.plan_solves`).
_GRID_KEYS = ("drainage_fractions", "n_ring_directions")
_SAMPLE_KEYS = ("n_solves", "drainage_range", "craniotomy_radius_range_mm", "poisson_ratio_range",
                "tumour_stiffness_ratio_range", "seed", "falx_probability", "ventricle_models",
                "ventricle_poisson_ratio_range", "gravity_models", "buoyant_weight_fraction_range",
                "reduced_integration_from_nu")


def atlas_config_record(config, *, has_tumour: bool = True) -> dict:
    """The atlas config as the demo records it (``summary.json``, ``metrics.json``): only the keys that the design
    used reads (:func:`brainshift.simulate.atlas.plan_solves`). A grid drops the sampled design's count, ranges,
    seed and ``falx_probability``; a sample drops the grid's lists, and a fixed value its range replaces
    (``craniotomy_radius_mm``, ``tumour_stiffness_ratio``), as do the ranges of ventricle and gravity models it
    does not draw; ``no_tumour_directions`` only without a tumour (grid).
    The solves actually run are the record's ``n_solves``, not the config's."""
    d = config.to_dict()
    if d["design"] == "grid":
        drop = set(_SAMPLE_KEYS) | ({"no_tumour_directions"} if has_tumour else set())
    else:
        drop = {*_GRID_KEYS, "no_tumour_directions"}
        drop |= {"craniotomy_radius_mm"} if d.get("craniotomy_radius_range_mm") is not None else set()
        drop |= {"tumour_stiffness_ratio"} if d.get("tumour_stiffness_ratio_range") is not None else set()
        drop |= {"ventricle_poisson_ratio_range"} if d.get("ventricle_models") is None else set()
        drop |= {"buoyant_weight_fraction_range"} if d.get("gravity_models") is None else set()
    return {k: v for k, v in d.items() if k not in drop}


def build_demo_atlas(folder: Path, case: DemoCase, config, *, quick: bool = False, progress: bool = False):
    """Build the subject's deformation atlas into ``folder`` (:func:`brainshift.simulate.atlas.build_atlas`) and
    load it; the solves' member files (``members/``, already reduced into the basis) are removed.

    The quick case solves in one in-process worker (no process start-up); the full demo in a ``LocalCluster``
    with a worker process per core.

    Returns:
        ``(atlas, report)``: the loaded :class:`~brainshift.atlas.basis.DeformationAtlas` and the
        :class:`~brainshift.simulate.atlas.AtlasBuildReport`.

    Raises:
        BrainshiftError: failed solves, a bad config. GeometryError: from the masks.
    """
    import shutil

    from brainshift.atlas.basis import load_atlas
    from brainshift.simulate.atlas import MEMBERS_DIR, build_atlas

    kw = {"n_workers": 1, "processes": False} if quick else {}
    report = build_atlas(folder, case.subject, config, progress=progress, **kw)
    shutil.rmtree(folder / MEMBERS_DIR, ignore_errors=True)
    # the size of what stays (the report measured the folder with the per-solve members the demo does not keep)
    report.size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    return load_atlas(folder), report


def write_case_files(out: Path, case: DemoCase, kp: CaseKeypoints, fields: dict[str, np.ndarray], best: str,
                     timer) -> tuple[list[tuple[str, str]], dict[str, Volume]]:
    """Write the demo's images, masks, keypoint tables, fields (``.h5`` float32 compressed and ``.nii.gz``) and
    the warped images (module docstring, step 6).

    Returns:
        ``(files, images)``: ``(name, description)`` of every file written, in order, and the images shown in
        the report (``preop``, ``intraop (ground truth)``, ``preop warped by <best>``).

    Convention: fields forward Lagrangian, voxel units on the case's grid.
    """
    from brainshift.io.fields import warp_image, write_field
    from brainshift.io.images import write_image
    from brainshift.io.keypoints import write_keypoint_table

    subject, gt = case.subject, case.field_vox
    image, affine = subject.image, subject.image.affine
    files: list[tuple[str, str]] = []

    def record(name: str, what: str) -> Path:
        files.append((name, what))
        return out / name

    with timer.step("write images, masks, keypoints and fields"):
        write_image(image, record("preop_t1.nii.gz", "preop T1 (MNI152 with the synthetic tumour)"))
        for name, vol in (("brain", subject.brain_mask), ("tumour", subject.tumour_mask),
                          ("cavity", case.cavity_mask)):
            write_image(vol, record(f"{name}_mask.nii.gz", f"{name} mask"))
        write_keypoint_table(record("keypoints.csv", "driving keypoints, voxel frame, x,y,z,dx,dy,dz"),
                             kp.points_vox, kp.disps_vox)
        write_keypoint_table(record("heldout_keypoints.csv", "held-out TRE targets with their true "
                                    "displacements, voxel frame"), kp.heldout_points_vox, kp.heldout_disps_vox)
        for name, fld in [("ground_truth", gt), *fields.items()]:
            label = "ground-truth field" if name == "ground_truth" else f"{name} field"
            for ext, fmt in ((".h5", "ITK DisplacementFieldTransform"), (".nii.gz", "NIfTI vector, LPS mm")):
                write_field(record(f"field_{name}{ext}", f"{label} ({fmt})"), fld, affine)
    with timer.step("warp the preop image into intraop space (ground truth and best method)"):
        emptied = Volume(np.where(case.cavity_mask.data > 0, 0.0, image.data).astype(np.float32), affine)
        intraop = warp_image(emptied, gt, affine, inverse_field=coarse_inverse_field(gt, affine))
        write_image(intraop, record("intraop_t1_ground_truth.nii.gz", "synthetic intraop image: preop with the "
                                    "cavity emptied, warped by the ground truth"))
    with timer.step("synthetic intraop MRI for brainshift register"):
        from zlib import crc32

        from brainshift.simulate.intraop import synthesize_intraop_image

        mri, _ = synthesize_intraop_image(image, gt, case.cavity_mask, crc32(subject.subject_id.encode()),
                                          brain_mask=subject.brain_mask)
        write_image(mri, record("intraop_t1.nii.gz", "synthetic intraop MRI on its own grid (fluid-filled cavity, "
                                "bias field, Rician noise): the input of `brainshift register` (make demo)"))
        warped = warp_image(image, fields[best], affine, inverse_field=coarse_inverse_field(fields[best], affine))
        write_image(warped, record(f"preop_t1_warped_{best}.nii.gz", f"preop image warped into intraop space by "
                                   f"{best} (lowest MSE)"))
    record("metrics.csv", "metrics table")
    record("metrics.json", "metrics rows and case information")
    return files, {"preop": image, "intraop (ground truth)": intraop, f"preop warped by {best}": warped}


def run_demo(out_dir: str | Path = "demo_output", *, seed: int = 0, weights: str | Path | None = None,
             n_keypoints: int = 20, quick: bool = False, resolution_mm: float = DEMO_RESOLUTION_MM,
             device: str = "cpu", verbose: bool = True, atlas: bool = True,
             atlas_config: str | Path | None = None) -> list[dict]:
    """Run the demo (module docstring) and return one metrics row per method.

    Every file is written into a staging folder inside ``out_dir`` and moved into place at the end with a
    ``summary.json`` manifest (:class:`brainshift.io.output_set.OutputSet`): a failed run leaves ``out_dir`` as
    it was, and a re-run replaces only the files an earlier run listed. The atlas is built straight into the
    staging folder (``atlas/``), so it is part of that set.

    Args:
        out_dir: output folder (created).
        seed: seed of the tumour, the simulation's draws and the keypoint draw.
        weights: network weights (our ``.safetensors`` or a published checkpoint); default: the shipped model
            (:func:`brainshift.resources.resolve_weights`), otherwise classical methods (and the atlas) only.
        n_keypoints: driving keypoints (20 as published).
        quick: the small test case (:func:`make_quick_case`) instead of the simulated MNI152 case.
        resolution_mm: element edge (mm) of the simulation.
        device: torch device of the network (``auto``, ``cpu``, ``cuda``).
        verbose: report the steps and where the outputs are on stderr (:class:`brainshift.progress.StepTimer`).
        atlas: build the subject's deformation atlas and add the methods ``atlas`` (and ``net-atlas`` with a
            model).
        atlas_config: the atlas's config file (:func:`load_demo_atlas_config`; default: the shipped
            ``atlas_demo``, or :data:`QUICK_ATLAS_CONFIG` with ``quick``).

    Returns:
        Rows (dicts) for ``none``, ``linear``, ``tps``, ``atlas`` (with ``atlas``) and, with a model,
        ``net-linear``, ``net-tps`` and ``net-atlas``, with ``method``, the keys of
        :data:`brainshift.evaluate.metrics.SCORE_KEYS`, ``kp_residual_mm`` (mean distance, mm, between a field at
        the driving keypoints and their displacements), ``time_s``, ``n_keypoints``, ``n_heldout``.

    Raises:
        InputFileError: ``weights`` or ``atlas_config`` given but missing or unreadable. BrainshiftError: a
            ``resolution_mm`` that is not a positive number (before anything is done).
        BrainshiftError: from the simulation, the atlas build, the keypoints or a bad device.
    """
    from brainshift.errors import BrainshiftError
    from brainshift.evaluate.metrics import tre_mm
    from brainshift.evaluate.run import model_record
    from brainshift.io.output_set import OutputSet
    from brainshift.progress import StepTimer
    from brainshift.resources import resolve_weights
    from brainshift.simulate.atlas import BUILD_JSON

    if not (np.isfinite(float(resolution_mm)) and float(resolution_mm) > 0):  # found only after the synthesis
        raise BrainshiftError(f"expected --resolution > 0 (mm, the simulation's element edge), got {resolution_mm}")
    t_start = time.perf_counter()
    out = Path(out_dir)
    # an output folder we may not write into (a user's file at one of the fixed names) is refused before the work;
    # the commit checks every name again
    atlas_names = tuple(f"{ATLAS_DIR}/{n}" for n in ("atlas.json", "basis.npz", BUILD_JSON)) if atlas else ()
    OutputSet(out, ("report.html", "metrics.csv", "metrics.json", "preop_t1.nii.gz", "keypoints.csv", *atlas_names))
    atlas_cfg = load_demo_atlas_config(atlas_config, quick=quick) if atlas else None
    timer = StepTimer(verbose=verbose)
    weights_path = resolve_weights(weights)
    title = "brainshift demo: " + ("quick test case" if quick else "the MNI152 brain with a simulated tumour case")
    timer.note(title)
    loaded = None
    if weights_path is None:
        timer.note(f"NOTE: {NO_MODEL_NOTE} (pass --weights FILE to refine with a network)")
    else:
        from brainshift.device import resolve_device
        from brainshift.model.checkpoint import load_weights

        with timer.step("load the network"):
            loaded = load_weights(weights_path, device=resolve_device(device))
    if quick:
        with timer.step("quick case (analytic field)"):
            case = make_quick_case(seed)
    else:
        case = make_demo_case(seed, resolution_mm=resolution_mm, progress=verbose, timer=timer)
    with timer.step("detect keypoints"):
        kp, n_detected = demo_keypoints(case, seed=seed, n_keypoints=n_keypoints)
    timer.note(f"  {n_detected} keypoints detected in brain minus tumour: {len(kp.points_vox)} drive the "
               f"interpolation, {len(kp.heldout_points_vox)} are held-out TRE targets")
    with OutputSet(out) as outputs:
        atlas_obj, atlas_record, fit = None, None, {}
        if atlas_cfg is not None:
            with timer.step(f"build the deformation atlas ({atlas_cfg.resolution_mm:g} mm elements)"):
                atlas_obj, report = build_demo_atlas(outputs.staging / ATLAS_DIR, case, atlas_cfg, quick=quick,
                                                     progress=verbose)
            timer.note("  " + report.summary().replace(str(report.folder), str(out / ATLAS_DIR)))
            atlas_record = {"folder": ATLAS_DIR, "n_solves": len(report.solved) + len(report.skipped),
                            "n_members": report.n_members, "n_components": report.n_components,
                            "retained_energy": round(float(report.retained_energy), 6),
                            "build_s": round(float(report.wall_s), 1),
                            "size_mb": round(float(report.size_mb), 2),
                            "config": atlas_config_record(atlas_cfg, has_tumour=bool(
                                case.subject.tumour_mask.data.any()))}
        unc: dict[str, np.ndarray] = {}
        guards: dict[str, dict | None] = {}
        fields, times = run_methods(case, kp, loaded, device=device, timer=timer, progress=verbose, uncertainty=unc,
                                    atlas=atlas_obj, atlas_fit=fit, safeguards=guards)
        model = None if loaded is None else model_record(weights_path, safeguards=True)
        guards = {m: guards[m] for m in fields if m in guards}  # in the methods' order
        affine = case.subject.image.affine
        with timer.step("metrics"):
            rows = [{"method": method, **score(fld, case, kp),
                     "kp_residual_mm": float(tre_mm(fld, kp.points_vox, kp.disps_vox, affine).mean()),
                     "time_s": float(times.get(method, 0.0)),
                     "n_keypoints": int(len(kp.points_vox)), "n_heldout": int(len(kp.heldout_points_vox))}
                    for method, fld in [("none", np.zeros_like(case.field_vox)), *fields.items()]]
        best = min((r for r in rows if r["method"] != "none"), key=lambda r: r["mse_mm2"])["method"]
        info = _write_demo_outputs(outputs, case, kp, fields, rows, unc, best, timer, title=title, seed=seed,
                                   quick=quick, n_detected=n_detected, model=model, safeguards=guards or None,
                                   t_start=t_start, atlas_record=atlas_record, atlas_fit=fit or None)
    report_path = out / "report.html"
    gt_max, gt_median = info["ground-truth displacement max / median (mm)"]
    timer.note(f"\nground-truth displacement: max {gt_max:.2f} mm, median {gt_median:.2f} mm (brain minus cavity); "
               f"lowest MSE: {best}")
    if loaded is None:
        timer.note(f"NOTE: {NO_MODEL_NOTE}")
    n_files = sum(1 for p in out.rglob("*") if p.is_file())
    timer.note(f"report: {report_path}\nall outputs in {out}/ ({n_files} files); total {info['total time (s)']:.1f} s")
    return rows


def _json_safe(obj):
    """``obj`` with non-finite floats replaced by None (``summary.json`` is strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_demo_outputs(outputs, case, kp, fields, rows, unc, best, timer, *, title, seed, quick, n_detected,
                        model, safeguards, t_start, atlas_record=None, atlas_fit=None):
    """Write every demo file into ``outputs``' staging folder and commit the set (see :func:`run_demo`); returns
    the case information of the report (with the step and total times)."""
    from brainshift.evaluate.case_report import write_case_report
    from brainshift.evaluate.tables import write_per_case_csv
    from brainshift.io.atomic import atomic_output

    out = outputs.staging
    files, images = write_case_files(out, case, kp, fields, best, timer)
    if atlas_record is not None:
        files.append((f"{ATLAS_DIR}/atlas.json", "the subject's deformation atlas (with basis.npz and build.json "
                      f"in {ATLAS_DIR}/): brainshift infer -m atlas --atlas {outputs.out / ATLAS_DIR}"))
    info = demo_info(case, kp, title=title, seed=seed, quick=quick, best=best, n_detected=n_detected,
                     model=model, safeguards=safeguards, files=files, atlas_record=atlas_record,
                     atlas_fit=atlas_fit)
    info["links"] = [register_link(outputs.out)]
    masks = {"brain": case.subject.brain_mask.data > 0, "tumour": case.subject.tumour_mask.data > 0,
             "cavity": case.cavity_mask.data > 0}
    with timer.step("report and figures"):
        write_per_case_csv(rows, out / "metrics.csv")
        report = write_case_report(out, image=case.subject.image, gt_field=case.field_vox, fields=fields,
                                   keypoints=kp.points_vox, heldout=kp.heldout_points_vox, rows=rows, masks=masks,
                                   info=info, images=images,
                                   uncertainty={k: v for k, v in unc.items() if k == "net-tps"} or None)
    total = time.perf_counter() - t_start
    info["step times (s)"] = {k: round(v, 2) for k, v in timer.timings_s.items()}
    info["total time (s)"] = total
    with atomic_output(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(_json_safe({"rows": rows, "info": info, "model": model, "safeguards": safeguards,
                                              "atlas": atlas_record, "atlas_fit": atlas_fit}),
                                  indent=2, default=str))
    summary_keys = ("mse_mm2", "tre_mm", "pct_jacobian_nonpositive", "kp_residual_mm", "time_s")
    with timer.step("move the outputs into place"):
        outputs.adopt_staged(recursive=True)
        outputs.commit(_json_safe({
            "command": "brainshift demo", "seed": int(seed), "quick": bool(quick), "best_method": best,
            "report": report.name, "methods": [r["method"] for r in rows],
            "metrics": {r["method"]: {k: r[k] for k in summary_keys} for r in rows},
            "model": model, "safeguards": safeguards, "atlas": atlas_record, "atlas_fit": atlas_fit}))
    return info


def register_link(out: Path) -> tuple[str, str]:
    """The report's link to :data:`REGISTER_REPORT` (``make demo`` runs ``brainshift register`` on the demo's images
    into ``register/`` after the demo): ``(relative path, description)``, saying how to make it when it is absent."""
    what = ("`brainshift register` on this case's images: keypoints detected and matched between "
            "`preop_t1.nii.gz` and the synthetic `intraop_t1.nii.gz` (images in, field out)")
    if (Path(out) / REGISTER_REPORT).is_file():
        return REGISTER_REPORT, what + "; `make demo` remakes it after the demo"
    return REGISTER_REPORT, (what + "; `make demo` writes it right after this report; if the link is broken (the "
                             "demo run alone), run `brainshift register -p preop_t1.nii.gz -t intraop_t1.nii.gz "
                             "--mask brain_mask.nii.gz -o register` in this folder")


def demo_info(case: DemoCase, kp: CaseKeypoints, *, title: str, seed: int, quick: bool, best: str,
              n_detected: int, model: dict | None, files: list[tuple[str, str]],
              safeguards: dict | None = None, atlas_record: dict | None = None, atlas_fit: dict | None = None) -> dict:
    """The case information shown in the report and saved in ``metrics.json`` (JSON-serialisable): with a network,
    one line naming the model and the safeguards' ``alpha`` / ``beta`` per refined method
    (:func:`brainshift.evaluate.run.model_line`; ``model``: :func:`brainshift.evaluate.run.model_record`,
    ``safeguards``: method -> the safeguards' record); with an atlas, one line on how it was built
    (``atlas_record``) and one on its fit (``atlas_fit``, :attr:`brainshift.compensate.Result.atlas_fit`)."""
    from brainshift.evaluate.metrics import evaluation_region
    from brainshift.evaluate.run import model_line

    image, gt = case.subject.image, case.field_vox
    region = evaluation_region(case.subject.brain_mask.data, case.cavity_mask.data)
    gt_mag = np.sqrt(((image.affine[:3, :3] @ gt[:, region]) ** 2).sum(axis=0))
    return {
        "title": title,
        "notes": ([] if model is not None else [NO_MODEL_NOTE + " (pass --weights FILE to refine with a "
                                                                "network)"])
        + (["quick test case: analytic ground-truth field on a 3 mm grid, not a simulation"] if quick else []),
        "summary": f"{len(kp.points_vox)} keypoints drive each method; errors are measured against the ground "
                   f"truth over brain minus cavity and at {len(kp.heldout_points_vox)} held-out keypoints. "
                   f"Lowest MSE: {best}.",
        "seed": int(seed),
        "grid": f"{image.shape[0]} x {image.shape[1]} x {image.shape[2]}, spacing "
                + " x ".join(f"{s:g}" for s in image.spacing) + " mm",
        **case.info,
        "ground-truth displacement max / median (mm)": [float(gt_mag.max()), float(np.median(gt_mag))],
        "keypoints detected / driving / held-out": [n_detected, len(kp.points_vox), len(kp.heldout_points_vox)],
        "model": model_line(model, {m: (float(r["alpha"]), float(r["beta"])) for m, r in (safeguards or {}).items()
                                    if r}),
        **_atlas_info(atlas_record, atlas_fit),
        "files": files,
    }


def _atlas_info(record: dict | None, fit: dict | None) -> dict:
    """Report lines on the demo's atlas: its build and its fit to the keypoints (empty without an atlas)."""
    if record is None:
        return {}
    cfg = record["config"]
    if cfg.get("design", "grid") == "sample":
        lo, hi = cfg["drainage_range"]
        spans = (f"sampled: drainage {lo:g}-{hi:g}; gravity within {cfg['gravity_cone_deg']:g} deg of the "
                 f"approach")
    else:
        spans = (f"drainage {', '.join(f'{v:g}' for v in cfg['drainage_fractions'])}; gravity: the approach and "
                 f"{cfg['n_ring_directions']} directions tilted {cfg['gravity_cone_deg']:g} deg")
    out = {"atlas": f"{record['n_solves']} solves at {cfg['resolution_mm']:g} mm (contact "
                    f"{', '.join(cfg['contact_models'])}; {spans}), "
                    f"{record['n_members']} members -> {record['n_components']} components "
                    f"({100 * record['retained_energy']:.2f} % of the variance), built in {record['build_s']:.0f} s"}
    if fit:
        res = fit.get("fit_residual_mm", {})
        top = (fit.get("member_weights") or [{}])[0]
        closest = ", ".join(f"{k} {v}" for k, v in top.items() if k in ("contact_model", "drainage_fraction",
                                                                       "gravity_tilt_deg", "resection",
                                                                       "shear_modulus_pa"))
        rule = {"evidence": "the marginal likelihood", "cv": "cross-validation"}.get(fit.get("tau_rule"),
                                                                                   "cross-validation")
        kern = fit.get("kernel")
        if kern and kern.get("hyper_rule") == "average":
            mean_amp = (f" with its mean's amplitude fitted ({kern.get('mean_scale', 1.0):.2f})"
                        if str(fit.get("prior", "")).startswith("scaled-") else "")
            held = (f", free and held to no motion through the skull ({kern['contact_share']:.0%} of the evidence on "
                    f"the held prior, {kern.get('skull_points', 0)} skull points)" if "contact_share" in kern else "")
            head = (f"atlas prior{mean_amp} plus a Matern kernel{held}, the field averaged over the hyperparameters by "
                    f"their marginal likelihood (most likely: atlas scale {kern['atlas_scale']:g}, kernel amplitude "
                    f"{kern['eta_mm']:.2g} mm, length {kern['length_mm']:g} mm; noise tau "
                    f"{fit.get('tau_mm2', float('nan')):.3g} mm^2)")
        else:
            prior = (f"atlas prior x {kern['atlas_scale']:g} plus a Matern kernel (amplitude {kern['eta_mm']:.2g} "
                     f"mm, length {kern['length_mm']:g} mm), " if kern else "")
            head = f"{prior}noise tau {fit.get('tau_mm2', float('nan')):.3g} mm^2 chosen by {rule}"
        out["atlas fit"] = (f"{head}; residual at the keypoints before the spline: mean "
                            f"{res.get('mean', float('nan')):.2f} mm, max {res.get('max', float('nan')):.2f} mm"
                            + (f"; closest member: {closest}" if closest else ""))
    return out


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of demo metrics rows (MSE, mean / P95 error, TRE, % det J <= 0, mean keypoint
    residual, time); a row without ``kp_residual_mm`` shows ``-`` there."""
    head = (f"{'method':<11} {'MSE mm^2':>9} {'mean mm':>8} {'p95 mm':>7} {'TRE mm':>7} {'detJ<=0 %':>9} "
            f"{'kp res mm':>9} {'time s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        kp_res = f"{r['kp_residual_mm']:>9.3f}" if "kp_residual_mm" in r else f"{'-':>9}"
        lines.append(f"{r['method']:<11} {r['mse_mm2']:>9.3f} {r['mae_mm']:>8.3f} {r['p95_mm']:>7.3f} "
                     f"{r['tre_mm']:>7.3f} {r['pct_jacobian_nonpositive']:>9.4f} {kp_res} {r['time_s']:>7.3f}")
    return "\n".join(lines)
