"""What every reader shares: a library's error as one line of a refusal, and the declared names
and shapes of a file (placeholders that take no memory) checked against the parameter table
before any data is read."""

from __future__ import annotations

import numpy as np

from weights_convert.core.architectures import Config, infer_config
from weights_convert.core.checkpoint import CheckpointError, check_tensors


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def inferred_config(tensors: dict[str, np.ndarray], source) -> Config:
    """The config that the shapes of ``tensors`` imply, refused naming ``source``."""
    try:
        return infer_config({k: np.shape(v) for k, v in tensors.items()})
    except ValueError as error:
        raise CheckpointError(f"{source}: {one_line(error)}") from None


def check_declared(placeholders: dict[str, np.ndarray], source, config: Config | None = None) -> Config:
    """Every declared name, shape and dtype kind against the parameter table of ``config`` (inferred
    from the shapes when None), values not judged; ``placeholders`` stand in for the tensors
    (``np.broadcast_to`` of a scalar: no memory). Returns the config."""
    if config is None:
        config = inferred_config(placeholders, source)
    check_tensors(placeholders, config, allow_nonfinite=True, source=str(source))
    return config
