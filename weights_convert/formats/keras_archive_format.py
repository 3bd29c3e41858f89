"""Keras 3 ``.keras`` archive of ``impl_keras.AttentionUNet``, read and written with zipfile, json
and h5py alone: ``config.json`` holds the model's class and hyperparameters (so the config travels
with the weights), ``metadata.json`` the Keras version, ``model.weights.h5`` the variables in the
layout of ``keras_h5_format``. Written as ``model.save`` writes it (stored, uncompressed members),
so the file loads with ``keras.saving.load_model(path)`` (safe mode included) once ``impl_keras``
is imported.

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

Reading builds nothing and runs nothing: ``config.json`` is parsed as JSON and must name
``impl_keras.AttentionUNet``; any other class (a ``Lambda`` layer, an unregistered class, another
model) is refused by name. The weights member is read into memory (never extracted to disk), with
its CRC-32 checked, after its declared size is checked against the claimed config; every dataset's
declared shape is then checked against that config's parameter table before any data is read, so
a config that contradicts the weights costs nothing. Member names that would escape a directory
are refused.
"""

from __future__ import annotations

import datetime
import io
import json
import zipfile

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.layouts import rule
from weights_convert.core.optimizer_state import (
    OptimizerState,
    UnsupportedOptimizer,
    counted_state,
    hyperparameters,
    slot_names,
)
from weights_convert.core.spec import ModelConfig, ParamSpec, param_specs
from weights_convert.formats.keras_h5_format import (
    MAX_EXPANSION,
    MODEL_NAME,
    dataset_value,
    optimizer_datasets,
    read_weights,
    stored_shape,
    write_optimizer,
    write_weights,
)
from weights_convert.formats.safetensors_format import checksum
from weights_convert.formats.vetting import one_line

# The weights member keeps each tensor's dtype (the config's dtype policy holds them all exactly).
KEEPS_MIXED_DTYPES = True
# A compiled model's archive holds its optimizer's variables (see the module docstring).
HOLDS_OPTIMIZER = True
CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
WEIGHTS_MEMBER = "model.weights.h5"
# How impl_keras registers the model (``keras.saving.register_keras_serializable(package=...)``).
MODULE = "impl_keras.model"
CLASS_NAME = "AttentionUNet"
PACKAGE = "attention_unet"
REGISTERED_NAME = f"{PACKAGE}>{CLASS_NAME}"
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
# The Keras release whose archive layout this is, written when Keras itself is not installed.
KERAS_VERSION = "3.0.0"
# A JSON member larger than this is not a config of this model (one is about 500 bytes).
MAX_JSON_BYTES = 1 << 20
# Room in the weights member beyond four float64 copies of the parameters (the weights and an
# optimizer's slots): HDF5 headers and groups, about 1 KiB per dataset.
WEIGHTS_OVERHEAD_BYTES = 1 << 20
WEIGHTS_OVERHEAD_PER_TENSOR = 4096


def read(path) -> tuple[dict[str, np.ndarray], ModelConfig, OptimizerState | None]:
    import h5py

    if not zipfile.is_zipfile(str(path)):
        raise CheckpointError(f"{path}: not a Keras .keras archive (not a zip file)")
    try:
        with zipfile.ZipFile(str(path)) as archive:
            members = _members(archive, path)
            document = _json_member(archive, members, CONFIG_MEMBER, path)
            config = _model_config(document, path)
            compiled = _compiled_optimizer(document, path)
            weights = _weights_member(archive, members, config, path)
        with h5py.File(io.BytesIO(weights), "r") as f:
            source = f"{path}: {WEIGHTS_MEMBER}"
            tensors = read_weights(f, source, config)
            optimizer = None if compiled is None else _read_optimizer(f, source, config, *compiled)
    except CheckpointError:
        raise
    except Exception as error:  # zipfile and h5py raise BadZipFile, OSError, KeyError, ... on damage
        raise CheckpointError(f"{path}: not a readable Keras .keras archive ({one_line(error)[:200]})") from None
    return tensors, config, optimizer


def _compiled_optimizer(document: dict, path) -> tuple[str, dict] | None:
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


def _read_optimizer(f, source: str, config: ModelConfig, name: str, hyper: dict) -> OptimizerState:
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
    if expected_checksum is not None and expected_checksum != _checksum(values):
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


def _checksum(values: list[np.ndarray]) -> str:
    return checksum({f"{i:06d}": value for i, value in enumerate(values)})


def _members(archive: zipfile.ZipFile, path) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name; a name that would escape a directory, or one that occurs
    twice, is refused."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise CheckpointError(f"{path}: refused: the member name {name!r} points outside the archive")
        if name in members:
            raise CheckpointError(f"{path}: refused: the member {name!r} occurs twice")
        members[name] = info
    return members


def _json_member(archive: zipfile.ZipFile, members: dict, name: str, path):
    info = members.get(name)
    if info is None:
        raise CheckpointError(f"{path}: not a Keras .keras archive (no {name})")
    if info.file_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {name} declares {info.file_size} bytes; a model config is far smaller")
    try:
        return json.loads(archive.read(info))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {name} is not JSON ({one_line(error)[:200]})") from None


def _model_config(document, path) -> ModelConfig:
    """The ``ModelConfig`` in ``config.json``, which must describe an ``impl_keras.AttentionUNet``."""
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: {CONFIG_MEMBER} holds a {type(document).__name__}, not a model config")
    if document.get("registered_name") != REGISTERED_NAME or document.get("class_name") != CLASS_NAME:
        top, *inner = _class_names(document) or ["no class"]
        naming = f" (naming {', '.join(inner[:10])}{f' and {len(inner) - 10} more' if len(inner) > 10 else ''})"
        raise CheckpointError(f"{path}: holds a {top}{naming if inner else ''}, not an impl_keras.AttentionUNet")
    config = document.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {CONFIG_MEMBER} has no config object")
    try:
        return ModelConfig.from_dict({k: config[k] for k in ("in_channels", "out_channels", "channels") if k in config})
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: bad config in {CONFIG_MEMBER}: {one_line(error)[:200]}") from None


def _class_names(node, found=None) -> list[str]:
    """Every class a Keras config names (its registered name where it has one), in order, once."""
    found = [] if found is None else found
    if isinstance(node, dict):
        name = node.get("registered_name") or node.get("class_name")
        if isinstance(name, str) and "class_name" in node and name not in found:
            found.append(name)
        for value in node.values():
            _class_names(value, found)
    elif isinstance(node, list):
        for value in node:
            _class_names(value, found)
    return found


def _weights_member(archive: zipfile.ZipFile, members: dict, config: ModelConfig, path) -> bytes:
    """The weights member's bytes (CRC-32 checked), refused first if it declares more than the
    claimed config can need or more than its compressed bytes can hold."""
    info = members.get(WEIGHTS_MEMBER)
    if info is None:
        raise CheckpointError(f"{path}: not a Keras .keras archive of this model (no {WEIGHTS_MEMBER})")
    specs = param_specs(config)
    elements = sum(int(np.prod(spec.shape, dtype=object)) for spec in specs)
    budget = 4 * 8 * elements + WEIGHTS_OVERHEAD_BYTES + WEIGHTS_OVERHEAD_PER_TENSOR * len(specs)
    compressed_limit = (
        info.compress_size if info.compress_type == zipfile.ZIP_STORED else MAX_EXPANSION * info.compress_size
    )
    if info.file_size > budget or info.file_size > compressed_limit:
        raise CheckpointError(
            f"{path}: {WEIGHTS_MEMBER} declares {info.file_size} bytes, more than the config "
            f"{config.to_dict()} needs ({budget}) or its {info.compress_size} stored bytes can hold"
        )
    return archive.read(info)


def write(checkpoint: Checkpoint, path) -> None:
    import h5py

    variables = None if checkpoint.optimizer is None else optimizer_variables(checkpoint)
    weights = io.BytesIO()
    with h5py.File(weights, "w") as f:
        write_weights(f, checkpoint)
        if variables is not None:
            write_optimizer(f, OPTIMIZER_CLASSES[checkpoint.optimizer.name][2], variables)
            f.attrs[OPTIMIZER_CHECKSUM_ATTR] = _checksum(variables)
    with zipfile.ZipFile(str(path), "x") as archive:  # "x": never over an existing file
        archive.writestr(METADATA_MEMBER, json.dumps(metadata()))
        archive.writestr(CONFIG_MEMBER, json.dumps(model_config(checkpoint)))
        archive.writestr(WEIGHTS_MEMBER, weights.getvalue())


def metadata() -> dict:
    """``metadata.json`` as ``model.save`` writes it: the Keras version and the time of saving."""
    return {"keras_version": _keras_version(), "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}


def _keras_version() -> str:
    from importlib import metadata as package_metadata

    try:
        return package_metadata.version("keras")
    except package_metadata.PackageNotFoundError:
        return KERAS_VERSION


def model_config(checkpoint: Checkpoint) -> dict:
    """``config.json`` as ``model.save`` writes it for ``impl_keras.AttentionUNet``. The dtype
    policy is the tensors' float dtype; with mixed dtypes, the narrowest that holds every one
    exactly (Keras casts each tensor to it on loading; the weights keep their own dtypes)."""
    config = checkpoint.config
    return {
        "module": MODULE,
        "class_name": CLASS_NAME,
        "config": {
            "name": MODEL_NAME,
            "trainable": True,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": policy_dtype(checkpoint)},
                "registered_name": None,
            },
            **config.to_dict(),
        },
        "registered_name": REGISTERED_NAME,
        "build_config": {"input_shape": [None, None, None, config.in_channels]},
        "compile_config": {} if checkpoint.optimizer is None else compile_config(checkpoint),
    }


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
    (its ``floatx``), read back as the shortest decimal that rounds to it (``_read_optimizer``). A
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


def policy_dtype(checkpoint: Checkpoint) -> str:
    """The one float dtype of the tensors, or for mixed ones the narrowest holding each exactly:
    the widest present, float32 when the widest are float16 and bfloat16 together."""
    names = {v.dtype.name for v in checkpoint.tensors.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"}
    if len(names) == 1:
        return names.pop()
    widest = max(np.dtype(name).itemsize if name != "bfloat16" else 2 for name in names)
    return "float32" if widest == 2 else f"float{8 * widest}"
