"""Attention U-Net in PyTorch, with checkpoint load/save through ``weights_convert``."""

from impl_torch.io import from_checkpoint, load, save, to_checkpoint
from impl_torch.model import AttentionUNet

__all__ = ["AttentionUNet", "from_checkpoint", "load", "save", "to_checkpoint"]
