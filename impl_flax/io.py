"""Between the Flax models (``impl_flax.AttentionUNet``, ``impl_flax.MonaiAttentionUNet``) and the
canonical checkpoint: the NNX state path of every canonical tensor comes from
``weights_convert.core.flax_layout.nnx_path``; conv kernels go OIHW <-> HWIO (OIDHW <-> DHWIO for a 3D
model), transposed ones (in, out, *k) <-> (*k, out, in)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import weights_convert
from impl_flax.layers import check_dtype, resolve_dtypes
from impl_flax.model import AttentionUNet
from impl_flax.monai_model import MonaiAttentionUNet
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import from_nnx, to_nnx

# The model classes of this package, by the architecture of their config.
MODELS = (AttentionUNet, MonaiAttentionUNet)
Model = AttentionUNet | MonaiAttentionUNet

# The variables a checkpoint holds: parameters and BatchNorm state. A model with dropout also holds
# its dropout streams' keys and counts (``nnx.RngState``), which belong to no checkpoint.
WEIGHTS = (nnx.Param, nnx.BatchStat)


def build(config, dtype=jnp.float32, param_dtype=None, *, rngs: nnx.Rngs) -> Model:
    """A freshly initialised model of ``config``'s architecture (Flax's default initialisation)."""
    if config.architecture == "monai":
        return MonaiAttentionUNet(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return AttentionUNet(
        config.in_channels,
        config.out_channels,
        config.channels,
        config.spatial_dims,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def from_checkpoint(checkpoint: Checkpoint, dtype="float32", *, seed: int = 0) -> Model:
    """An eval-mode model of the checkpoint's architecture holding its tensors, floating ones cast
    to the parameter dtype.

    ``dtype`` is "float32", "float64" or "mixed_bfloat16" (float32 parameters and BatchNorm
    statistics, bfloat16 compute; see ``impl_flax.AttentionUNet``). float64 needs JAX's 64-bit mode
    to be on already (see ``impl_flax.layers.resolve_dtypes``). ``seed`` seeds the dropout masks of
    a MONAI model with dropout, in train mode (no checkpoint holds them).
    """
    compute, param = resolve_dtypes(dtype)
    config = checkpoint.config
    # Build the module tree without initializing millions of random weights, then fill every variable.
    abstract = nnx.eval_shape(lambda: build(config, compute, param, rngs=nnx.Rngs(0, dropout=seed)))
    graphdef, weights, streams = nnx.split(abstract, WEIGHTS, ...)
    values = to_nnx(checkpoint)
    paths = {path for path, _ in nnx.to_flat_state(weights)}
    if paths != set(values):
        # Only a model/layout mismatch (a bug, not a bad file) can get here: the checkpoint is validated.
        raise CheckpointError(
            f"NNX state and checkpoint disagree: missing {sorted(map(str, paths - set(values)))}, "
            f"unexpected {sorted(map(str, set(values) - paths))}"
        )
    for path, variable in nnx.to_flat_state(weights):
        value = values[path]
        target = variable.get_value().dtype  # the parameter dtype, or the default int
        variable.set_value(jnp.asarray(value, dtype=target))
    model = nnx.merge(graphdef, weights, streams)
    # eval_shape left the dropout streams' keys abstract: give them real ones (no-op without dropout).
    nnx.reseed(model, dropout=seed)
    model.eval()
    return model


def to_checkpoint(model: Model) -> Checkpoint:
    """The model's parameters and BatchNorm state as a canonical checkpoint (numpy, PyTorch layouts)."""
    flat = {path: np.asarray(variable.get_value()) for path, variable in nnx.to_flat_state(nnx.state(model, WEIGHTS))}
    return Checkpoint.from_tensors(from_nnx(flat), model.config, allow_nonfinite=True)


def load(path, dtype="float32", *, config=None) -> Model:
    """Load any checkpoint ``weights_convert`` reads into an eval-mode model; ``dtype`` as in
    ``from_checkpoint`` ("float32", "float64" or "mixed_bfloat16"). ``config`` gives what a file
    without one cannot (a MONAI state_dict's strides); a UserWarning says what was assumed otherwise."""
    check_dtype(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_checkpoint(checkpoint, dtype)


def save(model: Model, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (atomic; existing files kept unless ``force``)."""
    if not isinstance(model, MODELS):
        raise CheckpointError(f"expected an impl_flax.AttentionUNet or MonaiAttentionUNet, got {type(model).__name__}")
    weights_convert.write(to_checkpoint(model), path, force=force)
