"""Attention U-Net in Keras 3 (TensorFlow, JAX or PyTorch backend), the article's
(``AttentionUNet``) and MONAI's (``MonaiAttentionUNet``), with checkpoint I/O.

Keras fixes its backend when it is first imported. Importing this package before Keras with
``KERAS_BACKEND`` unset picks an installed backend first (``weights_convert.core.extras.
default_keras_backend``): the one ``~/.keras/keras.json`` names if it is installed (Keras writes
"tensorflow" there on its first import), else the first installed of tensorflow, jax, torch. So
``pip install 'attention-unet[keras,jax]'`` works without TensorFlow and without setting
``KERAS_BACKEND`` (which is set, for this process and its children, only when the pick differs
from Keras' own); a ``KERAS_BACKEND`` that is set is always honoured.
"""

import os
import sys

if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
    from weights_convert.core.extras import configured_keras_backend, default_keras_backend

    if default_keras_backend() != (configured_keras_backend() or "tensorflow"):
        os.environ["KERAS_BACKEND"] = default_keras_backend()

from impl_keras.io import from_checkpoint, load, save, to_checkpoint  # noqa: E402
from impl_keras.model import AttentionUNet  # noqa: E402
from impl_keras.monai_model import MonaiAttentionUNet  # noqa: E402
from impl_keras.training import TorchAdam, load_training, save_training  # noqa: E402

__all__ = [
    "AttentionUNet",
    "MonaiAttentionUNet",
    "TorchAdam",
    "from_checkpoint",
    "load",
    "load_training",
    "save",
    "save_training",
    "to_checkpoint",
]
