"""Subjects: MNI152 synthesis (determinism, tumour placement and appearance, warp) and real-cohort loading."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from brainshift.errors import GeometryError, InputFileError
from brainshift.field import jacobian_determinant
from brainshift.geometry import ras_to_voxel, voxel_to_ras
from brainshift.simulate.subject import SynthesisConfig, _synthesize, load_subject, synthesize_subject

CFG = SynthesisConfig()


@pytest.fixture(scope="module")
def synth0():
    return _synthesize(0, CFG, "s0")


@pytest.fixture(scope="module")
def synth1():
    return _synthesize(1, CFG, "s1")


# ------------------------------------------------------------------------------------------- synthesis


def test_synthesis_is_deterministic_per_seed(synth0):
    again = synthesize_subject(0, config=CFG, subject_id="s0")
    subject = synth0[0]
    for attr in ("image", "brain_mask", "tumour_mask", "ventricles_mask"):
        np.testing.assert_array_equal(getattr(again, attr).data, getattr(subject, attr).data)
        np.testing.assert_array_equal(getattr(again, attr).affine, getattr(subject, attr).affine)
    assert again.info == subject.info
    json.dumps(subject.info)  # serialisable as subject.json


def test_synthesis_differs_across_seeds(synth0, synth1):
    a, b = synth0[0], synth1[0]
    assert a.info["scales"] != b.info["scales"]
    assert np.linalg.norm(np.subtract(a.info["tumour_centre_ras"], b.info["tumour_centre_ras"])) > 1.0
    assert a.image.shape != b.image.shape or not np.array_equal(a.image.data, b.image.data)


def test_masks_consistent_and_on_one_grid(synth0):
    s = synth0[0]
    brain, tumour, vent = (v.data.astype(bool) for v in (s.brain_mask, s.tumour_mask, s.ventricles_mask))
    for v in (s.brain_mask, s.tumour_mask, s.ventricles_mask):
        assert v.same_grid(s.image) and v.kind == "label" and v.data.dtype == np.uint8
    assert np.all(brain[tumour]) and np.all(brain[vent])
    assert not np.any(tumour & vent)
    assert vent.sum() > 5000  # both lateral ventricles (5,649 voxels each on the template, scaled 0.9-1.1)
    # cropped 1 mm grid, size a multiple of 16, template orientation (identity 3x3 for MNI152)
    assert all(n % 16 == 0 for n in s.image.shape)
    np.testing.assert_allclose(s.image.affine[:3, :3], np.eye(3))
    assert np.all(s.image.data[~brain] == 0)


def test_affine_keeps_world_position(synth0):
    # scaling is about the template brain's centroid (MNI (0, -22, 9.5) mm) and the warp moves points by at
    # most warp_amplitude_mm, so the synthetic brain's centroid stays within a few mm of it
    s = synth0[0]
    centroid = voxel_to_ras(np.argwhere(s.brain_mask.data > 0).mean(axis=0)[None], s.image.affine)[0]
    assert np.linalg.norm(centroid - np.array([0.0, -22.0, 9.5])) < 6.0


def test_tumour_radius_in_range(synth0, synth1):
    lo, hi = CFG.tumour_radius_range_mm
    for s, _ in (synth0, synth1):
        n = int(s.tumour_mask.data.sum())
        r_eq = (3 * n / (4 * np.pi)) ** (1 / 3)  # 1 mm voxels
        assert r_eq == pytest.approx(s.info["tumour_equivalent_radius_mm"])
        # volume-equivalent radius of the rasterised blob: the drawn radius up to voxelisation (< 0.25 mm)
        assert lo - 0.25 <= r_eq <= hi + 0.25
        assert abs(r_eq - s.info["tumour_radius_mm"]) < 0.25


def test_tumour_centred_in_white_matter_away_from_ventricles(synth0, synth1):
    for s, maps in (synth0, synth1):
        c_vox = ras_to_voxel(np.array([s.info["tumour_centre_ras"]]), s.image.affine)[0]
        wm_c = ndi.map_coordinates(maps["wm"], c_vox[:, None], order=1)[0]
        assert wm_c >= CFG.min_white_matter_probability
        assert s.tumour_mask.data[tuple(np.rint(c_vox).astype(int))] == 1
        vent = s.ventricles_mask.data.astype(bool)
        d = np.linalg.norm(np.argwhere(vent) - c_vox, axis=1).min()
        assert d >= CFG.min_ventricle_distance_mm - 0.5


def test_tumour_at_least_10mm_from_brain_surface(synth0, synth1):
    for s, _ in (synth0, synth1):
        dist = ndi.distance_transform_edt(s.brain_mask.data > 0)
        assert dist[s.tumour_mask.data > 0].min() >= 10.0
        assert dist[s.tumour_mask.data > 0].min() == pytest.approx(s.info["tumour_min_surface_distance_mm"])


def test_tumour_appearance_core_darker_than_rim_and_range_kept(synth0):
    s, maps = synth0
    img, srad = s.image.data, maps["s"]
    core = img[srad < 0.3].mean()
    rim = img[(srad > 0.85) & (srad <= 1.0)].mean()
    wm = img[(maps["wm"] > 0.95) & ~np.isfinite(srad)].mean()
    assert core < rim
    assert core < 0.6 * wm  # hypointense core (template WM ~0.87, CSF ~0.34)
    assert rim > wm  # enhancing-like rim brighter than white matter
    # intensity range of the (warped) image kept: same min and max, the rim reaching the maximum
    plain = maps["t1_without_tumour"]
    assert img.min() == plain.min() and img.max() == plain.max()
    assert img[(srad > 0.85) & (srad <= 1.0)].max() == plain.max()
    assert not np.array_equal(img, plain)


def test_warp_is_diffeomorphic_and_bounded(synth0, synth1):
    for s, maps in (synth0, synth1):
        det = jacobian_determinant(maps["warp_vox"])
        assert det.min() > 0
        mag = np.sqrt((maps["warp_vox"] ** 2).sum(axis=0))  # 1 mm identity grid: voxel units are mm
        assert mag.max() <= CFG.warp_amplitude_mm + 1e-3
        assert mag.max() == pytest.approx(s.info["warp_max_displacement_mm"], rel=1e-5)
        assert mag.max() > 0.5 * CFG.warp_amplitude_mm  # the warp actually deforms


def test_synthesis_config_validation():
    with pytest.raises(GeometryError, match="tumour radius"):
        SynthesisConfig(tumour_radius_range_mm=(20.0, 10.0))
    with pytest.raises(GeometryError, match="unknown"):
        SynthesisConfig.from_dict({"warp_amplitude": 3.0})
    cfg = SynthesisConfig.from_dict({"scale_range": [0.95, 1.05]})
    assert cfg.scale_range == (0.95, 1.05)


def test_impossible_placement_raises():
    # nothing in the brain is 90 mm deep
    with pytest.raises(GeometryError, match="deep"):
        synthesize_subject(0, config=SynthesisConfig(min_surface_distance_mm=90.0, max_placement_attempts=2))


# ------------------------------------------------------------------------------------------ real cohorts


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def cohort(tmp_path):
    """A 20^3 image with a 16^3 brain, BraTS labels 1/2/4 inside and a SynthSeg-like ventricle map."""
    shape = (20, 20, 20)
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    brain = np.zeros(shape, np.uint8)
    brain[2:18, 2:18, 2:18] = 1
    labels = np.zeros(shape, np.int16)
    labels[6:12, 6:12, 6:12] = 2  # oedema
    labels[7:11, 7:11, 7:11] = 4  # enhancing
    labels[8:10, 8:10, 8:10] = 1  # necrotic core
    seg = np.zeros(shape, np.int16)
    seg[13:16, 4:8, 4:8] = 4  # left lateral ventricle (SynthSeg)
    seg[13:16, 12:16, 4:8] = 43  # right lateral ventricle
    seg[3:5, 3:5, 3:5] = 2  # white matter label, not ventricle
    return {
        "image": _save(tmp_path / "case01_t1.nii.gz", img),
        "brain": _save(tmp_path / "brain.nii.gz", brain),
        "tumour": _save(tmp_path / "seg.nii.gz", labels),
        "synthseg": _save(tmp_path / "synthseg.nii.gz", seg),
        "labels": labels, "seg": seg, "brain_arr": brain, "img": img, "dir": tmp_path,
    }


def test_load_subject_any_nonzero_label_is_tumour(cohort):
    s = load_subject(cohort["image"], cohort["brain"], cohort["tumour"])
    np.testing.assert_array_equal(s.tumour_mask.data, (cohort["labels"] > 0).astype(np.uint8))
    assert s.subject_id == "case01_t1"
    assert s.ventricles_mask.data.sum() == 0
    np.testing.assert_array_equal(s.image.data, cohort["img"])
    assert s.info["n_tumour_voxels"] == 6 ** 3


def test_load_subject_tumour_labels_select(cohort):
    s = load_subject(cohort["image"], cohort["brain"], cohort["tumour"], tumour_labels=(1, 4), subject_id="p1")
    np.testing.assert_array_equal(s.tumour_mask.data, np.isin(cohort["labels"], (1, 4)).astype(np.uint8))
    assert s.tumour_mask.data.sum() == 4 ** 3 and s.subject_id == "p1"


def test_load_subject_ventricles_from_label_map(cohort):
    s = load_subject(cohort["image"], cohort["brain"], cohort["tumour"], ventricles_path=cohort["synthseg"],
                     ventricle_labels=[4, 43])
    expected = np.isin(cohort["seg"], (4, 43))
    np.testing.assert_array_equal(s.ventricles_mask.data.astype(bool), expected)
    assert s.ventricles_mask.data.sum() == 2 * 3 * 4 * 4


def test_load_subject_ventricles_from_the_tumour_map(cohort):
    combined = cohort["labels"].copy()
    combined[13:16, 4:8, 4:8] = 9
    path = _save(cohort["dir"] / "combined.nii.gz", combined)
    s = load_subject(cohort["image"], cohort["brain"], path, tumour_labels=[1, 2, 4], ventricle_labels=[9])
    assert s.ventricles_mask.data.sum() == 3 * 4 * 4
    assert s.tumour_mask.data.sum() == 6 ** 3
    with pytest.raises(InputFileError, match="tumour_labels"):
        load_subject(cohort["image"], cohort["brain"], path, ventricle_labels=[9])


def test_load_subject_resamples_masks_on_another_grid(cohort):
    # a 2 mm brain mask covering the same field of view; nearest-neighbour resampling to the 1 mm grid
    brain2 = np.zeros((10, 10, 10), np.uint8)
    brain2[1:9, 1:9, 1:9] = 1
    aff2 = np.diag([2.0, 2.0, 2.0, 1.0])
    aff2[:3, 3] = 0.5  # voxel centre (0,0,0) of the 2 mm grid lies between 1 mm voxels 0 and 1
    path = _save(cohort["dir"] / "brain2mm.nii.gz", brain2, aff2)
    s = load_subject(cohort["image"], path, cohort["tumour"])
    assert s.brain_mask.same_grid(s.image)
    # 2 mm voxel b covers 1 mm voxels 2b and 2b+1, so voxels 2..17 are brain, as in the 1 mm mask
    np.testing.assert_array_equal(s.brain_mask.data, cohort["brain_arr"])


def test_load_subject_errors(cohort):
    empty = _save(cohort["dir"] / "empty.nii.gz", np.zeros((20, 20, 20), np.int16))
    with pytest.raises(GeometryError, match="non-empty tumour"):
        load_subject(cohort["image"], cohort["brain"], empty)
    with pytest.raises(GeometryError, match="label in"):
        load_subject(cohort["image"], cohort["brain"], cohort["tumour"], tumour_labels=[3])
    outside = np.zeros((20, 20, 20), np.int16)
    outside[0:2, 0:20, 0:20] = 1  # only 0 of 800 voxels in the brain
    with pytest.raises(GeometryError, match="inside the brain"):
        load_subject(cohort["image"], cohort["brain"], _save(cohort["dir"] / "out.nii.gz", outside))
    shifted = np.eye(4)
    shifted[:3, 3] = 500.0  # a mask from another scan: nowhere near the image
    moved = _save(cohort["dir"] / "moved.nii.gz", cohort["brain_arr"], shifted)
    with pytest.raises(GeometryError, match="field of view"):
        load_subject(cohort["image"], moved, cohort["tumour"])
    with pytest.raises(InputFileError):
        load_subject(cohort["dir"] / "missing.nii.gz", cohort["brain"], cohort["tumour"])


def test_load_subject_tumour_partly_outside_brain_joins_it(cohort):
    labels = cohort["labels"].copy()
    labels[1, 6:12, 6:12] = 1  # a 1-voxel slab outside the brain (x = 1), most of the tumour inside
    labels[2:6, 6:12, 6:12] = 1
    path = _save(cohort["dir"] / "seg2.nii.gz", labels)
    s = load_subject(cohort["image"], cohort["brain"], path)
    assert s.info["tumour_voxels_added_to_brain"] == 36
    assert np.all(s.brain_mask.data[s.tumour_mask.data > 0] == 1)
