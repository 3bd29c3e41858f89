"""The converter as data: leaf rules crossed with the parameter paths generated from the spec.

Every framework keeps the canonical module tree (``e1.conv.conv.0`` ...); only the leaf names and
the conv kernel layout differ. There is no per-layer table: a canonical tensor's framework path is
its module path plus the leaf name from ``LEAF_RULES``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.spec import SPATIAL_DIMS, ParamSpec


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    """A conv kernel from PyTorch's layout to Flax's and Keras': OIHW -> HWIO in 2D, OIDHW -> DHWIO
    in 3D (the spatial axes first, in order, then input and output channels)."""
    return w.transpose(*range(2, w.ndim), 1, 0)


def hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    """The inverse of ``oihw_to_hwio``: HWIO -> OIHW, DHWIO -> OIDHW."""
    return w.transpose(w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))


def has_kernel_rank(w: np.ndarray) -> bool:
    """Whether ``w`` has a conv kernel's rank (4-D in 2D, 5-D in 3D): what a reader transposes
    before the checkpoint's validation compares names and shapes with the parameter table."""
    return w.ndim - 2 in SPATIAL_DIMS


def identity(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class LeafRule:
    flax: str
    keras: str
    to_channels_last: object = identity  # canonical (PyTorch) layout -> flax/keras layout
    from_channels_last: object = identity


CONV_KERNEL = LeafRule("kernel", "kernel", oihw_to_hwio, hwio_to_oihw)

# (layer kind, canonical leaf) -> names in Flax NNX and Keras 3, and the layout rule.
LEAF_RULES = {
    ("conv3", "weight"): CONV_KERNEL,
    ("conv1", "weight"): CONV_KERNEL,
    ("conv3", "bias"): LeafRule("bias", "bias"),
    ("conv1", "bias"): LeafRule("bias", "bias"),
    ("bn", "weight"): LeafRule("scale", "gamma"),
    ("bn", "bias"): LeafRule("bias", "beta"),
    ("bn", "running_mean"): LeafRule("mean", "moving_mean"),
    ("bn", "running_var"): LeafRule("var", "moving_variance"),
    # Flax and Keras BatchNorms here keep torch's counter too, so every format carries it.
    ("bn", "num_batches_tracked"): LeafRule("num_batches_tracked", "num_batches_tracked"),
    # MONAI's AttentionUnet (docs/architecture.md section 1b). A transposed kernel (in, out, *k)
    # takes the same transpose to (*k, out, in): the layout of Keras' ConvTranspose kernels.
    ("conv", "weight"): CONV_KERNEL,
    ("conv", "bias"): LeafRule("bias", "bias"),
    ("convT", "weight"): CONV_KERNEL,
    ("convT", "bias"): LeafRule("bias", "bias"),
    ("prelu", "weight"): LeafRule("negative_slope", "alpha"),
}


def rule(spec: ParamSpec) -> LeafRule:
    return LEAF_RULES[(spec.layer, spec.leaf)]


def module_path(spec: ParamSpec) -> tuple[str, ...]:
    """``e1.conv.conv.0.weight`` -> ``("e1", "conv", "conv", "0")``."""
    return tuple(spec.module.split("."))
