"""The canonical optimizer state of a training checkpoint: the optimizer's name, its hyperparameters,
the step count and every per-parameter slot under the parameter's canonical name.

The canonical definitions are ``torch.optim``'s (with ``dampening=0``, ``maximize=False`` and
``amsgrad=False``), so a slot's meaning is the torch one and its name the torch state key:

- ``sgd``: ``momentum_buffer`` when ``momentum > 0``. With gradient g (plus ``weight_decay * p``,
  an L2 term in the gradient): ``buf = momentum * buf + g`` (``buf = g`` at the first step, the same
  thing from a zero buffer), then ``p -= lr * buf``, or with nesterov ``p -= lr * (g + momentum * buf)``.
- ``adam``: ``exp_avg`` and ``exp_avg_sq``; ``weight_decay`` is an L2 term in the gradient.
  ``p -= lr / (1 - b1**t) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - b2**t) + eps)``.
- ``adamw``: Adam's update after the decoupled decay ``p *= 1 - lr * weight_decay``.

In a file the slots are tensors ``optimizer/<slot>/<canonical parameter name>`` in the parameter's
canonical layout (OIHW kernels), and the rest is ``OptimizerState.header()``, a small JSON object.
A fresh optimizer (step 0) has no slots (``fresh_state``). ``FRAMEWORK_DIFFERENCES`` lists where
PyTorch, optax and Keras differ from one another and how each maps onto this form;
``UnsupportedOptimizer`` refuses, in one line, a setting a framework cannot express. The names,
hyperparameters, their checks and the slot names are the registry's (``weights_convert.core.optim``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from weights_convert.core.errors import CheckpointError, shown
from weights_convert.core.optim import (
    DEFAULTS,
    OPTIMIZER_NAMES,
    UnsupportedOptimizer,
    check_hyper,
    hyperparameters,
    preset,
    slot_names,
)
from weights_convert.core.spec import ModelConfig, capped, param_specs

# The largest step count every format holds exactly: torch keeps Adam's step in a float32 tensor
# (exact integers up to 2**24), msgpack and Orbax in int32, Keras in int64. A step beyond it is
# refused on reading, so that nothing is read that a conversion could not write back exactly.
MAX_STEP = 2**24

# The optimizer registry's names (``weights_convert.core.optim``) that readers of a state use with it.
__all__ = [
    "DEFAULTS",
    "FRAMEWORK_DIFFERENCES",
    "OPTIMIZER_NAMES",
    "PREFIX",
    "OptimizerState",
    "UnsupportedOptimizer",
    "counted_state",
    "fresh_state",
    "hyperparameters",
    "reference_step",
    "slot_names",
    "split_tensors",
]

PREFIX = "optimizer/"

# Where the frameworks differ, and how each one is mapped onto the canonical (torch) definitions.
# (topic, PyTorch, optax / Flax NNX, Keras 3, what the mapping does)
FRAMEWORK_DIFFERENCES = (
    (
        "Adam eps placement",
        "m_hat / (sqrt(v_hat) + eps)",
        "same (eps_root=0)",
        "keras.optimizers.Adam adds eps to sqrt(v) before the bias correction",
        "Keras runs impl_keras.TorchAdam (torch's placement); eps is stored as is",
    ),
    (
        "Adam bias correction",
        "1 - b^t with t the step count, kept per parameter as 'step'",
        "1 - b^t with t the ScaleByAdamState count",
        "1 - b^t with t = iterations + 1",
        "the canonical step is t after the last step; every count is set from it",
    ),
    (
        "AdamW decay",
        "p *= 1 - lr * weight_decay (scaled by lr), before the Adam step",
        "optax.adamw adds weight_decay * p to the update, then scales by lr: the same",
        "Adam(weight_decay=...) subtracts lr * weight_decay * p (scaled by lr): the same",
        "stored as weight_decay with decoupled_weight_decay=true",
    ),
    (
        "Adam / SGD weight decay (L2)",
        "weight_decay * p added to the gradient",
        "optax.add_decayed_weights before the optimizer: the same",
        "weight_decay is always decoupled: torch's L2 term cannot be expressed",
        "Keras refuses adam or sgd with weight_decay > 0",
    ),
    (
        "SGD first momentum step",
        "momentum_buffer is absent before the first step, then buf = g",
        "optax.trace starts at zeros: mu * 0 + g = g, the same",
        "momentums start at zeros: the same",
        "no slots at step 0; a present buffer is carried as is",
    ),
    (
        "SGD momentum convention",
        "buf = mu * buf + (1 - dampening) * g; p -= lr * buf",
        "trace = mu * trace + g; p -= lr * trace (no dampening)",
        "keras.optimizers.SGD: m = mu * m - lr * g; p += m (its momentums hold -lr * buf); "
        "impl_keras.TorchSGD: torch's update, its momentums hold buf",
        "dampening must be 0; Keras runs impl_keras.TorchSGD, whose momentums (what a .keras file holds) are "
        "momentum_buffer, copied",
    ),
    (
        "SGD nesterov",
        "p -= lr * (g + mu * buf)",
        "optax.trace(nesterov=True): the same",
        "keras.optimizers.SGD: p += mu * m - lr * g, the same with m = -lr * buf; impl_keras.TorchSGD: torch's",
        "nesterov carried as a flag",
    ),
    (
        "step count",
        "SGD keeps none; Adam keeps 'step' per parameter",
        "nnx.Optimizer.step, and Adam's own count",
        "optimizer.iterations",
        "null when torch SGD ran it; Flax and Keras then count from 0, and their non-zero SGD momentum at "
        "step 0 reads back as null",
    ),
)


@dataclasses.dataclass
class OptimizerState:
    """One optimizer's state: ``name`` (sgd, adam, adamw), ``hyper`` (every key of ``DEFAULTS[name]``),
    ``step`` (completed steps; None where torch SGD, which counts none, ran it) and ``slots``
    (slot -> canonical parameter name -> array in canonical layout; empty for a fresh optimizer)."""

    name: str
    hyper: dict
    step: int | None
    slots: dict[str, dict[str, np.ndarray]]

    def tensors(self) -> dict[str, np.ndarray]:
        """``optimizer/<slot>/<parameter>`` -> array, slot by slot in ``state_dict`` order."""
        return {
            f"{PREFIX}{slot}/{param}": value for slot, values in self.slots.items() for param, value in values.items()
        }

    def header(self) -> dict:
        """Everything but the slots, as JSON-ready data."""
        return {"name": self.name, "hyper": dict(self.hyper), "step": self.step}

    @classmethod
    def from_parts(cls, header, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> OptimizerState:
        """From ``header()`` (a dict or its JSON text) and the ``optimizer/...`` tensors; not yet
        checked against a config (``check`` does that)."""
        if isinstance(header, str):
            try:
                header = json.loads(header)
            except (ValueError, RecursionError) as error:
                reason = "nested too deep" if isinstance(error, RecursionError) else error
                raise CheckpointError(f"{source}: the optimizer metadata is not JSON ({reason})") from None
        if not (isinstance(header, dict) and set(header) == {"name", "hyper", "step"}):
            raise CheckpointError(f"{source}: the optimizer metadata must be an object with name, hyper and step")
        slots: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            slot, _, param = key[len(PREFIX) :].partition("/")
            if not key.startswith(PREFIX) or not slot or not param:
                raise CheckpointError(f"{source}: {key!r} is not an optimizer/<slot>/<parameter> tensor")
            slots.setdefault(slot, {})[param] = value
        return cls(header["name"], header["hyper"], header["step"], slots)

    def check(self, config: ModelConfig, *, allow_nonfinite: bool = False, source: str = "checkpoint") -> None:
        """Raise one CheckpointError for an unknown optimizer, wrong hyperparameters or step, or slots
        that are not exactly ``slot_names`` x every trainable tensor, in its shape, floating (finite
        unless ``allow_nonfinite``)."""
        if not isinstance(self.name, str) or self.name not in DEFAULTS:
            raise CheckpointError(f"{source}: unknown optimizer {shown(self.name)}; expected one of {OPTIMIZER_NAMES}")
        if not isinstance(self.hyper, dict):
            raise CheckpointError(f"{source}: the {self.name} hyperparameters are not a map")
        check_hyper(self.name, self.hyper, source)
        if self.step is not None and (
            isinstance(self.step, bool) or not isinstance(self.step, int) or not 0 <= self.step <= MAX_STEP
        ):
            raise CheckpointError(
                f"{source}: the optimizer step must be an integer from 0 to {MAX_STEP}, got {shown(self.step)}"
            )
        if self.step is None and self.name != "sgd":
            raise CheckpointError(f"{source}: {self.name} needs its step count (bias correction), got none")
        expected = slot_names(self.name, self.hyper)
        if not self.slots:
            if self.step and expected:  # plain SGD (momentum 0) has no slots at any step
                raise CheckpointError(f"{source}: the optimizer is at step {self.step} but has no {expected} slots")
            return
        if set(self.slots) != set(expected):
            raise CheckpointError(
                f"{source}: {self.name} slots must be {list(expected)}, got {capped(sorted(self.slots))}"
            )
        if self.step == 0:
            raise CheckpointError(f"{source}: the optimizer is at step 0 but holds slots")
        shapes = {p.name: p.shape for p in param_specs(config) if not p.is_buffer}
        problems = []
        for slot in expected:
            values = self.slots[slot]
            missing, unexpected = sorted(set(shapes) - set(values)), sorted(set(values) - set(shapes))
            if missing:
                problems.append(f"{slot} misses {capped(missing)}")
            if unexpected:
                problems.append(f"{slot} has unexpected {capped(unexpected)}")
            for param in sorted(set(shapes) & set(values)):
                array = np.asarray(values[param])
                if array.shape != shapes[param]:
                    problems.append(f"{PREFIX}{slot}/{param} has shape {array.shape} (expected {shapes[param]})")
                elif not (array.dtype.kind == "f" or str(array.dtype) == "bfloat16"):
                    problems.append(f"{PREFIX}{slot}/{param} is {array.dtype} (expected floating)")
                elif not allow_nonfinite and not np.isfinite(array.astype(np.float64)).all():
                    problems.append(f"{PREFIX}{slot}/{param} holds NaN or inf (pass --allow-nonfinite to accept)")
        if problems:
            listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise CheckpointError(f"{source}: optimizer state: {listed}")

    def ordered(self, config: ModelConfig) -> OptimizerState:
        """The slots in ``slot_names`` order, each in ``state_dict`` order, as numpy arrays."""
        trainable = [p.name for p in param_specs(config) if not p.is_buffer]
        slots = {
            slot: {param: np.asarray(self.slots[slot][param]) for param in trainable}
            for slot in slot_names(self.name, self.hyper)
            if self.slots
        }
        return OptimizerState(self.name, dict(self.hyper), self.step, slots)

    def astype(self, dtype) -> OptimizerState:
        """Every slot cast to ``dtype``."""
        slots = {
            slot: {k: np.asarray(v).astype(dtype) for k, v in values.items()} for slot, values in self.slots.items()
        }
        return OptimizerState(self.name, dict(self.hyper), self.step, slots)

    def describe(self) -> str:
        """One line: name, hyperparameters and step."""
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        step = "unknown (torch SGD counts none)" if self.step is None else self.step
        return (
            f"{self.name} ({hyper}), step {step}, slots {list(slot_names(self.name, self.hyper)) if self.slots else []}"
        )


def stored_hyperparameter(value, flag: bool, what: str, source: str) -> bool | float:
    """A hyperparameter as a format stored it (a scalar array or number) -> bool or float, exactly:
    a flag must be stored as a boolean and a number as a number; no string or other kind is
    coerced (``"false"`` is not False), so every format reads what ``.safetensors`` reads."""
    array = np.asarray(value) if isinstance(value, np.ndarray | np.generic | bool | int | float) else None
    if array is None or array.shape != () or array.dtype.kind not in ("b" if flag else "iuf"):
        expected = "true or false" if flag else "a number"
        raise CheckpointError(f"{source}: hyperparameter {what} must be {expected}, got {shown(value)}")
    return bool(array) if flag else float(array)


def stored_step(value, source: str) -> int:
    """A step count as a format stored it (an integer, or the integral float torch keeps) -> int;
    a CheckpointError for anything else (NaN, inf, 3.7, several values, a negative count)."""
    array = np.asarray(value) if isinstance(value, np.ndarray | np.generic | int | float) else None
    if array is None or array.size != 1 or array.dtype.kind not in "iuf" or isinstance(value, bool):
        raise CheckpointError(f"{source}: the optimizer step must be one integer, got {shown(value)}")
    number = array.reshape(()).item()
    if not (isinstance(number, int) or (np.isfinite(number) and float(number).is_integer())):
        raise CheckpointError(f"{source}: the optimizer step must be one integer, got {shown(number)}")
    if not 0 <= int(number) <= MAX_STEP:
        raise CheckpointError(
            f"{source}: the optimizer step must be an integer from 0 to {MAX_STEP}, got {int(number)}"
        )
    return int(number)


def fresh_state(use: str, name: str) -> OptimizerState:
    """A fresh optimizer ``name`` (step 0, no slots) with the hyperparameters that preset ``use``
    gives it (``weights_convert.core.optim.preset``)."""
    return OptimizerState(name, preset(use, name), 0, {})


def counted_state(name: str, hyper: dict, step: int, slots: dict) -> OptimizerState:
    """The canonical state of a framework that always has a count and slots (optax, Keras): slots
    dropped at step 0, where they are the zeros of a fresh optimizer, except non-zero SGD momentum
    at step 0, which is torch SGD's momentum without a count carried through (step None)."""
    if step == 0 and name == "sgd" and any(np.any(v) for values in slots.values() for v in values.values()):
        return OptimizerState(name, hyper, None, slots)
    return OptimizerState(name, hyper, step, slots if step else {})


def split_tensors(tensors: dict) -> tuple[dict, dict]:
    """(model tensors, ``optimizer/...`` tensors) of one flat map."""
    optimizer = {k: v for k, v in tensors.items() if isinstance(k, str) and k.startswith(PREFIX)}
    return {k: v for k, v in tensors.items() if k not in optimizer}, optimizer


def reference_step(params: dict, grads: dict, state: OptimizerState) -> tuple[dict, OptimizerState]:
    """One step of the canonical definitions in NumPy: (new parameters, new state). The state's slots
    start at zeros when it has none; ``step`` None counts as 0."""
    hyper, name = state.hyper, state.name
    t = (state.step or 0) + 1
    lr, wd = hyper["lr"], hyper["weight_decay"]
    slots = {s: dict(state.slots.get(s, {})) for s in slot_names(name, hyper)}
    new = {}
    for key, p in params.items():
        g = grads[key] + wd * p if (wd and not hyper["decoupled_weight_decay"]) else grads[key]
        if name == "sgd":
            if hyper["momentum"]:
                buf = hyper["momentum"] * slots["momentum_buffer"].get(key, np.zeros_like(p)) + g
                slots["momentum_buffer"][key] = buf
                g = g + hyper["momentum"] * buf if hyper["nesterov"] else buf
            new[key] = p - lr * g
            continue
        if hyper["decoupled_weight_decay"]:
            p = p * (1 - lr * wd)
        b1, b2 = hyper["b1"], hyper["b2"]
        m = b1 * slots["exp_avg"].get(key, np.zeros_like(p)) + (1 - b1) * g
        v = b2 * slots["exp_avg_sq"].get(key, np.zeros_like(p)) + (1 - b2) * (g * g)
        slots["exp_avg"][key], slots["exp_avg_sq"][key] = m, v
        new[key] = p - lr / (1 - b1**t) * (m / (np.sqrt(v) / np.sqrt(1 - b2**t) + hyper["eps"]))
    return new, OptimizerState(name, dict(hyper), t, slots)
