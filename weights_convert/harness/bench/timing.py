"""Timing a step: warm-up calls (the first compiles), then the median of repeated synchronised calls;
the progress lines on stderr and the machine's load beside each measurement."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def load() -> float:
    """The 1-minute load average (nan where the system has none)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def load_averages() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def significant(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


# A step is steady when two consecutive untimed calls agree within this share: the first call
# compiles, and the next one or two can still be slower (a Flax ``nnx.jit`` forward on a CPU took
# 333 ms after one warm-up call and 19 ms after three).
STEADY = 0.05
# Untimed calls at most beyond ``--warmup`` while waiting for the steady state; a row that never
# reaches it says so (``steady`` false) rather than waiting without end.
MAX_EXTRA_WARMUP = 20


def time_runs(
    step: Callable[[], object], sync: Callable[[object], object], repeats: int, warmup: int, label: str
) -> dict:
    """Untimed calls until the step is steady (at least ``warmup``, and at least two: compilation
    happens in the first, and two consecutive calls within ``STEADY`` of each other end it), then
    ``repeats`` timed calls, each synchronised by ``sync(result)``. ``result_dtype`` is the dtype
    of what the last call returned (a forward's logits, a step's loss); ``warmup_calls`` the
    untimed calls made, ``steady`` whether the last two agreed."""
    untimed, least = [], max(warmup, 2)
    while True:
        start = time.perf_counter()
        sync(step())
        untimed.append(time.perf_counter() - start)
        if len(untimed) == 1:
            progress(f"{label}: first call {untimed[0]:.2f} s")
        steady = len(untimed) >= 3 and abs(untimed[-1] - untimed[-2]) <= STEADY * untimed[-2]
        if len(untimed) >= least and (steady or len(untimed) >= least + MAX_EXTRA_WARMUP):
            break
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        sync(result)
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "first_call_s": untimed[0],
        "warmup_calls": len(untimed),
        "steady": steady,
        "result_dtype": dtype_name(result),
    }


def dtype_name(value) -> str | None:
    """ "bfloat16", "float32", ... for a torch, JAX, TensorFlow or numpy array (None for anything else)."""
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else str(getattr(dtype, "name", dtype)).removeprefix("torch.")
