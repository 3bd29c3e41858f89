"""PyTorch ``.pt`` / ``.pth`` state_dicts, read only with ``torch.load(weights_only=True)``: a pickle
that would run code is refused by torch's restricted unpickler and never executed.

Only what ``torch.save`` writes is handed to torch: a zip archive (whose CRC-32s are checked first,
and whose entries may not expand far beyond their stored size) or the legacy pre-1.6 format. A raw
pickle is refused without being unpickled. Each tensor keeps its dtype, mixed or not."""

from __future__ import annotations

import pickle
import warnings
import zipfile

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.spec import capped
from weights_convert.formats.safetensors_format import _one_line

WRAPPER_KEYS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
KEEPS_MIXED_DTYPES = True

# The first bytes of a legacy (pre-1.6) torch.save file: its magic number, pickled with protocol 2.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]

# How much larger than its stored bytes a zip entry may be once inflated. torch.save stores entries
# uncompressed (ratio 1); a ratio beyond this is a zip bomb, refused before torch inflates it.
MAX_ZIP_EXPANSION = 16


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
    check it, so flipped bytes in tensor data are refused instead of loaded. An entry that would
    inflate to more than ``MAX_ZIP_EXPANSION`` times its stored size is refused before any inflating.
    A file that is neither a zip archive nor a legacy torch.save file is refused unread."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(len(LEGACY_MAGIC))
        if start == LEGACY_MAGIC:
            return  # the legacy (pre-1.6) format has no checksums; torch.load judges it
        if start[:1] == b"\x80":
            raise CheckpointError(
                f"{path}: refused: a raw pickle, not a file torch.save writes; raw pickles are never unpickled"
            )
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a torch.save file)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                if entry.file_size > MAX_ZIP_EXPANSION * entry.compress_size + 2**20:
                    raise CheckpointError(
                        f"{path}: refused: zip entry {entry.filename} would inflate {entry.compress_size} stored "
                        f"bytes to {entry.file_size}"
                    )
            bad = archive.testzip()
    except CheckpointError:
        raise
    except Exception as error:  # BadZipFile, OSError, EOFError, zlib.error, ... by the kind of damage
        raise CheckpointError(f"{path}: corrupt zip container ({_one_line(error)})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt: entry {bad} fails its CRC-32 check")


def unpickler_reason(error: BaseException) -> str:
    """What torch's restricted unpickler refused, in full ("Unsupported global: GLOBAL getattr was not
    an allowed global by default", "Trying to load unsupported GLOBAL posix.system whose module posix
    is blocked"), without torch's advice on loading the file unsafely."""
    text = " ".join(str(error).split())
    for marker in ("WeightsUnpickler error:", "from a trusted source."):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    for advice in (" Please use", " Check the documentation"):
        text = text.split(advice)[0]
    return first_sentences(text.strip())


def first_sentences(text: str, limit: int = 300) -> str:
    """``text`` on one line, shortened at the last sentence end before ``limit`` characters (or at a
    word, with "..."), never mid-word."""
    text = " ".join(text.split()).replace("\x1b[1m", "").replace("\x1b[0m", "")
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    if cut > 0:
        return text[: cut + 1]
    return text[: text.rfind(" ", 0, limit)] + " ..."


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import torch

    check_zip_integrity(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line only
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: the file is not a plain state_dict and loading it would need "
            f"arbitrary code execution ({unpickler_reason(error)})"
        ) from None
    except Exception as error:  # truncated zip, bad magic, ... : torch raises many kinds
        reason = first_sentences(_one_line(error))
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    state = filter_state_dict(obj, path)
    not_strings = [k for k in state if not isinstance(k, str)]
    if not_strings:
        raise CheckpointError(f"{path}: keys that are not strings (a state_dict's are names): {capped(not_strings)}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {capped(bad)}")
    return {k: to_numpy(v) for k, v in state.items()}, None


def write(checkpoint: Checkpoint, path) -> None:
    import torch

    torch.save({k: from_numpy(v) for k, v in checkpoint.tensors.items()}, str(path))
