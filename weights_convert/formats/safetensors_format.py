"""Canonical ``.safetensors``: canonical names, PyTorch layouts, config, format version and a
SHA-256 of the tensor data in ``__metadata__``. Reading never executes code (the format is a JSON
header plus raw bytes), and the checksum turns silent corruption of tensor bytes into a refusal."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.spec import ModelConfig

FORMAT_NAME = "attention-unet"
FORMAT_VERSION = "1"


def read(path) -> tuple[dict[str, np.ndarray], ModelConfig | None]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
        metadata = _metadata(path)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(error)})") from None
    config = None
    if metadata and "config" in metadata:
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unsupported format_version {version!r}; this release reads {FORMAT_VERSION!r}"
            )
        try:
            config = ModelConfig.from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: bad config in metadata: {_one_line(error)}") from None
    if metadata and "sha256" in metadata and metadata["sha256"] != checksum(tensors):
        raise CheckpointError(f"{path}: corrupt: the tensor data does not match the checksum in its metadata")
    return tensors, config


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.require(tensors[name], requirements="C")
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _metadata(path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def write(checkpoint: Checkpoint, path) -> None:
    from safetensors.numpy import save_file

    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(checkpoint.config.to_dict()),
        "sha256": checksum(checkpoint.tensors),
    }
    save_file({k: np.require(v, requirements="C") for k, v in checkpoint.tensors.items()}, str(path), metadata=metadata)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
