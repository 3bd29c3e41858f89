"""Between ``impl_torch.AttentionUNet`` and the canonical checkpoint: the names are the same, so
the mapping is the identity (the canonical form *is* this model's state_dict)."""

from __future__ import annotations

import torch

import weights_convert
from impl_torch.model import AttentionUNet
from impl_torch.monai_model import MonaiAttentionUNet
from weights_convert.core import precisions as core_precisions
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.formats.torch_format import from_numpy, to_numpy

# The precisions a model can be loaded in (``weights_convert.core.precisions``), as torch dtypes:
# (parameter dtype, compute dtype). None computes in the parameters' dtype; "mixed_bfloat16" is
# float32 parameters under bfloat16 autocast.
PRECISIONS = {
    name: (getattr(torch, p.param_dtype), getattr(torch, p.compute_dtype) if p.mixed else None)
    for name, p in core_precisions.PRECISIONS.items()
    if name in core_precisions.DTYPES
}
DTYPES = {name: param for name, (param, compute) in PRECISIONS.items() if compute is None}


def precision(dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, compute dtype or None) for a name of ``PRECISIONS`` or a torch float dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype, None
    return PRECISIONS[core_precisions.precision(dtype).name]


def torch_dtype(dtype) -> torch.dtype:
    """The parameters' (and the input's) dtype: float32 for "mixed_bfloat16"."""
    return precision(dtype)[0]


def from_checkpoint(checkpoint: Checkpoint, dtype="float32") -> AttentionUNet:
    """An eval-mode model holding ``checkpoint``'s tensors (loaded strictly), cast to ``dtype``:
    "float32", "float64", or "mixed_bfloat16" (float32 parameters computing in bfloat16, see
    ``AttentionUNet``)."""
    param_dtype, compute_dtype = precision(dtype)
    config = checkpoint.config
    # Cast before loading: load_state_dict copies into the existing parameters' dtype, which would
    # round a float64 checkpoint through float32.
    model = build(config, compute_dtype).to(param_dtype)
    state = {k: from_numpy(v) for k, v in checkpoint.tensors.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


# The model classes of this package, by the architecture of their config.
MODELS = (AttentionUNet, MonaiAttentionUNet)


def check_model(model) -> None:
    """Refuse anything but one of this package's models, in one line."""
    if not isinstance(model, MODELS):
        raise CheckpointError(f"expected an impl_torch.AttentionUNet or MonaiAttentionUNet, got {type(model).__name__}")


def build(config, compute_dtype: torch.dtype | None = None) -> AttentionUNet | MonaiAttentionUNet:
    """A freshly initialised model of ``config``'s architecture (torch's default initialisation)."""
    if config.architecture == "monai":
        return MonaiAttentionUNet(config, compute_dtype=compute_dtype)
    return AttentionUNet(
        config.in_channels, config.out_channels, config.channels, config.spatial_dims, compute_dtype=compute_dtype
    )


def to_checkpoint(model: AttentionUNet) -> Checkpoint:
    """The state_dict as a canonical checkpoint, in the parameters' dtype (float32 for mixed bfloat16)."""
    tensors = {k: to_numpy(v) for k, v in model.state_dict().items()}
    return Checkpoint.from_tensors(tensors, model.config, allow_nonfinite=True)


def load(path, dtype="float32", *, config=None) -> AttentionUNet | MonaiAttentionUNet:
    """Load any checkpoint ``weights_convert`` reads into an eval-mode model; ``dtype`` as in
    ``from_checkpoint`` ("float32", "float64" or "mixed_bfloat16"). ``config`` gives what a file
    without one cannot (a MONAI state_dict's strides); a UserWarning says what was assumed otherwise."""
    precision(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_checkpoint(checkpoint, dtype)


def save(model: AttentionUNet, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (atomic; existing files kept unless ``force``)."""
    check_model(model)
    weights_convert.write(to_checkpoint(model), path, force=force)
