"""brainshift.model: the refinement network, its weights files, warping and the inference path.

Public API:

- :class:`NetworkConfig`, :data:`PRESETS`, :func:`get_preset`, :func:`build_network`,
  :func:`config_from_published_options` (``network``)
- :class:`LoadedModel`, :func:`save_weights`, :func:`load_weights` (``checkpoint``)
- :class:`NetworkInput`, :func:`to_network_grid`, :func:`field_to_network_grid`, :func:`from_network_grid`,
  :func:`refined_from_prediction`, :func:`pad_to_multiple`, :func:`crop_pad`, :func:`center_crop_or_pad`
  (``grid``: the pre/post-processing shared with training)
- :func:`refine_field` (``inference``)
- :func:`warp`, :func:`compose`, :func:`jacobian_determinant_torch` (``warp``)
"""

from brainshift.model.checkpoint import LoadedModel, load_weights, save_weights
from brainshift.model.grid import (
    NetworkInput,
    center_crop_or_pad,
    crop_pad,
    field_to_network_grid,
    from_network_grid,
    network_field_to_voxel,
    pad_to_multiple,
    refined_from_prediction,
    to_network_grid,
)
from brainshift.model.inference import predict, refine_field
from brainshift.model.network import (
    PRESETS,
    NetworkConfig,
    build_network,
    config_from_published_options,
    count_parameters,
    get_preset,
)
from brainshift.model.warp import compose, jacobian_determinant_torch, warp

__all__ = [
    "PRESETS",
    "LoadedModel",
    "NetworkConfig",
    "NetworkInput",
    "build_network",
    "center_crop_or_pad",
    "compose",
    "config_from_published_options",
    "count_parameters",
    "crop_pad",
    "field_to_network_grid",
    "from_network_grid",
    "get_preset",
    "jacobian_determinant_torch",
    "load_weights",
    "network_field_to_voxel",
    "pad_to_multiple",
    "predict",
    "refine_field",
    "refined_from_prediction",
    "save_weights",
    "to_network_grid",
    "warp",
]
