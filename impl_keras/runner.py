"""What the parity harness runs in Keras: the same three functions as ``impl_torch.runner``, numpy in
and numpy out in canonical layouts (NCHW, canonical names), under the backend of this process.

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)`` -> ``grad/<name>`` for every
  trainable tensor (loss = mean((output - target)**2), train mode) and ``step/<name>`` after one
  optimizer step (``optimizer`` in ``weights_convert.core.optim.OPTIMIZERS``).
- ``fit(checkpoint, xs, targets, *, dtype, device, optimizer)`` -> ``len(xs)`` training steps with
  one optimizer whose state persists: ``loss/step<k>`` (step k's loss, before its update) for every
  step, then ``param/<name>`` for every trainable tensor and ``state/<name>`` for every running
  statistic after the last step; with ``trajectory=True`` also ``trajectory/step<k>/<name>``, every
  trainable tensor after each step. From a training checkpoint (or its path) the fit continues that
  checkpoint's optimizer (``impl_keras.training``) and returns its state too; ``save_to`` then saves
  both (``impl_torch.runner`` says how).

``checkpoint`` is a ``Checkpoint`` or a path that ``impl_keras.load`` reads. ``dtype`` is "float32",
"float64" or "mixed_bfloat16" (Keras' mixed policy: float32 variables, bfloat16 computation; inputs
are fed as float32, the loss is computed in float32 and bfloat16 results come back as float32).

``train_step`` and ``fit`` run the same training step, as Keras' own trainer runs it on each backend
(``_Trainer``): TensorFlow ``tf.function``s around a ``tf.GradientTape`` and ``apply_gradients``, JAX
``stateless_call`` under ``jax.value_and_grad`` and ``stateless_apply``, each jitted once, PyTorch
eager ``.backward()``. The optimizers are ``keras.optimizers.SGD`` and ``impl_keras.TorchAdam``
(Keras' Adam with torch's update at every step).

The backend is fixed when Keras is imported, so ``run_in_backend`` / ``run_batch_in_backend``
(``weights_convert.harness.keras_worker``) run these functions under any backend:
in this process when it already has that backend, otherwise in one ``KERAS_BACKEND=<backend>
python -m impl_keras.runner JOB_DIR`` subprocess per batch, whose entry point (``main``) is here.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.frameworks import KERAS_BACKENDS
from weights_convert.core.optim import check_fit_batches, check_optimizer, check_training, state_results
from weights_convert.processes import Call, serve_calls

STATE_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------------
# The runner interface, under this process's backend.


def forward(checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        named = _call(model, _nhwc(x, dtype), train)
        results = {name: _nchw(value) for name, value in named.items()}
        if train:
            results.update({f"state/{name}": value for name, value in _state(model).items()})
    return results


def train_step(checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    check_optimizer(optimizer)  # an unknown name fails before any work
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        trainer = _trainer(model, optimizer)
        trainer.reset()
        _, grads = trainer.step(_nhwc(x, dtype), _nhwc(target, dtype))
        results = {f"grad/{name}": value for name, value in trainer.canonical(grads).items()}
        results.update({f"step/{name}": value for name, value in trainer.parameters().items()})
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
    """``xs`` (steps, N, C, H, W), ``targets`` (steps, N, out_channels, H, W): step k trains on
    ``xs[k-1]`` against ``targets[k-1]`` with one optimizer (Adam's t runs 1, 2, ...)."""
    import weights_convert

    xs, targets = check_fit_batches(xs, targets)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    check_training(checkpoint, optimizer, save_to)
    state = checkpoint.optimizer
    if state is None:
        check_optimizer(optimizer)
    with _device_scope(device):
        model = _model(checkpoint, dtype, device)
        trainer = _trainer(model, optimizer, None if state is None else tuple(state.hyper.items()))
        trainer.reset()
        if state is not None:
            trainer.restore(checkpoint)
        losses, path = [], {}
        for k, (x, target) in enumerate(zip(xs, targets, strict=True)):
            loss, _ = trainer.step(_nhwc(x, dtype), _nhwc(target, dtype))
            losses.append(loss)
            if trajectory:
                path.update({f"trajectory/step{k + 1}/{n}": v for n, v in trainer.parameters().items()})
        results = {f"loss/step{k + 1}": _numpy(loss) for k, loss in enumerate(losses)}
        results.update({f"param/{name}": value for name, value in trainer.parameters().items()})
        results.update({f"state/{name}": value for name, value in _state(model).items()})
        if state is not None:
            from impl_keras import training

            results.update(state_results(training.optimizer_state(model, trainer.optimizer)))
            if save_to is not None:
                training.save_training(model, trainer.optimizer, save_to)
    return results | path


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


def _state(model) -> dict:
    """Every running statistic of ``model``, canonical names and layout, in canonical order."""
    from impl_keras.io import to_checkpoint

    return {k: v for k, v in to_checkpoint(model).tensors.items() if k.rsplit(".", 1)[-1] in STATE_LEAVES}


def _nhwc(x, dtype):
    """NCHW numpy -> an NHWC tensor of the variable dtype ("mixed_bfloat16" feeds float32, and the
    model casts it to bfloat16 itself)."""
    import keras

    feed = keras.dtype_policies.get(dtype).variable_dtype
    return keras.ops.convert_to_tensor(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1)), dtype=feed)


def _numpy(value) -> np.ndarray:
    """A backend tensor as numpy; bfloat16 as float32 (numpy has no bfloat16, and torch's tensors
    refuse the conversion)."""
    import keras

    if keras.backend.standardize_dtype(value.dtype) == "bfloat16":
        value = keras.ops.cast(value, "float32")
    return np.asarray(keras.ops.convert_to_numpy(value))


def _nchw(value) -> np.ndarray:
    return np.ascontiguousarray(_numpy(value).transpose(0, 3, 1, 2))


def _canonical(spec, value) -> np.ndarray:
    """A parameter-shaped array in the canonical layout (conv kernels HWIO -> OIHW)."""
    from weights_convert.core.layouts import rule

    return rule(spec).from_channels_last(_numpy(value))


def _loss(output, target):
    """mean((output - target)**2) in float32 at least: bfloat16 logits are cast first."""
    from keras import ops

    from impl_keras.model import at_least_float32

    output = ops.cast(output, at_least_float32(output.dtype))
    target = ops.cast(target, output.dtype)
    # sum / size, not ops.mean: under JAX, Keras' mean accumulates float64 input in float32.
    return ops.sum(ops.square(output - target)) / ops.cast(ops.size(output), output.dtype)


def _call(model, x, training: bool) -> dict:
    """The named block outputs of one forward; a training-mode call updates the running statistics."""
    import keras

    if keras.backend.backend() == "jax":
        # As Keras' own JAX trainer runs a model: stateless_call under jax.jit. Eager JAX compiles
        # every operation separately, seconds per new shape, for the same arithmetic.
        (_, named), state = _jax_call(model, training)(*_jax_state(model), x)
        _assign(model.non_trainable_variables, state)
        return {name: named[name] for name in model.config.block_names}  # jax.jit returns dicts sorted
    _, named = model(x, training=training, return_intermediates=True)
    return named


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


@functools.lru_cache(maxsize=8)
def _trainer(model, optimizer: str, hyper: tuple | None = None) -> _Trainer:
    """One trainer per (model, optimizer): its functions are traced or compiled once and every later
    ``train_step`` / ``fit`` on the model reuses them, after ``reset()``. ``hyper`` (items): a
    training checkpoint's optimizer (``impl_keras.training.make_optimizer``), else the parity
    checks' ``optimizer``."""
    dtype = model.dtype_policy.variable_dtype
    if hyper is None:
        return _Trainer(model, _optimizer(optimizer, dtype))
    from impl_keras import training

    return _Trainer(model, training.make_optimizer(optimizer, dtype, **dict(hyper)))


class _Trainer:
    """One optimizer over ``model.trainable_variables`` and a training step as Keras' own trainer
    runs it on this backend: loss = mean((model(x, training=True) - target)**2), its gradients,
    one update. Two compiled functions, the gradients (``_gradients``, one per model, shared by
    every optimizer) and the update (one per optimizer), each compiled once: Keras' trainer fuses
    them into one, but compiling the backward pass is the slow part (tens of seconds under XLA on
    a CPU), and the parity checks run SGD and Adam on every model.

    - TensorFlow: ``tf.function``s around a ``tf.GradientTape`` and ``optimizer.apply_gradients``;
      no XLA, as Keras' trainer on a CPU-only machine, and on GPU as well, so TensorFlow's own
      kernels run there, with TF32 off (``_device_scope``).
    - JAX: ``jax.jit`` of ``jax.value_and_grad`` over ``stateless_call`` and of
      ``optimizer.stateless_apply``, fed the variables' values at every step.
    - PyTorch: eager, ``loss.backward()``, then ``optimizer.apply`` under ``torch.no_grad()``.
    """

    def __init__(self, model, optimizer):
        import keras

        from impl_keras.io import keras_variables
        from weights_convert.core.spec import param_specs

        self.model = model
        by_id = {id(v): name for name, v in keras_variables(model).items()}
        self.variables = model.trainable_variables
        self.names = [by_id[id(v)] for v in self.variables]
        self.specs = {s.name: s for s in param_specs(model.config)}
        self.gradients = _gradients(model)
        self.optimizer = optimizer
        self.optimizer.build(self.variables)  # before any tracing: a tf.function must not create variables
        self.initial = [keras.ops.convert_to_numpy(v.value) for v in self.optimizer.variables]
        self.apply = getattr(self, f"_{keras.backend.backend()}_apply")()

    def reset(self) -> None:
        """The optimizer's state as when it was created (Adam's t back to 0, moments zero)."""
        _assign(self.optimizer.variables, self.initial)

    def restore(self, checkpoint: Checkpoint) -> None:
        """The optimizer's state (step count and slots) from training checkpoint ``checkpoint``, whose
        tensors the model already holds (after ``reset()``: slots left at zeros where it has none)."""
        from impl_keras import training

        training.assign_optimizer_state(self.model, self.optimizer, checkpoint.optimizer)

    def step(self, x, target):
        """One training step on the model and the optimizer; returns (loss, gradients)."""
        loss, grads = self.gradients(x, target)
        self.apply(grads)
        return loss, grads

    def canonical(self, values) -> dict:
        """``values`` given in ``model.trainable_variables`` order, as canonical name -> array in the
        canonical layout, in canonical (state_dict) order."""
        by_name = dict(zip(self.names, values, strict=True))
        return {name: _canonical(self.specs[name], by_name[name]) for name in self.specs if name in by_name}

    def parameters(self) -> dict:
        """Every trainable tensor now (``canonical``)."""
        return self.canonical([v.value for v in self.variables])

    def _tensorflow_apply(self):
        import tensorflow as tf

        optimizer, variables = self.optimizer, self.variables
        return tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables, strict=True)), autograph=False)

    def _jax_apply(self):
        import jax

        optimizer, variables = self.optimizer, self.variables
        compiled = jax.jit(optimizer.stateless_apply)

        def apply(grads):
            values, state = compiled([v.value for v in optimizer.variables], grads, [v.value for v in variables])
            _assign(variables, values)
            _assign(optimizer.variables, state)

        return apply

    def _torch_apply(self):
        import torch

        optimizer, variables = self.optimizer, self.variables

        def apply(grads):
            with torch.no_grad():
                optimizer.apply(grads, variables)

        return apply


@functools.lru_cache(maxsize=8)
def _gradients(model):
    """``(x, target) -> (loss, gradients)``: one train-mode forward, which updates the running
    statistics, and the gradients of the loss in ``model.trainable_variables`` order. Keras has no
    backend-neutral gradient API, so each backend's own autodiff is used here (the model itself is
    backend-neutral)."""
    import keras

    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        def gradients(x, target):
            with tf.GradientTape() as tape:
                loss = _loss(model(x, training=True), target)
            return loss, tape.gradient(loss, variables)

        return tf.function(gradients, autograph=False)
    if backend == "jax":
        import jax

        def loss_and_state(trainable, non_trainable, x, target):
            output, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
            return _loss(output, target), non_trainable

        compiled = jax.jit(jax.value_and_grad(loss_and_state, has_aux=True))

        def gradients(x, target):
            (loss, state), grads = compiled(*_jax_state(model), x, target)
            _assign(model.non_trainable_variables, state)
            return loss, grads

        return gradients
    if backend == "torch":

        def gradients(x, target):
            model.zero_grad()  # set to None: no accumulation across steps
            loss = _loss(model(x, training=True), target)
            loss.backward()
            return loss.detach(), [v.value.grad for v in variables]

        return gradients
    raise ValueError(f"unsupported Keras backend {backend!r}; expected one of {KERAS_BACKENDS}")


def _optimizer(name: str, dtype: str = "float32"):
    """A fresh optimizer with PyTorch's update: ``keras.optimizers.SGD`` (p -= lr * g, as torch's),
    or ``impl_keras.TorchAdam`` (Keras' own Adam adds eps before the bias correction).

    Built with floatx = ``dtype``, the variable dtype: Keras keeps the learning rate in a floatx
    variable, and a float32 1e-3 is 5e-8 away from the float64 one, which shows in a float64 step.
    """
    import keras

    from impl_keras.model import TorchAdam

    hyper = check_optimizer(name)
    floatx = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        if name == "sgd":
            return keras.optimizers.SGD(learning_rate=hyper["lr"])
        return TorchAdam(learning_rate=hyper["lr"], beta_1=hyper["b1"], beta_2=hyper["b2"], epsilon=hyper["eps"])
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
# The worker side of ``weights_convert.harness.keras_worker``: the calls of one job directory,
# under this process's backend.


def run_call(call: Call) -> dict:
    """One ``Call`` under this process's backend."""
    function = {"forward": forward, "train_step": train_step, "fit": fit}[call.function]
    if call.target is None:
        return function(call.checkpoint, call.x, **call.kwargs)
    return function(call.checkpoint, call.x, call.target, **call.kwargs)


def main(argv: list[str] | None = None) -> int:
    """Subprocess entry (``weights_convert.processes.serve_calls``): run ``<dir>/job.json`` and
    write ``<dir>/result_<i>.npz``."""
    return serve_calls(sys.argv[1:] if argv is None else argv, run_call, "python -m impl_keras.runner JOB_DIR")


if __name__ == "__main__":
    sys.exit(main())
