"""Classical interpolators: sparse keypoint displacements -> dense displacement field.

One interface (:func:`interpolate`), a registry (:data:`INTERPOLATORS`, :func:`register_interpolator`,
:func:`available_interpolators`) and pure functions underneath:

- ``linear``: Delaunay barycentric interpolation (:func:`linear_interpolate`).
- ``tps``: the published method's thin-plate spline variant (:func:`tps_interpolate`).
- ``tps3d``: the true 3-D biharmonic spline, kernel ``r`` (:func:`tps3d_interpolate`).
- ``gp``: Gaussian-process regression (Matern 5/2 kriging, hyperparameters by the evidence; :func:`gp_interpolate`).

Convention: keypoints and displacements in voxel units (0-based ``i, j, k``); every interpolator returns a
float32 ``(3, I, J, K)`` forward Lagrangian field in voxel units along ``i, j, k``.
"""

from brainshift.interpolate.base import (
    INTERPOLATORS,
    MIN_KEYPOINTS,
    InterpolatorFn,
    available_interpolators,
    check_keypoints,
    interpolate,
    register_interpolator,
)
from brainshift.interpolate.gp import gp_interpolate
from brainshift.interpolate.linear import linear_interpolate
from brainshift.interpolate.tps import tps_interpolate
from brainshift.interpolate.tps3d import tps3d_interpolate, tps3d_memory_bytes

__all__ = [
    "INTERPOLATORS",
    "MIN_KEYPOINTS",
    "InterpolatorFn",
    "available_interpolators",
    "check_keypoints",
    "gp_interpolate",
    "interpolate",
    "linear_interpolate",
    "register_interpolator",
    "tps3d_interpolate",
    "tps3d_memory_bytes",
    "tps_interpolate",
]
