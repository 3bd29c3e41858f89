"""What a parity run is asked to do, validated once.

``make_request`` turns ``check``'s arguments into one frozen ``Request``, or refuses them with a
one-line ``ParityError`` (a framework or backend that is named but not installed: ``MissingPackage``
naming what to install). ``select`` chooses the installed frameworks and Keras backends when none
are named. Everything after the request (``runners``, ``noise``, ``judging``, ``resume``,
``exports``) takes it as valid.

Deployment exports are targets too (``EXPORT_TARGETS``, named explicitly, never by default): eval
mode, on CPU, in float32 or float64 only (ONNX float32 only: onnxruntime has no float64
convolution on CPU). A fit with ``resume_at`` runs the training checkpoints' own optimizers
(``RESUME_OPTIMIZERS``) and combines with neither data parallelism nor exports.
"""

from __future__ import annotations

import dataclasses
import os

from weights_convert.core import extras
from weights_convert.core.architectures import assumed_line
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.frameworks import DEVICES, FRAMEWORKS, KERAS_BACKENDS
from weights_convert.core.losses import check_loss
from weights_convert.core.optimizer_state import DEFAULTS as TRAINING_OPTIMIZERS
from weights_convert.core.precisions import DTYPES
from weights_convert.core.spec import ModelConfig, check_sides
from weights_convert.formats.io import read
from weights_convert.harness import data_parallel as dp
from weights_convert.harness import export as export_files

# export target -> the destination suffix of its format (``weights_convert.harness.export.FORMATS``)
EXPORT_TARGETS = {
    "onnx": ".onnx",
    "pt2": ".pt2",
    "torchscript": ".torchscript",
    "savedmodel": ".savedmodel",
    "jaxexport": ".jaxexport",
}
MODES = ("eval", "train", "fit")
OPTIMIZER_NAMES = ("sgd", "adam")
DEFAULT_BATCH = 2
DEFAULT_STEPS = 5
DEFAULT_FIT_OPTIMIZER = "adam"
# The optimizers of a fit with ``resume_at``: the training checkpoints' own.
RESUME_OPTIMIZERS = tuple(TRAINING_OPTIMIZERS)


class ParityError(ValueError):
    """A parity run that cannot be made (bad arguments, no GPU); one line for the user."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One implementation to check: a framework, its backend (Keras only) and a precision mode."""

    framework: str
    backend: str
    device: str
    dtype: str
    # "strict" rows gate the result; "tf32" rows (GPU only) are informational.
    precision: str = "strict"

    @property
    def label(self) -> str:
        backend = f"/{self.backend}" if self.framework == "keras" else ""
        return f"{self.framework}{backend} {self.device} {self.dtype}"


@dataclasses.dataclass(frozen=True)
class Run:
    """What is computed: ``mode`` with its optimizers (train: one step each, and no backward pass
    without any; fit: ``steps`` steps of the first)."""

    mode: str = "eval"
    optimizers: tuple[str, ...] = OPTIMIZER_NAMES
    steps: int = DEFAULT_STEPS
    trajectory: bool = False  # fit: also the parameters after every step (``trajectory/step<k>/<name>``)
    data_parallel: int = 1  # fit: devices (``weights_convert.harness.data_parallel``)
    batchnorm: str = "sync"  # fit on several devices: "sync" or "local" BatchNorm statistics
    resume_at: int | None = None  # fit: train this many steps, then move (``parity.resume``)
    loss: str = "mse"  # the training loss of train and fit (``weights_convert.core.losses``)


@dataclasses.dataclass(frozen=True)
class Request:
    """One parity run, validated (``make_request``): the weights, the implementations and export
    targets, the precision and device, what is computed, and the seeded input's shape."""

    checkpoint: Checkpoint | None = dataclasses.field(compare=False)  # None: seeded default weights
    config: ModelConfig
    frameworks: tuple[str, ...]
    keras_backends: tuple[str, ...]
    exports: tuple[str, ...]  # export targets (``EXPORT_TARGETS``), judged after the frameworks
    dtype: str
    device: str
    run: Run
    size: tuple[int, ...]  # H W, or D H W
    batch: int
    seed: int
    notes: tuple[str, ...] = ()  # what the run changed or assumed, said before it starts

    @property
    def targets(self) -> list[Target]:
        """Every implementation the run checks, in order (on a GPU in float32 each torch and Flax
        target twice: strict, then with TF32 for the informational rows)."""
        return targets_for(self.frameworks, self.keras_backends, self.device, self.dtype)


def targets_for(frameworks, keras_backends, device: str, dtype: str) -> list[Target]:
    targets = []
    for framework in frameworks:
        backends = keras_backends if framework == "keras" else (framework,)
        for backend in backends:
            targets.append(Target(framework, backend, device, dtype))
            if device == "gpu" and dtype == "float32" and framework in ("torch", "flax"):
                targets.append(Target(framework, backend, device, dtype, precision="tf32"))
    return targets


def make_request(
    checkpoint,
    *,
    frameworks,
    keras_backends,
    dtype: str,
    device: str,
    mode: str,
    size: tuple[int, ...] | None,
    batch: int,
    seed: int,
    steps: int,
    optimizer,
    trajectory: bool,
    data_parallel: int,
    batchnorm: str,
    resume_at: int | None,
    config=None,
    loss: str = "mse",
) -> Request:
    """``check``'s arguments (see there) validated into a ``Request``, the checkpoint read if it is
    a path; the first thing wrong is refused in one line."""
    selection = select(frameworks, keras_backends)
    exports = _export_targets(selection.frameworks, dtype, device, mode)
    frameworks = tuple(f for f in selection.frameworks if f not in exports)
    keras_backends = selection.keras_backends
    _check_names(frameworks, keras_backends, allow_none=bool(exports))
    _check_values(dtype, device, mode)
    fit_optimizer = None if resume_at is not None else optimizer  # a resumed fit has its own optimizers
    optimizers = _optimizers(fit_optimizer, mode)
    _check_counts(batch, steps)
    _check_gpu(device, frameworks, keras_backends)
    if resume_at is not None:
        optimizers = _resume_optimizers(resume_at, optimizer, mode, steps, data_parallel, exports)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        checkpoint = read(checkpoint, config=config)
    notes = [assumed_line(checkpoint.assumed)] if checkpoint is not None and checkpoint.assumed else []
    if checkpoint is not None and mode != "eval" and getattr(checkpoint.config, "dropout", 0.0) > 0:
        checkpoint = without_dropout(checkpoint)
        notes.append(DROPOUT_NOTE)
    config = checkpoint.config if checkpoint is not None else ModelConfig()
    try:
        size = check_sides(config, size)
    except ValueError as error:
        raise ParityError(str(error)) from None
    try:
        keras_backends = dp.checked(frameworks, keras_backends, mode, batch, data_parallel, batchnorm)
    except ValueError as error:
        raise ParityError(str(error)) from None
    try:
        check_loss(loss, config.out_channels)
    except ValueError as error:
        raise ParityError(str(error)) from None
    traced = trajectory and mode == "fit" and resume_at is None  # a resumed fit plots its losses only
    run = Run(mode, optimizers, steps, traced, data_parallel, batchnorm, resume_at, loss)
    return Request(
        checkpoint,
        config,
        frameworks,
        keras_backends,
        exports,
        dtype,
        device,
        run,
        tuple(size),
        batch,
        seed,
        tuple(notes),
    )


# Train and fit runs compare functions: dropout's random masks are streams no two frameworks share.
DROPOUT_NOTE = "dropout set to 0 for this train-mode run (dropout masks are random streams no two frameworks share)"


def without_dropout(checkpoint: Checkpoint) -> Checkpoint:
    """The same tensors under the config with dropout 0 (docs/architecture.md section 1b)."""
    config = dataclasses.replace(checkpoint.config, dropout=0.0)
    return dataclasses.replace(checkpoint, config=config)


def _check_names(frameworks, keras_backends, allow_none: bool) -> None:
    """Known frameworks and Keras backends; ``allow_none``: no framework (a run of export targets only)."""
    checked = [("frameworks", frameworks, FRAMEWORKS + tuple(EXPORT_TARGETS))]
    if "keras" in frameworks:
        checked.append(("keras backends", keras_backends, KERAS_BACKENDS))
    for name, values, allowed in checked:
        bad = [v for v in values if v not in allowed]
        if bad or not (values or (allow_none and name == "frameworks")):
            raise ParityError(f"unknown {name} {bad or list(values)}; choose from {', '.join(allowed)}")


def _check_values(dtype: str, device: str, mode: str) -> None:
    for name, value, allowed in (("dtype", dtype, DTYPES), ("device", device, DEVICES), ("mode", mode, MODES)):
        if value not in allowed:
            raise ParityError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")


def _optimizers(optimizer, mode: str) -> tuple[str, ...]:
    """The optimizers of a train run (default both, or none for no backward pass) or of a fit (one)."""
    if optimizer is None:
        optimizers = (DEFAULT_FIT_OPTIMIZER,) if mode == "fit" else OPTIMIZER_NAMES
    else:
        optimizers = (optimizer,) if isinstance(optimizer, str) else tuple(optimizer)
    unknown = [name for name in optimizers if name not in OPTIMIZER_NAMES]
    if unknown or (mode == "fit" and len(optimizers) != 1):
        raise ParityError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    return optimizers


def _check_counts(batch: int, steps: int) -> None:
    if batch < 1:
        raise ParityError(f"batch must be positive, got {batch}")
    if steps < 1:
        raise ParityError(f"steps must be positive, got {steps}")


def _check_gpu(device: str, frameworks, keras_backends) -> None:
    if device == "gpu":
        missing = [f for f in frameworks if not gpu_available(f, keras_backends)]
        if missing:
            raise ParityError(f"--device gpu: no GPU visible to {', '.join(missing)}")


def _resume_optimizers(resume_at: int, optimizer, mode: str, steps: int, data_parallel: int, exports):
    """The optimizers of a fit with ``resume_at``; one line refusing what it cannot run."""
    if mode != "fit":
        raise ParityError(f"--resume-at moves a fit between frameworks: it needs --mode fit, got --mode {mode}")
    if not 1 <= resume_at < steps:
        raise ParityError(f"--resume-at must be at least 1 and below --steps {steps}, got {resume_at}")
    for flag, used in (("--data-parallel", data_parallel > 1), ("export targets", exports)):
        if used:
            raise ParityError(f"--resume-at does not combine with {flag}")
    if optimizer is None:
        return RESUME_OPTIMIZERS
    optimizers = (optimizer,) if isinstance(optimizer, str) else tuple(optimizer)
    unknown = [name for name in optimizers if name not in RESUME_OPTIMIZERS]
    if unknown or not optimizers:
        raise ParityError(
            f"unknown optimizer {optimizer!r} for --resume-at; choose from {', '.join(RESUME_OPTIMIZERS)}"
        )
    return optimizers


def _export_targets(frameworks, dtype: str, device: str, mode: str) -> tuple[str, ...]:
    """The export targets among ``frameworks``, after refusing what an export cannot run."""
    exports = tuple(f for f in frameworks if f in EXPORT_TARGETS)
    if not exports:
        return exports
    named = ", ".join(exports)
    if mode != "eval":
        raise ParityError(f"--frameworks {named}: an export computes the eval forward only; use --mode eval")
    if device != "cpu":
        raise ParityError(f"--frameworks {named}: exports are checked on CPU only; use --device cpu")
    if dtype not in ("float32", "float64"):
        raise ParityError(f"--frameworks {named}: exports are float32 or float64, got --dtype {dtype}")
    if dtype == "float64" and "onnx" in exports:
        raise ParityError("--frameworks onnx is float32 only (onnxruntime has no float64 convolution on CPU)")
    return exports


@dataclasses.dataclass(frozen=True)
class Selection:
    """The frameworks and Keras backends a run uses, and one line for each one left out."""

    frameworks: tuple[str, ...]
    keras_backends: tuple[str, ...]
    skipped: tuple[str, ...] = ()


def select(frameworks=None, keras_backends=None) -> Selection:
    """The frameworks and Keras backends to run. ``None`` means every installed one (Keras
    backends: ``KERAS_BACKEND`` when it is set, else tensorflow, jax, torch), each one left out
    named in ``skipped`` with the reason, e.g. ``skipped flax: JAX is not installed (pip install
    'attention-unet[flax]')``. A framework or backend that is named but not installed raises
    ``MissingPackage`` naming what to install; no framework installed at all is a ``ParityError``.
    Unknown names are left to ``make_request``'s own validation."""
    named = os.environ.get("KERAS_BACKEND")
    if keras_backends is None:
        if named and named not in KERAS_BACKENDS:
            raise ParityError(f"KERAS_BACKEND={named} is not a backend parity checks: {', '.join(KERAS_BACKENDS)}")
        candidates = (named,) if named else KERAS_BACKENDS
        reasons = {backend: extras.keras_backend_missing(backend) for backend in candidates}
        backends = tuple(backend for backend, reason in reasons.items() if reason is None)
        backend_skips = [f"skipped keras/{backend}: {reason}" for backend, reason in reasons.items() if reason]
    else:
        backends = tuple(keras_backends)
        backend_skips = []
    skipped: list[str] = []
    if frameworks is None:
        chosen = []
        for framework in FRAMEWORKS:
            reason = extras.framework_missing(framework)
            if reason is None and framework == "keras" and not backends:
                reason = "no Keras backend is installed: " + "; ".join(line.split(": ", 1)[1] for line in backend_skips)
            if reason is None:
                chosen.append(framework)
            else:
                skipped.append(f"skipped {framework}: {reason}")
        if not chosen:
            raise ParityError(
                "no framework is installed: pip install 'attention-unet[torch]' (or [flax] or [keras,jax])"
            )
        frameworks = tuple(chosen)
    else:
        frameworks = tuple(frameworks)
        for framework in frameworks:
            if framework in extras.FRAMEWORK_PACKAGES:
                extras.require(extras.FRAMEWORK_PACKAGES[framework], f"--frameworks {framework}")
            elif framework in EXPORT_TARGETS:
                extras.require(export_files.FORMATS[EXPORT_TARGETS[framework]].modules, f"--frameworks {framework}")
    if "keras" in frameworks:
        skipped += backend_skips
        if keras_backends is not None:
            for backend in backends:
                if backend in extras.KERAS_BACKEND_PACKAGES:
                    extras.require_keras_backend(backend, f"--keras-backends {backend}")
        elif not backends:
            extras.require_keras_backend(
                named or "jax", "--frameworks keras" + (f" under KERAS_BACKEND={named}" if named else "")
            )
    return Selection(frameworks, backends, tuple(skipped))


def gpu_available(framework: str, keras_backends=("tensorflow",)) -> bool:
    """Whether ``framework`` is installed and sees a GPU (Keras: under every given backend)."""
    if framework == "keras":
        return all(_backend_sees_gpu(b) for b in keras_backends)
    return _backend_sees_gpu("jax" if framework == "flax" else framework)


def _backend_sees_gpu(backend: str) -> bool:
    try:
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
        if backend == "jax":
            import jax

            return bool(jax.devices("gpu"))
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except (ImportError, RuntimeError):  # not installed, or JAX without a GPU platform
        return False
