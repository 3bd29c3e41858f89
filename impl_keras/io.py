"""Between ``impl_keras.AttentionUNet`` and the canonical checkpoint.

The model's variable paths are the canonical module paths (``keras_path``), so the mapping is
one function, ``keras_variables``: no per-layer table. Conv kernels change layout (OIHW <-> HWIO, OIDHW <-> DHWIO)
through ``weights_convert.core.layouts.LEAF_RULES``.
"""

from __future__ import annotations

import keras
import numpy as np

import weights_convert
from impl_keras.model import AttentionUNet, empty_model
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.keras_layout import keras_path
from weights_convert.core.layouts import rule
from weights_convert.core.precisions import precision
from weights_convert.core.spec import param_specs


def check_dtype(dtype) -> str:
    """``dtype`` as a precision name of ``weights_convert.core.precisions.DTYPES`` (a Keras dtype
    policy's name: "mixed_bfloat16" is Keras' own mixed policy, float32 variables and bfloat16
    computation)."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", dtype)
    return precision(name).name


def keras_variables(model: AttentionUNet) -> dict:
    """Canonical name -> the model's variable, found at ``<model name>/`` + ``keras_path(spec)``.

    Raises CheckpointError listing every path missing from the model and every model variable
    that no canonical tensor maps to.
    """
    by_path = {v.path.split("/", 1)[1]: v for v in model.variables}
    paths = {spec.name: keras_path(spec) for spec in param_specs(model.config)}
    missing = sorted(set(paths.values()) - set(by_path))
    unmapped = sorted(set(by_path) - set(paths.values()))
    if missing or unmapped:
        raise CheckpointError(f"model variables do not match the canonical tree: missing {missing}, extra {unmapped}")
    return {name: by_path[path] for name, path in paths.items()}


def build_model(checkpoint: Checkpoint, dtype=None) -> AttentionUNet:
    """A model holding ``checkpoint``'s tensors, in ``dtype`` (default: the checkpoint's own float
    dtype, any of float16/bfloat16/float32/float64)."""
    config = checkpoint.config
    dtype = str(checkpoint.float_dtype) if dtype is None else dtype
    model = empty_model(config, dtype)
    assign_checkpoint(model, checkpoint)
    return model


def assign_checkpoint(model: AttentionUNet, checkpoint: Checkpoint) -> None:
    """Overwrite every variable of ``model`` (same config) with ``checkpoint``'s tensors, cast to
    the variable's dtype."""
    if checkpoint.config != model.config:
        raise CheckpointError(
            f"checkpoint config {checkpoint.config.to_dict()} differs from the model's {model.config.to_dict()}"
        )
    specs = {spec.name: spec for spec in param_specs(model.config)}
    for name, variable in keras_variables(model).items():
        value = rule(specs[name]).to_channels_last(checkpoint.tensors[name])
        variable.assign(np.asarray(value).astype(variable.dtype))


def from_checkpoint(checkpoint: Checkpoint, dtype="float32") -> AttentionUNet:
    """A model holding ``checkpoint``'s tensors, cast to ``dtype`` ("float32" or "float64"), or with
    ``"mixed_bfloat16"`` float32 variables computing in bfloat16.

    Call it with ``training=False`` (the Keras default) for running statistics."""
    return build_model(checkpoint, check_dtype(dtype))


def to_checkpoint(model: AttentionUNet) -> Checkpoint:
    """The model's variables as a canonical checkpoint, in the variable dtype (float32 for a
    ``"mixed_bfloat16"`` model)."""
    specs = {spec.name: spec for spec in param_specs(model.config)}
    tensors = {}
    for name, variable in keras_variables(model).items():
        value = rule(specs[name]).from_channels_last(keras.ops.convert_to_numpy(variable.value))
        tensors[name] = value.astype(np.int64) if specs[name].dtype_kind == "int" else value
    return Checkpoint.from_tensors(tensors, model.config, allow_nonfinite=True)


def load(path, dtype="float32") -> AttentionUNet:
    """Load any checkpoint ``weights_convert`` reads (config from the file or inferred from shapes),
    as a ``dtype`` model ("float32", "float64" or "mixed_bfloat16")."""
    check_dtype(dtype)
    return from_checkpoint(weights_convert.read(path), dtype)


def save(model: AttentionUNet, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (``.weights.h5``, ``.keras``, ``.safetensors``,
    ...): atomic; an existing file is kept unless ``force``."""
    if not isinstance(model, AttentionUNet):
        raise CheckpointError(f"expected an impl_keras.AttentionUNet, got {type(model).__name__}")
    weights_convert.write(to_checkpoint(model), path, force=force)
