"""Checkpoint conversion for the Attention U-Net: one canonical form, every format through it.

Importing this package imports only numpy; a framework is imported only when a format or an
implementation that needs it is used.
"""

from weights_convert.checkpoint import Checkpoint, CheckpointError
from weights_convert.io import convert, read, write
from weights_convert.spec import ModelConfig, param_specs, param_table, parameter_count

__all__ = [
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
