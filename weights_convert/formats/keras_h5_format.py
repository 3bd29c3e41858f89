"""Keras 3 ``.weights.h5``: what ``model.save_weights`` writes for ``impl_keras.AttentionUNet`` (or
``impl_keras.MonaiAttentionUNet``), read and written with h5py alone (no Keras, no TensorFlow; HDF5
datasets hold data, never code).

One HDF5 group per layer at its attribute path, each with a ``vars`` group of datasets ``0``,
``1``, ... in creation order: the layer tree and the spec fix every dataset's path, shape and
meaning (``keras_layout``), so the file carries no config, it is inferred from the declared shapes
(MONAI's strides and dropout, which no tensor holds, are then assumed).
A root attribute ``CHECKSUM_ATTR`` (SHA-256 of the canonical tensors; Keras ignores it) is written,
and verified when present, so flipped bytes in tensor data are refused instead of loaded. Each
dataset keeps its tensor's own dtype (bfloat16 as Keras stores it: raw 16-bit words marked by a
``dtype`` attribute), so mixed dtypes are written exactly. Reading refuses any link or dataset that
would read outside the file, and checks every declared shape, dtype and stored size against the
parameter table before any data is read (``keras_weights``, which the ``.keras`` archive's weights
member goes through too).

A ``.weights.h5`` is weights-only here. Keras' ``save_weights`` of a compiled, trained model does
store the optimizer's variables (group ``optimizer/vars``: iterations, learning rate, slots), but not
which optimizer made them nor its hyperparameters, so the slots have no meaning by themselves (a
momentum of Keras' SGD is ``-lr`` times torch's, Adam's eps sits elsewhere). Reading skips that
group (its links are still vetted) and writing a training checkpoint needs ``weights_only``; the
``.keras`` archive, whose ``config.json`` holds the compile config, carries the optimizer state
(``keras_archive_format``), and ``write_optimizer`` / ``optimizer_datasets`` of ``keras_weights``
are its layout.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.keras_layout import dataset_paths, keras_path, stored_shape
from weights_convert.formats.keras_weights import CHECKSUM_ATTR, read_weights, write_weights
from weights_convert.formats.vetting import one_line

# Names of the layout imported from here (impl_keras.io and the tests), beside read and write.
__all__ = ["CHECKSUM_ATTR", "KEEPS_MIXED_DTYPES", "dataset_paths", "keras_path", "read", "stored_shape", "write"]

# Each dataset has its own dtype: a checkpoint mixing float dtypes is written exactly.
KEEPS_MIXED_DTYPES = True


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import h5py

    try:
        with h5py.File(str(path), "r") as f:
            return read_weights(f, str(path)), None
    except CheckpointError:
        raise
    except Exception as error:  # h5py raises OSError, KeyError, RuntimeError, ... on damaged files
        raise CheckpointError(f"{path}: not a readable Keras .weights.h5 file ({one_line(error)[:200]})") from None


def write(checkpoint: Checkpoint, path) -> None:
    import h5py

    with h5py.File(str(path), "w-") as f:  # "w-": never over an existing file
        write_weights(f, checkpoint)
