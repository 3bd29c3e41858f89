"""Cross-framework parity: the same checkpoint and input through every implementation, each
result compared with a float64 reference, block by block.

The reference for every forward quantity (block outputs, and in train mode the updated running
statistics) is an independent float64 NumPy computation (``weights_convert.reference``) that
shares no code with any implementation, so PyTorch is checked like the others. Gradients and
optimizer steps are referenced to the PyTorch implementation in float64 on the CPU (autograd;
its forward is itself checked against NumPy in the same run). Every implementation is fed the
canonical checkpoint through its converter (``from_checkpoint``) and returns results in canonical
layouts, so the comparison is framework-free (``weights_convert.compare``). Rows come in
computation order, so the first failing row names the block where an implementation starts to drift.

Python API for users' CI::

    from weights_convert import parity
    report = parity.check("model.safetensors", frameworks=("torch", "flax"), dtype="float64")
    parity.assert_parity("model.safetensors")          # raises AssertionError naming the drift
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np

from weights_convert.checkpoint import Checkpoint
from weights_convert.compare import Row, compare
from weights_convert.random_init import random_checkpoint
from weights_convert.spec import ModelConfig
from weights_convert.tolerances import TOLERANCES

FRAMEWORKS = ("torch", "flax", "keras")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "gpu")
MODES = ("eval", "train")
OPTIMIZER_NAMES = ("sgd", "adam")
DEFAULT_SIZE = (64, 64)
DEFAULT_BATCH = 2
RESULT_FIELDS = (
    "framework",
    "backend",
    "device",
    "dtype",
    "mode",
    "quantity",
    "max_abs_diff",
    "rel_diff",
    "tolerance",
    "passed",
)


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    results: list[Result]
    config: ModelConfig
    outputs: dict[str, np.ndarray]  # target label -> output logits (NCHW), for plots
    reference_output: np.ndarray
    input: np.ndarray

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
    for key in ("max_abs_diff", "rel_diff"):
        if not np.isfinite(row[key]):
            row[key] = None  # JSON has no inf; None means "missing or misshapen"
    if r.informational:
        row["informational"] = True
    return row


def make_inputs(config: ModelConfig, batch: int, size: tuple[int, int], seed: int = 0):
    """Seeded input in [0, 1] (NCHW): smooth blobs plus noise, so that masks and difference maps
    are readable; and a regression target for the training loss."""
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
    return np.clip(x, 0.0, 1.0), target


def default_checkpoint(x: np.ndarray | None = None) -> Checkpoint:
    """Seeded random weights of the default config with non-trivial BatchNorm statistics. Given
    the input ``x``, the output bias is shifted so that the logits straddle 0 and the mask
    comparison has pixels on both sides."""
    checkpoint = random_checkpoint(ModelConfig(), seed=0)
    if x is not None:
        from weights_convert import reference

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


def _runner(framework: str):
    if framework == "torch":
        from impl_torch import runner
    elif framework == "flax":
        from impl_flax import runner
    else:
        from impl_keras import runner
    return runner


@contextlib.contextmanager
def _matmul_precision(target: Target):
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


def run_calls(impl: Target, checkpoint: Checkpoint, x, target_map, calls) -> list[dict]:
    """Run ``calls`` ((function name, kwargs) pairs) with the implementation ``impl``. Keras runs
    them all in one process of the requested backend (a subprocess unless it is this one's)."""
    common = {"device": impl.device, "dtype": impl.dtype}
    if impl.framework == "keras":
        from impl_keras.runner import Call, run_batch_in_backend

        batch = [
            Call(function, checkpoint, x, target_map if function == "train_step" else None, {**kwargs, **common})
            for function, kwargs in calls
        ]
        return run_batch_in_backend(impl.backend, batch)
    runner = _runner(impl.framework)
    with _matmul_precision(impl):
        return [
            getattr(runner, function)(checkpoint, x, **kwargs, **common)
            for function, kwargs in _with_targets(calls, target_map)
        ]


def _with_targets(calls, target_map):
    for function, kwargs in calls:
        yield function, ({**kwargs, "target": target_map} if function == "train_step" else kwargs)


def compute(impl: Target, checkpoint: Checkpoint, x, target_map, mode: str) -> dict:
    """Every compared quantity of one implementation, in computation order."""
    calls = [("forward", {"train": mode == "train"})]
    if mode == "train":
        calls += [("train_step", {"optimizer": optimizer}) for optimizer in OPTIMIZER_NAMES]
    forward, *steps = run_calls(impl, checkpoint.astype(impl.dtype), x, target_map, calls)
    results = dict(forward)
    for (_, kwargs), step in zip(calls[1:], steps, strict=True):
        for name, value in step.items():
            if name.startswith("grad/"):
                results.setdefault(name, value)
            else:
                results[name.replace("step/", f"step/{kwargs['optimizer']}/", 1)] = value
    return results


def compute_reference(checkpoint: Checkpoint, x, target_map, mode: str, say) -> dict:
    """Forward quantities from NumPy float64; gradients and steps from PyTorch float64 on the CPU."""
    from weights_convert import reference as numpy_reference

    say("reference: numpy float64")
    results = numpy_reference.forward(checkpoint.tensors, x, train=(mode == "train"), config=checkpoint.config)
    if mode == "train":
        say("reference: torch cpu float64 (gradients, optimizer steps)")
        autograd = compute(Target("torch", "torch", "cpu", "float64"), checkpoint, x, target_map, mode)
        results.update({k: v for k, v in autograd.items() if k.startswith(("grad/", "step/"))})
    return results


def judge(actual: dict, reference: dict, target: Target) -> list[tuple[Row, bool]]:
    """(row, informational) for every quantity: block outputs, the mask, running statistics,
    gradients, optimizer steps. Gating rows use the dtype's tolerance; TF32 rows, and float32
    gradients and steps (see TOLERANCES["float32_gradients"]), are informational.

    Gradient rows are scaled by the largest entry of the whole gradient, not of each tensor: the
    gradient is one vector, and the conv biases in front of a train-mode BatchNorm have an exact
    gradient of zero (the BatchNorm subtracts the batch mean), so their own max|ref| is rounding
    noise (~1e-17) and a per-tensor ratio would compare noise with noise."""
    dtype = target.dtype
    informational = target.precision != "strict"
    tolerance = TOLERANCES[target.precision if informational else dtype]
    groups = {"block": {}, "state": {}, "grad": {}, "step": {}}
    for name, value in reference.items():
        groups[name.split("/", 1)[0] if "/" in name else "block"][name] = value
    judged = [(row, informational) for row in compare(actual, groups["block"], dtype, tolerance)]
    mask = Row("mask", *mask_row(actual.get("output"), reference["output"], tolerance, dtype))
    judged.append((mask, informational))
    judged += [(row, informational) for row in compare(actual, groups["state"], dtype, tolerance)]
    if dtype == "float32" and not informational:
        tolerance, informational = TOLERANCES["float32_gradients"], True
    gradient_scale = max((float(np.max(np.abs(v))) for v in groups["grad"].values()), default=None)
    judged += [(row, informational) for row in compare(actual, groups["grad"], dtype, tolerance, gradient_scale)]
    judged += [(row, informational) for row in compare(actual, groups["step"], dtype, tolerance)]
    return judged


def mask_row(output, reference: np.ndarray, tolerance: float, dtype: str) -> tuple[float, float, float, bool]:
    """Thresholded masks (logit > 0) must agree wherever |reference logit| exceeds the tolerance:
    (disagreeing pixels, their fraction, tolerance 0, passed)."""
    scale = float(np.max(np.abs(reference))) if dtype == "float64" else max(1.0, float(np.max(np.abs(reference))))
    decided = np.abs(reference) > tolerance * scale
    if np.shape(output) != np.shape(reference):
        return float("inf"), float("inf"), 0.0, False
    disagree = int(np.count_nonzero(((output > 0) != (reference > 0)) & decided))
    return float(disagree), disagree / max(1, int(decided.sum())), 0.0, disagree == 0


def check(
    checkpoint=None,
    *,
    frameworks=FRAMEWORKS,
    keras_backends=KERAS_BACKENDS,
    dtype: str = "float32",
    device: str = "cpu",
    mode: str = "eval",
    size: tuple[int, int] = DEFAULT_SIZE,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
    progress=None,
) -> Report:
    """Run ``checkpoint`` (a path, a Checkpoint, or None for seeded default weights) through each
    framework and compare every block output (and, in train mode, running statistics, gradients
    and one SGD and one Adam step) with the float64 PyTorch reference on the CPU."""
    frameworks, keras_backends = _validate(frameworks, keras_backends, dtype, device, mode, size, batch)
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        import weights_convert

        checkpoint = weights_convert.read(checkpoint)
    config = checkpoint.config if checkpoint is not None else ModelConfig()
    if min(size) < config.min_size:
        raise ParityError(f"--size {size[0]} {size[1]} is too small for depth {config.depth}: min {config.min_size}")
    x, target_map = make_inputs(config, batch, size, seed)
    if checkpoint is None:
        checkpoint = default_checkpoint(x)
    say = progress or (lambda message: None)
    reference = compute_reference(checkpoint, x, target_map, mode, say)
    results: list[Result] = []
    outputs: dict[str, np.ndarray] = {}
    for target in targets_for(frameworks, keras_backends, device, dtype):
        say(f"{target.label}{' (tf32)' if target.precision == 'tf32' else ''}")
        actual = compute(target, checkpoint, x, target_map, mode)
        for row, informational in judge(actual, reference, target):
            quantity = ("tf32:" if target.precision == "tf32" else "") + row.quantity
            results.append(
                Result(
                    target.framework,
                    target.backend,
                    target.device,
                    target.dtype,
                    mode,
                    quantity,
                    row.max_abs_diff,
                    row.rel_diff,
                    row.tolerance,
                    row.passed,
                    informational,
                )
            )
        if target.precision == "strict":
            outputs[target.label] = np.asarray(actual.get("output"))
    return Report(results, config, outputs, reference["output"], x)


def assert_parity(checkpoint=None, **kwargs) -> Report:
    """``check`` and raise AssertionError naming, per failing implementation, the first drifting block."""
    report = check(checkpoint, **kwargs)
    if not report.passed:
        drift = "; ".join(f"{label}: first drift at {quantity}" for label, quantity in report.first_drift().items())
        worst = max(report.failures(), key=lambda r: r.rel_diff)
        raise AssertionError(f"parity failed: {drift} (worst: {worst.quantity} rel {worst.rel_diff:.3g})")
    return report


def _validate(frameworks, keras_backends, dtype, device, mode, size, batch):
    frameworks = tuple(frameworks)
    keras_backends = tuple(keras_backends)
    for name, values, allowed in (
        ("frameworks", frameworks, FRAMEWORKS),
        ("keras backends", keras_backends, KERAS_BACKENDS),
    ):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ParityError(f"unknown {name} {bad or list(values)}; choose from {', '.join(allowed)}")
    for name, value, allowed in (("dtype", dtype, DTYPES), ("device", device, DEVICES), ("mode", mode, MODES)):
        if value not in allowed:
            raise ParityError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
    if len(size) != 2 or min(size) < 1 or batch < 1:
        raise ParityError(f"size must be two positive integers and batch positive, got size {size}, batch {batch}")
    if device == "gpu":
        missing = [f for f in frameworks if not gpu_available(f, keras_backends)]
        if missing:
            raise ParityError(f"--device gpu: no GPU visible to {', '.join(missing)}")
    return frameworks, keras_backends


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
    """The human table. Gradient, statistics and step groups are folded to their worst row
    (with a count) unless ``verbose``; failing rows are always listed."""
    header = ("framework", "backend", "device", "dtype", "quantity", "max abs diff", "rel diff", "tolerance", "pass")
    lines = []
    for key, group in _grouped(report.results, verbose):
        r, count = group
        quantity = (
            r.quantity
            if count == 1
            else f"{key} ({count} tensors, worst {r.quantity.split('/', 1 + key.count('/'))[-1]})"
        )
        status = "info" if r.informational else ("ok" if r.passed else "FAIL")
        lines.append(
            (
                r.framework,
                r.backend if r.framework == "keras" else "-",
                r.device,
                r.dtype,
                quantity,
                f"{r.max_abs_diff:.3g}",
                f"{r.rel_diff:.3g}",
                f"{r.tolerance:g}",
                status,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *lines]
    ]
    drift = report.first_drift()
    summary = "PASS" if report.passed else "FAIL: " + "; ".join(f"{k}: first drift at {v}" for k, v in drift.items())
    return "\n".join([*out, summary])


def _grouped(results: list[Result], verbose: bool):
    """Rows to print: each block row as is; grad/, state/ and step/<optimizer>/ folded per implementation."""
    groups: dict[tuple, list] = {}
    order = []
    for r in results:
        name = r.quantity.removeprefix("tf32:")
        prefix = next((p for p in ("state", "grad", "step/sgd", "step/adam") if name.startswith(p + "/")), None)
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
        if r.rel_diff > group[0].rel_diff:
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
    fig.suptitle("PASS" if report.passed else "FAIL")
    fig.tight_layout()
    png = directory / "parity.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [str(png), str(table), str(data)]
