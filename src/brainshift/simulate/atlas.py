"""Build a per-patient deformation atlas: biomechanical solutions of one brain over its plausible conditions.

Before surgery, the patient's own brain is simulated (:func:`brainshift.simulate.case.simulate_case`) under a
design of conditions (Miga et al., Int J CARS 2016, doi:10.1007/s11548-015-1295-x; Sun et al., IEEE JTEHM 2014),
a ``"sample"`` (default: ``n_solves`` draws spread by a scrambled Halton sequence) or a ``"grid"``
(:func:`plan_solves`):

- gravity directions around the surgical approach (craniotomy entry -> tumour centre), within
  ``gravity_cone_deg``; with no tumour, directions over the upper hemisphere (tilted up to 60 degrees from
  straight down) with the craniotomy at the highest brain point along each;
- CSF drainage levels, skull contact models (``contact_models``), and for a sample the craniotomy radius,
  Poisson ratio, tumour stiffness and (with ``falx_probability``) the falx;
- with and without resection: both come from one solve (the gravity equilibrium with the tumour in place is
  the first stage of the resection solve, :attr:`SimulationResult.stage_displacements_local_mm`);
- stiffness: in linear elasticity with contact that is frictionless or bonded and no initial gap, scaling
  every modulus by ``1/s`` scales the solution by ``s`` exactly (the equilibrium and the contact conditions
  are positively homogeneous), so each solve also gives members at the ends of ``stiffness_range_pa`` without
  another solve.

Each solve is a Dask task (a ``distributed.LocalCluster`` of single-threaded worker processes, or an existing
scheduler), written to ``members/<solve id>.npz`` as soon as it is done, so an interrupted build resumes.
The members are then reduced to a mean and principal components (:func:`brainshift.atlas.basis.reduce_members`)
and saved with :func:`brainshift.atlas.basis.save_atlas` (``atlas.json`` last).

The members share one mesh: the preop mesh of the brain at ``resolution_mm`` (deterministic given the masks),
so only the loads, supports and contact state differ between solves. Only the linear material is used (the
stiffness scaling and the stage split rely on it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.simulate.dataset import Subject

log = logging.getLogger(__name__)

MEMBERS_DIR = "members"
#: Config fields that only change the reduction of the members (a finished build may be re-reduced with others).
_BASIS_KEYS = ("energy", "max_components")
BUILD_JSON = "build.json"
#: Fields of :class:`~brainshift.simulate.case.SimulationConfig` an atlas config may set in ``simulation``.
_FIXED = ("material", "resolution_mm", "contact_model", "shear_modulus_pa", "resection", "family",
          "craniotomy_radius_mm", "tumour_stiffness_ratio")
#: Ranges of a sampled design and the bounds each must lie in.
_RANGES = {"drainage_range": (0.0, 1.0), "craniotomy_radius_range_mm": (1.0, 200.0),
           "poisson_ratio_range": (0.0, 0.4999), "tumour_stiffness_ratio_range": (0.01, 100.0)}
#: The atlas's solves stop the contact active-set iteration when at most this fraction of the contact nodes still
#: change state, holding those in contact (``SimulationConfig.contact_settle_fraction``; ``simulation:`` may set
#: another value, 0 for exact convergence): a member is one basis vector of a fit, where the state of 0.2 % of
#: the surface nodes does not matter, and the iteration's tail (a few nodes per full solve) is a large part of a
#: solve's time (bench/RESULTS.md, session 7).
ATLAS_CONTACT_SETTLE_FRACTION = 0.002
#: The atlas's solves stop the final linear solve of each equilibrium at this relative residual
#: (``SimulationConfig.solver_rtol``, 1e-6 for a simulation; ``simulation:`` may set another value): on two solves of a
#: held-out brain at 3 mm (no-slip and unilateral contact, max displacement 3.7-5.9 mm) the nodal displacements
#: differed from the 1e-6 solve by at most 0.0005 mm (RMS 5e-6 mm), far below any fit residual (0.04 mm and up),
#: and the solves took 8-14 % less time (bench/RESULTS.md, session 16).
ATLAS_SOLVER_RTOL = 1e-4
#: The CG tolerance of the held-state responses behind tilted-gravity members (``gravity_response_tilt_deg``):
#: on a solve of a validation brain at 3 mm (unilateral contact, resection; responses up to 13.4 mm) the
#: responses differed from those at 1e-4 by at most 0.002 mm, and their solves took about a fifth less time.
ATLAS_RESPONSE_RTOL = 1e-3

#: Simulation fields a sampled solve may carry (its own draw).
_PER_SOLVE = ("craniotomy_radius_mm", "poisson_ratio", "tumour_stiffness_ratio", "falx", "ventricle_model",
              "ventricle_poisson_ratio", "buoyant_weight_fraction", "volumetric_integration")


@dataclass
class AtlasConfig:
    """What an atlas spans (YAML/JSON section ``atlas:``; every field optional).

    Attributes:
        resolution_mm: element size of the mesh (mm).
        contact_models: skull contact models, one set of solves each (:mod:`brainshift.simulate.contact`).
        drainage_fractions: drained CSF levels (fraction of the brain's extent along gravity).
        gravity_cone_deg: a grid's tilt (degrees) of the ring of gravity directions around the surgical
            approach; a sample's half-angle of the cap around it in which gravity is drawn.
        n_ring_directions: directions on a grid's ring (the approach itself is always included).
        no_tumour_directions: gravity directions over the upper hemisphere when no tumour is given.
        resection: members with the tumour resected as well as in place (needs a tumour).
        shear_modulus_pa: parenchyma shear modulus of the solves (Pa).
        stiffness_range_pa: shear moduli (Pa) of the scaled members (the solution scaled by
            ``shear_modulus_pa / mu``); empty for none.
        tumour_stiffness_ratio: tumour / parenchyma stiffness.
        craniotomy_radius_mm: radius of the craniotomy (mm).
        energy: fraction of the members' variance the basis retains.
        max_components: cap on the number of components (None: no cap).
        simulation: further :class:`~brainshift.simulate.case.SimulationConfig` fields of every solve
            (e.g. ``poisson_ratio``, ``ventricle_model``, ``falx``, ``buoyant_weight_fraction``).
        design: ``"grid"`` (every combination of the lists above) or ``"sample"``: ``n_solves`` solves whose
            choices are drawn from a scrambled Halton sequence (``seed``; nested: the first k solves of a
            sample are the sample of size k) over the ranges below, so a few solves cover wide ranges.
        n_solves: solves of a ``"sample"`` design.
        drainage_range: ``[min, max]`` drained fraction of a ``"sample"`` design.
        craniotomy_radius_range_mm: ``[min, max]`` craniotomy radius (mm) of a ``"sample"`` design; None:
            ``craniotomy_radius_mm`` for every solve.
        poisson_ratio_range: ``[min, max]`` parenchyma Poisson ratio of a ``"sample"`` design; None: the
            simulation config's.
        tumour_stiffness_ratio_range: ``[min, max]`` tumour / parenchyma stiffness of a ``"sample"`` design;
            None: ``tumour_stiffness_ratio``.
        seed: scrambling seed of the ``"sample"`` design.
        falx_probability: fraction of a ``"sample"`` design's solves with the falx (drawn on its own Halton
            dimension, last, so the other draws do not depend on it); default 0.3, the training family's share;
            chosen on validation cases of a training subject whose cases include a falx (mean ratio to the best
            classical interpolator 0.304 without, 0.205 with; bench/RESULTS.md, session 7); None: the
            simulation config's ``falx`` for every solve.
        ventricle_models: ventricle / CSF models a ``"sample"`` design draws per solve (``"fluid"``,
            ``"compressible"``; :mod:`brainshift.simulate.materials`), on their own Halton dimension after the
            falx's; a compressible solve draws its ventricles' Poisson ratio uniformly in
            ``ventricle_poisson_ratio_range`` (0: a drained, collapsible cavity; 0.4: a soft solid). None: the
            simulation config's ``ventricle_model`` for every solve.
        ventricle_poisson_ratio_range: ``[min, max]`` of a compressible solve's ventricle Poisson ratio.
        gravity_models: where gravity acts, drawn per solve: ``"drained"`` (only tissue above the drained CSF
            level carries its weight) or ``"buoyant"`` (the whole brain, tissue below the fluid level with its
            buoyant weight fraction drawn in ``buoyant_weight_fraction_range``), on their own Halton dimensions
            after the ventricles'. None: the simulation config's ``buoyant_weight_fraction`` for every solve.
        buoyant_weight_fraction_range: ``[min, max]`` of ``(rho_tissue - rho_csf) / rho_tissue`` for a buoyant
            solve.
        gravity_response_tilt_deg: with a value, every solve also computes the linear responses to its own weight
            distribution pulled along the two directions perpendicular to its gravity, each stage with its
            converged contact state held (exact for that state: with a fixed active set the model is linear in
            the load; :meth:`~brainshift.simulate.contact.ContactSolver.solve_held`), and the basis gains, per
            solve and stage at ``shear_modulus_pa``, four members with gravity tilted by this angle (degrees)
            about those directions: ``cos(t) u + sin(t) (+-u_perp)``. Two to four more CG solves per solve with
            the same matrices; a change of the angle alone re-reduces a finished build. None: no tilted members.
        reduced_integration_from_nu: a solve whose drawn Poisson ratio is at least this uses selective reduced
            (1-point volumetric) integration against volumetric locking, as the model family's cases do
            (:data:`brainshift.simulate.family.REDUCED_INTEGRATION_FROM_NU`, 0.47); None: the simulation
            config's ``volumetric_integration`` for every solve.

    The choices drawn per solve change no other draw (each has its own Halton dimensions, appended last), and
    every one keeps the members' stiffness scaling: the ventricles' own shear modulus (4.54 Pa) is fixed, so a
    member scaled to another parenchyma modulus is exact up to the ventricles' share of the stiffness (under
    1 % of the parenchyma's), as with fluid ventricles.
    """

    resolution_mm: float = 3.0
    contact_models: list = field(default_factory=lambda: ["unilateral", "no_slip"])
    drainage_fractions: list = field(default_factory=lambda: [0.2, 0.5])
    gravity_cone_deg: float = 45.0
    n_ring_directions: int = 4
    no_tumour_directions: int = 9
    resection: bool = True
    shear_modulus_pa: float = 1225.0
    stiffness_range_pa: list = field(default_factory=lambda: [500.0, 3000.0])
    tumour_stiffness_ratio: float = 2.0
    craniotomy_radius_mm: float = 30.0
    energy: float = 0.9999
    max_components: int | None = None
    simulation: dict = field(default_factory=dict)
    design: str = "sample"
    n_solves: int = 24
    drainage_range: list = field(default_factory=lambda: [0.05, 0.7])
    craniotomy_radius_range_mm: list | None = field(default_factory=lambda: [15.0, 45.0])
    poisson_ratio_range: list | None = field(default_factory=lambda: [0.40, 0.49])
    tumour_stiffness_ratio_range: list | None = field(default_factory=lambda: [1.0, 3.0])
    seed: int = 0
    falx_probability: float | None = 0.3
    ventricle_models: list | None = None
    ventricle_poisson_ratio_range: list = field(default_factory=lambda: [0.0, 0.4])
    gravity_models: list | None = None
    buoyant_weight_fraction_range: list = field(default_factory=lambda: [0.02, 0.06])
    reduced_integration_from_nu: float | None = None
    gravity_response_tilt_deg: float | None = None

    def __post_init__(self) -> None:
        self.contact_models = [str(c) for c in self.contact_models]
        self.drainage_fractions = [float(v) for v in self.drainage_fractions]
        self.stiffness_range_pa = [float(v) for v in self.stiffness_range_pa]
        self.simulation = dict(self.simulation or {})
        for name in ("ventricle_models", "gravity_models"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [str(x) for x in v])
        self.ventricle_poisson_ratio_range = [float(x) for x in self.ventricle_poisson_ratio_range]
        self.buoyant_weight_fraction_range = [float(x) for x in self.buoyant_weight_fraction_range]
        for name in _RANGES:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [float(x) for x in v])
        self.validate()

    def validate(self) -> None:
        """Raise :class:`BrainshiftError` naming the first bad field."""
        from brainshift.simulate.contact import check_contact_model

        if not self.contact_models:
            raise BrainshiftError("expected at least one contact model in the atlas config, got none")
        for c in self.contact_models:
            check_contact_model(c)
        if not self.drainage_fractions or not all(0.0 <= v <= 1.0 for v in self.drainage_fractions):
            raise BrainshiftError(f"expected drainage_fractions in [0, 1], got {self.drainage_fractions}")
        if not 0.0 <= self.gravity_cone_deg < 90.0:
            raise BrainshiftError(f"expected gravity_cone_deg in [0, 90), got {self.gravity_cone_deg}")
        if self.n_ring_directions < 0 or self.no_tumour_directions < 1:
            raise BrainshiftError(f"expected n_ring_directions >= 0 and no_tumour_directions >= 1, got "
                                  f"{self.n_ring_directions} and {self.no_tumour_directions}")
        if self.shear_modulus_pa <= 0 or any(v <= 0 for v in self.stiffness_range_pa):
            raise BrainshiftError(f"expected positive shear moduli, got {self.shear_modulus_pa} and "
                                  f"{self.stiffness_range_pa}")
        if not 0.0 < self.energy <= 1.0:
            raise BrainshiftError(f"expected energy in (0, 1], got {self.energy}")
        if self.design not in ("grid", "sample"):
            raise BrainshiftError(f"expected design 'grid' or 'sample' in the atlas config, got {self.design!r}")
        if self.falx_probability is not None and not 0.0 <= float(self.falx_probability) <= 1.0:
            raise BrainshiftError(f"expected falx_probability in [0, 1], got {self.falx_probability}")
        if self.design == "sample" and int(self.n_solves) < 1:
            raise BrainshiftError(f"expected n_solves >= 1 for a sampled atlas, got {self.n_solves}")
        for name, (lo_ok, hi_ok) in _RANGES.items():
            v = getattr(self, name)
            if v is None:
                continue
            if len(v) != 2 or not (lo_ok <= v[0] <= v[1] <= hi_ok):
                raise BrainshiftError(f"expected {name} as [min, max] within [{lo_ok:g}, {hi_ok:g}], got {v}")
        bad = sorted(set(self.simulation) & set(_FIXED))
        if bad:
            raise BrainshiftError(f"expected the atlas's own fields for {bad}, got them under simulation:")
        t = self.gravity_response_tilt_deg
        if t is not None and (isinstance(t, bool) or not 0.0 < float(t) < 90.0):
            raise BrainshiftError(f"expected gravity_response_tilt_deg in (0, 90) degrees or None, got {t!r}")
        self._validate_per_solve_models()
        self.simulation_config()  # validates the remaining simulation fields

    def _validate_per_solve_models(self) -> None:
        """The ventricle / gravity models and the integration rule drawn per solve (sampled designs only)."""
        from brainshift.simulate.family import GRAVITY, VENTRICLES  # the model family's own options

        for name, allowed, sim_key in (("ventricle_models", VENTRICLES, "ventricle_model"),
                                       ("gravity_models", GRAVITY, "buoyant_weight_fraction")):
            v = getattr(self, name)
            if v is None:
                continue
            if not v or any(x not in allowed for x in v) or len(set(v)) != len(v):
                raise BrainshiftError(f"expected {name} as a list of distinct values among {list(allowed)}, got {v}")
            if self.design != "sample":
                raise BrainshiftError(f"expected {name} only with design 'sample' (drawn per solve), got design "
                                      f"{self.design!r}")
            if sim_key in self.simulation:
                raise BrainshiftError(f"expected either {name} or simulation: {sim_key}, got both")
        for name, lo_ok, hi_ok in (("ventricle_poisson_ratio_range", 0.0, 0.4999),
                                   ("buoyant_weight_fraction_range", 0.0, 1.0)):
            v = getattr(self, name)
            if len(v) != 2 or not (lo_ok <= v[0] <= v[1] <= hi_ok):
                raise BrainshiftError(f"expected {name} as [min, max] within [{lo_ok:g}, {hi_ok:g}], got {v}")
        nu = self.reduced_integration_from_nu
        if nu is not None:
            if isinstance(nu, bool) or not 0.0 < float(nu) < 0.5:
                raise BrainshiftError(f"expected reduced_integration_from_nu in (0, 0.5) or None, got {nu!r}")
            if self.design != "sample":
                raise BrainshiftError(f"expected reduced_integration_from_nu only with design 'sample' (the Poisson "
                                      f"ratio drawn per solve), got design {self.design!r}")
            if "volumetric_integration" in self.simulation:
                raise BrainshiftError("expected either reduced_integration_from_nu or simulation: "
                                      "volumetric_integration, got both")

    def simulation_config(self, contact_model: str | None = None, solve: dict | None = None):
        """The :class:`SimulationConfig` of a solve with this contact model (and a sampled solve's own
        craniotomy radius, Poisson ratio, tumour stiffness, falx, ventricle and gravity models and volumetric
        integration, when ``solve`` carries them)."""
        from brainshift.simulate.case import SimulationConfig

        own = {k: solve[k] for k in _PER_SOLVE if solve is not None and k in solve}
        return SimulationConfig(**{"contact_settle_fraction": ATLAS_CONTACT_SETTLE_FRACTION,
                                   "solver_rtol": ATLAS_SOLVER_RTOL, **self.simulation,
                                   "material": "linear", "resolution_mm": self.resolution_mm,
                                   "contact_model": contact_model or self.contact_models[0],
                                   "shear_modulus_pa": self.shear_modulus_pa, "resection": self.resection,
                                   "craniotomy_radius_mm": self.craniotomy_radius_mm,
                                   "tumour_stiffness_ratio": self.tumour_stiffness_ratio, **own})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> AtlasConfig:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise BrainshiftError(f"expected atlas config keys among {sorted(names)}, got unknown {sorted(bad)}")
        from brainshift.simulate.case import SimulationConfig
        from brainshift.simulate.config_values import check_field_values

        d = check_field_values(d, cls, "the atlas config", {"contact_models": "str", "ventricle_models": "str",
                                                              "gravity_models": "str"})
        sim_names = {f.name for f in dataclasses.fields(SimulationConfig)}
        bad = set(d.get("simulation") or {}) - sim_names
        if bad:
            raise BrainshiftError(f"expected simulation config keys among {sorted(sim_names)} under simulation: in "
                                  f"the atlas config, got unknown {sorted(bad)}")
        if d.get("simulation"):
            d["simulation"] = check_field_values(d["simulation"], SimulationConfig, "the atlas config's simulation:")
        return cls(**d)


def read_atlas_config(path: str | Path | None) -> AtlasConfig:
    """An :class:`AtlasConfig` from a YAML/JSON file (its ``atlas:`` section, or the whole file); None: defaults.

    Raises:
        InputFileError: unreadable file. BrainshiftError: unknown or invalid keys.
    """
    if path is None:
        return AtlasConfig()
    from brainshift.errors import InputFileError

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(f"expected a readable atlas config file, got {p} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputFileError(f"expected a UTF-8 text atlas config file (YAML or JSON), got {p}, which is not "
                             f"UTF-8 text") from None
    try:
        import yaml

        data = yaml.safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except Exception as exc:  # yaml / json parse errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"expected YAML or JSON in {p}, got unparsable content ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BrainshiftError(f"expected a mapping in {p}, got {type(data).__name__}")
    section = data.get("atlas", data) if "atlas" in data else data
    if not isinstance(section or {}, dict):
        raise BrainshiftError(f"expected the section atlas: of {p} to be a mapping of atlas config keys, got "
                              f"{section!r}")
    return AtlasConfig.from_dict(section)


# ------------------------------------------------------------------------------------------------ the solves


def _ring(axis: np.ndarray, tilt_deg: float, n: int, phase: float = 0.0) -> list[np.ndarray]:
    from brainshift.simulate.loads import tilted_direction

    cos_t = float(np.cos(np.deg2rad(tilt_deg)))
    return [tilted_direction(axis, cos_t, phase + 2.0 * np.pi * k / n)[0] for k in range(n)]


def plan_solves(subject: Subject, config: AtlasConfig, entry_ras: np.ndarray | None = None) -> list[dict]:
    """The solves of an atlas: one dict per solve with its id, contact model, drainage, gravity and entry.

    A ``"grid"`` design crosses ``contact_models`` x ``drainage_fractions`` x gravity directions (the approach
    and a ring of ``n_ring_directions`` tilted by ``gravity_cone_deg``; without a tumour, directions over the
    upper hemisphere). A ``"sample"`` design draws ``n_solves`` solves from a scrambled Halton sequence
    (``scipy.stats.qmc.Halton``, seeded by ``seed``): gravity uniform on the spherical cap of half-angle
    ``gravity_cone_deg`` around the approach (60 degrees around straight down without a tumour), drainage
    uniform in ``drainage_range``, and the craniotomy radius, Poisson ratio and tumour stiffness uniform in
    their ranges when given, and the contact model uniform over ``contact_models``; then, each on dimensions of
    its own appended last (so they change no other draw), the falx (``falx_probability``), the ventricle model
    (``ventricle_models``) and the gravity model (``gravity_models``), with their parameters.

    Args:
        subject: the brain (a tumour mask that may be empty).
        config: :class:`AtlasConfig`.
        entry_ras: the craniotomy centre (RAS mm) when known; default: the simulator's rule (the brain-surface
            point nearest the tumour centre above it), or with no tumour the highest brain point along each
            gravity direction.

    Returns:
        A list of JSON-serialisable dicts (``id``, ``contact_model``, ``drainage_fraction``,
        ``drainage_level_mm``, ``gravity_direction_ras``, ``gravity_tilt_deg``, ``entry_point_ras``,
        ``tumour_centre_ras``, ``approach_direction_ras``; a sampled solve also carries the drawn
        ``craniotomy_radius_mm`` / ``poisson_ratio`` / ``tumour_stiffness_ratio`` whose range is given,
        ``falx`` with ``falx_probability``, ``ventricle_model`` and ``ventricle_poisson_ratio`` with
        ``ventricle_models``, ``buoyant_weight_fraction`` with ``gravity_models`` (0 for a drained solve), and
        ``volumetric_integration`` with ``reduced_integration_from_nu``).
    """
    from brainshift.simulate import loads
    from brainshift.volume import Volume

    region = (np.asarray(subject.brain_mask.data) > 0) | (np.asarray(subject.tumour_mask.data) > 0)
    region_vol = Volume(region.astype(np.uint8), subject.brain_mask.affine, "label")
    has_tumour = bool(np.asarray(subject.tumour_mask.data).any())
    if has_tumour:
        centre = loads.tumour_centre_ras(subject.tumour_mask)
        entry0 = (np.asarray(entry_ras, dtype=np.float64) if entry_ras is not None
                  else loads.entry_point_ras(subject.brain_mask, subject.tumour_mask, centre))
        axis = centre - entry0
        if np.linalg.norm(axis) < 1e-6:
            raise GeometryError("expected the craniotomy entry away from the tumour centre, got them at one point")
        axis /= np.linalg.norm(axis)
    else:
        from brainshift.geometry import voxel_to_ras

        centre = voxel_to_ras(np.argwhere(region).mean(axis=0, keepdims=True), subject.brain_mask.affine)[0]
        axis = np.array([0.0, 0.0, -1.0])
        surf = loads.brain_surface_points_ras(subject.brain_mask, subject.tumour_mask)

    def entry_for(g: np.ndarray) -> np.ndarray:
        if has_tumour:
            return entry0
        return np.asarray(entry_ras, dtype=np.float64) if entry_ras is not None else surf[int(np.argmax(surf @ -g))]

    def solve_dict(sid: str, contact: str, frac: float, g: np.ndarray) -> dict:
        _, extent = loads.brain_depth_range_mm(region_vol, g)
        tilt = float(np.degrees(np.arccos(np.clip(float(g @ axis), -1.0, 1.0))))
        return {"id": sid, "contact_model": contact, "drainage_fraction": float(frac),
                "drainage_level_mm": float(frac * extent), "gravity_direction_ras": np.asarray(g).tolist(),
                "gravity_tilt_deg": round(tilt, 2), "entry_point_ras": np.asarray(entry_for(g)).tolist(),
                "tumour_centre_ras": np.asarray(centre).tolist(), "approach_direction_ras": axis.tolist()}

    if config.design == "sample":
        return _sample_solves(config, axis, has_tumour, solve_dict)
    if has_tumour:
        gs = [axis] + _ring(axis, config.gravity_cone_deg, config.n_ring_directions)
    else:
        n = config.no_tumour_directions
        gs = [axis] + _ring(axis, 30.0, max((n - 1) // 3, 0)) + _ring(axis, 60.0, n - 1 - max((n - 1) // 3, 0),
                                                                      phase=0.5)
        gs = gs[:n]
    return [solve_dict(f"{contact}_d{frac:.2f}_g{k:02d}", contact, frac, g)
            for contact in config.contact_models for frac in config.drainage_fractions for k, g in enumerate(gs)]


def _sample_solves(config: AtlasConfig, axis: np.ndarray, has_tumour: bool, solve_dict) -> list[dict]:
    """The solves of a ``"sample"`` design (:func:`plan_solves`)."""
    import warnings

    from scipy.stats import qmc

    ranges = [("drainage_fraction", config.drainage_range), ("craniotomy_radius_mm", config.craniotomy_radius_range_mm),
              ("poisson_ratio", config.poisson_ratio_range),
              ("tumour_stiffness_ratio", config.tumour_stiffness_ratio_range)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qmc warns about balance for sizes that are not powers of two
        # the falx, then the ventricle and gravity models, last: the draws before them stay the same without them
        # (a scrambled Halton sequence's first dimensions do not depend on how many follow)
        base = 3 + len(ranges)
        n_dims = (base + (config.falx_probability is not None) + 2 * (config.ventricle_models is not None)
                  + 2 * (config.gravity_models is not None))
        u = qmc.Halton(d=n_dims, scramble=True, seed=int(config.seed)).random(int(config.n_solves))
    from brainshift.simulate.loads import tilted_direction

    cap = np.deg2rad(config.gravity_cone_deg if has_tumour else 60.0)
    plan = []
    for i, row in enumerate(u):
        # one Halton dimension per choice, the contact model included (cycling it by index would tie it to
        # the base-2 first dimension, i.e. to the tilt)
        contact = config.contact_models[min(int(row[0] * len(config.contact_models)), len(config.contact_models) - 1)]
        g, _ = tilted_direction(axis, 1.0 - row[1] * (1.0 - np.cos(cap)), 2.0 * np.pi * row[2])  # uniform on the cap
        drawn = {name: float(lo + r * (hi - lo)) for (name, rng), r in zip(ranges, row[3:3 + len(ranges)], strict=True)
                 if rng is not None for lo, hi in [rng]}
        d = solve_dict(f"s{i:03d}_{contact}", contact, drawn.pop("drainage_fraction"), g)
        d.update({k: round(v, 4) for k, v in drawn.items()})
        extra = list(row[base:])
        if config.falx_probability is not None:
            d["falx"] = bool(extra.pop(0) < config.falx_probability)
        if config.ventricle_models is not None:
            r_model, r_nu = extra.pop(0), extra.pop(0)
            vm = config.ventricle_models[min(int(r_model * len(config.ventricle_models)),
                                             len(config.ventricle_models) - 1)]
            d["ventricle_model"] = vm
            if vm == "compressible":
                lo, hi = config.ventricle_poisson_ratio_range
                d["ventricle_poisson_ratio"] = round(float(lo + r_nu * (hi - lo)), 4)
        if config.gravity_models is not None:
            r_model, r_frac = extra.pop(0), extra.pop(0)
            gm = config.gravity_models[min(int(r_model * len(config.gravity_models)), len(config.gravity_models) - 1)]
            lo, hi = config.buoyant_weight_fraction_range
            d["buoyant_weight_fraction"] = round(float(lo + r_frac * (hi - lo)), 4) if gm == "buoyant" else 0.0
        if config.reduced_integration_from_nu is not None:
            nu = d.get("poisson_ratio", config.simulation_config().poisson_ratio)
            d["volumetric_integration"] = "reduced" if nu >= config.reduced_integration_from_nu else "full"
        plan.append(d)
    return plan


def solve_parameters(solve: dict):
    """The :class:`~brainshift.simulate.case.CaseParameters` of one planned solve (:func:`plan_solves`)."""
    from brainshift.simulate.case import CaseParameters

    return CaseParameters(gravity_direction_ras=np.asarray(solve["gravity_direction_ras"]),
                          entry_point_ras=np.asarray(solve["entry_point_ras"]),
                          tumour_centre_ras=np.asarray(solve["tumour_centre_ras"]),
                          approach_direction_ras=np.asarray(solve["approach_direction_ras"]),
                          gravity_perturbation_deg=float(solve["gravity_tilt_deg"]),
                          drainage_fraction=float(solve["drainage_fraction"]),
                          drainage_level_mm=float(solve["drainage_level_mm"]))


def perpendicular_directions(g_ras: np.ndarray) -> np.ndarray:
    """``(2, 3)`` orthonormal directions perpendicular to ``g_ras`` (deterministic: the first is perpendicular to
    the RAS axis least aligned with ``g_ras`` as well)."""
    g = np.asarray(g_ras, dtype=np.float64)
    g = g / np.linalg.norm(g)
    e1 = np.cross(g, np.eye(3)[int(np.argmin(np.abs(g)))])
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(g, e1)])


def solve_member(subject: Subject, config: AtlasConfig, solve: dict) -> dict:
    """Run one solve of the atlas (deterministic). Returns ``{"gravity": (n, 3), "final": (n, 3), "meta": {...}}``
    nodal displacements on the preop mesh, local frame (voxel axes), mm; with
    ``config.gravity_response_tilt_deg`` also ``"gravity_responses"`` and ``"final_responses"`` ``(2, n, 3)``:
    the responses to the solve's weight pulled along :func:`perpendicular_directions` of its gravity, the
    contact state held."""
    from brainshift.simulate.case import simulate_case

    dirs = (perpendicular_directions(np.asarray(solve["gravity_direction_ras"]))
            if config.gravity_response_tilt_deg is not None else None)
    sim = config.simulation_config(solve["contact_model"], solve)
    res = simulate_case(subject, sim, solve_parameters(solve), response_directions_ras=dirs,
                        response_rtol=max(sim.solver_rtol, ATLAS_RESPONSE_RTOL))
    st = res.stage_displacements_local_mm
    mesh = res.preop_mesh
    out = {"gravity": st["gravity"].astype(np.float32), "final": st["final"].astype(np.float32),
           "node_grid": mesh.node_grid.astype(np.int32), "origin_vox": mesh.origin_vox, "step_vox": mesh.step_vox,
           "node_grid_shape": np.asarray(mesh.node_grid_shape), "resected": bool(res.meta["n_resected_elements"]),
           "seconds": float(res.meta["times_s"]["total_s"])}
    if dirs is not None:
        out["gravity_responses"] = st["gravity_responses"].astype(np.float32)
        out["final_responses"] = st["final_responses"].astype(np.float32)
    return out


def _run_solve(folder: str, subject: Subject, config: AtlasConfig, solve: dict) -> dict:
    """Task: one solve, written to ``members/<id>.npz`` atomically. Returns a status dict (never raises)."""
    from brainshift.io.atomic import atomic_output

    t0 = time.perf_counter()
    try:
        out = solve_member(subject, config, solve)
        path = Path(folder) / MEMBERS_DIR / f"{solve['id']}.npz"
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **{k: np.asarray(v) for k, v in out.items()})
        return {"id": solve["id"], "status": "ok", "seconds": time.perf_counter() - t0}
    except Exception as exc:
        return {"id": solve["id"], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ the build


@dataclass
class AtlasBuildReport:
    """What :func:`build_atlas` did: ``solved`` / ``skipped`` solve ids, ``failed`` ``{id: error}``, ``wall_s``,
    ``n_members``, ``n_components``, ``retained_energy``, ``size_mb`` (the atlas folder on disk). ``atlas.json``
    records ``build_wall_s`` (this run; a resumed or re-reduced build counts only its own work) and
    ``solve_seconds_total`` (the sum of every solve's own time, as each worker measured it)."""

    folder: Path
    solved: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    wall_s: float = 0.0
    n_members: int = 0
    n_components: int = 0
    retained_energy: float = 0.0
    size_mb: float = 0.0

    def summary(self) -> str:
        return (f"atlas {self.folder}: {len(self.solved)} solves run, {len(self.skipped)} reused, "
                f"{len(self.failed)} failed; {self.n_members} members -> {self.n_components} components "
                f"({100 * self.retained_energy:.2f} % of the variance), {self.size_mb:.1f} MB, {self.wall_s:.0f} s")


def tilted_members(arrs: dict, stage: str, tilt_deg: float) -> list[np.ndarray]:
    """The four members of one solve's stage with gravity tilted by ``tilt_deg``
    (:attr:`AtlasConfig.gravity_response_tilt_deg`): ``cos(t) u + sin(t) s r_k`` for the two perpendicular
    responses ``r_k`` and ``s = +-1`` (float64 ``(n, 3)`` each, local mm). Exact for the solve's contact state
    by linearity.

    Raises:
        BrainshiftError: the stored solve has no responses (built without ``gravity_response_tilt_deg``).
    """
    key = f"{stage}_responses"
    if key not in arrs:
        raise BrainshiftError(f"expected the atlas solve to hold {key} (built with gravity_response_tilt_deg), got "
                              f"none; build into a new folder")
    t = np.deg2rad(tilt_deg)
    u = arrs[stage].astype(np.float64)
    return [np.cos(t) * u + sign * np.sin(t) * arrs[key][k].astype(np.float64) for k in range(2) for sign in (1, -1)]


def collect_members(folder: str | Path, plan: list[dict], config: AtlasConfig
                    ) -> tuple[list[np.ndarray], list[dict], dict, float]:
    """The atlas members of the stored solves of ``plan`` (in order), as :func:`build_atlas` reduces them.

    Per solve and stage (tumour in place; resected when the solve resected): the solution scaled to each shear
    modulus of ``config`` (exact in the linear model), and with ``config.gravity_response_tilt_deg`` the four
    tilted members (:func:`tilted_members`). A prefix of a sampled plan gives the atlas of that many solves (the
    design is nested).

    Returns:
        ``(members (n, 3) float64 local mm each, their modelling choices, the first solve's arrays (the mesh),
        the solves' own seconds summed)``.

    Raises:
        BrainshiftError: solves on different meshes, or tilted members asked of solves without responses.
    """
    folder = Path(folder)
    members, info = [], []
    node_ref = None
    solve_seconds = 0.0
    factors = [(config.shear_modulus_pa, 1.0)] + [(mu, config.shear_modulus_pa / mu) for mu in
                                                  config.stiffness_range_pa if mu != config.shear_modulus_pa]
    for s in plan:
        with np.load(folder / MEMBERS_DIR / f"{s['id']}.npz", allow_pickle=False) as z:
            arrs = {k: z[k] for k in z.files}
        solve_seconds += float(arrs.get("seconds", 0.0))
        if node_ref is None:
            node_ref = arrs
        elif arrs["node_grid"].shape != node_ref["node_grid"].shape or not np.array_equal(arrs["node_grid"],
                                                                                          node_ref["node_grid"]):
            raise BrainshiftError(f"expected every atlas solve on one mesh, got another mesh in solve {s['id']}")
        stages = [("gravity", False)] + ([("final", True)] if bool(arrs["resected"]) else [])
        for stage, resected in stages:
            about = {"solve": s["id"], "contact_model": s["contact_model"], "drainage_fraction": s["drainage_fraction"],
                     "gravity_tilt_deg": s["gravity_tilt_deg"],
                     "gravity_direction_ras": [round(v, 5) for v in s["gravity_direction_ras"]],
                     "resection": resected, **{k: s[k] for k in _PER_SOLVE if k in s}}
            if "entry_point_ras" in s:  # the craniotomy's centre (brainshift.atlas.boundary)
                about["entry_point_ras"] = [round(float(v), 3) for v in s["entry_point_ras"]]
            for mu, scale in factors:
                members.append(arrs[stage].astype(np.float64) * scale)
                info.append({**about, "shear_modulus_pa": mu})
            if config.gravity_response_tilt_deg is not None:
                members.extend(tilted_members(arrs, stage, float(config.gravity_response_tilt_deg)))
                info.extend({**about, "shear_modulus_pa": config.shear_modulus_pa,
                             "response_tilt_deg": float(config.gravity_response_tilt_deg), "response_tilt_about": k}
                            for k in range(4))
    return members, info, node_ref, solve_seconds


def _check_resume(folder: Path, record: dict) -> None:
    from brainshift.atlas.basis import ATLAS_JSON, BASIS_FILE

    p = folder / BUILD_JSON
    if not p.is_file():
        theirs = [n for n in (ATLAS_JSON, BASIS_FILE, MEMBERS_DIR) if (folder / n).exists()]
        if theirs:
            raise BrainshiftError(f"expected {folder} to be empty or an atlas build (with {BUILD_JSON}), got "
                                  f"{', '.join(theirs)} without it; choose another -o (files brainshift did not "
                                  f"write are never replaced)")
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError):
        raise BrainshiftError(f"expected {p} to be the record of an earlier atlas build, got unreadable content; "
                              f"choose another -o") from None
    def solves_of(rec: dict) -> dict:  # the basis settings do not change the solves
        cfg = dict(rec.get("config") or {})
        cfg.setdefault("design", "grid")  # records written before the sampled design were grids
        try:  # a record written before a field existed holds that field's default
            cfg = AtlasConfig.from_dict(cfg).to_dict()
        except BrainshiftError:
            pass
        # the tilt's value only changes the reduction; whether it is set changes the solves
        cfg["gravity_response_tilt_deg"] = cfg.get("gravity_response_tilt_deg") is not None
        return {k: v for k, v in cfg.items() if k not in _BASIS_KEYS}

    if solves_of(old) != solves_of(record):
        raise BrainshiftError(f"expected {folder} to resume an atlas of the same image and config, got another "
                              f"config in {p}; choose another -o")
    for key in ("image_sha256", "entry_ras"):
        if old.get(key) != record.get(key):
            raise BrainshiftError(f"expected {folder} to resume an atlas of the same image and config, got another "
                                  f"{key.replace('_', ' ')} in {p}; choose another -o")


def build_atlas(folder: str | Path, subject: Subject, config: AtlasConfig | None = None, *,
                entry_ras: np.ndarray | None = None, scheduler_address: str | None = None,
                n_workers: int | None = None, progress: bool = True, processes: bool = True) -> AtlasBuildReport:
    """Simulate the atlas members of one brain and save the reduced atlas into ``folder`` (module docstring).

    Args:
        folder: the atlas folder (created; an unfinished build of the same image and config is resumed; a
            finished one is reused, and re-reduced when only ``energy`` / ``max_components`` differ).
        subject: the preop image with brain, tumour (may be empty) and ventricle masks on its grid.
        config: :class:`AtlasConfig` (default: its defaults).
        entry_ras: the craniotomy centre (RAS mm), when known.
        scheduler_address: an existing Dask scheduler (``tcp://host:8786``); default: a ``LocalCluster``.
        n_workers: LocalCluster workers (default: the CPU cores available), one thread each.
        progress: a tqdm bar over the solves.
        processes: LocalCluster workers are processes (default) or threads.

    Returns:
        :class:`AtlasBuildReport`.

    Raises:
        BrainshiftError: a bad config, ``n_workers`` below 1, a folder holding another image's build, or solves
            that failed (their errors; the solves that succeeded are kept for a resumed run).
        GeometryError: masks off the image grid, empty brain.
    """
    import dask
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    from brainshift.atlas.basis import DeformationAtlas, NodeGrid, image_digest, reduce_members, save_atlas
    from brainshift.io.atomic import atomic_output
    from brainshift.simulate.batch import LOCAL_WORKER_CONFIG, default_workers
    from brainshift.simulate.case import check_subject

    t_start = time.perf_counter()
    if n_workers is not None and (isinstance(n_workers, bool) or int(n_workers) < 1):
        raise BrainshiftError(f"expected n_workers >= 1 or None (one per CPU core), got {n_workers!r}")
    config = config or AtlasConfig()
    check_subject(subject)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digest = image_digest(subject.image.data)
    plan = plan_solves(subject, config, entry_ras)
    record = {"image_sha256": digest, "config": config.to_dict(),
              "entry_ras": None if entry_ras is None else np.asarray(entry_ras, dtype=float).tolist()}
    _check_resume(folder, record)
    with atomic_output(folder / BUILD_JSON) as tmp:
        tmp.write_text(json.dumps({**record, "solves": plan}, indent=1))
    (folder / MEMBERS_DIR).mkdir(exist_ok=True)
    report = AtlasBuildReport(folder=folder)
    todo = [s for s in plan if not (folder / MEMBERS_DIR / f"{s['id']}.npz").is_file()]
    report.skipped = [s["id"] for s in plan if s not in todo]
    if todo:
        if scheduler_address:
            cluster, client = None, Client(scheduler_address)
        else:
            import warnings

            with dask.config.set(LOCAL_WORKER_CONFIG), warnings.catch_warnings():
                # the scheduler's HTTP endpoint moves off a busy port 8787 with a UserWarning: nothing to act on
                warnings.filterwarnings("ignore", message=".*Port 8787 is already in use.*")
                cluster = LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=1,
                                       processes=processes, dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
        try:
            subj = client.scatter(subject, broadcast=True)
            futures = [client.submit(_run_solve, str(folder), subj, config, s, pure=False,
                                     key=f"atlas-{s['id']}-{time.time_ns()}") for s in todo]
            bar = tqdm(total=len(futures), desc="atlas solves", unit="solve", disable=not progress)
            for fut in as_completed(futures):
                try:
                    status = fut.result()
                except Exception as exc:  # a worker died
                    status = {"id": "?", "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                if status["status"] == "ok":
                    report.solved.append(status["id"])
                else:
                    report.failed[status["id"]] = status["error"].splitlines()[0]
                    log.warning("atlas solve %s failed: %s", status["id"], status.get("traceback", status["error"]))
                bar.update(1)
                fut.release()
            bar.close()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    if report.failed:
        first = next(iter(report.failed.items()))
        raise BrainshiftError(f"expected every atlas solve to succeed, got {len(report.failed)} failed (first: "
                              f"{first[0]}: {first[1]}); run again with the same -o to retry them")

    # ---- reduce
    members, info, node_ref, solve_seconds = collect_members(folder, plan, config)
    mean, comps, coords, sv, retained = reduce_members(np.stack(members), config.energy, config.max_components)
    region = (np.asarray(subject.brain_mask.data) > 0) | (np.asarray(subject.tumour_mask.data) > 0)
    spacing = np.sqrt((subject.image.affine[:3, :3] ** 2).sum(axis=0))
    nodes = NodeGrid(node_grid=node_ref["node_grid"].astype(np.int64),
                     shape=tuple(int(v) for v in node_ref["node_grid_shape"]),
                     origin_vox=np.asarray(node_ref["origin_vox"], dtype=np.float64),
                     step_vox=np.asarray(node_ref["step_vox"], dtype=np.float64),
                     image_shape=tuple(int(v) for v in subject.image.shape), spacing_mm=spacing)
    report.wall_s = time.perf_counter() - t_start
    atlas = DeformationAtlas(nodes=nodes, mean=mean, components=comps, coordinates=coords, singular_values=sv,
                             region=region, affine=np.asarray(subject.image.affine, dtype=np.float64),
                             image_sha256=digest, members=info,
                             info={"config": config.to_dict(), "retained_energy": retained,
                                   "n_solves": len(plan), "subject_id": subject.subject_id,
                                   "has_tumour": bool(np.asarray(subject.tumour_mask.data).any()),
                                   "build_wall_s": round(report.wall_s, 1),
                                   "solve_seconds_total": round(solve_seconds, 1)})
    save_atlas(folder, atlas)
    report.n_members, report.n_components, report.retained_energy = len(members), atlas.n_components, retained
    report.size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    return report
