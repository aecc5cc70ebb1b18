"""Fixtures for the I/O tests: the oblique, anisotropic grid of the issue's convention tests.

Affine = a 20 degree rotation about z times diag(0.5, 0.5, 3.0), origin (90, -126, -72) mm (RAS).
No ``__init__.py`` in this folder on purpose: a package named ``io`` would shadow the standard library, so the
shared helpers live in the uniquely named module ``_io_helpers``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _io_helpers import OBLIQUE_SHAPE, oblique_affine_matrix


@pytest.fixture
def oblique_affine() -> np.ndarray:
    return oblique_affine_matrix()


@pytest.fixture
def oblique_volume(oblique_affine):
    from brainshift.volume import Volume

    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in OBLIQUE_SHAPE], indexing="ij")
    data = (100.0 + 10.0 * np.sin(i / 3.0) + 5.0 * np.cos(j / 4.0) + 2.0 * k).astype(np.float32)
    return Volume(data, oblique_affine, "intensity")
