"""Tissue materials: Lame parameters from the facts, the ventricle models, the Voigt mixture."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.errors import BrainshiftError
from brainshift.simulate import materials as M


def test_parenchyma_and_tumour_from_shear_modulus_and_poisson_ratio():
    mu, lam = M.tissue_lame(0.45, 0.1)
    np.testing.assert_allclose(mu, [842.0, 2526.0, 4.54])
    np.testing.assert_allclose(lam[:2], 2.0 * mu[:2] * 0.45 / 0.1)  # lambda = 2 mu nu / (1 - 2 nu)


def test_fluid_ventricles_have_the_parenchyma_bulk_modulus():
    mu, lam = M.tissue_lame(0.45, 0.1, ventricle_model="fluid")
    bulk = lam + 2.0 / 3.0 * mu
    assert bulk[2] == pytest.approx(bulk[0], rel=1e-12)
    assert mu[2] == 4.54  # shear modulus kept from the facts
    nu_v = lam[2] / (2.0 * (lam[2] + mu[2]))
    assert 0.4995 < nu_v < 0.5


def test_compressible_ventricles_match_the_facts_compressibility():
    # facts: D = 0.48058 1/Pa with D = 2 / K, mu = 4.54 Pa -> nu = (3K - 2mu) / (2 (3K + mu)) ~ 0.1
    mu, lam = M.tissue_lame(0.45, 0.1, ventricle_model="compressible")
    bulk = lam[2] + 2.0 / 3.0 * mu[2]
    assert bulk == pytest.approx(2.0 / 0.48058, rel=0.02)


def test_voigt_mixture_and_errors():
    f = np.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    mu, lam = M.element_lame(f, ventricle_model="compressible")
    assert mu[1] == pytest.approx(0.5 * (842.0 + 4.54))
    assert lam[2] == pytest.approx(M.lame_lambda(2526.0, 0.45))
    with pytest.raises(BrainshiftError, match="ventricle_model"):
        M.tissue_lame(0.45, 0.1, ventricle_model="water")
    with pytest.raises(BrainshiftError, match="shape"):
        M.element_lame(np.ones((3, 2)))


def test_shear_modulus_scales_parenchyma_and_tumour_not_ventricles():
    f = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mu1, lam1 = M.element_lame(f, 0.45, 0.1, 3.0, "compressible", shear_modulus_pa=842.0)
    mu2, lam2 = M.element_lame(f, 0.45, 0.1, 3.0, "compressible", shear_modulus_pa=1684.0)
    np.testing.assert_allclose(mu2[:2], 2.0 * mu1[:2])
    np.testing.assert_allclose(lam2[:2], 2.0 * lam1[:2])
    assert mu2[2] == mu1[2] == M.MU_VENTRICLES_PA


def test_grey_white_scale_properties():
    i = np.linspace(0.0, 100.0, 1001)
    np.testing.assert_array_equal(M.grey_white_scale(i, 1.0), np.ones_like(i))
    s = M.grey_white_scale(i, 2.0)
    assert np.all(np.diff(s) >= 0)  # brighter (whiter) is stiffer for a ratio > 1
    np.testing.assert_allclose([s.min(), s.max()], [2.0 ** -0.5, 2.0 ** 0.5])
    np.testing.assert_allclose(M.grey_white_scale(i, 0.5), 1.0 / s)
    f = np.tile([1.0, 0.0, 0.0], (i.size, 1))
    mu, _ = M.element_lame(f, 0.45, parenchyma_scale=s)
    np.testing.assert_allclose(mu, M.MU_PARENCHYMA_PA * s)
