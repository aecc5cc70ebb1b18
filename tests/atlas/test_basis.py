"""The atlas's reduced basis, node-grid sampling and folder format (exact properties)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainshift.atlas.basis import DeformationAtlas, NodeGrid, image_digest, load_atlas, reduce_members, save_atlas
from brainshift.errors import GeometryError, InputFileError, KeypointError


def _grid(shape=(6, 7, 5), image_shape=(16, 19, 13), hole=True) -> NodeGrid:
    g = np.argwhere(np.ones(shape, dtype=bool))
    if hole:  # a node-grid corner without nodes
        g = g[~((g[:, 0] == 0) & (g[:, 1] == 0))]
    return NodeGrid(node_grid=g, shape=shape, origin_vox=np.array([0.5, 1.0, 0.0]),
                    step_vox=np.array([3.0, 3.0, 3.0]), image_shape=image_shape, spacing_mm=np.array([1.0, 1.0, 2.0]))


def _affine_nodal(nodes: NodeGrid, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Nodal values of the affine field u(p_vox) = a @ p_vox + b (local mm)."""
    p = nodes.origin_vox + nodes.node_grid * nodes.step_vox
    return p @ a.T + b


def test_reduce_members_recovers_a_two_dimensional_span_exactly():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 50, 3))
    coef = rng.normal(size=(12, 2))
    members = 0.3 + np.einsum("mk,knc->mnc", coef, base)
    mean, comps, coords, sv, retained = reduce_members(members, energy=0.999999)
    assert comps.shape == (2, 50, 3) and coords.shape == (12, 2) and retained == pytest.approx(1.0)
    flat = comps.reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(flat @ flat.T, np.eye(2), atol=1e-5)  # orthonormal
    recon = mean + np.einsum("mk,knc->mnc", coords, comps)
    np.testing.assert_allclose(recon, members, atol=1e-4)
    # the singular values are those of the centred member matrix
    np.testing.assert_allclose(sv, np.linalg.svd((members - members.mean(0)).reshape(12, -1),
                                                 compute_uv=False)[:2], rtol=1e-6)


def test_reduce_members_energy_selects_the_fewest_components():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 40, 3))
    base /= np.linalg.norm(base.reshape(3, -1), axis=1)[:, None, None]
    coef = rng.normal(size=(30, 3)) * np.array([10.0, 1.0, 0.01])
    _, comps, _, sv, retained = reduce_members(np.einsum("mk,knc->mnc", coef, base), energy=0.99)
    assert comps.shape[0] == 1 or (comps.shape[0] == 2 and retained >= 0.99)
    assert retained >= 0.99 and (sv[:-1] >= sv[1:]).all()
    with pytest.raises(Exception, match="at least 2 members"):
        reduce_members(np.zeros((1, 5, 3)))


def test_rasterise_and_sample_reproduce_an_affine_field_exactly():
    """Trilinear FE interpolation reproduces affine fields: rasterised voxels and sampled points both equal the
    affine field (voxel units = mm / spacing), inside the node grid."""
    nodes = _grid(hole=False)
    a = np.array([[0.01, 0.02, 0.0], [0.0, -0.03, 0.01], [0.02, 0.0, 0.01]])
    b = np.array([0.5, -1.0, 2.0])
    nodal = _affine_nodal(nodes, a, b)
    region = np.zeros(nodes.image_shape, dtype=bool)
    region[2:14, 3:16, 1:12] = True
    field = nodes.rasterise(nodal, region)
    vox = np.argwhere(region).astype(float)
    expect = (vox @ a.T + b) / nodes.spacing_mm
    np.testing.assert_allclose(field[(slice(None),) + tuple(np.argwhere(region).T)].T, expect, atol=1e-5)
    assert np.all(field[:, ~region] == 0)
    atlas = DeformationAtlas(nodes=nodes, mean=nodal.astype(np.float32), components=np.zeros((0, nodes.n_nodes, 3)),
                             coordinates=np.zeros((2, 0)), singular_values=np.zeros(0), region=region,
                             affine=np.eye(4), image_sha256="x")
    pts = np.array([[3.3, 4.7, 2.2], [10.1, 12.9, 9.5]])
    mean, basis = atlas.sample(pts)
    np.testing.assert_allclose(mean, pts @ a.T + b, atol=1e-5)
    assert basis.shape == (2, 3, 0)


def test_sampling_matches_rasterisation_with_holes():
    nodes = _grid(hole=True)
    rng = np.random.default_rng(2)
    nodal = rng.normal(size=(nodes.n_nodes, 3))
    region = np.ones(nodes.image_shape, dtype=bool)
    field = nodes.rasterise(nodal, region)
    vox = np.argwhere(region)[::37]
    atlas = DeformationAtlas(nodes=nodes, mean=nodal, components=nodal[None] * 2.0, coordinates=np.zeros((2, 1)),
                             singular_values=np.ones(1), region=region, affine=np.eye(4), image_sha256="x")
    mean, basis = atlas.sample(vox.astype(float))
    np.testing.assert_allclose(mean / nodes.spacing_mm, field[(slice(None),) + tuple(vox.T)].T, atol=1e-5)
    np.testing.assert_allclose(basis[:, :, 0], 2.0 * mean, atol=1e-9)


def _atlas(tmp_path, image):
    nodes = _grid(hole=False)
    rng = np.random.default_rng(3)
    members = rng.normal(size=(6, nodes.n_nodes, 3))
    mean, comps, coords, sv, retained = reduce_members(members)
    region = np.zeros(nodes.image_shape, dtype=bool)
    region[3:12, 3:15, 2:11] = True
    atlas = DeformationAtlas(nodes=nodes, mean=mean, components=comps, coordinates=coords, singular_values=sv,
                             region=region, affine=np.diag([1.0, 1.0, 2.0, 1.0]), image_sha256=image_digest(image),
                             members=[{"i": i} for i in range(6)], info={"retained_energy": retained})
    save_atlas(tmp_path / "atlas", atlas)
    return atlas


def test_save_load_roundtrip_and_image_checks(tmp_path):
    image = np.random.default_rng(4).normal(size=(16, 19, 13)).astype(np.float32)
    atlas = _atlas(tmp_path, image)
    back = load_atlas(tmp_path / "atlas")
    np.testing.assert_array_equal(back.components, atlas.components.astype(np.float32))
    np.testing.assert_array_equal(back.region, atlas.region)
    np.testing.assert_array_equal(back.nodes.node_grid, atlas.nodes.node_grid)
    assert back.members == atlas.members and back.n_components == atlas.n_components
    back.check_image(image.shape, atlas.affine, image)  # the same image: fine
    with pytest.raises(GeometryError, match="grid"):
        back.check_image((16, 19, 14), atlas.affine)
    with pytest.raises(GeometryError, match="affine"):
        back.check_image(image.shape, np.eye(4))
    with pytest.raises(GeometryError, match="other voxel values"):
        back.check_image(image.shape, atlas.affine, image + 1.0)
    with pytest.raises(KeypointError, match="outside"):
        back.check_points(np.array([[8.0, 8.0, 6.0], [60.0, 8.0, 6.0]]))


def test_corrupt_or_unfinished_atlas_folders_are_refused(tmp_path):
    image = np.zeros((16, 19, 13), dtype=np.float32)
    _atlas(tmp_path, image)
    folder = tmp_path / "atlas"
    with pytest.raises(InputFileError, match="no such folder"):
        load_atlas(tmp_path / "missing")
    meta = json.loads((folder / "atlas.json").read_text())
    (folder / "basis.npz").write_bytes((folder / "basis.npz").read_bytes()[:200])
    with pytest.raises(InputFileError, match="corrupt or incomplete"):
        load_atlas(folder)
    (folder / "atlas.json").write_text("{not json")
    with pytest.raises(InputFileError, match="JSON"):
        load_atlas(folder)
    (folder / "atlas.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(InputFileError, match="format"):
        load_atlas(folder)
    (folder / "atlas.json").unlink()
    with pytest.raises(InputFileError, match="unfinished build"):
        load_atlas(folder)


def _set(section, key, value):
    return lambda m: m[section].__setitem__(key, value) if section else m.__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    # each was a raw ValueError / TypeError traceback, or (affine NaN) an atlas accepted for any image
    (_set(None, "format_version", "x"), "expected an integer format_version in .*atlas.json, got 'x'"),
    (_set(None, "image", "x"), "expected objects 'image' and 'node_grid' in .*atlas.json, got str and dict"),
    (_set("image", "affine", [[float("nan")] * 4] * 4), r"image.affine .* \(expected a finite invertible 4x4"),
    (_set("image", "shape", [16, 19]), r"image.shape \[16, 19\] \(expected three positive integers\)"),
    (_set("image", "spacing_mm", [0, 0, 0]), r"image.spacing_mm \[0, 0, 0\] \(expected three finite positive"),
    (_set("node_grid", "origin_vox", [0, 0]), r"node_grid.origin_vox \[0, 0\] \(expected three finite numbers\)"),
    (_set("node_grid", "step_vox", [0, 1, 1]), r"node_grid.step_vox \[0, 1, 1\] \(expected three finite positive"),
    (_set(None, "members", "abc"), r"members 'abc' \(expected a list of objects\)"),
])
def test_a_malformed_atlas_json_is_one_error_naming_the_field(tmp_path, edit, message):
    _atlas(tmp_path, np.zeros((16, 19, 13), dtype=np.float32))
    path = tmp_path / "atlas" / "atlas.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(InputFileError, match=message) as info:
        load_atlas(tmp_path / "atlas")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, change, message", [
    # a truncated region gave a zero field (exit 0); a float node grid was truncated to integers; complex
    # components lost their imaginary part; text raised numpy's TypeError; negative singular values changed the
    # fit's prior silently
    ("region", lambda a: a[:10], r"region of 10 uint8 values \(expected the 494 packed bytes of the image grid"),
    ("region", np.zeros_like, r"an empty brain region"),
    ("node_grid", lambda a: a + 0.5, r"node_grid of dtype float64 and shape \(\d+, 3\) \(expected integers"),
    ("components", lambda a: a.astype(np.complex64), r"components of dtype complex64 \(expected floating-point"),
    ("mean", lambda a: a.astype(str), r"mean of dtype <U\d+ \(expected floating-point numbers\)"),
    ("singular_values", np.negative, r"singular_values \[-.* \(expected finite, non-negative, one per component"),
])
def test_malformed_basis_arrays_are_one_error_naming_the_array(tmp_path, name, change, message):
    _atlas(tmp_path, np.zeros((16, 19, 13), dtype=np.float32))
    path = tmp_path / "atlas" / "basis.npz"
    with np.load(path) as z:
        arrays = dict(z)
    arrays[name] = change(arrays[name])
    np.savez(path, **arrays)
    with pytest.raises(InputFileError, match="expected a consistent atlas basis in .*basis.npz, got .*" + message):
        load_atlas(tmp_path / "atlas")


def test_check_image_refuses_a_nan_affine():
    # a NaN difference compared False with the tolerance, so any image passed the affine check
    atlas = DeformationAtlas(nodes=_grid(hole=False), mean=np.zeros((1, 3)), components=np.zeros((0, 1, 3)),
                             coordinates=np.zeros((2, 0)), singular_values=np.zeros(0),
                             region=np.ones((16, 19, 13), bool), affine=np.eye(4), image_sha256="")
    with pytest.raises(GeometryError, match="affine"):
        atlas.check_image((16, 19, 13), np.full((4, 4), np.nan))


def test_a_deeply_nested_atlas_json_is_one_error_through_infer(tmp_path):
    """json recursed once per nesting level: `infer --atlas` stopped with a RecursionError traceback."""
    import nibabel as nib
    from typer.testing import CliRunner

    from brainshift.cli import app

    folder = tmp_path / "atlas"
    folder.mkdir()
    (folder / "atlas.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputFileError, match=r"atlas\.json to be JSON, got unreadable content \(nested too deeply\)"):
        load_atlas(folder)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 12)).astype(np.float32), np.eye(4)),
             str(tmp_path / "preop.nii.gz"))
    rows = ["x,y,z,dx,dy,dz", "2,2,2,0,0,1", "9,2,3,0,0,1", "2,9,4,0,0,1", "3,3,9,0,0,1", "8,8,8,0,0,1"]
    (tmp_path / "kp.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["infer", "-p", str(tmp_path / "preop.nii.gz"), "-k", str(tmp_path / "kp.csv"),
                                   "-m", "atlas", "--atlas", str(folder), "--no-refine", "-q", "-o", str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nested too deeply" in errors[0], res.output
    assert not out.exists() or not any(out.iterdir())
