"""The training loop, written once for every framework: steps, batches, the trajectory, snapshots,
step numbering and the results; each framework supplies a small ``Trainer``
(``impl_<framework>/trainer.py``).

A run is a ``Job``: a training checkpoint (the model and the optimizer to continue, or a fresh
optimizer made from the registry, ``with_optimizer``), a data source (``batch(step)`` -> the
global NCHW batch ``(x, target)`` of step ``step``, from 0), the number of steps, the ``Settings``
(precision, device, data parallelism) and what to record. ``run(trainer, job)`` trains and
returns, from the main process:

- ``loss/step<k>`` for every step k (from 1): step k's loss before its update, the mean over the
  devices;
- ``param/<name>`` for every trainable tensor and ``state/<name>`` for every running statistic
  after the last step (canonical names and layouts, numpy);
- with ``trajectory``, ``trajectory/step<k>/<name>``: every trainable tensor after each step;
- when the job continues a training checkpoint, the optimizer's state after the last step
  (``weights_convert.core.optim.state_results``).

``on_step(step, loss, snapshot)`` runs in the main process after every step; ``snapshot()``
gives the model and the optimizer's whole state as a canonical training ``Checkpoint``. Other
processes of a data-parallel run (torch DDP's ranks above 0) return an empty dict.

The loss is a setting (``weights_convert.core.losses``: "mse", "bce", "ce", "dice", "dice_bce",
"dice_ce", taken in at least float32): one function in each framework's ``losses.py`` and one,
with its gradient written by hand, in the NumPy reference (``harness/reference_losses.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import ArrayBatches, check_data_parallel, with_optimizer
from weights_convert.core.frameworks import DEVICES
from weights_convert.core.losses import LOSSES, check_loss
from weights_convert.core.optim import check_training, state_results
from weights_convert.core.precisions import precision


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a trainer runs: the precision (``core.precisions.DTYPES``), the device, the data
    parallelism (D devices, each taking one consecutive 1/D of every batch; the BatchNorm mode of
    ``core.data_parallel``) and the loss (``LOSSES``)."""

    dtype: str = "float32"
    device: str = "cpu"
    data_parallel: int = 1
    batchnorm: str = "sync"
    loss: str = "mse"

    def __post_init__(self):
        precision(self.dtype)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        check_data_parallel(self.data_parallel, self.batchnorm)


class Trainer(Protocol):
    """What each framework implements once: a model and its optimizer in one process (or one rank
    of a data-parallel group), trained one step at a time on numpy batches."""

    is_main: bool  # whether this process reports the results (rank 0)

    def scope(self) -> contextlib.AbstractContextManager:
        """The context every step runs in (64-bit mode, the device, a distribution)."""

    def start(self, checkpoint: Checkpoint) -> None:
        """Build the model and the optimizer of training checkpoint ``checkpoint``, its optimizer
        state restored (a fresh optimizer's state, step 0 and no slots, restores to a fresh one)."""

    def step(self, x: np.ndarray, target: np.ndarray) -> tuple:
        """One training step on the global NCHW batch: (loss, gradients), both the framework's."""

    def loss(self, loss) -> np.ndarray:
        """A step's loss as a numpy scalar."""

    def gradients(self, gradients) -> dict:
        """A step's gradients as ``{canonical name: numpy}`` in the canonical layout."""

    def parameters(self) -> dict:
        """Every trainable tensor now, ``{canonical name: numpy}``."""

    def statistics(self) -> dict:
        """Every running statistic now, ``{canonical name: numpy}``."""

    def snapshot(self) -> Checkpoint:
        """The model and the optimizer's whole state as a canonical training checkpoint."""


@dataclasses.dataclass
class Job:
    """One training run, as every process receives it (picklable)."""

    checkpoint: Checkpoint  # a training checkpoint: the optimizer to run and its state
    data: object  # ``batch(step) -> (x, target)``, the global NCHW batch of step ``step`` (from 0)
    steps: int
    settings: Settings
    resumed: bool  # the caller's checkpoint held the optimizer state: its state is part of the results
    trajectory: bool = False
    on_step: object = None  # ``(step, loss, snapshot) -> None``, called in the main process
    save_to: object = None  # where the main process saves the training checkpoint after the last step


def train_job(
    checkpoint: Checkpoint,
    data,
    *,
    steps: int,
    optimizer: str = "sgd",
    dtype: str = "float32",
    device: str = "cpu",
    data_parallel: int = 1,
    batchnorm: str = "sync",
    loss: str = "mse",
    trajectory: bool = False,
    on_step=None,
    save_to=None,
    use: str = "train",
) -> Job:
    """The ``Job`` of ``steps`` steps on ``data`` from ``checkpoint``: its own optimizer, which
    ``optimizer`` must name, or a fresh ``optimizer`` of registry preset ``use`` ("train", or
    "parity" for the parity checks' two); the ``Settings``; what to record; ``save_to``, which
    needs a training checkpoint."""
    settings = Settings(dtype, device, data_parallel, batchnorm, loss)
    check_loss(loss, checkpoint.config.out_channels)
    check_data_parallel(data_parallel, batchnorm, len(data.batch(0)[0]))
    check_training(checkpoint, optimizer, save_to)
    resumed = checkpoint.optimizer is not None
    return Job(with_optimizer(checkpoint, optimizer, use), data, steps, settings, resumed, trajectory, on_step, save_to)


def fit_job(checkpoint: Checkpoint, xs, targets, **options) -> Job:
    """The ``Job`` of a fit on stacked batches: step k trains on ``xs[k - 1]`` against
    ``targets[k - 1]`` (shapes (steps, N, C, H, W) and (steps, N, out_channels, H, W));
    ``options`` as ``train_job``'s but ``steps`` and ``on_step``."""
    data = ArrayBatches(xs, targets)
    return train_job(checkpoint, data, steps=data.steps, **options)


def prefixed(prefix: str, tensors: dict) -> dict:
    return {f"{prefix}/{name}": value for name, value in tensors.items()}


def run(trainer: Trainer, job: Job, write=None) -> dict:
    """The loop: ``job.steps`` steps of ``trainer`` (see the module docstring for the results);
    with ``job.save_to``, ``write(checkpoint, path)`` then saves the training checkpoint there."""
    with trainer.scope():
        trainer.start(job.checkpoint)
        losses, path = [], {}
        for k in range(1, job.steps + 1):
            loss, _ = trainer.step(*job.data.batch(k - 1))
            losses.append(loss)
            if trainer.is_main and job.trajectory:  # copies: the optimizer updates in place
                path.update(prefixed(f"trajectory/step{k}", trainer.parameters()))
            if trainer.is_main and job.on_step is not None:
                job.on_step(k, float(trainer.loss(loss)), trainer.snapshot)
        if not trainer.is_main:
            return {}
        results = {f"loss/step{k}": trainer.loss(loss) for k, loss in enumerate(losses, start=1)}
        results |= prefixed("param", trainer.parameters()) | prefixed("state", trainer.statistics())
        snapshot = trainer.snapshot() if job.resumed or job.save_to is not None else None
        if job.resumed:
            results |= state_results(snapshot.optimizer)
        if job.save_to is not None:
            write(snapshot, job.save_to)
    return results | path


def one_step(trainer: Trainer, checkpoint: Checkpoint, x, target, optimizer: str) -> dict:
    """One step of a fresh parity ``optimizer`` from ``checkpoint``'s weights: ``grad/<name>`` for
    every trainable tensor, then ``step/<name>``, every trainable tensor after the update."""
    with trainer.scope():
        trainer.start(with_optimizer(checkpoint.weights_only(), optimizer, "parity"))
        _, gradients = trainer.step(x, target)
        return prefixed("grad", trainer.gradients(gradients)) | prefixed("step", trainer.parameters())
