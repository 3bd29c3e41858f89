"""Keras 3 ``.weights.h5``: what ``model.save_weights`` writes for ``impl_keras.AttentionUNet``,
read and written with h5py alone (no Keras, no TensorFlow; HDF5 datasets hold data, never code).

Keras writes one HDF5 group per layer at the layer's *attribute* path, a ``layers`` group for each
``keras.Sequential`` whose members are named after their class (``conv2d``, ``batch_norm``,
``re_lu``, then ``conv2d_1`` ...), and below each layer a ``vars`` group carrying the layer's
*name* as an attribute and its variables as datasets ``0``, ``1``, ... in creation order. The
layer names are the canonical module names and the creation order is the canonical leaf order, so
``keras_layers(config)`` (the model's layer tree, mirroring ``impl_keras/model.py`` class by class)
and the spec fix every dataset's path, shape and meaning: the file carries no config, it is
inferred from the declared shapes. A root attribute ``CHECKSUM_ATTR`` (SHA-256 of the canonical
tensors; Keras ignores it) is written, and verified when present, so flipped bytes in tensor data
are refused instead of loaded. Each dataset keeps its tensor's own dtype (bfloat16 as Keras stores
it: raw 16-bit words marked by a ``dtype`` attribute), so mixed dtypes are written exactly.

Reading looks only at the bytes of the file: every link is visited first and an external link,
a soft link, a dataset with external raw storage or a virtual dataset is refused, naming it. Every
declared shape and dtype is checked against the parameter table, and every dataset must store the
bytes it declares, before any data is read: memory stays within the file's own size (a compressed
dataset: ``MAX_EXPANSION`` times its stored bytes).

A ``.weights.h5`` is weights-only here. Keras' ``save_weights`` of a compiled, trained model does
store the optimizer's variables (group ``optimizer/vars``: iterations, learning rate, slots), but not
which optimizer made them nor its hyperparameters, so the slots have no meaning by themselves (a
momentum of Keras' SGD is ``-lr`` times torch's, Adam's eps sits elsewhere). Reading skips that
group (its links are still vetted) and writing a training checkpoint needs ``weights_only``; the
``.keras`` archive, whose ``config.json`` holds the compile config, carries the optimizer state
(``keras_archive_format``), and ``write_optimizer`` / ``optimizer_datasets`` here are its layout.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.layouts import module_path, rule
from weights_convert.core.spec import LEAVES, ModelConfig, ParamSpec, infer_config, param_specs
from weights_convert.formats.safetensors_format import checksum
from weights_convert.formats.vetting import one_line

CHECKSUM_ATTR = "attention_unet_sha256"
# Each dataset has its own dtype: a checkpoint mixing float dtypes is written exactly.
KEEPS_MIXED_DTYPES = True
# save_weights and save of a compiled, trained model also write the optimizer's variables under this
# group: ``optimizer/vars/0`` (iterations), ``1`` (learning rate), then the slots.
OPTIMIZER_GROUP = "optimizer"
OPTIMIZER_VARS = f"{OPTIMIZER_GROUP}/vars"
# The model's own ``vars`` group carries its name: Keras' default name for the class.
MODEL_NAME = "attention_u_net"
# A filtered (compressed) dataset may declare at most this many times its stored bytes: deflate,
# the strongest filter h5py ships, cannot expand data by more than about 1032 times.
MAX_EXPANSION = 1032
# How many names a refusal lists before "and N more".
LISTED = 10


def keras_path(spec: ParamSpec) -> str:
    """The Keras variable path of a canonical tensor, below the model's own name:
    ``e1.conv.conv.0.weight`` -> ``e1/conv/conv/0/kernel``."""
    return "/".join((*module_path(spec), rule(spec).keras))


# ----------------------------------------------------------------------------------------------
# The layer tree of impl_keras.AttentionUNet, as Keras' saving walks it


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One saveable of the model: its HDF5 group (``""`` for the model), its layer name (the
    ``vars`` group's ``name`` attribute) and the canonical module whose tensors it holds, if any."""

    path: str
    name: str
    module: str | None = None


def keras_layers(config: ModelConfig) -> list[KerasLayer]:
    """Every layer of ``impl_keras.AttentionUNet(config)`` with the group Keras saves it under."""
    layers = [KerasLayer("", MODEL_NAME)]
    for i in range(config.depth):
        layers += _encoder_block(f"e{i + 1}")
    layers += _conv_block("b1", "b1", "b1")
    for j in range(config.depth):
        layers += _decoder_block(f"d{j + 1}")
    layers.append(KerasLayer("head", "output", "output"))  # the attribute ``head``, named ``output``
    return layers


def _sequential(path: str, name: str, module: str, members) -> list[KerasLayer]:
    """A ``keras.Sequential`` and its members ``(Keras class, layer name, holds weights)``; Keras
    saves the members under ``layers/`` by snake-case class name, numbered from the second on."""
    layers = [KerasLayer(path, name)]
    used: dict[str, int] = {}
    for class_name, layer_name, holds_weights in members:
        count = used.get(class_name, -1) + 1
        used[class_name] = count
        group = class_name if count == 0 else f"{class_name}_{count}"
        layers.append(
            KerasLayer(f"{path}/layers/{group}", layer_name, f"{module}.{layer_name}" if holds_weights else None)
        )
    return layers


def _conv_block(path: str, name: str, module: str) -> list[KerasLayer]:
    """``ConvBlock``: a Sequential ``conv`` of Conv(0) BN(1) ReLU(2) Conv(3) BN(4) ReLU(5)."""
    members = (
        ("conv2d", "0", True),
        ("batch_norm", "1", True),
        ("re_lu", "2", False),
        ("conv2d", "3", True),
        ("batch_norm", "4", True),
        ("re_lu", "5", False),
    )
    return [KerasLayer(path, name), *_sequential(f"{path}/conv", "conv", f"{module}.conv", members)]


def _encoder_block(name: str) -> list[KerasLayer]:
    """``EncoderBlock``: ``conv`` (a ConvBlock) and ``pool``."""
    return [
        KerasLayer(name, name),
        *_conv_block(f"{name}/conv", "conv", f"{name}.conv"),
        KerasLayer(f"{name}/pool", "pool"),
    ]


def _attention_gate(path: str, module: str) -> list[KerasLayer]:
    """``AttentionGate``: Sequentials ``Wg`` and ``Ws`` (conv, BN), ``relu``, and the Sequential
    named ``output`` (conv, sigmoid) held as the attribute ``out``."""
    conv_bn = (("conv2d", "0", True), ("batch_norm", "1", True))
    return [
        KerasLayer(path, "ag"),
        *_sequential(f"{path}/Wg", "Wg", f"{module}.Wg", conv_bn),
        *_sequential(f"{path}/Ws", "Ws", f"{module}.Ws", conv_bn),
        KerasLayer(f"{path}/relu", "relu"),
        *_sequential(f"{path}/out", "output", f"{module}.output", (("conv2d", "0", True), ("activation", "1", False))),
    ]


def _decoder_block(name: str) -> list[KerasLayer]:
    """``DecoderBlock``: ``up``, ``ag`` (an AttentionGate) and ``c1`` (a ConvBlock)."""
    return [
        KerasLayer(name, name),
        KerasLayer(f"{name}/up", "up"),
        *_attention_gate(f"{name}/ag", f"{name}.ag"),
        *_conv_block(f"{name}/c1", "c1", f"{name}.c1"),
    ]


def dataset_paths(config: ModelConfig) -> dict[str, str]:
    """Canonical tensor name -> its HDF5 dataset (``e1/conv/conv/layers/conv2d/vars/0``), in
    ``state_dict`` order; the layer tree and the spec must name the same modules."""
    groups = {layer.module: layer.path for layer in keras_layers(config) if layer.module}
    specs = param_specs(config)
    if set(groups) != {spec.module for spec in specs}:
        raise AssertionError("the Keras layer tree and the parameter table name different modules")
    return {spec.name: f"{groups[spec.module]}/vars/{LEAVES[spec.layer].index(spec.leaf)}" for spec in specs}


def stored_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The shape Keras stores a canonical tensor in (conv kernels HWIO)."""
    return rule(spec).to_channels_last(np.broadcast_to(np.empty((), np.uint8), spec.shape)).shape


def canonical_shape(spec: ParamSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The canonical shape of a stored shape (a kernel that is not 4-D is left as it is)."""
    if len(shape) != len(spec.shape):
        return shape
    return rule(spec).from_channels_last(np.broadcast_to(np.empty((), np.uint8), shape)).shape


# ----------------------------------------------------------------------------------------------
# Reading


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import h5py

    try:
        with h5py.File(str(path), "r") as f:
            return read_weights(f, str(path)), None
    except CheckpointError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError, ... on damaged files
        raise CheckpointError(f"{path}: not a readable Keras .weights.h5 file ({one_line(error)[:200]})") from None


def read_weights(f, source: str, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The canonical tensors of an open Keras weights file ``f``, for ``config`` (inferred from
    the declared shapes when None). Every dataset is vetted before any data is read."""
    datasets = inventory(f, source)
    expected_checksum = _checksum_attribute(f, source)
    if config is None:
        config = _infer_config(f, datasets, source)
    elif config.depth > len(datasets):
        raise CheckpointError(
            f"{source}: the config claims {config.depth} levels but the weights file holds only "
            f"{len(datasets)} datasets"
        )
    paths = dataset_paths(config)
    _check_layout(datasets, paths, config, source)
    specs = {spec.name: spec for spec in param_specs(config)}
    tensors = {name: _canonical(specs[name], datasets[path]) for name, path in paths.items()}
    if expected_checksum is not None and expected_checksum != checksum(tensors):
        raise CheckpointError(f"{source}: corrupt: the tensor data does not match the checksum in its attributes")
    return tensors


def inventory(f, source: str) -> dict[str, object]:
    """Every dataset of ``f`` by path. Refuses anything that would read outside the file: an
    external or soft link, a dataset with external raw storage, a virtual dataset."""
    import h5py

    links: list = []
    f.visititems_links(lambda name, link: links.append((name, link)))  # collected, then judged
    datasets = {}
    for name, link in links:
        if isinstance(link, h5py.ExternalLink):
            raise CheckpointError(
                f"{source}: refused: {name!r} is an external link to {link.filename}:{link.path} (outside the file)"
            )
        if isinstance(link, h5py.SoftLink):
            raise CheckpointError(f"{source}: refused: {name!r} is a soft link to {link.path!r}")
        if not isinstance(link, h5py.HardLink):
            raise CheckpointError(f"{source}: refused: {name!r} is a {type(link).__name__}, not a plain object")
    for name, _ in links:
        item = f[name]
        if isinstance(item, h5py.Dataset):
            if item.external:
                files = sorted({str(entry[0]) for entry in item.external})
                raise CheckpointError(
                    f"{source}: refused: dataset {name!r} keeps its data in external files {files[:LISTED]}"
                )
            if item.is_virtual:
                raise CheckpointError(f"{source}: refused: dataset {name!r} is a virtual dataset (data from elsewhere)")
            datasets[name] = item
        elif not isinstance(item, h5py.Group):
            raise CheckpointError(f"{source}: refused: {name!r} is a {type(item).__name__}, not a group or dataset")
    return datasets


def _checksum_attribute(f, source: str) -> str | None:
    value = f.attrs.get(CHECKSUM_ATTR)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is not None and not isinstance(value, str):
        shape = tuple(np.shape(value))
        raise CheckpointError(
            f"{source}: the checksum attribute {CHECKSUM_ATTR!r} is an array of shape {shape}, not one string"
        )
    return value


def _infer_config(f, datasets: dict, source: str) -> ModelConfig:
    """The config from the declared shapes of the kernels ``infer_config`` needs (no data read)."""
    depth = 0
    while f"e{depth + 1}" in f and depth < len(datasets):
        depth += 1
    if depth == 0 or not datasets:
        raise CheckpointError(f"{source}: no layer variables found; not a Keras .weights.h5 of this model")
    # Dataset paths depend on the depth only, so any channels of that depth give them.
    probe = ModelConfig(channels=(1,) * (depth + 1))
    specs = {spec.name: spec for spec in param_specs(probe)}
    shapes = {
        name: canonical_shape(specs[name], datasets[path].shape)
        for name, path in dataset_paths(probe).items()
        if path in datasets and specs[name].leaf == "weight"
    }
    try:
        return infer_config(shapes)
    except ValueError as error:
        raise CheckpointError(f"{source}: not a Keras .weights.h5 of this model ({error})") from None


def _check_layout(datasets: dict, paths: dict[str, str], config: ModelConfig, source: str) -> None:
    """One refusal listing every missing, unexpected, misshapen, mistyped or under-stored dataset."""
    specs = {spec.name: spec for spec in param_specs(config)}
    expected = set(paths.values())
    missing = [path for path in paths.values() if path not in datasets]
    unexpected = sorted(path for path in datasets if path not in expected and path.split("/", 1)[0] != OPTIMIZER_GROUP)
    wrong_shape, wrong_dtype, unstored = [], [], []
    for name, path in paths.items():
        dataset = datasets.get(path)
        if dataset is None:
            continue
        spec = specs[name]
        shape = stored_shape(spec)
        if tuple(dataset.shape) != shape:
            wrong_shape.append(f"{path} {tuple(dataset.shape)} (expected {shape})")
            continue
        dtype = _dataset_dtype(dataset)
        kind = "float" if dtype is not None and (dtype.kind == "f" or dtype.name == "bfloat16") else "int"
        if dtype is None or dtype.kind not in "fiuV" or kind != spec.dtype_kind:
            wrong_dtype.append(
                f"{path} {dataset.dtype} (expected {'floating' if spec.dtype_kind == 'float' else 'integer'})"
            )
            continue
        declared = math.prod(shape) * dtype.itemsize
        stored = dataset.id.get_storage_size()
        limit = stored * MAX_EXPANSION if _has_filters(dataset) else stored
        if declared > limit:
            unstored.append(f"{path} (declares {declared} bytes, stores {stored})")
    problems = []
    for label, items in (
        (f"missing datasets for config {config.to_dict()}", missing),
        ("unexpected datasets", unexpected),
        ("wrong shapes", wrong_shape),
        ("wrong dtypes", wrong_dtype),
        ("datasets without their data", unstored),
    ):
        if items:
            problems.append(f"{label}: {_listed(items)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _has_filters(dataset) -> bool:
    return dataset.id.get_create_plist().get_nfilters() > 0


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more" if len(items) > LISTED else "")


def _dataset_dtype(dataset) -> np.dtype | None:
    """The dataset's numpy dtype; bfloat16 for Keras' raw 16-bit words marked ``dtype=bfloat16``."""
    if _text_attribute(dataset, "dtype") == "bfloat16":
        if dataset.dtype.itemsize != 2 or dataset.dtype.kind != "V":
            return None
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return dataset.dtype if dataset.dtype.kind in "fiu" else None


def _text_attribute(item, key: str) -> str | None:
    """A string attribute, or None when absent or not a string (an array never compares as one)."""
    value = item.attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _canonical(spec: ParamSpec, dataset) -> np.ndarray:
    """A vetted dataset's data in canonical layout (integers as int64, torch's counter type)."""
    value = np.empty(dataset.shape, dtype=_dataset_dtype(dataset))
    if value.size:
        if value.dtype.name == "bfloat16":
            value = np.array(dataset, dtype=value.dtype)
        else:
            dataset.read_direct(value)
    if value.dtype.kind in "iu":
        value = value.astype(np.int64)
    return rule(spec).from_channels_last(value)


# ----------------------------------------------------------------------------------------------
# Writing


def write(checkpoint: Checkpoint, path) -> None:
    import h5py

    with h5py.File(str(path), "w-") as f:  # "w-": never over an existing file
        write_weights(f, checkpoint)


def optimizer_datasets(f, source: str, shapes: list[tuple[int, ...]]) -> list | None:
    """The datasets ``optimizer/vars/0``, ``1``, ... of an open Keras weights file, None without
    that group, vetted before any data is read: exactly ``len(shapes)`` of them, each of its shape
    (``()`` for the counter and the learning rate), the first an integer, the rest floating, each
    storing the bytes it declares. ``shapes`` may also be the two scalars alone (an optimizer that
    was compiled but never built). One refusal lists every problem."""
    import h5py

    group = f.get(OPTIMIZER_VARS)
    if group is None:
        return None
    if not isinstance(group, h5py.Group):
        raise CheckpointError(f"{source}: {OPTIMIZER_VARS} is not a group")
    names = sorted(group, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
    expected = [str(i) for i in range(len(shapes))]
    if names not in (expected, expected[:2]):
        raise CheckpointError(
            f"{source}: {OPTIMIZER_VARS} holds {len(names)} variables ({_listed(names)}); the optimizer of this "
            f"model has {len(shapes)} (iterations, learning rate, {len(shapes) - 2} slots) or 2 before its first step"
        )
    problems, datasets = [], []
    for name, shape in zip(names, shapes, strict=False):
        dataset = group[name]
        path = f"{OPTIMIZER_VARS}/{name}"
        if not isinstance(dataset, h5py.Dataset):
            problems.append(f"{path} is not a dataset")
            continue
        dtype = _dataset_dtype(dataset)
        integer = name == "0"
        if tuple(dataset.shape) != shape:
            problems.append(f"{path} has shape {tuple(dataset.shape)} (expected {shape})")
        elif dtype is None or (dtype.kind in "iu") != integer:
            problems.append(f"{path} is {dataset.dtype} (expected {'an integer' if integer else 'floating'})")
        else:
            declared = math.prod(shape) * dtype.itemsize
            stored = dataset.id.get_storage_size()
            if declared > (stored * MAX_EXPANSION if _has_filters(dataset) else stored):
                problems.append(f"{path} declares {declared} bytes, stores {stored}")
        datasets.append(dataset)
    if problems:
        raise CheckpointError(f"{source}: optimizer variables: {_listed(problems)}")
    return datasets


def dataset_value(dataset) -> np.ndarray:
    """The data of a vetted dataset, in its dtype (bfloat16 as Keras marks it)."""
    value = np.empty(dataset.shape, dtype=_dataset_dtype(dataset))
    if value.dtype.name == "bfloat16":
        return np.array(dataset, dtype=value.dtype)
    if value.size:
        dataset.read_direct(value)
    return value


def write_optimizer(f, name: str, values: list[np.ndarray]) -> None:
    """The group ``optimizer/vars`` as Keras writes it: attribute ``name`` (the optimizer's name),
    datasets ``0``, ``1``, ... (bfloat16 as raw 16-bit words marked ``dtype``)."""
    group = f.require_group(OPTIMIZER_GROUP).create_group("vars")
    group.attrs["name"] = name
    for index, value in enumerate(values):
        value = np.require(value, requirements="C")
        dataset = group.create_dataset(str(index), data=value)
        if value.dtype.name == "bfloat16":
            dataset.attrs["dtype"] = "bfloat16"


def write_weights(f, checkpoint: Checkpoint) -> None:
    """The layout ``model.save_weights`` writes, every tensor in its own dtype, plus the checksum."""
    specs = param_specs(checkpoint.config)
    by_module: dict[str, list[ParamSpec]] = {}
    for spec in specs:
        by_module.setdefault(spec.module, []).append(spec)
    for layer in keras_layers(checkpoint.config):
        group = f.require_group(layer.path) if layer.path else f
        variables = group.create_group("vars")
        variables.attrs["name"] = layer.name
        for index, spec in enumerate(by_module.get(layer.module, ())):
            value = np.require(rule(spec).to_channels_last(checkpoint.tensors[spec.name]), requirements="C")
            dataset = variables.create_dataset(str(index), data=value)
            if value.dtype.name == "bfloat16":
                dataset.attrs["dtype"] = "bfloat16"
    f.attrs[CHECKSUM_ATTR] = checksum(checkpoint.tensors)
