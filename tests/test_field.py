"""Field conventions: world/voxel conversion and the Jacobian determinant (exact properties)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from brainshift.errors import GeometryError
from brainshift.field import (
    check_field,
    displacement_magnitude_mm,
    field_ras_to_voxel,
    field_voxel_to_ras,
    jacobian_determinant,
    voxel_grid,
)
from brainshift.io.atomic import atomic_output


def _oblique_affine():
    th = np.deg2rad(20)
    r = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = r @ np.diag([0.5, 0.5, 3.0])
    a[:3, 3] = [90, -126, -72]
    return a


def test_zero_field_has_unit_jacobian():
    det = jacobian_determinant(np.zeros((3, 6, 7, 8), np.float32))
    np.testing.assert_array_equal(det, np.ones((6, 7, 8), np.float32))


def test_affine_field_jacobian_is_det_of_i_plus_b():
    # u(p) = B p  ->  J = I + B everywhere (central differences are exact for linear functions)
    b = np.array([[0.1, 0.02, 0.0], [-0.05, 0.2, 0.01], [0.0, 0.03, -0.1]])
    grid = voxel_grid((7, 8, 9)).astype(np.float64)
    u = np.einsum("ab,b...->a...", b, grid).astype(np.float32)
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + b), rtol=1e-5)


def test_folding_field_has_nonpositive_jacobian():
    # u_i = -2 i  ->  the map i -> -i reverses orientation: det = -1
    u = np.zeros((3, 5, 5, 5), np.float32)
    u[0] = -2 * voxel_grid((5, 5, 5))[0]
    np.testing.assert_allclose(jacobian_determinant(u), -1.0, rtol=1e-6)


def test_voxel_ras_roundtrip_and_magnitude_on_anisotropic_grid():
    a = np.diag([1.0, 1.0, 2.5, 1.0])
    u = np.zeros((3, 2, 2, 2), np.float32)
    u[2] = 2.0  # 2 voxels along k on 2.5 mm spacing -> 5.0 mm
    np.testing.assert_allclose(displacement_magnitude_mm(u, a), 5.0)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(field_ras_to_voxel(field_voxel_to_ras(f, _oblique_affine()), _oblique_affine()), f,
                               atol=1e-5)


def test_check_field_rejects_wrong_shape_grid_and_nan():
    with pytest.raises(GeometryError, match=r"\(3, I, J, K\)"):
        check_field(np.zeros((2, 4, 4, 4)))
    with pytest.raises(GeometryError, match="image grid"):
        check_field(np.zeros((3, 4, 4, 4)), shape=(4, 4, 5))
    bad = np.zeros((3, 2, 2, 2))
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(GeometryError, match="finite"):
        check_field(bad)


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions open() would give
    # also when the writer replaces the temporary file with its own (safetensors' save_file makes it 0600)
    with atomic_output(tmp_path / "w.safetensors") as tmp:
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_check_field_refuses_non_real_dtypes_and_values_beyond_float32():
    # text / objects raised numpy's TypeError from isfinite; complex lost its imaginary part and 1e300 (float64)
    # became inf as float32, both returned without a word
    for dtype in (object, np.complex64, "<U3"):
        with pytest.raises(GeometryError, match=r"^expected a displacement field of real numbers \(float32\), got "
                                                r"dtype (object|complex64|<U3)$"):
            check_field(np.zeros((3, 2, 2, 2), dtype=dtype))
    with pytest.raises(GeometryError, match="beyond float32's range"):
        check_field(np.full((3, 2, 2, 2), 1e300))
    assert check_field(np.ones((3, 2, 2, 2), np.int16)).dtype == np.float32  # integers are real numbers
