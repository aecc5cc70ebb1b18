"""Convention tests on the oblique, anisotropic grid (issue 3): SimpleITK vs nibabel geometry, voxel-unit
displacements in mm, and the same keypoints given in voxel, RAS and LPS tables."""

from __future__ import annotations

import numpy as np
import pytest
from _io_helpers import OBLIQUE_SHAPE, oblique_affine_matrix, smooth_field

from brainshift.io import frames


def test_sitk_physical_point_equals_nibabel_after_lps_flip(tmp_path, oblique_affine):
    import nibabel as nib
    import SimpleITK as sitk

    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(OBLIQUE_SHAPE, np.float32), oblique_affine), str(path))
    img = sitk.ReadImage(str(path))
    itk_lps = np.array(img.TransformIndexToPhysicalPoint((10, 10, 10)))
    # expected by hand: nibabel's affine applied to (10, 10, 10, 1), then x and y negated
    ras = nib.load(str(path)).affine @ np.array([10.0, 10.0, 10.0, 1.0])
    expected_lps = np.array([-ras[0], -ras[1], ras[2]])
    np.testing.assert_allclose(itk_lps, expected_lps, atol=1e-4)
    # and brainshift's conversion of the same geometry agrees with ITK's reading of the file
    origin, spacing, direction = frames.affine_to_itk(oblique_affine)
    np.testing.assert_allclose(img.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), spacing, atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), direction, atol=1e-6)
    np.testing.assert_allclose(frames.affine_from_itk(img.GetOrigin(), img.GetSpacing(), img.GetDirection()),
                               oblique_affine, atol=1e-4)


@pytest.mark.parametrize("angle", [0.0, 20.0])
def test_voxel_displacement_is_5mm_on_spacing_1_1_2p5(angle):
    affine = oblique_affine_matrix(angle, zooms=(1.0, 1.0, 2.5))
    d_ras = frames.voxel_vectors_to_ras(np.array([[0.0, 0.0, 2.0]]), affine)
    assert np.linalg.norm(d_ras) == pytest.approx(5.0, abs=1e-12)
    np.testing.assert_allclose(d_ras, [[0.0, 0.0, 5.0]], atol=1e-12)  # k axis is world z for a z rotation
    np.testing.assert_allclose(frames.vectors_to_voxel(d_ras, "ras", affine), [[0.0, 0.0, 2.0]], atol=1e-12)


def _write_table(path, points, disps, header=True):
    rows = ["x,y,z,dx,dy,dz"] if header else []
    rows += [",".join(repr(float(v)) for v in (*p, *d)) for p, d in zip(points, disps, strict=True)]
    path.write_text("\n".join(rows) + "\n")


def test_same_keypoints_in_voxel_ras_lps_tables_agree(tmp_path, oblique_affine):
    from brainshift.io.keypoints import read_keypoint_table

    pts = np.array([[3.0, 4.0, 5.0], [10.5, 2.0, 7.0], [18.0, 20.0, 1.0], [0.0, 0.0, 0.0]])
    dsp = np.array([[1.0, 0.0, 0.0], [0.0, -2.0, 0.5], [0.25, 0.5, -1.0], [0.0, 0.0, 2.0]])
    # world values computed by hand from the affine: p_ras = A p + t, d_ras = A d; LPS negates x and y
    a, t = oblique_affine[:3, :3], oblique_affine[:3, 3]
    pts_ras, dsp_ras = pts @ a.T + t, dsp @ a.T
    flip = np.array([-1.0, -1.0, 1.0])
    _write_table(tmp_path / "vox.csv", pts, dsp)
    _write_table(tmp_path / "ras.csv", pts_ras, dsp_ras)
    _write_table(tmp_path / "lps.csv", pts_ras * flip, dsp_ras * flip)
    for name, frame in (("vox.csv", "voxel"), ("ras.csv", "ras"), ("lps.csv", "lps")):
        p, d = read_keypoint_table(tmp_path / name, frame=frame, affine=oblique_affine)
        np.testing.assert_allclose(p, pts, atol=1e-9, err_msg=frame)
        np.testing.assert_allclose(d, dsp, atol=1e-9, err_msg=frame)


def test_field_world_vectors_by_hand(oblique_affine):
    f = np.zeros((3, 2, 2, 2), np.float32)
    f[0] = 1.0  # one voxel along i: RAS = first affine column (0.5 cos20, 0.5 sin20, 0)
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    ras = frames.field_to_world_vectors(f, oblique_affine, "ras")
    lps = frames.field_to_world_vectors(f, oblique_affine, "lps")
    assert ras.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(ras[1, 0, 1], [0.5 * c, 0.5 * s, 0.0], atol=1e-12)
    np.testing.assert_allclose(lps[1, 0, 1], [-0.5 * c, -0.5 * s, 0.0], atol=1e-12)
    g = smooth_field((5, 6, 4))
    for frame in ("ras", "lps"):
        back = frames.world_vectors_to_field(frames.field_to_world_vectors(g, oblique_affine, frame), oblique_affine,
                                             frame)
        assert back.dtype == np.float32
        np.testing.assert_allclose(back, g, atol=1e-6)


def test_points_and_vectors_from_voxel_invert_to_voxel(oblique_affine):
    rng = np.random.default_rng(1)
    p, v = rng.uniform(0, 10, (7, 3)), rng.normal(size=(7, 3))
    for frame in ("voxel", "ras", "lps"):
        np.testing.assert_allclose(
            frames.points_to_voxel(frames.points_from_voxel(p, frame, oblique_affine), frame, oblique_affine), p,
            atol=1e-10)
        np.testing.assert_allclose(
            frames.vectors_to_voxel(frames.vectors_from_voxel(v, frame, oblique_affine), frame, oblique_affine), v,
            atol=1e-10)
    # LPS of a point is its RAS with x and y negated
    np.testing.assert_allclose(frames.points_from_voxel(p, "lps", oblique_affine),
                               frames.points_from_voxel(p, "ras", oblique_affine) * [-1, -1, 1], atol=1e-12)
