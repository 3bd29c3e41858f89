"""Cross-framework parity: the same checkpoint and input through every implementation, each
result compared with a float64 reference, block by block.

The reference is an independent float64 NumPy computation (``weights_convert.harness.reference``) that
shares no code with any implementation: block outputs, and in train mode the updated running
statistics, the gradients of the loss and one SGD and one Adam step; in fit mode the loss at every
step of an N-step training run and the final parameters and running statistics. So every
framework, PyTorch included, is checked against something that is not itself, and a parity run
needs no framework but the ones under test.

At a reduced precision (float32, mixed bfloat16) the same NumPy reference is also computed at that
precision, and its difference from the float64 reference is each row's measured rounding *noise*;
an implementation passes a row when its own difference is at most ``max(floor, factor * noise)``
(``weights_convert.harness.tolerances``). The verdict is therefore a property of the computation, not of
the CPU that runs it. float64 rows must agree to 1e-10.

Every implementation is fed the canonical checkpoint through its converter (``from_checkpoint``)
and returns results in canonical layouts, so the comparison is framework-free
(``weights_convert.harness.compare``). Rows come in computation order, so the first failing row names the
block where an implementation starts to drift.

Python API for users' CI::

    from weights_convert.harness import parity
    report = parity.check("model.safetensors", frameworks=("torch", "flax"), dtype="float64")
    parity.assert_parity("model.safetensors")          # raises AssertionError naming the drift

Deployment exports are targets too (``EXPORT_TARGETS``, named explicitly, never by default; eval
mode only): the checkpoint is exported once per format to a temporary folder
(``weights_convert.harness.export``), each file runs in its own runtime, and its ``output`` and
``mask`` rows (an export has no intermediate blocks) are judged under the same bounds as a
framework's, at the run's input and at a second batch (1, or 3 when the run's batch is 1) that
differs from the batch of 2 traced at export. ONNX is float32 only (onnxruntime has no float64
convolution on CPU): ``--dtype float64`` with ``onnx`` is refused in one line, as is
``mixed_bfloat16`` with any export, and ``--device gpu`` (exports run on CPU).

A fit with ``resume_at`` K (``--resume-at``) moves training between frameworks: every target trains
K steps, saves a training checkpoint in its native format, and every target continues each of
those for the remaining steps (``weights_convert.harness.resume``). Its rows,
``resume/<from>-><to>/<optimizer>/...``, compare each ordered pair's losses, final parameters,
statistics and optimizer state with the reference's uninterrupted run (the optimizer slots gate
in float64 only: ``tolerances.INFORMATIONAL_AT_REDUCED_PRECISION``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.optimizer_state import DEFAULTS as TRAINING_OPTIMIZERS
from weights_convert.core.optimizer_state import slot_names
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import data_parallel as dp
from weights_convert.harness.compare import Row, compare, rel_diff
from weights_convert.harness.tolerances import INFORMATIONAL_AT_REDUCED_PRECISION, NOISY_PRECISIONS, tolerance

FRAMEWORKS = ("torch", "flax", "keras")
# export target -> the destination suffix of its format (``weights_convert.harness.export.FORMATS``)
EXPORT_TARGETS = {
    "onnx": ".onnx",
    "pt2": ".pt2",
    "torchscript": ".torchscript",
    "savedmodel": ".savedmodel",
    "jaxexport": ".jaxexport",
}
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
DTYPES = ("float32", "float64", "mixed_bfloat16")
DEVICES = ("cpu", "gpu")
MODES = ("eval", "train", "fit")
OPTIMIZER_NAMES = ("sgd", "adam")
DEFAULT_SIZE = (64, 64)
DEFAULT_BATCH = 2
DEFAULT_STEPS = 5
DEFAULT_FIT_OPTIMIZER = "adam"
RESULT_FIELDS = (
    "framework",
    "backend",
    "device",
    "dtype",
    "mode",
    "quantity",
    "max_abs_diff",
    "rel_diff",
    "noise",
    "tolerance",
    "passed",
)
# Row groups computed after a backward pass, and how many reference runs (the first at the given
# weights, the others at one-ulp-dithered ones) measure their noise: see ``measure_noise``.
BACKWARD_GROUPS = ("grad", "step", "loss", "param")
# The optimizers of a fit with ``resume_at`` (training checkpoints' own), and their slots' row groups.
RESUME_OPTIMIZERS = tuple(TRAINING_OPTIMIZERS)
SLOT_NAMES = tuple(
    dict.fromkeys(slot for name, hyper in TRAINING_OPTIMIZERS.items() for slot in slot_names(name, hyper))
)
NOISE_RUNS = 3


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
    resume_at: int | None = None  # fit: train this many steps, then move (``weights_convert.harness.resume``)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Seeded data: one batch ``x`` / ``target`` (eval and train), or one per step (fit: stacked)."""

    x: np.ndarray
    target: np.ndarray


@dataclasses.dataclass(frozen=True)
class Result:
    framework: str
    backend: str
    device: str
    dtype: str
    mode: str
    quantity: str
    max_abs_diff: float
    rel_diff: float
    tolerance: float
    passed: bool
    informational: bool = False
    noise: float | None = None
    agree: float | None = None  # mask rows: the fraction of all pixels whose masks agree

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    results: list[Result]
    config: ModelConfig
    outputs: dict[str, np.ndarray]  # target label -> output logits (NCHW), or losses per step in fit mode
    reference_output: np.ndarray  # the float64 reference's logits, or its losses per step in fit mode
    input: np.ndarray
    mode: str = "eval"
    drift: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # fit: max |param - ref| per step
    seed: int = 0
    dtype: str = "float32"
    # a resumed fit: the reference's loss curve of each optimizer (``reference_output`` is the first's)
    references: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results if not r.informational)

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.passed and not r.informational]

    def first_drift(self) -> dict[str, str]:
        """For each failing implementation, the first quantity (in computation order) that fails."""
        drift: dict[str, str] = {}
        for r in self.failures():
            drift.setdefault(_label(r), r.quantity)
        return drift

    def to_json(self) -> dict:
        return {"passed": self.passed, "results": [_json_row(r) for r in self.results]}


def _label(r: Result) -> str:
    backend = f"/{r.backend}" if r.framework == "keras" else ""
    return f"{r.framework}{backend} {r.device} {r.dtype}"


def _json_row(r: Result) -> dict:
    row = {field: getattr(r, field) for field in RESULT_FIELDS}
    for key in ("max_abs_diff", "rel_diff", "noise"):
        if row[key] is not None and not np.isfinite(row[key]):
            row[key] = None  # JSON has no inf; None means "missing or misshapen"
    if r.agree is not None:
        row["agree"] = r.agree
    if r.informational:
        row["informational"] = True
    return row


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
    Unknown names are left to ``check``'s own validation."""
    import os

    from weights_convert.core import extras

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
                from weights_convert.harness.export import FORMATS

                extras.require(FORMATS[EXPORT_TARGETS[framework]].modules, f"--frameworks {framework}")
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


def make_inputs(config: ModelConfig, batch: int, size: tuple[int, int], seed: int = 0, steps: int | None = None):
    """Seeded input in [0, 1] (NCHW): smooth blobs plus noise, so that masks and difference maps
    are readable; and a regression target for the training loss. With ``steps``, one batch per
    step (seeds ``seed``, ``seed + 1``, ...) stacked on a new first axis.

    Values are float32-representable, so every precision starts from the same numbers and the
    rounding of the input is not counted as error."""
    if steps is not None:
        batches = [make_inputs(config, batch, size, seed + k) for k in range(steps)]
        return tuple(np.stack(arrays) for arrays in zip(*batches, strict=True))
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    x = 0.2 * rng.uniform(0.0, 1.0, (batch, config.in_channels, h, w))
    for n in range(batch):
        for _ in range(4):
            cy, cx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.25)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            x[n] += 0.8 * blob * rng.uniform(0.3, 1.0, (config.in_channels, 1, 1))
    target = rng.normal(0.0, 1.0, (batch, config.out_channels, h, w))
    # Scaled into [0, 1], not clipped: a clipped plateau makes windows of exactly equal values, and
    # a 2x2 max pool over exact ties routes its gradient by rounding order, not by the mathematics.
    x = x / np.max(x, axis=(1, 2, 3), keepdims=True)
    return x.astype(np.float32).astype(np.float64), target.astype(np.float32).astype(np.float64)


def default_checkpoint(x: np.ndarray | None = None) -> Checkpoint:
    """Seeded random weights of the default config with non-trivial BatchNorm statistics. Given
    the input ``x``, the output bias is shifted so that the logits straddle 0 and the mask
    comparison has pixels on both sides."""
    checkpoint = random_checkpoint(ModelConfig(), seed=0)
    if x is not None:
        from weights_convert.harness import reference

        logits = reference.forward(checkpoint.tensors, x, config=checkpoint.config)["output"]
        median = np.median(logits, axis=(0, 2, 3)).astype(checkpoint.tensors["output.bias"].dtype)
        checkpoint.tensors["output.bias"] = checkpoint.tensors["output.bias"] - median
    return checkpoint


def targets_for(frameworks, keras_backends, device: str, dtype: str) -> list[Target]:
    targets = []
    for framework in frameworks:
        backends = keras_backends if framework == "keras" else (framework,)
        for backend in backends:
            targets.append(Target(framework, backend, device, dtype))
            if device == "gpu" and dtype == "float32" and framework in ("torch", "flax"):
                targets.append(Target(framework, backend, device, dtype, precision="tf32"))
    return targets


def runner_of(framework: str):
    """The runner of torch or flax (Keras runs through ``weights_convert.harness.keras_worker``)."""
    if framework == "torch":
        from impl_torch import runner
    else:
        from impl_flax import runner
    return runner


@contextlib.contextmanager
def matmul_precision(target: Target):
    """Strict rows run with TF32 off (ARCHITECTURE.md section 4); tf32 rows with it on."""
    allow = target.precision == "tf32"
    if target.device != "gpu":
        yield
    elif target.framework == "torch":
        import torch

        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    elif target.framework == "flax":
        import jax

        with jax.default_matmul_precision("tensorfloat32" if allow else "highest"):
            yield
    else:
        yield  # Keras runs its backends with their strict settings (see impl_keras.runner)


def calls_for(run: Run, inputs: Inputs) -> list[tuple[str, np.ndarray, np.ndarray | None, dict]]:
    """The runner calls of one run: (function name, x, target or None, keyword arguments)."""
    if run.mode == "fit":
        kwargs = {"optimizer": run.optimizers[0], **({"trajectory": True} if run.trajectory else {})}
        kwargs |= dp.fit_kwargs(run.data_parallel, run.batchnorm)
        return [("fit", inputs.x, inputs.target, kwargs)]
    calls = [("forward", inputs.x, None, {"train": run.mode == "train"})]
    if run.mode == "train":
        calls += [("train_step", inputs.x, inputs.target, {"optimizer": name}) for name in run.optimizers]
    return calls


def merge(calls, outputs: list[dict]) -> dict:
    """One dict of every quantity, in computation order: the gradient once (every step of a train
    run starts from the same weights and batch), each step under ``step/<optimizer>/``."""
    results: dict = {}
    for (function, _, _, kwargs), output in zip(calls, outputs, strict=True):
        for name, value in output.items():
            if function != "train_step":
                results[name] = value
            elif name.startswith("grad/"):
                results.setdefault(name, value)
            elif name.startswith("step/"):
                results[name.replace("step/", f"step/{kwargs['optimizer']}/", 1)] = value
    return results


def run_calls(impl: Target, checkpoint: Checkpoint, calls) -> list[dict]:
    """Run ``calls`` (see ``calls_for``) with the implementation ``impl`` (``run_jobs``), or, for a
    data-parallel fit, on its devices (``weights_convert.harness.data_parallel``)."""
    if any(dp.is_data_parallel(kwargs) for *_, kwargs in calls):
        common = {"device": impl.device, "dtype": impl.dtype}
        return [dp.fit(impl.framework, checkpoint, x, t, **kwargs, **common) for _, x, t, kwargs in calls]
    return run_jobs(impl, [(function, checkpoint, x, target, kwargs) for function, x, target, kwargs in calls])


def run_jobs(impl: Target, jobs) -> list[dict]:
    """Each ``(function, checkpoint or its path, x, target or None, keyword arguments)`` run by the
    runner of ``impl`` at its device and dtype. Keras runs them all in one process of the requested
    backend (a subprocess unless it is this one's)."""
    common = {"device": impl.device, "dtype": impl.dtype}
    if impl.framework == "keras":
        from weights_convert.harness.keras_worker import Call, run_batch_in_backend

        batch = [
            Call(function, checkpoint, x, target, {**kwargs, **common})
            for function, checkpoint, x, target, kwargs in jobs
        ]
        return run_batch_in_backend(impl.backend, batch)
    runner = runner_of(impl.framework)
    with matmul_precision(impl):
        return [
            getattr(runner, function)(checkpoint, x, *([] if target is None else [target]), **kwargs, **common)
            for function, checkpoint, x, target, kwargs in jobs
        ]


def compute(impl: Target, checkpoint: Checkpoint, inputs: Inputs, run: Run) -> dict:
    """Every compared quantity of one implementation, in computation order."""
    parameters = checkpoint.astype("float32" if impl.dtype == "mixed_bfloat16" else impl.dtype)
    calls = calls_for(run, inputs)
    return merge(calls, run_calls(impl, parameters, calls))


def compute_reference(checkpoint: Checkpoint, inputs: Inputs, run: Run, precision: str = "float64") -> dict:
    """The same quantities from the independent NumPy reference, computed at ``precision`` (a
    train run's block outputs, statistics and every optimizer's step from one pass)."""
    from weights_convert.harness import reference

    tensors, common = checkpoint.tensors, {"config": checkpoint.config, "precision": precision}
    if run.resume_at is not None:
        from weights_convert.harness.resume import start

        ((optimizer,),) = (run.optimizers,)
        state = start(checkpoint, optimizer).optimizer
        return reference.fit(tensors, inputs.x, inputs.target, optimizer=state, **common)
    if run.mode == "fit":
        ((_, x, target, kwargs),) = calls_for(run, inputs)
        return reference.fit(tensors, x, target, **dp.reference_kwargs(kwargs), **common)
    if run.mode == "train" and run.optimizers:
        return reference.train_steps(
            tensors, inputs.x, inputs.target, optimizers=run.optimizers, forward=True, **common
        )
    return reference.forward(tensors, inputs.x, train=run.mode == "train", **common)


def _group(name: str) -> str:
    return name.split("/", 1)[0] if "/" in name else "block"


def _groups(reference: dict) -> dict[str, dict]:
    """The reference's quantities by group, groups in order of first appearance."""
    groups: dict[str, dict] = {}
    for name, value in reference.items():
        groups.setdefault(_group(name), {})[name] = value
    return groups


def _scale(group: str, quantities: dict) -> float | None:
    """The gradient is one vector: its rows are scaled by its largest entry (see ``judge``); so is
    each optimizer slot, a running sum of gradients (or of their squares)."""
    if group == "grad" or group in SLOT_NAMES:
        return max(float(np.max(np.abs(v))) for v in quantities.values())
    return None


def dithered(checkpoint: Checkpoint, seed: int) -> Checkpoint:
    """``checkpoint`` with every floating tensor moved by one float32 ulp up or down at random: a
    float32 evaluation of a point as close to the weights as float32 rounding itself."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, value in checkpoint.tensors.items():
        if value.dtype.kind != "f":
            tensors[name] = value
            continue
        value32 = value.astype(np.float32)
        direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        tensors[name] = np.nextafter(value32, direction).astype(value.dtype)
    return Checkpoint(checkpoint.config, tensors)


def measure_noise(checkpoint: Checkpoint, inputs: Inputs, run: Run, precision: str, reference: dict, say) -> dict:
    """Each row's rounding noise at ``precision``: the relative difference from the float64
    ``reference`` of the NumPy reference computed at that precision (ARCHITECTURE.md section 4).

    Rows of a forward pass (block outputs, the running statistics it updates) get their own run's
    noise. Rows downstream of a backward pass (gradients, steps, losses, parameters and optimizer
    state of a fit)
    get the largest noise of their group over NOISE_RUNS runs at weights dithered by one ulp:
    a backward pass through ReLUs and max pools makes discrete decisions (a pre-activation within
    rounding of zero), and at reduced precision which way each goes is a coin toss that moves a
    gradient entry by up to ~1e-3 of the gradient's scale. The same PyTorch float32 step on the
    default model errs 3.6e-3 or 8e-6 from float64 after a one-ulp change of the first conv's
    weights; no single run's row bounds another run's row, but the worst over a group and a few
    runs is stable."""
    forward_only = run.mode == "eval" or (run.mode == "train" and not run.optimizers)
    runs = []
    for k in range(1 if forward_only else NOISE_RUNS):
        say(f"noise: numpy {precision}" + (f" at dithered weights ({k}/{NOISE_RUNS - 1})" if k else ""))
        weights = dithered(checkpoint, seed=k) if k else checkpoint
        untraced = dataclasses.replace(run, trajectory=False)
        runs.append(compute_reference(weights, inputs, untraced, precision=precision))
    levels: dict[str, float] = {}
    for group, quantities in _groups(reference).items():
        scale = _scale(group, quantities)
        if group in BACKWARD_GROUPS or run.mode == "fit":  # everything in a fit follows a backward pass
            worst = max(rel_diff(r[name], ref, precision, scale)[1] for r in runs for name, ref in quantities.items())
            levels.update(dict.fromkeys(quantities, worst))
        else:
            levels.update({name: rel_diff(runs[0][name], ref, precision, scale)[1] for name, ref in quantities.items()})
    return levels


def judge(actual: dict, reference: dict, target: Target, noise: dict | None = None) -> list[tuple[Row, bool]]:
    """(row, informational) for every quantity: block outputs, the mask, running statistics,
    gradients, optimizer steps, losses and fitted parameters. Each row's bound is the dtype's:
    1e-10 in float64, relative to the row's measured ``noise`` level (``measure_noise``) below;
    TF32 rows are informational.

    Gradient rows are scaled by the largest entry of the whole gradient, not of each tensor: the
    gradient is one vector, and the conv biases in front of a train-mode BatchNorm have an exact
    gradient of zero (the BatchNorm subtracts the batch mean), so their own max|ref| is rounding
    noise (~1e-17) and a per-tensor ratio would compare noise with noise."""
    dtype = target.dtype
    informational = target.precision != "strict"
    fixed = tolerance("tf32") if informational else None
    judged: list[tuple[Row, bool]] = []
    for group, quantities in _groups(reference).items():
        rows = compare(actual, quantities, dtype, fixed, _scale(group, quantities), None if fixed else noise)
        judged += [(row, informational) for row in rows]
        if group == "block" and "output" in quantities:
            output_row = next(row for row in rows if row.quantity == "output")
            judged.append(
                (mask_row(actual.get("output"), reference["output"], output_row.tolerance, dtype), informational)
            )
    return judged


def mask_row(output, reference: np.ndarray, bound: float, dtype: str) -> Row:
    """Thresholded masks (logit > 0) must agree on every pixel whose |reference logit| exceeds the
    output row's bound (relative, so times the output's scale). The row reports the disagreeing
    pixels among those (max_abs_diff), their fraction (rel_diff), and the fraction of all pixels
    whose masks agree (agree)."""
    if np.shape(output) != np.shape(reference):
        return Row("mask", float("inf"), float("inf"), 0.0, False, agree=0.0)
    scale = float(np.max(np.abs(reference))) if dtype == "float64" else max(1.0, float(np.max(np.abs(reference))))
    decided = np.abs(reference) > bound * scale
    differ = (np.asarray(output) > 0) != (reference > 0)
    disagree = int(np.count_nonzero(differ & decided))
    agree = 1.0 - float(np.mean(differ))
    return Row("mask", float(disagree), disagree / max(1, int(decided.sum())), 0.0, disagree == 0, agree=agree)


def check(
    checkpoint=None,
    *,
    frameworks=None,
    keras_backends=None,
    dtype: str = "float32",
    device: str = "cpu",
    mode: str = "eval",
    size: tuple[int, int] = DEFAULT_SIZE,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    optimizer: str | tuple[str, ...] | None = None,
    trajectory: bool = False,
    progress=None,
    data_parallel: int = 1,
    batchnorm: str = "sync",
    resume_at: int | None = None,
) -> Report:
    """Run ``checkpoint`` (a path, a Checkpoint, or None for seeded default weights) through each
    framework and compare every quantity with the independent float64 NumPy reference: block
    outputs (eval), plus running statistics, gradients and one step of each optimizer (train, or
    of ``optimizer`` only: a name, or a tuple of names, empty for no backward pass), or the losses
    of ``steps`` training steps and the final parameters and running statistics (fit, with
    ``optimizer``, default Adam). Below float64 each row's bound is relative to the noise of the
    same reference computed at ``dtype`` (``measure_noise``). With ``trajectory`` a fit
    also records every implementation's largest parameter difference after each step
    (``Report.drift``, for the plot). A fit on ``data_parallel`` devices trains each framework
    data-parallel with ``batchnorm`` statistics, against the reference of that mode
    (``weights_convert.harness.data_parallel``). A fit with ``resume_at`` K moves training between
    every ordered pair of frameworks after K steps (``weights_convert.harness.resume``), with each of
    ``optimizer`` (default: all of ``RESUME_OPTIMIZERS``).

    ``frameworks`` and ``keras_backends`` default to the installed ones (``select``); one that is
    named but not installed raises ``MissingPackage`` naming what to install."""
    selection = select(frameworks, keras_backends)
    frameworks, keras_backends = selection.frameworks, selection.keras_backends
    exports = _export_targets(frameworks, dtype, device, mode)
    frameworks = tuple(f for f in frameworks if f not in exports)
    fit_optimizer = None if resume_at is not None else optimizer  # a resumed fit has its own optimizers
    frameworks, keras_backends, optimizers = _validate(
        frameworks, keras_backends, dtype, device, mode, size, batch, steps, fit_optimizer, allow_none=bool(exports)
    )
    if resume_at is not None:
        optimizers = _validate_resume(resume_at, optimizer, mode, steps, data_parallel, exports)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        import weights_convert

        checkpoint = weights_convert.read(checkpoint)
    config = checkpoint.config if checkpoint is not None else ModelConfig()
    if min(size) < config.min_size:
        raise ParityError(f"--size {size[0]} {size[1]} is too small for depth {config.depth}: min {config.min_size}")
    try:
        keras_backends = dp.checked(frameworks, keras_backends, mode, batch, data_parallel, batchnorm)
    except ValueError as error:
        raise ParityError(str(error)) from None
    traced = trajectory and mode == "fit" and resume_at is None  # a resumed fit plots its losses only
    run = Run(mode, optimizers, steps, traced, data_parallel, batchnorm, resume_at)
    inputs = Inputs(*make_inputs(config, batch, size, seed, steps if mode == "fit" else None))
    if checkpoint is None:
        checkpoint = default_checkpoint(inputs.x[0] if mode == "fit" else inputs.x)
    say = progress or (lambda message: None)
    if resume_at is not None:
        results, outputs, curves = _check_resume(
            targets_for(frameworks, keras_backends, device, dtype), checkpoint, inputs, run, say
        )
        shown = curves[run.optimizers[0]]
        return Report(results, config, outputs, shown, inputs.x[0], mode, seed=seed, dtype=dtype, references=curves)
    say("reference: numpy float64")
    reference, reference_path = _split_trajectory(compute_reference(checkpoint, inputs, run))
    noise = measure_noise(checkpoint, inputs, run, dtype, reference, say) if dtype in NOISY_PRECISIONS else None
    results: list[Result] = []
    outputs: dict[str, np.ndarray] = {}
    drift: dict[str, np.ndarray] = {}
    for target in targets_for(frameworks, keras_backends, device, dtype):
        say(f"{target.label}{' (tf32)' if target.precision == 'tf32' else ''}")
        actual, path = _split_trajectory(compute(target, checkpoint, inputs, run))
        if run.trajectory and target.precision == "strict":
            drift[target.label] = _drift(path, reference_path, run.steps)
        for row, informational in judge(actual, reference, target, noise):
            quantity = ("tf32:" if target.precision == "tf32" else "") + row.quantity
            results.append(_result(target, mode, row, quantity, informational))
        if target.precision == "strict":
            outputs[target.label] = _curve(actual, run) if mode == "fit" else np.asarray(actual.get("output"))
    if exports:
        from weights_convert.harness import export as export_module

        case = export_module.ReferenceCase(inputs.x, reference["output"], noise and {"output": noise["output"]})
        for name, verdict in _check_exports(exports, checkpoint, case, dtype, seed, say).items():
            results += _export_results(name, verdict, dtype)
            outputs[f"{name} cpu {dtype}"] = verdict.cases[0].logits
    shown = _curve(reference, run) if mode == "fit" else reference["output"]
    shown_input = inputs.x[0] if mode == "fit" else inputs.x
    return Report(results, config, outputs, shown, shown_input, mode, drift, seed=seed, dtype=dtype)


def _result(target: Target, mode: str, row: Row, quantity: str, informational: bool) -> Result:
    fields = dataclasses.asdict(row) | {"quantity": quantity}
    return Result(
        target.framework, target.backend, target.device, target.dtype, mode, **fields, informational=informational
    )


def _validate_resume(resume_at: int, optimizer, mode: str, steps: int, data_parallel: int, exports):
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


def _check_resume(targets: list[Target], checkpoint: Checkpoint, inputs: Inputs, run: Run, say):
    """(results, loss curves, the reference's curve of each optimizer) of a fit with ``run.resume_at``: for each
    optimizer the reference's uninterrupted run and its noise, then every ordered pair of the
    (strict) ``targets`` judged against it."""
    from weights_convert.harness import resume

    dtype = targets[0].dtype
    references, noises = {}, {}
    for name in run.optimizers:
        single = dataclasses.replace(run, optimizers=(name,))
        say(f"reference: numpy float64, {name}")
        references[name] = compute_reference(checkpoint, inputs, single)
        noisy = dtype in NOISY_PRECISIONS
        noises[name] = measure_noise(checkpoint, inputs, single, dtype, references[name], say) if noisy else None
    strict = [target for target in targets if target.precision == "strict"]
    parameters = checkpoint.astype("float32" if dtype == "mixed_bfloat16" else dtype)
    pairs = resume.train_pairs(strict, parameters, inputs.x, inputs.target, run.resume_at, run.optimizers, say)
    results, outputs = [], {}
    shown_only = INFORMATIONAL_AT_REDUCED_PRECISION if dtype in NOISY_PRECISIONS else ()
    for (name, source, target), actual in pairs.items():
        prefix = f"resume/{resume.pair_label(source, target)}/{name}"
        for row, informational in judge(actual, references[name], target, noises[name]):
            informational = informational or _group(row.quantity) in shown_only
            results.append(_result(target, "fit", row, f"{prefix}/{row.quantity}", informational))
        outputs[prefix] = _curve(actual, run)
    return results, outputs, {name: _curve(reference, run) for name, reference in references.items()}


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


def _check_exports(exports, checkpoint: Checkpoint, case, dtype: str, seed: int, say) -> dict:
    """Export ``checkpoint`` once per target to a temporary folder (removed afterwards) and judge
    each file on ``case`` (the run's input and its reference) and on a second batch of the same
    size that differs from the one traced at export; target -> ``ExportCheck``."""
    import tempfile
    from pathlib import Path

    from weights_convert.harness import export

    batch, _, height, width = case.x.shape
    other = 3 if batch == 1 else 1
    say(f"reference: numpy float64 at batch {other} (exports)")
    cases = [case, *export.reference_cases(checkpoint, dtype=dtype, cases=[(other, height, width)], seed=seed + 1)]
    verdicts = {}
    with tempfile.TemporaryDirectory(prefix="attention-unet-parity-") as directory:
        for name in exports:
            path = Path(directory) / f"model{EXPORT_TARGETS[name]}"
            fmt = export.FORMATS[path.suffix]
            say(f"{name}: export with {fmt.writer}, run in {fmt.runtime}")
            export.export(checkpoint, path, dtype=dtype, check=False)
            verdicts[name] = export.judge_file(path, cases, dtype=dtype)
    return verdicts


def _export_results(name: str, verdict, dtype: str) -> list[Result]:
    """The ``output`` and ``mask`` rows of one export: at the run's input, then under
    ``batch<N>/`` at the second batch."""
    results = []
    for k, case in enumerate(verdict.cases):
        prefix = "" if k == 0 else f"batch{case.shape[0]}/"
        for row in (case.output, case.mask):
            fields = dataclasses.asdict(row) | {"quantity": prefix + row.quantity}
            results.append(Result(name, name, "cpu", dtype, "eval", **fields))
    return results


def _split_trajectory(results: dict) -> tuple[dict, dict]:
    """(the compared quantities, the ``trajectory/`` entries of a fit)."""
    path = {k: v for k, v in results.items() if k.startswith("trajectory/")}
    return {k: v for k, v in results.items() if k not in path}, path


def _drift(path: dict, reference_path: dict, steps: int) -> np.ndarray:
    """max |parameter - reference parameter| over every parameter, after each step."""
    curve = np.full(steps, np.nan)
    for k in range(1, steps + 1):
        prefix = f"trajectory/step{k}/"
        diffs = [
            float(np.max(np.abs(np.asarray(path[name], np.float64) - np.asarray(ref, np.float64))))
            for name, ref in reference_path.items()
            if name.startswith(prefix) and name in path and np.shape(path[name]) == np.shape(ref)
        ]
        curve[k - 1] = max(diffs, default=np.nan)
    return curve


def _curve(results: dict, run: Run) -> np.ndarray:
    """The losses of a fit, step by step."""
    return np.array([float(results.get(f"loss/step{k}", np.nan)) for k in range(1, run.steps + 1)])


def assert_parity(checkpoint=None, **kwargs) -> Report:
    """``check`` and raise AssertionError naming, per failing implementation, the first drifting block."""
    report = check(checkpoint, **kwargs)
    if not report.passed:
        drift = "; ".join(f"{label}: first drift at {quantity}" for label, quantity in report.first_drift().items())
        worst = max(report.failures(), key=lambda r: r.rel_diff)
        raise AssertionError(f"parity failed: {drift} (worst: {worst.quantity} rel {worst.rel_diff:.3g})")
    return report


def _validate(frameworks, keras_backends, dtype, device, mode, size, batch, steps, optimizer, allow_none=False):
    """Refuse bad arguments in one line; ``allow_none``: no framework (a run of export targets only)."""
    frameworks = tuple(frameworks)
    keras_backends = tuple(keras_backends)
    checked = [("frameworks", frameworks, FRAMEWORKS)]
    if "keras" in frameworks:
        checked.append(("keras backends", keras_backends, KERAS_BACKENDS))
    for name, values, allowed in checked:
        allowed = allowed + tuple(EXPORT_TARGETS) if name == "frameworks" else allowed
        bad = [v for v in values if v not in allowed]
        if bad or not (values or (allow_none and name == "frameworks")):
            raise ParityError(f"unknown {name} {bad or list(values)}; choose from {', '.join(allowed)}")
    for name, value, allowed in (("dtype", dtype, DTYPES), ("device", device, DEVICES), ("mode", mode, MODES)):
        if value not in allowed:
            raise ParityError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
    if optimizer is None:
        optimizers = (DEFAULT_FIT_OPTIMIZER,) if mode == "fit" else OPTIMIZER_NAMES
    else:
        optimizers = (optimizer,) if isinstance(optimizer, str) else tuple(optimizer)
    unknown = [name for name in optimizers if name not in OPTIMIZER_NAMES]
    if unknown or (mode == "fit" and len(optimizers) != 1):
        raise ParityError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    if len(size) != 2 or min(size) < 1 or batch < 1:
        raise ParityError(f"size must be two positive integers and batch positive, got size {size}, batch {batch}")
    if steps < 1:
        raise ParityError(f"steps must be positive, got {steps}")
    if device == "gpu":
        missing = [f for f in frameworks if not gpu_available(f, keras_backends)]
        if missing:
            raise ParityError(f"--device gpu: no GPU visible to {', '.join(missing)}")
    return frameworks, keras_backends, optimizers


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


def format_table(report: Report, verbose: bool = False) -> str:
    """The human table. Gradient, statistics, step and parameter groups are folded to their worst
    row (with a count) unless ``verbose``; failing rows are always listed. ``noise`` is the
    reference's own difference at the dtype, which sets the row's tolerance."""
    header = ("framework", "backend", "device", "dtype", "quantity", "max abs diff", "rel diff", "noise", "tolerance")
    header += ("pass",)
    lines = []
    for key, group in _grouped(report.results, verbose):
        r, count = group
        quantity = (
            r.quantity
            if count == 1
            else f"{key} ({count} tensors, worst {r.quantity.removeprefix(key.removesuffix('*'))})"
        )
        if r.agree is not None:
            quantity += f" ({r.agree:.2%} agree)"
        status = "info" if r.informational else ("ok" if r.passed else "FAIL")
        noise = "-" if r.noise is None else f"{r.noise:.3g}"
        lines.append(
            (
                r.framework,
                r.backend if r.framework == "keras" else "-",
                r.device,
                r.dtype,
                quantity,
                f"{r.max_abs_diff:.3g}",
                f"{r.rel_diff:.3g}",
                noise,
                f"{r.tolerance:.3g}",
                status,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]
    ]
    return "\n".join([*out, summary_line(report)])


def summary_line(report: Report) -> str:
    """The verdict and the run in one line: PASS (or FAIL and where each implementation first
    drifts), the number of rows, the worst gating row as a fraction of its bound, the model
    config, input size, batch, seed, dtype and mode."""
    drift = report.first_drift()
    verdict = "PASS" if report.passed else "FAIL: " + "; ".join(f"{k}: first drift at {v}" for k, v in drift.items())
    gating = [r for r in report.results if not r.informational and r.tolerance > 0]
    rows = f"{len(report.results)} rows"
    if gating:
        worst = max(gating, key=lambda r: r.rel_diff / r.tolerance)
        rows += f", worst {worst.rel_diff / worst.tolerance:.2g} of its bound ({_label(worst)} {worst.quantity})"
    batch, _, height, width = np.shape(report.input)
    config = json.dumps(report.config.to_dict())
    run = f"size {height}x{width}, batch {batch}, seed {report.seed}, {report.dtype}, {report.mode}"
    return f"{verdict} | {rows} | config {config} | {run}"


FOLDED = ("state", "grad", "step/sgd", "step/adam", "param")


def _fold(name: str) -> str | None:
    """The folded group of a row: one of ``FOLDED``, or a whole ``resume/<from>-><to>/<optimizer>``."""
    if name.startswith("resume/"):
        return "/".join(name.split("/")[:3])
    return next((p for p in FOLDED if name.startswith(p + "/")), None)


def _grouped(results: list[Result], verbose: bool):
    """Rows to print: each block row as is; grad/, state/, step/<optimizer>/ and param/ folded per
    implementation, and each pair and optimizer of a resumed fit."""
    groups: dict[tuple, list] = {}
    order = []
    for r in results:
        name = r.quantity.removeprefix("tf32:")
        prefix = _fold(name)
        if verbose or prefix is None or not r.passed:
            key = (id(r),)
            groups[key] = [r, 1, r.quantity]
            order.append(key)
            continue
        key = (_label(r), r.informational, prefix)
        if key not in groups:
            groups[key] = [r, 0, r.quantity.removesuffix(name) + prefix + "/*"]
            order.append(key)
        group = groups[key]
        group[1] += 1
        if r.rel_diff / r.tolerance > group[0].rel_diff / group[0].tolerance:
            group[0] = r
    for key in order:
        r, count, label = groups[key]
        yield label, (r, count)


def write_report(report: Report, directory) -> list[str]:
    """A PNG (input, each framework's mask, heat maps of |difference|) and the per-block table
    (Markdown and JSON) in ``directory``; returns the written paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = directory / "parity.md"
    table.write_text("```\n" + format_table(report, verbose=True) + "\n```\n")
    data = directory / "parity.json"
    data.write_text(json.dumps(report.to_json(), indent=1))
    png = directory / "parity.png"
    plot = _plot_resume if report.references else _plot_fit if report.mode == "fit" else _plot_outputs
    fig = plot(report, plt)
    fig.suptitle("PASS" if report.passed else "FAIL")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [str(png), str(table), str(data)]


def _plot_fit(report: Report, plt):
    """The loss curves of every implementation over the reference's, and the largest parameter
    difference from the reference after each step (log axis)."""
    fig, (losses, drift) = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.arange(1, len(report.reference_output) + 1)
    losses.plot(steps, report.reference_output, "k--", linewidth=3, alpha=0.4, label="reference (numpy float64)")
    for label, curve in report.outputs.items():
        losses.plot(steps, curve, marker="o", markersize=3, label=label)
    for label, curve in report.drift.items():
        drift.semilogy(steps, np.maximum(curve, np.finfo(np.float64).tiny), marker="o", markersize=3, label=label)
    losses.set(xlabel="step", ylabel="loss (before the step's update)", title="training loss")
    drift.set(xlabel="step", ylabel="max |parameter - reference|", title="largest parameter difference")
    losses.legend(fontsize=7)
    if report.drift:
        drift.legend(fontsize=7)
    return fig


def _plot_resume(report: Report, plt):
    """A resumed fit: every pair's loss curve over its optimizer's reference, and each pair's worst
    row as a fraction of its bound (log axis; 1 is the bound)."""
    fig, (losses, worst) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = np.arange(1, len(report.reference_output) + 1)
    for name, curve in report.references.items():
        losses.plot(steps, curve, "--", linewidth=3, alpha=0.4, label=f"reference (numpy float64), {name}")
    for curve in report.outputs.values():  # unlabelled: 75 pairs would bury the legend
        losses.plot(steps, curve, marker="o", markersize=2, linewidth=0.8)
    losses.set(xlabel="step", ylabel="loss (before the step's update)", title="training loss, every pair")
    losses.legend(fontsize=7)
    fractions: dict[str, float] = {}
    for r in report.results:
        pair = "/".join(r.quantity.split("/")[1:3])
        fraction = r.rel_diff / r.tolerance if r.tolerance else float("inf")
        fractions[pair] = max(fractions.get(pair, 0.0), fraction)
    labels = list(fractions)
    values = [max(fractions[label], 1e-6) for label in labels]
    worst.barh(range(len(labels)), values, color=["tab:red" if v > 1 else "tab:blue" for v in values])
    worst.axvline(1.0, color="k", linewidth=1)
    worst.set_xscale("log")
    worst.set_yticks(range(len(labels)), labels, fontsize=max(4, 9 - len(labels) // 12))
    worst.invert_yaxis()
    worst.set(xlabel="worst row / its bound", title="each pair and optimizer")
    return fig


def _plot_outputs(report: Report, plt):
    """Input, reference and per-implementation masks, and heat maps of |difference|."""
    labels = list(report.outputs)
    columns = 2 + len(labels)
    fig, axes = plt.subplots(2, columns, figsize=(3 * columns, 6), squeeze=False)
    image = report.input[0].transpose(1, 2, 0)
    image = image[..., :3] if image.shape[-1] >= 3 else image[..., 0]
    axes[0, 0].imshow(image, cmap=None if image.ndim == 3 else "gray")
    axes[0, 0].set_title("input")
    axes[0, 1].imshow(report.reference_output[0, 0] > 0, cmap="gray")
    axes[0, 1].set_title("reference mask")
    axes[1, 0].axis("off")
    axes[1, 1].imshow(report.reference_output[0, 0], cmap="viridis")
    axes[1, 1].set_title("reference logits")
    for i, label in enumerate(labels):
        output = report.outputs[label]
        axes[0, 2 + i].imshow(output[0, 0] > 0, cmap="gray")
        axes[0, 2 + i].set_title(f"{label}\nmask", fontsize=8)
        heat = axes[1, 2 + i].imshow(np.abs(output[0, 0] - report.reference_output[0, 0]), cmap="magma")
        axes[1, 2 + i].set_title("|difference|", fontsize=8)
        fig.colorbar(heat, ax=axes[1, 2 + i], fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
