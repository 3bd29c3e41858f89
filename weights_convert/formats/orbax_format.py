"""Orbax checkpoint directory (``*.orbax``) of the NNX state of ``impl_flax.AttentionUNet``: the tree
``nnx.state(model)`` saves to (Flax names, HWIO kernels, each variable's array under ``value``), so a
Flax user restores it with Orbax's own call::

    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(model, checkpointer.restore(path.absolute(), nnx.state(model)))

Reading restores to numpy from the checkpoint's own metadata, without the model and without JAX
arrays (which would round float64 to float32 when JAX's x64 mode is off). No config is stored:
reading infers it from the shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import nest, to_nnx
from weights_convert.formats.flax_msgpack_format import from_state_dict
from weights_convert.formats.safetensors_format import _one_line


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "_METADATA").is_file():
        raise CheckpointError(f"{path}: not an Orbax checkpoint (no _METADATA file in the directory)")
    _read_every_chunk(path)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata
            if metadata is None:
                raise CheckpointError(f"{path}: not an Orbax checkpoint (no tree metadata in the directory)")
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
            state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    except CheckpointError:
        raise
    except Exception as error:  # bad metadata, undecodable chunks, ...: Orbax and TensorStore raise many kinds
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({_one_line(error)[:200]})") from None
    return from_state_dict(state, path), None


def _read_every_chunk(path: Path) -> None:
    """Read the raw bytes of an OCDBT checkpoint one key at a time before Orbax restores it.

    Orbax restores all arrays concurrently; when one read fails it closes its event loop while
    the others are in flight, and each of those then prints an "Event loop is closed" traceback.
    A sequential pass finds truncated or missing data first and fails with one line.
    """
    if not (path / "manifest.ocdbt").is_file():
        return
    import tensorstore as ts

    try:
        store = ts.KvStore.open({"driver": "ocdbt", "base": path.as_uri() + "/"}).result()
        for key in store.list().result():
            store.read(key).result()
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({_one_line(error)[:200]})") from None


def write(checkpoint: Checkpoint, path) -> None:
    import orbax.checkpoint as ocp

    state = nest({p: np.require(v, requirements="C") for p, v in to_nnx(checkpoint).items()}, leaf_key="value")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), state)
