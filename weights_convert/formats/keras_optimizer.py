"""The optimizer of a ``.keras`` training checkpoint (``keras_archive_format``) and its canonical
state (``weights_convert.core.optimizer_state``), both ways: the ``compile_config`` that names it and
its variables under ``optimizer/vars`` of the weights member.

A training checkpoint is the archive of a compiled model, as ``model.compile(optimizer=
impl_keras.training.make_optimizer(...), loss="mean_squared_error")``, training steps and
``model.save`` leave it: ``compile_config`` in ``config.json`` names the optimizer class
(``attention_unet>TorchSGD``, ``TorchAdam`` or ``TorchAdamW``) with its hyperparameters, and the
weights member holds its variables under ``optimizer/vars``: ``0`` the iteration count (the
canonical step; 0 where torch SGD kept none), ``1`` the learning rate (checked against the config
on reading), then the slots in ``model.trainable_variables`` order (the canonical order), one per
parameter for SGD's ``momentums`` (torch's ``momentum_buffer``), two interleaved for Adam's
``momentum`` and ``velocity`` (``exp_avg``, ``exp_avg_sq``), channels-last. The mapping is a copy.
``keras.saving.load_model`` restores the optimizer with the model, ready for the next step. A fresh
optimizer is written built, with zero slots, so Keras loads it without a warning; a root attribute
``OPTIMIZER_CHECKSUM_ATTR`` (SHA-256 of the optimizer variables; Keras ignores it) is written and
verified when present. Settings Keras cannot express (SGD or Adam with torch's L2 weight decay) are
refused before anything is written.

A ``.keras`` of a model that is not compiled, or compiled with any other optimizer (Keras' own SGD
or Adam, whose slots and eps differ from torch's, or a class this project does not define), reads
as weights only: its model is the same model, and its optimizer state has no canonical form to
carry. An ``attention_unet`` optimizer whose state cannot be mapped exactly (a learning-rate
schedule, clipping, EMA, gradient accumulation, amsgrad, a learning-rate variable that contradicts
the config, variables of the wrong count, shape or dtype) is refused in one line.
"""

from __future__ import annotations

import json

import numpy as np

from weights_convert.core.architectures import Config
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.keras_layout import PACKAGE, policy_dtype, stored_shape
from weights_convert.core.layouts import rule
from weights_convert.core.optimizer_state import (
    OptimizerState,
    UnsupportedOptimizer,
    counted_state,
    hyperparameters,
    slot_names,
)
from weights_convert.core.spec import ParamSpec, param_specs
from weights_convert.formats.keras_weights import dataset_value, optimizer_datasets, write_optimizer
from weights_convert.formats.safetensors_format import checksum

# Canonical optimizer -> (its impl_keras class, the module defining it, the name Keras gives it).
OPTIMIZER_CLASSES = {
    "sgd": ("TorchSGD", "impl_keras.training", "torch_sgd"),
    "adam": ("TorchAdam", "impl_keras.model", "torch_adam"),
    "adamw": ("TorchAdamW", "impl_keras.training", "torch_adam_w"),
}
# Each parameter's optimizer variables in Keras' order, as canonical slots (SGD without momentum
# has none).
KERAS_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq")}
# Every optimizer setting Keras serializes besides the hyperparameters, with the one value that
# keeps the update torch's; any other value has no canonical form.
PLAIN_SETTINGS = {
    "clipnorm": None,
    "global_clipnorm": None,
    "clipvalue": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
# Settings that matter only with use_ema (which must be false): not judged on reading.
EMA_DETAILS = ("ema_momentum", "ema_overwrite_frequency")
# compile_config beside the optimizer, as ``model.compile(optimizer, loss="mean_squared_error")``
# writes it under the TensorFlow backend.
COMPILE_SETTINGS = {
    "loss": "mean_squared_error",
    "loss_weights": None,
    "metrics": None,
    "weighted_metrics": None,
    "run_eagerly": False,
    "steps_per_execution": 1,
    "jit_compile": False,
}
OPTIMIZER_CHECKSUM_ATTR = "attention_unet_optimizer_sha256"


def compiled_optimizer(document: dict, path) -> tuple[str, dict] | None:
    """(canonical name, hyperparameters) of the ``attention_unet`` optimizer in ``compile_config``;
    None for a model that is not compiled or is compiled with any other optimizer (weights only)."""
    compiled = document.get("compile_config")
    optimizer = compiled.get("optimizer") if isinstance(compiled, dict) else None
    if not isinstance(optimizer, dict):
        return None
    names = {f"{PACKAGE}>{class_name}": name for name, (class_name, _, _) in OPTIMIZER_CLASSES.items()}
    name = names.get(optimizer.get("registered_name"))
    if name is None:
        return None
    settings = optimizer.get("config")
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: the compiled {optimizer['registered_name']} has no config object")
    source = f"{path}: {optimizer['registered_name']}"
    lr = settings.get("learning_rate")
    if isinstance(lr, bool) or not isinstance(lr, int | float):
        raise UnsupportedOptimizer(f"{source} has learning_rate {_shown(lr)}; only a constant one has a canonical form")
    changed = {
        key: settings.get(key, plain)
        for key, plain in PLAIN_SETTINGS.items()
        if key not in EMA_DETAILS and settings.get(key, plain) != plain
    }
    if settings.get("amsgrad"):
        changed["amsgrad"] = settings["amsgrad"]
    if changed:
        raise UnsupportedOptimizer(f"{source} with {_shown(changed)} has no canonical form")
    weight_decay = settings.get("weight_decay")
    if name != "adamw" and weight_decay:
        raise UnsupportedOptimizer(
            f"{source} with Keras' decoupled weight_decay={weight_decay!r} has no canonical form (torch's is L2)"
        )
    try:
        if name == "sgd":
            hyper = {"momentum": settings["momentum"], "nesterov": settings["nesterov"]}
        else:
            hyper = {"b1": settings["beta_1"], "b2": settings["beta_2"], "eps": settings["epsilon"]}
            if name == "adamw":
                hyper["weight_decay"] = weight_decay
    except KeyError as missing:
        raise CheckpointError(f"{source}: its config has no {missing}") from None
    hyper = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in hyper.items()}
    try:
        return name, hyperparameters(name, lr=float(lr), **hyper)
    except CheckpointError as error:
        raise type(error)(f"{source}: {error}") from None


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _optimizer_shapes(name: str, hyper: dict, specs: list[ParamSpec]) -> list[tuple[int, ...]]:
    """The shape of every optimizer variable, in Keras' order."""
    per_parameter = len(slot_names(name, hyper))
    return [(), (), *(stored_shape(spec) for spec in specs for _ in range(per_parameter))]


def read_optimizer(f, source: str, config: Config, name: str, hyper: dict) -> OptimizerState:
    """The canonical state from ``optimizer/vars`` of the compiled optimizer ``name``."""
    specs = [spec for spec in param_specs(config) if not spec.is_buffer]
    datasets = optimizer_datasets(f, source, _optimizer_shapes(name, hyper, specs))
    if datasets is None:
        raise CheckpointError(f"{source}: the model is compiled with {name} but holds no optimizer variables")
    values = [dataset_value(dataset) for dataset in datasets]
    expected_checksum = f.attrs.get(OPTIMIZER_CHECKSUM_ATTR)
    if isinstance(expected_checksum, bytes):
        expected_checksum = expected_checksum.decode("ascii", "replace")
    if expected_checksum is not None and not isinstance(expected_checksum, str):
        raise CheckpointError(f"{source}: the checksum attribute {OPTIMIZER_CHECKSUM_ATTR!r} is not one string")
    if expected_checksum is not None and expected_checksum != optimizer_checksum(values):
        raise CheckpointError(f"{source}: corrupt: the optimizer variables do not match the checksum in its attributes")
    step, lr = int(values[0]), values[1]
    if lr.dtype == np.float32:
        # Keras' get_config reads a float32 learning-rate variable back rounded (1e-3 as
        # 0.0010000000474974513); the shortest decimal that rounds to it is the value it stands for,
        # as impl_keras.training reads it.
        hyper = {**hyper, "lr": float(str(np.float32(hyper["lr"])))}
    if lr != np.asarray(hyper["lr"]).astype(lr.dtype):
        raise CheckpointError(
            f"{source}: the learning-rate variable holds {lr.item()!r}, the compiled optimizer {hyper['lr']!r}"
        )
    if step < 0:
        raise CheckpointError(f"{source}: the optimizer's iteration count is {step}")
    slots: dict[str, dict[str, np.ndarray]] = {slot: {} for slot in slot_names(name, hyper)}
    if len(values) > 2:
        order = [slot for slot in KERAS_SLOTS[name] if slot in slots]
        for index, value in enumerate(values[2:]):
            spec = specs[index // len(order)]
            slots[order[index % len(order)]][spec.name] = rule(spec).from_channels_last(value)
    return counted_state(name, hyper, step, slots if len(values) > 2 else {})


def optimizer_checksum(values: list[np.ndarray]) -> str:
    return checksum({f"{i:06d}": value for i, value in enumerate(values)})


def check_expressible(state: OptimizerState) -> None:
    """Refuse, in one line, a setting Keras cannot express: torch's L2 weight decay (SGD, Adam)."""
    if state.hyper["weight_decay"] and not state.hyper["decoupled_weight_decay"]:
        raise UnsupportedOptimizer(
            f"Keras cannot express {state.name} with weight_decay={state.hyper['weight_decay']}: torch adds it to "
            f"the gradient (L2), Keras' weight_decay is always decoupled; write .safetensors, .pt, .msgpack or .orbax"
        )


def compile_config(checkpoint: Checkpoint) -> dict:
    """``compile_config`` as ``model.compile(optimizer=impl_keras.training.make_optimizer(...),
    loss="mean_squared_error")`` and ``model.save`` write it: the optimizer as Keras serializes the
    registered class (its ``get_config``, the learning rate as its variable holds it), then the
    compile settings."""
    state = checkpoint.optimizer
    check_expressible(state)
    class_name, module, keras_name = OPTIMIZER_CLASSES[state.name]
    hyper = state.hyper
    lr = float(keras_learning_rate(hyper["lr"], checkpoint))
    settings = {"name": keras_name, "learning_rate": lr, "weight_decay": None, **PLAIN_SETTINGS}
    if state.name == "sgd":
        settings.update(momentum=hyper["momentum"], nesterov=hyper["nesterov"])
    else:
        if state.name == "adamw":
            settings["weight_decay"] = hyper["weight_decay"]
        settings.update(beta_1=hyper["b1"], beta_2=hyper["b2"], epsilon=hyper["eps"], amsgrad=False)
    optimizer = {
        "module": module,
        "class_name": class_name,
        "config": settings,
        "registered_name": f"{PACKAGE}>{class_name}",
    }
    return {"optimizer": optimizer, **COMPILE_SETTINGS}


def optimizer_variables(checkpoint: Checkpoint) -> list[np.ndarray]:
    """The optimizer's variables in Keras' order: iterations (int64, as under TensorFlow), the
    learning rate (float64 in a float64 model, else float32: Keras' floatx), then each parameter's
    slots channels-last in their own dtype; zeros for a fresh optimizer, as ``optimizer.build``
    makes them."""
    state = checkpoint.optimizer
    check_expressible(state)
    variables = [np.asarray(state.step or 0, np.int64), keras_learning_rate(state.hyper["lr"], checkpoint)]
    order = [slot for slot in KERAS_SLOTS[state.name] if slot in slot_names(state.name, state.hyper)]
    for spec in param_specs(checkpoint.config):
        if spec.is_buffer:
            continue
        for slot in order:
            value = state.slots[slot][spec.name] if state.slots else np.zeros_like(checkpoint.tensors[spec.name])
            variables.append(rule(spec).to_channels_last(np.asarray(value)))
    return variables


def keras_learning_rate(lr: float, checkpoint: Checkpoint) -> np.ndarray:
    """The learning-rate variable Keras keeps for ``lr``: float64 in a float64 model, else float32
    (its ``floatx``), read back as the shortest decimal that rounds to it (``read_optimizer``). A
    learning rate that this does not give back exactly cannot be held by such a model: refused."""
    if policy_dtype(checkpoint) == "float64":
        return np.asarray(lr, np.float64)
    variable = np.asarray(lr, np.float32)
    if float(str(variable[()])) != lr:
        raise UnsupportedOptimizer(
            f"a {policy_dtype(checkpoint)} Keras model keeps the learning rate in float32, which cannot hold "
            f"lr={lr!r} (it reads back as {float(str(variable[()]))!r}); write .safetensors, .pt, .msgpack or .orbax"
        )
    return variable


def write_variables(f, checkpoint: Checkpoint, variables: list[np.ndarray]) -> None:
    """The group ``optimizer/vars`` of ``optimizer_variables`` in an open weights file, named as Keras
    names the optimizer, and their checksum attribute."""
    write_optimizer(f, OPTIMIZER_CLASSES[checkpoint.optimizer.name][2], variables)
    f.attrs[OPTIMIZER_CHECKSUM_ATTR] = optimizer_checksum(variables)
