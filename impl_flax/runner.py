"""What the parity harness runs in Flax NNX: the functions of ``impl_torch.runner``, same
signatures, numpy in and out in canonical layouts (NCHW activations, canonical names, OIHW kernels).

- ``forward(checkpoint, x, *, dtype, device, train)``: every named block output; in train mode also
  ``state/<name>`` for every running statistic after the forward.
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)``: ``grad/<name>`` and
  ``step/<name>`` (the parameters after one step of a fresh optimizer).
- ``fit(checkpoint, xs, targets, *, dtype, device, optimizer)``: one train step per batch of ``xs``
  with ONE optimizer whose state persists across the steps; ``loss/step<k>``, then ``param/<name>``
  and ``state/<name>`` after the last step; with ``trajectory=True`` also
  ``trajectory/step<k>/<name>``, every trainable tensor after each step. From a training checkpoint
  (or its path) the fit continues that checkpoint's ``nnx.Optimizer`` and returns its state too;
  ``save_to`` then saves both (``impl_torch.runner`` says how).

All run under ``nnx.jit`` (the variant users deploy, and one XLA compile instead of one per op);
``train_step`` and ``fit`` share one jitted gradient function, compiled once per shape and precision
and reused for every step and optimizer, and one jitted update per optimizer (``train_step_fn``).

``dtype`` is "float32", "float64" or "mixed_bfloat16" (the model's own mixed precision: float32
parameters and statistics, bfloat16 compute); inputs and targets are fed in the parameter dtype,
and bfloat16 results come back as float32. float64 runs inside a scoped ``jax.enable_x64(True)``,
so x64 never leaks to the caller. Runs use "highest" matmul precision
so that a GPU computes float32 without TF32 (a no-op on CPU; under mixed_bfloat16 the convolutions
take bfloat16 operands, which that setting leaves alone), unless the caller has chosen a precision
(the parity command's TF32 rows run inside ``jax.default_matmul_precision("tensorfloat32")``).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import weights_convert
from impl_flax import training
from impl_flax.io import from_checkpoint
from impl_flax.model import DTYPES, AttentionUNet, resolve_dtypes
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.flax_layout import from_nnx
from weights_convert.core.optim import check_fit_batches, check_optimizer, check_training, state_results
from weights_convert.core.spec import ModelConfig, param_specs


def jax_device(device: str):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise ValueError(f"no JAX {device} device is available (JAX sees {jax.devices()})") from None


@contextlib.contextmanager
def _scope(dtype: str, device: str):
    """x64 on only for float64 runs, the chosen device, no TF32; yields the parameter dtype (the
    dtype inputs and targets are fed in)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    # JAX's default on a GPU is TF32 for float32 operands; "highest" is full float32. It is explicit
    # for mixed_bfloat16 too, where the convolutions see bfloat16 operands and are unaffected by it.
    precision = jax.config.jax_default_matmul_precision or "highest"
    with x64, jax.default_device(jax_device(device)), jax.default_matmul_precision(precision):
        yield resolve_dtypes(dtype)[1]


def _numpy(value) -> np.ndarray:
    """A result as numpy; bfloat16 (a numpy dtype only through ml_dtypes) as float32."""
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == jnp.bfloat16 else array


def to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def to_nchw(x) -> np.ndarray:
    return _numpy(x).transpose(0, 3, 1, 2)


def _model(checkpoint: Checkpoint, dtype: str, train: bool) -> AttentionUNet:
    model = from_checkpoint(checkpoint, dtype)
    model.train() if train else model.eval()
    return model


def _canonical(state: nnx.State, prefix: str, config: ModelConfig) -> dict:
    """``{prefix/<canonical name>: numpy}`` in ``state_dict`` order (NNX states are sorted by path)."""
    tensors = from_nnx({path: _numpy(v.get_value()) for path, v in nnx.to_flat_state(state)})
    return {f"{prefix}/{p.name}": tensors[p.name] for p in param_specs(config) if p.name in tensors}


@nnx.jit
def _named_outputs(model: AttentionUNet, x: jax.Array) -> dict:
    return model(x, return_intermediates=True)[1]


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    with _scope(dtype, device) as input_dtype:
        model = _model(checkpoint, dtype, train)
        named = _named_outputs(model, jnp.asarray(to_nhwc(x), input_dtype))
        results = {name: to_nchw(named[name]) for name in model.block_names}
        if train:
            results.update(_canonical(nnx.state(model, nnx.BatchStat), "state", model.config))
    return results


@functools.cache
def make_optimizer(name: str) -> optax.GradientTransformation:
    """optax with torch.optim's definitions, at every step t: SGD is p - lr * g; optax's Adam divides
    the bias-corrected m by sqrt(v / (1 - b2^t)) + eps, as torch does (eps_root stays 0). Cached: the
    transformation is a static part of ``nnx.Optimizer``, so a new one per call would recompile the
    jitted step."""
    hyper = check_optimizer(name)
    if name == "sgd":
        return optax.sgd(hyper["lr"])
    return optax.adam(hyper["lr"], b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"])


def loss_fn(model: AttentionUNet, x: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all elements. Under mixed precision the logits are bfloat16: the loss
    is taken in the target's dtype (float32, the parameter dtype), as torch autocast and Keras'
    mixed policy do."""
    return jnp.mean((jnp.asarray(model(x), target.dtype) - target) ** 2)


@nnx.jit
def gradients_fn(model: AttentionUNet, x: jax.Array, target: jax.Array) -> tuple[jax.Array, nnx.State]:
    """The loss and its gradients from a train-mode forward, which updates the running statistics."""
    return nnx.value_and_grad(loss_fn)(model, x, target)


@nnx.jit
def update_fn(model: AttentionUNet, optimizer: nnx.Optimizer, grads: nnx.State) -> None:
    optimizer.update(model, grads)


def train_step_fn(
    model: AttentionUNet, optimizer: nnx.Optimizer, x: jax.Array, target: jax.Array
) -> tuple[jax.Array, nnx.State]:
    """One training step, in place: ``gradients_fn``, then one optimizer update. Returns (loss,
    gradients). Two compiled programs, not one: compiling the backward pass is the slow part
    (seconds on a CPU), and this way it is compiled once per model shape and precision and shared
    by every optimizer, while each optimizer compiles only its small update."""
    loss, grads = gradients_fn(model, x, target)
    update_fn(model, optimizer, grads)
    return loss, grads


def train_step(checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    check_optimizer(optimizer)
    with _scope(dtype, device) as input_dtype:
        model = _model(checkpoint, dtype, train=True)
        opt = nnx.Optimizer(model, make_optimizer(optimizer), wrt=nnx.Param)
        x, target = (jnp.asarray(to_nhwc(a), input_dtype) for a in (x, target))
        _, grads = train_step_fn(model, opt, x, target)
        results = _canonical(grads, "grad", model.config)
        results.update(_canonical(nnx.state(model, nnx.Param), "step", model.config))
    return results


def fit(
    checkpoint,
    xs,
    targets,
    *,
    dtype="float32",
    device="cpu",
    optimizer="sgd",
    trajectory=False,
    save_to=None,
) -> dict:
    """``len(xs)`` training steps of one optimizer: step k trains on ``xs[k - 1]`` against
    ``targets[k - 1]`` (shapes (steps, N, C, H, W) and (steps, N, out_channels, H, W)).

    Returns ``loss/step<k>`` (each step's loss, before its update) for every step, then
    ``param/<name>`` for every trainable tensor and ``state/<name>`` for every running statistic
    after the last step; with ``trajectory`` also ``trajectory/step<k>/<name>``, every trainable
    tensor after each step."""
    xs, targets = check_fit_batches(xs, targets)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    check_training(checkpoint, optimizer, save_to)
    with _scope(dtype, device) as input_dtype:
        if checkpoint.optimizer is None:
            check_optimizer(optimizer)
            model = _model(checkpoint, dtype, train=True)
            opt = nnx.Optimizer(model, make_optimizer(optimizer), wrt=nnx.Param)
        else:
            model, opt = training.from_training_checkpoint(checkpoint, dtype)
        # NHWC in the feed dtype; each step's batch goes to the device as a data loader would send it.
        xs, targets = (np.asarray(a.transpose(0, 1, 3, 4, 2), input_dtype) for a in (xs, targets))
        losses, path = [], {}
        for k, (x, target) in enumerate(zip(xs, targets, strict=True), start=1):
            loss, _ = train_step_fn(model, opt, jnp.asarray(x), jnp.asarray(target))
            losses.append(loss)
            if trajectory:
                path.update(_canonical(nnx.state(model, nnx.Param), f"trajectory/step{k}", model.config))
        results = {f"loss/step{k}": _numpy(loss) for k, loss in enumerate(losses, start=1)}
        results.update(_canonical(nnx.state(model, nnx.Param), "param", model.config))
        results.update(_canonical(nnx.state(model, nnx.BatchStat), "state", model.config))
        if checkpoint.optimizer is not None:
            results.update(state_results(training.optimizer_state(model, opt)))
            if save_to is not None:
                training.save_training(model, opt, save_to)
    return results | path
