"""The data-parallel contract every implementation trains under: D devices, each taking one
consecutive 1/D of every batch, gradients averaged over the devices, and one of two BatchNorm modes.

- ``"sync"``: every BatchNorm normalizes with the statistics of the global batch (torch
  ``SyncBatchNorm``; JAX reductions over the whole sharded batch axis). The training run is the
  single-device run on the whole batch, running statistics included.
- ``"local"``: every device normalizes with its own shard's statistics (torch DDP's default). The
  loss is the mean of the shards' losses and the gradient the mean of the shards' gradients. Each
  device also updates its running statistics from its own shard; the ones kept (returned, and
  written to checkpoints) are device 0's, which torch DDP broadcasts to every device at the start
  of each forward (``broadcast_buffers=True``): so after step k they are the running average of
  shard 0's statistics over steps 1..k, in every framework.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.optim import PRESETS, preset

BATCHNORM_MODES = ("sync", "local")


def check_data_parallel(devices: int, batchnorm: str, batch: int | None = None) -> None:
    """A ValueError naming the problem unless ``devices`` >= 1, ``batchnorm`` is a mode and
    ``batch`` (when given) splits into ``devices`` equal shards."""
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"data parallel needs a positive number of devices, got {devices!r}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {batchnorm!r}")
    if batch is not None and batch % devices:
        raise ValueError(f"batch {batch} does not split into {devices} equal shards")


def shard(batch: np.ndarray, rank: int, devices: int) -> np.ndarray:
    """Device ``rank``'s consecutive 1/``devices`` of ``batch`` (first axis)."""
    size = len(batch) // devices
    return batch[rank * size : (rank + 1) * size]


class ArrayBatches:
    """Training batches from stacked arrays: step k (from 0) is ``(xs[k], targets[k])``, NCHW.
    Every data source of a training loop has this ``batch(step)`` method and ``steps``."""

    def __init__(self, xs, targets):
        from weights_convert.core.optim import check_fit_batches

        self.xs, self.targets = check_fit_batches(xs, targets)
        self.steps = len(self.xs)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.xs[step], self.targets[step]


# The optimizers of ``attention-unet train`` and of the data-parallel fits: the registry's "train"
# preset (``weights_convert.core.optim.PRESETS``).
TRAINING_OPTIMIZERS = tuple(PRESETS["train"])


def training_hyperparameters(name: str) -> dict:
    """The canonical hyperparameters of training optimizer ``name`` (``preset("train", name)``); a
    ValueError naming the choices otherwise."""
    return preset("train", name)


def starting_state(checkpoint, optimizer: str, use: str = "train"):
    """The ``OptimizerState`` a training loop starts from: a training checkpoint's own, whose
    optimizer must be ``optimizer`` (a ValueError saying both otherwise), or a fresh ``optimizer``
    (step 0, no slots) with the hyperparameters of registry preset ``use`` (``core.optim.PRESETS``)."""
    from weights_convert.core.optim import check_training
    from weights_convert.core.optimizer_state import OptimizerState

    check_training(checkpoint, optimizer)
    state = checkpoint.optimizer
    return OptimizerState(optimizer, preset(use, optimizer), 0, {}) if state is None else state


def with_optimizer(checkpoint, optimizer: str, use: str = "train"):
    """``checkpoint`` as a training checkpoint: its own optimizer state, or a fresh ``optimizer``
    (``starting_state``)."""
    import dataclasses

    return dataclasses.replace(checkpoint, optimizer=starting_state(checkpoint, optimizer, use))
