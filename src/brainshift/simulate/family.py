"""A family of biomechanical models: the modelling choices each simulated case draws, as well as its geometry.

Why: two equally plausible simulators of the same brain shift (same anatomy, tumour, gravity, drainage and
craniotomy) disagree by far more than an interpolator's error, so a refinement learnt from one set of
modelling choices is confidently wrong under another. Drawing the choices per case (domain randomisation of
the physics) lets a network learn what is common to all of them; holding whole choices out of training
(leave-one-model-out, ``bench/generalization.py``) measures how it behaves on models it never saw.

A :class:`ModelFamily` lists, for every choice, either the options with their weights (a mapping
``{option: weight}``, or a list for equal weights) or a range ``[low, high]`` drawn uniformly (log-uniformly
for the shear modulus and the white/grey ratio). :func:`draw_model` turns one draw into overrides of
:class:`~brainshift.simulate.case.SimulationConfig` fields, recorded per case in ``meta.json``
(``params.model``). What each choice models and its source: ``docs/simulate.md``, section "Model family".

Random draws are separated from the deterministic solve: ``draw_model`` takes a NumPy ``Generator``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from brainshift.errors import BrainshiftError

CONTACT = ("unilateral", "bilateral", "no_slip", "tied")
VENTRICLES = ("fluid", "compressible")
GRAVITY = ("drained", "buoyant")
MATERIALS = ("linear", "neo-hookean")
#: Poisson ratio from which a linear case uses selective reduced (1-point volumetric) integration, against
#: volumetric locking of nearly incompressible trilinear hexahedra (Hughes 1980).
REDUCED_INTEGRATION_FROM_NU = 0.47


def _d(**kw) -> dict:
    return field(default_factory=lambda: dict(kw))


@dataclass
class ModelFamily:
    """The distribution of modelling choices (JSON/YAML-serialisable with :meth:`to_dict`).

    Attributes:
        contact: weights of the skull contact models (:mod:`brainshift.simulate.contact`).
        ventricles: weights of the ventricle / CSF models (:mod:`brainshift.simulate.materials`); a
            ``"compressible"`` case draws its Poisson ratio in ``ventricle_poisson_ratio`` (0 = a drained,
            collapsible cavity; 0.4 = a soft solid).
        ventricle_poisson_ratio: range of the compressible ventricles' Poisson ratio.
        gravity: ``"drained"`` (only tissue above the drained CSF level carries its weight) or ``"buoyant"``
            (the whole brain is loaded, tissue below the fluid level with its buoyant weight fraction).
        buoyant_weight_fraction: range of ``(rho_tissue - rho_csf) / rho_tissue`` for ``"buoyant"`` cases.
        drainage_fraction: range of the drained CSF level (fraction of the brain's extent along gravity).
        shear_modulus_pa: range (log-uniform) of the parenchyma's shear modulus (Pa).
        poisson_ratio: range of the parenchyma and tumour Poisson ratio.
        tumour_stiffness_ratio: range of the tumour (and its residual margin) / parenchyma stiffness ratio.
        heterogeneity_probability: probability of grey/white heterogeneity.
        white_grey_stiffness_ratio: range (log-uniform) of the white / grey stiffness ratio when heterogeneous.
        craniotomy_radius_mm: range of the craniotomy radius (mm).
        max_gravity_angle_deg: largest tilt of gravity from the surgical approach (degrees; drawn uniformly on
            the spherical cap).
        resection_probability: probability that the tumour is resected.
        falx_probability: probability of a falx (fixed midsagittal plane above the ventricles).
        resolution_mm: weights of the element sizes (mm).
        material: weights of the constitutive models.
    """

    contact: dict = _d(unilateral=1.0, bilateral=1.0, no_slip=1.0)
    ventricles: dict = _d(fluid=1.0, compressible=1.0)
    ventricle_poisson_ratio: tuple[float, float] = (0.0, 0.4)
    gravity: dict = _d(drained=1.0, buoyant=1.0)
    buoyant_weight_fraction: tuple[float, float] = (0.02, 0.06)
    drainage_fraction: tuple[float, float] = (0.0, 0.7)
    shear_modulus_pa: tuple[float, float] = (500.0, 3000.0)
    poisson_ratio: tuple[float, float] = (0.40, 0.49)
    tumour_stiffness_ratio: tuple[float, float] = (1.0, 5.0)
    heterogeneity_probability: float = 0.5
    white_grey_stiffness_ratio: tuple[float, float] = (0.5, 2.0)
    craniotomy_radius_mm: tuple[float, float] = (15.0, 45.0)
    max_gravity_angle_deg: float = 45.0
    resection_probability: float = 0.7
    falx_probability: float = 0.3
    resolution_mm: dict = field(default_factory=lambda: {3.0: 1.0, 4.0: 1.0})
    material: dict = field(default_factory=lambda: {"linear": 0.8, "neo-hookean": 0.2})

    def __post_init__(self) -> None:
        for name in ("contact", "ventricles", "gravity", "resolution_mm", "material"):
            setattr(self, name, _weights(name, getattr(self, name)))
        self.resolution_mm = {float(k): v for k, v in self.resolution_mm.items()}
        for name in _RANGES:
            setattr(self, name, _range(name, getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`BrainshiftError` naming the first bad field."""
        allowed = {"contact": CONTACT, "ventricles": VENTRICLES, "gravity": GRAVITY, "material": MATERIALS}
        for name, options in allowed.items():
            bad = set(getattr(self, name)) - set(options)
            if bad:
                raise BrainshiftError(f"expected family.{name} options among {list(options)}, got {sorted(bad)}")
        if any(not r > 0 for r in self.resolution_mm):
            raise BrainshiftError(f"expected family.resolution_mm element sizes > 0, got {list(self.resolution_mm)}")
        checks = {
            "ventricle_poisson_ratio": (0.0, 0.499), "buoyant_weight_fraction": (0.0, 1.0),
            "drainage_fraction": (0.0, 1.0), "shear_modulus_pa": (1e-6, np.inf), "poisson_ratio": (0.0, 0.499),
            "tumour_stiffness_ratio": (1e-6, np.inf), "white_grey_stiffness_ratio": (1e-6, np.inf),
            "craniotomy_radius_mm": (0.0, np.inf),
        }
        for name, (lo, hi) in checks.items():
            a, b = getattr(self, name)
            if not lo <= a <= b <= hi:
                raise BrainshiftError(f"expected family.{name} as [low, high] within [{lo}, {hi}], got {[a, b]}")
        for name in ("heterogeneity_probability", "resection_probability", "falx_probability"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise BrainshiftError(f"expected family.{name} in [0, 1], got {p}")
        if not 0.0 <= self.max_gravity_angle_deg <= 180.0:
            raise BrainshiftError(f"expected family.max_gravity_angle_deg in [0, 180], got "
                                  f"{self.max_gravity_angle_deg}")

    def to_dict(self) -> dict:
        """JSON-serialisable dict of every field (ranges as lists, weights as mappings)."""
        d = dataclasses.asdict(self)
        for name in _RANGES:
            d[name] = list(d[name])
        d["resolution_mm"] = {float(k): float(v) for k, v in self.resolution_mm.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelFamily:
        """Inverse of :meth:`to_dict`; missing keys take the defaults (the full family), unknown keys raise."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise BrainshiftError(f"expected model family keys among {sorted(names)}, got unknown {sorted(bad)}")
        if isinstance(d.get("resolution_mm"), dict):  # JSON turns float keys into strings
            d["resolution_mm"] = {float(k): v for k, v in d["resolution_mm"].items()}
        return cls(**d)


_RANGES = ("ventricle_poisson_ratio", "buoyant_weight_fraction", "drainage_fraction", "shear_modulus_pa",
           "poisson_ratio", "tumour_stiffness_ratio", "white_grey_stiffness_ratio", "craniotomy_radius_mm")


def _weights(name: str, value) -> dict:
    if isinstance(value, (list, tuple)):
        value = {k: 1.0 for k in value}
    if not isinstance(value, dict) or not value:
        raise BrainshiftError(f"expected family.{name} as a non-empty list of options or mapping option -> weight, "
                              f"got {value!r}")
    try:
        w = {k: float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise BrainshiftError(f"expected numeric weights in family.{name}, got {value!r}") from None
    if any(not np.isfinite(v) or v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise BrainshiftError(f"expected non-negative weights with a positive sum in family.{name}, got {w}")
    return w


def _range(name: str, value) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        lo, hi = (float(x) for x in value)
    except (TypeError, ValueError):
        raise BrainshiftError(f"expected family.{name} as [low, high] numbers, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
        raise BrainshiftError(f"expected family.{name} as finite [low, high] with low <= high, got {[lo, hi]}")
    return lo, hi


def _choice(weights: dict, rng: np.random.Generator):
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _uniform(r: tuple[float, float], rng: np.random.Generator) -> float:
    return float(rng.uniform(r[0], r[1]))


def _log_uniform(r: tuple[float, float], rng: np.random.Generator) -> float:
    return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))


def draw_model(family: ModelFamily, rng: np.random.Generator) -> dict:
    """Draw one case's modelling choices.

    Args:
        family: the :class:`ModelFamily`.
        rng: NumPy Generator (the case's; the draws come before the geometric ones).

    Returns:
        A JSON-serialisable dict of :class:`~brainshift.simulate.case.SimulationConfig` overrides (``material``,
        ``contact_model``, ``ventricle_model``, ``ventricle_poisson_ratio``, ``buoyant_weight_fraction``,
        ``drainage_fraction_range`` (one value), ``shear_modulus_pa``, ``poisson_ratio``,
        ``volumetric_integration``, ``tumour_stiffness_ratio``, ``white_grey_stiffness_ratio``,
        ``craniotomy_radius_mm``, ``max_gravity_angle_deg``, ``resection``, ``falx``, ``resolution_mm``) plus the
        labels ``gravity_model`` for the record.
    """
    material = _choice(family.material, rng)
    contact = _choice(family.contact, rng)
    ventricles = _choice(family.ventricles, rng)
    nu_v = _uniform(family.ventricle_poisson_ratio, rng)
    gravity = _choice(family.gravity, rng)
    buoyant = _uniform(family.buoyant_weight_fraction, rng)
    drainage = _uniform(family.drainage_fraction, rng)
    mu = _log_uniform(family.shear_modulus_pa, rng)
    nu = _uniform(family.poisson_ratio, rng)
    tumour = _uniform(family.tumour_stiffness_ratio, rng)
    hetero = bool(rng.uniform() < family.heterogeneity_probability)
    white_grey = _log_uniform(family.white_grey_stiffness_ratio, rng)
    radius = _uniform(family.craniotomy_radius_mm, rng)
    resection = bool(rng.uniform() < family.resection_probability)
    falx = bool(rng.uniform() < family.falx_probability)
    resolution = float(_choice(family.resolution_mm, rng))
    return {
        "material": material,
        "contact_model": contact,
        "ventricle_model": ventricles,
        "ventricle_poisson_ratio": nu_v if ventricles == "compressible" else 0.1,
        "gravity_model": gravity,
        "buoyant_weight_fraction": buoyant if gravity == "buoyant" else 0.0,
        "drainage_fraction_range": [drainage, drainage],
        "shear_modulus_pa": mu,
        "poisson_ratio": nu,
        "volumetric_integration": ("reduced" if material == "linear" and nu >= REDUCED_INTEGRATION_FROM_NU
                                   else "full"),
        "tumour_stiffness_ratio": tumour,
        "white_grey_stiffness_ratio": white_grey if hetero else 1.0,
        "craniotomy_radius_mm": radius,
        "max_gravity_angle_deg": float(family.max_gravity_angle_deg),
        "resection": resection,
        "falx": falx,
        "resolution_mm": resolution,
    }


#: Labels of a drawn model that are records, not configuration fields.
RECORD_ONLY = ("gravity_model",)
