"""The skull points of an atlas and the fit's prior conditioned on no normal motion there (``+contact``)."""

from __future__ import annotations

import numpy as np
import pytest

from brainshift.atlas.basis import DeformationAtlas, NodeGrid, reduce_members
from brainshift.atlas.boundary import CRANIOTOMY_MARGIN_MM, craniotomies, skull_contact
from brainshift.atlas.fit import fit_atlas

CENTRE = np.array([30.0, 30.0, 30.0])
RADIUS = 24.0
ENTRY = CENTRE + np.array([0.0, 0.0, RADIUS])  # the craniotomy at the top (RAS = voxel index here)


def _sphere_atlas(member_fields, entry=True, radius_mm=12.0):
    """An atlas of a spherical brain (1 mm voxels, identity affine, 3 mm node grid) whose members are the given
    functions of the node positions ``p (n, 3) -> (n, 3)`` (local mm)."""
    image_shape = (61, 61, 61)
    step = 3.0
    shape = (21, 21, 21)
    g_all = np.argwhere(np.ones(shape, dtype=bool))
    inside = np.linalg.norm(g_all * step - CENTRE, axis=1) <= RADIUS
    g = g_all[inside]
    nodes = NodeGrid(node_grid=g, shape=shape, origin_vox=np.zeros(3), step_vox=np.full(3, step),
                     image_shape=image_shape, spacing_mm=np.ones(3))
    p = g * step
    members = np.stack([f(p) for f in member_fields])
    mean, comps, coords, sv, _ = reduce_members(members, energy=1.0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in image_shape], indexing="ij"), -1)
    region = np.linalg.norm(grid - CENTRE, axis=-1) <= RADIUS + 1.0
    about = {"craniotomy_radius_mm": radius_mm, **({"entry_point_ras": ENTRY.tolist()} if entry else {})}
    return DeformationAtlas(nodes=nodes, mean=mean, components=comps, coordinates=coords, singular_values=sv,
                            region=region, affine=np.eye(4), image_sha256="x",
                            members=[dict(about, k=i) for i in range(len(member_fields))])


def _translation(v):
    return lambda p: np.broadcast_to(np.asarray(v, dtype=float), p.shape).copy()


def _swelling(s):
    return lambda p: s * (p - CENTRE)


def _rotation(axis, angle=0.05):
    return lambda p: angle * np.cross(np.asarray(axis, dtype=float), p - CENTRE)


def test_skull_points_lie_on_the_surface_with_outward_normals_outside_the_craniotomy():
    atlas = _sphere_atlas([_translation([1, 0, 0]), _swelling(0.02)])
    assert len(craniotomies(atlas)) == 1
    sc = skull_contact(atlas, spacing_mm=6.0)
    assert len(sc) > 50
    radial = sc.points_mm - CENTRE
    dist = np.linalg.norm(radial, axis=1)
    assert np.all(np.abs(dist - RADIUS) <= 3.0 * np.sqrt(3))  # outer node layer
    cos = (radial / dist[:, None] * sc.normals).sum(1)
    assert cos.min() > 0.9  # outward
    np.testing.assert_allclose(np.linalg.norm(sc.normals, axis=1), 1.0, atol=1e-9)
    assert np.linalg.norm(sc.points_mm - ENTRY, axis=1).min() >= 12.0 + CRANIOTOMY_MARGIN_MM
    # a grid design records the radius once, in the build config
    grid = _sphere_atlas([_translation([1, 0, 0]), _swelling(0.02)])
    for m in grid.members:
        del m["craniotomy_radius_mm"]
    grid.info = {"config": {"craniotomy_radius_mm": 12.0}}
    assert [r for _, r in craniotomies(grid)] == [12.0] and len(skull_contact(grid, spacing_mm=6.0)) == len(sc)
    # a damaged member: one line naming it
    from brainshift.errors import InputFileError

    bad = _sphere_atlas([_translation([1, 0, 0]), _swelling(0.02)])
    bad.members[1]["entry_point_ras"] = [1.0, "x"]
    with pytest.raises(InputFileError, match="entry_point_ras of 3 finite numbers"):
        skull_contact(bad)
    # without a recorded craniotomy (an atlas built before they were recorded): no points
    assert len(skull_contact(_sphere_atlas([_translation([1, 0, 0]), _swelling(0.02)], entry=False))) == 0


def test_conditioned_posterior_is_the_joint_gaussian_process_posterior():
    """The map posterior of the conditioned prior equals the posterior of the joint Gaussian process over the
    keypoints' components and the skull points' normal components, observed as ``[r; 0]`` with noise
    ``tau`` and ``a^2 sigma^2`` (Rasmussen & Williams 2006, eq. 2.23), at arbitrary points."""
    from brainshift.atlas import fit as F

    rng = np.random.default_rng(0)
    m, n_skull, k = 12, 30, 4
    x = rng.uniform(0, 80, (m, 3))
    b = rng.uniform(0, 80, (n_skull, 3))
    normals = rng.normal(size=(n_skull, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    coef = rng.normal(size=(k, 3, 4))

    def basis(p):  # (n, 3, k): an explicit smooth basis, so the atlas part can be evaluated anywhere
        feats = np.concatenate([p / 50.0, np.ones((len(p), 1))], axis=1)  # (n, 4)
        return np.einsum("kcf,nf->nck", coef, feats)

    s = np.array([1.0, 2.0, 0.5, 1.5])
    bw = basis(x).reshape(3 * m, k) * s
    skull = F._Skull(points_mm=b, normals=normals, bn=np.einsum("nc,nck->nk", normals, basis(b)) * s)
    r = rng.normal(size=3 * m)
    hp = {"atlas_scale2": 0.5, "rho": 0.8, "length_mm": 30.0, "tau_mm2": 0.05, "eta_mm": np.sqrt(0.4),
          "contact": True}
    post = F._kernel_posterior(bw, s, r, x, hp, skull)
    q = rng.uniform(0, 80, (7, 3))
    got = basis(q) @ post.coefficients + post.kernel_at(q)

    # the joint process: u(x) = B(x) diag(s) z + g(x), z ~ N(0, a^2 I), g ~ GP(0, a^2 rho k (x) I_3)
    a2, rho, length = hp["atlas_scale2"], hp["rho"], hp["length_mm"]

    def cov(p1, p2):  # (3 n1, 3 n2) covariance of the components, without a^2
        b1 = basis(p1).reshape(-1, k) * s
        b2 = basis(p2).reshape(-1, k) * s
        return b1 @ b2.T + rho * np.kron(F.matern52(F._pairwise(p1, p2), length), np.eye(3))

    proj = np.zeros((n_skull, 3 * n_skull))
    for j in range(n_skull):
        proj[j, 3 * j:3 * j + 3] = normals[j]
    obs = np.block([[cov(x, x), cov(x, b) @ proj.T], [proj @ cov(b, x), proj @ cov(b, b) @ proj.T]])
    noise = np.concatenate([np.full(3 * m, hp["tau_mm2"]), np.full(n_skull, a2 * F.CONTACT_SIGMA2)])
    alpha = np.linalg.solve(a2 * obs + np.diag(noise), np.concatenate([r, np.zeros(n_skull)]))
    cross = a2 * np.concatenate([cov(q, x), cov(q, b) @ proj.T], axis=1)
    want = (cross @ alpha).reshape(-1, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # the kernel part is evaluated in float32


def _held(v):
    """A shift of the middle of the brain that the skull holds: ``v (1 - r^2 / R^2)``, zero at the skull."""
    return lambda p: np.asarray(v, dtype=float) * (1.0 - ((p - CENTRE) ** 2).sum(1, keepdims=True) / RADIUS ** 2)


def test_a_deformation_held_by_the_skull_prefers_the_conditioned_prior():
    """Members that swell and translate the brain (normal motion at the skull) cannot make a shift of the middle
    that the skull holds: from keypoints in the middle the free prior carries the shift out through the skull,
    the marginal likelihood puts its weight on the prior conditioned on no normal motion there, and that fit is
    closer to the truth. Keypoints from a member (swelling: normal motion everywhere) keep the free prior."""
    members = [_translation([1, 0, 0]), _translation([0, 1, 0]), _translation([0, 0, -1]), _swelling(0.03),
               _swelling(-0.02)]
    atlas = _sphere_atlas(members)
    rng = np.random.default_rng(2)
    pts = CENTRE + rng.uniform(-1, 1, (400, 3)) * RADIUS
    pts = pts[np.linalg.norm(pts - CENTRE, axis=1) < 0.5 * RADIUS][:20]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in atlas.nodes.image_shape], indexing="ij"), -1)
    region = np.linalg.norm(grid - CENTRE, axis=-1) <= RADIUS - 1.0
    for truth_fn, conditioned in ((_held([1.0, 0.5, 0.0]), True), (_swelling(0.03), False)):
        d = truth_fn(pts)
        truth = truth_fn(grid[region].astype(float))
        errs, shares = {}, {}
        for prior in ("scaled-atlas+matern", "scaled-atlas+matern+contact"):
            fit = fit_atlas(atlas, pts, d, residual_method="none", prior=prior)
            errs[prior] = float(((fit.field_vox[:, region].T - truth) ** 2).sum(1).mean())
            shares[prior] = fit.info["kernel"].get("contact_share")
        share = shares["scaled-atlas+matern+contact"]
        if conditioned:
            assert share > 0.5
            assert errs["scaled-atlas+matern+contact"] < 0.2 * errs["scaled-atlas+matern"]
        else:
            assert share < 0.5
            assert errs["scaled-atlas+matern+contact"] == pytest.approx(errs["scaled-atlas+matern"], rel=0.05,
                                                                        abs=1e-4)


def test_with_few_keypoints_the_contact_prior_is_the_scaled_prior():
    from brainshift.atlas.fit import CONTACT_MIN_KEYPOINTS

    atlas = _sphere_atlas([_translation([1, 0, 0]), _swelling(0.02), _rotation([0, 0, 1])])
    rng = np.random.default_rng(6)
    pts = CENTRE + rng.uniform(-1, 1, (400, 3)) * RADIUS
    pts = pts[np.linalg.norm(pts - CENTRE, axis=1) < 0.6 * RADIUS]
    few, enough = pts[:CONTACT_MIN_KEYPOINTS - 1], pts[:CONTACT_MIN_KEYPOINTS]
    for p, used in ((few, False), (enough, True)):
        d = _held([1.0, 0.5, 0.0])(p)
        a = fit_atlas(atlas, p, d, prior="scaled-atlas+matern")
        b = fit_atlas(atlas, p, d, prior="scaled-atlas+matern+contact")
        assert (b.info["kernel"]["skull_points"] > 0) == used
        assert np.array_equal(a.field_vox, b.field_vox) == (not used)


def test_without_skull_points_the_contact_prior_is_the_scaled_prior():
    atlas = _sphere_atlas([_translation([1, 0, 0]), _swelling(0.02), _rotation([0, 0, 1])], entry=False)
    pts = CENTRE + np.random.default_rng(5).uniform(-12, 12, (15, 3))
    d = _rotation([1, 0, 0])(pts)
    a = fit_atlas(atlas, pts, d, prior="scaled-atlas+matern")
    b = fit_atlas(atlas, pts, d, prior="scaled-atlas+matern+contact")
    np.testing.assert_array_equal(a.field_vox, b.field_vox)
    assert b.info["kernel"]["skull_points"] == 0


def test_skull_parts_are_evaluated_on_the_coarse_lattice_and_keypoints_stay_honoured():
    """The kernel parts with skull centres are evaluated on every other node and interpolated: exact on the
    coarse lattice, close elsewhere; the fit's residual spline still makes the field honour the keypoints."""
    from brainshift.atlas.fit import _fit_posterior
    from brainshift.interpolate import interpolate

    members = [_translation([1, 0, 0]), _translation([0, 0, -1]), _swelling(0.03)]
    atlas = _sphere_atlas(members)
    rng = np.random.default_rng(7)
    pts = CENTRE + rng.uniform(-1, 1, (400, 3)) * RADIUS
    pts = pts[np.linalg.norm(pts - CENTRE, axis=1) < 0.6 * RADIUS][:20]
    d = _held([1.0, 0.5, 0.0])(pts)
    post, _, info, _ = _fit_posterior(atlas, pts, d)
    assert info["kernel"]["contact_share"] > 0.5 and all(len(c) > len(pts) for _, c, _ in post.kernel_parts)
    exact = post.kernel_at(atlas.nodes.positions_mm())
    coarse = post.kernel_at_nodes(atlas.nodes)
    even = np.all(atlas.nodes.node_grid % 2 == 0, axis=1)
    np.testing.assert_allclose(coarse[even], exact[even], atol=1e-5)
    # trilinear error <= (h^2 / 8) sum |f_aa| with h = 6 mm; this phantom is small (48 mm across), so the held
    # shift's curvature 2 |v| / R^2 per axis bounds it by about 0.05 |v| (on adult brains, bench/RESULTS.md
    # session 25: at most 0.02 mm for kernel parts of up to 3.5 mm)
    assert np.abs(coarse - exact).max() < 0.05 * np.abs(exact).max()
    idx = np.round(pts).astype(int)
    truth_at = _held([1.0, 0.5, 0.0])(idx.astype(float))
    tps = interpolate("tps", idx.astype(float), truth_at, atlas.nodes.image_shape)
    tps_at = tps[(slice(None),) + tuple(idx.T)].T
    fit_i = fit_atlas(atlas, idx.astype(float), truth_at)
    at_kp = fit_i.field_vox[(slice(None),) + tuple(idx.T)].T
    assert np.abs(at_kp - truth_at).max() <= np.abs(tps_at - truth_at).max() + 0.01


def _random_problem(seed=3, m=10, n_skull=25, k=4):
    from brainshift.atlas import fit as F

    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 80, (m, 3))
    b = rng.uniform(0, 80, (n_skull, 3))
    normals = rng.normal(size=(n_skull, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    bw = rng.normal(size=(3 * m, k))
    skull = F._Skull(points_mm=b, normals=normals, bn=rng.normal(size=(n_skull, k)))
    return x, bw, skull, rng


@pytest.mark.parametrize("rho", [0.0, 0.7])
@pytest.mark.parametrize("sigma2", [0.03, 2.0])
def test_factored_conditioning_equals_the_direct_gaussian_conditioning(rho, sigma2):
    """The eigenbasis + Woodbury form of the held prior equals ``M_XX - M_XB (M_BB + sigma^2 I)^-1 M_BX`` and its
    projection ``(M_BB + sigma^2 I)^-1 M_BX v`` computed directly, with and without the kernel part."""
    from brainshift.atlas import fit as F

    x, bw, skull, rng = _random_problem()
    length = 30.0
    a_mat = bw @ bw.T
    k3 = np.kron(F.matern52(F._pairwise(x, x), length), np.eye(3))
    c, kn = F._skull_kernel(x, skull, length)
    mxb, mbb, mat = bw @ skull.bn.T, skull.bn @ skull.bn.T + sigma2 * np.eye(len(skull)), a_mat
    if rho > 0:
        mxb, mbb, mat = mxb + rho * c, mbb + rho * kn, a_mat + rho * k3
    proj = np.linalg.solve(mbb, mxb.T)
    factor = F._skull_factor(x, skull, length if rho > 0 else None)
    got, held = F._conditioned(a_mat, k3 if rho > 0 else None, bw, factor, rho, sigma2)
    np.testing.assert_allclose(got, mat - mxb @ proj, rtol=0, atol=1e-9 * np.abs(mat).max())
    v = rng.normal(size=3 * len(x))
    np.testing.assert_allclose(held.apply(v), proj @ v, rtol=0, atol=1e-9 * np.abs(proj @ v).max())
    assert held.sigma2 == sigma2


def test_held_priors_share_the_free_priors_weight_among_their_softnesses(monkeypatch):
    """The held priors of a sigma^2 grid together carry the free prior's prior weight: a grid that repeats one
    value gives exactly that value's fit and evidence share; a softer value the data prefer moves the share."""
    from brainshift.atlas import fit as F

    members = [_translation([1, 0, 0]), _translation([0, 0, -1]), _swelling(0.03)]
    atlas = _sphere_atlas(members)
    rng = np.random.default_rng(7)
    pts = CENTRE + rng.uniform(-1, 1, (400, 3)) * RADIUS
    pts = pts[np.linalg.norm(pts - CENTRE, axis=1) < 0.6 * RADIUS][:20]
    d = _held([1.0, 0.5, 0.0])(pts) + _swelling(0.01)(pts)  # held in the middle, a little normal motion
    monkeypatch.setattr(F, "CONTACT_SIGMA2S", (0.03,))
    one = fit_atlas(atlas, pts, d, residual_method="none")
    monkeypatch.setattr(F, "CONTACT_SIGMA2S", (0.03, 0.03))
    twice = fit_atlas(atlas, pts, d, residual_method="none")
    np.testing.assert_allclose(twice.field_vox, one.field_vox, rtol=0, atol=1e-5)
    assert twice.info["kernel"]["contact_share"] == pytest.approx(one.info["kernel"]["contact_share"], abs=1e-9)
    monkeypatch.setattr(F, "CONTACT_SIGMA2S", (0.03, 30.0))
    grid = fit_atlas(atlas, pts, d, residual_method="none")
    assert not np.allclose(grid.field_vox, one.field_vox, atol=1e-4)
