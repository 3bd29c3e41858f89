"""Canonical tensors <-> the NNX state of ``impl_flax.AttentionUNet``, in numpy only.

The Flax model keeps the torch module tree, with each ``nn.Sequential`` an ``nnx.List`` holding the
same layers at the same indices, so a canonical tensor's NNX state path is its module path (Sequential
indices as integers) plus the Flax leaf name of ``LEAF_RULES``: ``nnx_path`` below is the whole rule.
The ``.msgpack`` and ``.orbax`` formats and ``impl_flax.io`` all go through this module, so reading a
Flax checkpoint never needs the model.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.layouts import LEAF_RULES, has_kernel_rank, module_path, rule
from weights_convert.core.spec import ParamSpec, param_specs

Path = tuple  # of str and int: ("e1", "conv", "conv", 0, "kernel")


def nnx_path(spec: ParamSpec) -> Path:
    """``e1.conv.conv.0.weight`` -> ``("e1", "conv", "conv", 0, "kernel")``."""
    return tuple(int(p) if p.isdigit() else p for p in module_path(spec)) + (rule(spec).flax,)


def _reverse_rules() -> dict:
    """Flax leaf name -> (canonical leaf, channels-last -> canonical layout); one meaning per name."""
    reverse: dict = {}
    for (_, leaf), leaf_rule in LEAF_RULES.items():
        entry = (leaf, leaf_rule.from_channels_last)
        if reverse.setdefault(leaf_rule.flax, entry) != entry:
            raise AssertionError(f"the Flax leaf {leaf_rule.flax!r} has two canonical meanings")
    return reverse


FLAX_LEAVES = _reverse_rules()


def to_nnx(checkpoint: Checkpoint) -> dict[Path, np.ndarray]:
    """Canonical checkpoint -> {NNX state path: array in Flax layout}, in ``state_dict`` order."""
    specs = param_specs(checkpoint.config)
    return {nnx_path(p): rule(p).to_channels_last(checkpoint.tensors[p.name]) for p in specs}


def from_nnx(flat: dict[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """{NNX state path: array} -> canonical tensors. A path with an unknown leaf keeps its dotted
    form, so the checkpoint validation reports it as unexpected instead of dropping it."""
    tensors = {}
    for path, value in flat.items():
        value = np.asarray(value)
        *module, leaf = (str(p) for p in path)
        if leaf not in FLAX_LEAVES:
            tensors[".".join(str(p) for p in path)] = value
            continue
        canonical, from_channels_last = FLAX_LEAVES[leaf]
        if has_kernel_rank(value):
            value = np.ascontiguousarray(from_channels_last(value))
        if value.dtype.kind in "iu":
            value = value.astype(np.int64)  # torch's counter type; NNX without x64 holds int32
        tensors[".".join([*module, canonical])] = value
    return tensors


def nest(flat: dict[Path, object], *, leaf_key: str | None = None) -> dict:
    """{path: value} -> nested dicts with string keys (the serialized form of an NNX state); with
    ``leaf_key`` each value sits one level deeper under that key, as Orbax stores ``nnx.Variable``."""
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = {leaf_key: value} if leaf_key else value
    return nested


def flatten(nested, prefix: Path = ()) -> dict[Path, object]:
    """Nested dicts -> {path: leaf}; a ``{"value": leaf}`` wrapper (an ``nnx.Variable`` as Orbax and
    ``nnx.State`` store it) counts as the leaf itself."""
    if isinstance(nested, dict) and set(nested) == {"value"} and not isinstance(nested["value"], dict):
        return {prefix: nested["value"]}
    if not isinstance(nested, dict):
        return {prefix: nested}
    flat: dict = {}
    for key, value in nested.items():
        flat.update(flatten(value, prefix + (key,)))
    return flat
