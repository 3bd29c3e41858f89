"""Flax ``.msgpack``: ``flax.serialization`` bytes of the NNX state of ``impl_flax.AttentionUNet`` as
a pure dict (``nnx.to_pure_dict``: nested string keys, Flax names, HWIO kernels), read and written
with the ``msgpack`` package alone. The format holds no config: reading infers it from the tensor
shapes. A Flax user restores a file into a model with::

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(data))
    nnx.update(model, state)

(or ``flax.serialization.from_bytes(nnx.to_pure_dict(state), data)`` for the pure dict).

A training checkpoint is ``{"model": <model state>, "optimizer": <nnx.Optimizer state>,
"hyperparameters": {<optimizer name>: {<name>: value}}}``: the optimizer's state as the pure dict
of ``nnx.state(optimizer)`` for ``impl_flax.training.make_optimizer``'s transformation (``step``
and the optax state, whose ``trace`` / ``mu`` / ``nu`` trees mirror the model's parameters), so a
Flax user restores it with ``nnx.replace_by_pure_dict(nnx.state(optimizer), restored["optimizer"])``;
optax keeps no hyperparameters, so they are stored beside it (``optimizer_tree``,
``optimizer_from_tree``). A step count that torch SGD did not keep is written as 0, and SGD momentum at step 0 is read
back as that unknown count.

The encoding is ``flax.serialization.msgpack_serialize``'s, byte for byte: the tree, keys sorted,
packed with ``strict_types``; each array an ``ExtType(1, packb((shape, dtype name, C-order
bytes)))`` (``bfloat16`` by that name), a NumPy scalar ``ExtType(3, ...)`` the same way, and an
array over ``MAX_CHUNK_SIZE`` bytes split into a ``{"__msgpack_chunked_array__": True, "shape":
{...}, "chunks": {...}}`` dict of flat pieces.
Reading accepts numeric dtypes only and checks that each buffer holds exactly the bytes its shape
declares before making an array: msgpack holds data, never code, and memory stays within a small
multiple of the file's size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import flatten, from_nnx, nest, nnx_path, to_nnx
from weights_convert.core.layouts import rule
from weights_convert.core.optimizer_state import (
    DEFAULTS,
    OptimizerState,
    counted_state,
    slot_names,
    stored_hyperparameter,
    stored_step,
)
from weights_convert.core.spec import ModelConfig, param_specs
from weights_convert.formats.vetting import inferred_config, one_line

# Each array carries its own dtype: a checkpoint mixing float dtypes is written exactly.
KEEPS_MIXED_DTYPES = True
HOLDS_OPTIMIZER = True

# The top-level keys of a training checkpoint (a model state never has them: its keys are modules).
TRAINING_KEYS = {"model", "optimizer", "hyperparameters"}
# canonical slot -> the optax state field holding it
OPTAX_FIELDS = {"momentum_buffer": "trace", "exp_avg": "mu", "exp_avg_sq": "nu"}
# flax.serialization's extension type codes.
EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
# flax.serialization splits an array above this many bytes (msgpack's limit is 2**31 - 1 per object).
MAX_CHUNK_SIZE = 2**30
CHUNKED = "__msgpack_chunked_array__"
# Dtype kinds an array may have: booleans, integers, floats, complex (plus bfloat16 by name).
NUMERIC_KINDS = "biufc"
MAX_NDIM = 32


def read(path) -> tuple[dict[str, np.ndarray], None] | tuple[dict[str, np.ndarray], None, OptimizerState]:
    import msgpack

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({one_line(error)})") from None
    try:
        state = unchunk(msgpack.unpackb(data, ext_hook=_ext_unpack, raw=False, strict_map_key=False))
    except Exception as error:  # msgpack raises ValueError, ExtraData, FormatError, ... on bad bytes
        raise CheckpointError(f"{path}: not a readable Flax msgpack file ({one_line(error)[:200]})") from None
    return from_tree(state, path)


def from_tree(state, path) -> tuple[dict[str, np.ndarray], None] | tuple[dict[str, np.ndarray], None, OptimizerState]:
    """A state tree read back, in ``read``'s terms: the canonical tensors, no config, and a training
    tree's optimizer state."""
    if is_training_tree(state):
        tensors = from_state_dict(state["model"], path)
        optimizer = optimizer_from_tree(flatten(state["optimizer"]), state["hyperparameters"], tensors, path)
        return tensors, None, optimizer
    return from_state_dict(state, path), None


def is_training_tree(tree) -> bool:
    return isinstance(tree, dict) and set(tree) == TRAINING_KEYS


def optax_prefix(state: OptimizerState) -> tuple:
    """Where the optimizer's own optax state sits in ``nnx.state(optimizer)``: behind
    ``add_decayed_weights`` when an L2 weight decay comes first (``impl_flax.training.transformation``)."""
    l2 = state.hyper["weight_decay"] and not state.hyper["decoupled_weight_decay"]
    return ("opt_state", 1, 0) if l2 else ("opt_state", 0)


def optimizer_tree(state: OptimizerState, config: ModelConfig, dtype=np.float32) -> tuple[dict, dict]:
    """(``{path: array}`` of ``nnx.state(optimizer)``, the hyperparameters tree) of ``state``; a
    fresh optimizer's slots are zeros of ``dtype``, as optax starts them."""
    step = state.step or 0
    flat: dict = {("step",): np.asarray(step, np.uint32)}
    prefix = optax_prefix(state)
    if state.name != "sgd":
        flat[(*prefix, "count")] = np.asarray(step, np.int32)
    trainable = [p for p in param_specs(config) if not p.is_buffer]
    for slot in slot_names(state.name, state.hyper):
        for spec in trainable:
            value = state.slots[slot][spec.name] if state.slots else np.zeros(spec.shape, dtype)
            flat[(*prefix, OPTAX_FIELDS[slot], *nnx_path(spec))] = np.require(
                rule(spec).to_channels_last(np.asarray(value)), requirements="C"
            )
    hyper = {state.name: {k: np.asarray(v) for k, v in state.hyper.items()}}
    return flat, hyper


def optimizer_from_tree(flat: dict, hyper_tree, tensors: dict, path) -> OptimizerState:
    """The canonical state from ``optimizer_tree``'s two parts (``flat`` with string path keys, as
    read back); ``tensors`` are the model's, for its config. Checked later, with the model."""
    if not (isinstance(hyper_tree, dict) and len(hyper_tree) == 1 and next(iter(hyper_tree)) in DEFAULTS):
        raise CheckpointError(f"{path}: hyperparameters must name one optimizer of {sorted(DEFAULTS)}")
    name, values = next(iter(hyper_tree.items()))
    if not isinstance(values, dict) or set(values) != set(DEFAULTS[name]):
        raise CheckpointError(f"{path}: {name} hyperparameters must be exactly {sorted(DEFAULTS[name])}")
    hyper = {k: stored_hyperparameter(v, isinstance(DEFAULTS[name][k], bool), k, str(path)) for k, v in values.items()}
    by_key = {tuple(str(p) for p in key): value for key, value in flat.items()}
    step_value = by_key.get(("step",))
    if not isinstance(step_value, np.ndarray | np.generic) or np.asarray(step_value).shape != ():
        raise CheckpointError(f"{path}: the optimizer state has no scalar step")
    step = stored_step(step_value, str(path))
    state = OptimizerState(name, hyper, step, {})
    config = inferred_config(tensors, path)
    expected, _ = optimizer_tree(state, config)
    expected = {tuple(str(p) for p in key): key for key in expected}
    if set(by_key) != set(expected):
        missing, unexpected = sorted(set(expected) - set(by_key)), sorted(set(by_key) - set(expected))
        missing, unexpected = (["/".join(k) for k in keys][:5] for keys in (missing, unexpected))
        raise CheckpointError(
            f"{path}: the {name} optimizer state does not match the model: missing {missing}, unexpected {unexpected}"
        )
    prefix_length = len(optax_prefix(state))
    specs = {tuple(str(p) for p in nnx_path(p)): p for p in param_specs(config) if not p.is_buffer}
    slots: dict = {}
    for key, value in by_key.items():
        if key[-1] == "count" and len(key) == prefix_length + 1:
            if int(np.asarray(value)) != step:
                raise CheckpointError(f"{path}: the optax count {int(np.asarray(value))} differs from the step {step}")
            continue
        if key == ("step",):
            continue
        field, spec = key[prefix_length], specs[key[prefix_length + 1 :]]
        slot = next(s for s, f in OPTAX_FIELDS.items() if f == field)
        array = np.asarray(value)
        if array.ndim != len(spec.shape):
            raise CheckpointError(f"{path}: optimizer slot {'/'.join(key)} has shape {array.shape}")
        slots.setdefault(slot, {})[spec.name] = rule(spec).from_channels_last(array)
    return counted_state(name, hyper, step, slots)


def _ext_unpack(code: int, data: bytes):
    if code == EXT_NDARRAY:
        return ndarray_from_bytes(data)
    if code == EXT_NPSCALAR:
        return ndarray_from_bytes(data)[()]
    if code == EXT_COMPLEX:
        import msgpack

        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code}")


def ndarray_from_bytes(data: bytes) -> np.ndarray:
    """``(shape, dtype name, buffer)`` -> a writable array, once the buffer is checked to hold
    exactly the bytes the shape and dtype declare."""
    import msgpack

    fields = msgpack.unpackb(data, raw=True)
    if not isinstance(fields, list) or len(fields) != 3:
        raise ValueError("an array entry is not (shape, dtype, bytes)")
    shape, name, buffer = fields
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(f"an array entry has the shape {shape!r}")
    if not isinstance(name, bytes) or not isinstance(buffer, bytes):
        raise ValueError("an array entry's dtype or data is not bytes")
    dtype = _dtype(name.decode("ascii", "replace"))
    declared = math.prod(shape) * dtype.itemsize
    if declared != len(buffer):
        raise ValueError(f"an array entry of shape {tuple(shape)} and dtype {dtype} holds {len(buffer)} bytes")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape).copy()


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    try:
        dtype = np.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in NUMERIC_KINDS or dtype.name != name:
        raise ValueError(f"an array entry has the dtype {name[:40]!r}, not a numeric one")
    return dtype


def unchunk(tree):
    """flax.serialization's chunked arrays (dicts marked ``CHUNKED``) back into arrays."""
    if not isinstance(tree, dict):
        return tree
    if CHUNKED in tree:
        return _unchunk_array(tree)
    return {key: unchunk(value) for key, value in tree.items()}


def _unchunk_array(entry: dict) -> np.ndarray:
    shape, chunks = entry.get("shape"), entry.get("chunks")
    if not isinstance(shape, dict) or not isinstance(chunks, dict):
        raise ValueError("a chunked array without its shape or chunks")
    shape = [shape.get(str(i)) for i in range(len(shape))]
    pieces = [chunks.get(str(i)) for i in range(len(chunks))]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or len(shape) > MAX_NDIM:
        raise ValueError(f"a chunked array has the shape {shape!r}")
    if not pieces or not all(isinstance(p, np.ndarray) and p.ndim == 1 and p.dtype == pieces[0].dtype for p in pieces):
        raise ValueError("a chunked array's chunks are not flat arrays of one dtype")
    if sum(p.size for p in pieces) != math.prod(shape):
        raise ValueError(f"a chunked array's chunks do not fill its shape {tuple(shape)}")
    return np.concatenate(pieces).reshape(shape)


def from_state_dict(state, path) -> dict[str, np.ndarray]:
    """A restored NNX state (nested dicts of arrays) -> canonical tensors."""
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: expected the NNX state as a nested dict of arrays, got {type(state).__name__}")
    flat = flatten(state)
    bad = sorted("/".join(map(str, p)) for p, v in flat.items() if not isinstance(v, (np.ndarray, np.generic)))
    if bad:
        raise CheckpointError(f"{path}: entries that are not arrays: {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return from_nnx(flat)


def write(checkpoint: Checkpoint, path) -> None:
    state = nest({p: np.require(v, requirements="C") for p, v in to_nnx(checkpoint).items()})
    if checkpoint.optimizer is not None:
        flat, hyper = optimizer_tree(checkpoint.optimizer, checkpoint.config, checkpoint.float_dtype)
        state = {"model": state, "optimizer": nest(flat), "hyperparameters": hyper}
    with open(path, "xb") as f:
        f.write(serialize(state))


def serialize(tree) -> bytes:
    """``flax.serialization.msgpack_serialize(tree)`` for nested dicts of NumPy arrays."""
    import msgpack

    return msgpack.packb(chunk(tree), default=_ext_pack, strict_types=True)


def chunk(tree):
    """The tree as ``msgpack_serialize`` packs it: dict keys sorted (its ``jax.tree_util`` copy
    sorts them) and arrays over ``MAX_CHUNK_SIZE`` bytes as chunked dicts."""
    if isinstance(tree, dict):
        return {key: chunk(tree[key]) for key in sorted(tree)}
    if isinstance(tree, np.ndarray) and tree.size * tree.dtype.itemsize > MAX_CHUNK_SIZE:
        size = max(1, int(MAX_CHUNK_SIZE / tree.dtype.itemsize))
        flat = tree.reshape(-1)
        pieces = [flat[i : i + size] for i in range(0, flat.size, size)]
        return {
            CHUNKED: True,
            "shape": {str(i): d for i, d in enumerate(tree.shape)},
            "chunks": {str(i): piece for i, piece in enumerate(pieces)},
        }
    return tree


def _ext_pack(value):
    import msgpack

    if isinstance(value, np.ndarray):
        return msgpack.ExtType(EXT_NDARRAY, ndarray_to_bytes(value))
    if isinstance(value, np.generic):
        return msgpack.ExtType(EXT_NPSCALAR, ndarray_to_bytes(np.asarray(value)))
    if isinstance(value, complex):
        return msgpack.ExtType(EXT_COMPLEX, msgpack.packb((value.real, value.imag)))
    raise TypeError(f"cannot serialize a {type(value).__name__} in a Flax msgpack file")


def ndarray_to_bytes(value: np.ndarray) -> bytes:
    import msgpack

    if value.dtype.hasobject or value.dtype.isalignedstruct:
        raise ValueError("object and structured dtypes cannot be serialized")
    return msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
