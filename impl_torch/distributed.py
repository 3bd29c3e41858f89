"""The pieces of data-parallel training in PyTorch (the loop is ``weights_convert.core.loop``'s,
run by ``impl_torch.trainer``): ``DistributedDataParallel`` over D processes, one device each (gloo
on CPU, nccl on GPU), the process group, spawning the processes, and the BatchNorm modes of
``weights_convert.core.data_parallel``.

Launching: D spawned workers (``spawn``: ``torch.multiprocessing``, rendezvous through a file), or
torchrun's processes (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment, over
``env://``; several hosts are torchrun's ``--nnodes`` / ``--rdzv-endpoint``).

BatchNorm:

- ``"local"``: ``nn.BatchNorm2d`` (``3d``) as it is, DDP's default: each process normalizes with its shard's
  statistics. DDP broadcasts process 0's running statistics to every process at the start of each
  forward (``broadcast_buffers=True``), so the running statistics kept are process 0's.
- ``"sync"``: on GPU, ``nn.SyncBatchNorm.convert_sync_batchnorm``. torch's ``SyncBatchNorm`` refuses
  CPU tensors, so on CPU (gloo) each ``nn.BatchNorm2d`` (``3d``) becomes ``AllReduceBatchNorm2d``
  (``3d``): the same
  computation, the global batch's sums taken with ``torch.distributed.nn.functional.all_reduce``
  (differentiable, as ``SyncBatchNorm``'s backward all-reduces its gradient sums). Every process
  then holds the same running statistics: the global batch's, with the unbiased variance over
  the global count.

Gradients are averaged by DDP (all-reduce, then divided by D); the loss reported is the mean of the
processes' losses. DDP keeps the same optimizer state in every process, as every process applies
the same averaged gradients: rank 0's is the whole state.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from weights_convert import termination
from weights_convert.processes import load_arrays

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class AllReduceBatchNorm:
    """A BatchNorm whose training-mode statistics are those of the global batch over every
    process of the default group: ``SyncBatchNorm``'s computation for the CPU, where torch's
    refuses to run. Eval mode is the plain BatchNorm's. Statistics in at least float32, as torch's
    kernels compute them under bfloat16 autocast. Mixed into ``nn.BatchNorm2d`` and ``3d`` below."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        xs = x.to(self.weight.dtype)
        axes = (0, *range(2, x.dim()))  # all but the channels
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64)
        dist.all_reduce(count)  # the global number of values per channel
        n = count.item()
        mean = all_reduce(xs.sum(dim=axes)) / n
        centred = xs - mean.reshape(per_channel)
        var = all_reduce((centred * centred).sum(dim=axes)) / n  # biased: what normalizes
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * (n / (n - 1)))  # torch keeps the unbiased one
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale.reshape(per_channel) + self.bias.reshape(per_channel)).to(x.dtype)


class AllReduceBatchNorm2d(AllReduceBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the global batch (``AllReduceBatchNorm``)."""


class AllReduceBatchNorm3d(AllReduceBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` over the global batch (``AllReduceBatchNorm``)."""


ALL_REDUCE_BATCH_NORMS = {nn.BatchNorm2d: AllReduceBatchNorm2d, nn.BatchNorm3d: AllReduceBatchNorm3d}


def all_reduce_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` (``3d``) replaced by an ``AllReduceBatchNorm2d``
    (``3d``) holding the same parameters and statistics (as ``nn.SyncBatchNorm.convert_sync_batchnorm``
    does)."""
    if type(module) in ALL_REDUCE_BATCH_NORMS:
        replacement = ALL_REDUCE_BATCH_NORMS[type(module)](module.num_features, module.eps, module.momentum)
        replacement = replacement.to(device=module.weight.device, dtype=module.weight.dtype)
        replacement.load_state_dict(module.state_dict())
        return replacement
    for name, child in module.named_children():
        module.add_module(name, all_reduce_batchnorm(child))
    return module


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorms over the global batch of the default group: ``nn.SyncBatchNorm``
    on GPU, ``AllReduceBatchNorm2d`` (``3d``) on CPU."""
    if next(model.parameters()).device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return all_reduce_batchnorm(model)


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model``: gradients all-reduced and divided by D;
    ``broadcast_buffers`` (on by default) gives every process rank 0's running statistics at the
    start of each forward."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the processes of the default group."""
    dist.all_reduce(value)
    return value / dist.get_world_size()


@contextlib.contextmanager
def process_group(rank: int, world: int, local_rank: int, device: str, init_method: str | None):
    """Rank ``rank`` of a gloo (CPU) or nccl (GPU) process group of ``world`` for the duration; no
    group when ``init_method`` is None (one process)."""
    if init_method is None:
        yield
        return
    gpu = device == "gpu"
    if gpu:
        torch.cuda.set_device(local_rank)
        # Strict float32, as the runner's parity rows run (docs/architecture.md section 4): no TF32.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:  # processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if gpu else "gloo", init_method=init_method, rank=rank, world_size=world)
    # AllReduceBatchNorm's collective: deprecated for the functional collectives, still torch's
    # public differentiable all-reduce.
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(run, job, world: int, device: str) -> dict:
    """``run(job, rank, world, local_rank, init_method)`` in ``world`` spawned processes
    (``torch.multiprocessing``, rendezvous through a file); rank 0's results.

    However this ends (a result, a worker's error, an exception or a signal in this process), no
    worker outlives it: those still running are ended (``termination.end_process``) before the
    rendezvous folder is removed; and a worker dies with this process even when it is killed."""
    if device == "gpu" and torch.cuda.device_count() < world:
        raise ValueError(f"data parallel {world} needs as many GPUs; torch sees {torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="torch-ddp-") as tmp:
        rendezvous = f"file://{Path(tmp) / 'rendezvous'}"
        context = mp.start_processes(
            _worker, (run, world, job, rendezvous, tmp), world, join=False, start_method=_start_method(device)
        )
        try:
            while not context.join():
                pass
        except mp.ProcessRaisedException as error:
            last = str(error).strip().splitlines()[-1]
            raise RuntimeError(f"a torch DDP process failed: {last}") from None
        finally:
            for process in context.processes:
                termination.end_process(process)
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


def _worker(rank: int, run, world: int, job, rendezvous: str, tmp: str) -> None:
    """One spawned process: trains as ``rank`` and, as rank 0, saves the results for the parent.

    torch asks for SIGINT when the parent dies (``PR_SET_PDEATHSIG``); a Python handler would run
    only once a blocking collective returned, which it never does without its peers, so SIGINT and
    SIGTERM end a worker at once (their default actions)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    results = run(job, rank, world, rank, rendezvous)
    if rank == 0:
        np.savez(Path(tmp) / "result.npz", **results)
