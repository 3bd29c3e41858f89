"""What the parity harness runs in Keras: the same four functions as ``impl_torch.runner``, numpy in
and numpy out in canonical layouts (NCHW or NCDHW, canonical names), under the backend of this process.

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW (NCDHW) array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``predictor(checkpoint, *, dtype, device)``: the eval-mode ``forward`` of one model built once.
- ``train_step`` and ``fit``: the trainer's (``impl_keras.trainer``, the step of
  ``impl_keras.steps``), through the one training loop (``weights_convert.core.loop``).

``checkpoint`` is a ``Checkpoint`` or a path that ``impl_keras.load`` reads. ``dtype`` is "float32",
"float64" or "mixed_bfloat16" (``impl_keras.trainer`` says how each runs).

The backend is fixed when Keras is imported, so ``run_in_backend`` / ``run_batch_in_backend``
(``weights_convert.harness.keras_worker``) run these functions under any backend:
in this process when it already has that backend, otherwise in one ``KERAS_BACKEND=<backend>
python -m impl_keras.runner JOB_DIR`` subprocess per batch, whose entry point (``main``) is here.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from impl_keras import trainer
from impl_keras.steps import assign as _assign
from impl_keras.steps import jax_state as _jax_state
from impl_keras.trainer import device_scope as _device_scope
from impl_keras.trainer import model_for as _model
from impl_keras.trainer import statistics as _state
from impl_keras.trainer import to_channels_first as _channels_first
from impl_keras.trainer import to_channels_last as _channels_last
from impl_keras.trainer import train_step
from weights_convert.processes import Call, serve_calls

__all__ = ["fit", "forward", "predictor", "train_step"]


def forward(checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        named = _call(model, _channels_last(x, dtype), train)
        results = {name: _channels_first(value) for name, value in named.items()}
        if train:
            results.update({f"state/{name}": value for name, value in _state(model).items()})
    return results


def predictor(checkpoint, *, dtype="float32", device="cpu"):
    """``forward`` in eval mode of one model built once, for many calls (``attention-unet predict``
    runs every window through it), under this process's backend: a function of a batch ->
    ``{block name: NCHW array}``. The model is ``model_for``'s, reused by the next call of the same
    config, dtype and device: one predictor at a time."""
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)

    def named_outputs(x: np.ndarray) -> dict:
        with _device_scope(device):
            named = _call(model, _channels_last(x, dtype), False)
            return {name: _channels_first(value) for name, value in named.items()}

    return named_outputs


def fit(checkpoint, xs, targets, **settings) -> dict:
    """``impl_keras.trainer.fit``, a fresh optimizer being one of the parity checks' two."""
    return trainer.fit(checkpoint, xs, targets, use="parity", **settings)


def _call(model, x, training: bool) -> dict:
    """The named block outputs of one forward; a training-mode call updates the running statistics."""
    import keras

    if keras.backend.backend() == "jax":
        # As Keras' own JAX trainer runs a model: stateless_call under jax.jit. Eager JAX compiles
        # every operation separately, seconds per new shape, for the same arithmetic.
        (_, named), state = _jax_call(model, training)(*_jax_state(model), x)
        _assign(model.non_trainable_variables, state)
        return {name: named[name] for name in model.config.block_names}  # jax.jit returns dicts sorted
    _, named = model(x, training=training, return_intermediates=True)
    return named


@functools.lru_cache(maxsize=8)
def _jax_call(model, training: bool):
    import jax

    def call(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=training, return_intermediates=True)

    return jax.jit(call)


# ---------------------------------------------------------------------------------------------
# The worker side of ``weights_convert.harness.keras_worker``: the calls of one job directory,
# under this process's backend.


def run_call(call: Call) -> dict:
    """One ``Call`` under this process's backend."""
    function = {"forward": forward, "train_step": train_step, "fit": fit}[call.function]
    if call.target is None:
        return function(call.checkpoint, call.x, **call.kwargs)
    return function(call.checkpoint, call.x, call.target, **call.kwargs)


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry (``weights_convert.processes.serve_calls``): run ``<dir>/job.json`` and
    write ``<dir>/result_<i>.npz``."""
    return serve_calls(sys.argv[1:] if argv is None else argv, run_call, "python -m impl_keras.runner JOB_DIR")


if __name__ == "__main__":
    sys.exit(main())
