"""The framework-free description of the model: hyperparameters and the canonical parameter table.

Every implementation and the converter read this module; it imports only the standard library.
Canonical names are the article's PyTorch ``state_dict`` keys (ARCHITECTURE.md section 2) and
canonical shapes are PyTorch layouts (conv kernels OIHW in 2D, OIDHW in 3D).
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import reprlib
from collections.abc import Iterator
from typing import ClassVar

# Sub-module index of each layer inside the article's ``nn.Sequential`` conv block:
# Conv(0) BN(1) ReLU(2) Conv(3) BN(4) ReLU(5).
CONV_BLOCK_LAYERS = (("0", "conv3"), ("1", "bn"), ("3", "conv3"), ("4", "bn"))

# Leaf tensors of each layer kind, in state_dict order.
LEAVES = {
    "conv3": ("weight", "bias"),
    "conv1": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
    # MONAI's AttentionUnet (core/monai_spec.py): convolutions of any kernel size and stride,
    # transposed convolutions (weight (in, out, *kernel)) and PReLU's one slope.
    "conv": ("weight", "bias"),
    "convT": ("weight", "bias"),
    "prelu": ("weight",),
}

# The largest config any checkpoint may claim, in trainable parameters: 1e9 (4 GB in float32).
# The widest config a user plausibly trains, channels (256, 512, 1024, 2048, 4096), has 524 million
# (64 times the default's 8.1 million); the limit is twice that. A config beyond it is refused before
# anything is allocated or built for it, so a few bytes of config cannot claim gigabytes.
MAX_PARAMETERS = 1_000_000_000

# The deepest config any checkpoint may claim: each level halves the input, so depth 16 already needs
# inputs of at least 65536 pixels a side. It bounds the parameter table (about 40 tensors a level)
# for configs whose channels are tiny but countless.
MAX_DEPTH = 16

# The spatial dimensions a network may have: 2 (images, the default) or 3 (volumes). Every layer has
# its 2D and its 3D form (docs/architecture.md section 1); a config without the field is 2D.
SPATIAL_DIMS = (2, 3)

# How many names a list-valued error shows before "and N more".
LISTED_NAMES = 10


def capped(items, limit: int = LISTED_NAMES) -> str:
    """``repr`` of the first ``limit`` items of a list, then ``and N more``: a long list stays one short line."""
    items = list(items)
    if len(items) <= limit:
        return repr(items)
    return f"{items[:limit]!r} and {len(items) - limit} more"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of the Attention U-Net.

    ``channels[:-1]`` are the encoder levels (and, mirrored, the decoder levels); ``channels[-1]``
    is the bridge. ``depth = len(channels) - 1``. ``spatial_dims`` is 2 (images, NCHW / NHWC) or
    3 (volumes, NCDHW / NDHWC).
    """

    in_channels: int = 3
    out_channels: int = 1
    channels: tuple[int, ...] = (64, 128, 256, 512)
    spatial_dims: int = 2

    def __post_init__(self) -> None:
        check_spatial_dims(self.spatial_dims)
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "channels", checked_channels(self.channels))
        check_size(self)

    architecture: ClassVar[str] = "article"
    # An input side may be any integer of at least ``min_size`` (odd ones included).
    side_multiple: ClassVar[int] = 1

    @property
    def depth(self) -> int:
        """Number of encoder (and decoder) levels."""
        return len(self.channels) - 1

    @property
    def min_size(self) -> int:
        """Smallest spatial side the network accepts: each level halves it, the bridge needs 1."""
        return 2**self.depth

    @property
    def block_names(self) -> list[str]:
        """The named block outputs every implementation returns, in computation order: ``e1``..
        (skips), ``b1``, then ``d1.ag`` (gate map) and ``d1`` per decoder, ``output``."""
        decoders = [name for j in range(self.depth) for name in (f"d{j + 1}.ag", f"d{j + 1}")]
        return [f"e{i + 1}" for i in range(self.depth)] + ["b1"] + decoders + ["output"]

    def param_specs(self) -> list[ParamSpec]:
        return article_param_specs(self)

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": list(self.channels),
            "spatial_dims": self.spatial_dims,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return config_fields(cls, data)


def config_fields(cls, data):
    """``cls(**data)`` for a JSON object naming only ``cls``'s fields (and, optionally, its own
    ``architecture``); a one-line ValueError otherwise."""
    if not isinstance(data, dict):
        raise ValueError(f"config must be a JSON object, got {reprlib.repr(data)}")
    data = dict(data)
    architecture = data.pop("architecture", cls.architecture)
    if architecture != cls.architecture:
        raise ValueError(f"a {cls.__name__} has architecture {cls.architecture!r}, got {architecture!r}")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ValueError(f"config has unknown fields {capped(unknown)}; known: {sorted(known | {'architecture'})}")
    try:
        return cls(**data)
    except TypeError as error:
        raise ValueError(str(error)) from None


def check_spatial_dims(spatial_dims) -> None:
    if not (_is_positive_int(spatial_dims) and spatial_dims in SPATIAL_DIMS):
        raise ValueError(f"spatial_dims must be one of {list(SPATIAL_DIMS)}, got {spatial_dims!r}")


def checked_channels(channels) -> tuple[int, ...]:
    """``channels`` as a tuple of at least two and at most ``MAX_DEPTH + 1`` positive integers; a
    one-line ValueError otherwise (an iterator is read no further than one entry past the limit)."""
    if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):
        raise ValueError(f"channels must be a sequence of positive integers, got {reprlib.repr(channels)}")
    if not hasattr(channels, "__len__"):
        channels = tuple(itertools.islice(channels, MAX_DEPTH + 2))
    if len(channels) > MAX_DEPTH + 1:
        raise ValueError(
            f"channels has {len(channels)} entries, more than {MAX_DEPTH + 1} (depth {MAX_DEPTH}, inputs of at "
            f"least {2**MAX_DEPTH} pixels a side): {capped(channels)}"
        )
    channels = tuple(channels)
    if len(channels) < 2:
        raise ValueError(f"channels needs at least two entries (one encoder level and the bridge), got {channels!r}")
    bad = [c for c in channels if not _is_positive_int(c)]
    if bad:
        raise ValueError(f"channels must be positive integers, got {channels!r} (bad: {capped(bad)})")
    return tuple(int(c) for c in channels)


def check_size(config) -> None:
    """Refuse a config of more than ``MAX_PARAMETERS`` trainable parameters, before anything is built."""
    count = parameter_count(config)
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"config {config.to_dict()} has {count:.3g} parameters, more than the {MAX_PARAMETERS:.0e} any "
            f"checkpoint may claim (spec.MAX_PARAMETERS)"
        )


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# Where an input's channels sit (Keras' ``data_format`` words): PyTorch's channels first (NCHW,
# NCDHW), or the channels last of Flax and Keras (NHWC, NDHWC).
DATA_FORMATS = ("channels_first", "channels_last")

# The letters of the spatial axes, by ``spatial_dims``, and their names (an export's dynamic axes).
SPATIAL_AXES = {2: "HW", 3: "DHW"}
SPATIAL_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


def layout(config: ModelConfig, data_format: str) -> str:
    """The axes of an input or output in ``data_format``: ``NCHW``, ``NHWC``, ``NCDHW`` or ``NDHWC``."""
    return axes_layout(config.spatial_dims, data_format)


def axes_layout(spatial_dims: int, data_format: str) -> str:
    """``layout`` for an array of ``spatial_dims`` spatial axes, e.g. an input whose model is not at hand."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    spatial = SPATIAL_AXES[spatial_dims]
    return f"NC{spatial}" if data_format == "channels_first" else f"N{spatial}C"


def expected_input(config: ModelConfig, data_format: str) -> str:
    """How every implementation's input error begins: the shape the network takes, in ``data_format``."""
    axes = [str(config.in_channels) if axis == "C" else axis for axis in layout(config, data_format)]
    sides = ", ".join(SPATIAL_AXES[config.spatial_dims])
    return f"expected input of shape ({', '.join(axes)}) with {sides} {side_rule(config)}"


def side_rule(config) -> str:
    """What every spatial side must be: ``>= 8`` (the article's network), ``multiples of 4`` (MONAI's)."""
    if config.side_multiple > 1:
        return f"multiples of {config.side_multiple}"
    return f">= {config.min_size}"


def side_fits(config, side: int) -> bool:
    """Whether one spatial side of ``side`` positions is one the network takes."""
    return side >= config.min_size and side % config.side_multiple == 0


def fitted_side(config, side: int) -> int:
    """The smallest side at least ``side`` that the network takes (``side_fits``)."""
    fitted = max(side, config.min_size)
    return -(-fitted // config.side_multiple) * config.side_multiple


def check_input_shape(config: ModelConfig, shape, data_format: str) -> None:
    """Refuse an input shape the network cannot take, with the same ValueError in every
    implementation: not of rank ``spatial_dims + 2``, another channel count, or a spatial side
    below ``config.min_size``.

    Only sizes that are known integers are judged. A symbolic size (``None`` in a Keras trace, a
    ``jax.export`` or ``torch.export`` symbol) passes without being compared, so no exporter
    freezes a comparison into its graph or guards on it; the exporters' own constraints bound those
    sizes (``impl_*/export.py``)."""
    expected = expected_input(config, data_format)
    shape = tuple(int(d) if _is_known(d) else d for d in shape)
    if len(shape) != config.spatial_dims + 2:
        raise ValueError(f"{expected}, got a {len(shape)}-D tensor of shape {shape}")
    channels, spatial = (shape[1], shape[2:]) if data_format == "channels_first" else (shape[-1], shape[1:-1])
    wrong_channels = _is_known(channels) and channels != config.in_channels
    misfit = any(_is_known(d) and not side_fits(config, d) for d in spatial)
    if wrong_channels or misfit:
        raise ValueError(f"{expected}, got {shape}")


# The input sides a command uses when none are given: an image of 64x64, or a volume of 32x32x32.
DEFAULT_SIDES = {2: (64, 64), 3: (32, 32, 32)}


def check_sides(config: ModelConfig, sides=None, defaults=DEFAULT_SIDES, option: str = "--size") -> tuple[int, ...]:
    """The spatial sides of an input (``--size``: H W, or D H W for a 3D model) as a tuple,
    checked against ``config``, ``defaults[config.spatial_dims]`` when ``sides`` is None; a
    one-line ValueError naming the problem (and ``option``, the sides' option) otherwise."""
    sides = tuple(defaults[config.spatial_dims] if sides is None else sides)
    names = " ".join(SPATIAL_AXES[config.spatial_dims])
    if len(sides) != config.spatial_dims or not all(_is_positive_int(side) for side in sides):
        raise ValueError(
            f"{option} takes {config.spatial_dims} positive sides ({names}) for this {config.spatial_dims}D model, "
            f"got {' '.join(map(str, sides))}"
        )
    if config.side_multiple > 1 and not all(side_fits(config, side) for side in sides):
        raise ValueError(
            f"{option} {' '.join(map(str, sides))} does not fit strides {list(config.strides)}: every side must be a "
            f"multiple of {config.side_multiple}"
        )
    if min(sides) < config.min_size:
        raise ValueError(
            f"{option} {' '.join(map(str, sides))} is too small for depth {config.depth}: every side needs at "
            f"least {config.min_size}"
        )
    return sides


def _is_known(size) -> bool:
    """Whether a dimension is a concrete integer (Python's or NumPy's), not a symbolic size."""
    return isinstance(size, numbers.Integral) and not isinstance(size, bool)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One canonical tensor: its name, PyTorch shape, and the kind of layer it belongs to."""

    name: str
    shape: tuple[int, ...]
    layer: str  # a kind of LEAVES: "conv3", "conv1", "bn"; MONAI's "conv", "convT", "prelu"
    leaf: str  # "weight", "bias", "running_mean", "running_var", "num_batches_tracked"

    @property
    def module(self) -> str:
        """The layer's dotted path, e.g. ``e1.conv.conv.0``."""
        return self.name.rsplit(".", 1)[0]

    @property
    def is_buffer(self) -> bool:
        """Running statistics and counters: state, not trainable parameters."""
        return self.leaf in ("running_mean", "running_var", "num_batches_tracked")

    @property
    def dtype_kind(self) -> str:
        return "int" if self.leaf == "num_batches_tracked" else "float"


def _layer(prefix: str, kind: str, c_in: int, c_out: int, dims: int) -> Iterator[ParamSpec]:
    for leaf in LEAVES[kind]:
        if kind == "bn":
            shape = () if leaf == "num_batches_tracked" else (c_out,)
        elif leaf == "weight":
            k = 3 if kind == "conv3" else 1
            shape = (c_out, c_in) + (k,) * dims
        else:
            shape = (c_out,)
        yield ParamSpec(f"{prefix}.{leaf}", shape, kind, leaf)


def _conv_block(prefix: str, c_in: int, c_out: int, dims: int) -> Iterator[ParamSpec]:
    for index, kind in CONV_BLOCK_LAYERS:
        # The second conv reads the first conv's output; BatchNorms see c_out channels.
        first = index == "0"
        yield from _layer(f"{prefix}.{index}", kind, c_in if first else c_out, c_out, dims)


def param_specs(config) -> list[ParamSpec]:
    """Every canonical tensor of ``config`` (of either architecture), in its ``state_dict`` order."""
    return config.param_specs()


def article_param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every canonical tensor of the article's network, in the article's ``state_dict`` order."""
    c, dims = config.channels, config.spatial_dims
    specs: list[ParamSpec] = []
    c_in = config.in_channels
    for i in range(config.depth):
        specs += _conv_block(f"e{i + 1}.conv.conv", c_in, c[i], dims)
        c_in = c[i]
    specs += _conv_block("b1.conv", c[-2], c[-1], dims)
    for j in range(config.depth):
        c_g, c_s = c[-1 - j], c[-2 - j]
        prefix = f"d{j + 1}"
        specs += _layer(f"{prefix}.ag.Wg.0", "conv1", c_g, c_s, dims)
        specs += _layer(f"{prefix}.ag.Wg.1", "bn", c_s, c_s, dims)
        specs += _layer(f"{prefix}.ag.Ws.0", "conv1", c_s, c_s, dims)
        specs += _layer(f"{prefix}.ag.Ws.1", "bn", c_s, c_s, dims)
        specs += _layer(f"{prefix}.ag.output.0", "conv1", c_s, c_s, dims)
        specs += _conv_block(f"{prefix}.c1.conv", c_g + c_s, c_s, dims)
    specs += _layer("output", "conv1", c[0], config.out_channels, dims)
    return specs


def param_table(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> PyTorch shape, in ``state_dict`` order."""
    return {p.name: p.shape for p in param_specs(config)}


def parameter_count(config: ModelConfig) -> int:
    """Trainable parameters (running statistics and counters excluded)."""
    total = 0
    for p in param_specs(config):
        if not p.is_buffer:
            n = 1
            for d in p.shape:
                n *= d
            total += n
    return total


def infer_article_config(shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """Rebuild the config of a checkpoint of the article's network that carries none, from its
    canonical tensor shapes (``architectures.infer_config`` recognises the network first).

    Raises ValueError naming what is missing when the names do not describe an Attention U-Net.
    """
    depth = 0
    while f"e{depth + 1}.conv.conv.0.weight" in shapes:
        depth += 1
    required = ["e1.conv.conv.0.weight", "b1.conv.0.weight", "output.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        prefix = next((k[: -len("output.weight")] for k in shapes if k.endswith(".output.weight")), None)
        hint = f" (the names carry the prefix {prefix!r}: a wrapper's, to strip)" if prefix else ""
        raise ValueError(f"cannot infer the model config: missing tensors {missing}{hint}")
    ranks = {key: len(shapes[key]) for key in required}
    kernel_ranks = [dims + 2 for dims in SPATIAL_DIMS]
    for key in required:
        if ranks[key] not in kernel_ranks:
            raise ValueError(
                f"cannot infer the model config: {key} has shape {shapes[key]}, expected 4-D (2D) or 5-D (3D)"
            )
    if len(set(ranks.values())) != 1:
        raise ValueError(f"cannot infer the model config: the kernels mix 2D and 3D shapes: {ranks}")
    in_channels = shapes["e1.conv.conv.0.weight"][1]
    channels = [shapes[f"e{i + 1}.conv.conv.0.weight"][0] for i in range(depth)]
    channels.append(shapes["b1.conv.0.weight"][0])
    out_channels = shapes["output.weight"][0]
    return ModelConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        spatial_dims=ranks["output.weight"] - 2,
    )
