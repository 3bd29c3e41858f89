"""PyTorch ``.pt`` / ``.pth`` state_dicts, read only with ``torch.load(weights_only=True)``: a pickle
that would run code is refused by torch's restricted unpickler and never executed.

Only what ``torch.save`` writes is handed to torch: a zip archive (whose CRC-32s are checked first,
and whose entries may not expand far beyond their stored size) or the legacy pre-1.6 format. A raw
pickle is refused without being unpickled. Each tensor keeps its dtype, mixed or not.

A training checkpoint is ``{"model": state_dict, "optimizer": optimizer.state_dict()}``, the form
``torch.optim`` saves and loads: one parameter group whose ``params`` are the indices of the
model's parameters in ``model.parameters()`` order (the canonical trainable tensors, in order), and
per-parameter state under those indices (``torch_optimizer_state`` / ``canonical_optimizer_state``)."""

from __future__ import annotations

import pickle
import warnings
import zipfile

import numpy as np

from weights_convert.core.architectures import Config, infer_config
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.optimizer_state import OptimizerState, UnsupportedOptimizer, stored_step
from weights_convert.core.spec import capped, param_specs
from weights_convert.formats.vetting import one_line

WRAPPER_KEYS = ("state_dict", "model")
DATA_PARALLEL_PREFIX = "module."
# A training framework's module holding the network as an attribute (Lightning's ``self.model``,
# ``self.net``): every key carries that prefix, stripped when the rest are the canonical names.
WRAPPER_PREFIXES = ("model.", "net.", "module.")
CANONICAL_MARKER = "output.weight"
KEEPS_MIXED_DTYPES = True
HOLDS_OPTIMIZER = True

# torch.optim's parameter-group settings beyond the canonical hyperparameters, with the only value
# the canonical definitions (torch's own defaults) allow; anything else is refused, not approximated.
TORCH_FIXED = {
    "sgd": {"dampening": 0, "maximize": False, "foreach": None, "differentiable": False, "fused": None},
    "adam": {
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
    },
}
IGNORED_SETTINGS = ("foreach", "fused", "capturable", "differentiable")  # how torch computes, not what
TORCH_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}

# The first bytes of a legacy (pre-1.6) torch.save file: its magic number, pickled with protocol 2.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]

# How much larger than its stored bytes a zip entry may be once inflated. torch.save stores entries
# uncompressed (ratio 1); a ratio beyond this is a zip bomb, refused before torch inflates it.
MAX_ZIP_EXPANSION = 16


def filter_state_dict(obj, path) -> dict:
    """Unwrap foreign checkpoints: ``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's
    ``module.`` prefix and a training module's ``model.`` / ``net.`` (``WRAPPER_PREFIXES``, e.g. a
    Lightning ``state_dict``). Native state_dicts pass through unchanged."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    for key in WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict) and not _is_tensor_dict(obj):
            obj = obj[key]
            break
    if obj and all(isinstance(k, str) and k.startswith(DATA_PARALLEL_PREFIX) for k in obj):
        obj = {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in obj.items()}
    for _ in WRAPPER_PREFIXES:  # nested wrappers: "model.module.", "net.model." ...
        prefix = next((p for p in WRAPPER_PREFIXES if _wraps_canonical(obj, p)), None)
        if prefix is None:
            break
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _wraps_canonical(obj: dict, prefix: str) -> bool:
    """Whether every key of ``obj`` is ``prefix`` + a name, the names the canonical ones (the
    output conv is in every config): a module that kept the network as an attribute."""
    keys = [k for k in obj if isinstance(k, str)]
    return (
        bool(obj)
        and len(keys) == len(obj)
        and all(k.startswith(prefix) for k in keys)
        and (prefix + CANONICAL_MARKER in obj)
    )


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
        raise CheckpointError(f"{path}: corrupt zip container ({one_line(error)})") from None
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


def read(path) -> tuple[dict[str, np.ndarray], None, OptimizerState | None]:
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
        reason = first_sentences(one_line(error))
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    optimizer_dict = obj.get("optimizer") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else None
    if not (isinstance(optimizer_dict, dict) and {"state", "param_groups"} <= set(optimizer_dict)):
        optimizer_dict = None  # a foreign wrapper's own entry, not an optimizer.state_dict(): weights only
    state = filter_state_dict(obj, path)
    not_strings = [k for k in state if not isinstance(k, str)]
    if not_strings:
        raise CheckpointError(f"{path}: keys that are not strings (a state_dict's are names): {capped(not_strings)}")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {capped(bad)}")
    tensors = {k: to_numpy(v) for k, v in state.items()}
    optimizer = None
    if optimizer_dict is not None:
        try:
            config = infer_config({k: v.shape for k, v in tensors.items()})
        except ValueError as error:
            raise CheckpointError(f"{path}: {one_line(error)}") from None
        optimizer = canonical_optimizer_state(optimizer_dict, config, source=str(path))
    return tensors, None, optimizer


def write(checkpoint: Checkpoint, path) -> None:
    import torch

    model = {k: from_numpy(v) for k, v in checkpoint.tensors.items()}
    if checkpoint.optimizer is None:
        torch.save(model, str(path))
        return
    optimizer = torch_optimizer_state(checkpoint.optimizer, checkpoint.config)
    torch.save({"model": model, "optimizer": optimizer}, str(path))


def torch_optimizer_state(state: OptimizerState, config: Config) -> dict:
    """The canonical optimizer state as ``torch.optim.SGD`` / ``Adam`` / ``AdamW.state_dict()`` of an
    optimizer over ``model.parameters()``."""
    import torch

    hyper = state.hyper
    trainable = [p.name for p in param_specs(config) if not p.is_buffer]
    if state.name == "sgd":
        group = {"lr": hyper["lr"], "momentum": hyper["momentum"], "weight_decay": hyper["weight_decay"]}
        group.update(nesterov=hyper["nesterov"], **TORCH_FIXED["sgd"])
    else:
        group = {"lr": hyper["lr"], "betas": (hyper["b1"], hyper["b2"]), "eps": hyper["eps"]}
        group.update(weight_decay=hyper["weight_decay"], **TORCH_FIXED["adam"])
        group["decoupled_weight_decay"] = state.name == "adamw"
    group["params"] = list(range(len(trainable)))
    per_param = {}
    for index, name in enumerate(trainable):
        if not state.slots:
            break
        entry = {slot: from_numpy(np.array(state.slots[slot][name])) for slot in state.slots}
        if state.name != "sgd":  # torch keeps Adam's step as a float32 tensor per parameter
            entry = {"step": torch.tensor(float(state.step)), **entry}
        per_param[index] = entry
    return {"state": per_param, "param_groups": [group]}


def canonical_optimizer_state(obj, config: Config, *, source: str) -> OptimizerState:
    """``optimizer.state_dict()`` of torch SGD, Adam or AdamW over the model's parameters -> the
    canonical state; a setting outside the canonical definitions is refused in one line."""
    import torch

    if not (isinstance(obj, dict) and isinstance(obj.get("state"), dict) and isinstance(obj.get("param_groups"), list)):
        raise CheckpointError(f"{source}: 'optimizer' is not an optimizer.state_dict() (state and param_groups)")
    if len(obj["param_groups"]) != 1 or not isinstance(obj["param_groups"][0], dict):
        raise UnsupportedOptimizer(f"{source}: {len(obj['param_groups'])} parameter groups; one group is supported")
    group = dict(obj["param_groups"][0])
    trainable = [p.name for p in param_specs(config) if not p.is_buffer]
    if group.pop("params", None) != list(range(len(trainable))):
        raise UnsupportedOptimizer(f"{source}: the optimizer's params are not the model's {len(trainable)} parameters")
    kind = "sgd" if "momentum" in group else "adam" if "betas" in group else None
    if kind is None:
        raise UnsupportedOptimizer(f"{source}: not an SGD, Adam or AdamW state_dict (settings {sorted(group)})")
    name = "adamw" if kind == "adam" and group.pop("decoupled_weight_decay", False) else kind
    fixed = {k: group.pop(k, v) for k, v in TORCH_FIXED[kind].items()}
    wrong = {k: v for k, v in fixed.items() if k not in IGNORED_SETTINGS and v != TORCH_FIXED[kind][k]}
    if wrong:
        raise UnsupportedOptimizer(
            f"{source}: torch {name} with {wrong} has no canonical form (supported: {TORCH_FIXED[kind]})"
        )
    try:
        if kind == "sgd":
            hyper = {k: float(group.pop(k)) for k in ("lr", "momentum", "weight_decay")}
            hyper["nesterov"] = bool(group.pop("nesterov"))
        else:
            b1, b2 = group.pop("betas")
            hyper = {"lr": float(group.pop("lr")), "b1": float(b1), "b2": float(b2), "eps": float(group.pop("eps"))}
            hyper["weight_decay"] = float(group.pop("weight_decay"))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: torch {name} parameter group lacks or mangles {one_line(error)}") from None
    hyper["decoupled_weight_decay"] = name == "adamw"
    if group:
        raise UnsupportedOptimizer(f"{source}: torch {name} settings without a canonical form: {sorted(group)}")
    per_param = obj["state"]
    if set(per_param) - set(range(len(trainable))):
        raise CheckpointError(
            f"{source}: optimizer state for parameters that the model lacks: {capped(sorted(per_param, key=str))}"
        )
    slots: dict = {}
    steps = set()
    if per_param:
        if set(per_param) != set(range(len(trainable))):
            raise CheckpointError(f"{source}: optimizer state for {len(per_param)} of {len(trainable)} parameters")
        for index, entry in per_param.items():
            entry = {k: v for k, v in entry.items() if v is not None} if isinstance(entry, dict) else entry
            if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
                raise CheckpointError(f"{source}: optimizer state {index} is not a map of tensors")
            if "step" in entry:
                steps.add(stored_step(to_numpy(entry["step"]), source))
            for slot in TORCH_SLOTS[kind]:
                if slot in entry:
                    slots.setdefault(slot, {})[trainable[index]] = to_numpy(entry[slot])
    if kind == "sgd":
        step = None if slots else 0
    elif len(steps) > 1 or any(s != int(s) for s in steps):
        raise UnsupportedOptimizer(
            f"{source}: parameters at different steps {sorted(steps)}; one step count is supported"
        )
    else:
        step = int(steps.pop()) if steps else 0
    return OptimizerState(name, hyper, step, slots)
