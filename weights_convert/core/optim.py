"""The one optimizer registry: every optimizer by name, each hyperparameter's default and check, each
optimizer's per-parameter slots, and the presets (named uses) that the project trains with.

The definitions are ``torch.optim``'s, written out in ``weights_convert.core.optimizer_state`` (with
where PyTorch, optax and Keras differ and how each maps onto them): ``sgd`` (momentum, nesterov, an
L2 ``weight_decay`` in the gradient), ``adam`` (an L2 ``weight_decay``) and ``adamw`` (decoupled
decay). ``DEFAULTS`` holds every hyperparameter of each, with the value a fresh optimizer of that
name gets; ``hyperparameters`` overrides and checks them; every framework's ``make_optimizer``
(``impl_<framework>.training``) takes its name and hyperparameters from here.

The presets are ``DEFAULTS`` with a few values set (``PRESETS``, ``preset(use, name)``):

- ``"parity"``: the parity checks' steps (each runner's ``train_step`` and ``fit``, the NumPy
  reference's): plain SGD (lr 0.1, no momentum) and Adam (lr 1e-3, eps 1e-5). ``OPTIMIZERS``.
- ``"train"``: ``attention-unet train`` from weights alone: parity's two, and AdamW with Adam's
  constants and its default decoupled weight decay 0.01.
- ``"resume"``: the training checkpoints of resume parity (``parity --resume-at``): every default,
  SGD with momentum 0.9, so that momentum buffers cross the framework boundary as well.

Adam's eps is 1e-5, not torch's default 1e-8: Adam's first step is lr * g / (|g| + eps), whose
sensitivity to g is lr / eps at g = 0. Parameters with an exactly zero gradient (conv biases in
front of a train-mode BatchNorm) carry float64 rounding noise of up to ~1e-14 in g, which
eps = 1e-8 amplifies 1e5-fold to ~1e-9: the step would then compare rounding noise, not
mathematics. With 1e-5 the amplification is 100, leaving the 1e-10 float64 bound meaningful, while
every term of the update (moments, bias corrections, eps placement) still matters. Keras adds eps
before the bias correction, so Keras runs ``impl_keras.TorchAdam``, torch's placement.
"""

from __future__ import annotations

import math

import numpy as np

from weights_convert.core.errors import CheckpointError, shown

_ADAM = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-5}

# Every hyperparameter of each optimizer, with the value a fresh optimizer of that name gets.
DEFAULTS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0, "decoupled_weight_decay": False},
    "adam": {**_ADAM, "weight_decay": 0.0, "decoupled_weight_decay": False},
    "adamw": {**_ADAM, "weight_decay": 0.01, "decoupled_weight_decay": True},
}
OPTIMIZER_NAMES = tuple(DEFAULTS)

# Use -> the optimizers it offers, each with what it changes from ``DEFAULTS`` (see the module doc).
PRESETS = {
    "parity": {"sgd": {"momentum": 0.0}, "adam": {}},
    "train": {"sgd": {"momentum": 0.0}, "adam": {}, "adamw": {}},
    "resume": {"sgd": {}, "adam": {}, "adamw": {}},
}


# hyperparameter -> (lowest, highest, whether the highest is allowed): what torch.optim accepts
# (``Invalid beta parameter`` and the like), checked on every read and every new optimizer, so no
# framework trains with a value torch would refuse (Flax would run b1 = 1 into NaN).
RANGES = {
    "lr": (0.0, float("inf"), False),
    "eps": (0.0, float("inf"), False),
    "b1": (0.0, 1.0, False),
    "b2": (0.0, 1.0, False),
    "momentum": (0.0, float("inf"), False),
    "weight_decay": (0.0, float("inf"), False),
}


class UnsupportedOptimizer(CheckpointError):
    """An optimizer or setting that a framework (or the canonical form) cannot express exactly."""


def slot_names(name: str, hyper: dict) -> tuple[str, ...]:
    """The per-parameter slots of optimizer ``name`` with ``hyper`` (torch's state keys)."""
    if name == "sgd":
        return ("momentum_buffer",) if hyper["momentum"] else ()
    return ("exp_avg", "exp_avg_sq")


def hyperparameters(name: str, **overrides) -> dict:
    """The full hyperparameters of ``name``: its ``DEFAULTS`` with ``overrides``, checked."""
    if name not in DEFAULTS:
        raise UnsupportedOptimizer(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, got {name!r}")
    unknown = sorted(set(overrides) - set(DEFAULTS[name]))
    if unknown:
        raise UnsupportedOptimizer(f"{name} has no hyperparameters {unknown}; it has {sorted(DEFAULTS[name])}")
    hyper = {**DEFAULTS[name], **overrides}
    check_hyper(name, hyper, "optimizer")
    return hyper


def check_hyper(name: str, hyper: dict, source: str) -> None:
    """A CheckpointError from ``source`` unless ``hyper`` is exactly the hyperparameters of known
    optimizer ``name``, flags true or false, numbers finite, in a combination the form has."""
    expected = DEFAULTS[name]
    if set(hyper) != set(expected):
        raise CheckpointError(
            f"{source}: {name} hyperparameters must be exactly {sorted(expected)}, got {sorted(hyper)}"
        )
    for key, value in hyper.items():
        is_flag = isinstance(expected[key], bool)
        if is_flag and not isinstance(value, bool):
            raise CheckpointError(f"{source}: {name} hyperparameter {key} must be true or false, got {value!r}")
        if not is_flag and (isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value)):
            raise CheckpointError(f"{source}: {name} hyperparameter {key} must be a finite number, got {shown(value)}")
    for key, (low, high, closed_high) in RANGES.items():
        if key in hyper and not (low <= hyper[key] and (hyper[key] <= high if closed_high else hyper[key] < high)):
            bound = f"[{low}, {high}]" if closed_high else f"[{low}, {high})"
            raise CheckpointError(f"{source}: {name} hyperparameter {key} must be in {bound}, got {hyper[key]!r}")
    if hyper["decoupled_weight_decay"] != (name == "adamw"):
        raise CheckpointError(f"{source}: decoupled_weight_decay is true for adamw alone, got {hyper}")
    if name == "sgd" and hyper["nesterov"] and not hyper["momentum"]:
        raise UnsupportedOptimizer(f"{source}: SGD with nesterov needs momentum > 0")


def _finite(value) -> bool:
    """Whether a number is a finite float64 (a 400-digit integer is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def preset(use: str, name: str) -> dict:
    """The full hyperparameters of optimizer ``name`` as ``use`` (a key of ``PRESETS``) runs it; a
    ValueError naming that use's optimizers otherwise."""
    offered = PRESETS[use]
    if name not in offered:
        raise ValueError(f"optimizer must be one of {sorted(offered)}, got {name!r}")
    return hyperparameters(name, **offered[name])


# The parity checks' optimizers (``preset("parity", name)``), as the NumPy reference and the tests read them.
OPTIMIZERS = {name: preset("parity", name) for name in PRESETS["parity"]}


def check_optimizer(name: str) -> dict:
    """The hyperparameters of parity optimizer ``name``; a ValueError naming the choices otherwise."""
    return preset("parity", name)


def check_fit_batches(xs, targets):
    """``xs`` (steps, N, C, H, W) and ``targets`` (steps, N, out_channels, H, W) of a multi-step
    fit as numpy arrays (with a D before H for volumes), with the same number of steps, at least one."""
    xs, targets = np.asarray(xs), np.asarray(targets)
    if xs.ndim not in (5, 6) or targets.ndim != xs.ndim or len(xs) != len(targets) or len(xs) == 0:
        raise ValueError(
            f"expected xs (steps, N, C, H, W) and targets (steps, N, out_channels, H, W) with the same number "
            f"of steps (at least 1), got shapes {xs.shape} and {targets.shape}"
        )
    return xs, targets


def state_results(state) -> dict:
    """The optimizer quantities that a fit from a training checkpoint compares (``parity
    --resume-at``): ``<slot>/<parameter>`` for every slot of ``state`` (an ``OptimizerState``, slots
    in canonical layout), and ``optimizer/step`` for Adam and AdamW, whose bias correction counts
    the steps (SGD's update does not, and torch's SGD keeps no count)."""
    results = {
        f"{slot}/{name}": np.asarray(value) for slot, values in state.slots.items() for name, value in values.items()
    }
    if state.name != "sgd":
        results["optimizer/step"] = np.asarray(state.step, dtype=np.int64)
    return results


def check_training(checkpoint, optimizer: str, save_to=None) -> None:
    """What a runner's ``fit`` and a training loop (``core.data_parallel.starting_state``) check of
    the ``Checkpoint`` they start from: a training checkpoint's optimizer must be ``optimizer``, and
    ``save_to`` needs a training checkpoint (a ValueError saying what is wrong otherwise)."""
    state = checkpoint.optimizer
    if state is not None and state.name != optimizer:
        raise ValueError(f"the training checkpoint's optimizer is {state.name}, but the run names {optimizer}")
    if state is None and save_to is not None:
        raise ValueError("save_to saves a training checkpoint: the fit must start from one (with optimizer state)")
