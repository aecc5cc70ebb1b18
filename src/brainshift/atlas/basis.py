"""A per-patient deformation atlas: simulated brain-shift solutions of one brain, stored as a reduced basis.

The atlas of one preop image (built by :func:`brainshift.simulate.atlas.build_atlas`) holds the nodal
displacements of many finite-element solutions of that brain (its members: gravity directions, CSF drainage
levels, contact models, with and without resection, stiffness), all on the nodes of one hexahedral mesh. They
are stored as their mean and principal components (PCA by SVD of the centred member matrix; the components
kept are the fewest that retain the requested fraction of the members' variance, recorded as
``retained_energy``), with each member's coordinates, so that a fit (:mod:`brainshift.atlas.fit`) can use a
Gaussian prior on the coordinates (Miga et al., Int J CARS 2016, doi:10.1007/s11548-015-1295-x: an atlas of
solutions fitted to sparse intraoperative data; the reduced basis is ours).

Frames and units: nodal displacements are in the mesh's local frame, the voxel axes ``i, j, k`` of the preop
image in **mm** (``u_vox = u_local_mm / spacing``). A node sits at the continuous voxel index
``origin_vox + node_grid * step_vox``. The field inside an element is trilinear in its 8 nodes (the FE
interpolant), so :meth:`DeformationAtlas.rasterise` reproduces the simulator's own rasterisation
(:func:`brainshift.simulate.rasterise.rasterise_displacement`): node-grid points without a node take the value
of the nearest node, voxels outside the brain region get zero.

On disk (a folder): ``atlas.json`` (format, brainshift version, the image's grid and content hash, node grid,
build configuration, members and their modelling choices, basis sizes) and ``basis.npz`` (``node_grid``,
``mean``, ``components``, ``coordinates``, ``singular_values``, the packed brain ``region``). ``atlas.json`` is
written last: a folder without it is an unfinished build (``brainshift atlas`` resumes it).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError, InputFileError, KeypointError

FORMAT = "brainshift-deformation-atlas"
FORMAT_VERSION = 1
ATLAS_JSON = "atlas.json"
BASIS_FILE = "basis.npz"
#: Largest difference (mm) between the affine an atlas was built on and the image it is used with.
AFFINE_TOL_MM = 1e-3


def image_digest(data: np.ndarray) -> str:
    """SHA-256 (hex) of an image's voxel values as little-endian float32, C order (identifies the preop image).

    Args:
        data: ``(I, J, K)`` array of any numeric dtype.
    """
    arr = np.ascontiguousarray(np.asarray(data, dtype="<f4"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


@dataclass
class NodeGrid:
    """Where the atlas's mesh nodes sit on the preop image grid.

    Attributes:
        node_grid: ``(n_nodes, 3)`` int indices of the nodes in the node grid.
        shape: node-grid shape ``(nI, nJ, nK)``.
        origin_vox: ``(3,)`` continuous voxel index of node-grid point ``(0, 0, 0)``.
        step_vox: ``(3,)`` node spacing in voxels along ``i, j, k``.
        image_shape: the preop grid ``(I, J, K)``.
        spacing_mm: ``(3,)`` voxel size of the preop grid (mm).
    """

    node_grid: np.ndarray
    shape: tuple[int, int, int]
    origin_vox: np.ndarray
    step_vox: np.ndarray
    image_shape: tuple[int, int, int]
    spacing_mm: np.ndarray

    @property
    def n_nodes(self) -> int:
        return int(len(self.node_grid))

    def filled_ids(self) -> np.ndarray:
        """Node-grid-shaped int64 array of node ids; points without a node hold the nearest node's id."""
        from scipy import ndimage

        ids = np.full(self.shape, -1, dtype=np.int64)
        ids[tuple(self.node_grid.T)] = np.arange(self.n_nodes)
        missing = ids < 0
        if missing.any():
            _, ind = ndimage.distance_transform_edt(missing, return_indices=True)
            ids = ids[tuple(ind)]
        return ids

    def positions_mm(self, ids: np.ndarray | None = None) -> np.ndarray:
        """``(n, 3)`` positions of the nodes ``ids`` (default: all) in the local frame: voxel axes, mm from voxel
        ``(0, 0, 0)``."""
        g = self.node_grid if ids is None else self.node_grid[np.asarray(ids)]
        return (self.origin_vox + g * self.step_vox) * np.asarray(self.spacing_mm, dtype=np.float64)

    def grid_coords(self, points_vox: np.ndarray) -> np.ndarray:
        """``(n, 3)`` continuous node-grid coordinates of voxel-index points."""
        return (np.asarray(points_vox, dtype=np.float64) - self.origin_vox) / self.step_vox

    def trilinear(self, points_vox: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The 8 node ids and trilinear weights of each point (coordinates clamped to the grid, as
        ``map_coordinates(mode="nearest")`` does).

        Returns:
            ``(node_ids (n, 8) int64, weights (n, 8) float64)``; weights sum to 1.
        """
        ids = self.filled_ids() if ids is None else ids
        q = self.grid_coords(points_vox)
        hi = np.asarray(self.shape, dtype=np.float64) - 1.0
        q = np.clip(q, 0.0, hi)
        base = np.minimum(np.floor(q).astype(np.int64), np.maximum(np.asarray(self.shape) - 2, 0))
        t = q - base
        nid = np.empty((len(q), 8), dtype=np.int64)
        w = np.empty((len(q), 8), dtype=np.float64)
        for c in range(8):
            o = np.array([(c >> 2) & 1, (c >> 1) & 1, c & 1])
            idx = np.minimum(base + o, np.asarray(self.shape) - 1)
            nid[:, c] = ids[idx[:, 0], idx[:, 1], idx[:, 2]]
            w[:, c] = np.prod(np.where(o == 1, t, 1.0 - t), axis=1)
        return nid, w

    def has_node_near(self, points_vox: np.ndarray) -> np.ndarray:
        """``(n,)`` bool: a mesh node lies at a corner of the node-grid cell holding the point (the point is
        inside the meshed brain or within one element of it)."""
        exists = np.zeros(self.shape, dtype=bool)
        exists[tuple(self.node_grid.T)] = True
        q = self.grid_coords(points_vox)
        inside = np.all((q >= -1.0) & (q <= np.asarray(self.shape) - 0.0), axis=1)
        out = np.zeros(len(q), dtype=bool)
        base = np.floor(q).astype(np.int64)
        for c in range(8):
            idx = base + np.array([(c >> 2) & 1, (c >> 1) & 1, c & 1])
            ok = inside & np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
            out[ok] |= exists[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        return out

    def rasterise(self, nodal_local_mm: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Dense field on the preop grid from one nodal displacement.

        Args:
            nodal_local_mm: ``(n_nodes, 3)`` displacement in the local frame (voxel axes, mm).
            region: ``(I, J, K)`` bool, where the field is non-zero (the brain).

        Returns:
            float32 ``(3, I, J, K)``. Convention: forward Lagrangian, voxel units along ``i, j, k``, zero
            outside ``region``.
        """
        from scipy import ndimage

        vals = np.asarray(nodal_local_mm, dtype=np.float64) / self.spacing_mm
        ids = self.filled_ids()
        grid = vals[ids]  # (nI, nJ, nK, 3)
        vox = np.argwhere(region)
        coords = ((vox - self.origin_vox) / self.step_vox).T
        out = np.zeros((3,) + tuple(self.image_shape), dtype=np.float32)
        for c in range(3):
            out[c][tuple(vox.T)] = ndimage.map_coordinates(grid[..., c], coords, order=1, mode="nearest")
        return out


@dataclass
class DeformationAtlas:
    """A loaded atlas (see the module docstring for frames and the on-disk layout).

    Attributes:
        nodes: :class:`NodeGrid`.
        mean: ``(n_nodes, 3)`` float32 mean member displacement (local frame, mm).
        components: ``(r, n_nodes, 3)`` float32 orthonormal principal components (unit norm over all nodal
            values).
        coordinates: ``(n_members, r)`` float32 coordinates of each member in the basis (mm).
        singular_values: ``(r,)`` of the centred member matrix.
        region: ``(I, J, K)`` bool, the brain region the fields live in.
        affine: 4x4 voxel -> RAS mm affine of the preop grid.
        image_sha256: :func:`image_digest` of the preop image.
        members: one dict per member: its modelling choices (contact model, drainage fraction, gravity
            direction, resection, shear modulus, ...).
        info: the rest of ``atlas.json`` (build configuration, times, retained energy).
    """

    nodes: NodeGrid
    mean: np.ndarray
    components: np.ndarray
    coordinates: np.ndarray
    singular_values: np.ndarray
    region: np.ndarray
    affine: np.ndarray
    image_sha256: str
    members: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def prior_std_mm(self) -> np.ndarray:
        """``(r,)`` standard deviation of the members' coordinates along each component (mm)."""
        n = max(len(self.coordinates) - 1, 1)
        return np.maximum(np.asarray(self.singular_values, dtype=np.float64) / np.sqrt(n), 1e-9)

    def sample(self, points_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and components at points (trilinear FE interpolation).

        Args:
            points_vox: ``(m, 3)`` continuous voxel indices on the preop grid.

        Returns:
            ``(mean (m, 3), components (m, 3, r))`` in local mm.
        """
        nid, w = self.nodes.trilinear(points_vox)
        mean = np.einsum("mc,mcd->md", w, np.asarray(self.mean, dtype=np.float64)[nid])
        comps = np.asarray(self.components, dtype=np.float64)  # (r, n, 3)
        basis = np.einsum("mc,rmcd->mdr", w, comps[:, nid, :])
        return mean, basis

    def nodal(self, coefficients: np.ndarray) -> np.ndarray:
        """``(n_nodes, 3)`` local-mm displacement ``mean + sum_k c_k component_k``."""
        c = np.asarray(coefficients, dtype=np.float64)
        return np.asarray(self.mean, dtype=np.float64) + np.tensordot(c, self.components.astype(np.float64), 1)

    def check_image(self, shape: tuple[int, ...], affine: np.ndarray, data: np.ndarray | None = None,
                    where: str = "the image") -> None:
        """Raise :class:`GeometryError` unless the image is the one the atlas was built for.

        Args:
            shape, affine: the image's grid. data: its voxels (checked against the stored digest when given).
            where: how to name the image in the message.
        """
        if tuple(shape) != tuple(self.nodes.image_shape):
            raise GeometryError(f"expected {where} on the atlas's grid {tuple(self.nodes.image_shape)}, got "
                                f"{tuple(shape)}: the atlas was built for another image")
        diff = float(np.abs(np.asarray(affine, dtype=np.float64) - self.affine).max())
        if not diff <= AFFINE_TOL_MM:  # also a NaN difference
            raise GeometryError(f"expected {where} with the atlas's affine, got one differing by {diff:.3g} mm: "
                                f"the atlas was built for another image")
        if data is not None and image_digest(data) != self.image_sha256:
            raise GeometryError(f"expected {where} to be the preop image the atlas was built from, got other voxel "
                                f"values on the same grid: build the atlas for this image")

    def check_points(self, points_vox: np.ndarray, *, first_line: int = 2) -> None:
        """Raise :class:`KeypointError` for keypoints outside the atlas's brain (no mesh node within one element).

        ``first_line``: file line of the first keypoint, for the message (header on line 1).
        """
        ok = self.nodes.has_node_near(points_vox)
        if not ok.all():
            bad = np.nonzero(~ok)[0]
            p = np.asarray(points_vox)[bad[0]]
            raise KeypointError(f"expected keypoints inside the atlas's brain, got {len(bad)} outside it (first: "
                                f"line {bad[0] + first_line}, voxel ({p[0]:.1f}, {p[1]:.1f}, {p[2]:.1f}))")


def save_atlas(folder: str | Path, atlas: DeformationAtlas) -> None:
    """Write ``basis.npz`` then ``atlas.json`` into ``folder`` (each atomically: temporary name, then rename).

    Raises:
        OSError: the folder cannot be written.
    """
    from brainshift import __version__
    from brainshift.io.atomic import atomic_output

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = atlas.nodes
    with atomic_output(folder / BASIS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, node_grid=n.node_grid.astype(np.int32), mean=atlas.mean.astype(np.float32),
                     components=atlas.components.astype(np.float32),
                     coordinates=atlas.coordinates.astype(np.float32),
                     singular_values=np.asarray(atlas.singular_values, dtype=np.float64),
                     region=np.packbits(atlas.region.ravel()))
    record = {
        **atlas.info,
        "format": FORMAT, "format_version": FORMAT_VERSION, "brainshift_version": __version__,
        "image": {"shape": list(map(int, n.image_shape)), "affine": np.asarray(atlas.affine).tolist(),
                  "spacing_mm": np.asarray(n.spacing_mm).tolist(), "sha256": atlas.image_sha256},
        "node_grid": {"shape": list(map(int, n.shape)), "origin_vox": np.asarray(n.origin_vox).tolist(),
                      "step_vox": np.asarray(n.step_vox).tolist(), "n_nodes": n.n_nodes},
        "n_components": atlas.n_components, "n_members": len(atlas.members), "members": atlas.members,
    }
    with atomic_output(folder / ATLAS_JSON) as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def load_atlas(folder: str | Path) -> DeformationAtlas:
    """Read an atlas folder written by :func:`save_atlas`.

    Raises:
        InputFileError: not a folder, unfinished build (no ``atlas.json``), another format, or a corrupt or
            inconsistent ``atlas.json`` / ``basis.npz`` (one line naming the file and the problem).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"expected an atlas folder (made by brainshift atlas), got {folder}"
                             + (" (a file)" if folder.exists() else " (no such folder)"))
    meta_path, basis_path = folder / ATLAS_JSON, folder / BASIS_FILE
    if not meta_path.is_file():
        raise InputFileError(f"expected {meta_path} in a finished atlas, got none (an unfinished build: run "
                             f"brainshift atlas again with the same -o to resume it)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"expected {meta_path} to be JSON, got unreadable content ({exc})") from None
    except RecursionError:  # the json module recurses once per nesting level
        raise InputFileError(f"expected {meta_path} to be JSON, got unreadable content (nested too deeply)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputFileError(f"expected {meta_path} of format {FORMAT!r}, got "
                             f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}")
    version = meta.get("format_version", -1)
    if isinstance(version, bool) or not isinstance(version, int):
        raise InputFileError(f"expected an integer format_version in {meta_path}, got {version!r}")
    if version > FORMAT_VERSION:
        raise InputFileError(f"expected atlas format version <= {FORMAT_VERSION}, got {meta.get('format_version')} "
                             f"(made by a newer brainshift)")
    _check_meta(meta, meta_path)
    try:
        with np.load(basis_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("node_grid", "mean", "components", "coordinates", "singular_values",
                                         "region")}
        img, ng = meta["image"], meta["node_grid"]
        shape = tuple(int(v) for v in img["shape"])
        affine = np.asarray(img["affine"], dtype=np.float64).reshape(4, 4)
        nodes = NodeGrid(node_grid=arrays["node_grid"].astype(np.int64), shape=tuple(int(v) for v in ng["shape"]),
                         origin_vox=np.asarray(ng["origin_vox"], dtype=np.float64),
                         step_vox=np.asarray(ng["step_vox"], dtype=np.float64), image_shape=shape,
                         spacing_mm=np.asarray(img["spacing_mm"], dtype=np.float64))
        _check_arrays(arrays, shape, basis_path)
        region = np.unpackbits(arrays["region"].ravel(), count=int(np.prod(shape))).astype(bool).reshape(shape)
        atlas = DeformationAtlas(nodes=nodes, mean=arrays["mean"], components=arrays["components"],
                                 coordinates=arrays["coordinates"], singular_values=arrays["singular_values"],
                                 region=region, affine=affine, image_sha256=str(img["sha256"]),
                                 members=list(meta.get("members", [])), info=meta)
    except InputFileError:  # _check_arrays: already one line naming the file
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"expected a readable atlas basis in {basis_path}, got a corrupt or incomplete one "
                             f"({cause})") from None
    _check_consistent(atlas, basis_path)
    return atlas


def _check_meta(meta: dict, path: Path) -> None:
    """Refuse an ``atlas.json`` whose grid fields are malformed (a hand-edited or damaged file), naming each one.

    Raises:
        InputFileError: ``image.shape`` / ``node_grid.shape`` not three positive integers; ``image.affine`` not a
            finite invertible 4x4 matrix; ``spacing_mm`` / ``step_vox`` not three finite positive numbers;
            ``origin_vox`` not three finite numbers; ``members`` not a list of objects.
    """
    img, ng = meta.get("image"), meta.get("node_grid")
    if not isinstance(img, dict) or not isinstance(ng, dict):
        raise InputFileError(f"expected objects 'image' and 'node_grid' in {path}, got {type(img).__name__} and "
                             f"{type(ng).__name__}")
    problems = []

    def vector(section: dict, name: str, where: str, positive: bool, integer: bool = False):
        value = section.get(name)
        try:
            v = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            v = np.zeros(0)
        ok = v.shape == (3,) and bool(np.all(np.isfinite(v))) and (not positive or bool(np.all(v > 0))) and \
            (not integer or bool(np.all(v == np.round(v))))
        if not ok:
            kind = "positive integers" if integer else "finite positive numbers" if positive else "finite numbers"
            problems.append(f"{where}.{name} {value!r} (expected three {kind})")

    vector(img, "shape", "image", positive=True, integer=True)
    vector(img, "spacing_mm", "image", positive=True)
    vector(ng, "shape", "node_grid", positive=True, integer=True)
    vector(ng, "origin_vox", "node_grid", positive=False)
    vector(ng, "step_vox", "node_grid", positive=True)
    try:
        from brainshift.geometry import check_affine

        check_affine(np.asarray(img.get("affine"), dtype=np.float64))
    except (TypeError, ValueError):  # GeometryError is a ValueError
        problems.append(f"image.affine {str(img.get('affine'))[:80]} (expected a finite invertible 4x4 matrix)")
    members = meta.get("members", [])
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        problems.append(f"members {str(members)[:40]!r} (expected a list of objects)")
    if problems:
        raise InputFileError(f"expected a consistent atlas description in {path}, got {'; '.join(problems)}")


def _check_arrays(arrays: dict[str, np.ndarray], shape: tuple[int, ...], path: Path) -> None:
    """Refuse ``basis.npz`` arrays of the wrong kind before they are used (shapes are :func:`_check_consistent`'s).

    Raises:
        InputFileError: ``node_grid`` not integers of shape ``(n, 3)``; ``mean``, ``components``, ``coordinates``
            or ``singular_values`` not real floating-point numbers; ``region`` not the packed bits of the image grid
            (``ceil(I*J*K / 8)`` bytes); singular values negative or not finite.
    """
    problems = []
    ng = arrays["node_grid"]
    if not np.issubdtype(ng.dtype, np.integer) or ng.ndim != 2 or ng.shape[1] != 3:
        problems.append(f"node_grid of dtype {ng.dtype} and shape {ng.shape} (expected integers of shape (n, 3))")
    for name in ("mean", "components", "coordinates", "singular_values"):
        if not np.issubdtype(arrays[name].dtype, np.floating):
            problems.append(f"{name} of dtype {arrays[name].dtype} (expected floating-point numbers)")
    sv = arrays["singular_values"]
    if np.issubdtype(sv.dtype, np.floating) and (sv.ndim != 1 or not np.all(np.isfinite(sv)) or np.any(sv < 0)):
        problems.append(f"singular_values {np.array2string(sv.ravel()[:5], precision=3)} of shape {sv.shape} "
                        f"(expected finite, non-negative, one per component)")
    region, n_bytes = arrays["region"], -(-int(np.prod(shape)) // 8)
    if region.dtype != np.uint8 or region.size != n_bytes:
        problems.append(f"region of {region.size} {region.dtype} values (expected the {n_bytes} packed bytes of the "
                        f"image grid {tuple(shape)})")
    if problems:
        raise InputFileError(f"expected a consistent atlas basis in {path}, got {'; '.join(problems)}")


def _check_consistent(atlas: DeformationAtlas, path: Path) -> None:
    n, r = atlas.nodes.n_nodes, atlas.components.shape[0] if atlas.components.ndim == 3 else -1
    problems = []
    if atlas.mean.shape != (n, 3):
        problems.append(f"mean {atlas.mean.shape} for {n} nodes")
    if atlas.components.ndim != 3 or atlas.components.shape[1:] != (n, 3):
        problems.append(f"components {atlas.components.shape}")
    if atlas.coordinates.ndim != 2 or atlas.coordinates.shape[1] != r:
        problems.append(f"coordinates {atlas.coordinates.shape} for {r} components")
    if len(atlas.singular_values) != r:
        problems.append(f"{len(atlas.singular_values)} singular values for {r} components")
    if n and (atlas.nodes.node_grid.min() < 0 or np.any(atlas.nodes.node_grid.max(axis=0) >=
                                                          np.asarray(atlas.nodes.shape))):
        problems.append("node indices outside the node grid")
    for name in ("mean", "components", "coordinates"):
        if not np.all(np.isfinite(getattr(atlas, name))):
            problems.append(f"non-finite {name}")
    if not atlas.region.any():
        problems.append("an empty brain region")
    if problems:
        raise InputFileError(f"expected a consistent atlas basis in {path}, got {'; '.join(problems)}")


def reduce_members(members_local_mm: np.ndarray, energy: float = 0.999, max_components: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Mean and principal components of member displacements (PCA by thin SVD of the centred matrix).

    Args:
        members_local_mm: ``(n_members, n_nodes, 3)`` nodal displacements (local mm).
        energy: fraction of the members' variance (sum of squared singular values) to retain, in (0, 1].
        max_components: optional cap on the number of components.

    Returns:
        ``(mean (n_nodes, 3), components (r, n_nodes, 3), coordinates (n_members, r), singular_values (r,),
        retained_energy)``.

    Raises:
        BrainshiftError: fewer than 2 members or ``energy`` outside (0, 1].
    """
    x = np.asarray(members_local_mm, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] < 2 or x.shape[2] != 3:
        raise BrainshiftError(f"expected at least 2 members of shape (n_nodes, 3), got an array of shape {x.shape}")
    if not 0.0 < energy <= 1.0:
        raise BrainshiftError(f"expected the retained energy in (0, 1], got {energy}")
    m = x.shape[0]
    mean = x.mean(axis=0)
    a = (x - mean).reshape(m, -1)
    # thin SVD through the small Gram matrix (n_members x n_members)
    gram = a @ a.T
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = float(evals.sum())
    if total <= 0.0:
        r = 0
    else:
        cum = np.cumsum(evals) / total
        r = int(np.searchsorted(cum, energy - 1e-12) + 1)
        r = min(r, int((evals > total * 1e-12).sum()))
    if max_components is not None:
        r = min(r, int(max_components))
    s = np.sqrt(evals[:r])
    comps = (evecs[:, :r].T @ a) / s[:, None] if r else np.zeros((0, a.shape[1]))
    coords = a @ comps.T
    retained = float(evals[:r].sum() / total) if total > 0 else 1.0
    return (mean.astype(np.float32), comps.reshape(r, -1, 3).astype(np.float32), coords.astype(np.float32), s,
            retained)
