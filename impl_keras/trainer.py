"""Keras 3's trainer for the one training loop (``weights_convert.core.loop``): the training step
of ``impl_keras.steps`` (as Keras' own trainer runs it on each backend) with
``impl_keras.training.make_optimizer``'s optimizers (``TorchSGD``, ``TorchAdam``, ``TorchAdamW``:
PyTorch's updates at every step), under the backend of this process, on one device or, on the JAX
backend, D (``impl_keras.distributed``: ``keras.distribution.DataParallel``).

- ``train(checkpoint, data, *, steps, optimizer, dtype, device, data_parallel, batchnorm,
  trajectory, on_step)``: ``steps`` steps on ``data.batch(k)``, the loop's results.
- ``fit(checkpoint, xs, targets, ...)``: ``train`` on stacked batches (``save_to`` as in
  ``impl_torch.trainer``). With D > 1 it runs here in a JAX-backend process that sees D devices
  (and has x64 on for float64), otherwise in one ``KERAS_BACKEND=jax python -m impl_keras.trainer``
  subprocess with D CPU host devices (``--xla_force_host_platform_device_count``).
- ``train_step(checkpoint, x, target, ...)``: one step of a fresh optimizer.

``checkpoint`` is a ``Checkpoint`` or a path that ``weights_convert.read`` reads. ``dtype`` is
"float32", "float64" or "mixed_bfloat16" (Keras' mixed policy: float32 variables, bfloat16
computation; inputs are fed as float32, the loss is computed in float32 and bfloat16 results come
back as float32).

Backends: data parallelism on JAX only. On TensorFlow and PyTorch D > 1 is refused in one line
(``tf.distribute`` strategies and torch DDP drive their own training loops, not Keras' model code
with this project's step); D = 1 trains under any backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import numpy as np

from impl_keras import steps as keras_steps
from impl_keras.steps import to_result
from weights_convert.core import loop
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.data_parallel import shard
from weights_convert.core.frameworks import BUFFERS


def model_for(checkpoint, dtype: str, device: str):
    """A model holding ``checkpoint``; one model per (config, dtype, device) is reused and
    overwritten, so repeated calls skip building (and, under JAX, compiling) it again."""
    from impl_keras.io import assign_checkpoint, check_dtype, load

    if not isinstance(checkpoint, Checkpoint):
        return load(checkpoint, dtype)
    model = _empty_model(checkpoint.config, check_dtype(dtype), device)
    assign_checkpoint(model, checkpoint)
    return model


@functools.lru_cache(maxsize=4)
def _empty_model(config, dtype: str, device: str):
    from impl_keras.io import empty_model

    return empty_model(config, dtype)


def statistics(model) -> dict:
    """Every running statistic of ``model``, canonical names and layout, in canonical order."""
    from impl_keras.io import to_checkpoint

    return {k: v for k, v in to_checkpoint(model).tensors.items() if k.rsplit(".", 1)[-1] in BUFFERS}


def to_channels_last(x, dtype):
    """Channels-first numpy (NCHW, NCDHW) -> a channels-last tensor (NHWC, NDHWC) of the variable
    dtype ("mixed_bfloat16" feeds float32, and the model casts it to bfloat16 itself)."""
    import keras

    feed = keras.dtype_policies.get(dtype).variable_dtype
    return keras.ops.convert_to_tensor(np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1)), dtype=feed)


def to_channels_first(value) -> np.ndarray:
    """A channels-last tensor (NHWC, NDHWC) as channels-first numpy (NCHW, NCDHW)."""
    return np.ascontiguousarray(np.moveaxis(to_result(value), -1, 1))


class device_scope:
    """``keras.device`` for "cpu" / "gpu"; on GPU, TF32 off so float32 checks are strict
    (docs/architecture.md section 4)."""

    def __init__(self, device: str):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.device = device

    def __enter__(self):
        import keras

        if self.device == "gpu":
            disable_tf32(keras.backend.backend())
        # Not "cpu:0": under torch, Keras moves a new variable created in a "cpu:0" scope off its
        # Parameter (a "cpu" -> "cpu:0" copy), which fails for the integer counter.
        self.scope = keras.device(self.device)
        return self.scope.__enter__()

    def __exit__(self, *exc):
        return self.scope.__exit__(*exc)


def disable_tf32(backend: str) -> None:
    """TF32 off for float32 matmuls and convolutions on a GPU under ``backend``."""
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
    elif backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    elif backend == "torch":
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


class KerasTrainer:
    """``weights_convert.core.loop.Trainer`` in Keras, under this process's backend."""

    def __init__(self, settings: loop.Settings):
        self.settings = settings
        self.is_main = True
        self.distribution = None

    def scope(self):
        """The device scope on one device; on D the distribution's scope, entered by ``start``
        once the model is built."""
        self.stack = contextlib.ExitStack()
        if self.settings.data_parallel == 1:
            self.stack.enter_context(device_scope(self.settings.device))
        return self.stack

    def start(self, checkpoint: Checkpoint) -> None:
        from impl_keras.io import assign_checkpoint, check_dtype

        settings = self.settings
        if settings.data_parallel == 1:
            self.model = model_for(checkpoint, settings.dtype, settings.device)
        else:
            import jax

            from impl_keras import distributed

            distributed.check_backend()
            distributed.check_devices(settings.device, settings.data_parallel)
            if settings.device == "gpu":
                disable_tf32("jax")
            self.is_main = jax.process_index() == 0
            dtype = check_dtype(settings.dtype)
            self.model, self.distribution = distributed.distributed_model(
                checkpoint.config, dtype, settings.device, settings.data_parallel
            )
            self.stack.enter_context(self.distribution.scope())
            assign_checkpoint(self.model, checkpoint)
            if settings.batchnorm == "local":
                self.local = distributed.local_gradients(
                    self.model, settings.device, settings.data_parallel, settings.loss
                )
        state = checkpoint.optimizer
        self.steps = keras_steps.steps(self.model, state.name, tuple(state.hyper.items()), settings.loss)
        self.steps.reset()
        self.steps.restore(checkpoint)

    def step(self, x, target):
        if self.distribution is None:
            return self.steps.step(*(to_channels_last(a, self.settings.dtype) for a in (x, target)))
        import jax

        from impl_keras.distributed import sharded

        x, target = (
            sharded(
                self.distribution,
                to_channels_last(shard(np.asarray(a), jax.process_index(), jax.process_count()), self.settings.dtype),
            )
            for a in (x, target)
        )
        if self.settings.batchnorm == "sync":
            return self.steps.step(x, target)
        loss, grads = self.local(x, target)
        self.steps.apply(grads)
        return loss, grads

    def loss(self, loss) -> np.ndarray:
        return to_result(loss)

    def gradients(self, gradients) -> dict:
        return self.steps.canonical(gradients)

    def parameters(self) -> dict:
        return self.steps.parameters()

    def statistics(self) -> dict:
        return statistics(self.model)

    def snapshot(self) -> Checkpoint:
        from impl_keras.training import to_training_checkpoint

        return to_training_checkpoint(self.model, self.steps.optimizer)


def train(checkpoint: Checkpoint, data, **options) -> dict:
    """``steps`` training steps on ``data`` in this process (the options of
    ``weights_convert.core.loop.train_job``)."""
    import weights_convert

    job = loop.train_job(checkpoint, data, **options)
    return loop.run(KerasTrainer(job.settings), job, weights_convert.write)


def fit(checkpoint, xs, targets, **options) -> dict:
    """``len(xs)`` steps of one optimizer, step k on ``xs[k - 1]`` against ``targets[k - 1]``
    (``weights_convert.core.loop.fit_job``'s options); ``checkpoint`` a ``Checkpoint`` or a path.
    D > 1 where this process cannot run it: in a JAX subprocess (the module docstring)."""
    import weights_convert

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    job = loop.fit_job(checkpoint, xs, targets, **options)
    settings = job.settings
    if settings.data_parallel == 1 or _runs_here(settings.device, settings.data_parallel, settings.dtype):
        return loop.run(KerasTrainer(settings), job, weights_convert.write)
    if settings.device != "cpu" or job.save_to is not None:
        raise ValueError(
            f"Keras data parallel on {settings.device}: run it in a KERAS_BACKEND=jax process that sees the GPUs"
        )
    from weights_convert import processes

    flags = processes.host_devices_flag(settings.data_parallel)
    env = processes.environment(KERAS_BACKEND="jax", JAX_ENABLE_X64="1", XLA_FLAGS=flags)
    what = f"Keras/JAX on {settings.data_parallel} host devices"
    return processes.fit_in_subprocess("impl_keras.trainer", checkpoint, xs, targets, options, env=env, what=what)


def _runs_here(device: str, data_parallel: int, dtype: str) -> bool:
    """Whether this process can run a D-device fit: Keras on JAX, D devices, x64 for float64."""
    from weights_convert.core.extras import current_keras_backend

    if current_keras_backend() != "jax":
        return False
    import jax

    try:
        enough = len(jax.devices(device)) >= data_parallel
    except RuntimeError:  # no such platform
        return False
    return enough and (dtype != "float64" or bool(jax.config.jax_enable_x64))


def train_step(checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd", loss="mse") -> dict:
    """One step of a fresh ``optimizer`` on ``(x, target)``: ``grad/<name>``, ``step/<name>``."""
    import weights_convert

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    return loop.one_step(KerasTrainer(loop.Settings(dtype, device, loss=loss)), checkpoint, x, target, optimizer)


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry of ``fit`` (``weights_convert.processes.serve_calls``):
    ``KERAS_BACKEND=jax python -m impl_keras.trainer JOB_DIR``; the fit runs here, handed off no
    further."""
    from weights_convert.processes import serve_calls

    os.environ.setdefault("KERAS_BACKEND", "jax")  # before the fit imports Keras

    def run_fit(call) -> dict:
        job = loop.fit_job(call.checkpoint, call.x, call.target, **call.kwargs)
        return loop.run(KerasTrainer(job.settings), job)

    return serve_calls(
        sys.argv[1:] if argv is None else argv, run_fit, "KERAS_BACKEND=jax python -m impl_keras.trainer JOB_DIR"
    )


if __name__ == "__main__":
    sys.exit(main())
