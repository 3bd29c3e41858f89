"""Data-parallel training in Flax NNX: the batch sharded over a one-axis ``jax.sharding.Mesh`` of D
devices, parameters and optimizer state replicated, one ``nnx.jit`` step, with the BatchNorm modes of
``weights_convert.core.data_parallel``.

- ``train(checkpoint, data, *, steps, dtype, device, optimizer, data_parallel, batchnorm, on_step)``
  trains on ``data.batch(k)`` (the global NCHW batch of step k; device r holds its consecutive 1/D)
  and returns ``fit``'s results. ``on_step(step, loss, snapshot)`` runs after every step (in
  process 0), ``snapshot()`` giving the model and the optimizer's whole state (this process's copy
  of the replicated arrays) as a canonical training ``Checkpoint``.
- ``fit(checkpoint, xs, targets, *, ..., data_parallel, batchnorm, trajectory)``: ``impl_flax.runner.fit``
  on D devices, same results.

BatchNorm:

- ``"sync"``: ``impl_flax.runner.train_step_fn`` itself, fed the sharded batch. Under ``nnx.jit``
  the model is one program over the global batch, and XLA partitions the BatchNorm means over the
  sharded batch axis into per-device sums and an all-reduce: the statistics are the global
  batch's, running statistics included (the same on every device).
- ``"local"``: the forward and backward under ``jax.shard_map``, each device normalizing with its own
  shard's statistics; the loss and the gradients are averaged with ``jax.lax.pmean``, as DDP does,
  and the running statistics kept are device 0's (a ``psum`` to which the others add zeros), as DDP broadcasts
  process 0's.

The optimizer: ``impl_flax.training.make_optimizer`` with the canonical hyperparameters of
``weights_convert.core.data_parallel.training_hyperparameters`` (``optimizer``: sgd, adam, adamw),
or, when ``checkpoint`` is a training checkpoint, the checkpoint's own optimizer with its state
(``optimizer`` must name it), replicated like the parameters; the results then include the
optimizer's state after the last step (``weights_convert.core.optim.state_results``), as
``impl_flax.runner.fit``'s.

Devices: the first D of ``jax.devices(device)``. JAX fixes the number of CPU host devices when it
initializes (``XLA_FLAGS=--xla_force_host_platform_device_count=D``): ``fit`` runs in this process
when JAX sees D devices, otherwise on the CPU in one ``python -m impl_flax.distributed`` subprocess
started with that flag. Several hosts: call ``jax.distributed.initialize()`` first in every process
(one per host, or per GPU); ``jax.devices()`` is then every host's devices, each process feeds its
own consecutive part of the global batch (``jax.make_array_from_process_local_data``) and reads its
local copy of the replicated results.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from impl_flax.runner import _canonical, _numpy, _scope, loss_fn, train_step_fn
from impl_flax.training import from_training_checkpoint, to_training_checkpoint
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import ArrayBatches, check_data_parallel, shard, with_optimizer
from weights_convert.core.optim import state_results

AXIS = "data"


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
    """``impl_flax.runner.fit`` on ``data_parallel`` devices: step k trains on ``xs[k-1]``, sharded."""
    data = ArrayBatches(xs, targets)
    settings = {"dtype": dtype, "device": device, "optimizer": optimizer, "data_parallel": data_parallel}
    settings |= {"batchnorm": batchnorm, "trajectory": trajectory}
    if len(_devices(device)) >= data_parallel:
        return train(checkpoint, data, steps=data.steps, **settings)
    if device != "cpu":
        raise ValueError(f"data parallel {data_parallel} needs as many {device} devices; JAX sees {_devices(device)}")
    from weights_convert import processes

    env = processes.environment(XLA_FLAGS=processes.host_devices_flag(data_parallel))
    call = processes.Call("fit", checkpoint, data.xs, data.targets, settings)
    [results] = processes.run_calls(
        "impl_flax.distributed", [call], env=env, what=f"Flax on {data_parallel} host devices"
    )
    return results


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
    """``steps`` data-parallel training steps on ``data`` in this process (see the module docstring)."""
    check_data_parallel(data_parallel, batchnorm, len(data.batch(0)[0]))
    resumed = checkpoint.optimizer is not None
    checkpoint = with_optimizer(checkpoint, optimizer)
    devices = _devices(device)
    if len(devices) < data_parallel:
        raise ValueError(
            f"data parallel {data_parallel} needs as many {device} devices; JAX sees {len(devices)} "
            f"(on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={data_parallel} before JAX starts)"
        )
    mesh = Mesh(np.array(devices[:data_parallel]), (AXIS,))
    batch_sharding, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
    with _scope(dtype, device) as input_dtype:
        model, opt = from_training_checkpoint(checkpoint, dtype)
        nnx.update(model, jax.device_put(nnx.state(model), replicated))
        nnx.update(opt, jax.device_put(nnx.state(opt), replicated))
        step_fn = train_step_fn if data_parallel == 1 or batchnorm == "sync" else _local_step(mesh)
        losses, path = [], {}
        for k in range(1, steps + 1):
            # NHWC in the feed dtype; this process's consecutive part of the global batch.
            x, target = (
                jax.make_array_from_process_local_data(
                    batch_sharding,
                    shard(np.asarray(a, input_dtype).transpose(0, 2, 3, 1), jax.process_index(), jax.process_count()),
                )
                for a in data.batch(k - 1)
            )
            loss = step_fn(model, opt, x, target)
            loss = loss[0] if isinstance(loss, tuple) else loss  # the runner's step returns (loss, grads)
            losses.append(loss)
            if trajectory:
                path.update(_canonical(_local(nnx.state(model, nnx.Param)), f"trajectory/step{k}", model.config))
            if on_step is not None and jax.process_index() == 0:
                on_step(k, float(_local(loss)), lambda: _snapshot(model, opt))
        results = {f"loss/step{k}": _numpy(_local(loss)) for k, loss in enumerate(losses, start=1)}
        results.update(_canonical(_local(nnx.state(model, nnx.Param)), "param", model.config))
        results.update(_canonical(_local(nnx.state(model, nnx.BatchStat)), "state", model.config))
        if resumed:
            results.update(state_results(_snapshot(model, opt).optimizer))
    return results | path


def _devices(device: str) -> list:
    try:
        return jax.devices(device)
    except RuntimeError:  # no such platform
        return []


def _local(tree):
    """This process's copy of replicated arrays (the arrays themselves on one host)."""
    return jax.tree.map(lambda a: a if a.is_fully_addressable else a.addressable_data(0), tree)


def _snapshot(model, optimizer: nnx.Optimizer) -> Checkpoint:
    """The model and the optimizer's state as a training checkpoint, from this process's copy of
    the replicated arrays: the whole state, gathered."""
    local_model, local_optimizer = nnx.clone(model), nnx.clone(optimizer)
    nnx.update(local_model, _local(nnx.state(model)))
    nnx.update(local_optimizer, _local(nnx.state(optimizer)))
    return to_training_checkpoint(local_model, local_optimizer)


def _local_step(mesh: Mesh):
    """One training step with per-device BatchNorm statistics over ``mesh``'s devices, in place:
    returns the loss (the mean of the devices' losses)."""

    @nnx.jit
    def step(model, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array) -> jax.Array:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def per_device(params, rest, x, target):
            def loss_and_statistics(params, rest):
                local = nnx.merge(graphdef, params, rest, copy=True)
                return loss_fn(local, x, target), nnx.state(local, nnx.BatchStat)

            # Each device's own gradient: the replicated parameters as a per-device value (else the
            # transpose of their broadcast would already sum the gradients over the devices).
            params = jax.lax.pcast(params, AXIS, to="varying")
            (loss, statistics), grads = jax.value_and_grad(loss_and_statistics, has_aux=True)(params, rest)
            # Device 0's statistics on every device: a sum to which the others contribute zeros.
            first = jax.lax.axis_index(AXIS) == 0
            device0 = jax.tree.map(lambda v: jax.lax.psum(jnp.where(first, v, jnp.zeros_like(v)), AXIS), statistics)
            return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS), device0

        sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P())
        loss, grads, statistics = sharded(params, rest, x, target)
        nnx.update(model, statistics)
        optimizer.update(model, grads)
        return loss

    return step


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry of ``fit`` (``weights_convert.processes.serve_calls``):
    ``python -m impl_flax.distributed JOB_DIR``."""
    from weights_convert.processes import serve_calls

    return serve_calls(sys.argv[1:] if argv is None else argv, _serve_fit, "python -m impl_flax.distributed JOB_DIR")


def _serve_fit(call) -> dict:
    data = ArrayBatches(call.x, call.target)
    return train(call.checkpoint, data, steps=data.steps, **call.kwargs)


if __name__ == "__main__":
    sys.exit(main())
