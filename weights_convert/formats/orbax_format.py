"""Orbax checkpoint directory (``*.orbax``) of the NNX state of ``impl_flax.AttentionUNet``: the tree
``nnx.state(model)`` saves to (Flax names, HWIO kernels, each variable's array under ``value``), so a
Flax user restores it with Orbax's own call::

    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(model, checkpointer.restore(path.absolute(), nnx.state(model)))

Reading restores to numpy from the checkpoint's own metadata, without the model and without JAX
arrays (which would round float64 to float32 when JAX's x64 mode is off). No config is stored:
reading infers it from the shapes. Each array keeps its dtype, mixed or not.

A training checkpoint is the tree of ``flax_msgpack_format``'s (``model``, ``optimizer`` as
``nnx.state(optimizer)`` saves it, ``hyperparameters``), so a Flax user restores the optimizer with
``checkpointer.restore(path, {"model": nnx.state(model), "optimizer": nnx.state(optimizer), ...})``
or the model alone with ``ocp.args.PyTreeRestore`` of the ``model`` item; the optimizer arrays'
shapes are checked against the model's parameters before anything is restored.

Before anything is restored, reading refuses a directory holding a symbolic link (so nothing
outside it is read) and checks every array's name, shape and dtype kind in the checkpoint's metadata
against the parameter table, so an array declaring far more elements than the model has is refused
before it is materialized. Orbax stores no checksum of the array data: a changed byte inside a
compressed chunk can decode to different values without an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.flax_layout import FLAX_LEAVES, flatten, nest, to_nnx
from weights_convert.core.layouts import has_kernel_rank
from weights_convert.core.spec import capped
from weights_convert.formats.flax_msgpack_format import (
    from_tree,
    is_training_tree,
    optimizer_tree,
)
from weights_convert.formats.vetting import check_declared, one_line

KEEPS_MIXED_DTYPES = True
HOLDS_OPTIMIZER = True

# Orbax and absl log warnings (a missing _CHECKPOINT_METADATA, unreadable metadata) that a refusal
# already says in its one line; asyncio logs the tasks a failed restore leaves behind.
QUIET_LOGGERS = ("absl", "asyncio", "orbax")


def read(path) -> tuple[dict[str, np.ndarray], None]:
    import jax
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "_METADATA").is_file():
        raise CheckpointError(f"{path}: not an Orbax checkpoint (no _METADATA file in the directory)")
    _refuse_links(path)
    with _quiet():
        _read_every_chunk(path)
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                metadata = checkpointer.metadata(path).item_metadata
                if metadata is None:
                    raise CheckpointError(f"{path}: not an Orbax checkpoint (no tree metadata in the directory)")
                if is_training_tree(metadata.tree):
                    config = _check_metadata_against_table(path, metadata.tree["model"])
                    _check_optimizer_metadata(path, metadata.tree, config)
                else:
                    _check_metadata_against_table(path, metadata.tree)
                as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata.tree)
                state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
        except CheckpointError:
            raise
        except Exception as error:  # bad metadata, undecodable chunks, ...: Orbax and TensorStore raise many kinds
            raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({one_line(error)[:300]})") from None
    return from_tree(state, path)


def _check_optimizer_metadata(path: Path, tree, config) -> None:
    """Before restoring: at most two slots and two counters per parameter, each array a scalar or
    shaped as a parameter in Flax layout, so the optimizer part is bounded by the model's size."""
    from weights_convert.core.layouts import rule
    from weights_convert.core.spec import param_specs

    trainable = [p for p in param_specs(config) if not p.is_buffer]
    shapes = {(): 1} | {tuple(rule(p).to_channels_last(np.zeros(p.shape, np.int8)).shape): 1 for p in trainable}
    leaves = list(flatten(tree["optimizer"]).items()) + list(flatten(tree["hyperparameters"]).items())
    if len(leaves) > 2 * len(trainable) + 2 + 16:
        raise CheckpointError(f"{path}: {len(leaves)} optimizer arrays for a model of {len(trainable)} parameters")
    for key, leaf in leaves:
        shape = tuple(getattr(leaf, "shape", None) or ())
        if shape not in shapes:
            name = "/".join(map(str, key))
            raise CheckpointError(f"{path}: optimizer array {name} has shape {shape}, which no parameter has")


def _refuse_links(path: Path) -> None:
    """Refuse a checkpoint directory holding symbolic links: everything read must lie inside it."""
    links = sorted(
        os.path.relpath(os.path.join(folder, name), path)
        for folder, directories, files in os.walk(path)
        for name in directories + files
        if os.path.islink(os.path.join(folder, name))
    )
    if links:
        raise CheckpointError(
            f"{path}: refused: symbolic links in an Orbax checkpoint could read outside it: {capped(links)}"
        )


def _check_metadata_against_table(path: Path, tree):
    """Every array's canonical name and shape against the parameter table, from the metadata alone:
    zero-stride placeholders of the declared shape and dtype stand in for the arrays. Returns the
    inferred config."""
    placeholders = {}
    for nnx_path, leaf in flatten(tree).items():
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            raise CheckpointError(f"{path}: entry {'/'.join(map(str, nnx_path))} is not an array")
        try:
            value = np.broadcast_to(np.zeros((), np.dtype(dtype)), tuple(shape))
        except (TypeError, ValueError) as error:  # an unknown dtype or a shape too large to index
            name = "/".join(map(str, nnx_path))
            raise CheckpointError(f"{path}: array {name} of shape {tuple(shape)} ({one_line(error)})") from None
        *module, leaf_name = (str(p) for p in nnx_path)
        if leaf_name in FLAX_LEAVES:
            canonical, from_channels_last = FLAX_LEAVES[leaf_name]
            if has_kernel_rank(value):
                value = from_channels_last(value)  # a view: still no memory
            placeholders[".".join([*module, canonical])] = value
        else:
            placeholders[".".join([*module, leaf_name])] = value
    return check_declared(placeholders, path)


def _is_closed_loop(error) -> bool:
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _drop_closed_loop_reports() -> None:
    """Drop the "Event loop is closed" reports, and only those, from ``sys.unraisablehook`` and
    ``threading.excepthook``, once per process. When one array of a restore fails, Orbax closes its
    event loop while TensorStore still completes the others, and each completion reports that the
    loop is gone, possibly after the failed read has returned; every other report passes unchanged."""
    if getattr(sys.unraisablehook, "drops_closed_loop_reports", False):
        return
    unraisable_hook, thread_hook = sys.unraisablehook, threading.excepthook

    def unraisable(report):
        if not _is_closed_loop(report.exc_value):
            unraisable_hook(report)

    def thread(report):
        if not _is_closed_loop(report.exc_value):
            thread_hook(report)

    unraisable.drops_closed_loop_reports = True
    sys.unraisablehook, threading.excepthook = unraisable, thread


@contextlib.contextmanager
def _quiet():
    """Orbax's, absl's and asyncio's logging off for one read; closed-loop reports dropped."""
    _drop_closed_loop_reports()
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({one_line(error)[:300]})") from None


def write(checkpoint: Checkpoint, path) -> None:
    import orbax.checkpoint as ocp

    state = nest({p: np.require(v, requirements="C") for p, v in to_nnx(checkpoint).items()}, leaf_key="value")
    if checkpoint.optimizer is not None:
        flat, hyper = optimizer_tree(checkpoint.optimizer, checkpoint.config, checkpoint.float_dtype)
        state = {"model": state, "optimizer": nest(flat, leaf_key="value"), "hyperparameters": hyper}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), state)
