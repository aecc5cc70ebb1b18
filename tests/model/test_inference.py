"""Tests of the inference path (brainshift.model.inference.refine_field)."""

import numpy as np
import pytest
import torch

from brainshift.device import resolve_device
from brainshift.errors import BrainshiftError, GeometryError
from brainshift.model.checkpoint import LoadedModel, load_weights, save_weights
from brainshift.model.inference import refine_field
from brainshift.model.network import NetworkConfig, build_network
from brainshift.volume import Volume

FAST = NetworkConfig(features=(4, 8, 16, 32), spacing_mm=2.0)
FULL = NetworkConfig(features=(4, 8, 16, 32), spacing_mm=1.0)


class _Identity(torch.nn.Module):
    """A 'network' returning its input displacement channels unchanged."""

    def forward(self, x):
        return x[:, :3].clone()


class _AddConstant(torch.nn.Module):
    """Adds a constant vector (network units) to the input displacement channels."""

    def __init__(self, vec):
        super().__init__()
        self.vec = torch.tensor(vec, dtype=torch.float32)

    def forward(self, x):
        return x[:, :3] + self.vec[None, :, None, None, None]


def _case(shape, spacing=(1.0, 1.0, 1.0), seed=0):
    rng = np.random.default_rng(seed)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = [-30.0, 10.0, 5.0]
    img = np.zeros(shape, np.float32)
    img[2:-2, 2:-2, 2:-2] = rng.uniform(1, 2, size=tuple(s - 4 for s in shape))
    field = rng.standard_normal((3, *shape)).astype(np.float32)
    return Volume(img, aff), field


@pytest.mark.parametrize("config", [FULL, FAST], ids=["1mm", "2mm"])
@pytest.mark.parametrize("shape", [(17, 13, 11), (16, 24, 8)])
def test_identity_network_returns_initial_field_exactly_with_exact_shape(config, shape):
    image, field = _case(shape)
    out = refine_field(image, field, LoadedModel(_Identity(), config, {}))
    assert out.shape == (3, *shape) and out.dtype == np.float32
    np.testing.assert_array_equal(out, field)  # residual 0 -> exactly the initial field, odd sizes included


def test_constant_correction_comes_back_in_input_voxel_units():
    # input spacing (1, 2, 0.5) mm, network at 2 mm with field_units mm: +1 mm along each network axis
    # (same orientation as the input) is +1, +0.5, +2 voxels of the input grid.
    image, field = _case((15, 9, 21), spacing=(1.0, 2.0, 0.5))
    out = refine_field(image, field, LoadedModel(_AddConstant([1.0, 1.0, 1.0]), FAST, {}))
    np.testing.assert_allclose(out - field, np.broadcast_to(np.array([1.0, 0.5, 2.0])[:, None, None, None],
                                                            field.shape), atol=1e-5)
    voxel_units = NetworkConfig(features=(4, 8), spacing_mm=2.0, field_units="voxel")
    out_v = refine_field(image, field, LoadedModel(_AddConstant([1.0, 1.0, 1.0]), voxel_units, {}))
    # one 2 mm network voxel = 2, 1, 4 input voxels
    np.testing.assert_allclose(out_v - field, np.broadcast_to(np.array([2.0, 1.0, 4.0])[:, None, None, None],
                                                              field.shape), atol=1e-5)


class _InsideOnly(torch.nn.Module):
    """Adds ``vec`` inside the foreground (image channel above its minimum) and junk outside: a network is
    only trained inside the brain, so its output outside is arbitrary."""

    def __init__(self, vec, junk=100.0):
        super().__init__()
        self.vec = torch.tensor(vec, dtype=torch.float32)
        self.junk = junk

    def forward(self, x):
        img = x[:, 3:]
        inside = (img > img.amin()).float()
        add = self.vec[None, :, None, None, None] * inside + self.junk * (1 - inside)
        return x[:, :3] + add


def test_correction_outside_the_brain_never_leaks_into_it():
    # 2 mm network grid over a 1 mm image: the 1 mm voxels at the brain's edge interpolate between network
    # voxels inside and outside the region; they must get the brain's correction, not the untrained junk.
    image, field = _case((17, 15, 13))
    out = refine_field(image, field, LoadedModel(_InsideOnly([1.0, -2.0, 0.5]), FAST, {}))
    expected = np.broadcast_to(np.array([1.0, -2.0, 0.5])[:, None, None, None], field.shape)
    np.testing.assert_allclose(out - field, expected, atol=1e-5)


def test_extend_from_region_takes_the_nearest_region_value():
    from brainshift.model.grid import extend_from_region

    region = torch.zeros((5, 1, 1), dtype=torch.bool)
    region[1:3] = True
    values = torch.tensor([9.0, 1.0, 2.0, 9.0, 9.0]).reshape(1, 5, 1, 1)
    out = extend_from_region(values, region)
    assert out.flatten().tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]
    assert torch.equal(extend_from_region(values, torch.ones((5, 1, 1), dtype=torch.bool)), values)
    with pytest.raises(GeometryError, match="region"):
        extend_from_region(values, torch.ones((4, 1, 1), dtype=torch.bool))


def test_real_network_from_weights_file_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "fast.safetensors"
    save_weights(path, build_network(FAST), FAST, {"epoch": 1})
    loaded = load_weights(path)
    image, field = _case((19, 22, 15), spacing=(1.0, 1.0, 1.2))
    mask = image.data > 0
    a = refine_field(image, field, loaded, mask=mask, progress=True)
    b = refine_field(image, field, loaded, mask=mask)
    assert a.shape == field.shape and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)  # deterministic
    assert np.abs(a - field).max() > 0  # random weights do change the field


def test_bad_device_and_inputs():
    image, field = _case((8, 8, 8))
    loaded = LoadedModel(_Identity(), FULL, {})
    if not torch.cuda.is_available():
        with pytest.raises(BrainshiftError, match="expected a CUDA GPU"):
            refine_field(image, field, loaded, device="cuda")
    with pytest.raises(BrainshiftError, match="expected a torch device|expected device"):
        resolve_device("tpu")
    with pytest.raises(GeometryError, match="image grid"):
        refine_field(image, field[:, :7], loaded)
    with pytest.raises(GeometryError, match="brain mask"):
        refine_field(image, field, loaded, mask=np.ones((8, 8, 9), bool))
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("codes", ["LPS", "ASR", "PIL"])
def test_refinement_is_the_same_world_field_whatever_the_storage_order(codes):
    # the same problem stored in another voxel order (image and field reindexed, the field's voxel components
    # permuted and flipped with the axes): a network that is not equivariant to axis reorders (random weights)
    # still gives the same world field, because the network grid runs closest to R, A, S
    import nibabel.orientations as nio

    image, field = _case((16, 12, 10), spacing=(1.0, 1.5, 2.0))
    config = NetworkConfig(features=(4, 8), spacing_mm=2.0)
    torch.manual_seed(0)
    loaded = LoadedModel(build_network(config).eval(), config, {})
    ras = refine_field(image, field, loaded, mirror_average=True)
    assert np.abs(ras - field).max() > 1e-3  # the network does change the field

    def store(data, affine, target):
        tr = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(target)))
        return np.ascontiguousarray(nio.apply_orientation(data, tr)), affine @ nio.inv_ornt_aff(tr, data.shape[:3])

    img2, aff2 = store(image.data, image.affine, codes)
    m = np.round(np.linalg.inv(image.affine) @ aff2)[:3, :3]  # old voxel = m @ new voxel + t (signed permutation)
    field2 = np.einsum("ji,j...->i...", m, np.stack([store(c, image.affine, codes)[0] for c in field]))
    out2 = refine_field(Volume(img2, aff2), field2.astype(np.float32), loaded, mirror_average=True)
    back = np.stack([store(c, aff2, "RAS")[0] for c in np.einsum("ij,j...->i...", m, out2)])
    np.testing.assert_allclose(back, ras, rtol=0, atol=1e-5)


def test_more_background_around_the_same_head_gives_the_same_refinement():
    # the network normalises over its whole input, so the field of view used to change the answer; the network grid
    # is now framed on the brain (FRAME_MARGIN_MM), so adding background (a multiple of the network spacing, so the
    # voxel phase is kept; 30 mm) gives the same field inside the original image, with a random network
    rng = np.random.default_rng(1)
    shape = (80, 80, 80)  # more than FRAME_MARGIN_MM of background already: both grids are framed the same way
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-32.0, -30.0, -28.0]
    img = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[28:52, 26:54, 29:51] = 1
    img[mask > 0] = rng.uniform(1, 2, size=int(mask.sum()))
    field = (rng.standard_normal((3, *shape)) * mask).astype(np.float32)
    config = NetworkConfig(features=(4, 8), spacing_mm=3.0)  # network voxel centres on input voxel centres: no ties
    torch.manual_seed(0)
    loaded = LoadedModel(build_network(config).eval(), config, {})
    out = refine_field(Volume(img, aff), field, loaded, mask=mask)
    pad = 30
    w = [(pad, pad)] * 3
    aff_p = aff.copy()
    aff_p[:3, 3] -= pad
    out_p = refine_field(Volume(np.pad(img, w), aff_p), np.pad(field, [(0, 0), *w]), loaded, mask=np.pad(mask, w))
    inner = out_p[:, pad:-pad, pad:-pad, pad:-pad]
    brain = mask > 0
    np.testing.assert_allclose(inner[:, brain], out[:, brain], rtol=0, atol=1e-4)  # float32 resampling noise
    assert np.abs(out - field)[:, brain].max() > 1e-3  # the network does change the field


def test_mirror_average_exact_properties():
    from dataclasses import replace

    from brainshift.model.grid import mirror_network_tensor, to_network_grid
    from brainshift.model.inference import left_right_axis, predict, trained_with_mirroring

    def mirror_input(t, axis):
        return mirror_network_tensor(t, (axis,), field=True)

    image, field = _case((16, 12, 8))
    net_in = to_network_grid(image, field, None, FULL)
    x = net_in.tensor
    torch.testing.assert_close(mirror_input(mirror_input(x, 1), 1), x, rtol=0, atol=0)  # an involution
    assert torch.equal(mirror_input(x, 0)[0, 0], -x[0, 0].flip(0)) and torch.equal(mirror_input(x, 0)[0, 3],
                                                                                   x[0, 3].flip(0))
    # the identity refinement is mirror-equivariant: averaging changes nothing
    torch.testing.assert_close(predict(_Identity(), net_in, mirror_average=True), predict(_Identity(), net_in),
                               rtol=0, atol=1e-7)
    # a random network is not, its mirror average is: prediction of the mirrored problem = mirrored prediction
    torch.manual_seed(0)
    net = build_network(NetworkConfig(features=(4, 8), spacing_mm=1.0)).eval()
    ax = left_right_axis(net_in.net_affine)
    assert ax == 0
    mirrored = replace(net_in, tensor=mirror_input(x, ax))
    plain, plain_m = predict(net, net_in), predict(net, mirrored)
    assert (plain_m - mirror_input(plain, ax)).abs().max() > 1e-3
    avg, avg_m = predict(net, net_in, mirror_average=True), predict(net, mirrored, mirror_average=True)
    torch.testing.assert_close(avg_m, mirror_input(avg, ax), rtol=0, atol=1e-5)
    # axis choice follows the world x direction, whatever the voxel order
    perm = np.array([[0, 0, 2.0, 0], [0, 2.0, 0, 0], [-2.0, 0, 0, 0], [0, 0, 0, 1]])
    assert left_right_axis(perm) == 2
    # on a very oblique grid (40 degrees about z, then 40 about y) the axes are assigned jointly, as the network
    # grid orders them: the mirrored axis is the one put first (a per-axis argmax picked another one here)
    from brainshift.model.grid import network_grid

    cz, sz, cy, sy = np.cos(0.7), np.sin(0.7), np.cos(0.7), np.sin(0.7)
    rot = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]) @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot * 2.0
    assert left_right_axis(network_grid((20, 22, 18), oblique, FAST)[1]) == 0
    assert trained_with_mirroring(LoadedModel(_Identity(), FULL, {"train_config": {"flip_axes": [0]}}))
    assert not trained_with_mirroring(LoadedModel(_Identity(), FULL, {"train_config": {"flip_axes": []}}))
    assert not trained_with_mirroring(LoadedModel(_Identity(), FULL, {}))


class _DoubleField(torch.nn.Module):
    """A positively homogeneous 'network': returns twice its input field (correction = the input field)."""

    def forward(self, x):
        return 2.0 * x[:, :3]


def _meta(min_rms):
    return {"inference": {"min_field_rms_mm": min_rms}}


def test_scale_normalisation_is_exact_for_a_homogeneous_network():
    # scaling the input by s and the correction by 1/s changes nothing for a network with f(s u) = s f(u)
    image, field = _case((15, 9, 21), spacing=(1.0, 2.0, 0.5))
    small = 0.01 * field  # RMS well below the floor: scaled up
    plain = refine_field(image, small, LoadedModel(_DoubleField(), FAST, {}))
    scaled = refine_field(image, small, LoadedModel(_DoubleField(), FAST, _meta(50.0)))
    np.testing.assert_allclose(scaled, plain, atol=1e-6)


def test_scale_normalisation_shrinks_a_fixed_size_correction():
    # a network adding a constant 1 mm whatever its input (a prior of fixed size): on a field scaled up by s,
    # the correction that comes back is 1/s mm
    from brainshift.model.grid import crop_pad, field_rms_mm, to_network_grid

    image, field = _case((15, 9, 21), spacing=(1.0, 2.0, 0.5))
    small = 0.01 * field
    ni = to_network_grid(image, small, None, FAST)
    region = crop_pad(ni.mask, ni.pad)
    rms = field_rms_mm(crop_pad(ni.field[0], ni.pad), region, ni.net_affine, FAST.field_units)
    s = 3.0 / rms
    out = refine_field(image, small, LoadedModel(_AddConstant([1.0, 1.0, 1.0]), FAST, _meta(3.0)))
    np.testing.assert_allclose(out - small, np.broadcast_to(np.array([1.0, 0.5, 2.0])[:, None, None, None] / s,
                                                            field.shape), rtol=1e-4, atol=1e-6)
    # a field above the floor is not scaled; 0 turns the floor off
    big = refine_field(image, field, LoadedModel(_AddConstant([1.0, 1.0, 1.0]), FAST, _meta(1e-3)))
    off = refine_field(image, small, LoadedModel(_AddConstant([1.0, 1.0, 1.0]), FAST, _meta(3.0)),
                       min_field_rms_mm=0.0)
    for out_, f in ((big, field), (off, small)):
        np.testing.assert_allclose(out_ - f, np.broadcast_to(np.array([1.0, 0.5, 2.0])[:, None, None, None],
                                                             field.shape), atol=1e-5)


def test_model_min_field_rms_comes_from_the_weights_or_the_override():
    from brainshift.model.inference import model_min_field_rms_mm
    from brainshift.resources import DEFAULT_WEIGHTS

    assert model_min_field_rms_mm(load_weights(DEFAULT_WEIGHTS)) == 2.5  # recorded with the default model
    assert model_min_field_rms_mm(LoadedModel(_Identity(), FAST, {})) == 0.0  # none recorded: unscaled
    assert model_min_field_rms_mm(LoadedModel(_Identity(), FAST, _meta(2.5)), 0.0) == 0.0
    for bad in (-1.0, float("nan"), "2"):
        with pytest.raises(BrainshiftError, match="minimum field RMS a finite number"):
            model_min_field_rms_mm(LoadedModel(_Identity(), FAST, {}), bad)
