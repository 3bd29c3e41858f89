"""PyTorch ``.pt`` / ``.pth`` state_dicts, read only with ``torch.load(weights_only=True)``: a pickle
that would run code is refused by torch's restricted unpickler and never executed."""

from __future__ import annotations

import zipfile

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.formats.safetensors_format import _one_line

WRAPPER_KEYS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."


def filter_state_dict(obj, path) -> dict:
    """Unwrap foreign checkpoints: ``{"state_dict": ...}``, ``{"model": ...}`` and DataParallel's
    ``module.`` prefix. Native state_dicts pass through unchanged."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict) and not _is_tensor_dict(obj):
            obj = obj[key]
            break
    if obj and all(isinstance(k, str) and k.startswith(DATA_PARALLEL_PREFIX) for k in obj):
        obj = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in obj.items()}
    return obj


def _is_tensor_dict(obj: dict) -> bool:
    import torch

    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def from_numpy(array: np.ndarray):
    import torch

    # Writable as well as contiguous: torch warns on a read-only array (a memory-mapped file's).
    array = np.require(array, requirements=("C", "W"))
    if str(array.dtype) == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def check_zip_integrity(path) -> None:
    """torch.load does not verify the CRC-32 that the zip container records for every entry:
    check it, so flipped bytes in tensor data are refused instead of loaded."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (pre-1.6) format has no checksums; torch.load judges it
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as error:  # BadZipFile, OSError, EOFError, zlib.error, ... by the kind of damage
        raise CheckpointError(f"{path}: corrupt zip container ({_one_line(error)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt: entry {bad} fails its CRC-32 check")


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import pickle

    import torch

    check_zip_integrity(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: the file is not a plain state_dict and loading it would need "
            f"arbitrary code execution ({_one_line(error)[:200]})"
        ) from None
    except Exception as error:  # truncated zip, bad magic, ... : torch raises many kinds
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(error)[:200]})") from None
    state = filter_state_dict(obj, path)
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad}")
    return {k: to_numpy(v) for k, v in state.items()}, None


def write(checkpoint: Checkpoint, path) -> None:
    import torch

    torch.save({k: from_numpy(v) for k, v in checkpoint.tensors.items()}, str(path))
