"""Tissue materials of the brain model and the per-element mixture rule.

Facts (``shared/reference/biomechanics.md``, after Yu et al. 2022 / Wittek et al.): Ogden hyperelastic tissue
with shear moduli parenchyma 842 Pa, tumour 3 x parenchyma = 2526 Pa, ventricles / CSF 4.54 Pa; density
1000 kg/m^3 for all.

Choices:

- **Linear elasticity** uses the same shear moduli with a Poisson ratio: ``E = 2 mu (1 + nu)``,
  ``lambda = 2 mu nu / (1 - 2 nu)``. Parenchyma and tumour take ``config.poisson_ratio`` (0.45 by default:
  the facts' compressibility D = 4.78e-5 1/Pa corresponds to nu ~ 0.49, which locks fully integrated
  trilinear hexahedra; 0.45 is the usual compromise). The ventricles are a very soft, *compressible* solid
  (mu = 4.54 Pa, nu = ``ventricle_poisson_ratio``, 0.1 by default): drained CSF spaces collapse instead of
  resisting volume change, which is what the facts' large D = 0.48 1/Pa expresses.
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


def tissue_lame(poisson_ratio: float, ventricle_poisson_ratio: float, tumour_stiffness_ratio: float = 3.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, lambda)`` arrays of shape ``(3,)`` in Pa for parenchyma, tumour, ventricles."""
    mu = np.array([MU_PARENCHYMA_PA, tumour_stiffness_ratio * MU_PARENCHYMA_PA, MU_VENTRICLES_PA])
    nus = np.array([poisson_ratio, poisson_ratio, ventricle_poisson_ratio])
    lam = np.array([lame_lambda(m, n) for m, n in zip(mu, nus, strict=True)], dtype=np.float64)
    return mu, lam


def element_lame(fractions: np.ndarray, poisson_ratio: float = 0.45, ventricle_poisson_ratio: float = 0.1,
                 tumour_stiffness_ratio: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-element ``(mu, lambda)`` in Pa by the Voigt rule from ``(n_elements, 3)`` tissue fractions.

    Args:
        fractions: parenchyma / tumour / ventricle fractions per element (rows sum to 1).
        poisson_ratio: nu of parenchyma and tumour.
        ventricle_poisson_ratio: nu of the ventricles.
        tumour_stiffness_ratio: tumour shear modulus / parenchyma shear modulus (3 in the facts).

    Returns:
        ``(mu_e, lambda_e)``, each ``(n_elements,)`` float64 Pa.
    """
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != 3:
        raise BrainshiftError(f"expected tissue fractions of shape (n_elements, 3), got {f.shape}")
    mu, lam = tissue_lame(poisson_ratio, ventricle_poisson_ratio, tumour_stiffness_ratio)
    return f @ mu, f @ lam


def weight_density_pa_per_mm(density_kg_m3: float = DENSITY_KG_M3, g_m_s2: float = GRAVITY_M_S2) -> float:
    """Weight per volume ``rho g`` in Pa/mm (N/mm^3 x 1e6): 9.81 Pa/mm for water-dense tissue."""
    return density_kg_m3 * g_m_s2 / 1000.0
