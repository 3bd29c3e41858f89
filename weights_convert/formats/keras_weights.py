"""The HDF5 weights file as Keras 3 saves it (``model.save_weights``, and the ``model.weights.h5``
member of a ``.keras`` archive), read, vetted and written with h5py alone: the model's variables
at the paths of ``keras_layout``, a root attribute ``CHECKSUM_ATTR`` (SHA-256 of the canonical
tensors; Keras ignores it), and a compiled model's optimizer variables under ``optimizer/vars``.
Both Keras formats, ``keras_h5_format`` and ``keras_archive_format``, read and write through here.

Reading looks only at the bytes of the file: every link is visited first and an external link,
a soft link, a dataset with external raw storage or a virtual dataset is refused, naming it. Every
declared shape and dtype is checked against the parameter table, and every dataset must store the
bytes it declares, before any data is read: memory stays within the file's own size (a compressed
dataset: ``MAX_EXPANSION`` times its stored bytes). Each dataset keeps its tensor's own dtype
(bfloat16 as Keras stores it: raw 16-bit words marked by a ``dtype`` attribute).

A file read without a config (a ``.weights.h5`` holds none) has it inferred from the declared
shapes: MONAI's AttentionUnet when the file holds its tree (under ``keras_layout.MONAI_ROOT``), its
strides and dropout then assumed (``monai_spec.ASSUMED``), the article's network otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.keras_layout import MONAI_ROOT, canonical_shape, dataset_paths, keras_layers, stored_shape
from weights_convert.core.layouts import rule
from weights_convert.core.monai_spec import MonaiConfig, infer_monai_config
from weights_convert.core.spec import (
    MAX_DEPTH,
    SPATIAL_DIMS,
    ModelConfig,
    ParamSpec,
    infer_article_config,
    param_specs,
)
from weights_convert.formats.safetensors_format import checksum

CHECKSUM_ATTR = "attention_unet_sha256"
# save_weights and save of a compiled, trained model also write the optimizer's variables under this
# group: ``optimizer/vars/0`` (iterations), ``1`` (learning rate), then the slots.
OPTIMIZER_GROUP = "optimizer"
OPTIMIZER_VARS = f"{OPTIMIZER_GROUP}/vars"
# A filtered (compressed) dataset may declare at most this many times its stored bytes: deflate,
# the strongest filter h5py ships, cannot expand data by more than about 1032 times.
MAX_EXPANSION = 1032
# How many names a refusal lists before "and N more".
LISTED = 10


# ----------------------------------------------------------------------------------------------
# Reading


def read_weights(f, source: str, config: ModelConfig | MonaiConfig | None = None) -> dict[str, np.ndarray]:
    """The canonical tensors of an open Keras weights file ``f``, for ``config`` (inferred from
    the declared shapes when None: of either network, by the tree the file holds). Every dataset is
    vetted before any data is read."""
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


def _infer_config(f, datasets: dict, source: str) -> ModelConfig | MonaiConfig:
    """The config from the declared shapes of the kernels ``infer_config`` needs (no data read): of
    MONAI's network when the file holds its tree, of the article's otherwise."""
    monai = MONAI_ROOT in f
    if not datasets or not (monai or "e1" in f):
        raise CheckpointError(f"{source}: no layer variables found; not a Keras .weights.h5 of this model")
    try:
        return _infer_monai_config(f, datasets) if monai else _infer_article_config(f, datasets)
    except ValueError as error:
        raise CheckpointError(f"{source}: not a Keras .weights.h5 of this model ({error})") from None


def _infer_article_config(f, datasets: dict) -> ModelConfig:
    """The article's config: the depth from the encoders ``e1``, ``e2`` ..., then ``infer_article_config``."""
    depth = 0
    while f"e{depth + 1}" in f and depth < len(datasets):
        depth += 1
    # Dataset paths depend on the depth and on the rank (Keras saves a Conv3D under ``conv3d``) only,
    # so any channels of that depth give them: the rank whose first kernel is there.
    probes = [ModelConfig(channels=(1,) * (depth + 1), spatial_dims=dims) for dims in SPATIAL_DIMS]
    probe = next((c for c in probes if dataset_paths(c)["e1.conv.conv.0.weight"] in datasets), probes[0])
    return infer_article_config(_weight_shapes(probe, datasets))


def _infer_monai_config(f, datasets: dict) -> MonaiConfig:
    """MONAI's config: the depth from the nested levels, then ``infer_monai_config`` on the shapes
    (strides and dropout, which no tensor holds, assumed as it assumes them)."""
    depth, level = 0, f"{MONAI_ROOT}/layers/attention_layer"
    while level in f and depth <= MAX_DEPTH:
        depth += 1
        level += "/submodule/layers/attention_layer"
    if depth == 0:
        raise ValueError(f"no level of MONAI's AttentionUnet under {MONAI_ROOT}")
    # Dataset paths depend on the depth alone (a Conv3D is saved as a Conv2D is, under ``conv``),
    # so any channels of that depth give them.
    return infer_monai_config(_weight_shapes(MonaiConfig(channels=(2,) * (depth + 1)), datasets))


def _weight_shapes(probe, datasets: dict) -> dict[str, tuple[int, ...]]:
    """The canonical shape of every ``weight`` present at the paths of ``probe``'s layout."""
    specs = {spec.name: spec for spec in param_specs(probe)}
    return {
        name: canonical_shape(specs[name], datasets[path].shape)
        for name, path in dataset_paths(probe).items()
        if path in datasets and specs[name].leaf == "weight"
    }


def _check_layout(datasets: dict, paths: dict[str, str], config: ModelConfig | MonaiConfig, source: str) -> None:
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
        declared, stored, limit = _sizes(dataset, shape, dtype)
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


def _sizes(dataset, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int, int]:
    """(bytes declared, bytes stored, the most it may declare): its stored bytes, or ``MAX_EXPANSION``
    times them for a filtered (compressed) dataset."""
    stored = dataset.id.get_storage_size()
    filtered = dataset.id.get_create_plist().get_nfilters() > 0
    return math.prod(shape) * dtype.itemsize, stored, stored * MAX_EXPANSION if filtered else stored


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
    value = dataset_value(dataset)
    if value.dtype.kind in "iu":
        value = value.astype(np.int64)
    return rule(spec).from_channels_last(value)


# ----------------------------------------------------------------------------------------------
# The optimizer's variables, and writing


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
            declared, stored, limit = _sizes(dataset, shape, dtype)
            if declared > limit:
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
