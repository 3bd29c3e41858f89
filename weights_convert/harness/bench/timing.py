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


def time_runs(
    step: Callable[[], object], sync: Callable[[object], object], repeats: int, warmup: int, label: str
) -> dict:
    """``warmup`` calls (compilation happens in the first), then ``repeats`` timed calls, each
    synchronised by ``sync(result)``. ``result_dtype`` is the dtype of what the last call returned
    (a forward's logits, a step's loss)."""
    start = time.perf_counter()
    for i in range(warmup):
        sync(step())
        if i == 0:
            first_call = time.perf_counter() - start
            progress(f"{label}: first call {first_call:.2f} s")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = step()
        sync(result)
        times.append(time.perf_counter() - start)
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "first_call_s": first_call if warmup else None,
        "result_dtype": dtype_name(result),
    }


def dtype_name(value) -> str | None:
    """ "bfloat16", "float32", ... for a torch, JAX, TensorFlow or numpy array (None for anything else)."""
    dtype = getattr(value, "dtype", None)
    return None if dtype is None else str(getattr(dtype, "name", dtype)).removeprefix("torch.")
