"""Deployment export of the Keras model (either architecture), and its runtime: a TensorFlow SavedModel
directory (``*.savedmodel``), mirroring ``impl_torch/export.py``.

Written by ``model.export(..., format="tf_saved_model")`` on Keras' TensorFlow backend. The
SavedModel takes channels-last input ``x`` (NHWC, or NDHWC for a 3D model) and returns logits in the
same layout (eval mode: BatchNorm uses its running statistics) through its ``serve`` endpoint and
``serving_default`` signature, with a dynamic batch and spatial sizes (``None`` in the signature):
any batch >= 1 and any side the model takes (the article's: >= ``min_size``, 2**depth, odd sizes
included; MONAI's: multiples of ``side_multiple``). Loads with ``tf.saved_model.load``; running it
needs TensorFlow only, not Keras.

Keras' backend is fixed when it is imported, so a process on another backend exports through one
``KERAS_BACKEND=tensorflow python -m impl_keras.export CHECKPOINT DST --dtype D`` subprocess.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint

SUFFIXES = (".savedmodel",)


def export_savedmodel(model, path) -> None:
    """``model.export`` as a SavedModel with a dynamic batch and spatial sizes (TensorFlow backend)."""
    import keras

    config = model.config
    shape = (None,) * (config.spatial_dims + 1) + (config.in_channels,)  # NHWC / NDHWC, sizes dynamic
    spec = keras.InputSpec(shape=shape, dtype=model.dtype_policy.compute_dtype)
    model.export(str(path), format="tf_saved_model", input_signature=[spec], verbose=False)


EXPORTERS = {".savedmodel": export_savedmodel}


def export(checkpoint: Checkpoint, path, dtype: str = "float32") -> None:
    """Write ``checkpoint``'s model at ``dtype`` (float32 or float64) in the format named by
    ``path``'s suffix: in this process under the TensorFlow backend, else in a subprocess that has it."""
    from weights_convert.core.extras import current_keras_backend as current_backend

    suffix = Path(path).suffix
    if suffix not in EXPORTERS:
        raise ValueError(f"{path}: not a Keras export (expected one of {', '.join(SUFFIXES)})")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"export dtype must be float32 or float64, got {dtype!r}")
    if current_backend() == "tensorflow":
        from impl_keras.io import from_checkpoint

        EXPORTERS[suffix](from_checkpoint(checkpoint, dtype), path)
        return
    _export_in_subprocess(checkpoint, path, dtype)


def _export_in_subprocess(checkpoint: Checkpoint, path, dtype: str) -> None:
    from weights_convert.formats.io import write
    from weights_convert.processes import environment, run_module

    with tempfile.TemporaryDirectory(prefix="keras-export-") as tmp:
        source = Path(tmp) / "checkpoint.safetensors"
        write(checkpoint, source)
        what = "the SavedModel export under TensorFlow"
        run_module(
            "impl_keras.export", source, path, "--dtype", dtype, env=environment(KERAS_BACKEND="tensorflow"), what=what
        )


def run(path, x: np.ndarray) -> np.ndarray:
    """The logits (NHWC / NDHWC) of the SavedModel ``path`` on ``x`` (same layout, the model's dtype), with
    ``tf.saved_model.load``."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return loaded.serve(tf.constant(x)).numpy()


def main(argv: list[str] | None = None) -> int:
    from weights_convert import termination

    termination.exit_on_sigterm()
    termination.die_with_parent()
    parser = argparse.ArgumentParser(description="export a checkpoint as a SavedModel (TensorFlow backend)")
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "tensorflow":
        print(f"error: Keras' backend is {keras.backend.backend()}; run with KERAS_BACKEND=tensorflow", file=sys.stderr)
        return 2
    from weights_convert.formats.io import read

    export(read(args.src), args.dst, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
