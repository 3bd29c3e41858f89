"""Data-parallel training in Keras on the JAX backend: ``keras.distribution.DataParallel`` over a
one-axis ``DeviceMesh`` of D devices (variables and optimizer state replicated, each batch sharded on
its first axis), the training step of ``impl_keras.runner``, and the BatchNorm modes of
``weights_convert.core.data_parallel``.

- ``train(checkpoint, data, *, steps, dtype, device, optimizer, data_parallel, batchnorm, on_step)``
  trains on ``data.batch(k)`` (the global NCHW batch of step k; device r holds its consecutive 1/D)
  and returns ``fit``'s results. ``on_step(step, loss, snapshot)`` runs after every step (in
  process 0), ``snapshot()`` giving the model and the optimizer's whole state (the replicated
  variables' values) as a canonical training ``Checkpoint``.
- ``fit(checkpoint, xs, targets, *, ..., data_parallel, batchnorm, trajectory)``: ``impl_keras.runner.fit``
  on D devices, same results.

BatchNorm:

- ``"sync"``: the runner's jitted ``stateless_call`` under ``jax.value_and_grad``, fed the sharded
  batch, as Keras' own JAX trainer runs under ``DataParallel``: the program is over the global
  batch and XLA partitions the BatchNorm means into per-device sums and an all-reduce, so the
  statistics, running ones included, are the global batch's.
- ``"local"``: ``keras.distribution`` has no per-device BatchNorm, so the same ``stateless_call``
  runs under ``jax.shard_map`` over the mesh's devices, each normalizing with its own shard; the
  loss and gradients are averaged with ``jax.lax.pmean`` (as DDP does) and the running statistics
  kept are device 0's (as DDP broadcasts process 0's). The update is the runner's optimizer step.

The optimizer: ``impl_keras.training.make_optimizer`` (``TorchSGD``, ``TorchAdam``, ``TorchAdamW``)
with the canonical hyperparameters of ``weights_convert.core.data_parallel.training_hyperparameters``
(``optimizer``: sgd, adam, adamw), or, when ``checkpoint`` is a training checkpoint, the checkpoint's
own optimizer with its state (``optimizer`` must name it), its variables laid out by the
distribution like the model's; the results then include the optimizer's state after the last step
(``weights_convert.core.optim.state_results``), as ``impl_keras.runner.fit``'s.

Backends: data parallelism on JAX only. On TensorFlow and PyTorch ``train`` with D > 1 refuses in
one line (``tf.distribute`` strategies and torch DDP drive their own training loops, not Keras'
model code with this project's step); D = 1 trains there with ``impl_keras.runner``'s step.
``fit`` runs in this process when it is a JAX-backend process that sees D devices (and has x64 on
for float64), otherwise in one ``KERAS_BACKEND=jax python -m impl_keras.distributed`` subprocess
with D CPU host devices (``--xla_force_host_platform_device_count``).
Several hosts: ``keras.distribution.initialize()`` (``jax.distributed.initialize``) in every process
first; each process feeds its consecutive part of the global batch.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import ArrayBatches, check_data_parallel, shard, with_optimizer
from weights_convert.core.optim import state_results

AXIS = "batch"  # DataParallel's batch axis name


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
    """``impl_keras.runner.fit`` on ``data_parallel`` devices: step k trains on ``xs[k-1]``, sharded."""
    from weights_convert.core.extras import current_keras_backend as current_backend

    data = ArrayBatches(xs, targets)
    settings = {"dtype": dtype, "device": device, "optimizer": optimizer, "data_parallel": data_parallel}
    settings |= {"batchnorm": batchnorm, "trajectory": trajectory}
    if current_backend() == "jax" and _runs_here(device, data_parallel, dtype):
        return train(checkpoint, data, steps=data.steps, **settings)
    if device != "cpu":
        raise ValueError(f"Keras data parallel on {device}: run it in a KERAS_BACKEND=jax process that sees the GPUs")
    from weights_convert import processes

    flags = processes.host_devices_flag(data_parallel)
    env = processes.environment(KERAS_BACKEND="jax", JAX_ENABLE_X64="1", XLA_FLAGS=flags)
    call = processes.Call("fit", checkpoint, data.xs, data.targets, settings)
    what = f"Keras/JAX on {data_parallel} host devices"
    [results] = processes.run_calls("impl_keras.distributed", [call], env=env, what=what)
    return results


def _runs_here(device: str, data_parallel: int, dtype: str) -> bool:
    import jax

    try:
        enough = len(jax.devices(device)) >= data_parallel
    except RuntimeError:  # no such platform
        return False
    return enough and (dtype != "float64" or bool(jax.config.jax_enable_x64))


def check_backend() -> None:
    """A ValueError in one line unless this process's Keras backend is JAX."""
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"Keras data-parallel training runs on the JAX backend (keras.distribution.DataParallel); "
            f"this process's backend is {backend}: set KERAS_BACKEND=jax"
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
    """``steps`` data-parallel training steps on ``data`` in this process (see the module docstring)."""
    import keras

    from impl_keras.io import assign_checkpoint, check_dtype
    from impl_keras.runner import _disable_tf32, _nhwc, _numpy, _state

    check_data_parallel(data_parallel, batchnorm, len(data.batch(0)[0]))
    resumed = checkpoint.optimizer is not None
    checkpoint = with_optimizer(checkpoint, optimizer)
    if keras.backend.backend() != "jax":
        if data_parallel > 1:
            check_backend()
        return _train_one_device(checkpoint, data, steps, dtype, device, resumed, trajectory, on_step)
    import jax

    devices = keras.distribution.list_devices(device)
    if len(devices) < data_parallel:
        raise ValueError(
            f"data parallel {data_parallel} needs as many {device} devices; Keras sees {len(devices)} "
            f"(on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={data_parallel} before JAX starts)"
        )
    if device == "gpu":
        _disable_tf32("jax")
    model, distribution = _distributed_model(checkpoint.config, check_dtype(dtype), device, data_parallel)
    with distribution.scope():
        assign_checkpoint(model, checkpoint)
        trainer = _restored_trainer(model, checkpoint, resumed)
        local = _local_gradients(model, device, data_parallel)
        losses, path = [], {}
        for k in range(1, steps + 1):
            x, target = (
                _sharded(distribution, _nhwc(shard(np.asarray(a), jax.process_index(), jax.process_count()), dtype))
                for a in data.batch(k - 1)
            )
            if batchnorm == "sync" or data_parallel == 1:
                loss, _ = trainer.step(x, target)
            else:
                loss, grads = local(x, target)
                trainer.apply(grads)
            losses.append(loss)
            if trajectory:
                path.update({f"trajectory/step{k}/{n}": v for n, v in trainer.parameters().items()})
            if on_step is not None and jax.process_index() == 0:
                on_step(k, float(_numpy(loss)), lambda: _snapshot(model, trainer))
        results = {f"loss/step{k}": _numpy(loss) for k, loss in enumerate(losses, start=1)}
        results.update({f"param/{name}": value for name, value in trainer.parameters().items()})
        results.update({f"state/{name}": value for name, value in _state(model).items()})
        if resumed:
            results.update(state_results(_snapshot(model, trainer).optimizer))
    return results | path


def _train_one_device(checkpoint, data, steps, dtype, device, resumed, trajectory, on_step) -> dict:
    """One device under any backend: ``impl_keras.runner.fit``'s training step, with ``on_step``."""
    from impl_keras.runner import _device_scope, _model, _nhwc, _numpy, _state

    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        trainer = _restored_trainer(model, checkpoint, resumed)
        losses, path = [], {}
        for k in range(1, steps + 1):
            x, target = (_nhwc(a, dtype) for a in data.batch(k - 1))
            loss, _ = trainer.step(x, target)
            losses.append(loss)
            if trajectory:
                path.update({f"trajectory/step{k}/{n}": v for n, v in trainer.parameters().items()})
            if on_step is not None:
                on_step(k, float(_numpy(loss)), lambda: _snapshot(model, trainer))
        results = {f"loss/step{k}": _numpy(loss) for k, loss in enumerate(losses, start=1)}
        results.update({f"param/{name}": value for name, value in trainer.parameters().items()})
        results.update({f"state/{name}": value for name, value in _state(model).items()})
        if resumed:
            results.update(state_results(_snapshot(model, trainer).optimizer))
    return results | path


def _restored_trainer(model, checkpoint: Checkpoint, resumed: bool):
    """``impl_keras.runner``'s trainer of ``model`` with the training checkpoint's optimizer
    (``impl_keras.training.make_optimizer``), fresh, or with the checkpoint's state when ``resumed``."""
    from impl_keras.runner import _trainer

    state = checkpoint.optimizer
    trainer = _trainer(model, state.name, tuple(state.hyper.items()))
    trainer.reset()
    if resumed:
        trainer.restore(checkpoint)
    return trainer


def _snapshot(model, trainer) -> Checkpoint:
    """The model and its optimizer's state as a training checkpoint (the replicated variables'
    values: the whole state)."""
    from impl_keras.training import to_training_checkpoint

    return to_training_checkpoint(model, trainer.optimizer)


def _sharded(distribution, tensor):
    """``tensor`` (this process's part of the batch) laid out by ``distribution``'s data layout."""
    import jax

    layout = distribution.get_data_layout(tensor.shape)
    global_shape = (tensor.shape[0] * jax.process_count(), *tensor.shape[1:])
    return jax.make_array_from_process_local_data(layout.backend_layout, np.asarray(tensor), global_shape)


@functools.lru_cache(maxsize=4)
def _distributed_model(config, dtype: str, device: str, data_parallel: int):
    """(model, its ``DataParallel`` distribution) over the first ``data_parallel`` devices, variables
    laid out by the distribution. One per (config, dtype, device, D), reused and overwritten as
    ``impl_keras.runner`` reuses its models, so later runs skip building and compiling again."""
    import keras

    from impl_keras.model import AttentionUNet

    devices = keras.distribution.list_devices(device)[:data_parallel]
    mesh = keras.distribution.DeviceMesh((data_parallel,), [AXIS], devices)
    distribution = keras.distribution.DataParallel(device_mesh=mesh)
    with distribution.scope():
        model = AttentionUNet(
            config.in_channels, config.out_channels, config.channels, dtype=dtype, kernel_initializer="zeros"
        )
    return model, distribution


@functools.lru_cache(maxsize=8)
def _local_gradients(model, device: str, data_parallel: int):
    """``(x, target) -> (loss, gradients)`` with per-device BatchNorm statistics over the first
    ``data_parallel`` devices: the mean loss and gradients, device 0's running statistics assigned
    to the model. One per model, compiled once."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from impl_keras.runner import _assign, _jax_state, _loss

    def per_device(trainable, non_trainable, x, target):
        def loss_and_state(trainable, non_trainable):
            output, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return _loss(output, target), non_trainable

        # Each device's own gradient: the replicated variables as a per-device value (else the
        # transpose of their broadcast would already sum the gradients over the devices).
        trainable = jax.lax.pcast(trainable, AXIS, to="varying")
        (loss, state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(trainable, non_trainable)
        # Device 0's statistics on every device: a sum to which the others contribute zeros.
        first = jax.lax.axis_index(AXIS) == 0
        state = [jax.lax.psum(jnp.where(first, v, jnp.zeros_like(v)), AXIS) for v in state]
        return jax.lax.pmean(loss, AXIS), jax.lax.pmean(grads, AXIS), state

    mesh = Mesh(np.array(jax.devices(device)[:data_parallel]), (AXIS,))
    compiled = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P()))

    def gradients(x, target):
        loss, grads, state = compiled(*_jax_state(model), x, target)
        _assign(model.non_trainable_variables, state)
        return loss, grads

    return gradients


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry of ``fit`` (``weights_convert.processes.serve_calls``):
    ``KERAS_BACKEND=jax python -m impl_keras.distributed JOB_DIR``."""
    from weights_convert.processes import serve_calls

    os.environ.setdefault("KERAS_BACKEND", "jax")  # before train imports Keras
    usage = "KERAS_BACKEND=jax python -m impl_keras.distributed JOB_DIR"
    return serve_calls(sys.argv[1:] if argv is None else argv, _serve_fit, usage)


def _serve_fit(call) -> dict:
    data = ArrayBatches(call.x, call.target)
    return train(call.checkpoint, data, steps=data.steps, **call.kwargs)


if __name__ == "__main__":
    sys.exit(main())
