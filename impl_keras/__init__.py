"""Attention U-Net in Keras 3 (TensorFlow, JAX or PyTorch backend), with checkpoint I/O."""

from impl_keras.io import from_checkpoint, load, save, to_checkpoint
from impl_keras.model import AttentionUNet, TorchAdam

__all__ = ["AttentionUNet", "TorchAdam", "from_checkpoint", "load", "save", "to_checkpoint"]
