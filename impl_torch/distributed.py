"""Data-parallel training in PyTorch: ``DistributedDataParallel`` over D processes, one device each
(gloo on CPU, nccl on GPU), with the BatchNorm modes of ``weights_convert.core.data_parallel``.

- ``train(checkpoint, data, *, steps, dtype, device, optimizer, data_parallel, batchnorm, on_step)``
  trains on ``data.batch(k)`` (the global NCHW batch of step k; process r takes its consecutive
  1/D) and returns ``fit``'s results from process 0. ``on_step(step, loss, snapshot)`` runs in
  process 0 after every step, ``snapshot()`` giving the model and the optimizer's state as a
  canonical training ``Checkpoint`` (DDP keeps the same optimizer state in every process, as every
  process applies the same averaged gradients: process 0's is the whole state).
- ``fit(checkpoint, xs, targets, *, ..., data_parallel, batchnorm, trajectory)``: ``impl_torch.runner.fit``
  on D devices, same results (``loss/step<k>`` is the mean of the D processes' losses).

Launching: with D > 1 this process spawns D workers (``torch.multiprocessing``, rendezvous through a
file) unless it is itself one of torchrun's processes (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the
environment), which then trains as its rank over ``env://``; D must equal ``WORLD_SIZE`` then, and
several hosts are torchrun's ``--nnodes`` / ``--rdzv-endpoint``. D = 1 trains in this process
without a process group.

BatchNorm:

- ``"local"``: ``nn.BatchNorm2d`` as it is, DDP's default: each process normalizes with its shard's
  statistics. DDP broadcasts process 0's running statistics to every process at the start of each
  forward (``broadcast_buffers=True``), so the running statistics kept are process 0's.
- ``"sync"``: on GPU, ``nn.SyncBatchNorm.convert_sync_batchnorm``. torch's ``SyncBatchNorm`` refuses
  CPU tensors, so on CPU (gloo) each ``nn.BatchNorm2d`` becomes ``AllReduceBatchNorm2d``: the same
  computation, the global batch's sums taken with ``torch.distributed.nn.functional.all_reduce``
  (differentiable, as ``SyncBatchNorm``'s backward all-reduces its gradient sums). Every process
  then holds the same running statistics: the global batch's, with the unbiased variance over
  the global count.

Gradients are averaged by DDP (all-reduce, then divided by D). ``dtype`` as in ``impl_torch.runner``.

The optimizer: ``impl_torch.training.make_optimizer`` with the canonical hyperparameters of
``weights_convert.core.data_parallel.training_hyperparameters`` (``optimizer``: sgd, adam, adamw),
or, when ``checkpoint`` is a training checkpoint, the checkpoint's own optimizer with its state
(``optimizer`` must name it), restored in every process; the results then include the optimizer's
state after the last step (``weights_convert.core.optim.state_results``), as ``impl_torch.runner.fit``'s.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from impl_torch.io import from_checkpoint
from impl_torch.runner import _backward, _buffers, _input, _numpy
from impl_torch.training import make_optimizer, optimizer_state, to_training_checkpoint
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import ArrayBatches, check_data_parallel, shard, with_optimizer
from weights_convert.core.optim import state_results
from weights_convert.formats.torch_format import torch_optimizer_state
from weights_convert.processes import load_arrays

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics are those of the global batch over every
    process of the default group: ``SyncBatchNorm``'s computation for the CPU, where torch's
    refuses to run. Eval mode is ``nn.BatchNorm2d``'s. Statistics in at least float32, as torch's
    kernels compute them under bfloat16 autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xs = x.to(self.weight.dtype)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)
        dist.all_reduce(count)  # the global number of values per channel
        n = count.item()
        mean = all_reduce(xs.sum(dim=(0, 2, 3))) / n
        centred = xs - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n  # biased: what normalizes
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * (n / (n - 1)))  # torch keeps the unbiased one
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def all_reduce_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` replaced by an ``AllReduceBatchNorm2d`` holding the
    same parameters and statistics (as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does)."""
    if isinstance(module, nn.BatchNorm2d):
        replacement = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum)
        replacement = replacement.to(device=module.weight.device, dtype=module.weight.dtype)
        replacement.load_state_dict(module.state_dict())
        return replacement
    for name, child in module.named_children():
        module.add_module(name, all_reduce_batchnorm(child))
    return module


@dataclasses.dataclass
class Job:
    """One training run, as every process receives it (picklable)."""

    checkpoint: Checkpoint  # a training checkpoint: the optimizer to run and its state
    data: object  # ``batch(step) -> (x, target)``: the global NCHW batch of step ``step`` (from 0)
    steps: int
    dtype: str
    device: str
    batchnorm: str
    resumed: bool  # the caller's checkpoint held the optimizer state: its state is part of the results
    trajectory: bool = False
    on_step: object = None  # ``(step, loss, snapshot) -> None``, called in process 0


def fit(
    checkpoint: Checkpoint,
    xs,
    targets,
    *,
    dtype="float32",
    device="cpu",
    optimizer="sgd",
    data_parallel=2,
    batchnorm="sync",
    trajectory=False,
) -> dict:
    """``impl_torch.runner.fit`` on ``data_parallel`` devices: step k trains on ``xs[k-1]`` split
    into consecutive shards, one per process."""
    data = ArrayBatches(xs, targets)
    return train(
        checkpoint,
        data,
        steps=data.steps,
        dtype=dtype,
        device=device,
        optimizer=optimizer,
        data_parallel=data_parallel,
        batchnorm=batchnorm,
        trajectory=trajectory,
    )


def train(
    checkpoint: Checkpoint,
    data,
    *,
    steps: int,
    dtype="float32",
    device="cpu",
    optimizer="sgd",
    data_parallel=1,
    batchnorm="sync",
    trajectory=False,
    on_step=None,
) -> dict:
    """``steps`` data-parallel training steps on ``data`` (see the module docstring); process 0's
    results (an empty dict in torchrun's other processes)."""
    check_data_parallel(data_parallel, batchnorm, len(data.batch(0)[0]))
    resumed = checkpoint.optimizer is not None
    job = Job(
        with_optimizer(checkpoint, optimizer), data, steps, dtype, device, batchnorm, resumed, trajectory, on_step
    )
    if all(name in os.environ for name in TORCHRUN_VARIABLES):
        world = int(os.environ["WORLD_SIZE"])
        if world != data_parallel:
            raise ValueError(f"data parallel {data_parallel} does not match torchrun's WORLD_SIZE {world}")
        return _run(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]), job, "env://")
    if data_parallel == 1:
        return _run(0, 1, 0, job, None)
    if device == "gpu" and torch.cuda.device_count() < data_parallel:
        raise ValueError(f"data parallel {data_parallel} needs as many GPUs; torch sees {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="torch-ddp-") as tmp:
        rendezvous = f"file://{Path(tmp) / 'rendezvous'}"
        try:
            arguments = (data_parallel, job, rendezvous, tmp)
            mp.start_processes(_worker, arguments, data_parallel, join=True, start_method=_start_method(device))
        except mp.ProcessRaisedException as error:
            last = str(error).strip().splitlines()[-1]
            raise RuntimeError(f"a torch DDP process failed: {last}") from None
        return load_arrays(Path(tmp) / "result.npz")


def _start_method(device: str) -> str:
    """ "fork" for CPU processes where the platform has it: they inherit this process's imports,
    DDP's own import of ``torch._dynamo`` (seconds) included, made here once before forking. CUDA
    cannot be initialized again in a forked process, so GPU processes are spawned."""
    import multiprocessing

    if device == "gpu" or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    import torch._dynamo  # noqa: F401

    return "fork"


def _worker(rank: int, world: int, job: Job, rendezvous: str, tmp: str) -> None:
    """One spawned process: trains as ``rank`` and, as process 0, saves the results for the parent."""
    results = _run(rank, world, rank, job, rendezvous)
    if rank == 0:
        np.savez(Path(tmp) / "result.npz", **results)


def _run(rank: int, world: int, local_rank: int, job: Job, init_method: str | None) -> dict:
    """The training loop of process ``rank`` of ``world`` (no process group when ``world`` is 1)."""
    gpu = job.device == "gpu"
    if init_method is not None:
        if gpu:
            torch.cuda.set_device(local_rank)
            # Strict float32, as the runner's parity rows run (ARCHITECTURE.md section 4): no TF32.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        else:  # processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if gpu else "gloo", init_method=init_method, rank=rank, world_size=world)
        # AllReduceBatchNorm2d's collective: deprecated for the functional collectives, still torch's
        # public differentiable all-reduce.
        warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")
    try:
        return _loop(rank, world, job, torch.device(f"cuda:{local_rank}" if gpu else "cpu"))
    finally:
        if init_method is not None:
            dist.destroy_process_group()


def _loop(rank: int, world: int, job: Job, device: torch.device) -> dict:
    model = from_checkpoint(job.checkpoint, job.dtype).to(device).train()
    if world > 1 and job.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else all_reduce_batchnorm(model)
    if world > 1:
        gpu = [device.index] if device.type == "cuda" else None
        # broadcast_buffers (forward_sync_buffers) is on by default: process 0's statistics, every forward.
        trained = nn.parallel.DistributedDataParallel(model, device_ids=gpu)
    else:
        trained = model
    opt = _restored_optimizer(model, job.checkpoint)
    place = "gpu" if device.type == "cuda" else "cpu"
    losses, path = [], {}
    for k in range(1, job.steps + 1):
        x, target = (shard(np.asarray(a), rank, world) for a in job.data.batch(k - 1))
        loss = _backward(trained, opt, _input(x, job.dtype, place), _input(target, job.dtype, place))
        opt.step()
        if world > 1:
            dist.all_reduce(loss)  # the mean of the processes' losses
            loss = loss / world
        losses.append(loss)
        if rank == 0 and job.trajectory:
            path.update({f"trajectory/step{k}/{n}": _numpy(p).copy() for n, p in model.named_parameters()})
        if rank == 0 and job.on_step is not None:
            job.on_step(k, float(loss), lambda: to_training_checkpoint(model, opt))
    if rank != 0:
        return {}
    results = {f"loss/step{k}": _numpy(loss) for k, loss in enumerate(losses, start=1)}
    results.update({f"param/{name}": _numpy(p.detach()) for name, p in model.named_parameters()})
    results.update({f"state/{name}": _numpy(value) for name, value in _buffers(model).items()})
    if job.resumed:
        results.update(state_results(optimizer_state(model, opt)))
    return results | path


def _restored_optimizer(model: nn.Module, checkpoint: Checkpoint) -> torch.optim.Optimizer:
    """The training checkpoint's optimizer over ``model``'s parameters, its state restored (slots
    cast to the parameters' dtype and device). Made after the BatchNorm conversion, which puts new
    parameter objects in the model, and in every process, which then all hold the same state."""
    state = checkpoint.optimizer
    optimizer = make_optimizer(model, state.name, **state.hyper)
    optimizer.load_state_dict(torch_optimizer_state(state, checkpoint.config))
    return optimizer
