"""Canonical ``.safetensors``: canonical names, PyTorch layouts, config, format version and a
SHA-256 of the tensor data in ``__metadata__``. Reading never executes code (the format is a JSON
header plus raw bytes), and the checksum turns silent corruption of tensor bytes into a refusal.

Reading checks the header first: its size, the config in its metadata and every tensor's name and
shape against the parameter table of that config, before any tensor is loaded. Each tensor keeps
its own dtype, so a checkpoint mixing floating dtypes is written and read back exactly.

A training checkpoint adds the optimizer slots as tensors ``optimizer/<slot>/<parameter>`` (covered
by the checksum, their shapes checked against the table before loading) and the optimizer's name,
hyperparameters and step as JSON under ``optimizer`` in ``__metadata__``."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from weights_convert.core.architectures import Config, config_from_dict
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.optimizer_state import PREFIX, OptimizerState, split_tensors
from weights_convert.core.spec import param_specs
from weights_convert.formats.vetting import check_declared, one_line

FORMAT_NAME = "attention-unet"
FORMAT_VERSION = "1"
KEEPS_MIXED_DTYPES = True
HOLDS_OPTIMIZER = True

# The safetensors library's own limit on the JSON header; one of this model is a few tens of KB.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype names -> numpy, for checking the header's shapes and dtype kinds before loading
HEADER_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32"}


def read(path) -> tuple[dict[str, np.ndarray], Config | None, OptimizerState | None]:
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which reading a bfloat16 file needs)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    header = _header(path)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: not a readable safetensors file (__metadata__ is not a map of strings)")
    config = _config(path, metadata)
    model_header, optimizer_header = split_tensors(header)
    if optimizer_header and not (metadata and "optimizer" in metadata):
        raise CheckpointError(f"{path}: optimizer tensors without the optimizer entry in __metadata__")
    config = _check_header_against_table(path, model_header, config)
    _check_slot_shapes(path, optimizer_header, config)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(error)})") from None
    if metadata and "sha256" in metadata and metadata["sha256"] != checksum(tensors):
        raise CheckpointError(f"{path}: corrupt: the tensor data does not match the checksum in its metadata")
    tensors, slots = split_tensors(tensors)
    optimizer = None
    if metadata and "optimizer" in metadata:
        optimizer = OptimizerState.from_parts(metadata["optimizer"], slots, source=str(path))
    return tensors, config, optimizer


def _check_slot_shapes(path, optimizer_header: dict, config: Config) -> None:
    """Each ``optimizer/<slot>/<parameter>`` names a trainable tensor and has its shape."""
    shapes = {p.name: p.shape for p in param_specs(config) if not p.is_buffer}
    for name, info in optimizer_header.items():
        param = name[len(PREFIX) :].partition("/")[2]
        if param not in shapes or tuple(info["shape"]) != shapes[param]:
            expected = f"shape {shapes[param]}" if param in shapes else "a trainable tensor name"
            raise CheckpointError(
                f"{path}: optimizer tensor {name!r} has shape {tuple(info['shape'])} (expected {expected})"
            )


def _header(path) -> dict:
    """The JSON header, read alone: 8 bytes of length, then that many bytes of JSON."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (size,) = struct.unpack("<Q", size_bytes)
            f.seek(0, 2)
            file_size = f.tell()
            if size > MAX_HEADER_BYTES or size > file_size - 8:
                raise ValueError(f"header length {size} exceeds the file or the {MAX_HEADER_BYTES}-byte limit")
            f.seek(8)
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(error)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    return header


def _check_header_against_table(path, header: dict, config: Config | None) -> Config:
    """Every tensor's name and shape against the parameter table, with nothing loaded: placeholders
    of the declared shape and dtype that take no memory stand in for the tensors. Returns the config
    (the inferred one when ``config`` is None)."""
    placeholders = {}
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (
            isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CheckpointError(f"{path}: not a readable safetensors file (tensor {name!r} has no valid shape)")
        dtype = HEADER_DTYPES.get(info.get("dtype"), "float32")  # BF16 and others: judged after the load
        try:
            placeholders[name] = np.broadcast_to(np.zeros((), dtype), tuple(shape))
        except ValueError as error:  # a shape too large to index
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(shape)} ({one_line(error)})") from None
    return check_declared(placeholders, path, config)


def _config(path, metadata: dict | None) -> Config | None:
    config = None
    if metadata and "config" in metadata:
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: unsupported format_version {version!r}; this release reads {FORMAT_VERSION!r}"
            )
        try:
            config = config_from_dict(json.loads(metadata["config"]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: bad config in metadata: {one_line(error)}") from None
    return config


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.require(tensors[name], requirements="C")
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def write(checkpoint: Checkpoint, path) -> None:
    from safetensors.numpy import save_file

    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(checkpoint.config.to_dict()),
    }
    tensors = dict(checkpoint.tensors)
    if checkpoint.optimizer is not None:
        tensors.update(checkpoint.optimizer.tensors())
        metadata["optimizer"] = json.dumps(checkpoint.optimizer.header())
    metadata["sha256"] = checksum(tensors)
    save_file({k: np.require(v, requirements="C") for k, v in tensors.items()}, str(path), metadata=metadata)
