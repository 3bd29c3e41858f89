"""Attention U-Net in Flax NNX (NHWC), with checkpoint load/save through ``weights_convert``."""

from impl_flax.io import from_checkpoint, load, save, to_checkpoint
from impl_flax.model import AttentionUNet

__all__ = ["AttentionUNet", "from_checkpoint", "load", "save", "to_checkpoint"]
