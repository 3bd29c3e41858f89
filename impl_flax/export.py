"""Deployment export of the Flax model, and its runtime: a serialized ``jax.export.Exported``
(``.jaxexport``), mirroring ``impl_torch/export.py``.

The file takes NHWC input and returns NHWC logits (NDHWC for a 3D model; eval mode: BatchNorm
uses its running statistics), with a symbolic batch and spatial sides (``jax.export`` shape
polymorphism): any batch >= 1 and any H, W (D, H, W) >= the model's ``min_size`` (2**depth), odd
sizes included; the constraint is checked when the function is called. A MONAI model's sides are
symbolic multiples of its ``side_multiple`` (the product of its strides: ``4*height`` for two strides
of 2), which a call's sides must be. Loads with ``jax.export.deserialize`` and
runs with ``.call`` on any JAX platform it was exported for (CPU). A float64 file needs JAX's
64-bit mode to run (``run`` switches it on for the call).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from impl_flax.io import Model, from_checkpoint
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.spec import SPATIAL_NAMES

SUFFIXES = (".jaxexport",)


def symbolic_axes(model: Model) -> list[str]:
    """The input's symbolic axes, in order (channels last, which is not symbolic): ``batch``, then
    ``depth`` (3D), ``height`` and ``width``; the names ``impl_torch.export.dynamic_axes`` gives."""
    return ["batch", *SPATIAL_NAMES[model.config.spatial_dims]]


def exported(model: Model) -> jax.export.Exported:
    """``jax.export`` of the eval model's logits with a symbolic batch and spatial sides."""
    config = model.config
    model.eval()
    graphdef, state = nnx.split(model)

    def logits(x):
        return nnx.merge(graphdef, state)(x)

    batch, *spatial = symbolic_axes(model)
    multiple = config.side_multiple
    if multiple > 1:
        # Every side a multiple of the strides' product, hence at least that (MONAI's network).
        sides, constraints = [f"{multiple}*{side}" for side in spatial], ()
    else:
        sides, constraints = spatial, tuple(f"{side} >= {config.min_size}" for side in spatial)
    sizes = jax.export.symbolic_shape(", ".join([batch, *sides]), constraints=constraints)
    spec = jax.ShapeDtypeStruct((*sizes, config.in_channels), model.dtype)
    return jax.export.export(jax.jit(logits))(spec)


def export_jax(model: Model, path) -> None:
    Path(path).write_bytes(exported(model).serialize())


EXPORTERS = {".jaxexport": export_jax}


def export(checkpoint: Checkpoint, path, dtype: str = "float32") -> None:
    """Write ``checkpoint``'s model at ``dtype`` (float32 or float64) in the format named by ``path``'s suffix."""
    suffix = Path(path).suffix
    if suffix not in EXPORTERS:
        raise ValueError(f"{path}: not a JAX export (expected one of {', '.join(SUFFIXES)})")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"export dtype must be float32 or float64, got {dtype!r}")
    with jax.enable_x64(dtype == "float64"):
        EXPORTERS[suffix](from_checkpoint(checkpoint, dtype), path)


def run(path, x: np.ndarray) -> np.ndarray:
    """The logits (NHWC, NDHWC) of the exported file ``path`` on ``x`` (NHWC, NDHWC, in the file's dtype), with
    ``jax.export.deserialize``."""
    function = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    float64 = any(aval.dtype == jnp.float64 for aval in function.in_avals)
    with jax.enable_x64(float64):
        return np.asarray(function.call(x))
