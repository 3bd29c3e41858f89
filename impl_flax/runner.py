"""What the parity harness runs in Flax NNX: the two functions of ``impl_torch.runner``, same
signatures, numpy in and out in canonical layouts (NCHW activations, canonical names, OIHW kernels).

Both run under ``nnx.jit`` (the variant users deploy, and one XLA compile instead of one per op).
float64 runs inside a scoped ``jax.enable_x64(True)``, so x64 never leaks to the caller; every run
uses "highest" matmul precision so that a GPU computes float32 without TF32 (a no-op on CPU).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from impl_flax.io import from_checkpoint
from impl_flax.model import AttentionUNet, check_dtype
from weights_convert.checkpoint import Checkpoint
from weights_convert.flax_layout import from_nnx
from weights_convert.optim import OPTIMIZERS


def jax_device(device: str):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise ValueError(f"no JAX {device} device is available (JAX sees {jax.devices()})") from None


@contextlib.contextmanager
def _scope(dtype: str, device: str):
    """x64 on only for float64 runs, the chosen device, no TF32."""
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64, jax.default_device(jax_device(device)), jax.default_matmul_precision("highest"):
        check_dtype(dtype)
        yield


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def to_nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _model(checkpoint: Checkpoint, dtype: str, train: bool) -> AttentionUNet:
    model = from_checkpoint(checkpoint, dtype)
    model.train() if train else model.eval()
    return model


def _canonical(state: nnx.State, prefix: str) -> dict:
    flat = {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(state)}
    return {f"{prefix}/{name}": value for name, value in from_nnx(flat).items()}


@nnx.jit
def _named_outputs(model: AttentionUNet, x: jax.Array) -> dict:
    return model(x, return_intermediates=True)[1]


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    with _scope(dtype, device):
        model = _model(checkpoint, dtype, train)
        named = _named_outputs(model, jnp.asarray(to_nhwc(x), dtype))
        results = {name: to_nchw(named[name]) for name in model.block_names}
        if train:
            results.update(_canonical(nnx.state(model, nnx.BatchStat), "state"))
    return results


@functools.cache
def make_optimizer(name: str) -> optax.GradientTransformation:
    """optax with torch.optim's definitions: SGD is p - lr * g; optax's Adam adds eps to the
    bias-corrected sqrt(v), as torch does (eps_root stays 0). Cached: the transformation is a
    static part of ``nnx.Optimizer``, so a new one per call would recompile the jitted step."""
    hyper = OPTIMIZERS[name]
    if name == "sgd":
        return optax.sgd(hyper["lr"])
    return optax.adam(hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"])


def loss_fn(model: AttentionUNet, x: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((model(x) - target) ** 2)


@nnx.jit
def _gradient_step(model: AttentionUNet, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array) -> nnx.State:
    grads = nnx.grad(loss_fn)(model, x, target)
    optimizer.update(model, grads)
    return grads


def train_step(checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    with _scope(dtype, device):
        model = _model(checkpoint, dtype, train=True)
        opt = nnx.Optimizer(model, make_optimizer(optimizer), wrt=nnx.Param)
        x, target = (jnp.asarray(to_nhwc(a), dtype) for a in (x, target))
        results = _canonical(_gradient_step(model, opt, x, target), "grad")
        results.update(_canonical(nnx.state(model, nnx.Param), "step"))
    return results
