"""Flax NNX's rows: eager and nnx.jit, each an eval forward and a training step.

The model is ``impl_flax.io.from_checkpoint`` of the seeded weights in the run's dtype
("mixed_bfloat16": float32 parameters, bfloat16 compute), its optimizer
``impl_flax.training.make_optimizer``'s. Each timed function notes JAX's matmul setting as it is
traced (``TraceRecord``), which is the row's ``matmul_precision``. Imported only where Flax is installed.
"""

from __future__ import annotations

import jax
from flax import nnx

from impl_flax import trainer
from impl_flax.io import from_checkpoint
from impl_flax.training import make_optimizer
from weights_convert.core.random_init import random_checkpoint
from weights_convert.harness.bench.matmul_settings import TraceRecord, jax_scope
from weights_convert.harness.bench.rows import error_rows, run_variants
from weights_convert.harness.bench.settings import MODES, OPTIMIZER, OPTIMIZER_HYPER, VARIANTS, Settings, inputs

# variant -> whether the step runs through nnx.jit
OPTIONS = {"eager": False, "nnx.jit": True}


def rows(settings: Settings) -> list[dict]:
    if settings.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    platform_name = "gpu" if settings.device == "gpu" else "cpu"
    try:
        device = jax.devices(platform_name)[0]
    except RuntimeError:
        return error_rows("flax", "jax", settings, f"--device {settings.device}: jax sees no such device")
    # From seeded weights rather than Flax's initializers, which compile one XLA program per
    # parameter shape in eager mode (seconds, even for a tiny model).
    weights = random_checkpoint(settings.config, seed=0)
    x, target = inputs(settings, channels_last=True)
    traced = TraceRecord()

    def timed(mode: str, jit: bool):
        def build_step():
            with jax.default_device(device):
                model = from_checkpoint(weights, settings.dtype)
            x_on, target_on = jax.device_put(x, device), jax.device_put(target, device)
            if mode == "forward":
                return forward_step(model, x_on, jit, traced.note)
            optimizer = make_optimizer(model, OPTIMIZER, **OPTIMIZER_HYPER)
            return train_step(model, optimizer, x_on, target_on, jit, traced.note)

        return build_step

    variants = {name: {mode: timed(mode, OPTIONS[name]) for mode in MODES} for name in VARIANTS["flax"]}
    return run_variants("flax", "jax", settings, variants, jax_scope, traced.take)


def forward_step(model, x, jit: bool, on_trace):
    """(step, sync) of one eval forward of ``model`` (through ``nnx.jit`` or eagerly); the step
    returns the logits. ``on_trace()`` runs inside the function, so under ``jit`` while it is traced."""
    model.eval()

    def apply(model, x):
        on_trace()
        return model(x)

    run = nnx.jit(apply) if jit else apply
    return (lambda: run(model, x)), jax.block_until_ready


def train_step(model, optimizer, x, target, jit: bool, on_trace):
    """(step, sync) of one train-mode step of ``model`` with ``optimizer``: the trainer's step
    (``impl_flax.trainer.step``: MSE loss, gradients, optimizer update) as one ``nnx.jit`` program
    or eagerly; the step returns the loss. ``on_trace()`` as in ``forward_step``."""
    model.train()

    def update(model, optimizer, x, target):
        on_trace()
        return trainer.step(model, optimizer, x, target)[0]

    run = nnx.jit(update) if jit else update

    def sync(loss):
        # Eager JAX dispatches asynchronously: wait for the updated parameters, not only the loss.
        jax.block_until_ready((loss, nnx.state(model, nnx.Param)))

    return (lambda: run(model, optimizer, x, target)), sync
