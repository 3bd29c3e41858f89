"""MONAI's AttentionUnet as a second architecture: its hyperparameters and its parameter table.

``monai.networks.nets.AttentionUnet`` (MONAI 1.6.1) is a different network from the article's
(docs/architecture.md section 1b): strided convolutions instead of pooling, transposed convolutions
instead of bilinear upsampling, a one-channel gate, a merge convolution with InstanceNorm and PReLU.
Its canonical names are MONAI's own ``state_dict`` keys, which nest one ``submodule`` deeper per
level; this module generates them for any config, and infers a config from them. Standard library
only, like ``core/spec.py``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator
from typing import ClassVar

from weights_convert.core.spec import (
    LEAVES,
    MAX_DEPTH,
    ParamSpec,
    capped,
    check_size,
    check_spatial_dims,
    checked_channels,
    config_fields,
)

# The key every MONAI AttentionUnet state_dict holds: the head's first convolution.
MARKER = "model.0.conv.0.conv.weight"

# The fields no tensor holds: a config inferred from shapes assumes MONAI's usual values for them.
ASSUMED = {"strides": "2 at each level", "dropout": "0.0"}


@dataclasses.dataclass(frozen=True)
class MonaiConfig:
    """``AttentionUnet(spatial_dims, in_channels, out_channels, channels, strides, kernel_size,
    up_kernel_size, dropout)``. ``strides=None`` is 2 at every level; ``kernel_size`` and
    ``up_kernel_size`` are odd, one integer or one per spatial axis (kept as such)."""

    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    spatial_dims: int = 2
    strides: tuple[int, ...] | None = None
    kernel_size: int | tuple[int, ...] = 3
    up_kernel_size: int | tuple[int, ...] = 3
    dropout: float = 0.0

    architecture: ClassVar[str] = "monai"

    def __post_init__(self) -> None:
        check_spatial_dims(self.spatial_dims)
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        channels = checked_channels(self.channels)
        narrow = [c for c in channels[:-1] if c < 2]
        if narrow:
            raise ValueError(
                f"channels {list(channels)}: every entry but the last needs at least 2 (the gate has "
                f"channels // 2 of its own), got {narrow}"
            )
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "strides", self._checked_strides(len(channels) - 1))
        for name in ("kernel_size", "up_kernel_size"):
            object.__setattr__(self, name, self._checked_kernel(name))
        dropout = self.dropout
        if not (isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        object.__setattr__(self, "dropout", float(dropout))
        if self.side_multiple > 2**MAX_DEPTH:
            raise ValueError(
                f"strides {list(self.strides)} multiply to {self.side_multiple}, more than {2**MAX_DEPTH} "
                f"(every input side must be a multiple of it)"
            )
        check_size(self)

    def _checked_strides(self, depth: int) -> tuple[int, ...]:
        strides = (2,) * depth if self.strides is None else self.strides
        if isinstance(strides, (str, bytes)) or not hasattr(strides, "__len__"):
            raise ValueError(f"strides must be a list of {depth} positive integers, got {strides!r}")
        if len(strides) != depth or not all(_is_positive_int(s) for s in strides):
            raise ValueError(
                f"strides must be {depth} positive integers (one per level of channels "
                f"{list(self.channels)}), got {capped(strides)}"
            )
        return tuple(int(s) for s in strides)

    def _checked_kernel(self, name: str) -> int | tuple[int, ...]:
        value = getattr(self, name)
        sides = (value,) if _is_positive_int(value) else value
        if isinstance(sides, (str, bytes)) or not hasattr(sides, "__len__") or len(sides) not in (1, self.spatial_dims):
            raise ValueError(f"{name} must be an odd integer or {self.spatial_dims} of them, got {value!r}")
        if not all(_is_positive_int(k) and k % 2 == 1 and k <= MAX_KERNEL for k in sides):
            raise ValueError(
                f"{name} must be odd (MONAI pads (k - 1) / 2 on each side) and at most {MAX_KERNEL}, got {value!r}"
            )
        return int(sides[0]) if len(sides) == 1 else tuple(int(k) for k in sides)

    # -- what the rest of the project asks of a config ----------------------------------------

    @property
    def depth(self) -> int:
        """Number of levels below the head (each with a gate): ``len(channels) - 1``."""
        return len(self.channels) - 1

    @property
    def side_multiple(self) -> int:
        """Every input side must be a multiple of this (the product of the strides), so that each
        transposed convolution restores its level's size exactly."""
        return math.prod(self.strides)

    @property
    def min_size(self) -> int:
        return self.side_multiple

    def kernel(self, name: str = "kernel_size") -> tuple[int, ...]:
        """``kernel_size`` (or ``up_kernel_size``) as one side per spatial axis."""
        value = getattr(self, name)
        return (value,) * self.spatial_dims if isinstance(value, int) else value

    @property
    def block_names(self) -> list[str]:
        """``e1`` (the head), ``e2``.. (each level's down block above the bottom), ``b1`` (the
        bottom), then per decoder from the deepest ``dj.up``, ``dj.ag`` (psi), ``dj`` (the merge),
        and ``output`` (docs/architecture.md section 1b)."""
        decoders = [name for j in range(self.depth) for name in (f"d{j + 1}.up", f"d{j + 1}.ag", f"d{j + 1}")]
        return [f"e{i + 1}" for i in range(self.depth)] + ["b1"] + decoders + ["output"]

    def param_specs(self) -> list[ParamSpec]:
        return monai_param_specs(self)

    def to_dict(self) -> dict:
        def plain(value):
            return list(value) if isinstance(value, tuple) else value

        return {
            "architecture": self.architecture,
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "kernel_size": plain(self.kernel_size),
            "up_kernel_size": plain(self.up_kernel_size),
            "dropout": self.dropout,
        }

    @classmethod
    def from_dict(cls, data: dict) -> MonaiConfig:
        return config_fields(cls, data)


# The merge convolution's kernel side: MONAI builds it without passing kernel_size.
MERGE_KERNEL = 3

# The largest kernel side a config may claim (MONAI's users take 3 or 5): bounds the parameter
# table's shapes before MAX_PARAMETERS is computed from them.
MAX_KERNEL = 31


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -- the parameter table -----------------------------------------------------------------------


def _leaves(prefix: str, kind: str, weight_shape: tuple[int, ...], channels: int) -> Iterator[ParamSpec]:
    """The tensors of one layer: a conv's weight and bias (``channels`` outputs), a BatchNorm's five,
    PReLU's slope."""
    for leaf in LEAVES[kind]:
        if kind == "bn":
            shape = () if leaf == "num_batches_tracked" else (channels,)
        elif kind == "prelu":
            shape = (1,)
        else:
            shape = weight_shape if leaf == "weight" else (channels,)
        yield ParamSpec(f"{prefix}.{leaf}", shape, kind, leaf)


def _convolution(
    prefix: str, c_in: int, c_out: int, kernel: tuple[int, ...], *, norm: str | None
) -> Iterator[ParamSpec]:
    """MONAI's ``Convolution``: ``conv`` then, unless conv-only, ``adn`` with BatchNorm ``N`` or
    (the merge) InstanceNorm, which holds nothing, and PReLU ``A``."""
    yield from _leaves(f"{prefix}.conv", "conv", (c_out, c_in, *kernel), c_out)
    if norm == "batch":
        yield from _leaves(f"{prefix}.adn.N", "bn", (), c_out)
    elif norm == "instance":
        yield from _leaves(f"{prefix}.adn.A", "prelu", (), c_out)


def _conv_block(prefix: str, c_in: int, c_out: int, kernel: tuple[int, ...]) -> Iterator[ParamSpec]:
    """``ConvBlock``: two Convolutions (the first carries the level's stride, which no tensor shows)."""
    yield from _convolution(f"{prefix}.conv.0", c_in, c_out, kernel, norm="batch")
    yield from _convolution(f"{prefix}.conv.1", c_out, c_out, kernel, norm="batch")


def _gate(prefix: str, c: int, dims: int) -> Iterator[ParamSpec]:
    """``AttentionBlock(f_g = f_l = c, f_int = c // 2)``: W_g, W_x (1x1 conv, BatchNorm), psi (1x1
    conv to one channel, BatchNorm, sigmoid)."""
    one, f_int = (1,) * dims, c // 2
    for branch in ("W_g", "W_x"):
        yield from _leaves(f"{prefix}.{branch}.0.conv", "conv", (f_int, c, *one), f_int)
        yield from _leaves(f"{prefix}.{branch}.1", "bn", (), f_int)
    yield from _leaves(f"{prefix}.psi.0.conv", "conv", (1, f_int, *one), 1)
    yield from _leaves(f"{prefix}.psi.1", "bn", (), 1)


def level_prefix(level: int) -> str:
    """The ``AttentionLayer`` of level ``level`` (0 = the top): ``model.1``, ``model.1.submodule.1`` ..."""
    return "model.1" + ".submodule.1" * level


def down_prefix(config: MonaiConfig, level: int) -> str:
    """The down ConvBlock of a level: ``submodule.0`` of its layer, plain ``submodule`` at the bottom."""
    suffix = ".submodule" if level == config.depth - 1 else ".submodule.0"
    return level_prefix(level) + suffix


def monai_param_specs(config: MonaiConfig) -> list[ParamSpec]:
    """Every tensor of ``AttentionUnet(config)`` in MONAI's ``state_dict`` order: the head, then
    each level's attention, upconv, merge and down block (the next level nested inside), the output."""
    c, dims = config.channels, config.spatial_dims
    kernel, up = config.kernel("kernel_size"), config.kernel("up_kernel_size")
    specs = list(_conv_block("model.0", config.in_channels, c[0], kernel))
    for level in range(config.depth):
        prefix = level_prefix(level)
        specs += _gate(f"{prefix}.attention", c[level], dims)
        # ConvTranspose weight: (in, out, *kernel), from the level below's channels to this one's.
        specs += _leaves(f"{prefix}.upconv.up.conv", "convT", (c[level + 1], c[level], *up), c[level])
        specs += _leaves(f"{prefix}.upconv.up.adn.N", "bn", (), c[level])
        # The merge is MONAI's Convolution at its default kernel, 3, whatever kernel_size is.
        specs += _convolution(f"{prefix}.merge", 2 * c[level], c[level], (MERGE_KERNEL,) * dims, norm="instance")
        specs += _conv_block(down_prefix(config, level), c[level], c[level + 1], kernel)
    specs += _leaves("model.2.conv", "conv", (config.out_channels, c[0], *(1,) * dims), config.out_channels)
    return specs


def infer_monai_config(shapes: dict[str, tuple[int, ...]]) -> MonaiConfig:
    """The config of a MONAI state_dict from its shapes; strides and dropout, which no tensor
    holds, are ``ASSUMED``. A ValueError names the tensor that does not fit."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"cannot infer the config of MONAI's AttentionUnet: missing tensor {key!r}")
        return tuple(shapes[key])

    head = shape(MARKER)
    if len(head) - 2 not in (2, 3):
        raise ValueError(f"cannot infer the config: {MARKER} has shape {head}, expected 4-D (2D) or 5-D (3D)")
    dims = len(head) - 2
    channels = [head[0]]
    up_kernel = None
    level = 0
    while True:
        if level >= MAX_DEPTH:
            raise ValueError(f"cannot infer the config: more than {MAX_DEPTH} levels")
        prefix = level_prefix(level)
        bottom = f"{prefix}.submodule.conv.0.conv.weight"
        down = bottom if bottom in shapes else f"{prefix}.submodule.0.conv.0.conv.weight"
        channels.append(shape(down)[0])
        up_kernel = up_kernel or shape(f"{prefix}.upconv.up.conv.weight")[2:]
        level += 1
        if down == bottom:
            break
    kernel = head[2:]
    config = MonaiConfig(
        in_channels=head[1],
        out_channels=shape("model.2.conv.weight")[0],
        channels=tuple(channels),
        spatial_dims=dims,
        kernel_size=kernel[0] if len(set(kernel)) == 1 else tuple(kernel),
        up_kernel_size=up_kernel[0] if len(set(up_kernel)) == 1 else tuple(up_kernel),
    )
    return config
