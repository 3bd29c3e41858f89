"""``attention-unet bench``: throughput of the same model in every framework, against the machine's matmul rate.

For each framework and variant (torch eager / channels_last / torch.compile; flax eager / nnx.jit;
keras eager / tf.function / jit_compile on each installed backend) this times an eval forward and a
training step (SGD, MSE loss, train-mode BatchNorm): a warm-up (which includes any compilation),
then the median of repeated timed runs. GFLOP/s come from the model's FLOPs counted from the spec.

Every row names its ``precision``:

- ``float64``, and ``float32`` strict: TF32 off in PyTorch and TensorFlow, JAX's matmul precision
  "highest" while the function is traced (Flax and Keras on JAX alike);
- ``tf32`` (GPU only, with ``--dtype float32``): TF32 on in PyTorch and TensorFlow, and JAX's
  default matmul precision, which is TF32 on the GPUs that have it;
- ``mixed_bfloat16``: float32 parameters and BatchNorm statistics, convolutions in bfloat16, as in
  parity: torch ``AttentionUNet(compute_dtype=torch.bfloat16)`` (autocast), Flax
  ``dtype=bfloat16, param_dtype=float32``, Keras ``dtype="mixed_bfloat16"``.

Each row also reports the matmul setting its framework had (``matmul_precision``); for JAX it is
the one seen inside the function while it was traced. The ceiling of each precision is a large
matmul timed on the same device in the same run (``matmul_gflops``: float32, tf32 on GPU, bfloat16,
and float64 for float64 runs), and each row's ``ratio_to_ceiling`` is to its own precision's.

Only the standard library and the spec are imported here at module level: each framework is
imported inside its bench function. Keras runs in one subprocess per backend, because its backend
is fixed when Keras is first imported; on a GPU every framework runs in its own subprocess, so that
no framework's memory pool starves the next, and JAX never preallocates GPU memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from weights_convert.core.optim import OPTIMIZERS
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig, param_specs

FRAMEWORKS = ("torch", "flax", "keras")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
MODES = ("forward", "train_step")
# ``--dtype``: what the rows compute in. float32 gives strict float32 rows, and tf32 rows on a GPU.
DTYPES = ("float32", "float64", "mixed_bfloat16")
DEVICES = ("cpu", "gpu")
PRECISIONS = ("float64", "float32", "tf32", "mixed_bfloat16")
# The matmul whose rate is the ceiling of each precision.
CEILING = {"float64": "float64", "float32": "float32", "tf32": "tf32", "mixed_bfloat16": "bfloat16"}
# Ceilings every report carries (tf32 is None without a GPU); float64 is added for float64 runs.
CEILINGS = ("float32", "tf32", "bfloat16")
# A matmul library that would take longer than MATMUL_CALL_S per call at the requested side (bfloat16
# on a processor without bfloat16 instructions runs at a fraction of a GFLOP/s) is timed at the side
# where a call takes about MATMUL_SMALL_CALL_S.
MATMUL_CALL_S = 5.0
MATMUL_SMALL_CALL_S = 1.0
# Variant names as they appear in the results (and in ``--variants``); the same in every precision.
VARIANTS = {
    "torch": ("eager", "channels_last", "torch.compile", "torch.compile+channels_last"),
    "flax": ("eager", "nnx.jit"),
    "keras/tensorflow": ("eager", "tf.function", "jit_compile"),
    "keras/jax": ("eager", "jit_compile"),
    "keras/torch": ("eager", "jit_compile"),
}
# The module that must be importable for each framework / Keras backend.
_REQUIRES = {"torch": "torch", "flax": "flax", "keras": "keras", "tensorflow": "tensorflow", "jax": "jax"}
# Set in every bench process before JAX is imported: JAX would otherwise take most of a GPU's
# memory at start-up, and TensorFlow all of it, leaving none to the next framework.
GPU_MEMORY_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


# --------------------------------------------------------------------------------------------------
# FLOPs, counted from the spec


def level_sizes(config: ModelConfig, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Spatial size at each level: level 0 is the input, each max pool floors a halving; the last is the bridge."""
    height, width = size
    sizes = [(height, width)]
    for _ in range(config.depth):
        height, width = height // 2, width // 2
        sizes.append((height, width))
    return sizes


def _level(module: str, depth: int) -> int:
    """The level whose resolution a layer runs at: ``e{i}`` at i - 1, the bridge at ``depth``, ``d{j}`` at
    ``depth - j`` (decoders pad back to their skip's size), the head at 0."""
    block = module.split(".", 1)[0]
    if block == "output":
        return 0
    if block == "b1":
        return depth
    index = int(block[1:])
    return index - 1 if block[0] == "e" else depth - index


def conv_flops(config: ModelConfig, size: tuple[int, int]) -> dict[str, int]:
    """FLOPs of each convolution for one image, multiply-add = 2 (``2 * c_in * c_out * k * k * H * W``).

    Biases, BatchNorm, activations, pooling, upsampling and the gate's products are elementwise and
    not counted (as in the usual GFLOP figure for this model: 91.2 GFLOP at 3x256x256).
    """
    sizes = level_sizes(config, size)
    flops = {}
    for spec in param_specs(config):
        if spec.layer in ("conv3", "conv1") and spec.leaf == "weight":
            c_out, c_in, kh, kw = spec.shape
            height, width = sizes[_level(spec.module, config.depth)]
            flops[spec.module] = 2 * c_in * c_out * kh * kw * height * width
    return flops


def forward_flops(config: ModelConfig, size: tuple[int, int], batch: int = 1) -> int:
    return batch * sum(conv_flops(config, size).values())


def train_step_flops(config: ModelConfig, size: tuple[int, int], batch: int = 1) -> int:
    """Forward, plus each convolution's weight gradient and input gradient (each as many FLOPs as its
    forward), except the first convolution's input gradient: the input needs none."""
    per_conv = conv_flops(config, size)
    first = per_conv["e1.conv.conv.0"]
    return batch * (3 * sum(per_conv.values()) - first)


def mode_flops(mode: str, config: ModelConfig, size: tuple[int, int], batch: int) -> int:
    return forward_flops(config, size, batch) if mode == "forward" else train_step_flops(config, size, batch)


# --------------------------------------------------------------------------------------------------
# Settings, timing, rows


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one bench run measures; every framework gets the same."""

    config: ModelConfig = ModelConfig()
    batch: int = 1
    size: tuple[int, int] = (256, 256)
    dtype: str = "float32"
    device: str = "cpu"
    repeats: int = 7
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    variants: tuple[str, ...] | None = None  # None: every variant

    def __post_init__(self) -> None:
        if not (isinstance(self.batch, int) and self.batch > 0):
            raise ValueError(f"batch must be a positive integer, got {self.batch!r}")
        size = tuple(self.size)
        if len(size) != 2 or min(size) < self.config.min_size:
            raise ValueError(f"size must be H W with both >= {self.config.min_size} for this config, got {self.size!r}")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions of the rows: float32 is strict float32, and on a GPU also TF32 (which a CPU lacks)."""
        if self.dtype == "float32":
            return ("float32", "tf32") if self.device == "gpu" else ("float32",)
        return (self.dtype,)

    @property
    def input_dtype(self) -> str:
        """The dtype of inputs, targets and parameters: float32 under mixed bfloat16."""
        return "float64" if self.dtype == "float64" else "float32"

    def wants(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        data = dict(data)
        data["config"] = ModelConfig.from_dict(data["config"])
        for key in ("size", "modes", "variants"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def _significant(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def time_runs(step: Callable[[], object], sync: Callable[[object], object], settings: Settings, label: str) -> dict:
    """Warm-up calls (compilation happens in the first), then ``repeats`` timed calls, each synchronised.
    ``result_dtype`` is the dtype of what the last call returned (a forward's logits, a step's loss)."""
    start = time.perf_counter()
    for i in range(settings.warmup):
        sync(step())
        if i == 0:
            first_call = time.perf_counter() - start
            progress(f"{label}: first call {first_call:.2f} s")
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        result = step()
        sync(result)
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "first_call_s": first_call if settings.warmup else None,
        "result_dtype": _dtype_name(result),
    }


def _dtype_name(value) -> str | None:
    """ "bfloat16", "float32", ... for a torch, JAX, TensorFlow or numpy array (None for anything else)."""
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else str(getattr(dtype, "name", dtype)).removeprefix("torch.")


def _row(framework, backend, variant, precision, mode, settings: Settings, **fields) -> dict:
    return {
        "framework": framework,
        "backend": backend,
        "variant": variant,
        "mode": mode,
        "precision": precision,
        "device": settings.device,
        "dtype": settings.dtype,
        "batch": settings.batch,
        "size": list(settings.size),
        **fields,
    }


def _measured_row(framework, backend, variant, precision, mode, settings, timing: dict, matmul_precision) -> dict:
    flops = mode_flops(mode, settings.config, settings.size, settings.batch)
    seconds = timing["median_ms"] / 1e3
    row = _row(
        framework,
        backend,
        variant,
        precision,
        mode,
        settings,
        median_ms=_significant(timing["median_ms"]),
        min_ms=_significant(timing["min_ms"]),
        gflops=_significant(flops / seconds / 1e9),
        images_per_s=_significant(settings.batch / seconds),
        first_call_s=None if timing["first_call_s"] is None else round(timing["first_call_s"], 2),
        result_dtype=timing["result_dtype"],
        matmul_precision=matmul_precision,
        load_1min=_load(),
    )
    progress(
        f"{framework}/{backend} {variant} {precision} {mode}: {row['median_ms']:.1f} ms, {row['gflops']:.1f} GFLOP/s"
    )
    return row


def _error_row(framework, backend, variant, precision, mode, settings, error: str) -> dict:
    progress(f"{framework}/{backend} {variant or ''} {precision} {mode or ''}: {error}")
    return _row(framework, backend, variant, precision, mode, settings, median_ms=None, gflops=None, error=error)


def _error_rows(framework: str, backend: str, settings: Settings, error: str) -> list[dict]:
    """A framework or backend that cannot run at all: one error row per precision."""
    return [_error_row(framework, backend, None, precision, None, settings, error) for precision in settings.precisions]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _run_variants(
    framework: str,
    backend: str,
    settings: Settings,
    variants_for: Callable[[str], dict],
    precision_scope: Callable[[str], contextlib.AbstractContextManager],
    matmul_setting: Callable[[], str | None],
) -> list[dict]:
    """Every precision, variant and mode. ``variants_for(precision)``: name -> mode -> () -> (step, sync);
    each row is built and timed inside ``precision_scope(precision)``, and ``matmul_setting()``, read
    at the end of the row, is the matmul setting the row ran with. A failing build or run becomes an
    error row."""
    rows = []
    for precision in settings.precisions:
        for variant, modes in variants_for(precision).items():
            if not settings.wants(variant):
                continue
            for mode in settings.modes:
                label = f"{framework}/{backend} {variant} {precision} {mode}"
                try:
                    with precision_scope(precision):
                        step, sync = modes[mode]()
                        timing = time_runs(step, sync, settings, label)
                        setting = matmul_setting()
                except Exception as error:  # a variant that cannot run on this machine is a row, not a crash
                    rows.append(_error_row(framework, backend, variant, precision, mode, settings, _one_line(error)))
                    continue
                rows.append(_measured_row(framework, backend, variant, precision, mode, settings, timing, setting))
    return rows


def _inputs(settings: Settings, channels_last: bool):
    """Deterministic numpy input and target, NCHW or NHWC, in ``settings.input_dtype``."""
    import numpy as np

    config, (height, width) = settings.config, settings.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((settings.batch, config.in_channels, height, width))
    target = rng.standard_normal((settings.batch, config.out_channels, height, width))
    if channels_last:
        x, target = x.transpose(0, 2, 3, 1).copy(), target.transpose(0, 2, 3, 1).copy()
    return x.astype(settings.input_dtype), target.astype(settings.input_dtype)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _no_model(package) -> str:
    where = getattr(package, "__file__", None)
    # A package without __file__ was found as a bare directory: a stale editable install.
    hint = f"imported from {where}" if where else "found only as a namespace package; reinstall with pip install -e ."
    return f"{package.__name__} provides no AttentionUNet ({hint})"


# --------------------------------------------------------------------------------------------------
# Matmul settings of each framework


@contextlib.contextmanager
def torch_precision(precision: str):
    """TF32 on for the tf32 rows and off for every other (a bfloat16 convolution ignores it; the
    float32 operations left under autocast are then exact)."""
    import torch

    allow = precision == "tf32"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_setting() -> str:
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if matmul == cudnn:
        return "tf32" if matmul else "ieee"
    return f"matmul {'tf32' if matmul else 'ieee'}, cudnn {'tf32' if cudnn else 'ieee'}"


def jax_precision(precision: str):
    """``jax.default_matmul_precision`` for a row: "highest" (full float32, on a GPU too) for the
    strict rows; JAX's default for tf32 rows (TF32 on GPUs that have it) and for bfloat16 rows,
    whose operands are bfloat16 already. JAX keys its compilation cache on this setting, so a
    function traced inside the scope keeps it."""
    import jax

    return jax.default_matmul_precision("highest" if precision in ("float32", "float64") else "default")


def jax_setting() -> str:
    """The matmul precision JAX applies at this point (inside a trace: the one the trace uses)."""
    import jax

    return jax.config.jax_default_matmul_precision or "default"


@contextlib.contextmanager
def tensorflow_precision(precision: str):
    """TensorFlow allows TF32 by default on GPU; the strict and bfloat16 rows turn it off."""
    import tensorflow as tf

    saved = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(precision == "tf32")
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(saved)


def tensorflow_setting() -> str:
    import tensorflow as tf

    return "tf32" if tf.config.experimental.tensor_float_32_execution_enabled() else "ieee"


class TraceRecord:
    """The JAX matmul setting seen inside a traced function, one row at a time: ``note()`` is called
    from inside the function (during tracing under ``jit``, on every call in eager mode); ``take()``
    returns the last one seen and forgets it, so a row whose function was never run reports None."""

    def __init__(self) -> None:
        self.seen: str | None = None

    def note(self) -> None:
        self.seen = jax_setting()

    def take(self) -> str | None:
        seen, self.seen = self.seen, None
        return seen


# --------------------------------------------------------------------------------------------------
# The ceilings: a large matmul of each precision on the same device


def _matmul_candidates(ceiling: str, device: str) -> list[tuple[str, Callable, Callable]]:
    """(library, make, scope) for each ``ceiling`` matmul available on ``device``: ``make(n)`` gives
    (step, sync) for an n x n product, run inside ``scope()``. No tf32 on CPU; float64 only from
    numpy and torch (JAX would need its 64-bit mode in this process)."""
    candidates = []
    gpu = device == "gpu"
    if ceiling == "tf32" and not gpu:
        return candidates
    if not gpu and ceiling in ("float32", "float64"):
        import numpy as np

        def make_numpy(n):
            rng = np.random.default_rng(0)
            a, b = (rng.standard_normal((n, n)).astype(ceiling) for _ in range(2))
            return (lambda: a @ b), (lambda _: None)

        candidates.append((f"numpy {np.__version__} matmul", make_numpy, contextlib.nullcontext))
    if not _missing("torch"):
        import torch

        if not gpu or torch.cuda.is_available():
            target = torch.device("cuda" if gpu else "cpu")
            torch_dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(ceiling, torch.float32)

            def make_torch(n):
                a, b = (torch.randn(n, n, device=target).to(torch_dtype) for _ in range(2))

                def sync(_):
                    if gpu:
                        torch.cuda.synchronize()

                return (lambda: a @ b), sync

            scope = {"tf32": "tf32", "bfloat16": "mixed_bfloat16"}.get(ceiling, "float32")
            library = f"torch {torch.__version__} matmul{' (TF32)' if ceiling == 'tf32' else ''}"
            candidates.append((library, make_torch, lambda: torch_precision(scope)))
    if ceiling != "float64" and (gpu or ceiling == "bfloat16") and not _missing("jax"):
        import jax
        import jax.numpy as jnp

        try:
            jax_device = jax.devices("gpu" if gpu else "cpu")[0]
        except RuntimeError:
            jax_device = None
        if jax_device is not None:
            jax_dtype = jnp.bfloat16 if ceiling == "bfloat16" else jnp.float32
            precision = "highest" if ceiling == "float32" else None

            def make_jax(n):
                a, b = (jax.device_put(jnp.ones((n, n), jax_dtype), jax_device) for _ in range(2))
                matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
                return (lambda: matmul(a, b)), jax.block_until_ready

            library = f"jax {jax.__version__} matmul (precision={precision or 'default'})"
            candidates.append((library, make_jax, contextlib.nullcontext))
    return candidates


def _matmul_side(make: Callable, scope: Callable, n: int) -> int:
    """``n``, or, when one call would take more than ``MATMUL_CALL_S`` (estimated from a call at side
    512 and the cubic cost), the side (a multiple of 256, at least 256) where it takes about
    ``MATMUL_SMALL_CALL_S``."""
    probe = min(n, 512)
    step, sync = make(probe)
    with scope():
        sync(step())
        start = time.perf_counter()
        sync(step())
        seconds = max(time.perf_counter() - start, 1e-9)
    if probe == n or seconds * (n / probe) ** 3 <= MATMUL_CALL_S:
        return n
    side = int(probe * (MATMUL_SMALL_CALL_S / seconds) ** (1 / 3)) // 256 * 256
    return max(256, min(n, side))


def measure_matmul(ceiling: str, device: str = "cpu", n: int | None = None, repeats: int = 5) -> list[dict]:
    """The ``ceiling`` matmul rate in GFLOP/s (2 n^3 FLOPs), median of ``repeats`` after a warm-up, for
    every library at hand: numpy's BLAS and torch's on CPU (they differ: OpenBLAS and MKL pick
    different kernels on the same processor), torch and jax on GPU, and jax's bfloat16 on CPU too.
    float32 is strict (TF32 off, JAX precision "highest"); tf32 is TF32 on / JAX's default; bfloat16
    multiplies bfloat16 matrices. A library too slow for ``n`` is timed at a smaller side (``n`` in
    its run)."""
    n = n or (4096 if device == "cpu" else 8192)
    measured = []
    for library, make, scope in _matmul_candidates(ceiling, device):
        side = _matmul_side(make, scope, n)
        step, sync = make(side)
        with scope():
            timing = time_runs(step, sync, Settings(repeats=repeats, warmup=1), f"{ceiling} matmul {side}^2 {library}")
        gflops = 2 * side**3 / (timing["median_ms"] / 1e3) / 1e9
        progress(f"{ceiling} matmul {side}x{side}: {gflops:.1f} GFLOP/s ({library})")
        measured.append({"gflops": _significant(gflops), "n": side, "library": library, "load_1min": _load()})
        del step, sync
    if device == "gpu" and not _missing("torch"):
        import torch

        torch.cuda.empty_cache()  # no cached blocks held in this process while the frameworks run
    if ceiling == "float32" and not measured:
        raise ValueError(f"--device {device}: neither torch nor jax sees a GPU here")
    return measured


def measure_sgemm(device: str = "cpu", n: int | None = None, repeats: int = 5) -> list[dict]:
    """The strict float32 matmul rate (``measure_matmul("float32", ...)``)."""
    return measure_matmul("float32", device, n, repeats)


# --------------------------------------------------------------------------------------------------
# PyTorch


def bench_torch(settings: Settings) -> list[dict]:
    if _missing("torch"):
        return _error_rows("torch", "torch", settings, "not installed (pip install attention-unet[torch])")
    import torch
    import torch.nn.functional as F

    import impl_torch

    if settings.device == "gpu" and not torch.cuda.is_available():
        return _error_rows("torch", "torch", settings, "--device gpu: torch sees no CUDA device")
    device = torch.device("cuda" if settings.device == "gpu" else "cpu")
    dtype = torch.float64 if settings.dtype == "float64" else torch.float32
    x_np, target_np = _inputs(settings, channels_last=False)
    config = settings.config

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    def build(precision: str, memory_format=torch.contiguous_format, compile_=False):
        torch.manual_seed(0)
        compute_dtype = torch.bfloat16 if precision == "mixed_bfloat16" else None
        model = impl_torch.AttentionUNet(
            config.in_channels, config.out_channels, config.channels, compute_dtype=compute_dtype
        )
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        x = torch.from_numpy(x_np).to(device).contiguous(memory_format=memory_format)
        target = torch.from_numpy(target_np).to(device).contiguous(memory_format=memory_format)
        run = torch.compile(model) if compile_ else model
        return model, run, x, target

    def forward(precision, **options):
        model, run, x, _ = build(precision, **options)
        model.eval()

        def step():
            with torch.inference_mode():
                return run(x)

        return step, sync

    def train_step(precision, **options):
        model, run, x, target = build(precision, **options)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=OPTIMIZERS["sgd"]["lr"])

        def step():
            optimizer.zero_grad(set_to_none=True)
            # Under mixed precision the logits are bfloat16: the loss is taken in float32.
            loss = F.mse_loss(run(x).to(dtype), target)
            loss.backward()
            optimizer.step()
            return loss

        return step, sync

    def variants_for(precision: str) -> dict:
        def both(**options):
            return {
                "forward": lambda: forward(precision, **options),
                "train_step": lambda: train_step(precision, **options),
            }

        return {
            "eager": both(),
            "channels_last": both(memory_format=torch.channels_last),
            "torch.compile": both(compile_=True),
            "torch.compile+channels_last": both(memory_format=torch.channels_last, compile_=True),
        }

    return _run_variants("torch", "torch", settings, variants_for, torch_precision, torch_setting)


# --------------------------------------------------------------------------------------------------
# Flax NNX


def bench_flax(settings: Settings) -> list[dict]:
    if _missing("flax") or _missing("jax"):
        return _error_rows("flax", "jax", settings, "not installed (pip install attention-unet[flax])")
    import jax

    if settings.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import impl_flax

    if not hasattr(impl_flax, "AttentionUNet"):
        return _error_rows("flax", "jax", settings, _no_model(impl_flax))
    platform_name = "gpu" if settings.device == "gpu" else "cpu"
    try:
        device = jax.devices(platform_name)[0]
    except RuntimeError:
        return _error_rows("flax", "jax", settings, f"--device {settings.device}: jax sees no such device")
    x_np, target_np = _inputs(settings, channels_last=True)
    config = settings.config
    parameter_dtype = jnp.dtype(settings.input_dtype)
    traced = TraceRecord()

    weights = random_checkpoint(config, seed=0)

    def build(precision: str):
        # From seeded weights rather than Flax's initializers, which compile one XLA program per
        # parameter shape in eager mode (seconds, even for a tiny model).
        dtype = "mixed_bfloat16" if precision == "mixed_bfloat16" else settings.input_dtype
        with jax.default_device(device):
            model = impl_flax.from_checkpoint(weights, dtype)
        return model, jax.device_put(x_np, device), jax.device_put(target_np, device)

    def apply(model, x):
        traced.note()
        return model(x)

    def forward(precision: str, jit: bool):
        model, x, _ = build(precision)
        model.eval()
        run = nnx.jit(apply) if jit else apply

        def step():
            return run(model, x)

        return step, jax.block_until_ready

    def train_step(precision: str, jit: bool):
        model, x, target = build(precision)
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(OPTIMIZERS["sgd"]["lr"]), wrt=nnx.Param)

        def update(model, optimizer, x, target):
            traced.note()

            def loss_fn(model):
                # Under mixed precision the logits are bfloat16: the loss is taken in float32.
                return jnp.mean((model(x).astype(parameter_dtype) - target) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        run = nnx.jit(update) if jit else update

        def step():
            return run(model, optimizer, x, target)

        def sync(loss):
            # Eager JAX dispatches asynchronously: wait for the updated parameters, not only the loss.
            jax.block_until_ready((loss, nnx.state(model, nnx.Param)))

        return step, sync

    def variants_for(precision: str) -> dict:
        return {
            "eager": {"forward": lambda: forward(precision, False), "train_step": lambda: train_step(precision, False)},
            "nnx.jit": {"forward": lambda: forward(precision, True), "train_step": lambda: train_step(precision, True)},
        }

    return _run_variants("flax", "jax", settings, variants_for, jax_precision, traced.take)


# --------------------------------------------------------------------------------------------------
# Keras 3, one subprocess per backend


def keras_backends_available() -> list[str]:
    return [b for b in KERAS_BACKENDS if not _missing(_REQUIRES.get(b, b))]


def bench_keras(settings: Settings, backends: tuple[str, ...] | None = None) -> list[dict]:
    if _missing("keras"):
        return _error_rows("keras", "-", settings, "not installed (pip install attention-unet[keras])")
    available = keras_backends_available()
    rows = []
    for backend in backends or available:
        if backend not in KERAS_BACKENDS:
            rows += _error_rows("keras", backend, settings, f"unknown backend; known: {KERAS_BACKENDS}")
        elif backend not in available:
            rows += _error_rows("keras", backend, settings, f"backend {backend} not installed")
        else:
            rows += _worker_subprocess("keras", backend, settings)
    return rows


def worker_env(settings: Settings, keras_backend: str | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: no GPU memory preallocation; on CPU no GPU at all
    (TensorFlow and JAX would otherwise take one when present); Keras' backend when it runs Keras."""
    env = dict(os.environ, **GPU_MEMORY_ENV, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _worker_subprocess(framework: str, backend: str, settings: Settings) -> list[dict]:
    """One framework (Keras: one backend) in its own process; its rows come back as JSON on stdout."""
    command = [sys.executable, "-m", "weights_convert.harness.bench", "worker", framework, backend]
    command.append(json.dumps(settings.to_dict()))
    progress(f"{framework}/{backend}: starting a subprocess")
    env = worker_env(settings, backend if framework == "keras" else None)
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        rows = json.loads(result.stdout)
    except json.JSONDecodeError:
        rows = None
    if result.returncode != 0 or not isinstance(rows, list):
        return _error_rows(framework, backend, settings, f"worker exited with status {result.returncode}")
    return rows


def keras_worker(backend: str, settings: Settings) -> list[dict]:
    """Runs inside the subprocess whose ``KERAS_BACKEND`` is ``backend``."""
    import keras
    import numpy as np

    import impl_keras
    from impl_keras.io import assign_checkpoint

    if keras.backend.backend() != backend:
        return _error_rows("keras", backend, settings, f"Keras started with {keras.backend.backend()}")
    if not hasattr(impl_keras, "AttentionUNet"):
        return _error_rows("keras", backend, settings, _no_model(impl_keras))
    if settings.device == "gpu" and not _keras_sees_gpu(backend):
        return _error_rows("keras", backend, settings, f"--device gpu: {backend} sees no GPU")
    keras.config.set_floatx(settings.input_dtype)
    x, target = _inputs(settings, channels_last=True)
    config = settings.config
    weights = random_checkpoint(config, seed=0)
    traced = TraceRecord()

    class TracedUNet(impl_keras.AttentionUNet):
        """The model, noting JAX's matmul setting each time its ``call`` runs (under JAX: when traced)."""

        def call(self, x, training=None, return_intermediates: bool = False):
            traced.note()
            return super().call(x, training=training, return_intermediates=return_intermediates)

    def build(precision: str, run_eagerly: bool, jit_compile: bool):
        keras.utils.set_random_seed(0)
        policy = "mixed_bfloat16" if precision == "mixed_bfloat16" else settings.input_dtype
        model_class = TracedUNet if backend == "jax" else impl_keras.AttentionUNet
        # Seeded weights assigned over zeros: under JAX a random initializer compiles one program per
        # kernel shape (seconds each, even for a tiny model).
        model = model_class(
            config.in_channels, config.out_channels, config.channels, dtype=policy, kernel_initializer="zeros"
        )
        assign_checkpoint(model, weights)
        # The loss is computed in floatx (float32 under mixed precision): Keras casts the logits to it.
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=OPTIMIZERS["sgd"]["lr"]),
            loss="mean_squared_error",
            run_eagerly=run_eagerly,
            jit_compile=jit_compile,
        )
        return model

    def forward(precision, run_eagerly, jit_compile):
        model = build(precision, run_eagerly, jit_compile)
        if run_eagerly:
            tensor = keras.ops.convert_to_tensor(x)

            def step():
                return model(tensor, training=False)

            return step, keras.ops.convert_to_numpy
        # predict_on_batch goes through the backend's compiled predict function and returns numpy.
        return (lambda: model.predict_on_batch(x)), np.asarray

    def train_step(precision, run_eagerly, jit_compile):
        model = build(precision, run_eagerly, jit_compile)
        # train_on_batch returns the loss as numpy, which waits for the step.
        return (lambda: model.train_on_batch(x, target)), np.asarray

    def variants_for(precision: str) -> dict:
        def both(run_eagerly, jit_compile):
            return {
                "forward": lambda: forward(precision, run_eagerly, jit_compile),
                "train_step": lambda: train_step(precision, run_eagerly, jit_compile),
            }

        variants = {"eager": both(True, False)}
        if backend == "tensorflow":
            variants["tf.function"] = both(False, False)
        variants["jit_compile"] = both(False, True)
        return variants

    scope, setting = {
        "tensorflow": (tensorflow_precision, tensorflow_setting),
        "jax": (jax_precision, traced.take),
        "torch": (torch_precision, torch_setting),
    }[backend]
    return _run_variants("keras", backend, settings, variants_for, scope, setting)


def _keras_sees_gpu(backend: str) -> bool:
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    import torch

    return torch.cuda.is_available()


def worker(framework: str, backend: str, settings: Settings) -> list[dict]:
    """The rows of one framework (Keras: one backend), in a worker subprocess."""
    if framework == "keras":
        return keras_worker(backend, settings)
    return {"torch": bench_torch, "flax": bench_flax}[framework](settings)


# --------------------------------------------------------------------------------------------------
# The whole run


def machine_info(device: str = "cpu") -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {},
    }
    for package in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "keras", "tensorflow"):
        try:
            info["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device == "gpu":
        info["gpu"] = _gpu_model()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_model() -> str | None:
    """Name, driver and memory of the first GPU, as ``nvidia-smi`` reports them (None without it)."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def _framework_rows(settings: Settings, framework: str, keras_backends, isolate: bool) -> list[dict]:
    if framework == "keras":
        return bench_keras(settings, keras_backends)
    if isolate:
        return _worker_subprocess(framework, "torch" if framework == "torch" else "jax", settings)
    return bench_torch(settings) if framework == "torch" else bench_flax(settings)


def _best(runs: list[dict]) -> dict | None:
    return max(runs, key=lambda r: r["gflops"]) if runs else None


def run(
    settings: Settings,
    frameworks: tuple[str, ...] = FRAMEWORKS,
    keras_backends: tuple[str, ...] | None = None,
    sgemm_n: int | None = None,
    isolate: bool | None = None,
) -> dict:
    """The whole bench: the matmul ceilings with every library before and after the frameworks, then
    every framework's rows. Each ceiling is the highest rate measured for its precision, so neither a
    busy moment nor a slower library inflates the ratios.

    ``isolate`` runs torch and Flax each in its own subprocess, as Keras always is (default: on GPU,
    where each framework's memory pool would otherwise hold memory the next one needs). JAX's GPU
    preallocation is turned off for this process too, which takes effect if JAX is not imported yet.
    """
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"unknown frameworks {unknown}; known: {list(FRAMEWORKS)}")
    isolate = settings.device == "gpu" if isolate is None else isolate
    if settings.device == "gpu":
        for key, value in GPU_MEMORY_ENV.items():
            os.environ.setdefault(key, value)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    ceilings = CEILINGS + (("float64",) if settings.dtype == "float64" else ())
    matmul_runs = {ceiling: measure_matmul(ceiling, settings.device, sgemm_n) for ceiling in ceilings}
    results: list[dict] = []
    for framework in frameworks:
        results += _framework_rows(settings, framework, keras_backends, isolate)
    for ceiling in ceilings:
        matmul_runs[ceiling] += measure_matmul(ceiling, settings.device, sgemm_n)
    best = {ceiling: _best(runs) for ceiling, runs in matmul_runs.items()}
    matmul_gflops = {ceiling: None if b is None else b["gflops"] for ceiling, b in best.items()}
    sgemm = matmul_gflops["float32"]
    for row in results:
        if row.get("gflops") is not None:
            ceiling = matmul_gflops[CEILING[row["precision"]]]
            row["ratio_to_ceiling"] = None if ceiling is None else _significant(row["gflops"] / ceiling, 4)
            row["ratio_to_sgemm"] = _significant(row["gflops"] / sgemm, 4)
    return {
        "sgemm_gflops": sgemm,
        "sgemm": {"n": best["float32"]["n"], "library": best["float32"]["library"], "runs": matmul_runs["float32"]},
        "matmul_gflops": matmul_gflops,
        "matmul": {
            ceiling: None if b is None else {"n": b["n"], "library": b["library"], "runs": matmul_runs[ceiling]}
            for ceiling, b in best.items()
        },
        "flops": {
            "forward": forward_flops(settings.config, settings.size, settings.batch),
            "train_step": train_step_flops(settings.config, settings.size, settings.batch),
            "counted": "convolutions, multiply-add = 2",
        },
        "settings": {**settings.to_dict(), "precisions": list(settings.precisions), "isolated": isolate},
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "load_avg_start": None if load_start is None else [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "machine": machine_info(settings.device),
        "results": results,
    }


def _ceiling_line(report: dict, ceiling: str) -> str:
    if ceiling == "float32":
        found, gflops = report["sgemm"], report["sgemm_gflops"]
    else:
        found, gflops = report["matmul"][ceiling], report["matmul_gflops"][ceiling]
    if found is None:
        return f"{ceiling} matmul: not measured{' (no GPU)' if ceiling == 'tf32' else ''}"
    label = "sgemm (float32, " if ceiling == "float32" else f"{ceiling} matmul ("
    return f"{label}{found['n']}^2, {found['library']}): {gflops:.1f} GFLOP/s"


def format_table(report: dict) -> str:
    """A Markdown table of the results, one row per framework / backend / variant / mode / precision;
    each rate is also given as a fraction of its own precision's matmul ceiling."""
    ceilings = ["float32"] + [c for c in ("tf32", "bfloat16", "float64") if c in report.get("matmul_gflops", {})]
    lines = [_ceiling_line(report, ceiling) for ceiling in ceilings]
    lines += [
        "",
        "| framework | backend | variant | mode | precision | median ms | GFLOP/s | of ceiling | images/s |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        precision = row.get("precision", row["dtype"])
        start = (
            f"| {row['framework']} | {row['backend']} | {row['variant'] or '-'} | {row['mode'] or '-'} | {precision}"
        )
        if row.get("error"):
            lines.append(f"{start} | {row['error']} | | | |")
            continue
        ratio = row.get("ratio_to_ceiling", row.get("ratio_to_sgemm"))
        share = "-" if ratio is None else f"{100 * ratio:.0f}%"
        lines.append(f"{start} | {row['median_ms']:.1f} | {row['gflops']:.1f} | {share} | {row['images_per_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # A worker: ``python -m weights_convert.harness.bench worker FRAMEWORK BACKEND SETTINGS_JSON``.
    if len(sys.argv) != 5 or sys.argv[1] != "worker":
        sys.exit("usage: python -m weights_convert.harness.bench worker FRAMEWORK BACKEND SETTINGS_JSON")
    # Anything the frameworks print goes to stderr; stdout carries only the JSON rows.
    rows_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    rows_out.write(json.dumps(worker(sys.argv[2], sys.argv[3], Settings.from_dict(json.loads(sys.argv[4])))))
    rows_out.close()
