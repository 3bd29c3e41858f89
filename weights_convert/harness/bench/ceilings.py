"""The ceilings: a large matmul of each precision timed on the same device, by every library at hand.

Each row's ``ratio_to_ceiling`` is to the ceiling of its own precision (``CEILING``): float32
(strict), tf32 (GPU only), bfloat16, and float64 for float64 runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from weights_convert.core.extras import installed
from weights_convert.harness.bench.matmul_settings import torch_scope
from weights_convert.harness.bench.timing import load, progress, significant, time_runs

# The matmul whose rate is the ceiling of each precision.
CEILING = {"float64": "float64", "float32": "float32", "tf32": "tf32", "mixed_bfloat16": "bfloat16"}
# Ceilings every report carries (tf32 is None without a GPU); float64 is added for float64 runs.
CEILINGS = ("float32", "tf32", "bfloat16")
# A matmul library that would take longer than MATMUL_CALL_S per call at the requested side (bfloat16
# on a processor without bfloat16 instructions runs at a fraction of a GFLOP/s) is timed at the side
# where a call takes about MATMUL_SMALL_CALL_S.
MATMUL_CALL_S = 5.0
MATMUL_SMALL_CALL_S = 1.0


def matmul_candidates(ceiling: str, device: str) -> list[tuple[str, Callable, Callable]]:
    """(library, make, scope) for each ``ceiling`` matmul available on ``device``: ``make(n)`` gives
    (step, sync) for an n x n product, run inside ``scope()``. No tf32 on CPU; float64 only from
    numpy and torch (JAX would need its 64-bit mode in this process)."""
    candidates = []
    gpu = device == "gpu"
    if ceiling == "tf32" and not gpu:
        return candidates
    if not gpu and ceiling in ("float32", "float64"):
        candidates.append(_numpy_candidate(ceiling))
    if installed("torch"):
        candidates += _torch_candidates(ceiling, gpu)
    if ceiling != "float64" and (gpu or ceiling == "bfloat16") and installed("jax"):
        candidates += _jax_candidates(ceiling, gpu)
    return candidates


def _numpy_candidate(ceiling: str) -> tuple[str, Callable, Callable]:
    import numpy as np

    def make_numpy(n):
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(ceiling) for _ in range(2))
        return (lambda: a @ b), (lambda _: None)

    return f"numpy {np.__version__} matmul", make_numpy, contextlib.nullcontext


def _torch_candidates(ceiling: str, gpu: bool) -> list[tuple[str, Callable, Callable]]:
    import torch

    if gpu and not torch.cuda.is_available():
        return []
    target = torch.device("cuda" if gpu else "cpu")
    torch_dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(ceiling, torch.float32)

    def make_torch(n):
        a, b = (torch.randn(n, n, device=target).to(torch_dtype) for _ in range(2))

        def sync(_):
            if gpu:
                torch.cuda.synchronize()

        return (lambda: a @ b), sync

    precision = {"tf32": "tf32", "bfloat16": "mixed_bfloat16"}.get(ceiling, "float32")
    library = f"torch {torch.__version__} matmul{' (TF32)' if ceiling == 'tf32' else ''}"
    return [(library, make_torch, lambda: torch_scope(precision))]


def _jax_candidates(ceiling: str, gpu: bool) -> list[tuple[str, Callable, Callable]]:
    import jax
    import jax.numpy as jnp

    try:
        jax_device = jax.devices("gpu" if gpu else "cpu")[0]
    except RuntimeError:
        return []
    jax_dtype = jnp.bfloat16 if ceiling == "bfloat16" else jnp.float32
    precision = "highest" if ceiling == "float32" else None

    def make_jax(n):
        a, b = (jax.device_put(jnp.ones((n, n), jax_dtype), jax_device) for _ in range(2))
        matmul = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
        return (lambda: matmul(a, b)), jax.block_until_ready

    library = f"jax {jax.__version__} matmul (precision={precision or 'default'})"
    return [(library, make_jax, contextlib.nullcontext)]


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
    for library, make, scope in matmul_candidates(ceiling, device):
        side = _matmul_side(make, scope, n)
        step, sync = make(side)
        with scope():
            timing = time_runs(step, sync, repeats, 1, f"{ceiling} matmul {side}^2 {library}")
        gflops = 2 * side**3 / (timing["median_ms"] / 1e3) / 1e9
        progress(f"{ceiling} matmul {side}x{side}: {gflops:.1f} GFLOP/s ({library})")
        measured.append({"gflops": significant(gflops), "n": side, "library": library, "load_1min": load()})
        del step, sync
    if device == "gpu" and installed("torch"):
        import torch

        torch.cuda.empty_cache()  # no cached blocks held in this process while the frameworks run
    if ceiling == "float32" and not measured:
        raise ValueError(f"--device {device}: neither torch nor jax sees a GPU here")
    return measured


def measure_sgemm(device: str = "cpu", n: int | None = None, repeats: int = 5) -> list[dict]:
    """The strict float32 matmul rate (``measure_matmul("float32", ...)``)."""
    return measure_matmul("float32", device, n, repeats)
