"""The pieces of data-parallel training in Flax NNX (the loop is ``weights_convert.core.loop``'s,
run by ``impl_flax.trainer``): the batch sharded over a one-axis ``jax.sharding.Mesh`` of D devices,
parameters and optimizer state replicated, and the BatchNorm modes of
``weights_convert.core.data_parallel``.

BatchNorm:

- ``"sync"``: the trainer's own ``train_step_fn``, fed the sharded batch. Under ``nnx.jit`` the
  model is one program over the global batch, and XLA partitions the BatchNorm means over the
  sharded batch axis into per-device sums and an all-reduce: the statistics are the global
  batch's, running statistics included (the same on every device).
- ``"local"``: the forward and backward under ``jax.shard_map`` (``local_step``), each device
  normalizing with its own shard's statistics; the loss and the gradients are averaged with
  ``jax.lax.pmean``, as DDP does, and the running statistics kept are device 0's (a ``psum`` to
  which the others add zeros), as DDP broadcasts process 0's.

Devices: the first D of ``jax.devices(device)``. JAX fixes the number of CPU host devices when it
initializes (``XLA_FLAGS=--xla_force_host_platform_device_count=D``). Several hosts: call
``jax.distributed.initialize()`` first in every process (one per host, or per GPU);
``jax.devices()`` is then every host's devices, each process feeds its own consecutive part of the
global batch (``jax.make_array_from_process_local_data``) and reads its local copy of the
replicated results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"


def devices(device: str) -> list:
    try:
        return jax.devices(device)
    except RuntimeError:  # no such platform
        return []


def mesh(device: str, data_parallel: int) -> Mesh:
    """A one-axis mesh over the first ``data_parallel`` devices of kind ``device``."""
    found = devices(device)
    if len(found) < data_parallel:
        raise ValueError(
            f"data parallel {data_parallel} needs as many {device} devices; JAX sees {len(found)} "
            f"(on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={data_parallel} before JAX starts)"
        )
    return Mesh(np.array(found[:data_parallel]), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicate(mesh: Mesh, *modules) -> None:
    """Every state of ``modules`` (model, optimizer) replicated over ``mesh``, in place."""
    replicated = NamedSharding(mesh, P())
    for module in modules:
        nnx.update(module, jax.device_put(nnx.state(module), replicated))


def local(tree):
    """This process's copy of replicated arrays (the arrays themselves on one host)."""
    return jax.tree.map(lambda a: a if a.is_fully_addressable else a.addressable_data(0), tree)


def local_copies(model, optimizer: nnx.Optimizer) -> tuple:
    """Copies of the model and the optimizer holding this process's copy of the replicated
    arrays: the whole state, gathered."""
    local_model, local_optimizer = nnx.clone(model), nnx.clone(optimizer)
    nnx.update(local_model, local(nnx.state(model)))
    nnx.update(local_optimizer, local(nnx.state(optimizer)))
    return local_model, local_optimizer


def local_step(mesh: Mesh, loss_fn):
    """One training step with per-device BatchNorm statistics over ``mesh``'s devices, in place:
    returns (the loss, the mean of the devices' losses; None for the gradients)."""

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

    return lambda *args: (step(*args), None)
