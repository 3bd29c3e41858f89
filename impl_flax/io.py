"""Between ``impl_flax.AttentionUNet`` and the canonical checkpoint: the NNX state path of every
canonical tensor comes from ``weights_convert.core.flax_layout.nnx_path``; conv kernels go OIHW <-> HWIO
(OIDHW <-> DHWIO for a 3D model)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import weights_convert
from impl_flax.layers import check_dtype, resolve_dtypes
from impl_flax.model import AttentionUNet
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import from_nnx, to_nnx


def from_checkpoint(checkpoint: Checkpoint, dtype="float32") -> AttentionUNet:
    """An eval-mode model holding ``checkpoint``'s tensors, floating ones cast to the parameter dtype.

    ``dtype`` is "float32", "float64" or "mixed_bfloat16" (float32 parameters and BatchNorm
    statistics, bfloat16 compute; see ``impl_flax.AttentionUNet``). float64 needs JAX's 64-bit mode
    to be on already (see ``impl_flax.layers.resolve_dtypes``).
    """
    compute, param = resolve_dtypes(dtype)
    config = checkpoint.config
    # Build the module tree without initializing 8M random weights, then fill every variable.
    abstract = nnx.eval_shape(
        lambda: AttentionUNet(
            config.in_channels,
            config.out_channels,
            config.channels,
            config.spatial_dims,
            dtype=compute,
            param_dtype=param,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(abstract)
    values = to_nnx(checkpoint)
    paths = {path for path, _ in nnx.to_flat_state(state)}
    if paths != set(values):
        # Only a model/layout mismatch (a bug, not a bad file) can get here: the checkpoint is validated.
        raise CheckpointError(
            f"NNX state and checkpoint disagree: missing {sorted(map(str, paths - set(values)))}, "
            f"unexpected {sorted(map(str, set(values) - paths))}"
        )
    for path, variable in nnx.to_flat_state(state):
        value = values[path]
        target = variable.get_value().dtype  # the parameter dtype, or the default int
        variable.set_value(jnp.asarray(value, dtype=target))
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def to_checkpoint(model: AttentionUNet) -> Checkpoint:
    """The model's parameters and BatchNorm state as a canonical checkpoint (numpy, PyTorch layouts)."""
    flat = {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(nnx.state(model))}
    return Checkpoint.from_tensors(from_nnx(flat), model.config, allow_nonfinite=True)


def load(path, dtype="float32") -> AttentionUNet:
    """Load any checkpoint ``weights_convert`` reads into an eval-mode model; ``dtype`` as in
    ``from_checkpoint`` ("float32", "float64" or "mixed_bfloat16")."""
    check_dtype(dtype)
    return from_checkpoint(weights_convert.read(path), dtype)


def save(model: AttentionUNet, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (atomic; existing files kept unless ``force``)."""
    if not isinstance(model, AttentionUNet):
        raise CheckpointError(f"expected an impl_flax.AttentionUNet, got {type(model).__name__}")
    weights_convert.write(to_checkpoint(model), path, force=force)
