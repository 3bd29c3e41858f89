"""``attention-unet bench``: throughput of the same model in every framework, against the machine's sgemm rate.

For each framework and variant (torch eager / channels_last / torch.compile; flax eager / nnx.jit;
keras eager / tf.function / jit_compile on each installed backend) this times an eval forward and a
training step (SGD, MSE loss, train-mode BatchNorm): a warm-up (which includes any compilation),
then the median of repeated timed runs. GFLOP/s come from the model's FLOPs counted from the spec,
and the ceiling is a large float32 matmul timed on the same device in the same run.

Only the standard library and the spec are imported here at module level: each framework is
imported inside its bench function, and Keras runs in one subprocess per backend because its
backend is fixed when Keras is first imported.
"""

from __future__ import annotations

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
from weights_convert.core.spec import ModelConfig, param_specs

FRAMEWORKS = ("torch", "flax", "keras")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
MODES = ("forward", "train_step")
DTYPES = ("float32", "float64")
DEVICES = ("cpu", "gpu")
# Variant names as they appear in the results (and in ``--variants``).
VARIANTS = {
    "torch": ("eager", "channels_last", "torch.compile", "torch.compile+channels_last"),
    "flax": ("eager", "nnx.jit"),
    "keras/tensorflow": ("eager", "tf.function", "jit_compile"),
    "keras/jax": ("eager", "jit_compile"),
    "keras/torch": ("eager", "jit_compile"),
}
# The module that must be importable for each framework / Keras backend.
_REQUIRES = {"torch": "torch", "flax": "flax", "keras": "keras", "tensorflow": "tensorflow", "jax": "jax"}


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
    """Warm-up calls (compilation happens in the first), then ``repeats`` timed calls, each synchronised."""
    start = time.perf_counter()
    for i in range(settings.warmup):
        sync(step())
        if i == 0:
            first_call = time.perf_counter() - start
            progress(f"{label}: first call {first_call:.2f} s")
    times = []
    for _ in range(settings.repeats):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "first_call_s": first_call if settings.warmup else None,
    }


def _row(framework: str, backend: str, variant: str | None, mode: str, settings: Settings, **fields) -> dict:
    return {
        "framework": framework,
        "backend": backend,
        "variant": variant,
        "mode": mode,
        "device": settings.device,
        "dtype": settings.dtype,
        "batch": settings.batch,
        "size": list(settings.size),
        **fields,
    }


def _measured_row(framework, backend, variant, mode, settings, timing: dict) -> dict:
    flops = mode_flops(mode, settings.config, settings.size, settings.batch)
    seconds = timing["median_ms"] / 1e3
    row = _row(
        framework,
        backend,
        variant,
        mode,
        settings,
        median_ms=_significant(timing["median_ms"]),
        min_ms=_significant(timing["min_ms"]),
        gflops=_significant(flops / seconds / 1e9),
        images_per_s=_significant(settings.batch / seconds),
        first_call_s=None if timing["first_call_s"] is None else round(timing["first_call_s"], 2),
        load_1min=_load(),
    )
    progress(f"{framework}/{backend} {variant} {mode}: {row['median_ms']:.1f} ms, {row['gflops']:.1f} GFLOP/s")
    return row


def _error_row(framework, backend, variant, mode, settings, error: str) -> dict:
    progress(f"{framework}/{backend} {variant or ''} {mode or ''}: {error}")
    return _row(framework, backend, variant, mode, settings, median_ms=None, gflops=None, error=error)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _run_variants(framework: str, backend: str, settings: Settings, variants: dict) -> list[dict]:
    """``variants``: name -> mode -> () -> (step, sync); a failing build or run becomes an error row."""
    rows = []
    for variant, modes in variants.items():
        if not settings.wants(variant):
            continue
        for mode in settings.modes:
            label = f"{framework}/{backend} {variant} {mode}"
            try:
                step, sync = modes[mode]()
                timing = time_runs(step, sync, settings, label)
            except Exception as error:  # a variant that cannot run on this machine is a row, not a crash
                rows.append(_error_row(framework, backend, variant, mode, settings, _one_line(error)))
                continue
            rows.append(_measured_row(framework, backend, variant, mode, settings, timing))
    return rows


def _inputs(settings: Settings, channels_last: bool):
    """Deterministic float64 numpy input and target, NCHW or NHWC."""
    import numpy as np

    config, (height, width) = settings.config, settings.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((settings.batch, config.in_channels, height, width))
    target = rng.standard_normal((settings.batch, config.out_channels, height, width))
    if channels_last:
        x, target = x.transpose(0, 2, 3, 1).copy(), target.transpose(0, 2, 3, 1).copy()
    return x.astype(settings.dtype), target.astype(settings.dtype)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _no_model(package) -> str:
    where = getattr(package, "__file__", None)
    # A package without __file__ was found as a bare directory: a stale editable install.
    hint = f"imported from {where}" if where else "found only as a namespace package; reinstall with pip install -e ."
    return f"{package.__name__} provides no AttentionUNet ({hint})"


# --------------------------------------------------------------------------------------------------
# The ceiling: a large float32 matmul on the same device


def _sgemm_candidates(device: str, n: int) -> list[tuple[str, Callable[[], object], Callable[[object], object]]]:
    """(library, step, sync) for each float32 matmul available on ``device``."""
    candidates = []
    if device == "cpu":
        import numpy as np

        rng = np.random.default_rng(0)
        a_np = rng.standard_normal((n, n), dtype=np.float32)
        b_np = rng.standard_normal((n, n), dtype=np.float32)
        candidates.append((f"numpy {np.__version__} matmul", lambda: a_np @ b_np, lambda _: None))
    if not _missing("torch"):
        import torch

        if device == "cpu" or torch.cuda.is_available():
            target = torch.device("cuda" if device == "gpu" else "cpu")
            torch.backends.cuda.matmul.allow_tf32 = False
            a_t = torch.randn(n, n, device=target)
            b_t = torch.randn(n, n, device=target)

            def sync_torch(_):
                if device == "gpu":
                    torch.cuda.synchronize()

            candidates.append((f"torch {torch.__version__} matmul", lambda: a_t @ b_t, sync_torch))
    if device == "gpu" and not _missing("jax"):
        import jax
        import jax.numpy as jnp

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if gpus:
            a_j = jax.device_put(jnp.ones((n, n), jnp.float32), gpus[0])
            b_j = jax.device_put(jnp.ones((n, n), jnp.float32), gpus[0])
            matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision="highest"))
            library = f"jax {jax.__version__} matmul (precision=highest)"
            candidates.append((library, lambda: matmul(a_j, b_j), jax.block_until_ready))
    return candidates


def measure_sgemm(device: str = "cpu", n: int | None = None, repeats: int = 5) -> list[dict]:
    """float32 ``n x n`` matmul rate in GFLOP/s (2 n^3 FLOPs), median of ``repeats`` after a warm-up, for
    every library at hand: numpy's BLAS and torch's on CPU (they differ: OpenBLAS and MKL pick different
    kernels on the same processor), torch and jax with TF32 off on GPU."""
    n = n or (4096 if device == "cpu" else 8192)
    measured = []
    for library, step, sync in _sgemm_candidates(device, n):
        timing = time_runs(step, sync, Settings(repeats=repeats, warmup=1), f"sgemm {n}x{n} {library}")
        gflops = 2 * n**3 / (timing["median_ms"] / 1e3) / 1e9
        progress(f"sgemm {n}x{n} float32: {gflops:.1f} GFLOP/s ({library})")
        measured.append({"gflops": _significant(gflops), "n": n, "library": library, "load_1min": _load()})
    if not measured:
        raise ValueError(f"--device {device}: neither torch nor jax sees a GPU here")
    return measured


# --------------------------------------------------------------------------------------------------
# PyTorch


def bench_torch(settings: Settings) -> list[dict]:
    if _missing("torch"):
        return [_error_row("torch", "torch", None, None, settings, "not installed (pip install attention-unet[torch])")]
    import torch
    import torch.nn.functional as F

    import impl_torch
    from impl_torch.io import torch_dtype

    if settings.device == "gpu" and not torch.cuda.is_available():
        return [_error_row("torch", "torch", None, None, settings, "--device gpu: torch sees no CUDA device")]
    device = torch.device("cuda" if settings.device == "gpu" else "cpu")
    dtype = torch_dtype(settings.dtype)
    # Strict float32 on GPU, as in the parity checks: the sgemm ceiling is measured without TF32 too.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    x_np, target_np = _inputs(settings, channels_last=False)
    config = settings.config

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    def build(memory_format=torch.contiguous_format, compile_=False):
        torch.manual_seed(0)
        model = impl_torch.AttentionUNet(config.in_channels, config.out_channels, config.channels)
        model = model.to(device=device, dtype=dtype, memory_format=memory_format)
        x = torch.from_numpy(x_np).to(device).contiguous(memory_format=memory_format)
        target = torch.from_numpy(target_np).to(device).contiguous(memory_format=memory_format)
        run = torch.compile(model) if compile_ else model
        return model, run, x, target

    def forward(**options):
        model, run, x, _ = build(**options)
        model.eval()

        def step():
            with torch.inference_mode():
                return run(x)

        return step, sync

    def train_step(**options):
        model, run, x, target = build(**options)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=OPTIMIZERS["sgd"]["lr"])

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(run(x), target)
            loss.backward()
            optimizer.step()
            return loss

        return step, sync

    def both(**options):
        return {"forward": lambda: forward(**options), "train_step": lambda: train_step(**options)}

    variants = {
        "eager": both(),
        "channels_last": both(memory_format=torch.channels_last),
        "torch.compile": both(compile_=True),
        "torch.compile+channels_last": both(memory_format=torch.channels_last, compile_=True),
    }
    return _run_variants("torch", "torch", settings, variants)


# --------------------------------------------------------------------------------------------------
# Flax NNX


def bench_flax(settings: Settings) -> list[dict]:
    if _missing("flax") or _missing("jax"):
        return [_error_row("flax", "jax", None, None, settings, "not installed (pip install attention-unet[flax])")]
    import jax

    if settings.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import impl_flax

    if not hasattr(impl_flax, "AttentionUNet"):
        return [_error_row("flax", "jax", None, None, settings, _no_model(impl_flax))]
    platform_name = "gpu" if settings.device == "gpu" else "cpu"
    try:
        device = jax.devices(platform_name)[0]
    except RuntimeError:
        return [_error_row("flax", "jax", None, None, settings, f"--device {settings.device}: jax sees no such device")]
    x_np, target_np = _inputs(settings, channels_last=True)
    config = settings.config
    dtype = jnp.dtype(settings.dtype)

    def build():
        with jax.default_device(device):
            model = impl_flax.AttentionUNet(
                config.in_channels, config.out_channels, config.channels, dtype=dtype, rngs=nnx.Rngs(0)
            )
        return model, jax.device_put(x_np, device), jax.device_put(target_np, device)

    def apply(model, x):
        return model(x)

    def forward(jit: bool):
        model, x, _ = build()
        model.eval()
        run = nnx.jit(apply) if jit else apply

        def step():
            return run(model, x)

        return step, jax.block_until_ready

    def train_step(jit: bool):
        model, x, target = build()
        model.train()
        optimizer = nnx.Optimizer(model, optax.sgd(OPTIMIZERS["sgd"]["lr"]), wrt=nnx.Param)

        def update(model, optimizer, x, target):
            def loss_fn(model):
                return jnp.mean((model(x) - target) ** 2)

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

    variants = {
        "eager": {"forward": lambda: forward(False), "train_step": lambda: train_step(False)},
        "nnx.jit": {"forward": lambda: forward(True), "train_step": lambda: train_step(True)},
    }
    return _run_variants("flax", "jax", settings, variants)


# --------------------------------------------------------------------------------------------------
# Keras 3, one subprocess per backend


def keras_backends_available() -> list[str]:
    return [b for b in KERAS_BACKENDS if not _missing(_REQUIRES.get(b, b))]


def bench_keras(settings: Settings, backends: tuple[str, ...] | None = None) -> list[dict]:
    if _missing("keras"):
        return [_error_row("keras", "-", None, None, settings, "not installed (pip install attention-unet[keras])")]
    available = keras_backends_available()
    rows = []
    for backend in backends or available:
        if backend not in KERAS_BACKENDS:
            rows.append(_error_row("keras", backend, None, None, settings, f"unknown backend; known: {KERAS_BACKENDS}"))
        elif backend not in available:
            rows.append(_error_row("keras", backend, None, None, settings, f"backend {backend} not installed"))
        else:
            rows += _keras_subprocess(settings, backend)
    return rows


def _keras_subprocess(settings: Settings, backend: str) -> list[dict]:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    if settings.device == "cpu":
        # Keep every backend off any GPU: TensorFlow and JAX would otherwise take one when present.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PLATFORMS"] = "cpu"
    worker = [sys.executable, "-m", "weights_convert.harness.bench", "keras-worker"]
    command = [*worker, backend, json.dumps(settings.to_dict())]
    progress(f"keras/{backend}: starting a subprocess (the Keras backend is fixed at import)")
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        rows = json.loads(result.stdout)
    except json.JSONDecodeError:
        rows = None
    if result.returncode != 0 or not isinstance(rows, list):
        return [_error_row("keras", backend, None, None, settings, f"worker exited with status {result.returncode}")]
    return rows


def keras_worker(backend: str, settings: Settings) -> list[dict]:
    """Runs inside the subprocess whose ``KERAS_BACKEND`` is ``backend``."""
    import keras
    import numpy as np

    import impl_keras

    if keras.backend.backend() != backend:
        return [_error_row("keras", backend, None, None, settings, f"Keras started with {keras.backend.backend()}")]
    if not hasattr(impl_keras, "AttentionUNet"):
        return [_error_row("keras", backend, None, None, settings, _no_model(impl_keras))]
    if settings.device == "gpu" and not _keras_sees_gpu(backend):
        return [_error_row("keras", backend, None, None, settings, f"--device gpu: {backend} sees no GPU")]
    keras.config.set_floatx(settings.dtype)
    x, target = _inputs(settings, channels_last=True)
    config = settings.config

    def build(run_eagerly: bool, jit_compile: bool):
        keras.utils.set_random_seed(0)
        model = impl_keras.AttentionUNet(config.in_channels, config.out_channels, config.channels, dtype=settings.dtype)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=OPTIMIZERS["sgd"]["lr"]),
            loss="mean_squared_error",
            run_eagerly=run_eagerly,
            jit_compile=jit_compile,
        )
        return model

    def forward(run_eagerly, jit_compile):
        model = build(run_eagerly, jit_compile)
        if run_eagerly:
            tensor = keras.ops.convert_to_tensor(x)

            def step():
                return model(tensor, training=False)

            return step, keras.ops.convert_to_numpy
        # predict_on_batch goes through the backend's compiled predict function and returns numpy.
        return (lambda: model.predict_on_batch(x)), np.asarray

    def train_step(run_eagerly, jit_compile):
        model = build(run_eagerly, jit_compile)
        # train_on_batch returns the loss as numpy, which waits for the step.
        return (lambda: model.train_on_batch(x, target)), np.asarray

    def both(run_eagerly, jit_compile):
        return {
            "forward": lambda: forward(run_eagerly, jit_compile),
            "train_step": lambda: train_step(run_eagerly, jit_compile),
        }

    variants = {"eager": both(True, False)}
    if backend == "tensorflow":
        variants["tf.function"] = both(False, False)
    variants["jit_compile"] = both(False, True)
    return _run_variants("keras", backend, settings, variants)


def _keras_sees_gpu(backend: str) -> bool:
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# The whole run


def machine_info() -> dict:
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


def run(
    settings: Settings,
    frameworks: tuple[str, ...] = FRAMEWORKS,
    keras_backends: tuple[str, ...] | None = None,
    sgemm_n: int | None = None,
) -> dict:
    """The whole bench: sgemm with every library before and after the frameworks, then every
    framework's rows. The ceiling is the highest sgemm rate measured, so neither a busy moment nor a
    slower BLAS inflates the ratios."""
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"unknown frameworks {unknown}; known: {list(FRAMEWORKS)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    sgemm_runs = measure_sgemm(settings.device, sgemm_n)
    results: list[dict] = []
    for framework in frameworks:
        if framework == "torch":
            results += bench_torch(settings)
        elif framework == "flax":
            results += bench_flax(settings)
        else:
            results += bench_keras(settings, keras_backends)
    sgemm_runs += measure_sgemm(settings.device, sgemm_n)
    best = max(sgemm_runs, key=lambda r: r["gflops"])
    sgemm = best["gflops"]
    for row in results:
        if row.get("gflops") is not None:
            row["ratio_to_sgemm"] = _significant(row["gflops"] / sgemm, 4)
    return {
        "sgemm_gflops": sgemm,
        "sgemm": {"n": best["n"], "library": best["library"], "runs": sgemm_runs},
        "flops": {
            "forward": forward_flops(settings.config, settings.size, settings.batch),
            "train_step": train_step_flops(settings.config, settings.size, settings.batch),
            "counted": "convolutions, multiply-add = 2",
        },
        "settings": settings.to_dict(),
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        "load_avg_start": None if load_start is None else [round(v, 2) for v in load_start],
        "load_avg_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "machine": machine_info(),
        "results": results,
    }


def format_table(report: dict) -> str:
    """A Markdown table of the results, one row per framework / backend / variant / mode."""
    lines = [
        f"sgemm (float32, {report['sgemm']['n']}^2, {report['sgemm']['library']}): "
        f"{report['sgemm_gflops']:.1f} GFLOP/s",
        "",
        "| framework | backend | variant | mode | median ms | GFLOP/s | of sgemm | images/s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if row.get("error"):
            lines.append(
                f"| {row['framework']} | {row['backend']} | {row['variant'] or '-'} | {row['mode'] or '-'} "
                f"| {row['error']} | | | |"
            )
            continue
        lines.append(
            f"| {row['framework']} | {row['backend']} | {row['variant']} | {row['mode']} | {row['median_ms']:.1f} "
            f"| {row['gflops']:.1f} | {100 * row['ratio_to_sgemm']:.0f}% | {row['images_per_s']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    # The Keras worker: ``python -m weights_convert.harness.bench keras-worker BACKEND SETTINGS_JSON``.
    if len(sys.argv) != 4 or sys.argv[1] != "keras-worker":
        sys.exit("usage: python -m weights_convert.harness.bench keras-worker BACKEND SETTINGS_JSON")
    # Anything the backends print goes to stderr; stdout carries only the JSON rows.
    rows_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    rows_out.write(json.dumps(keras_worker(sys.argv[2], Settings.from_dict(json.loads(sys.argv[3])))))
    rows_out.close()
