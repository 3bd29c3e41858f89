"""Attention U-Net in Flax NNX (NHWC, or NDHWC in 3D), the article's (``AttentionUNet``) and MONAI's
(``MonaiAttentionUNet``), with checkpoint load/save through ``weights_convert``; in float32, float64
or mixed bfloat16 (float32 parameters, bfloat16 compute: ``dtype="mixed_bfloat16"``)."""

from impl_flax.io import from_checkpoint, load, save, to_checkpoint
from impl_flax.model import AttentionUNet
from impl_flax.monai_model import MonaiAttentionUNet
from impl_flax.training import load_training, save_training

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
