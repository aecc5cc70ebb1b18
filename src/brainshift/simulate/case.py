"""One simulated brain-shift case: configuration, random draws, and the deterministic solve.

``draw_case_parameters`` makes every random choice (gravity perturbation, drained CSF level) from a subject
and a :class:`SimulationConfig`; ``simulate_case`` is deterministic given the subject, the config and those
:class:`CaseParameters` (TorchIO's split of random draws from deterministic work).

Pipeline of ``simulate_case`` (model choices are documented in the modules named):

1. Mesh the brain (:mod:`.mesh`), per-element Lame parameters by tissue fraction (:mod:`.materials`).
2. Gravity along the surgical approach with CSF drainage, craniotomy, brainstem support (:mod:`.loads`).
3. Equilibrium with the tumour present under gravity and frictionless skull contact (:mod:`.contact`,
   :mod:`.fem`), or the neo-Hookean model (:mod:`.hyperelastic`).
4. Resection (``config.resection``): the nodal forces the tumour elements exert on the interface nodes,
   ``r = K_T u_1 - f_T``, are recorded; the tumour elements (tumour fraction >= ``tumour_element_fraction``)
   are removed with their orphan nodes and any piece of tissue they cut off; the recorded forces are released
   (applied with opposite sign, i.e. the remaining body no longer receives them) and the remaining mesh relaxes
   from the deformed state ``u_1`` to a new equilibrium with the same gravity and contact treatment. In linear
   elasticity this is the increment ``K_R du = r`` superposed on ``u_1`` (solved for the total displacement so
   the skull constraint applies to the total).
5. Rasterise the total nodal displacement of every preop point to the image grid (:mod:`.rasterise`); the
   cavity's field is extrapolated from the cavity wall (it is masked out by evaluation).

Convention: ``SimulationResult.field_vox`` is float32 ``(3, I, J, K)`` on ``subject.image``'s grid, forward
Lagrangian (preop voxel ``p`` moves to ``p + u(p)``), voxel units along ``i, j, k``, zero outside the brain.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, SolverError
from brainshift.simulate.dataset import Subject
from brainshift.simulate.mesh import HexMesh
from brainshift.volume import Volume


@dataclass
class SimulationConfig:
    """Deterministic settings of the simulator (JSON-serialisable with :meth:`to_dict`).

    Attributes:
        resolution_mm: hexahedral element edge (mm); 3.0 default, 2.0 finer.
        material: ``"linear"`` (small-strain isotropic elasticity) or ``"neo-hookean"`` (compressible,
            total Lagrangian, Newton).
        poisson_ratio: nu of parenchyma and tumour (dimensionless).
        ventricle_model: ``"fluid"`` (CSF-filled ventricles keep their volume: facts' shear modulus, the
            parenchyma's bulk modulus; default, mesh-convergent) or ``"compressible"`` (the facts' compressible
            solid, nu = ``ventricle_poisson_ratio``); see :mod:`brainshift.simulate.materials`.
        ventricle_poisson_ratio: nu of the compressible ventricles (dimensionless; ``"compressible"`` only).
        tumour_stiffness_ratio: tumour / parenchyma shear modulus (3 in the facts).
        volumetric_integration: ``"full"`` (2x2x2 Gauss) or ``"reduced"`` (1-point volumetric part).
        max_gravity_angle_deg: half-angle (degrees) of the cap in which gravity is perturbed around the
            approach direction.
        drainage_fraction_range: drained CSF level as a fraction of the brain's extent along gravity, measured
            from its highest point: the level is drawn uniformly in this range (0 = no drainage, 1 = all
            tissue carries its weight).
        buoyant_weight_fraction: fraction of its weight that tissue below the CSF level still carries
            (``(rho_tissue - rho_csf) / rho_tissue``, 0 for the facts' equal densities).
        craniotomy_radius_mm: surface nodes within this distance (mm) of the entry point have no skull.
        resection: remove the tumour and relax (step 4) or stop at the gravity equilibrium.
        tumour_element_fraction: an element is resected if its tumour fraction is at least this.
        brainstem_fixation_depth_mm: nodes within this height (mm) above the most inferior node are fixed.
        min_brain_fraction: an element is meshed if at least this fraction of it is brain.
        normal_smoothing_mm: Gaussian sigma (mm) of the occupancy smoothing that gives surface normals.
        solver_rtol: relative residual tolerance of the final linear solve of each equilibrium (1e-6: on the
            MNI brain at 3 mm the nodal displacements then differ from a 1e-10 solve by at most 1.3e-6 mm, 3e-7
            of the maximum; the float32 field stores ~6e-8 relative).
        solver_maxiter: maximum CG iterations per linear solve.
        max_contact_iterations: maximum active-set iterations per equilibrium.
        coarse_start_min_elements: linear model with at least this many elements: the contact active sets of
            the gravity equilibrium and of the resection start from the same case solved at twice the element
            size (an equilibrium within the same contact tolerances, fewer fine solves and AMG setups; see
            ``_coarse_active_set``); 0 disables it.
        contact_gap_tolerance_mm: outward motion (mm) beyond which a free surface node is put in contact.
        contact_force_tolerance: tensile reaction, relative to the largest nodal load, beyond which a node
            is released.
        contact_settle_fraction: the contact active set also counts as settled when at most this fraction of
            the contact nodes would still change state; they are held in contact (0, the default: exact
            active-set convergence; the deformation atlas's members use 0.002, see
            :class:`brainshift.simulate.contact.ContactSolver`).
        newton_load_steps: load steps of the neo-Hookean solve.
        newton_rtol: Newton convergence: residual norm relative to the load norm.
        newton_max_iterations: Newton iterations per load step.
        contact_model: skull contact, ``"unilateral"`` (frictionless, may separate; default), ``"bilateral"``
            (sliding, no separation), ``"no_slip"`` (no sliding while in contact) or ``"tied"`` (held: no
            sliding, no separation); see
            :mod:`brainshift.simulate.contact`.
        shear_modulus_pa: parenchyma shear modulus (Pa; 842 in the facts). The tumour's is
            ``tumour_stiffness_ratio`` times it.
        white_grey_stiffness_ratio: white / grey matter stiffness ratio from the T1 intensity
            (:func:`brainshift.simulate.materials.grey_white_scale`); 1 = homogeneous parenchyma.
        falx: hold the midsagittal nodes above the ventricles on their plane (falx cerebri as a fixed plane,
            :func:`brainshift.simulate.loads.falx_nodes`).
        family: a :class:`~brainshift.simulate.family.ModelFamily` as a dict, or None. When given, every case
            draws its modelling choices from it (:func:`draw_case_parameters`, recorded in ``params.model``),
            overriding the fields above for that case.
    """

    resolution_mm: float = 3.0
    material: str = "linear"
    poisson_ratio: float = 0.45
    ventricle_model: str = "fluid"
    ventricle_poisson_ratio: float = 0.1
    tumour_stiffness_ratio: float = 3.0
    volumetric_integration: str = "full"
    max_gravity_angle_deg: float = 30.0
    drainage_fraction_range: tuple[float, float] = (0.2, 0.6)
    buoyant_weight_fraction: float = 0.0
    craniotomy_radius_mm: float = 25.0
    resection: bool = True
    tumour_element_fraction: float = 0.5
    brainstem_fixation_depth_mm: float = 5.0
    min_brain_fraction: float = 0.5
    normal_smoothing_mm: float = 4.0
    solver_rtol: float = 1e-6
    solver_maxiter: int = 500
    max_contact_iterations: int = 30
    coarse_start_min_elements: int = 20000
    contact_gap_tolerance_mm: float = 1e-3
    contact_force_tolerance: float = 1e-3
    newton_load_steps: int = 4
    newton_rtol: float = 1e-6
    newton_max_iterations: int = 25
    contact_model: str = "unilateral"
    shear_modulus_pa: float = 842.0
    white_grey_stiffness_ratio: float = 1.0
    falx: bool = False
    family: dict | None = None
    contact_settle_fraction: float = 0.0

    def __post_init__(self) -> None:
        self.drainage_fraction_range = tuple(float(x) for x in self.drainage_fraction_range)  # type: ignore
        if self.family is not None:
            from brainshift.simulate.family import ModelFamily

            self.family = ModelFamily.from_dict(self.family).to_dict()
        self.validate()

    def with_model(self, model: dict) -> SimulationConfig:
        """This config with a drawn model's overrides (:func:`brainshift.simulate.family.draw_model`) applied
        and no family (the per-case, deterministic configuration)."""
        from brainshift.simulate.family import RECORD_ONLY

        return dataclasses.replace(self, family=None, **{k: v for k, v in model.items() if k not in RECORD_ONLY})

    def validate(self) -> None:
        """Raise :class:`BrainshiftError` naming the first bad field."""
        if self.material not in ("linear", "neo-hookean"):
            raise BrainshiftError(f"expected material 'linear' or 'neo-hookean', got {self.material!r}")
        if self.ventricle_model not in ("fluid", "compressible"):
            raise BrainshiftError(f"expected ventricle_model 'fluid' or 'compressible', got {self.ventricle_model!r}")
        if self.volumetric_integration not in ("full", "reduced"):
            raise BrainshiftError(f"expected volumetric_integration 'full' or 'reduced', got "
                                  f"{self.volumetric_integration!r}")
        if not self.resolution_mm > 0:
            raise BrainshiftError(f"expected resolution_mm > 0, got {self.resolution_mm}")
        for name in ("poisson_ratio", "ventricle_poisson_ratio"):
            v = getattr(self, name)
            if not -1.0 < v < 0.5:
                raise BrainshiftError(f"expected {name} in (-1, 0.5), got {v}")
        lo, hi = self.drainage_fraction_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise BrainshiftError(f"expected 0 <= drainage_fraction_range[0] <= [1] <= 1, got {(lo, hi)}")
        if not 0.0 <= self.max_gravity_angle_deg <= 180.0:
            raise BrainshiftError(f"expected max_gravity_angle_deg in [0, 180], got {self.max_gravity_angle_deg}")
        if not 0.0 <= self.buoyant_weight_fraction <= 1.0:
            raise BrainshiftError(f"expected buoyant_weight_fraction in [0, 1], got {self.buoyant_weight_fraction}")
        if self.craniotomy_radius_mm < 0 or self.brainstem_fixation_depth_mm < 0:
            raise BrainshiftError("expected non-negative craniotomy_radius_mm and brainstem_fixation_depth_mm, got "
                                  f"{self.craniotomy_radius_mm}, {self.brainstem_fixation_depth_mm}")
        from brainshift.simulate.contact import CONTACT_MODELS

        if self.contact_model not in CONTACT_MODELS:
            raise BrainshiftError(f"expected contact_model in {list(CONTACT_MODELS)}, got {self.contact_model!r}")
        if not self.shear_modulus_pa > 0 or not self.white_grey_stiffness_ratio > 0:
            raise BrainshiftError("expected shear_modulus_pa > 0 and white_grey_stiffness_ratio > 0, got "
                                  f"{self.shear_modulus_pa}, {self.white_grey_stiffness_ratio}")
        if self.solver_maxiter < 1 or self.max_contact_iterations < 1 or self.newton_load_steps < 1:
            raise BrainshiftError("expected solver_maxiter, max_contact_iterations and newton_load_steps >= 1")
        if not self.tumour_stiffness_ratio > 0:
            raise BrainshiftError(f"expected tumour_stiffness_ratio > 0, got {self.tumour_stiffness_ratio}")
        for name in ("tumour_element_fraction", "min_brain_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise BrainshiftError(f"expected {name} in (0, 1], got {v}")
        for name in ("solver_rtol", "newton_rtol"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise BrainshiftError(f"expected {name} in (0, 1), got {v}")
        for name in ("contact_gap_tolerance_mm", "contact_force_tolerance"):
            v = getattr(self, name)
            if not v > 0:
                raise BrainshiftError(f"expected {name} > 0, got {v}")
        if self.normal_smoothing_mm < 0 or self.coarse_start_min_elements < 0:
            raise BrainshiftError("expected non-negative normal_smoothing_mm and coarse_start_min_elements, got "
                                  f"{self.normal_smoothing_mm}, {self.coarse_start_min_elements}")
        if self.newton_max_iterations < 1:
            raise BrainshiftError(f"expected newton_max_iterations >= 1, got {self.newton_max_iterations}")
        if not 0.0 <= self.contact_settle_fraction < 0.05:
            raise BrainshiftError(f"expected contact_settle_fraction in [0, 0.05), got {self.contact_settle_fraction}")

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field."""
        d = dataclasses.asdict(self)
        d["drainage_fraction_range"] = list(self.drainage_fraction_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SimulationConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise :class:`BrainshiftError`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise BrainshiftError(f"expected simulation config keys among {sorted(names)}, got unknown {sorted(bad)}")
        from brainshift.simulate.config_values import check_field_values

        return cls(**check_field_values(d, cls, "the simulation config"))


@dataclass
class CaseParameters:
    """The random draws of one case (all RAS mm / unit vectors / degrees).

    Attributes:
        gravity_direction_ras: ``(3,)`` unit vector of gravitational acceleration (RAS).
        entry_point_ras: ``(3,)`` craniotomy centre on the brain surface (mm).
        tumour_centre_ras: ``(3,)`` tumour centroid (mm).
        approach_direction_ras: ``(3,)`` unit vector entry -> tumour centre (before perturbation).
        gravity_perturbation_deg: angle between gravity and the approach direction.
        drainage_fraction: drawn fraction of the brain's extent along gravity that is drained.
        drainage_level_mm: depth of the CSF level below the highest brain point along gravity (mm).
        seed: the integer seed of the draw, if one was given.
        model: the drawn modelling choices (:func:`brainshift.simulate.family.draw_model`), empty when the
            config has no family (the config's own choices apply).
    """

    gravity_direction_ras: np.ndarray
    entry_point_ras: np.ndarray
    tumour_centre_ras: np.ndarray
    approach_direction_ras: np.ndarray
    gravity_perturbation_deg: float
    drainage_fraction: float
    drainage_level_mm: float
    seed: int | None = None
    model: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = np.asarray(v, dtype=np.float64).tolist() if isinstance(v, np.ndarray) else v
        out["model"] = dict(self.model)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CaseParameters:
        """Inverse of :meth:`to_dict`."""
        vec = ("gravity_direction_ras", "entry_point_ras", "tumour_centre_ras", "approach_direction_ras")
        return cls(**{k: (np.asarray(v, dtype=np.float64) if k in vec else v) for k, v in d.items()})


@dataclass
class SimulationResult:
    """Output of :func:`simulate_case`.

    Attributes:
        field_vox: float32 ``(3, I, J, K)`` on the subject image grid. Convention: forward Lagrangian, voxel
            units along ``i, j, k``, zero outside the brain.
        cavity_mask: label Volume, the resected region on the preop grid (empty without resection).
        meta: every config and parameter value, seed, solver iterations / residuals, contact iterations,
            times (s), mesh size, max / median displacement (mm).
        mesh: the final mesh (after resection) for export.
        nodal_displacement_mm: ``(mesh.n_nodes, 3)`` total displacement of the mesh nodes, RAS mm.
        preop_mesh: the mesh before resection (the node numbering of ``stage_displacements_local_mm``).
        stage_displacements_local_mm: ``{"gravity": u1, "final": u}``, each ``(preop_mesh.n_nodes, 3)`` in the
            mesh's local frame (voxel axes, mm): the gravity equilibrium with the tumour in place, and the final
            state (after resection when there is one; equal to ``"gravity"`` otherwise). In ``"final"`` the
            resected nodes carry their gravity-stage value. Used by the deformation atlas
            (:mod:`brainshift.simulate.atlas`), which takes both states from one solve. With
            ``response_directions_ras`` also ``"gravity_responses"`` and ``"final_responses"``, ``(q, n, 3)``.
    """

    field_vox: np.ndarray
    cavity_mask: Volume
    meta: dict
    mesh: HexMesh
    nodal_displacement_mm: np.ndarray
    preop_mesh: HexMesh | None = None
    stage_displacements_local_mm: dict = dataclasses.field(default_factory=dict)


def _brain_region(subject: Subject) -> np.ndarray:
    return (np.asarray(subject.brain_mask.data) > 0) | (np.asarray(subject.tumour_mask.data) > 0)


def check_subject(subject: Subject) -> None:
    """Raise :class:`GeometryError` unless every mask of ``subject`` is on its image's grid."""
    for name in ("brain_mask", "tumour_mask", "ventricles_mask"):
        vol = getattr(subject, name)
        if not vol.same_grid(subject.image):
            raise GeometryError(f"expected subject.{name} on the image grid {subject.image.shape}, got "
                                f"{vol.shape} with another affine" if vol.shape == subject.image.shape else
                                f"expected subject.{name} on the image grid {subject.image.shape}, got {vol.shape}")


def draw_case_parameters(subject: Subject, config: SimulationConfig, rng: np.random.Generator | int | None
                         ) -> CaseParameters:
    """Draw the random parameters of one case.

    Args:
        subject: the subject (brain and tumour masks are used).
        config: the configuration (angle and drainage ranges).
        rng: a NumPy Generator, or an integer seed (recorded in the parameters), or None (fresh entropy).

    With ``config.family`` set, the modelling choices are drawn first (``params.model``) and the geometric
    draws use the resulting per-case configuration (its gravity cone and drainage level).

    Returns:
        :class:`CaseParameters`.

    Raises:
        GeometryError: empty tumour or brain mask, masks off the image grid.
    """
    from brainshift.simulate import loads

    check_subject(subject)
    seed = None
    if not isinstance(rng, np.random.Generator):
        seed = None if rng is None else int(rng)
        rng = np.random.default_rng(seed)
    model: dict = {}
    if config.family is not None:
        from brainshift.simulate.family import ModelFamily, draw_model

        model = draw_model(ModelFamily.from_dict(config.family), rng)
        config = config.with_model(model)
    centre = loads.tumour_centre_ras(subject.tumour_mask)
    entry = loads.entry_point_ras(subject.brain_mask, subject.tumour_mask, centre)
    approach = centre - entry
    if np.linalg.norm(approach) < 1e-6:
        raise GeometryError("expected the tumour centre inside the brain, got it on the surface entry point")
    approach = approach / np.linalg.norm(approach)
    gravity, angle = loads.perturb_direction(approach, config.max_gravity_angle_deg, rng)
    frac = float(rng.uniform(*config.drainage_fraction_range))
    region = Volume(_brain_region(subject).astype(np.uint8), subject.brain_mask.affine, "label")
    _, extent = loads.brain_depth_range_mm(region, gravity)
    return CaseParameters(gravity_direction_ras=gravity, entry_point_ras=entry, tumour_centre_ras=centre,
                          approach_direction_ras=approach, gravity_perturbation_deg=angle, drainage_fraction=frac,
                          drainage_level_mm=frac * extent, seed=seed, model=model)


@dataclass
class _Problem:
    """Everything the equilibrium solves of one case need (node numbering of the preop mesh)."""

    mesh: HexMesh
    mu: np.ndarray  # (n_elements,) Pa
    lam: np.ndarray  # (n_elements,) Pa
    force_density: np.ndarray  # (n_elements, 3) body force per volume, Pa/mm, local frame
    contact_nodes: np.ndarray
    normals: np.ndarray
    fixed_nodes: np.ndarray
    gravity_local: np.ndarray
    tumour_elements: np.ndarray  # (n_elements,) bool
    removed_elements: np.ndarray  # (n_elements,) bool: tumour + pieces it cut off (resection only)
    removed_nodes: np.ndarray  # node ids that disappear with them
    plane_nodes: np.ndarray  # falx nodes held on the midsagittal plane (empty without a falx)
    plane_normal: np.ndarray  # (3,) the plane's normal, local frame


def simulate_case(subject: Subject, config: SimulationConfig, params: CaseParameters, *,
                  progress: bool = False, response_directions_ras: np.ndarray | None = None,
                  response_rtol: float | None = None) -> SimulationResult:
    """Simulate one brain-shift case (deterministic given its inputs).

    Args:
        subject: preop image and masks (one grid).
        config: :class:`SimulationConfig`.
        params: :class:`CaseParameters` from :func:`draw_case_parameters`.
        progress: print a line per stage and contact iteration.
        response_directions_ras: optional ``(q, 3)`` directions (RAS) of further gravity loads whose linear
            responses are also computed, each stage with its converged contact state held
            (:meth:`~brainshift.simulate.contact.ContactSolver.solve_held`): the same weight distribution (drained
            level, buoyancy) pointing along each direction instead of gravity. Linear material only. They are
            returned in ``stage_displacements_local_mm`` as ``"gravity_responses"`` and ``"final_responses"``
            (``(q, n_nodes, 3)`` each) and change nothing else. Used by the deformation atlas
            (:mod:`brainshift.simulate.atlas`) for members with tilted gravity.
        response_rtol: CG tolerance of those responses (default: ``config.solver_rtol``).

    Returns:
        :class:`SimulationResult`.

    Convention: ``field_vox`` forward Lagrangian, voxel units along ``i, j, k`` of ``subject.image``, zero outside
    the brain.

    Raises:
        GeometryError: masks off the image grid, empty brain, sheared affine.
        SolverError: under-constrained model, unconverged solve or contact iteration.
    """
    from brainshift.simulate import loads
    from brainshift.simulate import mesh as meshmod
    from brainshift.simulate.rasterise import rasterise_displacement, rasterise_elements

    if params.model:
        config = config.with_model(params.model)
    config.validate()
    check_subject(subject)
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    from brainshift.progress import StepTimer

    notes = StepTimer(verbose=progress)

    def _log(msg: str) -> None:
        notes.note(f"[simulate {time.perf_counter() - t_start:6.1f} s] {msg}")

    t0 = time.perf_counter()
    g_ras = np.asarray(params.gravity_direction_ras, dtype=np.float64)
    g_ras = g_ras / np.linalg.norm(g_ras)
    region_vol = Volume(_brain_region(subject).astype(np.uint8), subject.brain_mask.affine, "label")
    top_mm, _ = loads.brain_depth_range_mm(region_vol, g_ras)
    problem, craniotomy = _setup_problem(subject, config, params, config.resolution_mm, top_mm, config.resection)
    mesh, contact, fixed = problem.mesh, problem.contact_nodes, problem.fixed_nodes
    rot = mesh.rotation
    do_resect = bool(problem.removed_elements.any())
    removed = problem.removed_elements
    final_mesh, old_nodes = mesh, np.arange(mesh.n_nodes)
    if do_resect:
        final_mesh, _, old_nodes = meshmod.remove_elements(mesh, problem.tumour_elements)
    times["mesh_s"] = time.perf_counter() - t0
    _log(f"mesh: {mesh.n_elements} elements, {mesh.n_nodes} nodes, {contact.size} contact, {craniotomy.size} "
         f"craniotomy, {fixed.size} fixed nodes")
    active0, coarse_info = None, "off"
    if config.material == "linear" and 0 < config.coarse_start_min_elements <= mesh.n_elements:
        t0 = time.perf_counter()
        active0, coarse_info = _coarse_active_set(subject, config, params, top_mm, problem)
        times["coarse_start_s"] = time.perf_counter() - t0
        _log(f"coarse start: {coarse_info}")
    solver_log: list[dict] = []
    stages: dict[str, np.ndarray] = {}
    responses: dict[str, np.ndarray] = {}
    tilt_loads = None
    if response_directions_ras is not None and len(response_directions_ras):
        if config.material != "linear":
            raise SolverError(f"expected a linear material for gravity responses, got {config.material!r}")
        dirs = np.asarray(response_directions_ras, dtype=np.float64).reshape(-1, 3)
        dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
        weight = problem.force_density @ problem.gravity_local  # (n_elements,) weight per volume, Pa/mm
        tilt_loads = [weight[:, None] * (rot.T @ d)[None, :] for d in dirs]
    if config.material == "linear":
        u_full, interface_force = _linear_case(problem, config, do_resect, times, solver_log, _log, progress,
                                               active0=active0, stages=stages, tilt_loads=tilt_loads,
                                               responses=responses, response_rtol=response_rtol)
    else:
        from brainshift.simulate.hyperelastic import neo_hookean_case

        u_full, interface_force = neo_hookean_case(problem, config, do_resect, times, solver_log, _log, progress,
                                                   stages=stages)
    u_gravity = np.array(stages.get("gravity", u_full), dtype=np.float64)
    u_total = np.array(u_full, dtype=np.float64)
    if do_resect:
        u_total[problem.removed_nodes] = u_gravity[problem.removed_nodes]
    u_final = u_full[old_nodes]
    if tilt_loads is not None:
        r_grav = responses["gravity"]
        r_final = np.array(responses.get("final", r_grav), dtype=np.float64)
        if do_resect:
            r_final[:, problem.removed_nodes] = r_grav[:, problem.removed_nodes]
        responses = {"gravity_responses": r_grav, "final_responses": r_final}

    t0 = time.perf_counter()
    region = _brain_region(subject)
    field_vox = rasterise_displacement(final_mesh, u_final, region)
    cavity = np.zeros(region.shape, dtype=bool)
    if removed.any():
        cavity = (rasterise_elements(mesh, removed) & region) | (np.asarray(subject.tumour_mask.data) > 0)
    times["rasterise_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start
    spacing = mesh.spacing_mm
    mag = np.sqrt(sum((field_vox[c] * spacing[c]) ** 2 for c in range(3)))
    inside = region & ~cavity
    vals = mag[inside] if inside.any() else np.zeros(1)
    nodal_ras = u_final @ rot.T
    meta = {
        "config": config.to_dict(),
        "params": params.to_dict(),
        "seed": params.seed,
        "n_nodes": final_mesh.n_nodes,
        "n_elements": final_mesh.n_elements,
        "n_nodes_preop": mesh.n_nodes,
        "n_elements_preop": mesh.n_elements,
        "n_contact_nodes": int(contact.size),
        "n_craniotomy_nodes": int(craniotomy.size),
        "n_fixed_nodes": int(fixed.size),
        "n_falx_nodes": int(problem.plane_nodes.size),
        "n_resected_elements": int(removed.sum()),
        "interface_force_n": interface_force,
        "coarse_start": coarse_info,
        "solves": solver_log,
        "times_s": times,
        "max_displacement_mm": float(vals.max()),
        "median_displacement_mm": float(np.median(vals)),
        "max_nodal_displacement_mm": float(np.linalg.norm(u_final, axis=1).max()),
        "mesh_info": mesh.info,
    }
    _log(f"done: max {meta['max_displacement_mm']:.2f} mm, median {meta['median_displacement_mm']:.2f} mm")
    return SimulationResult(field_vox=field_vox, cavity_mask=Volume(cavity.astype(np.uint8), subject.image.affine,
                                                                     "label"),
                            meta=meta, mesh=final_mesh, nodal_displacement_mm=nodal_ras, preop_mesh=mesh,
                            stage_displacements_local_mm={"gravity": u_gravity, "final": u_total, **responses})


def _setup_problem(subject: Subject, config: SimulationConfig, params: CaseParameters, resolution_mm: float,
                   top_mm: float, resection: bool) -> tuple[_Problem, np.ndarray]:
    """Mesh, materials, loads and supports at ``resolution_mm``; returns the problem and the craniotomy nodes."""
    from brainshift.simulate import loads, materials
    from brainshift.simulate import mesh as meshmod

    mesh = meshmod.build_mesh(subject.brain_mask, subject.tumour_mask, subject.ventricles_mask,
                              resolution_mm=resolution_mm, min_brain_fraction=config.min_brain_fraction)
    meshmod.check_mesh(mesh)
    scale = None
    if config.white_grey_stiffness_ratio != 1.0:
        scale = materials.grey_white_scale(_intensity_at(subject.image, mesh.element_centres_ras()),
                                           config.white_grey_stiffness_ratio)
    mu, lam = materials.element_lame(mesh.fractions, config.poisson_ratio, config.ventricle_poisson_ratio,
                                     config.tumour_stiffness_ratio, config.ventricle_model,
                                     shear_modulus_pa=config.shear_modulus_pa, parenchyma_scale=scale)
    g_ras = np.asarray(params.gravity_direction_ras, dtype=np.float64)
    g_ras = g_ras / np.linalg.norm(g_ras)
    g_loc = mesh.rotation.T @ g_ras
    weight = loads.weight_fraction_per_element(mesh.element_centres_ras(), mesh.element_size_mm, g_ras, top_mm,
                                               params.drainage_level_mm, config.buoyant_weight_fraction)
    nodes_ras = mesh.nodes_ras
    outer = meshmod.outer_surface_nodes(mesh)
    fixed = loads.brainstem_nodes(nodes_ras, config.brainstem_fixation_depth_mm)
    dist = np.linalg.norm(nodes_ras[outer] - np.asarray(params.entry_point_ras), axis=1)
    craniotomy = outer[dist <= config.craniotomy_radius_mm]
    contact = np.setdiff1d(outer, np.union1d(craniotomy, fixed))
    normals = meshmod.surface_normals(mesh, contact, config.normal_smoothing_mm)
    rho_g = materials.weight_density_pa_per_mm()
    tumour_el = mesh.fractions[:, 1] >= config.tumour_element_fraction
    removed = np.zeros(mesh.n_elements, dtype=bool)
    removed_nodes = np.zeros(0, dtype=np.int64)
    if resection and tumour_el.any():
        _, kept_el, old_nodes = meshmod.remove_elements(mesh, tumour_el)
        removed = np.ones(mesh.n_elements, dtype=bool)
        removed[kept_el] = False
        removed_nodes = np.setdiff1d(np.arange(mesh.n_nodes), old_nodes)
    plane = np.zeros(0, dtype=np.int64)
    plane_normal = mesh.rotation.T @ np.array([1.0, 0.0, 0.0])
    if config.falx:
        midline_x, vent_top = _midline_and_ventricle_top(subject)
        plane = np.setdiff1d(loads.falx_nodes(nodes_ras, mesh.element_size_mm, midline_x, vent_top), fixed)
    problem = _Problem(mesh=mesh, mu=mu, lam=lam, force_density=(rho_g * weight)[:, None] * g_loc[None, :],
                       contact_nodes=contact, normals=normals, fixed_nodes=fixed, gravity_local=g_loc,
                       tumour_elements=tumour_el, removed_elements=removed, removed_nodes=removed_nodes,
                       plane_nodes=plane, plane_normal=plane_normal)
    return problem, craniotomy


def _intensity_at(image: Volume, points_ras: np.ndarray) -> np.ndarray:
    """Trilinear image intensity at RAS points (``(n,)``; 0 outside the image)."""
    from scipy.ndimage import map_coordinates

    vox = (np.linalg.inv(image.affine) @ np.c_[points_ras, np.ones(len(points_ras))].T)[:3]
    return map_coordinates(np.asarray(image.data, dtype=np.float32), vox, order=1, mode="constant", cval=0.0)


def _midline_and_ventricle_top(subject: Subject) -> tuple[float, float]:
    """RAS x of the midsagittal plane (the brain's centroid) and RAS z of the top of the ventricles (the brain's
    centroid height when there are no ventricles)."""
    from brainshift.geometry import voxel_to_ras

    brain = voxel_to_ras(np.argwhere(_brain_region(subject)).astype(np.float64), subject.image.affine)
    vent_idx = np.argwhere(np.asarray(subject.ventricles_mask.data) > 0)
    top = (float(voxel_to_ras(vent_idx.astype(np.float64), subject.image.affine)[:, 2].max()) if len(vent_idx)
           else float(brain[:, 2].mean()))
    return float(brain[:, 0].mean()), top


def _contact_settings(pb: _Problem, config: SimulationConfig) -> dict:
    """Keyword arguments of the contact solvers for this problem's contact model and falx."""
    return {"contact_model": config.contact_model, "plane_nodes": pb.plane_nodes, "plane_normal": pb.plane_normal,
            "settle_fraction": config.contact_settle_fraction}


def _coarse_active_set(subject: Subject, config: SimulationConfig, params: CaseParameters, top_mm: float,
                       fine: _Problem) -> tuple[dict | None, str]:
    """Initial skull-contact active sets of the gravity equilibrium and of the resection, from the same case at
    twice the element size.

    The coarse case (gravity equilibrium with the tumour, then the resection when the fine case resects; loose
    tolerance) is solved with the same contact method by :func:`_linear_case`; every fine contact node takes
    the state of the nearest coarse contact node in each stage, and is active (in contact) when no coarse
    contact node lies within one coarse element (e.g. at the rim of the craniotomy). The fine active-set
    iterations then only correct these guesses (each active set is checked on the fine solution), so the
    result is an equilibrium within the same contact tolerances as from "all in contact" (gravity stage) or
    from the gravity stage's set (resection): for frictionless contact the gravity stage agrees to the gap
    tolerance, the resection to ~1 % of the largest displacement (nodes whose reaction is tensile below the
    force tolerance stay in contact from the larger start, free from the smaller one); no-slip contact is
    path-dependent in both. Fewer fine solves and AMG setups: measured on a held-out brain at 3 mm (see
    bench/RESULTS.md), resection 16 -> 12 fine solves (frictionless) and 15 -> 11 (no-slip), whole case
    10-19 % faster.
    Returns ``({"gravity": (m,) bool, "resection": (m,) bool or absent} or None, a log line)``.
    """
    from scipy.spatial import cKDTree

    h = 2.0 * config.resolution_mm
    coarse_cfg = dataclasses.replace(config, solver_rtol=max(config.solver_rtol, 1e-3))
    resect = bool(fine.removed_elements.any())
    actives: dict[str, np.ndarray] = {}
    coarse_log: list[dict] = []
    try:
        pb, _ = _setup_problem(subject, coarse_cfg, params, h, top_mm, resection=resect)
        m = pb.mesh
        if pb.contact_nodes.size == 0:
            return None, "no coarse contact nodes, starting from all in contact"
        _linear_case(pb, coarse_cfg, bool(pb.removed_elements.any()), {}, coarse_log, lambda msg: None,
                     actives=actives)
    except BrainshiftError as exc:  # a degenerate coarse mesh only loses the head start
        if "gravity" not in actives:
            return None, f"coarse {h:g} mm model unusable ({exc}), starting from all in contact"
        actives.pop("resection", None)  # the coarse resection failed: the fine one starts from its gravity set
    tree = cKDTree(m.nodes_ras[pb.contact_nodes])
    d, i = tree.query(fine.mesh.nodes_ras[fine.contact_nodes])
    out = {stage: a[i] | (d > h) for stage, a in actives.items()}
    stages = ", ".join(f"{stage} {int(a.sum())}/{a.size}" for stage, a in out.items())
    n_solves = sum(entry["contact_iterations"] for entry in coarse_log)
    return out, (f"{m.n_elements} elements at {h:g} mm, {n_solves} contact solves; fine contact nodes starting "
                 f"in contact: {stages}")


def _solve_log(name: str, res, seconds: float) -> dict:
    return {"stage": name, "contact_iterations": res.iterations, "amg_setups": res.amg_setups,
            "cg_iterations": [x.iterations for x in res.solves], "residuals": [x.residual for x in res.solves],
            "solve_times_s": [x.solve_s for x in res.solves], "active_set_changes": res.changes,
            "n_active": int(res.active.sum()), "n_contact": int(res.active.size),
            "max_outward_mm": res.max_outward_mm, "contact_nodes_held": res.held_nodes, "seconds": seconds}


def _linear_case(pb: _Problem, config: SimulationConfig, do_resect: bool, times: dict, log: list, _log,
                 progress: bool = False, active0: dict | None = None, stages: dict | None = None,
                 actives: dict | None = None, tilt_loads: list | None = None, responses: dict | None = None,
                 response_rtol: float | None = None) -> tuple[np.ndarray, float]:
    """Gravity equilibrium with the tumour, then (optionally) resection; displacements on the preop nodes.

    ``active0``, when given, holds initial contact active sets ``{"gravity": (m,) bool, "resection": ...}``
    (either may be absent: the gravity stage then starts from all in contact, the resection from the gravity
    stage's final set). ``stages``, when given, receives the gravity equilibrium as ``stages["gravity"]``
    (preop nodes, local mm); ``actives``, when given, receives each stage's final active set. ``tilt_loads``,
    when given, are further body-force densities ``(n_elements, 3)`` whose responses with each stage's contact
    state held go into ``responses["gravity"]`` and ``responses["final"]`` (``(q, n, 3)``; the resection
    response released as the stage's own is, from the gravity-stage response), solved to ``response_rtol``.
    """
    from brainshift.simulate import fem
    from brainshift.simulate.contact import ContactSolver

    t0 = time.perf_counter()
    m = pb.mesh
    pattern = fem.block_pattern(m)
    k = fem.assemble_stiffness(m, pb.lam, pb.mu, volumetric_integration=config.volumetric_integration,
                               pattern=pattern)
    f = fem.body_force_nodal(m, pb.force_density)
    near_null = fem.rigid_body_modes(m.nodes_local_mm)
    cs = ContactSolver(k, pattern, near_null, pb.contact_nodes, pb.normals, pb.fixed_nodes,
                       rtol=config.solver_rtol, maxiter=config.solver_maxiter,
                       max_iterations=config.max_contact_iterations, gap_tol_mm=config.contact_gap_tolerance_mm,
                       force_tol_rel=config.contact_force_tolerance, **_contact_settings(pb, config))
    times["assembly_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    active0 = active0 or {}
    res1 = cs.solve(f, active0=active0.get("gravity"), progress=progress)
    times["gravity_solve_s"] = time.perf_counter() - t0
    log.append(_solve_log("gravity", res1, times["gravity_solve_s"]))
    if stages is not None:
        stages["gravity"] = np.array(res1.u, dtype=np.float64)
    if actives is not None:
        actives["gravity"] = res1.active.copy()
    _log(f"gravity: {res1.iterations} solves, CG {[x.iterations for x in res1.solves]}, "
         f"{int(res1.active.sum())}/{res1.active.size} in contact, {times['gravity_solve_s']:.1f} s")
    resp1 = []
    if tilt_loads:
        t0 = time.perf_counter()
        resp1 = list(cs.solve_held([fem.body_force_nodal(m, fd) for fd in tilt_loads], res1.active,
                                   rtol=response_rtol))
        times["gravity_responses_s"] = time.perf_counter() - t0
        if responses is not None:
            responses["gravity"] = np.stack(resp1)
    if not do_resect:
        return res1.u, 0.0
    t0 = time.perf_counter()
    # forces the tumour elements exert on the rest: -(K_T u1 - f_T); releasing them applies K_T u1 - f_T
    tum = pb.tumour_elements
    f_t = fem.body_force_nodal(m, np.where(tum[:, None], pb.force_density, 0.0))
    released = fem.element_forces(m, res1.u, pb.lam, pb.mu, tum, config.volumetric_integration) - f_t
    keep_nodes = np.ones(m.n_nodes, dtype=bool)
    keep_nodes[pb.removed_nodes] = False
    released[~keep_nodes] = 0.0
    interface_force_n = float(np.linalg.norm(released, axis=1).sum()) * 1e-6
    k_removed = fem.assemble_stiffness(m, pb.lam, pb.mu, volumetric_integration=config.volumetric_integration,
                                       pattern=pattern, which=pb.removed_elements)
    cs.subtract_stiffness(k_removed)
    f_rest = fem.body_force_nodal(m, np.where(pb.removed_elements[:, None], 0.0, pb.force_density))
    # the increment K_R du = released superposed on u1, written for the total u = u1 + du so that the skull
    # constraint applies to the total displacement
    u1 = np.where(keep_nodes[:, None], res1.u, 0.0)
    rhs = _k_minus_removed_times(k, k_removed, u1) + released
    times["resection_setup_s"] = time.perf_counter() - t0
    _log(f"resection: removed {int(pb.removed_elements.sum())} elements ({int(tum.sum())} tumour), released "
         f"{interface_force_n:.3g} N of interface force")
    t0 = time.perf_counter()
    start = active0.get("resection")
    res2 = cs.solve(rhs, external=f_rest, x0=u1, active0=res1.active if start is None else start,
                    removed_nodes=pb.removed_nodes, progress=progress)
    if actives is not None:
        actives["resection"] = res2.active.copy()
    times["resection_solve_s"] = time.perf_counter() - t0
    log.append(_solve_log("resection", res2, times["resection_solve_s"]))
    _log(f"resection: {res2.iterations} solves, CG {[x.iterations for x in res2.solves]}, "
         f"{int(res2.active.sum())}/{res2.active.size} in contact, {times['resection_solve_s']:.1f} s")
    if resp1:
        t0 = time.perf_counter()
        rhs, starts = [], []
        for fd, u1p in zip(tilt_loads, resp1, strict=True):
            f_tp = fem.body_force_nodal(m, np.where(tum[:, None], fd, 0.0))
            rel_p = fem.element_forces(m, u1p, pb.lam, pb.mu, tum, config.volumetric_integration) - f_tp
            rel_p[~keep_nodes] = 0.0
            starts.append(np.where(keep_nodes[:, None], u1p, 0.0))
            rhs.append(_k_minus_removed_times(k, k_removed, starts[-1]) + rel_p)
        out = cs.solve_held(rhs, res2.active, x0s=starts, removed_nodes=pb.removed_nodes, rtol=response_rtol)
        times["resection_responses_s"] = time.perf_counter() - t0
        if responses is not None:
            responses["final"] = out
    return res2.u, interface_force_n


def _k_minus_removed_times(k, k_removed, u: np.ndarray) -> np.ndarray:
    """``(K - K_removed) u`` as ``(n, 3)`` (local frame)."""
    return ((k @ u.ravel()) - (k_removed @ u.ravel())).reshape(-1, 3)
