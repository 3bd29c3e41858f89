"""Attention U-Net in PyTorch, with checkpoint load/save through ``weights_convert``."""

from impl_torch.io import from_checkpoint, load, save, to_checkpoint
from impl_torch.model import AttentionUNet
from impl_torch.monai_model import MonaiAttentionUNet
from impl_torch.training import load_training, save_training

__all__ = [
    "AttentionUNet",
    "MonaiAttentionUNet",
    "from_checkpoint",
    "load",
    "load_training",
    "save",
    "save_training",
    "to_checkpoint",
]
