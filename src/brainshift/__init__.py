"""brainshift: keypoint-based brain-shift compensation.

Sparse matched keypoints between a preoperative and an intraoperative image are turned into a dense,
physically plausible 3-D displacement field: a classical interpolation (Delaunay-linear or thin-plate
spline) refined by a residual 3-D U-Net trained on biomechanically simulated brain deformations
(after Assis et al. 2025, arXiv:2508.13762).

Conventions (see README "Conventions"): arrays in nibabel voxel order ``(i, j, k)``; world frame RAS+ mm;
displacement fields float32 ``(3, I, J, K)``, forward Lagrangian, voxel units along ``i, j, k``.
"""

from brainshift.errors import BrainshiftError
from brainshift.volume import Volume

__version__ = "0.1.0"
__all__ = ["BrainshiftError", "Volume", "__version__"]
