"""Training checkpoints in Flax NNX: the model and its ``nnx.Optimizer`` (optax SGD, Adam, AdamW
with PyTorch's definitions) saved to and loaded from any format that holds optimizer state, through
the canonical optimizer state of ``weights_convert.core.optimizer_state``.

The transformations: SGD is ``optax.sgd(lr, momentum, nesterov)`` (its ``trace`` is torch's
``momentum_buffer``), Adam ``optax.adam`` (``mu``, ``nu`` are ``exp_avg``, ``exp_avg_sq``; eps after
the bias correction, as torch), AdamW ``optax.adamw`` (decay added to the update before the learning
rate scales it: torch's ``p *= 1 - lr * weight_decay``). An L2 ``weight_decay`` of SGD or Adam is
``optax.add_decayed_weights`` in front, as torch adds it to the gradient. optax transformations do
not expose their hyperparameters, so ``make_optimizer`` records the canonical name and
hyperparameters on the optimizer (``optimizer.canonical``, static) for ``save_training``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import weights_convert
from impl_flax.io import MODELS, Model, from_checkpoint, to_checkpoint
from impl_flax.model import check_dtype
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import nnx_path
from weights_convert.core.layouts import rule
from weights_convert.core.optim import UnsupportedOptimizer, hyperparameters
from weights_convert.core.optimizer_state import OptimizerState, counted_state
from weights_convert.core.spec import param_specs

# optax state field -> canonical slot
OPTAX_SLOTS = {"trace": "momentum_buffer", "mu": "exp_avg", "nu": "exp_avg_sq"}


def transformation(name: str, hyper: dict) -> optax.GradientTransformation:
    """The optax transformation of canonical optimizer ``name`` with full ``hyper``: one object per
    setting, because the transformation is a static part of ``nnx.Optimizer``, and a new one would
    compile a jitted training step again."""
    return _transformation(name, tuple(hyper.items()))


@functools.cache
def _transformation(name: str, items: tuple) -> optax.GradientTransformation:
    hyper = dict(items)
    if name == "sgd":
        tx = optax.sgd(hyper["lr"], momentum=hyper["momentum"] or None, nesterov=hyper["nesterov"])
    elif name == "adam":
        tx = optax.adam(hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"])
    else:
        return optax.adamw(
            hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"], weight_decay=hyper["weight_decay"]
        )
    return optax.chain(optax.add_decayed_weights(hyper["weight_decay"]), tx) if hyper["weight_decay"] else tx


def make_optimizer(model: Model, name: str = "adam", **hyper) -> nnx.Optimizer:
    """``nnx.Optimizer(model, <optax transformation>, wrt=nnx.Param)`` for canonical optimizer ``name``
    with ``hyper``, recording both as ``optimizer.canonical``."""
    hyper = hyperparameters(name, **hyper)
    optimizer = nnx.Optimizer(model, transformation(name, hyper), wrt=nnx.Param)
    optimizer.canonical = (name, tuple(hyper.items()))
    return optimizer


def _trainable_paths(model: Model) -> dict:
    """NNX state path of each trainable tensor -> its spec."""
    return {nnx_path(p): p for p in param_specs(model.config) if not p.is_buffer}


def optimizer_state(model: Model, optimizer: nnx.Optimizer) -> OptimizerState:
    """The canonical state of an optimizer made by ``make_optimizer``."""
    if not hasattr(optimizer, "canonical"):
        raise UnsupportedOptimizer(
            "this nnx.Optimizer records no canonical optimizer (optax does not expose its hyperparameters); "
            "make it with impl_flax.training.make_optimizer"
        )
    name, hyper = optimizer.canonical[0], dict(optimizer.canonical[1])
    specs = _trainable_paths(model)
    step, counts, slots = None, set(), {}
    for path, variable in nnx.to_flat_state(nnx.state(optimizer)):
        value = np.asarray(variable.get_value())
        if path == ("step",):
            step = int(value)
            continue
        if path[-1] == "count":
            counts.add(int(value))
            continue
        field = next((i for i, key in enumerate(path) if key in OPTAX_SLOTS), None)
        spec = specs.get(tuple(path[field + 1 :])) if field is not None else None
        if spec is None:
            raise CheckpointError(f"optimizer state entry {path} maps to no canonical slot")
        slots.setdefault(OPTAX_SLOTS[path[field]], {})[spec.name] = rule(spec).from_channels_last(value)
    if counts - {step}:
        raise CheckpointError(f"optax counts {sorted(counts)} differ from the optimizer step {step}")
    return counted_state(name, hyper, step, slots)


def to_training_checkpoint(model: Model, optimizer: nnx.Optimizer) -> Checkpoint:
    """Model tensors and optimizer state as one canonical checkpoint."""
    checkpoint = to_checkpoint(model)
    return Checkpoint.from_tensors(
        checkpoint.tensors, checkpoint.config, allow_nonfinite=True, optimizer=optimizer_state(model, optimizer)
    )


def from_training_checkpoint(checkpoint: Checkpoint, dtype="float32") -> tuple[Model, nnx.Optimizer]:
    """A train-mode model and its ``nnx.Optimizer`` with the checkpoint's state, ready for
    ``optimizer.update(model, grads)``. float64 needs JAX's 64-bit mode on, as ``from_checkpoint``."""
    state = checkpoint.optimizer
    if state is None:
        raise CheckpointError("the checkpoint holds no optimizer state (a weights-only checkpoint)")
    model = from_checkpoint(checkpoint, dtype)
    model.train()
    optimizer = make_optimizer(model, state.name, **state.hyper)
    specs = _trainable_paths(model)
    opt_state = nnx.state(optimizer)
    for path, variable in nnx.to_flat_state(opt_state):
        current = variable.get_value()
        if path == ("step",) or path[-1] == "count":
            variable.set_value(jnp.asarray(state.step or 0, current.dtype))
            continue
        field = next(i for i, key in enumerate(path) if key in OPTAX_SLOTS)
        spec = specs[tuple(path[field + 1 :])]
        if state.slots:
            value = rule(spec).to_channels_last(np.asarray(state.slots[OPTAX_SLOTS[path[field]]][spec.name]))
            variable.set_value(jnp.asarray(value, current.dtype))
    nnx.update(optimizer, opt_state)
    return model, optimizer


def save_training(model: Model, optimizer: nnx.Optimizer, path, *, force: bool = False) -> None:
    """Save model and optimizer state in the format named by ``path``; atomic, existing files kept
    unless ``force``."""
    if not isinstance(model, MODELS):
        raise CheckpointError(f"expected an impl_flax.AttentionUNet or MonaiAttentionUNet, got {type(model).__name__}")
    weights_convert.write(to_training_checkpoint(model, optimizer), path, force=force)


def load_training(path, *, dtype="float32", config=None) -> tuple[Model, nnx.Optimizer]:
    """(train-mode model, optimizer) from a training checkpoint in any format that holds one;
    ``config`` as in ``impl_flax.load`` (a file without one, say a MONAI model's ``.pt``, cannot
    tell its strides: a UserWarning says what was assumed otherwise)."""
    check_dtype(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_training_checkpoint(checkpoint, dtype)
