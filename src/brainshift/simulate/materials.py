"""Tissue materials of the brain model and the per-element mixture rule.

Facts (``shared/reference/biomechanics.md``, after Yu et al. 2022 / Wittek et al.): Ogden hyperelastic tissue
with shear moduli parenchyma 842 Pa, tumour 3 x parenchyma = 2526 Pa, ventricles / CSF 4.54 Pa; density
1000 kg/m^3 for all.

Choices:

- **Linear elasticity** uses the same shear moduli with a Poisson ratio: ``E = 2 mu (1 + nu)``,
  ``lambda = 2 mu nu / (1 - 2 nu)``. Parenchyma and tumour take ``config.poisson_ratio`` (0.45 by default:
  the facts' compressibility D = 4.78e-5 1/Pa corresponds to nu ~ 0.49, which locks fully integrated
  trilinear hexahedra; 0.45 is the usual compromise).
- **Ventricles** (``ventricle_model``). ``"fluid"`` (default): the CSF-filled ventricles are a fluid-like
  solid with the facts' shear modulus (4.54 Pa) and the *bulk* modulus of the parenchyma
  (``lambda_v = K_p - 2/3 mu_v``, ``K_p = lambda_p + 2/3 mu_p``, 8.1 kPa at nu 0.45: nu_v = 0.4997). CSF is
  water (bulk modulus 2.2 GPa), the ventricular system is closed in these cases (drainage at the craniotomy
  empties the subarachnoid space, the ventricles are not opened, and their outflow through the aqueduct is
  slow), so the ventricles keep their volume and carry hydrostatic pressure; capping the bulk modulus at the
  tissue's keeps the model's conditioning. ``"compressible"``: the facts' compressible solid (D = 0.48 1/Pa
  is K = 4.2 Pa, i.e. nu = ``ventricle_poisson_ratio`` = 0.1). Why ``"fluid"`` is the default: in a
  small-strain model the compressible ventricles cannot carry the weight of the tissue above them (moduli of
  ~5 Pa against a weight density of 9.81 Pa/mm over ventricles ~20 mm tall: a linear continuum would sink by
  ~10^2 mm), so pure-ventricle elements collapse and the maximum displacement is a discretisation artefact
  that grows with mesh refinement (measured on the ellipsoid phantom: 1.43 mm at 3 mm, 3.06 mm at 2 mm, at
  the ventricle); with fluid ventricles the maximum is at the craniotomy / cavity and converges (1.41 mm at
  3 mm, 1.30 mm at 2 mm). The facts' meshless large-deformation solver averages properties over a fixed
  support instead, which regularises the same problem differently. Fully integrated pure-ventricle
  elements lock (lambda / mu ~ 1800), which stiffens the ventricles' own shear: they act as nearly rigid,
  volume-preserving inclusions; the surrounding tissue's displacement is what the dataset measures.
- **Mixture rule.** An element with tissue fractions ``f_t`` gets the volume-weighted (Voigt) average of the
  Lame parameters, ``mu_e = sum_t f_t mu_t`` and ``lambda_e = sum_t f_t lambda_t`` (the facts' pipeline averages
  over nearby voxels by tissue fraction the same way).
- **Neo-Hookean option** reuses ``mu_e`` and ``lambda_e`` in ``W = mu/2 (I1 - 3) - mu ln J + lambda/2 (ln J)^2``,
  which reduces to the linear model at small strain.

Units: Pa, kg/m^3; gravity 9.81 m/s^2. In the solver lengths are mm, so a weight density is
``rho g / 1000`` Pa/mm.
"""

from __future__ import annotations

import numpy as np

from brainshift.errors import BrainshiftError

MU_PARENCHYMA_PA = 842.0
MU_TUMOUR_PA = 3.0 * MU_PARENCHYMA_PA
MU_VENTRICLES_PA = 4.54
DENSITY_KG_M3 = 1000.0
DENSITY_CSF_KG_M3 = 1000.0
GRAVITY_M_S2 = 9.81


def lame_lambda(mu_pa: float | np.ndarray, nu: float) -> float | np.ndarray:
    """First Lame parameter ``lambda = 2 mu nu / (1 - 2 nu)`` in Pa.

    Raises:
        BrainshiftError: if ``nu`` is not in (-1, 0.5).
    """
    if not -1.0 < nu < 0.5:
        raise BrainshiftError(f"expected a Poisson ratio in (-1, 0.5), got {nu}")
    return 2.0 * np.asarray(mu_pa) * nu / (1.0 - 2.0 * nu)


def youngs_modulus(mu_pa: float, nu: float) -> float:
    """``E = 2 mu (1 + nu)`` in Pa."""
    return 2.0 * mu_pa * (1.0 + nu)


VENTRICLE_MODELS = ("fluid", "compressible")


def tissue_lame(poisson_ratio: float, ventricle_poisson_ratio: float, tumour_stiffness_ratio: float = 3.0,
                ventricle_model: str = "fluid", shear_modulus_pa: float = MU_PARENCHYMA_PA
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, lambda)`` arrays of shape ``(3,)`` in Pa for parenchyma, tumour, ventricles.

    Args:
        poisson_ratio: nu of parenchyma and tumour.
        ventricle_poisson_ratio: nu of the ventricles with ``ventricle_model="compressible"`` (else unused).
        tumour_stiffness_ratio: tumour / parenchyma shear modulus.
        ventricle_model: ``"fluid"`` (bulk modulus of the parenchyma) or ``"compressible"`` (module docstring).
        shear_modulus_pa: parenchyma shear modulus (842 Pa in the facts; reported values for in-vivo and
            ex-vivo brain span about 0.5-3 kPa: Budday et al. 2017, Hiscox et al. 2016).

    Raises:
        BrainshiftError: unknown ``ventricle_model`` or a Poisson ratio outside (-1, 0.5).
    """
    if ventricle_model not in VENTRICLE_MODELS:
        raise BrainshiftError(f"expected ventricle_model in {VENTRICLE_MODELS}, got {ventricle_model!r}")
    if not shear_modulus_pa > 0:
        raise BrainshiftError(f"expected shear_modulus_pa > 0, got {shear_modulus_pa}")
    mu = np.array([shear_modulus_pa, tumour_stiffness_ratio * shear_modulus_pa, MU_VENTRICLES_PA])
    lam_p = float(lame_lambda(mu[0], poisson_ratio))
    lam_t = float(lame_lambda(mu[1], poisson_ratio))
    if ventricle_model == "fluid":
        lam_v = lam_p + 2.0 / 3.0 * (mu[0] - mu[2])  # same bulk modulus K = lambda + 2/3 mu as the parenchyma
    else:
        lam_v = float(lame_lambda(mu[2], ventricle_poisson_ratio))
    return mu, np.array([lam_p, lam_t, lam_v], dtype=np.float64)


def element_lame(fractions: np.ndarray, poisson_ratio: float = 0.45, ventricle_poisson_ratio: float = 0.1,
                 tumour_stiffness_ratio: float = 3.0, ventricle_model: str = "fluid",
                 shear_modulus_pa: float = MU_PARENCHYMA_PA, parenchyma_scale: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-element ``(mu, lambda)`` in Pa by the Voigt rule from ``(n_elements, 3)`` tissue fractions.

    Args:
        fractions: parenchyma / tumour / ventricle fractions per element (rows sum to 1).
        poisson_ratio: nu of parenchyma and tumour.
        ventricle_poisson_ratio: nu of the ventricles (``ventricle_model="compressible"`` only).
        tumour_stiffness_ratio: tumour shear modulus / parenchyma shear modulus (3 in the facts).
        ventricle_model: ``"fluid"`` or ``"compressible"`` (see the module docstring).
        shear_modulus_pa: parenchyma shear modulus (Pa).
        parenchyma_scale: optional ``(n_elements,)`` positive factor on the parenchyma's ``mu`` and ``lambda``
            (same Poisson ratio), e.g. grey/white heterogeneity from :func:`grey_white_scale`.

    Returns:
        ``(mu_e, lambda_e)``, each ``(n_elements,)`` float64 Pa.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != 3:
        raise BrainshiftError(f"expected tissue fractions of shape (n_elements, 3), got {f.shape}")
    mu, lam = tissue_lame(poisson_ratio, ventricle_poisson_ratio, tumour_stiffness_ratio, ventricle_model,
                          shear_modulus_pa)
    if parenchyma_scale is None:
        return f @ mu, f @ lam
    scale = np.asarray(parenchyma_scale, dtype=np.float64)
    if scale.shape != (f.shape[0],) or not np.all(scale > 0):
        raise BrainshiftError(f"expected a positive parenchyma_scale of shape ({f.shape[0]},), got {scale.shape}")
    mu_e = f[:, 0] * mu[0] * scale + f[:, 1:] @ mu[1:]
    lam_e = f[:, 0] * lam[0] * scale + f[:, 1:] @ lam[1:]
    return mu_e, lam_e


def grey_white_scale(intensity: np.ndarray, white_grey_ratio: float, *, grey_percentile: float = 25.0,
                     white_percentile: float = 85.0) -> np.ndarray:
    """Per-element stiffness factor of grey/white heterogeneity from the T1 intensity at the element centres.

    T1-weighted white matter is brighter than grey matter: ``t = clip((I - I_grey) / (I_white - I_grey), 0, 1)``
    with ``I_grey`` / ``I_white`` the given percentiles of ``intensity``, and the factor is
    ``white_grey_ratio ** (t - 0.5)``: grey matter (``t = 0``) gets ``1 / sqrt(r)``, white matter ``sqrt(r)``,
    so the geometric mean stiffness is unchanged and ``r = 1`` is homogeneous. Reported white/grey shear
    modulus ratios differ in sign between studies (white stiffer in MR elastography, Hiscox et al. 2016; grey
    stiffer ex vivo, Budday et al. 2017), hence a ratio drawn on both sides of 1.

    Args:
        intensity: ``(n_elements,)`` image intensity at the element centres (brain elements).
        white_grey_ratio: white / grey shear modulus ratio (> 0).

    Returns:
        ``(n_elements,)`` float64 factors.
    """
    i = np.asarray(intensity, dtype=np.float64)
    if not white_grey_ratio > 0:
        raise BrainshiftError(f"expected white_grey_ratio > 0, got {white_grey_ratio}")
    if i.size == 0 or white_grey_ratio == 1.0:
        return np.ones(i.shape)
    lo, hi = np.percentile(i, [grey_percentile, white_percentile])
    t = np.clip((i - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return float(white_grey_ratio) ** (t - 0.5)


def weight_density_pa_per_mm(density_kg_m3: float = DENSITY_KG_M3, g_m_s2: float = GRAVITY_M_S2) -> float:
    """Weight per volume ``rho g`` in Pa/mm (N/mm^3 x 1e6): 9.81 Pa/mm for water-dense tissue."""
    return density_kg_m3 * g_m_s2 / 1000.0
