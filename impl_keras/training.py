"""Training checkpoints in Keras 3: the model and its optimizer (SGD, Adam, AdamW with PyTorch's
definitions) saved to and loaded from any format that holds optimizer state, through the canonical
optimizer state of ``weights_convert.core.optimizer_state``.

The optimizers are Keras optimizers with torch's arithmetic: ``TorchSGD`` (its ``momentums`` hold
torch's ``momentum_buffer`` itself: ``buf = momentum * buf + g``, then ``p -= lr * buf``, where
``keras.optimizers.SGD`` keeps ``-lr * buf``), ``impl_keras.TorchAdam`` (eps after the bias
correction) and ``TorchAdamW`` (``TorchAdam`` with Keras' decoupled weight decay,
``p -= lr * weight_decay * p``, which is torch AdamW's). Their constants go through float64, as
``TorchAdam``'s do: Keras' TensorFlow backend would round a Python float through float32. Keras'
weight decay is always decoupled, so SGD and Adam with an L2 ``weight_decay`` are refused.
``optimizer.iterations`` is the canonical step, and every slot is the canonical slot in Keras'
channels-last layout, so the mapping is a copy.

All three are registered with Keras (package ``attention_unet``): a model compiled with one and
saved with ``model.save("t.keras")`` loads with ``keras.saving.load_model(path, safe_mode=True)``
once ``impl_keras`` is imported, its optimizer state included; ``weights_convert`` reads and writes
that same ``.keras`` form. Keras creates the learning-rate variable in ``keras.config.floatx()``:
load a float64 model with ``keras.config.set_floatx("float64")`` for a float64 learning rate
(``make_optimizer`` sets it for the optimizers it makes).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import weights_convert
from impl_keras.io import check_dtype, check_model, from_checkpoint, keras_variables, to_checkpoint
from impl_keras.model import AttentionUNet, serializable
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.layouts import rule
from weights_convert.core.optim import UnsupportedOptimizer, hyperparameters
from weights_convert.core.optimizer_state import OptimizerState, counted_state
from weights_convert.core.precisions import param_dtype
from weights_convert.core.spec import param_specs


def _constant(value, dtype):
    return ops.cast(np.float64(value), dtype)


@serializable
class TorchSGD(keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with torch's update and buffer (``torch.optim.SGD``, dampening 0)::

        buf = momentum * buf + g
        p = p - lr * buf                      (nesterov: p = p - lr * (g + momentum * buf))

    so ``momentums`` hold torch's ``momentum_buffer`` exactly (Keras' SGD keeps ``-lr * buf``).
    Constants go through float64 (exact in a float64 model on every backend). Keras' weight decay
    is decoupled and torch SGD's is an L2 term in g: it is refused."""

    def __init__(self, *args, weight_decay=None, **kwargs):
        if weight_decay:
            raise ValueError(f"TorchSGD takes no weight_decay (torch SGD's is not Keras'), got {weight_decay!r}")
        super().__init__(*args, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr, g = ops.cast(learning_rate, dtype), ops.cast(gradient, dtype)
        if self.momentum == 0:
            self.assign_sub(variable, lr * g)
            return
        momentum = _constant(self.momentum, dtype)
        buf = self.momentums[self._get_variable_index(variable)]
        self.assign(buf, momentum * buf + g)
        self.assign_sub(variable, lr * (g + momentum * buf) if self.nesterov else lr * buf)


@serializable
class TorchAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with PyTorch's update (``torch.optim.Adam``) at every step t = 1, 2, ...::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    Keras' own Adam adds eps to sqrt(v) *before* the bias correction,
    p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps): a different update wherever eps
    is not negligible next to sqrt(v), and no single rescaled eps matches torch at every step.

    Same arguments, slots (``momentums``, ``velocities``; ``velocity_hats`` with amsgrad, which
    takes torch's max(v_hat, v) likewise) and state as ``keras.optimizers.Adam``. Keras'
    ``weight_decay`` is decoupled (AdamW's), torch Adam's is an L2 term in g: it is refused.
    """

    # The module ``.keras`` archives name for it (``weights_convert.formats.keras_optimizer``), where
    # it was defined first: Keras writes ``__module__`` into an archive's config, so ``model.save``
    # writes the archive weights_convert writes. Keras finds the class by its registered name.
    __module__ = "impl_keras.model"

    def __init__(self, *args, weight_decay=None, **kwargs):
        if weight_decay:
            raise ValueError(f"TorchAdam takes no weight_decay (torch Adam's is not Keras'), got {weight_decay!r}")
        super().__init__(*args, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype

        def constant(value):
            # Through a numpy float64: Keras' TensorFlow backend converts a bare Python float through a
            # float32 tensor (0.999 -> 0.99900001287 in float64, 1 - b2 off by 1.3e-5 relative).
            return ops.cast(np.float64(value), dtype)

        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        b1, b2, eps, one = constant(self.beta_1), constant(self.beta_2), constant(self.epsilon), constant(1)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign(m, b1 * m + (one - b1) * g)
        self.assign(v, b2 * v + (one - b2) * ops.square(g))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        step_size = lr / (one - ops.power(b1, t))
        denominator = ops.sqrt(v) / ops.sqrt(one - ops.power(b2, t)) + eps
        self.assign_sub(variable, step_size * m / denominator)


@serializable
class TorchAdamW(TorchAdam):
    """``TorchAdam`` with decoupled weight decay, torch AdamW's ``p *= 1 - lr * weight_decay``
    before the Adam step (Keras applies it before ``update_step``, scaled by the learning rate)."""

    def __init__(self, *args, weight_decay=0.01, **kwargs):
        keras.optimizers.Adam.__init__(self, *args, weight_decay=weight_decay, **kwargs)

    def _apply_weight_decay(self, variables):
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = ops.cast(self.learning_rate, variable.dtype)
                variable.assign(variable - variable * _constant(self.weight_decay, variable.dtype) * lr)


def make_optimizer(name: str = "adam", dtype: str = "float32", **hyper) -> keras.optimizers.Optimizer:
    """``TorchSGD`` / ``TorchAdam`` / ``TorchAdamW`` with the canonical hyperparameters of ``name``
    and ``hyper``, its learning-rate variable in ``dtype`` (the model's variable dtype: a float32
    learning rate would be 5e-8 off the float64 one). A setting Keras cannot express is refused."""
    hyper = hyperparameters(name, **hyper)
    if hyper["weight_decay"] and not hyper["decoupled_weight_decay"]:
        raise UnsupportedOptimizer(
            f"Keras cannot express {name} with weight_decay={hyper['weight_decay']}: torch adds it to the gradient "
            f"(L2), Keras' weight_decay is always decoupled; use adamw, or weight_decay=0"
        )
    floatx = keras.config.floatx()
    keras.config.set_floatx(param_dtype(dtype))
    try:
        if name == "sgd":
            return TorchSGD(learning_rate=hyper["lr"], momentum=hyper["momentum"], nesterov=hyper["nesterov"])
        adam = {"learning_rate": hyper["lr"], "beta_1": hyper["b1"], "beta_2": hyper["b2"], "epsilon": hyper["eps"]}
        if name == "adamw":
            return TorchAdamW(weight_decay=hyper["weight_decay"], **adam)
        return TorchAdam(**adam)
    finally:
        keras.config.set_floatx(floatx)


def _name_and_hyper(optimizer) -> tuple[str, dict]:
    """The canonical name and hyperparameters of a Keras optimizer, or UnsupportedOptimizer."""
    if not isinstance(optimizer, TorchSGD | TorchAdam):
        raise UnsupportedOptimizer(
            f"{type(optimizer).__name__} has no canonical form: Keras' own SGD and Adam round constants through "
            f"float32 and Adam adds eps before the bias correction; use impl_keras.training.make_optimizer"
        )
    config = optimizer.get_config()
    if not isinstance(config["learning_rate"], float | int):
        raise UnsupportedOptimizer("a learning-rate schedule has no canonical form; a constant learning rate is")
    lr = _learning_rate(optimizer, config["learning_rate"])
    if isinstance(optimizer, TorchSGD):
        hyper = {"momentum": config["momentum"], "nesterov": config["nesterov"]}
        return "sgd", hyperparameters("sgd", lr=lr, **hyper)
    name = "adamw" if isinstance(optimizer, TorchAdamW) else "adam"
    hyper = {"lr": lr, "b1": config["beta_1"], "b2": config["beta_2"]}
    hyper.update(eps=config["epsilon"], weight_decay=float(config["weight_decay"] or 0.0))
    return name, hyperparameters(name, **hyper)


def _learning_rate(optimizer, value) -> float:
    """The learning rate the optimizer was made with. Keras keeps it in a ``floatx`` variable, and a
    float32 one reads back rounded (1e-3 as 0.0010000000474974513): the shortest decimal that
    rounds to that float32 is the value it stands for. A float64 variable holds it exactly."""
    if keras.backend.standardize_dtype(optimizer.learning_rate.dtype) == "float32":
        return float(str(np.float32(value)))
    return float(value)


def _slot_variables(optimizer, name: str, hyper: dict) -> dict:
    """Canonical slot -> the optimizer's list of slot variables, in ``model.trainable_variables`` order."""
    if name == "sgd":
        return {"momentum_buffer": optimizer.momentums} if hyper["momentum"] else {}
    return {"exp_avg": optimizer._momentums, "exp_avg_sq": optimizer._velocities}


def optimizer_state(model: AttentionUNet, optimizer) -> OptimizerState:
    """The canonical state of ``optimizer`` (built over ``model.trainable_variables``, or fresh)."""
    name, hyper = _name_and_hyper(optimizer)
    if not optimizer.built:
        return OptimizerState(name, hyper, 0, {})
    step = int(keras.ops.convert_to_numpy(optimizer.iterations))
    specs = {s.name: s for s in param_specs(model.config)}
    by_id = {id(v): n for n, v in keras_variables(model).items()}
    names = [by_id[id(v)] for v in model.trainable_variables]
    slots = {}
    for slot, variables in _slot_variables(optimizer, name, hyper).items():
        slots[slot] = {
            n: rule(specs[n]).from_channels_last(keras.ops.convert_to_numpy(v.value))
            for n, v in zip(names, variables, strict=True)
        }
    return counted_state(name, hyper, step, slots)


def to_training_checkpoint(model: AttentionUNet, optimizer) -> Checkpoint:
    """Model tensors and optimizer state as one canonical checkpoint."""
    checkpoint = to_checkpoint(model)
    return Checkpoint.from_tensors(
        checkpoint.tensors, checkpoint.config, allow_nonfinite=True, optimizer=optimizer_state(model, optimizer)
    )


def from_training_checkpoint(
    checkpoint: Checkpoint, dtype="float32"
) -> tuple[AttentionUNet, keras.optimizers.Optimizer]:
    """The model and its optimizer, built over ``model.trainable_variables`` with the checkpoint's
    state: ready for the next ``apply_gradients`` (call the model with ``training=True``)."""
    state = checkpoint.optimizer
    if state is None:
        raise CheckpointError("the checkpoint holds no optimizer state (a weights-only checkpoint)")
    model = from_checkpoint(checkpoint, dtype)
    optimizer = make_optimizer(state.name, model.dtype_policy.variable_dtype, **state.hyper)
    optimizer.build(model.trainable_variables)
    assign_optimizer_state(model, optimizer, state)
    return model, optimizer


def assign_optimizer_state(model: AttentionUNet, optimizer, state: OptimizerState) -> None:
    """Set ``optimizer`` (built over ``model.trainable_variables``, of ``state``'s kind) to
    ``state``: its step count and every slot. A state without slots (a fresh optimizer) leaves the
    slots as they are: the zeros of a freshly built optimizer."""
    optimizer.iterations.assign(state.step or 0)
    if not state.slots:
        return
    specs = {s.name: s for s in param_specs(model.config)}
    by_id = {id(v): n for n, v in keras_variables(model).items()}
    names = [by_id[id(v)] for v in model.trainable_variables]
    for slot, variables in _slot_variables(optimizer, state.name, state.hyper).items():
        for name, variable in zip(names, variables, strict=True):
            value = np.asarray(state.slots[slot][name]).astype(variable.dtype)
            variable.assign(rule(specs[name]).to_channels_last(value))


def save_training(model: AttentionUNet, optimizer, path, *, force: bool = False) -> None:
    """Save model and optimizer state in the format named by ``path``; atomic, existing files kept
    unless ``force``. ``model`` is an ``impl_keras.AttentionUNet`` or ``MonaiAttentionUNet``."""
    check_model(model)
    weights_convert.write(to_training_checkpoint(model, optimizer), path, force=force)


def load_training(path, *, dtype="float32", config=None) -> tuple[AttentionUNet, keras.optimizers.Optimizer]:
    """(model, optimizer) from a training checkpoint in any format that holds one; ``config`` as in
    ``impl_keras.load`` (a UserWarning says what a file without one made it assume)."""
    check_dtype(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_training_checkpoint(checkpoint, dtype)
