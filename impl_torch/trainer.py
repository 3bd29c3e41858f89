"""PyTorch's trainer for the one training loop (``weights_convert.core.loop``): eager autograd and
``torch.optim``, as PyTorch is normally trained, on one device or as one rank of a
``DistributedDataParallel`` group (``impl_torch.distributed``).

- ``train(checkpoint, data, *, steps, optimizer, dtype, device, data_parallel, batchnorm,
  trajectory, on_step)``: ``steps`` steps on ``data.batch(k)`` (the global NCHW batch of step k;
  rank r takes its consecutive 1/D), the loop's results from rank 0.
- ``fit(checkpoint, xs, targets, ...)``: ``train`` on stacked batches; from a training checkpoint
  (or its path) with ``save_to``, the model and optimizer are then saved there.
- ``train_step(checkpoint, x, target, ...)``: one step of a fresh optimizer, ``grad/<name>`` and
  ``step/<name>``.

``dtype`` is "float32", "float64" or "mixed_bfloat16": float32 parameters and input, the model's
forward under bfloat16 autocast (``impl_torch.model``), the loss in float32 from the logits cast to
float32, float32 gradients and optimizer updates. Every result is float32/float64 numpy (bfloat16
activations are widened exactly), or int64 for the counters.

Processes: with D > 1 this process spawns D workers (``impl_torch.distributed.spawn``) unless it
is itself one of torchrun's processes (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set), which then
trains as its rank over ``env://``; D = 1 trains in this process without a process group.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from torch import nn

import weights_convert
from impl_torch import distributed, losses, training
from impl_torch.io import from_checkpoint, torch_dtype
from weights_convert.core import loop
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import shard
from weights_convert.core.frameworks import BUFFERS
from weights_convert.formats.torch_format import to_numpy


def torch_device(device: str, index: int | None = None) -> torch.device:
    return torch.device("cpu" if device == "cpu" else "cuda" if index is None else f"cuda:{index}")


def to_tensor(x, dtype: str, device: torch.device) -> torch.Tensor:
    """In the parameters' dtype: float32 under mixed precision, which autocast casts per op."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch_dtype(dtype))


def to_result(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array; bfloat16 widened to float32 (exact), which every framework's numpy reads."""
    return to_numpy(tensor.float() if tensor.dtype == torch.bfloat16 else tensor)


def buffers(model: nn.Module) -> dict:
    """Every running statistic, in state_dict order."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in BUFFERS}


def backward(module: nn.Module, loss: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One train-mode forward of ``module`` (updating the running statistics) and the gradients of
    ``loss`` (``weights_convert.core.losses``, in ``impl_torch.losses``) in the parameters'
    ``.grad``; returns the loss."""
    # Under mixed precision the logits are bfloat16: the loss is taken in float32 (the target's dtype).
    value = losses.loss_value(loss, module(x).to(target.dtype), target)
    value.backward()
    return value.detach()


def train_step_once(module: nn.Module, optimizer: torch.optim.Optimizer, x, target, loss: str = "mse"):
    """One training step in place: gradients set afresh (no accumulation), then one update."""
    optimizer.zero_grad(set_to_none=True)
    value = backward(module, loss, x, target)
    optimizer.step()
    return value


class TorchTrainer:
    """``weights_convert.core.loop.Trainer`` in PyTorch, rank ``rank`` of ``world`` (``world`` > 1:
    inside an initialized process group, ``DistributedDataParallel`` around the model)."""

    def __init__(self, settings: loop.Settings, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.settings, self.rank, self.world = settings, rank, world
        self.device = torch_device(settings.device, local_rank if world > 1 else None)
        self.is_main = rank == 0

    def scope(self):
        return contextlib.nullcontext()

    def start(self, checkpoint: Checkpoint) -> None:
        dtype = self.settings.dtype
        if self.world > 1 and self.settings.batchnorm == "sync":
            # The conversion puts new parameter objects in the model: the optimizer is made after it,
            # in every process, which then all hold the same state.
            model = distributed.sync_batchnorm(from_checkpoint(checkpoint, dtype).to(self.device).train())
            optimizer = training.restored_optimizer(model, checkpoint)
        else:
            model, optimizer = training.from_training_checkpoint(checkpoint, dtype, device=self.device)
        self.model, self.optimizer = model, optimizer
        self.module = distributed.data_parallel(model, self.device) if self.world > 1 else model

    def step(self, x, target):
        x, target = (shard(np.asarray(a), self.rank, self.world) for a in (x, target))
        dtype = self.settings.dtype
        x, target = (to_tensor(a, dtype, self.device) for a in (x, target))
        loss = train_step_once(self.module, self.optimizer, x, target, self.settings.loss)
        if self.world > 1:
            loss = distributed.mean_over_processes(loss)
        return loss, None

    def loss(self, loss) -> np.ndarray:
        return to_result(loss)

    def gradients(self, gradients) -> dict:
        return {name: to_result(p.grad) for name, p in self.model.named_parameters()}

    def parameters(self) -> dict:
        return {name: to_result(p.detach()).copy() for name, p in self.model.named_parameters()}

    def statistics(self) -> dict:
        return {name: to_result(value) for name, value in buffers(self.model).items()}

    def snapshot(self) -> Checkpoint:
        return training.to_training_checkpoint(self.model, self.optimizer)


def run(job: loop.Job, rank: int = 0, world: int = 1, local_rank: int = 0, init_method: str | None = None) -> dict:
    """The loop as rank ``rank`` of ``world`` (inside a process group when ``init_method`` is given)."""
    with distributed.process_group(rank, world, local_rank, job.settings.device, init_method):
        return loop.run(TorchTrainer(job.settings, rank, world, local_rank), job, weights_convert.write)


def launch(job: loop.Job) -> dict:
    """``run`` in this process, as torchrun's rank, or in D spawned processes."""
    world = job.settings.data_parallel
    if all(name in os.environ for name in distributed.TORCHRUN_VARIABLES):
        ranks = int(os.environ["WORLD_SIZE"])
        if ranks != world:
            raise ValueError(f"data parallel {world} does not match torchrun's WORLD_SIZE {ranks}")
        return run(job, int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]), "env://")
    if world == 1:
        return run(job)
    return distributed.spawn(run, job, world, job.settings.device)


def train(checkpoint: Checkpoint, data, **options) -> dict:
    """``steps`` training steps on ``data`` (the options of ``weights_convert.core.loop.train_job``:
    steps, optimizer, dtype, device, data_parallel, batchnorm, trajectory, on_step); rank 0's
    results (an empty dict in torchrun's other processes)."""
    return launch(loop.train_job(checkpoint, data, **options))


def fit(checkpoint, xs, targets, **options) -> dict:
    """``len(xs)`` steps of one optimizer, step k on ``xs[k - 1]`` against ``targets[k - 1]``
    (``weights_convert.core.loop.fit_job``'s options); ``checkpoint`` a ``Checkpoint`` or a path."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    return launch(loop.fit_job(checkpoint, xs, targets, **options))


def train_step(
    checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd", loss="mse"
) -> dict:
    """One step of a fresh ``optimizer`` on ``(x, target)``: ``grad/<name>``, ``step/<name>``."""
    return loop.one_step(TorchTrainer(loop.Settings(dtype, device, loss=loss)), checkpoint, x, target, optimizer)
