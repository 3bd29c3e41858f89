"""What the parity harness runs in Flax NNX: the functions of ``impl_torch.runner``, same
signatures, numpy in and out in canonical layouts (NCHW or NCDHW activations, canonical names, OIHW
or OIDHW kernels); the model itself runs channels last (NHWC, NDHWC).

- ``forward(checkpoint, x, *, dtype, device, train)``: every named block output; in train mode also
  ``state/<name>`` for every running statistic after the forward.
- ``predictor(checkpoint, *, dtype, device)``: the eval-mode ``forward`` of one model built once.
- ``train_step`` and ``fit``: the trainer's (``impl_flax.trainer``, which says how each precision
  runs), through the one training loop (``weights_convert.core.loop``).

The forward runs under ``nnx.jit`` (the variant users deploy, and one XLA compile instead of one
per op), in the trainer's scope: x64 only for float64, "highest" matmul precision unless the caller
has chosen one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from impl_flax import trainer
from impl_flax.io import Model, from_checkpoint
from impl_flax.trainer import canonical, loss_fn, train_step
from impl_flax.trainer import scope as _scope
from impl_flax.trainer import to_result as _numpy
from weights_convert.core.checkpoint import Checkpoint

__all__ = ["fit", "forward", "loss_fn", "predictor", "train_step"]


def to_channels_last(x: np.ndarray) -> np.ndarray:
    """NCHW -> NHWC, NCDHW -> NDHWC."""
    return np.moveaxis(np.asarray(x), 1, -1)


def to_channels_first(x) -> np.ndarray:
    """NHWC -> NCHW, NDHWC -> NCDHW, as numpy (``to_result``)."""
    return np.moveaxis(_numpy(x), -1, 1)


def _model(checkpoint: Checkpoint, dtype: str, train: bool) -> Model:
    model = from_checkpoint(checkpoint, dtype)
    model.train() if train else model.eval()
    return model


@nnx.jit
def _named_outputs(model: Model, x: jax.Array) -> dict:
    return model(x, return_intermediates=True)[1]


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    with _scope(dtype, device) as input_dtype:
        model = _model(checkpoint, dtype, train)
        named = _named_outputs(model, jnp.asarray(to_channels_last(x), input_dtype))
        results = {name: to_channels_first(named[name]) for name in model.block_names}
        if train:
            statistics = canonical(nnx.state(model, nnx.BatchStat), model.config)
            results.update({f"state/{name}": value for name, value in statistics.items()})
    return results


def predictor(checkpoint: Checkpoint, *, dtype="float32", device="cpu"):
    """``forward`` in eval mode of one model built once, for many calls (``attention-unet predict``
    runs every window through it, one compile per window shape): a function of a batch ->
    ``{block name: NCHW array}``."""
    with _scope(dtype, device):
        model = _model(checkpoint, dtype, train=False)

    def named_outputs(x: np.ndarray) -> dict:
        with _scope(dtype, device) as input_dtype:
            named = _named_outputs(model, jnp.asarray(to_channels_last(x), input_dtype))
            return {name: to_channels_first(named[name]) for name in model.block_names}

    return named_outputs


def fit(checkpoint, xs, targets, **settings) -> dict:
    """``impl_flax.trainer.fit``, a fresh optimizer being one of the parity checks' two."""
    return trainer.fit(checkpoint, xs, targets, use="parity", **settings)
