"""The pieces of data-parallel training in Keras on the JAX backend (the loop is
``weights_convert.core.loop``'s, run by ``impl_keras.trainer``): ``keras.distribution.DataParallel``
over a one-axis ``DeviceMesh`` of D devices (variables and optimizer state replicated, each batch
sharded on its first axis), and the BatchNorm modes of ``weights_convert.core.data_parallel``.

BatchNorm:

- ``"sync"``: the trainer's jitted ``stateless_call`` under ``jax.value_and_grad``
  (``impl_keras.steps``), fed the sharded batch, as Keras' own JAX trainer runs under
  ``DataParallel``: the program is over the global batch and XLA partitions the BatchNorm means
  into per-device sums and an all-reduce, so the statistics, running ones included, are the
  global batch's.
- ``"local"``: ``keras.distribution`` has no per-device BatchNorm, so the same ``stateless_call``
  runs under ``jax.shard_map`` over the mesh's devices (``local_gradients``), each normalizing
  with its own shard; the loss and gradients are averaged with ``jax.lax.pmean`` (as DDP does) and
  the running statistics kept are device 0's (as DDP broadcasts process 0's). The update is the
  trainer's optimizer step.

Several hosts: ``keras.distribution.initialize()`` (``jax.distributed.initialize``) in every process
first; each process feeds its consecutive part of the global batch.
"""

from __future__ import annotations

import functools

import numpy as np

AXIS = "batch"  # DataParallel's batch axis name


def check_backend() -> None:
    """A ValueError in one line unless this process's Keras backend is JAX."""
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"Keras data-parallel training runs on the JAX backend (keras.distribution.DataParallel); "
            f"this process's backend is {backend}: set KERAS_BACKEND=jax"
        )


def check_devices(device: str, data_parallel: int) -> None:
    """A ValueError in one line unless Keras sees ``data_parallel`` devices of kind ``device``."""
    import keras

    devices = keras.distribution.list_devices(device)
    if len(devices) < data_parallel:
        raise ValueError(
            f"data parallel {data_parallel} needs as many {device} devices; Keras sees {len(devices)} "
            f"(on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={data_parallel} before JAX starts)"
        )


def sharded(distribution, tensor):
    """``tensor`` (this process's part of the batch) laid out by ``distribution``'s data layout."""
    import jax

    layout = distribution.get_data_layout(tensor.shape)
    global_shape = (tensor.shape[0] * jax.process_count(), *tensor.shape[1:])
    return jax.make_array_from_process_local_data(layout.backend_layout, np.asarray(tensor), global_shape)


@functools.lru_cache(maxsize=4)
def distributed_model(config, dtype: str, device: str, data_parallel: int):
    """(model, its ``DataParallel`` distribution) over the first ``data_parallel`` devices, variables
    laid out by the distribution. One per (config, dtype, device, D), reused and overwritten as
    ``impl_keras.trainer`` reuses its models, so later runs skip building and compiling again."""
    import keras

    from impl_keras.io import empty_model

    devices = keras.distribution.list_devices(device)[:data_parallel]
    mesh = keras.distribution.DeviceMesh((data_parallel,), [AXIS], devices)
    distribution = keras.distribution.DataParallel(device_mesh=mesh)
    with distribution.scope():
        model = empty_model(config, dtype)
    return model, distribution


@functools.lru_cache(maxsize=8)
def local_gradients(model, device: str, data_parallel: int, loss: str = "mse"):
    """``(x, target) -> (loss, gradients)`` with per-device BatchNorm statistics over the first
    ``data_parallel`` devices: the mean loss and gradients, device 0's running statistics assigned
    to the model. One per model, compiled once."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from impl_keras.steps import assign, jax_state, loss_value

    def per_device(trainable, non_trainable, x, target):
        def loss_and_state(trainable, non_trainable):
            output, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_value(output, target, loss), non_trainable

        # Each device's own gradient: the replicated variables as a per-device value (else the
        # transpose of their broadcast would already sum the gradients over the devices).
        trainable = jax.lax.pcast(trainable, AXIS, to="varying")
        (value, state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(trainable, non_trainable)
        # Device 0's statistics on every device: a sum to which the others contribute zeros.
        first = jax.lax.axis_index(AXIS) == 0
        state = [jax.lax.psum(jnp.where(first, v, jnp.zeros_like(v)), AXIS) for v in state]
        return jax.lax.pmean(value, AXIS), jax.lax.pmean(grads, AXIS), state

    mesh = Mesh(np.array(jax.devices(device)[:data_parallel]), (AXIS,))
    compiled = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P()))

    def gradients(x, target):
        value, grads, state = compiled(*jax_state(model), x, target)
        assign(model.non_trainable_variables, state)
        return value, grads

    return gradients
