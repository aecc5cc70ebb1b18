"""Interpolator registry and the checks every interpolator shares.

An *interpolator* turns sparse matched keypoints into a dense displacement field. Each one is a pure
function with the signature::

    fn(points_vox (N, 3), disps_vox (N, 3), shape (I, J, K), affine=None, **options) -> (3, I, J, K) float32

registered under a short name with :func:`register_interpolator`. :func:`interpolate` looks the name up,
checks the options against the function's signature and calls it.

Convention: keypoints ``points_vox`` are continuous 0-based voxel indices ``(i, j, k)`` of the preop grid,
``disps_vox`` their displacements in voxel units along ``i, j, k``; the returned field is float32
``(3, I, J, K)``, forward Lagrangian (preop voxel ``p`` moves to ``p + u(p)``), in voxel units. ``affine``
(4x4 voxel -> RAS mm) only tells interpolators that work in world millimetres where the voxels are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import numpy as np

from brainshift.errors import BrainshiftError, GeometryError


class InterpolatorFn(Protocol):
    """Signature shared by every registered interpolator (see the module docstring)."""

    def __call__(
        self,
        points_vox: np.ndarray,
        disps_vox: np.ndarray,
        shape: tuple[int, int, int],
        affine: np.ndarray | None = None,
        **options: object,
    ) -> np.ndarray: ...


#: Registered interpolators by name. Filled by the ``@register_interpolator`` decorators of
#: ``linear.py``, ``tps.py``, ``tps3d.py`` and ``gp.py`` when :mod:`brainshift.interpolate` is imported.
INTERPOLATORS: dict[str, InterpolatorFn] = {}

#: Fewest keypoints any interpolator accepts: a 3-D simplex / a unique affine term needs 4.
MIN_KEYPOINTS = 4


def register_interpolator(name: str) -> Callable[[InterpolatorFn], InterpolatorFn]:
    """Decorator registering an interpolator function under ``name`` in :data:`INTERPOLATORS`.

    Args:
        name: short lower-case name used on the command line (``-m/--interp_mode``).

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        BrainshiftError: another function is already registered under ``name``.
    """

    def decorator(fn: InterpolatorFn) -> InterpolatorFn:
        existing = INTERPOLATORS.get(name)
        if existing is not None and getattr(existing, "__qualname__", None) != getattr(fn, "__qualname__", None):
            raise BrainshiftError(f"expected a new interpolator name, got {name!r} which is already registered")
        INTERPOLATORS[name] = fn
        return fn

    return decorator


def available_interpolators() -> list[str]:
    """Sorted names of the registered interpolators (e.g. ``['gp', 'linear', 'tps', 'tps3d']``)."""
    return sorted(INTERPOLATORS)


def interpolate(
    method: str,
    points_vox: np.ndarray,
    disps_vox: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray | None = None,
    **options: object,
) -> np.ndarray:
    """Interpolate sparse keypoint displacements to a dense field with the interpolator named ``method``.

    Args:
        method: a name from :func:`available_interpolators` (``linear``, ``tps``, ``tps3d``, ``gp``).
        points_vox: ``(N, 3)`` keypoint positions, continuous 0-based voxel indices ``(i, j, k)``.
        disps_vox: ``(N, 3)`` keypoint displacements in voxel units along ``i, j, k``.
        shape: grid shape ``(I, J, K)``.
        affine: optional 4x4 voxel -> RAS mm affine of the grid (used by ``tps3d`` and ``gp`` to work in mm).
        **options: keyword options of that interpolator (e.g. ``outside="nearest"`` for ``linear``,
            ``lam=0.1`` for ``tps``, ``smoothing=0.0`` for ``tps3d``, ``downsample=1`` for ``gp``).

    Returns:
        ``(3, I, J, K)`` float32 displacement field.

    Convention: forward Lagrangian field in voxel units along ``i, j, k``, on the grid ``shape``.

    Raises:
        BrainshiftError: unknown method (the message lists the choices) or an option it does not take.
        KeypointError, GeometryError: bad keypoints or grid (from the interpolator).
    """
    fn = INTERPOLATORS.get(str(method).lower()) if isinstance(method, str) else None
    if fn is None:
        raise BrainshiftError(f"expected an interpolator in {available_interpolators()}, got {method!r}")
    params = inspect.signature(fn).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise BrainshiftError(f"expected options of {method!r} among {accepted}, got {unknown}")
    return fn(points_vox, disps_vox, shape, affine, **options)


def check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Return ``shape`` as a tuple of three positive ints.

    Raises:
        GeometryError: not three positive integers.
    """
    try:
        s = tuple(int(v) for v in shape)
        ok = len(s) == 3 and all(v >= 1 and v == float(w) for v, w in zip(s, shape, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GeometryError(f"expected a grid shape of three positive integers (I, J, K), got {shape!r}")
    return s  # type: ignore[return-value]


def check_keypoints(
    points_vox: np.ndarray, disps_vox: np.ndarray, min_points: int = MIN_KEYPOINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Validate keypoints and displacements; merge identical duplicates.

    Checks, in order: both arrays ``(N, 3)`` with the same ``N``; all values finite; duplicate positions
    (identical rows are merged with a warning, differing displacements raise naming the position); at
    least ``min_points`` distinct positions; positions not all on one plane or line (the affine term and
    a 3-D simplex both need 3-D spread).

    Args:
        points_vox: ``(N, 3)`` positions (any frame; the checks are frame-free).
        disps_vox: ``(N, 3)`` displacements.
        min_points: fewest distinct positions accepted.

    Returns:
        ``(points, disps)`` as float64 ``(M, 3)`` arrays, ``M <= N`` after merging identical duplicates
        (first occurrence order kept).

    Raises:
        KeypointError: wrong shape, non-finite values, conflicting duplicates, too few or coplanar points.
    """
    from brainshift.keypoints.validate import validate_keypoints

    return validate_keypoints(points_vox, disps_vox, None, min_points=min_points)
