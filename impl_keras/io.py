"""Between the Keras models (``impl_keras.AttentionUNet``, ``impl_keras.MonaiAttentionUNet``) and
the canonical checkpoint.

Each model's variable paths are its canonical module paths (``keras_path``), so the mapping is
one function, ``keras_variables``: no per-layer table. Conv kernels change layout (OIHW <-> HWIO,
OIDHW <-> DHWIO, a transposed kernel (in, out, *k) <-> (*k, out, in)) through
``weights_convert.core.layouts.LEAF_RULES``. A config's ``architecture`` picks the model class.
"""

from __future__ import annotations

import keras
import numpy as np

import weights_convert
from impl_keras import model as article_model
from impl_keras.model import AttentionUNet
from impl_keras.monai_model import MonaiAttentionUNet
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.keras_layout import keras_path
from weights_convert.core.layouts import rule
from weights_convert.core.precisions import precision
from weights_convert.core.spec import param_specs

# The model class of each architecture (a config's ``architecture``).
MODELS = {"article": AttentionUNet, "monai": MonaiAttentionUNet}
# A Dropout of rate > 0 keeps Keras' random state in a variable of this name: not a tensor of the
# network (torch's dropout draws from a global generator), so no checkpoint holds it.
RANDOM_STATE = "seed_generator_state"


def check_dtype(dtype) -> str:
    """``dtype`` as a precision name of ``weights_convert.core.precisions.DTYPES`` (a Keras dtype
    policy's name: "mixed_bfloat16" is Keras' own mixed policy, float32 variables and bfloat16
    computation)."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", dtype)
    return precision(name).name


def empty_model(config, dtype=None) -> AttentionUNet | MonaiAttentionUNet:
    """A model of ``config``'s architecture whose kernels start at zeros, for weights about to be
    assigned (``impl_keras.model.empty_model``)."""
    return article_model.empty_model(config, dtype, MODELS[config.architecture])


def keras_variables(model: AttentionUNet | MonaiAttentionUNet) -> dict:
    """Canonical name -> the model's variable, found at ``<model name>/`` + ``keras_path(spec)``.

    Raises CheckpointError listing every path missing from the model and every model variable
    that no canonical tensor maps to (Dropout's random state aside).
    """
    by_path = {v.path.split("/", 1)[1]: v for v in model.variables if v.name != RANDOM_STATE}
    paths = {spec.name: keras_path(spec) for spec in param_specs(model.config)}
    missing = sorted(set(paths.values()) - set(by_path))
    unmapped = sorted(set(by_path) - set(paths.values()))
    if missing or unmapped:
        raise CheckpointError(f"model variables do not match the canonical tree: missing {missing}, extra {unmapped}")
    return {name: by_path[path] for name, path in paths.items()}


def build_model(checkpoint: Checkpoint, dtype=None) -> AttentionUNet | MonaiAttentionUNet:
    """A model holding ``checkpoint``'s tensors, in ``dtype`` (default: the checkpoint's own float
    dtype, any of float16/bfloat16/float32/float64)."""
    dtype = str(checkpoint.float_dtype) if dtype is None else dtype
    model = empty_model(checkpoint.config, dtype)
    assign_checkpoint(model, checkpoint)
    return model


def assign_checkpoint(model: AttentionUNet | MonaiAttentionUNet, checkpoint: Checkpoint) -> None:
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


def from_checkpoint(checkpoint: Checkpoint, dtype="float32") -> AttentionUNet | MonaiAttentionUNet:
    """The model of the checkpoint's architecture holding its tensors, cast to ``dtype`` ("float32"
    or "float64"), or with ``"mixed_bfloat16"`` float32 variables computing in bfloat16.

    Call it with ``training=False`` (the Keras default) for running statistics."""
    return build_model(checkpoint, check_dtype(dtype))


def to_checkpoint(model: AttentionUNet | MonaiAttentionUNet) -> Checkpoint:
    """The model's variables as a canonical checkpoint, in the variable dtype (float32 for a
    ``"mixed_bfloat16"`` model)."""
    specs = {spec.name: spec for spec in param_specs(model.config)}
    tensors = {}
    for name, variable in keras_variables(model).items():
        value = rule(specs[name]).from_channels_last(keras.ops.convert_to_numpy(variable.value))
        tensors[name] = value.astype(np.int64) if specs[name].dtype_kind == "int" else value
    return Checkpoint.from_tensors(tensors, model.config, allow_nonfinite=True)


def load(path, dtype="float32", *, config=None) -> AttentionUNet | MonaiAttentionUNet:
    """Load any checkpoint ``weights_convert`` reads (config from the file or inferred from shapes),
    as a ``dtype`` model ("float32", "float64" or "mixed_bfloat16"). ``config`` gives what a file
    without one cannot (a MONAI state_dict's strides); a UserWarning says what was assumed otherwise."""
    check_dtype(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_checkpoint(checkpoint, dtype)


def check_model(model) -> None:
    """A CheckpointError in one line unless ``model`` is one of this package's models."""
    if not isinstance(model, tuple(MODELS.values())):
        raise CheckpointError(f"expected an impl_keras.AttentionUNet or MonaiAttentionUNet, got {type(model).__name__}")


def save(model: AttentionUNet | MonaiAttentionUNet, path, *, force: bool = False) -> None:
    """Save in the format named by ``path``'s extension (``.weights.h5``, ``.keras``, ``.safetensors``,
    ...): atomic; an existing file is kept unless ``force``."""
    check_model(model)
    weights_convert.write(to_checkpoint(model), path, force=force)
