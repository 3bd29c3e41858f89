"""Flax NNX's trainer for the one training loop (``weights_convert.core.loop``): ``nnx.jit`` steps
and ``nnx.Optimizer``, on one device or D (``impl_flax.distributed``: the batch sharded over a
one-axis mesh, parameters and optimizer state replicated).

- ``train(checkpoint, data, *, steps, optimizer, dtype, device, data_parallel, batchnorm,
  trajectory, on_step)``: ``steps`` steps on ``data.batch(k)``, the loop's results.
- ``fit(checkpoint, xs, targets, ...)``: ``train`` on stacked batches (``save_to`` as in
  ``impl_torch.trainer``). With D > 1 on a CPU where JAX sees fewer devices, the fit runs in one
  ``python -m impl_flax.trainer`` subprocess with D host devices (JAX fixes the count when it
  starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=D``).
- ``train_step(checkpoint, x, target, ...)``: one step of a fresh optimizer.

One jitted gradient function, compiled once per shape and precision and reused for every step and
optimizer, and one jitted update per optimizer (``train_step_fn``).

``dtype`` is "float32", "float64" or "mixed_bfloat16" (the model's own mixed precision: float32
parameters and statistics, bfloat16 compute); inputs and targets are fed in the parameter dtype,
and bfloat16 results come back as float32. float64 runs inside a scoped ``jax.enable_x64(True)``,
so x64 never leaks to the caller. Runs use "highest" matmul precision so that a GPU computes
float32 without TF32 (a no-op on CPU; under mixed_bfloat16 the convolutions take bfloat16
operands, which that setting leaves alone), unless the caller has chosen a precision (the parity
command's TF32 rows run inside ``jax.default_matmul_precision("tensorfloat32")``).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import weights_convert
from impl_flax import distributed, losses
from impl_flax.io import Model
from impl_flax.training import from_training_checkpoint, to_training_checkpoint
from weights_convert.core import loop
from weights_convert.core.architectures import Config
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import shard
from weights_convert.core.flax_layout import from_nnx
from weights_convert.core.precisions import precision
from weights_convert.core.spec import param_specs


def jax_device(device: str):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise ValueError(f"no JAX {device} device is available (JAX sees {jax.devices()})") from None


@contextlib.contextmanager
def scope(dtype: str, device: str):
    """x64 on only for float64 runs, the chosen device, no TF32; yields the parameter dtype (the
    dtype inputs and targets are fed in)."""
    param_dtype = precision(dtype).param_dtype
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    # JAX's default on a GPU is TF32 for float32 operands; "highest" is full float32. It is explicit
    # for mixed_bfloat16 too, where the convolutions see bfloat16 operands and are unaffected by it.
    matmul = jax.config.jax_default_matmul_precision or "highest"
    with x64, jax.default_device(jax_device(device)), jax.default_matmul_precision(matmul):
        yield param_dtype


def to_result(value) -> np.ndarray:
    """A result as numpy; bfloat16 (a numpy dtype only through ml_dtypes) as float32."""
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array


def canonical(state: nnx.State, config: Config) -> dict:
    """``{canonical name: numpy}`` in ``state_dict`` order (NNX states are sorted by path)."""
    tensors = from_nnx({path: to_result(v.get_value()) for path, v in nnx.to_flat_state(state)})
    return {p.name: tensors[p.name] for p in param_specs(config) if p.name in tensors}


def loss_fn(model: Model, x: jax.Array, target: jax.Array, loss: str = "mse") -> jax.Array:
    """The loss ``loss`` (``weights_convert.core.losses``, in ``impl_flax.losses``) of a forward of
    ``model`` on ``x``. Under mixed precision the logits are
    bfloat16: the loss is taken in the target's dtype (float32, the parameter dtype), as torch
    autocast and Keras' mixed policy do."""
    return losses.loss_value(loss, jnp.asarray(model(x), target.dtype), target)


@functools.partial(nnx.jit, static_argnames="loss")
def gradients_fn(model: Model, x: jax.Array, target: jax.Array, loss: str = "mse") -> tuple:
    """The loss and its gradients from a train-mode forward, which updates the running statistics."""
    return nnx.value_and_grad(loss_fn)(model, x, target, loss)


def step(model: Model, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array, loss: str = "mse") -> tuple:
    """One training step as one function, in place: the loss, its gradients, one update; returns
    (loss, gradients). The trainer runs it as two programs (``train_step_fn``); the bench times it
    as one ``nnx.jit`` program and eagerly."""
    value, grads = nnx.value_and_grad(loss_fn)(model, x, target, loss)
    optimizer.update(model, grads)
    return value, grads


@nnx.jit
def update_fn(model: Model, optimizer: nnx.Optimizer, grads: nnx.State) -> None:
    optimizer.update(model, grads)


def train_step_fn(
    model: Model, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array, loss: str = "mse"
) -> tuple[jax.Array, nnx.State]:
    """One training step, in place: ``gradients_fn``, then one optimizer update. Returns (loss,
    gradients). Two compiled programs, not one: compiling the backward pass is the slow part
    (seconds on a CPU), and this way it is compiled once per model shape and precision and shared
    by every optimizer, while each optimizer compiles only its small update. Under a sharded
    batch ("sync" BatchNorm) XLA partitions the BatchNorm means into per-device sums and an
    all-reduce: the statistics are the global batch's."""
    value, grads = gradients_fn(model, x, target, loss)
    update_fn(model, optimizer, grads)
    return value, grads


class FlaxTrainer:
    """``weights_convert.core.loop.Trainer`` in Flax NNX, over ``settings.data_parallel`` devices."""

    def __init__(self, settings: loop.Settings):
        self.settings = settings
        self.is_main = jax.process_index() == 0

    def scope(self):
        return scope(self.settings.dtype, self.settings.device)

    def start(self, checkpoint: Checkpoint) -> None:
        settings = self.settings
        self.feed = precision(settings.dtype).param_dtype
        self.model, self.optimizer = from_training_checkpoint(checkpoint, settings.dtype)
        self.mesh = None
        self.step_fn = functools.partial(train_step_fn, loss=settings.loss)
        if settings.data_parallel > 1:
            self.mesh = distributed.mesh(settings.device, settings.data_parallel)
            distributed.replicate(self.mesh, self.model, self.optimizer)
            if settings.batchnorm == "local":
                self.step_fn = distributed.local_step(self.mesh, functools.partial(loss_fn, loss=settings.loss))

    def step(self, x, target):
        x, target = (self._feed(a) for a in (x, target))
        return self.step_fn(self.model, self.optimizer, x, target)

    def _feed(self, batch) -> jax.Array:
        """A channels-first batch (NCHW, NCDHW) channels last (NHWC, NDHWC) in the feed dtype; on D
        devices this process's consecutive part of the global batch."""
        channels_last = np.moveaxis(np.asarray(batch, self.feed), 1, -1)
        if self.mesh is None:
            return jnp.asarray(channels_last)
        local = shard(channels_last, jax.process_index(), jax.process_count())
        return jax.make_array_from_process_local_data(distributed.batch_sharding(self.mesh), local)

    def loss(self, loss) -> np.ndarray:
        return to_result(distributed.local(loss))

    def gradients(self, gradients) -> dict:
        return canonical(gradients, self.model.config)

    def parameters(self) -> dict:
        return canonical(distributed.local(nnx.state(self.model, nnx.Param)), self.model.config)

    def statistics(self) -> dict:
        return canonical(distributed.local(nnx.state(self.model, nnx.BatchStat)), self.model.config)

    def snapshot(self) -> Checkpoint:
        if self.mesh is None:
            return to_training_checkpoint(self.model, self.optimizer)
        return to_training_checkpoint(*distributed.local_copies(self.model, self.optimizer))


def train(checkpoint: Checkpoint, data, **options) -> dict:
    """``steps`` training steps on ``data`` in this process (the options of
    ``weights_convert.core.loop.train_job``)."""
    job = loop.train_job(checkpoint, data, **options)
    return loop.run(FlaxTrainer(job.settings), job, weights_convert.write)


def fit(checkpoint, xs, targets, **options) -> dict:
    """``len(xs)`` steps of one optimizer, step k on ``xs[k - 1]`` against ``targets[k - 1]``
    (``weights_convert.core.loop.fit_job``'s options); ``checkpoint`` a ``Checkpoint`` or a path.
    On a CPU where JAX sees fewer than D devices, in a subprocess that does (the module docstring)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    job = loop.fit_job(checkpoint, xs, targets, **options)
    devices, device = job.settings.data_parallel, job.settings.device
    if devices <= len(distributed.devices(device)):
        return loop.run(FlaxTrainer(job.settings), job, weights_convert.write)
    if device != "cpu" or job.save_to is not None:
        raise ValueError(
            f"data parallel {devices} needs as many {device} devices; JAX sees {distributed.devices(device)}"
        )
    from weights_convert import processes

    env = processes.environment(XLA_FLAGS=processes.host_devices_flag(devices))
    what = f"Flax on {devices} host devices"
    return processes.fit_in_subprocess("impl_flax.trainer", checkpoint, xs, targets, options, env=env, what=what)


def train_step(
    checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd", loss="mse"
) -> dict:
    """One step of a fresh ``optimizer`` on ``(x, target)``: ``grad/<name>``, ``step/<name>``."""
    return loop.one_step(FlaxTrainer(loop.Settings(dtype, device, loss=loss)), checkpoint, x, target, optimizer)


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry of ``fit`` (``weights_convert.processes.serve_calls``):
    ``python -m impl_flax.trainer JOB_DIR``; the fit runs here, handed off no further."""
    from weights_convert.processes import serve_calls

    def run_fit(call) -> dict:
        job = loop.fit_job(call.checkpoint, call.x, call.target, **call.kwargs)
        return loop.run(FlaxTrainer(job.settings), job)

    return serve_calls(sys.argv[1:] if argv is None else argv, run_fit, "python -m impl_flax.trainer JOB_DIR")


if __name__ == "__main__":
    sys.exit(main())
