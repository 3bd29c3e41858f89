"""The Keras training step, as Keras' own trainer runs it on each backend (``Steps``): loss =
mean((model(x, training=True) - target)**2), its gradients, one optimizer update. The model is
backend-neutral; the autodiff and the compilation are each backend's own.

- TensorFlow: ``tf.function``s around a ``tf.GradientTape`` and ``optimizer.apply_gradients``; no
  XLA, as Keras' trainer on a CPU-only machine, and on GPU as well, so TensorFlow's own kernels run
  there, with TF32 off (``impl_keras.trainer.device_scope``).
- JAX: ``jax.jit`` of ``jax.value_and_grad`` over ``stateless_call`` and of
  ``optimizer.stateless_apply``, fed the variables' values at every step.
- PyTorch: eager, ``loss.backward()``, then ``optimizer.apply`` under ``torch.no_grad()``.

``VARIANTS`` lists the other ways a step can be compiled on each backend (the bench times them).
Two compiled functions, the gradients (``gradients``, one per model, shared by every optimizer) and
the update (one per optimizer), each compiled once: Keras' trainer fuses them into one, but
compiling the backward pass is the slow part (tens of seconds under XLA on a CPU), and the parity
checks run SGD and Adam on every model.
"""

from __future__ import annotations

import functools

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.frameworks import KERAS_BACKENDS

# backend -> how a step can be compiled, the trainer's first: Keras' own ``compile`` options
# (``run_eagerly``; TensorFlow's ``tf.function`` without XLA; ``jit_compile``: XLA, ``jax.jit``,
# ``torch.compile``), which the bench times one by one.
VARIANTS = {
    "tensorflow": ("tf.function", "eager", "jit_compile"),
    "jax": ("jit_compile", "eager"),
    "torch": ("eager", "jit_compile"),
}


def compiled(function, variant: str | None = None):
    """``function`` compiled as ``variant`` of this backend (``VARIANTS``; None: the trainer's)."""
    import keras

    backend = keras.backend.backend()
    variant = variant or VARIANTS[backend][0]
    if variant not in VARIANTS[backend]:
        raise ValueError(f"Keras on {backend} runs a step as one of {list(VARIANTS[backend])}, got {variant!r}")
    if variant == "eager":
        return function
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, autograph=False, jit_compile=variant == "jit_compile")
    if backend == "jax":
        import jax

        return jax.jit(function)
    import torch

    return torch.compile(function)


def to_result(value) -> np.ndarray:
    """A backend tensor as numpy; bfloat16 as float32 (numpy has no bfloat16, and torch's tensors
    refuse the conversion)."""
    import keras

    if keras.backend.standardize_dtype(value.dtype) == "bfloat16":
        value = keras.ops.cast(value, "float32")
    return np.asarray(keras.ops.convert_to_numpy(value))


def canonical(spec, value) -> np.ndarray:
    """A parameter-shaped array in the canonical layout (conv kernels HWIO -> OIHW, DHWIO -> OIDHW)."""
    from weights_convert.core.layouts import rule

    return rule(spec).from_channels_last(to_result(value))


def loss_value(output, target, loss: str = "mse"):
    """The loss ``loss`` (``weights_convert.core.losses``, in ``impl_keras.losses``) in float32 at
    least: bfloat16 logits are cast first."""
    from keras import ops

    from impl_keras import losses
    from impl_keras.model import at_least_float32

    output = ops.cast(output, at_least_float32(output.dtype))
    return losses.loss_value(loss, output, ops.cast(target, output.dtype))


def jax_state(model) -> tuple[list, list]:
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def assign(variables, values) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


@functools.lru_cache(maxsize=8)
def steps(model, optimizer: str, hyper: tuple, loss: str = "mse") -> Steps:
    """One ``Steps`` per (model, optimizer, hyperparameters ``hyper`` as items, loss): its functions
    are traced or compiled once, and every later run on the model reuses them after ``reset()``."""
    from impl_keras import training

    dtype = model.dtype_policy.variable_dtype
    return Steps(model, training.make_optimizer(optimizer, dtype, **dict(hyper)), loss=loss)


class Steps:
    """One optimizer over ``model.trainable_variables`` and the training step on this backend
    (the module docstring says how each backend runs it)."""

    def __init__(self, model, optimizer, variant: str | None = None, loss: str = "mse"):
        import keras

        from impl_keras.io import keras_variables
        from weights_convert.core.spec import param_specs

        self.model = model
        by_id = {id(v): name for name, v in keras_variables(model).items()}
        self.variables = model.trainable_variables
        self.names = [by_id[id(v)] for v in self.variables]
        self.specs = {s.name: s for s in param_specs(model.config)}
        self.gradients = gradients(model, variant, loss)
        self.optimizer = optimizer
        self.optimizer.build(self.variables)  # before any tracing: a tf.function must not create variables
        self.initial = [keras.ops.convert_to_numpy(v.value) for v in self.optimizer.variables]
        self.apply = getattr(self, f"_{keras.backend.backend()}_apply")(variant)

    def reset(self) -> None:
        """The optimizer's state as when it was created (Adam's t back to 0, moments zero)."""
        assign(self.optimizer.variables, self.initial)

    def restore(self, checkpoint: Checkpoint) -> None:
        """The optimizer's state (step count and slots) from training checkpoint ``checkpoint``, whose
        tensors the model already holds (after ``reset()``: slots left at zeros where it has none)."""
        from impl_keras import training

        training.assign_optimizer_state(self.model, self.optimizer, checkpoint.optimizer)

    def step(self, x, target):
        """One training step on the model and the optimizer; returns (loss, gradients)."""
        loss, grads = self.gradients(x, target)
        self.apply(grads)
        return loss, grads

    def canonical(self, values) -> dict:
        """``values`` given in ``model.trainable_variables`` order, as canonical name -> array in the
        canonical layout, in canonical (state_dict) order."""
        by_name = dict(zip(self.names, values, strict=True))
        return {name: canonical(self.specs[name], by_name[name]) for name in self.specs if name in by_name}

    def parameters(self) -> dict:
        """Every trainable tensor now (``canonical``)."""
        return self.canonical([v.value for v in self.variables])

    def _tensorflow_apply(self, variant):
        optimizer, variables = self.optimizer, self.variables
        return compiled(lambda grads: optimizer.apply_gradients(zip(grads, variables, strict=True)), variant)

    def _jax_apply(self, variant):
        optimizer, variables = self.optimizer, self.variables
        stateless_apply = compiled(optimizer.stateless_apply, variant)

        def apply(grads):
            values, state = stateless_apply([v.value for v in optimizer.variables], grads, [v.value for v in variables])
            assign(variables, values)
            assign(optimizer.variables, state)

        return apply

    def _torch_apply(self, variant):
        import torch

        optimizer, variables = self.optimizer, self.variables

        def apply(grads):
            with torch.no_grad():
                optimizer.apply(grads, variables)

        return apply


@functools.lru_cache(maxsize=8)
def gradients(model, variant: str | None = None, loss: str = "mse"):
    """``(x, target) -> (loss, gradients)``: one train-mode forward, which updates the running
    statistics, and the gradients of the loss in ``model.trainable_variables`` order. Keras has no
    backend-neutral gradient API, so each backend's own autodiff is used here (the model itself is
    backend-neutral)."""
    import keras

    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        def gradients(x, target):
            with tf.GradientTape() as tape:
                value = loss_value(model(x, training=True), target, loss)
            return value, tape.gradient(value, variables)

        return compiled(gradients, variant)
    if backend == "jax":
        import jax

        def loss_and_state(trainable, non_trainable, x, target):
            output, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_value(output, target, loss), non_trainable

        value_and_grad = compiled(jax.value_and_grad(loss_and_state, has_aux=True), variant)

        def gradients(x, target):
            (value, state), grads = value_and_grad(*jax_state(model), x, target)
            assign(model.non_trainable_variables, state)
            return value, grads

        return gradients
    if backend == "torch":

        def gradients(x, target):
            model.zero_grad()  # set to None: no accumulation across steps
            value = loss_value(model(x, training=True), target, loss)
            value.backward()
            return value.detach(), [v.value.grad for v in variables]

        return compiled(gradients, variant)
    raise ValueError(f"unsupported Keras backend {backend!r}; expected one of {KERAS_BACKENDS}")
