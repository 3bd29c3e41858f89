"""Keras 3's rows on the backend this process runs (a worker subprocess per backend, because Keras
fixes its backend when first imported): eager, tf.function (TensorFlow only) and jit_compile, each
an eval forward through Keras' own ``predict_on_batch`` and a training step through the trainer's
(``impl_keras.steps.Steps``, compiled the same three ways).

The model is ``impl_keras.io.from_checkpoint`` of the seeded weights in the run's dtype policy
("mixed_bfloat16": float32 variables, bfloat16 compute), its optimizer
``impl_keras.training.make_optimizer``'s. Under JAX it is a subclass whose ``call`` notes JAX's
matmul setting as it is traced (``TraceRecord``), filled by the same ``assign_checkpoint``.
"""

from __future__ import annotations

import keras
import numpy as np

from impl_keras.io import MODELS, assign_checkpoint, from_checkpoint
from impl_keras.model import AttentionUNet, empty_model
from impl_keras.steps import Steps, to_result
from impl_keras.training import make_optimizer
from weights_convert.core.random_init import random_checkpoint
from weights_convert.harness.bench.matmul_settings import (
    TraceRecord,
    jax_scope,
    tensorflow_scope,
    tensorflow_setting,
    torch_scope,
    torch_setting,
)
from weights_convert.harness.bench.rows import error_rows, run_variants
from weights_convert.harness.bench.settings import MODES, OPTIMIZER, OPTIMIZER_HYPER, VARIANTS, Settings, inputs

# variant -> (run_eagerly, jit_compile) of ``model.compile`` for the forward
OPTIONS = {"eager": (True, False), "tf.function": (False, False), "jit_compile": (False, True)}
# backend -> (precision scope, matmul setting read at the end of a row); JAX's is a TraceRecord's
SCOPES = {"tensorflow": (tensorflow_scope, tensorflow_setting), "torch": (torch_scope, torch_setting)}


def rows(settings: Settings, backend: str) -> list[dict]:
    if keras.backend.backend() != backend:
        return error_rows("keras", backend, settings, f"Keras started with {keras.backend.backend()}")
    if settings.device == "gpu" and not sees_gpu(backend):
        return error_rows("keras", backend, settings, f"--device gpu: {backend} sees no GPU")
    keras.config.set_floatx(settings.input_dtype)
    weights = random_checkpoint(settings.config, seed=0)
    x, target = inputs(settings, channels_last=True)
    traced = TraceRecord() if backend == "jax" else None
    network = MODELS[settings.config.architecture]  # the article's AttentionUNet or MonaiAttentionUNet
    model_class = network if traced is None else traced_class(traced.note, network)

    def timed(mode: str, variant: str):
        def build_step():
            model = build(model_class, network, weights, settings.dtype)
            if mode == "forward":
                return forward_step(model, x, *OPTIONS[variant])
            optimizer = make_optimizer(OPTIMIZER, settings.dtype, **OPTIMIZER_HYPER)
            return train_step(model, optimizer, x, target, variant)

        return build_step

    names = VARIANTS[f"keras/{backend}"]
    variants = {name: {mode: timed(mode, name) for mode in MODES} for name in names}
    scope, setting = (jax_scope, traced.take) if traced is not None else SCOPES[backend]
    return run_variants("keras", backend, settings, variants, scope, setting)


def traced_class(note, network: type = AttentionUNet) -> type:
    """``network``, calling ``note()`` each time its ``call`` runs (under JAX's jit: when traced)."""

    class TracedUNet(network):
        def call(self, x, training=None, return_intermediates: bool = False):
            note()
            return super().call(x, training=training, return_intermediates=return_intermediates)

    return TracedUNet


def build(model_class: type, network: type, weights, dtype: str):
    """``weights`` in a ``model_class`` (``network`` itself, or its traced subclass)."""
    keras.utils.set_random_seed(0)
    if model_class is network:
        return from_checkpoint(weights, dtype)
    # Zeros, then the seeded weights, as from_checkpoint does: under JAX a random initializer
    # compiles one program per kernel shape (seconds each, even for a tiny model).
    model = empty_model(weights.config, dtype, model_class)
    assign_checkpoint(model, weights)
    return model


def sees_gpu(backend: str) -> bool:
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    import torch

    return torch.cuda.is_available()


def forward_step(model, x, run_eagerly: bool, jit_compile: bool):
    """(step, sync) of one eval forward of ``model``: a direct call in eager mode, else Keras'
    compiled predict function; the step returns the logits."""
    model.compile(run_eagerly=run_eagerly, jit_compile=jit_compile)
    if run_eagerly:
        tensor = keras.ops.convert_to_tensor(x)
        return (lambda: model(tensor, training=False)), keras.ops.convert_to_numpy
    # predict_on_batch goes through the backend's compiled predict function and returns numpy.
    return (lambda: model.predict_on_batch(x)), np.asarray


def train_step(model, optimizer, x, target, variant: str):
    """(step, sync) of one train-mode step of ``model`` with ``optimizer``: the trainer's step
    (``impl_keras.steps.Steps``: MSE loss, gradients, optimizer update) compiled as ``variant``
    (eager, tf.function or XLA); the step returns the loss."""
    steps = Steps(model, optimizer, variant)
    x, target = (keras.ops.convert_to_tensor(a) for a in (x, target))
    # to_result waits for the loss, and with it for the step.
    return (lambda: steps.step(x, target)[0]), to_result
