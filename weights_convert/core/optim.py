"""The optimizer steps every implementation takes in the parity checks: plain SGD, and Adam with
PyTorch's definition (eps added to the bias-corrected sqrt(v); Keras adds it before the bias
correction, so its runner converts eps to take the same step).

Adam's eps is 1e-5, not torch's default 1e-8: Adam's first step is lr * g / (|g| + eps), whose
sensitivity to g is lr / eps at g = 0. Parameters with an exactly zero gradient (conv biases in
front of a train-mode BatchNorm) carry float64 rounding noise of up to ~1e-14 in g, which
eps = 1e-8 amplifies 1e5-fold to ~1e-9: the step would then compare rounding noise, not
mathematics. With 1e-5 the amplification is 100, leaving the 1e-10 float64 bound meaningful, while
every term of the update (moments, bias corrections, eps placement) still matters.
"""

import numpy as np

OPTIMIZERS = {
    "sgd": {"lr": 0.1},
    "adam": {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-5},
}


def check_optimizer(name: str) -> dict:
    """The hyperparameters of optimizer ``name``; a ValueError naming the choices otherwise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def check_fit_batches(xs, targets):
    """``xs`` (steps, N, C, H, W) and ``targets`` (steps, N, out_channels, H, W) of a multi-step
    fit as numpy arrays, with the same number of steps, at least one."""
    xs, targets = np.asarray(xs), np.asarray(targets)
    if xs.ndim != 5 or targets.ndim != 5 or len(xs) != len(targets) or len(xs) == 0:
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
