"""Synthetic intraoperative MRI: the preop image moved by a ground-truth field, resected, on another grid.

For evaluating image-based registration (``brainshift register``) on simulated cases. The random draws (grid,
intensity non-uniformity, noise) are separated from the deterministic image formation:
:func:`draw_intraop_parameters` draws them from a seed and :func:`render_intraop_image` makes the image;
:func:`synthesize_intraop_image` does both.

Image formation. The ground truth is a forward Lagrangian field ``u`` on the preop grid (voxel units): the
tissue at preop voxel ``p`` is at world point ``A_pre (p + u(p))`` intraoperatively. The intraop image at a world
point ``y`` therefore shows the preop intensity at the preop voxel ``p`` solving ``p + u(p) = q`` with
``q = A_pre^-1 y``: the field is inverted on the intraop grid by the fixed-point iteration ``p <- q - u(p)``
(``u`` sampled trilinearly; it converges when ``|grad u| < 1``, i.e. for any non-folding brain-shift field).
Where ``p`` falls in the resection cavity (``cavity_mask`` on the preop grid: the removed tissue, which the
field also carries) the intensity is that of fluid; outside the preop image it is 0. Then a smooth multiplicative
intensity non-uniformity (``exp`` of a random quadratic polynomial of the world coordinates) and Rician noise
(``sqrt((I + n1)^2 + n2^2)``, ``n1, n2 ~ N(0, sigma^2)``) are applied.
"""

from __future__ import annotations

import math

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError
from brainshift.volume import Volume, mask_inside

#: Fixed-point iterations of the field inversion (the residual is reported in the parameters).
INVERSE_ITERATIONS = 20


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix about the unit ``axis`` by ``angle_rad`` (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def _foreground_box_mm(preop: Volume, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) bounding box of the mask (or of the non-zero preop voxels, or of the whole grid)."""
    sel = mask if mask is not None and mask.any() else np.asarray(preop.data) > 0
    idx = np.argwhere(sel) if sel.any() else np.array([[0, 0, 0], np.array(preop.shape) - 1])
    corners = np.array([[x, y, z] for x in (idx[:, 0].min(), idx[:, 0].max()) for y in (idx[:, 1].min(),
                        idx[:, 1].max()) for z in (idx[:, 2].min(), idx[:, 2].max())], dtype=np.float64)
    w = corners @ preop.affine[:3, :3].T + preop.affine[:3, 3]
    return w.min(axis=0), w.max(axis=0)


def draw_intraop_parameters(
    preop: Volume,
    seed: int | np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    spacing_mm: tuple[float, float] = (1.0, 1.5),
    max_rotation_deg: float = 10.0,
    margin_mm: tuple[float, float] = (5.0, 20.0),
    max_shift_mm: float = 10.0,
    bias_strength: tuple[float, float] = (0.1, 0.25),
    noise_fraction: tuple[float, float] = (0.01, 0.03),
) -> dict:
    """Draw the intraop acquisition: grid (spacing, rotation, field of view), non-uniformity, noise.

    Args:
        preop: the preop image (its geometry and intensity range set the grid and the noise level).
        seed: an integer seed or a numpy Generator.
        mask: optional ``(I, J, K)`` bool brain mask on the preop grid: the field of view covers its bounding box.
        spacing_mm: range of the isotropic voxel size.
        max_rotation_deg: largest rotation of the grid axes relative to the RAS axes (random axis).
        margin_mm: range of the margin added around the brain's bounding box on each side.
        max_shift_mm: largest shift of the field of view's centre along each axis.
        bias_strength: range of the non-uniformity's largest ``|log|`` gain over the field of view (0.25 ~ +-28 %).
        noise_fraction: range of the Rician noise sigma as a fraction of the 99th intensity percentile.

    Returns:
        JSON-serialisable dict: ``seed``, ``spacing_mm``, ``rotation_axis``, ``rotation_deg``, ``shape``,
        ``affine`` (4x4 voxel -> RAS mm of the intraop grid), ``bias_coefficients`` (10 quadratic-polynomial
        coefficients of the log gain in coordinates normalised to ``[-1, 1]`` over the field of view),
        ``bias_centre_mm``, ``bias_half_size_mm``, ``noise_sigma`` (intensity units), ``fluid_intensity``.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if not (0 < spacing_mm[0] <= spacing_mm[1]) or max_rotation_deg < 0:
        raise BrainshiftError(f"expected 0 < spacing range and max_rotation_deg >= 0, got {spacing_mm}, "
                              f"{max_rotation_deg}")
    spacing = float(rng.uniform(*spacing_mm))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = float(rng.uniform(0.0, max_rotation_deg))
    rot = _rotation(axis, math.radians(angle))
    lo, hi = _foreground_box_mm(preop, mask)
    centre = (lo + hi) / 2 + rng.uniform(-max_shift_mm, max_shift_mm, size=3)
    half = (hi - lo) / 2 + rng.uniform(*margin_mm, size=3)
    # the rotated grid must contain the (shifted) box: its half-extent along each grid axis
    half_grid = np.abs(rot.T) @ half
    shape = np.ceil(2 * half_grid / spacing).astype(int) + 1
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = centre - affine[:3, :3] @ ((shape - 1) / 2.0)
    coef = rng.normal(size=10)
    strength = float(rng.uniform(*bias_strength))
    # scale so that max |log gain| over the cube [-1, 1]^3 equals `strength` (bound by the coefficient sum)
    coef *= strength / np.abs(coef).sum()
    data = np.asarray(preop.data, dtype=np.float64)
    inside = data[mask] if mask is not None and mask.any() else data[data > 0]
    p99 = float(np.percentile(inside, 99)) if inside.size else 1.0
    fluid = float(np.percentile(inside, 2)) if inside.size else 0.0
    return {
        "seed": None if isinstance(seed, np.random.Generator) else int(seed),
        "spacing_mm": spacing,
        "rotation_axis": axis.tolist(),
        "rotation_deg": angle,
        "shape": [int(s) for s in shape],
        "affine": affine.tolist(),
        "bias_coefficients": coef.tolist(),
        "bias_centre_mm": centre.tolist(),
        "bias_half_size_mm": half.tolist(),
        "noise_sigma": float(rng.uniform(*noise_fraction)) * p99,
        "fluid_intensity": fluid,
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
    }


def invert_field_at(field_vox: np.ndarray, q_vox: np.ndarray, iterations: int = INVERSE_ITERATIONS
                    ) -> tuple[np.ndarray, float]:
    """Solve ``p + u(p) = q`` for preop voxel positions ``p`` by fixed-point iteration ``p <- q - u(p)``.

    Args:
        field_vox: ``(3, I, J, K)`` forward Lagrangian field on the preop grid, voxel units.
        q_vox: ``(3, M)`` target positions in preop voxel coordinates.
        iterations: fixed-point iterations.

    Returns:
        ``(p (3, M), residual)``: the preop positions and ``max |p + u(p) - q|`` (voxels) at the last iterate.

    Convention: ``field_vox`` is forward Lagrangian (preop voxel ``p`` moves to ``p + u(p)``), voxel units along
    ``i, j, k``; ``u`` is sampled trilinearly, and held constant (nearest edge value) outside the grid.
    """
    from scipy import ndimage

    p = q_vox.copy()
    if p.size == 0:
        return p, 0.0
    # only points that can reach the field's support move: u = 0 farther than the largest displacement (plus
    # the trilinear stencil) from where the field is nonzero, so p = q there exactly (most of the field of view)
    nonzero = np.any(field_vox != 0, axis=0)
    if not nonzero.any():
        return p, 0.0
    reach = int(np.ceil(float(np.sqrt((np.asarray(field_vox, np.float64) ** 2).sum(axis=0)).max()))) + 2
    near = ndimage.binary_dilation(nonzero, structure=np.ones((3, 3, 3), bool), iterations=reach)
    qi = np.rint(q_vox).astype(np.int64)
    inside = np.all((qi >= 0) & (qi < np.asarray(near.shape)[:, None]), axis=0)
    sel = np.zeros(q_vox.shape[1], dtype=bool)
    sel[inside] = near[tuple(qi[:, inside])]
    edge = np.zeros_like(nonzero)
    edge[1:-1, 1:-1, 1:-1] = True
    if (nonzero & ~edge).any():  # a field nonzero on the grid boundary continues outside it ("nearest")
        sel |= ~inside
    qs = q_vox[:, sel]
    ps = qs.copy()
    for _ in range(int(iterations)):
        u = np.stack([ndimage.map_coordinates(c, ps, order=1, mode="nearest") for c in field_vox])
        ps = qs - u
    u = np.stack([ndimage.map_coordinates(c, ps, order=1, mode="nearest") for c in field_vox])
    residual = float(np.abs(ps + u - qs).max()) if ps.size else 0.0
    p[:, sel] = ps
    return p, residual


def render_intraop_image(preop: Volume, field_vox: np.ndarray, cavity_mask: np.ndarray | None, params: dict
                         ) -> tuple[Volume, float]:
    """The intraop image for drawn ``params`` (see :func:`draw_intraop_parameters`); deterministic.

    Returns:
        ``(image, inverse_residual_vox)``: float32 intensity Volume on the intraop grid, and the field
        inversion's largest residual in preop voxels.

    Convention: ``field_vox`` is a float32 ``(3, I, J, K)`` forward Lagrangian field on the preop grid in voxel
    units along ``i, j, k``.
    """
    from scipy import ndimage

    shape = tuple(int(s) for s in params["shape"])
    affine = np.asarray(params["affine"], dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ grid + affine[:3, 3:4]  # (3, M) RAS mm
    q = np.linalg.solve(preop.affine[:3, :3], world - preop.affine[:3, 3:4])  # preop voxel coordinates
    p, residual = invert_field_at(np.asarray(field_vox, dtype=np.float32), q)
    data = np.asarray(preop.data, dtype=np.float32)
    img = ndimage.map_coordinates(data, p, order=1, mode="constant", cval=0.0).astype(np.float64)
    if cavity_mask is not None:
        cav = ndimage.map_coordinates(np.asarray(cavity_mask, dtype=np.float32), p, order=1, mode="constant",
                                      cval=0.0) >= 0.5
        img[cav] = params["fluid_intensity"]
    # smooth multiplicative non-uniformity: exp(quadratic polynomial) over the normalised field of view
    x = (world - np.asarray(params["bias_centre_mm"])[:, None]) / np.asarray(params["bias_half_size_mm"])[:, None]
    x = np.clip(x, -1.0, 1.0)
    terms = [np.ones(x.shape[1]), x[0], x[1], x[2], x[0] * x[0], x[1] * x[1], x[2] * x[2], x[0] * x[1],
             x[0] * x[2], x[1] * x[2]]
    img *= np.exp(np.tensordot(np.asarray(params["bias_coefficients"]), np.stack(terms), axes=1))
    sigma = float(params["noise_sigma"])
    if sigma > 0:
        rng = np.random.default_rng(int(params["noise_seed"]))
        img = np.sqrt((img + rng.normal(scale=sigma, size=img.shape)) ** 2 + rng.normal(scale=sigma, size=img.shape)
                      ** 2)
    return Volume(img.reshape(shape).astype(np.float32), affine, "intensity"), residual


def synthesize_intraop_image(
    preop: Volume,
    field_vox: np.ndarray,
    cavity_mask: Volume | np.ndarray | None,
    seed: int | np.random.Generator,
    *,
    brain_mask: Volume | np.ndarray | None = None,
    **draw_options: object,
) -> tuple[Volume, dict]:
    """Synthetic intraop MRI: preop moved by the ground truth, cavity filled with fluid, bias, noise, new grid.

    Args:
        preop: preop intensity image.
        field_vox: ``(3, I, J, K)`` ground-truth displacement field on the preop grid.
        cavity_mask: resected tissue on the preop grid (Volume or bool array), or None (no resection).
        seed: integer seed or numpy Generator for every random draw.
        brain_mask: optional brain mask on the preop grid (field of view, intensity percentiles).
        **draw_options: ranges passed to :func:`draw_intraop_parameters` (e.g. ``noise_fraction=(0, 0)``).

    Returns:
        ``(intraop, params)``: the float32 intensity Volume on the drawn grid, and the drawn parameters
        (:func:`draw_intraop_parameters`) plus ``inverse_residual_vox``.

    Convention: ``field_vox`` is float32 ``(3, I, J, K)``, forward Lagrangian (preop voxel ``p`` moves to
    ``p + u(p)``, world point ``A_pre (p + u(p))``), in voxel units along ``i, j, k``.

    Raises:
        GeometryError: a field or mask not on the preop grid.
    """
    field = np.asarray(field_vox)
    if field.shape != (3, *preop.shape) or not np.all(np.isfinite(field)):
        raise GeometryError(f"expected a finite field of shape {(3, *preop.shape)}, got {field.shape}")
    masks = []
    for name, m in (("cavity_mask", cavity_mask), ("brain_mask", brain_mask)):
        if m is None:
            masks.append(None)
            continue
        arr = np.asarray(m.data if isinstance(m, Volume) else m)
        if arr.shape != preop.shape or (isinstance(m, Volume) and not m.same_grid(preop)):
            raise GeometryError(f"expected {name} on the preop grid {preop.shape}, got shape {arr.shape}")
        masks.append(mask_inside(arr, name))
    params = draw_intraop_parameters(preop, seed, mask=masks[1], **draw_options)  # type: ignore[arg-type]
    image, residual = render_intraop_image(preop, field, masks[0], params)
    params["inverse_residual_vox"] = residual
    return image, params
