"""Between ``impl_torch.AttentionUNet`` and the canonical checkpoint: the names are the same, so
the mapping is the identity (the canonical form *is* this model's state_dict)."""

from __future__ import annotations

import torch

import weights_convert
from impl_torch.model import AttentionUNet
from weights_convert.checkpoint import Checkpoint, CheckpointError
from weights_convert.formats.torch_format import from_numpy, to_numpy

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def from_checkpoint(checkpoint: Checkpoint, dtype="float32") -> AttentionUNet:
    """An eval-mode model holding ``checkpoint``'s tensors (loaded strictly), cast to ``dtype``."""
    config = checkpoint.config
    # Cast before loading: load_state_dict copies into the existing parameters' dtype, which would
    # round a float64 checkpoint through float32.
    model = AttentionUNet(config.in_channels, config.out_channels, config.channels).to(torch_dtype(dtype))
    state = {k: from_numpy(v) for k, v in checkpoint.tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_checkpoint(model: AttentionUNet) -> Checkpoint:
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    return Checkpoint.from_tensors(tensors, model.config, allow_nonfinite=True)


def load(path, dtype="float32") -> AttentionUNet:
    """Load any checkpoint ``weights_convert`` reads into an eval-mode model."""
    torch_dtype(dtype)
    return from_checkpoint(weights_convert.read(path), dtype)


def save(model: AttentionUNet, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (atomic; existing files kept unless ``force``)."""
    if not isinstance(model, AttentionUNet):
        raise CheckpointError(f"expected an impl_torch.AttentionUNet, got {type(model).__name__}")
    weights_convert.write(to_checkpoint(model), path, force=force)
