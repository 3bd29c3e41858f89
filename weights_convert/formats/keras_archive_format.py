"""Keras 3 ``.keras`` archive of ``impl_keras.AttentionUNet``: ``config.json`` holds the model's
hyperparameters (so the config travels with the weights) and ``model.weights.h5`` the variables.

Read with ``keras.saving.load_model(safe_mode=True, compile=False)`` only: a ``Lambda`` layer or a
class that is not registered is refused, never executed. Written with ``model.save``, so the file
loads with a plain ``keras.saving.load_model(path)`` once ``impl_keras`` is imported.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.spec import ModelConfig
from weights_convert.formats.safetensors_format import _one_line


def read(path) -> tuple[dict[str, np.ndarray], ModelConfig]:
    import zipfile

    if not zipfile.is_zipfile(str(path)):
        raise CheckpointError(f"{path}: not a Keras .keras archive (not a zip file)")
    import keras

    from impl_keras.io import to_checkpoint
    from impl_keras.model import AttentionUNet

    try:
        model = keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError, TypeError, KeyError, OSError ... by cause
        # Keras' advice to pass safe_mode=False is dropped: the converter never does.
        reason = _one_line(error).split(" If you trust the source")[0][:300]
        raise CheckpointError(f"{path}: refused or unreadable Keras archive ({reason})") from None
    if not isinstance(model, AttentionUNet):
        raise CheckpointError(f"{path}: holds a {type(model).__name__}, not an impl_keras.AttentionUNet")
    checkpoint = to_checkpoint(model)
    return checkpoint.tensors, checkpoint.config


def write(checkpoint: Checkpoint, path) -> None:
    from impl_keras.io import build_model

    build_model(checkpoint).save(str(path))
