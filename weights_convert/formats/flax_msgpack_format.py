"""Flax ``.msgpack``: ``flax.serialization`` bytes of the NNX state of ``impl_flax.AttentionUNet`` as
a pure dict (``nnx.to_pure_dict``: nested string keys, Flax names, HWIO kernels). The format holds
no config: reading infers it from the tensor shapes. A Flax user restores a file into a model with::

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, flax.serialization.msgpack_restore(data))
    nnx.update(model, state)

(or ``flax.serialization.from_bytes(nnx.to_pure_dict(state), data)`` for the pure dict). Reading
needs only flax's msgpack decoder: msgpack holds data, never code, and nothing imports the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import flatten, from_nnx, nest, to_nnx
from weights_convert.formats.safetensors_format import _one_line


def read(path) -> tuple[dict[str, np.ndarray], None]:
    from flax import serialization

    try:
        data = Path(path).read_bytes()
        state = serialization.msgpack_restore(data)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({_one_line(error)})") from None
    except Exception as error:  # msgpack raises ValueError, ExtraData, FormatError, ... on bad bytes
        raise CheckpointError(f"{path}: not a readable Flax msgpack file ({_one_line(error)[:200]})") from None
    return from_state_dict(state, path), None


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
    from flax import serialization

    state = nest({p: np.require(v, requirements="C") for p, v in to_nnx(checkpoint).items()})
    with open(path, "xb") as f:
        f.write(serialization.msgpack_serialize(state))
