"""brainshift.compensate: the method as one call (no file I/O)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from brainshift.compensate import Result, compensate, foreground_mask
from brainshift.errors import BrainshiftError, GeometryError, KeypointError
from brainshift.volume import Volume

SHAPE = (16, 18, 14)
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])


@pytest.fixture()
def image() -> Volume:
    data = np.zeros(SHAPE, np.float32)
    data[2:-2, 2:-2, 2:-2] = np.random.default_rng(0).uniform(0.5, 1.0, (12, 14, 10))
    return Volume(data, AFFINE)


def _keypoints():
    rng = np.random.default_rng(1)
    pts = rng.uniform(2, 11, size=(10, 3))
    return pts, np.tile([1.0, -0.5, 0.25], (10, 1))


def test_uniform_keypoint_motion_gives_the_uniform_field(image):
    pts, disps = _keypoints()
    res = compensate(image, keypoints=(pts, disps), method="linear", statistics=True)
    assert isinstance(res, Result) and res.refined_field is None and res.field is res.initial_field
    assert res.method == "linear" and res.n_keypoints == 10
    assert res.initial_field.dtype == np.float32 and res.initial_field.shape == (3, *SHAPE)
    # linear interpolation of one displacement is that displacement inside the keypoints' hull (voxel units)
    inside = tuple(np.round(pts.mean(axis=0)).astype(int))
    np.testing.assert_allclose(res.initial_field[(slice(None), *inside)], [1.0, -0.5, 0.25], atol=1e-5)
    stats = res.statistics["initial"]
    # |A u| = |(2 * 1, 2 * -0.5, 2.5 * 0.25)| mm at the hull's voxels; the statistics cover the foreground
    assert stats["max_displacement_mm"] == pytest.approx(np.sqrt(2.0**2 + 1.0**2 + 0.625**2), rel=1e-5)
    assert stats["pct_jacobian_nonpositive"] == 0.0
    assert set(res.timings_s) == {"interpolate (linear)", "field statistics"}


def test_given_initial_field_is_returned_and_refined_by_a_network(image, tiny_default_weights):
    from brainshift.model.checkpoint import load_weights
    from brainshift.model.inference import refine_field

    init = np.zeros((3, *SHAPE), np.float32)
    init[0] = 0.5
    loaded = load_weights(tiny_default_weights)
    res = compensate(image, initial_field=init, model=loaded, device="cpu", mirror_average=False)
    assert res.method == "given" and res.n_keypoints is None and res.model is loaded
    np.testing.assert_array_equal(res.initial_field, init)
    np.testing.assert_allclose(res.refined_field, refine_field(image, init, loaded, mirror_average=False),
                               atol=1e-6)
    assert res.field is res.refined_field and res.mirror_average is False
    future: Future = Future()
    future.set_result(loaded)  # a network still loading is accepted and waited for
    again = compensate(image, initial_field=init, model=future, mirror_average=False)
    np.testing.assert_allclose(again.refined_field, res.refined_field, atol=1e-6)
    assert "load network weights" in again.timings_s


def test_scale_normalisation_floor_applies_to_the_network_alone_not_under_the_safeguards(image,
                                                                                        tiny_default_weights):
    from brainshift.model.checkpoint import load_weights

    loaded = load_weights(tiny_default_weights)
    loaded.metadata = dict(loaded.metadata, inference={"min_field_rms_mm": 2.5})
    init = np.zeros((3, *SHAPE), np.float32)
    init[0] = 0.1  # 0.2 mm: below the floor
    alone = compensate(image, initial_field=init, model=loaded, mirror_average=False)
    assert alone.min_field_rms_mm == 2.5 and alone.field_scale > 1.0
    unscaled = compensate(image, initial_field=init, model=loaded, mirror_average=False, min_field_rms_mm=0)
    assert unscaled.min_field_rms_mm == 0.0 and unscaled.field_scale == 1.0
    assert not np.allclose(alone.refined_field, unscaled.refined_field, atol=1e-6)  # the floor changed the input
    pts = np.random.default_rng(1).uniform(2, 11, size=(12, 3))
    guarded = compensate(image, keypoints=(pts, np.tile([0.1, 0.0, 0.0], (12, 1))), method="tps", model=loaded)
    assert guarded.min_field_rms_mm == 0.0 and guarded.safeguards["field_scale"] == 1.0
    asked = compensate(image, keypoints=(pts, np.tile([0.1, 0.0, 0.0], (12, 1))), method="tps", model=loaded,
                       min_field_rms_mm=2.5)
    assert asked.min_field_rms_mm == 2.5 and asked.safeguards["field_scale"] > 1.0
    # the network grid as used is recorded (both paths): RAS axes at the model's spacing; framed on the brain only
    # when the field of view holds more background than FRAME_MARGIN_MM (here 4-5 mm: not framed)
    for res in (alone, guarded):
        assert res.network_grid["axes"] == "RAS" and res.network_grid["framed_on_region"] is False
        assert res.network_grid["spacing_mm"] == loaded.config.spacing_mm
    wide = Volume(np.pad(image.data, 20), AFFINE @ np.array([[1, 0, 0, -20], [0, 1, 0, -20], [0, 0, 1, -20],
                                                             [0, 0, 0, 1.0]]))
    framed = compensate(wide, keypoints=(pts + 20, np.tile([0.1, 0.0, 0.0], (12, 1))), method="tps", model=loaded)
    assert framed.network_grid["framed_on_region"] is True
    assert np.prod(framed.network_grid["shape"]) < np.prod(
        compensate(wide, initial_field=np.zeros((3, *wide.shape), np.float32), model=loaded,
                   mask=np.ones(wide.shape, bool)).network_grid["shape"])  # the whole field of view as the region


def test_bad_calls_raise(image):
    pts, disps = _keypoints()
    with pytest.raises(BrainshiftError, match="expected keypoints or an initial_field, got neither"):
        compensate(image)
    with pytest.raises(KeypointError, match="inside the image"):
        compensate(image, keypoints=(pts + 20.0, disps))


@pytest.mark.parametrize("call, error, message", [
    # each raised a raw AttributeError / TypeError from inside numpy, or returned a wrong field without a word
    (lambda img, p, d: compensate(img.data, keypoints=(p, d)), GeometryError,
     "expected the image as a brainshift Volume (array + affine: Volume(data, affine)), got ndarray"),
    (lambda img, p, d: compensate(img, keypoints=(p, d, d)), KeypointError,
     "expected keypoints as a pair (points_vox, disps_vox) of (N, 3) arrays, got tuple of length 3"),
    (lambda img, p, d: compensate(img, keypoints=(p + 0j, d)), KeypointError,  # imaginary part silently dropped
     "expected keypoints as real numbers of shape (N, 3), got complex128 values of shape (10, 3)"),
    (lambda img, p, d: compensate(img, keypoints=(p, np.full(d.shape, "a"))), KeypointError,
     "expected displacements as real numbers of shape (N, 3), got <U1 values of shape (10, 3)"),
    (lambda img, p, d: compensate(img, keypoints=(p, d), method="tps", interp_options=[0.1]), BrainshiftError,
     "expected interp_options as a dict of the interpolator's options, got list"),
    (lambda img, p, d: compensate(img, keypoints=(p, d), mask=np.ones((8, 8, 8))), GeometryError,
     "expected the mask on the image grid (16, 18, 14), got shape (8, 8, 8)"),  # was ignored without a model
    (lambda img, p, d: compensate(img, keypoints=(p, d), statistics=True, statistics_mask=np.ones((8, 8, 8))),
     GeometryError, "expected the statistics_mask on the image grid (16, 18, 14), got shape (8, 8, 8)"),
    (lambda img, p, d: compensate(img, initial_field=np.zeros((3, *SHAPE), dtype=object)), GeometryError,
     "expected a displacement field of real numbers (float32), got dtype object"),
    (lambda img, p, d: compensate(img, initial_field=np.zeros((3, *SHAPE), np.complex64)), GeometryError,
     "expected a displacement field of real numbers (float32), got dtype complex64"),
    (lambda img, p, d: compensate(img, initial_field=np.full((3, *SHAPE), 1e300)), GeometryError,  # inf as float32
     "expected a finite displacement field, found NaN or inf values (or values beyond float32's range)"),
    # a path, a name or a number as the model / atlas: an AttributeError deep inside (compensate reads no file)
    (lambda img, p, d: compensate(img, keypoints=(p, d), model="weights/default.safetensors"), BrainshiftError,
     "expected model as a LoadedModel (brainshift.model.checkpoint.load_weights), a concurrent.futures.Future of "
     "one, or None, got str (a path: load it first with brainshift.model.checkpoint.load_weights(path))"),
    (lambda img, p, d: compensate(img, keypoints=(p, d), model=3), BrainshiftError,
     "expected model as a LoadedModel (brainshift.model.checkpoint.load_weights), a concurrent.futures.Future of "
     "one, or None, got int"),
    (lambda img, p, d: compensate(img, keypoints=(p, d), method="atlas", atlas=Path("atlas")), BrainshiftError,
     "expected atlas as a DeformationAtlas (brainshift.atlas.basis.load_atlas) or None, got PosixPath (a folder: "
     "load it first with brainshift.atlas.basis.load_atlas(folder))"),
    (lambda img, p, d: compensate(img, keypoints=(p, d), method="atlas", atlas=7), BrainshiftError,
     "expected atlas as a DeformationAtlas (brainshift.atlas.basis.load_atlas) or None, got int"),
])
def test_malformed_arguments_raise_naming_expected_and_got(image, call, error, message):
    pts, disps = _keypoints()
    with pytest.raises(error) as info:
        call(image, pts, disps)
    assert str(info.value) == message


def test_foreground_mask_is_above_the_minimum_or_everything():
    v = Volume(np.array([[[0.0, 1.0], [0.0, 2.0]]], np.float32), np.eye(4))
    np.testing.assert_array_equal(foreground_mask(v), [[[False, True], [False, True]]])
    assert foreground_mask(Volume(np.zeros((2, 2, 2), np.float32), np.eye(4))).all()


def test_a_model_future_must_give_a_loaded_model(image):
    # a Future resolving to a path (or None) was an AttributeError in the refinement
    future: Future = Future()
    future.set_result("weights.safetensors")
    with pytest.raises(BrainshiftError) as info:
        compensate(image, keypoints=_keypoints(), method="linear", model=future)
    assert str(info.value) == ("expected the model Future to give a LoadedModel (brainshift.model.checkpoint."
                               "load_weights), got str (a path: load it first with "
                               "brainshift.model.checkpoint.load_weights(path))")


def test_auto_interpolates_clustered_keypoints_linearly_and_spread_ones_with_the_spline(image):
    """``method="auto"`` (:func:`choose_interpolator`): keypoints whose convex hull covers less than 4 % of the
    foreground get Delaunay-linear interpolation, spread ones the thin-plate spline, each field identical to the
    named method's; the choice and the hull fraction are recorded; a ridge for tps is dropped for linear."""
    from brainshift.compensate import choose_interpolator
    from brainshift.interpolate import interpolate
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION

    rng = np.random.default_rng(4)
    spread = rng.uniform(2, np.array(SHAPE) - 3, size=(12, 3))
    clustered = np.array([4.0, 5.0, 4.0]) + rng.uniform(0, 2, size=(12, 3))  # within a 2-voxel cube
    disps = rng.normal(0, 0.5, size=(12, 3))
    fg_vox = foreground_mask(image).sum()
    for pts, want in ((spread, "tps"), (clustered, "linear")):
        method, frac = choose_interpolator(image, pts)
        assert method == want and (frac < CLUSTERED_HULL_FRACTION) == (want == "linear")
        assert frac <= (8.0 if want == "linear" else np.inf) / fg_vox  # hull inside the 2-voxel cube
        res = compensate(image, keypoints=(pts, disps), method="auto", interp_options={"lam": 0.5})
        assert res.method == want and res.interpolator_choice["chosen"] == want
        assert res.interpolator_choice["keypoint_hull_fraction"] == pytest.approx(frac, abs=1e-6)
        opts = {"lam": 0.5} if want == "tps" else {}
        np.testing.assert_array_equal(res.initial_field,
                                      interpolate(want, pts, disps, SHAPE, AFFINE, **opts).astype(np.float32))
    assert choose_interpolator(image, spread[:3])[0] == "linear"  # no hull volume: clustered
    named = compensate(image, keypoints=(spread, disps), method="tps")
    assert named.interpolator_choice is None


def test_network_weights_with_nan_are_refused_naming_the_file(tmp_path, tiny_weights):
    """A weights file holding NaN made every field NaN; infer then stopped with "expected a solvable TPS system"
    (under the safeguards) or "a finite displacement field". Expected: the weights named, nothing written."""
    import nibabel as nib
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from typer.testing import CliRunner

    from brainshift.cli import app

    with safe_open(str(tiny_weights), "np") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    name = sorted(k for k in tensors if tensors[k].dtype.kind == "f")[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    data = np.zeros(SHAPE, np.float32)
    data[2:-2, 2:-2, 2:-2] = np.random.default_rng(0).uniform(0.5, 1.0, (12, 14, 10))
    nib.save(nib.Nifti1Image(data, AFFINE), str(tmp_path / "preop.nii.gz"))
    pts, disps = _keypoints()
    (tmp_path / "kp.csv").write_text("x,y,z,dx,dy,dz\n" + "".join(
        ",".join(f"{v:.4f}" for v in (*p, *d)) + "\n" for p, d in zip(pts, disps, strict=True)))
    for extra in ([], ["--no-safeguards"]):
        out = tmp_path / f"out{len(extra)}"
        res = CliRunner().invoke(app, ["infer", "-p", str(tmp_path / "preop.nii.gz"), "-k", str(tmp_path / "kp.csv"),
                                       "-w", str(bad), "-d", "cpu", "-q", "-o", str(out), *extra])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "expected finite network weights in" in errors[0], res.output
        assert "nan.safetensors" in errors[0] and repr(name) in errors[0]
        assert not out.exists() or not any(out.iterdir())


def test_safeguards_keep_no_learnt_correction_for_clustered_keypoints_of_a_linear_field(image, tiny_default_weights):
    """10 or more keypoints clustered in one region (hull < 4 % of the foreground): under the safeguards a
    ``linear`` (auto's choice there, any case of the name) or ``gp`` field gets alpha = 0, recorded, and the
    refined field is the initial one (a linear field is exact at its keypoints: nothing for the consistency step);
    a ``tps`` field, spread keypoints and fewer keypoints keep the cross-validated weight
    (:func:`brainshift.compensate.learnt_correction_allowed`)."""
    from brainshift.compensate import MIN_KEYPOINTS_CLUSTER_RULE, learnt_correction_allowed
    from brainshift.keypoints.validate import CLUSTERED_HULL_FRACTION
    from brainshift.model.checkpoint import load_weights

    low, high = 0.5 * CLUSTERED_HULL_FRACTION, 2 * CLUSTERED_HULL_FRACTION
    n = MIN_KEYPOINTS_CLUSTER_RULE
    assert [learnt_correction_allowed(m, f, n) for m in ("linear", "GP", "tps", "atlas") for f in (low, high)] == \
        [False, True, False, True, True, True, True, True]
    assert learnt_correction_allowed("linear", low, n - 1)
    rng = np.random.default_rng(4)
    clustered = np.array([4.0, 5.0, 4.0]) + rng.uniform(0, 2, size=(12, 3))
    spread = rng.uniform(2, np.array(SHAPE) - 3, size=(12, 3))
    disps = rng.normal(0, 0.5, size=(12, 3))
    loaded = load_weights(tiny_default_weights)
    for pts, method, learnt in ((clustered, "auto", False), (clustered, "LINEAR", False), (clustered, "gp", False),
                                (clustered, "tps", True), (clustered[:n - 1], "linear", True),
                                (spread, "auto", True), (spread, "linear", True)):
        res = compensate(image, keypoints=(pts, disps[:len(pts)]), method=method, model=loaded)
        assert res.safeguards["learnt_correction"] is learnt, (method, learnt)
        if learnt:
            assert "learnt_correction_reason" not in res.safeguards
        else:
            assert res.safeguards["alpha"] == 0.0
            assert res.safeguards["learnt_correction_reason"].startswith("12 keypoints clustered in one region")
            if method != "gp":  # gp smooths its keypoints: the consistency step then moves the field towards them
                np.testing.assert_allclose(res.refined_field, res.initial_field, atol=1e-5)
