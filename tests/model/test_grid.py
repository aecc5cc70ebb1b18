"""Tests of the network-grid pre/post-processing (brainshift.model.grid) shared by training and inference."""

import numpy as np
import pytest
import torch

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.model.grid import (
    FRAME_MARGIN_MM,
    crop_pad,
    field_to_network_grid,
    field_vox_to_network_matrix,
    framed_network_grid,
    from_network_grid,
    keypoint_proximity,
    mirror_network_tensor,
    network_field_to_voxel,
    network_grid,
    pad_to_multiple,
    resample_channels,
    to_network_grid,
    zscore,
)
from brainshift.model.network import NetworkConfig
from brainshift.volume import Volume

FAST = NetworkConfig(features=(4, 8, 16, 32), spacing_mm=2.0)  # multiple 8, 2 mm grid
FULL = NetworkConfig(features=(4, 8, 16, 32), spacing_mm=1.0)


def _oblique_affine(spacing=(1.0, 1.2, 0.9), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = [-20.0, 15.0, 3.0]
    return a


def _image(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    sl = tuple(slice(2, s - 2) for s in shape)
    img[sl] = rng.uniform(1.0, 3.0, size=img[sl].shape)
    return img


def test_pad_and_crop_are_exact_inverses():
    t = torch.arange(5 * 9 * 6, dtype=torch.float32).reshape(1, 5, 9, 6)
    padded, pad = pad_to_multiple(t, 8, value=-1.0)
    assert padded.shape == (1, 8, 16, 8)
    assert pad == ((1, 2), (3, 4), (1, 1))
    assert padded[0, 0, 0, 0].item() == -1.0
    assert torch.equal(crop_pad(padded, pad), t)
    same, pad0 = pad_to_multiple(torch.zeros(8, 16, 8), 8)
    assert pad0 == ((0, 0), (0, 0), (0, 0)) and same.shape == (8, 16, 8)


def test_network_grid_is_input_grid_at_same_spacing():
    aff = _oblique_affine((1.0, 1.0, 1.0))
    shape, a = network_grid((11, 13, 7), aff, FULL)
    assert shape == (11, 13, 7) and np.array_equal(a, aff)
    shape2, a2 = network_grid((11, 13, 7), aff, FAST)
    assert shape2 == (6, 6, 4)  # round(11 / 2), round(13 / 2), round(7 / 2) (round half to even)
    np.testing.assert_allclose(np.linalg.norm(a2[:3, :3], axis=0), [2.0, 2.0, 2.0])


def _stored_as(data: np.ndarray, affine: np.ndarray, codes: str):
    """``data`` (first three axes spatial) stored with its voxel axes along ``codes`` (e.g. "LPS"): the same world
    grid, reindexed (nibabel's orientation tools)."""
    import nibabel.orientations as nio

    tr = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(codes)))
    return np.ascontiguousarray(nio.apply_orientation(data, tr)), affine @ nio.inv_ornt_aff(tr, data.shape[:3])


@pytest.mark.parametrize("codes", ["LPS", "ASR", "PIL", "SLA"])
def test_network_grid_runs_closest_to_ras_whatever_the_storage_order(codes):
    # the network was trained on RAS grids: an image stored LPS or in a sagittal order gets the same network grid
    # (same voxel centres, same indexing) as the same image stored RAS, and the same resampled channels
    aff = np.diag([1.0, 1.2, 0.9, 1.0])
    aff[:3, 3] = [-20.0, 15.0, 3.0]
    img = _image((14, 12, 16))
    ras_shape, ras_aff = network_grid(img.shape, aff, FAST)
    data, aff2 = _stored_as(img, aff, codes)
    assert data.shape != img.shape or not np.allclose(aff2, aff)  # really another storage
    shape2, net2 = network_grid(data.shape, aff2, FAST)
    assert shape2 == ras_shape
    np.testing.assert_allclose(net2, ras_aff, atol=1e-9)
    a = resample_channels(torch.from_numpy(img)[None], aff, ras_shape, ras_aff)
    b = resample_channels(torch.from_numpy(data)[None], aff2, ras_shape, ras_aff)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # a reordering alone (same spacing) resamples exactly: the arrays are permuted and flipped, not interpolated
    back = resample_channels(torch.from_numpy(data)[None], aff2, img.shape, aff)
    assert torch.equal(back[0], torch.from_numpy(img))
    # at the network's own spacing the RAS storage is the network grid itself
    full_shape, full_aff = network_grid(data.shape, aff2, NetworkConfig(features=(4, 8, 16, 32), spacing_mm=1.0))
    assert np.allclose(np.abs(full_aff[:3, :3]), np.diag(np.diag(full_aff[:3, :3])))
    assert np.all(np.diag(full_aff[:3, :3]) > 0)  # axes run R, A, S


def test_network_grid_is_framed_on_the_region_when_the_field_of_view_is_larger():
    # a 20 mm brain in a 100 mm field of view (1 mm voxels, 2 mm network): the network grid keeps the uncropped
    # grid's voxels within the brain's box plus FRAME_MARGIN_MM; a tight field of view is not cropped
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-50.0, -40.0, -30.0]
    img = np.zeros((100, 100, 100), np.float32)
    mask = np.zeros(img.shape, np.uint8)
    mask[40:60, 30:50, 45:65] = 1
    img[mask > 0] = 1.0
    full_shape, full_aff = network_grid(img.shape, aff, FAST)
    shape, a = framed_network_grid(Volume(img, aff), mask, FAST)
    assert FRAME_MARGIN_MM == 20.0
    assert shape == (32, 32, 31)  # (20 + 2 x 20) mm / 2 mm = 30 voxels, rounded out to whole network voxels
    np.testing.assert_allclose(a[:3, :3], full_aff[:3, :3])
    offset = np.linalg.solve(full_aff[:3, :3], a[:3, 3] - full_aff[:3, 3])
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-9)  # whole voxels of the uncropped grid
    box_lo = aff[:3, :3] @ np.array([39.5, 29.5, 44.5]) + aff[:3, 3]  # the brain's box edge (world)
    first = a[:3, :3] @ np.zeros(3) + a[:3, 3] - 1.0  # the framed grid's edge (centre - half a network voxel)
    assert np.all(first <= box_lo - FRAME_MARGIN_MM + 1e-9) and np.all(first >= box_lo - FRAME_MARGIN_MM - 2.0)
    # without a mask the foreground frames it; a field of view within the margin is not cropped
    fg_shape, fg_aff = framed_network_grid(Volume(img, aff), None, FAST)
    assert fg_shape == shape and np.array_equal(fg_aff, a)
    tight = Volume(img[25:75, 15:65, 30:80], aff @ np.array([[1, 0, 0, 25], [0, 1, 0, 15], [0, 0, 1, 30],
                                                                [0, 0, 0, 1.0]]))
    t_shape, t_aff = framed_network_grid(tight, mask[25:75, 15:65, 30:80], FAST)
    assert (t_shape, t_aff.tolist()) == (network_grid(tight.shape, tight.affine, FAST)[0],
                                         network_grid(tight.shape, tight.affine, FAST)[1].tolist())
    # an empty region leaves the grid as it is
    assert framed_network_grid(Volume(img, aff), np.zeros_like(mask), FAST)[0] == full_shape
    # an image already on the framed grid (the safeguards' coarse problem) is not framed again with frame=False,
    # even when its coarser region would give a smaller box
    coarse_img = resample_channels(torch.from_numpy(img)[None], aff, shape, a)[0].numpy()
    coarse_mask = np.zeros(shape, np.uint8)
    coarse_mask[12:18, 12:18, 12:18] = 1  # a smaller region than the one that framed the grid
    ni = to_network_grid(Volume(coarse_img, a), np.zeros((3, *shape), np.float32), coarse_mask, FAST, frame=False)
    assert ni.net_shape == shape and ni.same_grid
    assert to_network_grid(Volume(coarse_img, a), np.zeros((3, *shape), np.float32), coarse_mask,
                           FAST).net_shape != shape  # framed again by default


def test_field_unit_matrix_goes_through_world_mm():
    aff_in = _oblique_affine((1.0, 1.2, 0.9))
    _, aff_net = network_grid((20, 20, 20), aff_in, FAST)
    m_mm = field_vox_to_network_matrix(aff_in, aff_net, "mm")
    m_vox = field_vox_to_network_matrix(aff_in, aff_net, "voxel")
    u = np.array([1.0, -2.0, 0.5])
    world = aff_in[:3, :3] @ u
    # mm along the network axes: the world vector expressed in the network's (orthonormal) axis directions
    np.testing.assert_allclose(m_mm @ u, (aff_net[:3, :3] / 2.0).T @ world, atol=1e-12)
    np.testing.assert_allclose(m_vox @ u, np.linalg.solve(aff_net[:3, :3], world), atol=1e-12)
    # same orientation: a 1-voxel step along j of the 1.2 mm input = 1.2 mm = 0.6 network voxel
    np.testing.assert_allclose(m_mm @ [0, 1, 0], [0, 1.2, 0], atol=1e-12)
    np.testing.assert_allclose(m_vox @ [0, 1, 0], [0, 0.6, 0], atol=1e-12)


@pytest.mark.parametrize("angle", [0.3, 0.0], ids=["oblique-grid_sample", "aligned-interpolate"])
@pytest.mark.parametrize("direction", ["down", "up"])
def test_resample_channels_matches_nibabel_in_interior(angle, direction):
    # angle 0: the network grid is a corner-aligned scaling of the input grid -> the F.interpolate fast path;
    # oblique input: the same map is still axis-aligned (the network grid keeps the orientation) -> also fast;
    # the 'up' direction with a shifted target exercises both paths against scipy.
    aff = _oblique_affine((1.0, 1.2, 0.9), angle=angle)
    shape, net_aff = network_grid((14, 12, 16), aff, FAST)
    src_shape, src_aff, dst_shape, dst_aff = (14, 12, 16), aff, shape, net_aff
    if direction == "up":
        src_shape, src_aff, dst_shape, dst_aff = shape, net_aff, (14, 12, 16), aff.copy()
        dst_aff[:3, 3] += 0.37 * aff[:3, 0]  # not corner-aligned: the grid_sample path
    img = np.random.default_rng(3).standard_normal(src_shape).astype(np.float32)
    vol = Volume(img, src_aff)
    ours = resample_channels(torch.from_numpy(img)[None], src_aff, dst_shape, dst_aff)[0].numpy()
    ref = vol.resample_to_grid(dst_shape, dst_aff).data  # nibabel / scipy map_coordinates, order 1
    inner = (slice(2, -2),) * 3  # near the border the padding differs by design (border vs constant 0)
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)


def test_resample_fast_path_equals_grid_sample_path():
    from brainshift.model.grid import _resample_interpolate

    aff = np.diag([1.0, 1.2, 0.7, 1.0])
    for shape in [(13, 19, 7), (160 // 8, 192 // 8, 144 // 8)]:
        net_shape, net_aff = network_grid(shape, aff, FAST)
        x = torch.randn(2, *net_shape, generator=torch.Generator().manual_seed(0))
        m = np.linalg.inv(net_aff) @ aff
        fast = _resample_interpolate(x, m, shape)
        assert fast is not None and fast.shape == (2, *shape)
        assert torch.equal(resample_channels(x, net_aff, shape, aff), fast)  # the public function takes it
        # reference: trilinear grid_sample on voxel coordinates (the general path), via warp's helper
        from brainshift.model.warp import voxel_to_grid_sample

        q = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij"))
        coords = torch.einsum("ab,b...->a...", torch.from_numpy(m[:3, :3]), q) + torch.from_numpy(m[:3, 3])[
            :, None, None, None]
        grid = voxel_to_grid_sample(coords[None].float(), net_shape)
        gs = torch.nn.functional.grid_sample(x[None], grid, padding_mode="border", align_corners=True)[0]
        assert torch.allclose(fast, gs, atol=1e-5)


def test_to_network_grid_normalises_masks_and_pads():
    shape = (13, 17, 11)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    img = _image(shape)
    mask = np.zeros(shape, bool)
    mask[3:10, 4:14, 3:8] = True
    field = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    ni = to_network_grid(Volume(img, aff), field, mask, FULL)
    assert ni.tensor.shape == (1, 4, 16, 24, 16) and ni.same_grid
    assert ni.pad == ((1, 2), (3, 4), (2, 3))
    region = crop_pad(ni.mask, ni.pad).numpy()
    assert np.array_equal(region, mask)
    z = crop_pad(ni.image[0, 0], ni.pad).numpy()
    assert z[mask].mean() == pytest.approx(0.0, abs=1e-5) and z[mask].std() == pytest.approx(1.0, abs=1e-4)
    f = crop_pad(ni.field[0], ni.pad).numpy()
    np.testing.assert_array_equal(f[:, mask], field[:, mask])  # 1 mm grid, mm units = voxel units
    assert np.all(f[:, ~mask] == 0.0)
    assert torch.all(ni.field[0, :, 0] == 0) and ni.image[0, 0, 0, 0, 0].item() == pytest.approx(z.min())
    np.testing.assert_allclose(ni.padded_affine[:3, 3], -np.array([1.0, 3.0, 2.0]))


def test_foreground_region_without_mask():
    shape = (8, 8, 8)
    img = _image(shape)
    field = np.ones((3, *shape), np.float32)
    ni = to_network_grid(Volume(img, np.eye(4)), field, None, FULL)
    region = crop_pad(ni.mask, ni.pad).numpy()
    assert np.array_equal(region, img > img.min())
    assert torch.equal(ni.field[0, 0], ni.mask.float())


@pytest.mark.parametrize("shape", [(13, 17, 11), (9, 10, 7)])
def test_round_trip_shapes_and_constant_fields_are_exact_on_coarse_oblique_grid(shape):
    aff = _oblique_affine((1.0, 1.2, 0.9))
    img = np.ones(shape, np.float32)  # constant: the whole grid is the region (empty foreground -> all)
    world = np.array([1.5, -0.7, 2.0])
    u = np.linalg.solve(aff[:3, :3], world)
    field = np.broadcast_to(u[:, None, None, None], (3, *shape)).astype(np.float32)
    ni = to_network_grid(Volume(img, aff), field, np.ones(shape, bool), FAST)
    assert not ni.same_grid
    assert all(s % 8 == 0 for s in ni.tensor.shape[2:])
    # network units: mm along the network axes
    f_net = crop_pad(ni.field[0], ni.pad).numpy()
    expected_net = field_vox_to_network_matrix(aff, ni.net_affine, "mm") @ u
    np.testing.assert_allclose(f_net.reshape(3, -1).T, np.broadcast_to(expected_net, (f_net[0].size, 3)), atol=1e-5)
    back = from_network_grid(ni.field, ni)
    assert back.shape == (3, *shape) and back.dtype == np.float32
    np.testing.assert_allclose(back, field, atol=1e-5)


def test_linear_field_survives_round_trip_up_to_resampling_error():
    shape = (21, 19, 15)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    g = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    field = 0.05 * g[[1, 2, 0]] + 0.3  # linear: trilinear interpolation reproduces it inside the grid
    ni = to_network_grid(Volume(np.ones(shape, np.float32), aff), field, np.ones(shape, bool), FAST)
    back = from_network_grid(ni.field, ni)
    # Exact (linear reproduced) away from the border. Within 2 voxels of it the border padding acts: the 2 mm
    # grid over an odd extent (19 mm -> 10 voxels = 20 mm) has a last centre half a voxel outside the input,
    # sampled at the edge value instead of extrapolated, and the first input centres lie a quarter network voxel
    # before the first network centre. Bound: 1.5 input voxels x the slope 0.05 per voxel.
    inner = (slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(back[inner], field[inner], atol=1e-4)
    assert np.abs(back - field).max() <= 1.5 * 0.05 + 1e-4


def test_field_to_network_grid_matches_input_channels():
    shape = (12, 9, 10)
    field = np.random.default_rng(5).standard_normal((3, *shape)).astype(np.float32)
    img = _image(shape)
    ni = to_network_grid(Volume(img, _oblique_affine()), field, None, FAST)
    target = field_to_network_grid(field, ni)
    assert target.shape == ni.field.shape
    assert torch.allclose(target * ni.mask, ni.field, atol=1e-6)
    assert torch.equal(field_to_network_grid(field, ni, zero_outside=True), target * ni.mask)


def test_network_field_to_voxel():
    f = torch.ones(1, 3, 2, 2, 2)
    assert torch.equal(network_field_to_voxel(f, FAST), f / 2.0)
    assert torch.equal(network_field_to_voxel(f, NetworkConfig(field_units="voxel", spacing_mm=2.0)), f)


def test_zscore_degenerate_cases():
    img = torch.full((3, 3, 3), 5.0)
    z, mean, std = zscore(img, img > 5.0)  # empty region -> whole image; zero std -> 1
    assert mean == 5.0 and std == 1.0 and torch.equal(z, torch.zeros_like(img))


def test_bad_inputs_raise():
    shape = (8, 8, 8)
    vol = Volume(_image(shape), np.eye(4))
    with pytest.raises(GeometryError, match="image grid"):
        to_network_grid(vol, np.zeros((3, 8, 8, 7), np.float32), None, FULL)
    with pytest.raises(GeometryError, match="brain mask"):
        to_network_grid(vol, np.zeros((3, *shape), np.float32), np.ones((8, 8, 9)), FULL)
    with pytest.raises(BrainshiftError, match="in_channels 4"):
        NetworkConfig(in_channels=5)  # a channel count that does not match the inputs is refused when built
    ni = to_network_grid(vol, np.zeros((3, *shape), np.float32), None, FULL)
    with pytest.raises(GeometryError, match="network output"):
        from_network_grid(torch.zeros(1, 3, 8, 8, 16), ni)


def test_center_crop_or_pad_to_training_size():
    from brainshift.model.grid import center_crop_or_pad

    t = torch.arange(2 * 5 * 6 * 7, dtype=torch.float32).reshape(2, 5, 6, 7)
    out = center_crop_or_pad(t, (8, 4, 7), value=-1.0)
    assert out.shape == (2, 8, 4, 7)
    # axis i padded 1 before / 2 after; axis j cropped 1 from each side; axis k unchanged
    assert torch.equal(out[:, 1:6], t[:, :, 1:5])
    assert torch.all(out[:, 0] == -1.0) and torch.all(out[:, 6:] == -1.0)


def _affine_field(a: np.ndarray, b: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """u(x) = A x + b at every voxel x of ``shape`` as a (3, I, J, K) array (components along the axes)."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", a, x) + b[:, None, None, None]


@pytest.mark.parametrize("axes", [(0,), (1,), (0, 2), (0, 1, 2)])
def test_mirror_network_tensor_gives_the_mirrored_problem(axes):
    # The mirrored sample's field is u'(x') = R u(R^-1 x') with R the reflection x -> n - 1 - x along axes:
    # for an affine u(x) = A x + b this is affine again, with A' = S A S and b' = S (A c + b),
    # R x = S x + c, S = diag(+-1), c = (n - 1) along mirrored axes (0 elsewhere): an exact answer.
    rng = np.random.default_rng(3)
    shape = (5, 6, 7)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=3)
    u = _affine_field(a, b, shape)
    img = rng.normal(size=(1, *shape))
    s = np.ones(3)
    s[list(axes)] = -1
    c = np.zeros(3)
    c[list(axes)] = np.asarray(shape, float)[list(axes)] - 1
    sm = np.diag(s)
    expected = _affine_field(sm @ a @ sm, sm @ (a @ c + b), shape)
    x = torch.from_numpy(np.concatenate([u, img]))[None]  # (1, 4, ...): field channels, then the image
    out = mirror_network_tensor(x, axes, field=True)[0].numpy()
    np.testing.assert_allclose(out[:3], expected, atol=1e-12)
    np.testing.assert_array_equal(out[3:], np.flip(img, axis=tuple(1 + a for a in axes)))
    plain = mirror_network_tensor(x, axes, field=False)[0].numpy()  # not a field: only reversed
    np.testing.assert_array_equal(plain, np.flip(x[0].numpy(), axis=tuple(1 + a for a in axes)))
    back = mirror_network_tensor(mirror_network_tensor(x, axes, field=True), axes, field=True)  # an involution
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    assert mirror_network_tensor(x, (), field=True) is x


def test_scale_normalisation_scales_small_fields_up_to_the_floor():
    from brainshift.errors import BrainshiftError
    from brainshift.model.grid import field_rms_mm, scale_for_rms

    shape = (12, 10, 9)
    img = Volume(_image(shape), _oblique_affine())
    field = np.zeros((3, *shape), np.float32)
    field[0] = 0.2  # 0.2 voxel along i = 0.2 mm (spacing 1 along i)
    plain = to_network_grid(img, field, None, FAST)
    rms = field_rms_mm(crop_pad(plain.field[0], plain.pad), crop_pad(plain.mask, plain.pad), plain.net_affine,
                       FAST.field_units)
    assert rms == pytest.approx(0.2, rel=1e-4)  # a constant field's RMS is its length in mm
    scaled = to_network_grid(img, field, None, FAST, min_field_rms_mm=1.0)
    assert scaled.field_scale == pytest.approx(5.0, rel=1e-4) and plain.field_scale == 1.0
    torch.testing.assert_close(scaled.field, plain.field * scaled.field_scale)
    assert torch.equal(scaled.image, plain.image)
    assert to_network_grid(img, field, None, FAST, min_field_rms_mm=0.1).field_scale == 1.0  # above: unscaled
    assert to_network_grid(img, field, None, FAST, field_scale=3.0).field_scale == 3.0
    assert scale_for_rms(0.0, 2.5) == 1.0 and scale_for_rms(0.5, None) == 1.0 and scale_for_rms(0.5, 2.5) == 5.0
    with pytest.raises(BrainshiftError, match="got both"):
        to_network_grid(img, field, None, FAST, min_field_rms_mm=1.0, field_scale=2.0)
    for kw in ({"min_field_rms_mm": -1.0}, {"field_scale": 0.0}, {"field_scale": float("inf")}):
        with pytest.raises(BrainshiftError, match="finite number"):
            to_network_grid(img, field, None, FAST, **kw)


# ------------------------------------------------------------------------------------------ keypoint channel
KP_NET = NetworkConfig(features=(4, 8, 16, 32), spacing_mm=2.0, keypoint_channel="proximity", keypoint_scale_mm=5.0)


def test_keypoint_proximity_is_exp_of_the_nearest_keypoint_distance():
    aff = _oblique_affine()
    shape = (6, 7, 5)
    pts_vox = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 1.0]])
    pts = pts_vox @ aff[:3, :3].T + aff[:3, 3]
    p = keypoint_proximity(pts, shape, aff, 5.0).numpy()
    assert p.shape == shape and p.dtype == np.float32
    assert p[1, 2, 3] == pytest.approx(1.0) and p[4, 5, 1] == pytest.approx(1.0)
    # an independent brute-force distance at every voxel
    world = np.indices(shape).reshape(3, -1).T @ aff[:3, :3].T + aff[:3, 3]
    d = np.linalg.norm(world[:, None, :] - pts[None], axis=2).min(axis=1)
    np.testing.assert_allclose(p.ravel(), np.exp(-d / 5.0), rtol=1e-5)
    for bad in (np.zeros((0, 3)), np.array([[np.nan, 0.0, 0.0]])):
        with pytest.raises(BrainshiftError, match="keypoint"):
            keypoint_proximity(bad, shape, aff, 5.0)


def test_network_input_with_a_keypoint_channel():
    aff = _oblique_affine()
    shape = (20, 22, 18)
    vol = Volume(_image(shape), aff)
    field = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    pts_vox = np.array([[5.0, 6.0, 7.0], [12.0, 15.0, 9.0], [9.0, 9.0, 9.0]])
    pts = pts_vox @ aff[:3, :3].T + aff[:3, 3]
    plain = to_network_grid(vol, field, None, FAST)
    ni = to_network_grid(vol, field, None, KP_NET, points_ras=pts)
    assert KP_NET.in_channels == 5 and ni.tensor.shape == (1, 5, *plain.tensor.shape[2:])
    # the first four channels are those of the network without the channel; the fifth is the proximity on the
    # padded network grid (the image view is the image channel only)
    torch.testing.assert_close(ni.tensor[:, :4], plain.tensor)
    assert ni.image.shape[1] == 1
    torch.testing.assert_close(ni.tensor[0, 4], keypoint_proximity(pts, ni.tensor.shape[2:], ni.padded_affine, 5.0))
    # the nearest network voxel to each keypoint is within half a diagonal (2 mm grid) of it
    assert float(ni.tensor[0, 4].max()) >= np.exp(-np.sqrt(3.0) / 5.0) - 1e-6
    with pytest.raises(BrainshiftError, match="expected the driving keypoints"):
        to_network_grid(vol, field, None, KP_NET)
    # a network without the channel ignores keypoints
    torch.testing.assert_close(to_network_grid(vol, field, None, FAST, points_ras=pts).tensor, plain.tensor)


def test_keypoint_channel_config():
    assert NetworkConfig(keypoint_channel="proximity").in_channels == 5  # 4 (the default) read as 5
    assert NetworkConfig(keypoint_channel="proximity", in_channels=5).uses_keypoints
    assert NetworkConfig.from_dict(NetworkConfig(keypoint_channel="proximity").to_dict()).in_channels == 5
    with pytest.raises(BrainshiftError, match="keypoint_channel"):
        NetworkConfig(keypoint_channel="distance")
    with pytest.raises(BrainshiftError, match="in_channels 5"):
        NetworkConfig(keypoint_channel="proximity", in_channels=6)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "20", True, None):
        with pytest.raises(BrainshiftError, match="keypoint_scale_mm"):
            NetworkConfig(keypoint_channel="proximity", keypoint_scale_mm=bad)
    # without the channel the two options are left out of the dictionary, so training states and caches made
    # before the option compare equal
    d = NetworkConfig().to_dict()
    assert "keypoint_channel" not in d and "keypoint_scale_mm" not in d
    assert NetworkConfig.from_dict(d) == NetworkConfig()
    assert NetworkConfig(keypoint_channel="proximity").to_dict()["keypoint_channel"] == "proximity"
    assert NetworkConfig(keypoint_channel="proximity").without_keypoint_channel() == NetworkConfig()
