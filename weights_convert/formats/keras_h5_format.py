"""Keras 3 ``.weights.h5``: what ``model.save_weights`` writes for ``impl_keras.AttentionUNet``.

Reading uses h5py alone (no Keras, no TensorFlow; HDF5 datasets hold data, never code). Keras
writes one HDF5 group per layer, at the layer's *attribute* path (``e1/conv/conv/layers/conv2d``),
with a ``vars`` sub-group carrying the layer's *name* as an attribute and its variables as datasets
``0``, ``1``, ... in creation order. The model names each layer after its canonical module
(``e1`` / ``conv`` / ``conv`` / ``0``), so the chain of names above a ``vars`` group is the
canonical module path, and the creation order is the canonical leaf order (kernel, bias; gamma,
beta, moving_mean, moving_variance, num_batches_tracked). The file carries no config: it is
inferred from the tensor shapes. Writing builds the Keras model and calls ``save_weights``, then
adds a root attribute ``CHECKSUM_ATTR`` (SHA-256 of the canonical tensors; Keras ignores it) that
reading verifies when present, so flipped bytes in tensor data are refused instead of loaded.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.layouts import LEAF_RULES, module_path, rule
from weights_convert.core.spec import LEAVES, ParamSpec
from weights_convert.formats.safetensors_format import _one_line, checksum

# save_weights of a compiled, trained model also writes the optimizer's slots under this group.
OPTIMIZER_GROUP = "optimizer"

# A layer's kind from how many variables it holds (conv3 and conv1 share leaves and rules).
KIND_BY_COUNT = {len(LEAVES["conv1"]): "conv1", len(LEAVES["bn"]): "bn"}
CHECKSUM_ATTR = "attention_unet_sha256"


def keras_path(spec: ParamSpec) -> str:
    """The Keras variable path of a canonical tensor, below the model's own name:
    ``e1.conv.conv.0.weight`` -> ``e1/conv/conv/0/kernel``."""
    return "/".join((*module_path(spec), rule(spec).keras))


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import h5py

    try:
        with h5py.File(str(path), "r") as f:
            layers = _layer_variables(f)
            expected = f.attrs.get(CHECKSUM_ATTR)
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError, ... on damaged files
        raise CheckpointError(f"{path}: not a readable Keras .weights.h5 file ({_one_line(error)[:200]})") from None
    if not layers:
        raise CheckpointError(f"{path}: no layer variables found; not a Keras .weights.h5 of this model")
    tensors = {}
    for module, arrays in layers.items():
        kind = KIND_BY_COUNT.get(len(arrays))
        if kind is None or (kind == "conv1" and np.ndim(arrays[0]) != 4):
            shapes = [tuple(np.shape(a)) for a in arrays]
            raise CheckpointError(
                f"{path}: layer {module!r} holds variables of shapes {shapes}; not a layer of this model"
            )
        for leaf, value in zip(LEAVES[kind], arrays, strict=True):
            tensors[f"{module}.{leaf}"] = LEAF_RULES[(kind, leaf)].from_channels_last(value)
    if expected is not None and expected != checksum(tensors):
        raise CheckpointError(f"{path}: corrupt: the tensor data does not match the checksum in its attributes")
    return tensors, None


def _layer_variables(f) -> dict[str, list[np.ndarray]]:
    """Canonical module path -> the layer's arrays, for every layer that holds variables."""
    import h5py

    if not isinstance(f.get("vars"), h5py.Group):
        raise ValueError("no root 'vars' group")
    layers: dict[str, list[np.ndarray]] = {}

    def visit(group, names: tuple[str, ...]) -> None:
        for key in sorted(group):
            child = group[key]
            if key == "vars" or not isinstance(child, h5py.Group):
                continue
            if group == f and key == OPTIMIZER_GROUP:
                continue  # a compiled model's optimizer state: training state, not weights
            variables = child.get("vars")
            child_names = names
            if isinstance(variables, h5py.Group):
                name = variables.attrs.get("name")
                if not isinstance(name, str):
                    raise ValueError(f"group {child.name!r} has no layer name")
                child_names = (*names, name)
                if len(variables):
                    keys = sorted(variables, key=int)
                    if keys != [str(i) for i in range(len(keys))]:
                        raise ValueError(f"group {variables.name!r} has variables {keys}")
                    layers[".".join(child_names)] = [_array(variables[k]) for k in keys]
            visit(child, child_names)

    visit(f, ())
    return layers


def _array(dataset) -> np.ndarray:
    if dataset.attrs.get("dtype") == "bfloat16":  # Keras stores bfloat16 as raw 16-bit words
        import ml_dtypes

        return np.array(dataset, dtype=ml_dtypes.bfloat16)
    value = np.array(dataset)
    return value.astype(np.int64) if value.dtype.kind in "iu" else value


def write(checkpoint: Checkpoint, path) -> None:
    import h5py

    from impl_keras.io import build_model

    build_model(checkpoint).save_weights(str(path))
    with h5py.File(str(path), "a") as f:
        f.attrs[CHECKSUM_ATTR] = checksum(checkpoint.tensors)
