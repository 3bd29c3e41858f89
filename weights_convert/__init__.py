"""Checkpoint conversion for the Attention U-Net: one canonical form, every format through it.

Three layers, one folder each, each importing only the layers below it:

- ``core``: the parameter specification (``spec``), the canonical ``Checkpoint``, layouts and
  optimizer definitions. NumPy only.
- ``formats``: one reader and writer per file format, and ``read``/``write``/``convert``. A format
  imports its own library (h5py, msgpack, torch, orbax) when used, and never an implementation.
- ``harness``: the NumPy reference, parity, the bench and the ``attention-unet`` command. It runs
  the implementations (``impl_torch``, ``impl_flax``, ``impl_keras``), importing each only inside
  the function that runs it.

Importing this package imports numpy, and nothing from any framework.
"""

# The project's version, as pyproject.toml gives it (a test checks that they agree).
__version__ = "0.1.0"

from weights_convert.core.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from weights_convert.core.spec import ModelConfig, param_specs, param_table, parameter_count  # noqa: E402
from weights_convert.formats.io import convert, read, write  # noqa: E402

__all__ = [
    "__version__",
    "Checkpoint",
    "CheckpointError",
    "ModelConfig",
    "convert",
    "param_specs",
    "param_table",
    "parameter_count",
    "read",
    "write",
]
