"""What the parity harness runs in Keras: the same two functions as ``impl_torch.runner``, numpy in
and numpy out in canonical layouts (NCHW, canonical names), under the backend of this process.

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)`` -> ``grad/<name>`` for every
  trainable tensor (loss = mean((output - target)**2), train mode) and ``step/<name>`` after one
  optimizer step (``optimizer`` in ``weights_convert.optim.OPTIMIZERS``).

``checkpoint`` is a ``Checkpoint`` or a path that ``impl_keras.load`` reads.

The backend is fixed when Keras is imported, so ``run_in_backend`` / ``run_batch_in_backend`` run
these functions under any backend: in this process when it already has that backend, otherwise in
one ``KERAS_BACKEND=<backend> python -m impl_keras.runner`` subprocess per batch (checkpoints as
safetensors and arrays as npz through a temporary directory). JAX runs with ``jax_enable_x64`` there,
which float64 needs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from weights_convert.checkpoint import Checkpoint
from weights_convert.optim import OPTIMIZERS

BACKENDS = ("tensorflow", "jax", "torch")
FUNCTIONS = ("forward", "train_step")
STATE_LEAVES = ("running_mean", "running_var", "num_batches_tracked")
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The runner interface, under this process's backend.


def forward(checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    from impl_keras.io import to_checkpoint

    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        named = _call(model, _nhwc(x, dtype), train)
        results = {name: _nchw(value) for name, value in named.items()}
        if train:
            for name, value in to_checkpoint(model).tensors.items():
                if name.rsplit(".", 1)[-1] in STATE_LEAVES:
                    results[f"state/{name}"] = value
    return results


def train_step(checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    from impl_keras.io import keras_variables
    from weights_convert.spec import param_specs

    _optimizer(optimizer)  # an unknown name fails before any work
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        by_id = {id(v): name for name, v in keras_variables(model).items()}
        specs = {s.name: s for s in param_specs(model.config)}
        names = [by_id[id(v)] for v in model.trainable_variables]
        grads = _gradients(model, _nhwc(x, dtype), _nhwc(target, dtype))
        results = {f"grad/{name}": _canonical(specs[name], g) for name, g in zip(names, grads, strict=True)}
        variables = model.trainable_variables
        _apply_gradients(optimizer, model, grads)
        results.update({f"step/{n}": _canonical(specs[n], v) for n, v in zip(names, variables, strict=True)})
    return results


def _model(checkpoint, dtype: str, device: str):
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
    from impl_keras.model import AttentionUNet

    return AttentionUNet(
        config.in_channels, config.out_channels, config.channels, dtype=dtype, kernel_initializer="zeros"
    )


def _nhwc(x, dtype):
    import keras

    return keras.ops.convert_to_tensor(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1)), dtype=dtype)


def _nchw(value) -> np.ndarray:
    import keras

    return np.ascontiguousarray(keras.ops.convert_to_numpy(value).transpose(0, 3, 1, 2))


def _canonical(spec, value) -> np.ndarray:
    """A parameter-shaped array in the canonical layout (conv kernels HWIO -> OIHW)."""
    import keras

    from weights_convert.layouts import rule

    return rule(spec).from_channels_last(keras.ops.convert_to_numpy(value))


def _loss(output, target):
    import keras

    # sum / size, not ops.mean: under JAX, Keras' mean accumulates float64 input in float32.
    return keras.ops.sum(keras.ops.square(output - target)) / keras.ops.cast(keras.ops.size(output), output.dtype)


def _call(model, x, training: bool) -> dict:
    """The named block outputs of one forward; a training-mode call updates the running statistics."""
    import keras

    if keras.backend.backend() == "jax":
        # As Keras' own JAX trainer runs a model: stateless_call under jax.jit. Eager JAX compiles
        # every operation separately, seconds per new shape, for the same arithmetic.
        (_, named), state = _jax_call(model, training)(*_jax_state(model), x)
        _assign(model.non_trainable_variables, state)
        return named
    _, named = model(x, training=training, return_intermediates=True)
    return named


def _gradients(model, x, target) -> list:
    """Gradients of the train-mode loss w.r.t. ``model.trainable_variables``; the running
    statistics are updated as by the forward. Keras has no backend-neutral gradient API, so
    each backend's own autodiff is used here (the model itself is backend-neutral)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = _loss(model(x, training=True), target)
        return tape.gradient(loss, model.trainable_variables)
    if backend == "jax":
        (_, state), grads = _jax_value_and_grad(model)(*_jax_state(model), x, target)
        _assign(model.non_trainable_variables, state)
        return grads
    if backend == "torch":
        for variable in model.trainable_variables:
            variable.value.grad = None  # the model is reused: no accumulation across calls
        _loss(model(x, training=True), target).backward()
        return [v.value.grad for v in model.trainable_variables]
    raise ValueError(f"unsupported Keras backend {backend!r}; expected one of {BACKENDS}")


def _apply_gradients(optimizer: str, model, grads) -> None:
    """One step of a fresh ``optimizer`` on ``model.trainable_variables``."""
    import keras

    variables = model.trainable_variables
    if keras.backend.backend() == "jax":
        # Jitted, as Keras' JAX trainer applies it: eagerly, every update op compiles per shape.
        apply, initial = _jax_optimizer(model, optimizer, model.dtype_policy.variable_dtype)
        values, _ = apply(initial, grads, [v.value for v in variables])
        _assign(variables, values)
    else:
        _optimizer(optimizer, model.dtype_policy.variable_dtype).apply_gradients(zip(grads, variables, strict=True))


@functools.lru_cache(maxsize=8)
def _jax_optimizer(model, name: str, dtype: str):
    """A jitted ``stateless_apply`` of optimizer ``name`` and its initial (fresh) state."""
    import jax

    opt = _optimizer(name, dtype)
    opt.build(model.trainable_variables)
    return jax.jit(opt.stateless_apply), [v.value for v in opt.variables]


def _jax_state(model) -> tuple[list, list]:
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]


def _assign(variables, values) -> None:
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


@functools.lru_cache(maxsize=8)
def _jax_call(model, training: bool):
    import jax

    def call(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=training, return_intermediates=True)

    return jax.jit(call)


@functools.lru_cache(maxsize=4)
def _jax_value_and_grad(model):
    import jax

    def loss(trainable, non_trainable, x, target):
        output, state = model.stateless_call(trainable, non_trainable, x, training=True)
        return _loss(output, target), state

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _optimizer(name: str, dtype: str = "float32"):
    """The optimizer of the parity step, with PyTorch's update.

    Built with floatx = ``dtype``: Keras keeps the learning rate in a floatx variable, and a
    float32 1e-3 is 5e-8 away from the float64 one, which shows in a float64 step.

    Adam: torch updates p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), Keras
    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps'): eps enters before the bias
    correction. Multiplying both out, they are the same update when eps' = eps * sqrt(1 - b2^t);
    the parity step is the first one (t = 1). In a float64 step the betas are numpy float64
    scalars: Keras' TensorFlow backend casts a Python float to float64 through a float32 tensor,
    which turns 0.999 into 0.99900001287 and the bias correction 1 - b2 by 1e-5.
    """
    import keras

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    hyper = OPTIMIZERS[name]
    floatx = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        if name == "sgd":
            return keras.optimizers.SGD(learning_rate=hyper["lr"])
        step = 1
        scalar = np.float64 if dtype == "float64" else float
        return keras.optimizers.Adam(
            learning_rate=hyper["lr"],
            beta_1=scalar(hyper["b1"]),
            beta_2=scalar(hyper["b2"]),
            epsilon=scalar(hyper["eps"] * math.sqrt(1 - hyper["b2"] ** step)),
        )
    finally:
        keras.config.set_floatx(floatx)


class _device_scope:
    """``keras.device`` for "cpu" / "gpu"; on GPU, TF32 off so float32 checks are strict
    (ARCHITECTURE.md section 4)."""

    def __init__(self, device: str):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.device = device

    def __enter__(self):
        import keras

        if self.device == "gpu":
            _disable_tf32(keras.backend.backend())
        # Not "cpu:0": under torch, Keras moves a new variable created in a "cpu:0" scope off its
        # Parameter (a "cpu" -> "cpu:0" copy), which fails for the integer counter.
        self.scope = keras.device(self.device)
        return self.scope.__enter__()

    def __exit__(self, *exc):
        return self.scope.__exit__(*exc)


def _disable_tf32(backend: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# Any backend: in this process when it has that backend, else in one subprocess per batch.


@dataclasses.dataclass
class Call:
    """One runner call: ``function`` ("forward" or "train_step") with its arguments."""

    function: str
    checkpoint: Checkpoint | str | os.PathLike
    x: np.ndarray
    target: np.ndarray | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.function not in FUNCTIONS:
            raise ValueError(f"function must be one of {FUNCTIONS}, got {self.function!r}")
        if (self.function == "train_step") != (self.target is not None):
            raise ValueError(f"{self.function} takes {'a' if self.function == 'train_step' else 'no'} target")


def run_in_backend(backend: str, function: str, checkpoint, x, target=None, **kwargs) -> dict:
    """``forward`` / ``train_step`` (by name) under Keras backend ``backend``; see the module doc."""
    return run_batch_in_backend(backend, [Call(function, checkpoint, x, target, kwargs)])[0]


def run_batch_in_backend(backend: str, calls: list[Call]) -> list[dict]:
    """Every call under ``backend``, with at most one subprocess for the whole batch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if _runs_here(backend, calls):
        return [_run(call) for call in calls]
    with tempfile.TemporaryDirectory(prefix="keras-runner-") as tmp:
        tmp = Path(tmp)
        _write_job(tmp, calls)
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        if backend == "jax":
            env["JAX_ENABLE_X64"] = "1"
        process = subprocess.run(
            [sys.executable, "-m", "impl_keras.runner", str(tmp)], env=env, capture_output=True, text=True
        )
        if process.returncode != 0:
            tail = process.stderr.strip()[-3000:]
            raise RuntimeError(f"the Keras runner under {backend} failed (exit {process.returncode}):\n{tail}")
        return [_load_npz(tmp / f"result_{i}.npz") for i in range(len(calls))]


def current_backend() -> str:
    """The backend of this process: Keras' own if imported, else the one importing it would pick."""
    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _runs_here(backend: str, calls: list[Call]) -> bool:
    if backend != current_backend():
        return False
    if backend == "jax" and any(call.kwargs.get("dtype") == "float64" for call in calls):
        import jax  # x64 must be on before any array exists; a subprocess gets it from the start

        return bool(jax.config.jax_enable_x64)
    return True


def _run(call: Call) -> dict:
    function = forward if call.function == "forward" else train_step
    if call.target is None:
        return function(call.checkpoint, call.x, **call.kwargs)
    return function(call.checkpoint, call.x, call.target, **call.kwargs)


def _write_job(tmp: Path, calls: list[Call]) -> None:
    import weights_convert

    checkpoint_files: dict[int, str] = {}
    job = []
    for i, call in enumerate(calls):
        if isinstance(call.checkpoint, Checkpoint):
            key = id(call.checkpoint)
            if key not in checkpoint_files:
                checkpoint_files[key] = str(tmp / f"checkpoint_{len(checkpoint_files)}.safetensors")
                weights_convert.write(call.checkpoint, checkpoint_files[key])
            checkpoint = {"safetensors": checkpoint_files[key]}
        else:
            checkpoint = {"path": str(Path(call.checkpoint).resolve())}
        arrays = {"x": np.asarray(call.x)}
        if call.target is not None:
            arrays["target"] = np.asarray(call.target)
        np.savez(tmp / f"input_{i}.npz", **arrays)
        job.append({"function": call.function, "checkpoint": checkpoint, "kwargs": call.kwargs})
    (tmp / "job.json").write_text(json.dumps(job))


def _load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry: run ``<dir>/job.json`` and write ``<dir>/result_<i>.npz``."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m impl_keras.runner JOB_DIR", file=sys.stderr)
        return 2
    import weights_convert

    tmp = Path(argv[0])
    checkpoints: dict[str, Checkpoint] = {}
    for i, entry in enumerate(json.loads((tmp / "job.json").read_text())):
        source = entry["checkpoint"]
        if "safetensors" in source:
            if source["safetensors"] not in checkpoints:
                checkpoints[source["safetensors"]] = weights_convert.read(source["safetensors"])
            checkpoint = checkpoints[source["safetensors"]]
        else:
            checkpoint = source["path"]
        arrays = _load_npz(tmp / f"input_{i}.npz")
        call = Call(entry["function"], checkpoint, arrays["x"], arrays.get("target"), entry["kwargs"])
        np.savez(tmp / f"result_{i}.npz", **_run(call))
    return 0


if __name__ == "__main__":
    sys.exit(main())
