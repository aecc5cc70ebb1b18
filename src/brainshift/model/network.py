"""Residual 3-D U-Net with concurrent spatial and channel squeeze-excitation (the refinement network).

The default :class:`NetworkConfig` reproduces the published architecture (Assis et al. 2025,
arXiv:2508.13762; facts in ``shared/reference/published_architecture.md``): 4 levels of 32, 64, 128, 256
features, residual blocks ``conv1`` (1x1x1, only where the channel count changes) -> ``conv2`` (3x3x3,
instance norm, LeakyReLU 0.01) -> ``conv3`` (3x3x3, instance norm) -> + block input -> LeakyReLU -> scSE;
max pooling between encoder levels; transposed-convolution upsampling with summation skips; a final 1x1x1
convolution to 3 channels added to the input displacement channels (residual learning). Its state-dict
names and shapes match the published checkpoint manifest exactly (7,287,146 parameters).

Building blocks are plain ``torch.nn`` modules named to match the published state dict (MONAI's
``ChannelSELayer`` / ``ResidualSELayer`` name their tensors differently and use a reduction ratio, so they
are not used here). Squeeze-excitation follows Roy et al. 2018, "Concurrent spatial and channel squeeze &
excitation in fully convolutional networks" (max-out combination, channel reduction ratio 1 as published).

Axis order: the torch spatial dimensions ``(D, H, W)`` of every tensor are our array order ``(i, j, k)``
directly; the network is applied without any transpose (convolutions do not care which axis is which).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from brainshift.errors import BrainshiftError

NORMS = ("instance", "batch", "group", "none")
SE_MODES = ("scse", "cse", "sse", "none")
UPSAMPLES = ("transposed", "trilinear", "nearest")
POOLS = ("max", "avg")
FIELD_UNITS = ("mm", "voxel")
#: Keypoint input channels: ``none`` (published: field + image) or ``proximity`` (one more channel,
#: ``exp(-d / keypoint_scale_mm)`` with ``d`` the distance to the nearest driving keypoint).
KEYPOINT_CHANNELS = ("none", "proximity")


@dataclass
class NetworkConfig:
    """Constructor arguments of the refinement network; JSON-serialisable; defaults = the published network.

    Attributes:
        in_channels: input channels: 3 displacement channels, then the image channel, then the keypoint
            channel when ``keypoint_channel`` is not ``none``. Published: 4.
        out_channels: output displacement channels. Published: 3.
        features: feature count per level, finest first; ``len(features)`` is the number of levels.
        norm: ``instance`` (no affine parameters, as published), ``batch``, ``group`` (8 groups or fewer
            so the group count divides the channels) or ``none``.
        se_mode: squeeze-excitation after every residual block: ``scse`` (element-wise max of the channel
            and spatial branches, published), ``cse``, ``sse`` or ``none``.
        upsample: decoder upsampling: ``transposed`` (ConvTranspose3d kernel 3 stride 2 padding 1, published;
            tensor ``upsampling.upsample``) or ``trilinear`` / ``nearest`` interpolation followed by a 1x1x1
            convolution to the finer channel count (tensor ``upsampling.project``).
        pool: encoder downsampling: ``max`` (published) or ``avg``, kernel 2.
        predict_residual: output = input displacement channels + prediction (published) or the prediction.
        spacing_mm: isotropic voxel size (mm) of the grid the network works on; inputs are resampled to it
            (see :mod:`brainshift.model.grid`). Published: 1.0; the CPU-fast variants: 2.0.
        field_units: what the displacement channels hold on the network grid: ``mm`` = millimetres along the
            network grid's axes (the voxel-unit field of the network grid times ``spacing_mm``; at 1 mm, as
            published, identical to voxel units) or ``voxel`` = voxel units of the network grid.
        keypoint_channel: ``none`` (published) or ``proximity``: a fifth input channel telling the network where
            the initial field is measured rather than interpolated, ``exp(-d / keypoint_scale_mm)`` with ``d``
            the distance (mm) from each voxel to the nearest driving keypoint (1 at a keypoint, towards 0 far
            from every keypoint; :func:`brainshift.model.grid.keypoint_proximity`). Needs the keypoints at
            inference; ``in_channels`` must then be 5 (4, the default, is read as 5).
        keypoint_scale_mm: the length scale (mm) of the proximity channel.
    """

    in_channels: int = 4
    out_channels: int = 3
    features: tuple[int, ...] = (32, 64, 128, 256)
    norm: str = "instance"
    se_mode: str = "scse"
    upsample: str = "transposed"
    pool: str = "max"
    predict_residual: bool = True
    spacing_mm: float = 1.0
    field_units: str = "mm"
    keypoint_channel: str = "none"
    keypoint_scale_mm: float = 20.0

    def __post_init__(self) -> None:
        self.features = tuple(int(f) for f in self.features)
        if self.keypoint_channel in KEYPOINT_CHANNELS and self.keypoint_channel != "none" and self.in_channels == 4:
            self.in_channels = 5  # the published default count read as "field + image" plus the keypoint channel
        self.validate()

    @property
    def levels(self) -> int:
        """Number of resolution levels (``len(features)``)."""
        return len(self.features)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this (``2 ** (levels - 1)``): one halving per pooling."""
        return 2 ** (self.levels - 1)

    def validate(self) -> None:
        """Check every option; raise :class:`BrainshiftError` naming the first bad one."""
        checks = [("norm", self.norm, NORMS), ("se_mode", self.se_mode, SE_MODES),
                  ("upsample", self.upsample, UPSAMPLES), ("pool", self.pool, POOLS),
                  ("field_units", self.field_units, FIELD_UNITS),
                  ("keypoint_channel", self.keypoint_channel, KEYPOINT_CHANNELS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise BrainshiftError(f"expected network option {name} in {allowed}, got {value!r}")
        if len(self.features) < 1 or any(f < 1 for f in self.features):
            raise BrainshiftError(f"expected at least one positive feature count, got features={self.features}")
        if self.in_channels < 1 or self.out_channels < 1:
            raise BrainshiftError(f"expected positive channel counts, got in={self.in_channels}, "
                                  f"out={self.out_channels}")
        if self.predict_residual and self.in_channels < self.out_channels:
            raise BrainshiftError(f"expected in_channels >= out_channels for residual prediction, got "
                                  f"{self.in_channels} < {self.out_channels}")
        if not float(self.spacing_mm) > 0:
            raise BrainshiftError(f"expected a positive network spacing_mm, got {self.spacing_mm}")
        scale = self.keypoint_scale_mm
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise BrainshiftError(f"expected keypoint_scale_mm a positive finite number (mm), got {scale!r}")
        if self.in_channels != self.expected_in_channels:
            raise BrainshiftError(f"expected in_channels {self.expected_in_channels} (3 field + image"
                                  f"{' + keypoint proximity' if self.uses_keypoints else ''}) with keypoint_channel "
                                  f"{self.keypoint_channel!r}, got {self.in_channels}")

    def without_keypoint_channel(self) -> NetworkConfig:
        """This configuration without its keypoint channel (4 input channels): the grid, image and field channels
        do not depend on it."""
        if not self.uses_keypoints:
            return self
        return dataclasses.replace(self, keypoint_channel="none", in_channels=4)

    @property
    def uses_keypoints(self) -> bool:
        """Whether the network takes a keypoint channel (and so needs the keypoints at inference)."""
        return self.keypoint_channel != "none"

    @property
    def expected_in_channels(self) -> int:
        """3 field channels + the image + 1 keypoint channel when :attr:`uses_keypoints`."""
        return 5 if self.uses_keypoints else 4

    def to_dict(self) -> dict:
        """Plain-JSON dictionary (tuples become lists). Without a keypoint channel the two keypoint options are left
        out, so the dictionaries (and the training states and cache keys made from them) of every configuration
        that existed before the option are unchanged."""
        d = dataclasses.asdict(self)
        d["features"] = list(self.features)
        if not self.uses_keypoints:
            d.pop("keypoint_channel")
            d.pop("keypoint_scale_mm")
        return d

    def to_json(self) -> str:
        """JSON string of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        """Build from a dictionary; unknown keys raise :class:`BrainshiftError` naming them."""
        if isinstance(d, NetworkConfig):
            return d
        if not isinstance(d, dict):
            raise BrainshiftError(f"expected a NetworkConfig or a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BrainshiftError(f"expected network options among {sorted(known)}, got unknown {unknown}")
        return cls(**d)


#: Named configurations. ``published``: the published network at 1 mm. The ``fast*`` presets work on a 2 mm
#: grid (8x fewer voxels) with fewer features; their measured speed is in bench/RESULTS.md ("Network").
PRESETS: dict[str, NetworkConfig] = {
    "published": NetworkConfig(),
    "fast": NetworkConfig(features=(16, 32, 64, 128), spacing_mm=2.0),
    "fast-small": NetworkConfig(features=(12, 24, 48, 96), spacing_mm=2.0),
    "fast-wide": NetworkConfig(features=(24, 48, 96, 192), spacing_mm=2.0),
}


def get_preset(name: str) -> NetworkConfig:
    """A copy of the preset ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise BrainshiftError(f"expected a network preset in {sorted(PRESETS)}, got {name!r}")
    return NetworkConfig.from_dict(PRESETS[name].to_dict())


def config_from_published_options(options: dict, spacing_mm: float = 1.0) -> NetworkConfig:
    """Translate the published training script's network options into a :class:`NetworkConfig`.

    Recognised keys (others are ignored, so a whole published config can be passed): ``model``
    (``res-unet-se`` -> this network; ``res-unet`` -> the same without squeeze-excitation; ``vxm`` and ``unet``
    are not implemented and raise), ``num_features`` (first level; doubled per level), ``num_levels``,
    ``layer_order`` (``c`` + norm letter ``i`` instance / ``b`` batch / ``g`` group / none + ``l`` LeakyReLU),
    ``se_mode``, ``pool_mode``, ``predict_residual``. ``upsample_mode`` is recorded nowhere: the published
    residual SE network upsamples with transposed convolutions whatever it says (its checkpoint, trained with
    the defaults, holds ``upsampling.upsample`` weights); use :class:`NetworkConfig` ``upsample`` for ours.
    ``num_groups`` is not used (group norm here uses the largest of 8, 4, 2, 1 dividing the channels).

    Raises:
        BrainshiftError: an unsupported model or layer order.
    """
    model = str(options.get("model", "res-unet-se"))
    if model not in ("res-unet-se", "res-unet"):
        raise BrainshiftError(f"expected model 'res-unet-se' or 'res-unet', got {model!r} (not implemented here)")
    order = str(options.get("layer_order", "cil"))
    if not order.startswith("c") or not order.endswith("l") or len(order) > 3:
        raise BrainshiftError(f"expected a layer order 'c' + optional norm letter (i, b, g) + 'l' (LeakyReLU), "
                              f"got {order!r}")
    norm = {"i": "instance", "b": "batch", "g": "group"}.get(order[1] if len(order) == 3 else "", "none")
    if len(order) == 3 and order[1] not in "ibg":
        raise BrainshiftError(f"expected a norm letter among i, b, g in layer_order, got {order!r}")
    f0 = int(options.get("num_features", 32))
    levels = int(options.get("num_levels", 4))
    return NetworkConfig(
        features=tuple(f0 * 2**i for i in range(levels)),
        norm=norm,
        se_mode=str(options.get("se_mode", "scse")) if model == "res-unet-se" else "none",
        pool=str(options.get("pool_mode", "max")),
        predict_residual=bool(options.get("predict_residual", True)),
        spacing_mm=spacing_mm,
    )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0 and g <= channels)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ConvNorm(nn.Sequential):
    """3x3x3 convolution (padding 1, bias) -> norm [-> LeakyReLU 0.01]; tensors ``conv.*`` (+ ``norm.*``)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, activate: bool) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size=3, padding=1, bias=True)
        self.norm = _norm(norm, out_ch)
        if activate:
            self.act = nn.LeakyReLU(0.01, inplace=True)


class ChannelSE(nn.Module):
    """Channel squeeze-excitation: global average pool -> Linear -> ReLU -> Linear -> sigmoid, per-channel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels)
        self.fc2 = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3, 4))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, :, None, None, None]


class SpatialSE(nn.Module):
    """Spatial squeeze-excitation: 1x1x1 convolution C -> 1 -> sigmoid, per-voxel scale."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class SqueezeExcitation(nn.Module):
    """``scse``: max(cSE(x), sSE(x)) (Roy et al. 2018); ``cse`` / ``sse``: one branch only."""

    def __init__(self, channels: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("scse", "cse"):
            self.cSE = ChannelSE(channels)
        if mode in ("scse", "sse"):
            self.sSE = SpatialSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "cse":
            return self.cSE(x)
        if self.mode == "sse":
            return self.sSE(x)
        return torch.maximum(self.cSE(x), self.sSE(x))


class ResidualBlock(nn.Module):
    """The published ``basic_module``: [conv1 1x1x1] -> conv2 (norm, act) -> conv3 (norm) -> + -> act -> SE."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, se_mode: str) -> None:
        super().__init__()
        if in_ch != out_ch:
            self.conv1 = nn.Conv3d(in_ch, out_ch, kernel_size=1, bias=True)
        else:
            self.conv1 = nn.Identity()
        self.conv2 = ConvNorm(out_ch, out_ch, norm, activate=True)
        self.conv3 = ConvNorm(out_ch, out_ch, norm, activate=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.se_module = SqueezeExcitation(out_ch, se_mode) if se_mode != "none" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(x)
        out = self.conv3(self.conv2(residual))
        out = self.act(out + residual)
        return self.se_module(out)


class Encoder(nn.Module):
    """[pool (kernel 2)] -> residual block. Level 0 has no pooling."""

    def __init__(self, in_ch: int, out_ch: int, config: NetworkConfig, pool: bool) -> None:
        super().__init__()
        if pool:
            self.pooling = nn.MaxPool3d(2) if config.pool == "max" else nn.AvgPool3d(2)
        else:
            self.pooling = nn.Identity()
        self.basic_module = ResidualBlock(in_ch, out_ch, config.norm, config.se_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.basic_module(self.pooling(x))


class Upsampling(nn.Module):
    """Upsample to the skip's spatial size and change channels coarse -> fine.

    ``transposed``: ConvTranspose3d(kernel 3, stride 2, padding 1) with its output size forced to the skip's
    size (works for odd sizes too); tensor ``upsample``. ``trilinear`` / ``nearest``: interpolation to the
    skip's size, then a 1x1x1 convolution; tensor ``project``.
    """

    def __init__(self, in_ch: int, out_ch: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "transposed":
            self.upsample = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=3, stride=2, padding=1)
        else:
            self.project = nn.Conv3d(in_ch, out_ch, kernel_size=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        if self.mode == "transposed":
            return self.upsample(x, output_size=list(size))
        align = False if self.mode == "trilinear" else None
        return self.project(nn.functional.interpolate(x, size=tuple(size), mode=self.mode, align_corners=align))


class Decoder(nn.Module):
    """Upsample, add the encoder features (summation skip), residual block."""

    def __init__(self, in_ch: int, out_ch: int, config: NetworkConfig) -> None:
        super().__init__()
        self.upsampling = Upsampling(in_ch, out_ch, config.upsample)
        self.basic_module = ResidualBlock(out_ch, out_ch, config.norm, config.se_mode)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.basic_module(self.upsampling(x, skip.shape[2:]) + skip)


class ResidualUNetSE(nn.Module):
    """Residual 3-D U-Net with squeeze-excitation; see the module docstring.

    Input ``(B, in_channels, I, J, K)``: the displacement channels (network units, ``config.field_units``)
    first, then the z-scored image. Output ``(B, out_channels, I, J, K)``: the refined displacement (input
    displacement channels + prediction when ``predict_residual``). Spatial sizes must be multiples of
    ``config.size_multiple`` (one halving per pooling; the transposed convolutions are given the skip's
    size); :func:`brainshift.model.grid.to_network_grid` pads to them.

    Convention: displacement channels hold a forward Lagrangian field on the network grid in
    ``config.field_units`` along the tensor axes ``(i, j, k)``.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        f = config.features
        chans = (config.in_channels, *f)
        self.encoders = nn.ModuleList(
            [Encoder(chans[i], chans[i + 1], config, pool=i > 0) for i in range(len(f))])
        self.decoders = nn.ModuleList(
            [Decoder(f[i], f[i - 1], config) for i in range(len(f) - 1, 0, -1)])
        self.final_conv = nn.Conv3d(f[0], config.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise BrainshiftError(f"expected a network input of shape (B, {self.config.in_channels}, I, J, K), "
                                  f"got {tuple(x.shape)}")
        m = self.config.size_multiple
        if any(int(s) % m for s in x.shape[2:]):
            raise BrainshiftError(f"expected spatial sizes that are multiples of {m} (2 ** (levels - 1)), got "
                                  f"{tuple(x.shape[2:])}; pad with brainshift.model.grid.pad_to_multiple")
        skips = []
        h = x
        for enc in self.encoders:
            h = enc(h)
            skips.append(h)
        for dec, skip in zip(self.decoders, reversed(skips[:-1]), strict=True):
            h = dec(h, skip)
        out = self.final_conv(h)
        if self.config.predict_residual:
            out = out + x[:, : self.config.out_channels]
        return out


def build_network(config: NetworkConfig | dict | None = None) -> ResidualUNetSE:
    """Build the refinement network for ``config`` (a :class:`NetworkConfig`, its dict, or None = published).

    Returns:
        A :class:`ResidualUNetSE` in training mode with PyTorch's default initialisation.

    Raises:
        BrainshiftError: an unknown or invalid option.
    """
    cfg = NetworkConfig() if config is None else NetworkConfig.from_dict(config)
    return ResidualUNetSE(cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())
