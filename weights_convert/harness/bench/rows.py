"""The rows of a report: one per framework, backend, variant, precision and mode, measured or an error.

A row that cannot run (a framework not installed, a variant this machine cannot compile) is an
error row saying why, never an exception: the other rows of the run still come back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from weights_convert.harness.bench.flops import mode_flops
from weights_convert.harness.bench.settings import Settings
from weights_convert.harness.bench.timing import load, progress, significant, time_runs

# variant name -> mode -> () -> (step, sync): how a framework builds each timed step (the model's
# dtype is the run's; the precision is the scope the step is built and timed in)
Variants = dict[str, dict[str, Callable[[], tuple[Callable, Callable]]]]


def row(framework, backend, variant, precision, mode, settings: Settings, **fields) -> dict:
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


def measured_row(framework, backend, variant, precision, mode, settings, timing: dict, matmul_precision) -> dict:
    flops = mode_flops(mode, settings.config, settings.size, settings.batch)
    seconds = timing["median_ms"] / 1e3
    measured = row(
        framework,
        backend,
        variant,
        precision,
        mode,
        settings,
        median_ms=significant(timing["median_ms"]),
        min_ms=significant(timing["min_ms"]),
        gflops=significant(flops / seconds / 1e9),
        images_per_s=significant(settings.batch / seconds),
        first_call_s=round(timing["first_call_s"], 2),
        warmup_calls=timing["warmup_calls"],
        steady=timing["steady"],
        result_dtype=timing["result_dtype"],
        matmul_precision=matmul_precision,
        load_1min=load(),
    )
    progress(
        f"{framework}/{backend} {variant} {precision} {mode}: "
        f"{measured['median_ms']:.1f} ms, {measured['gflops']:.1f} GFLOP/s"
    )
    return measured


def error_row(framework, backend, variant, precision, mode, settings, error: str) -> dict:
    progress(f"{framework}/{backend} {variant or ''} {precision} {mode or ''}: {error}")
    return row(framework, backend, variant, precision, mode, settings, median_ms=None, gflops=None, error=error)


def error_rows(framework: str, backend: str, settings: Settings, error: str) -> list[dict]:
    """A framework or backend that cannot run at all: one error row per precision."""
    return [error_row(framework, backend, None, precision, None, settings, error) for precision in settings.precisions]


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def run_variants(
    framework: str,
    backend: str,
    settings: Settings,
    variants: Variants,
    precision_scope: Callable[[str], contextlib.AbstractContextManager],
    matmul_setting: Callable[[], str | None],
) -> list[dict]:
    """Every precision, variant and mode. ``variants``: name -> mode -> () -> (step, sync); each row is
    built and timed inside ``precision_scope(precision)``, and ``matmul_setting()``, read
    at the end of the row, is the matmul setting the row ran with. A failing build or run becomes an
    error row."""
    rows = []
    for precision in settings.precisions:
        for variant, modes in variants.items():
            if not settings.wants(variant):
                continue
            for mode in settings.modes:
                label = f"{framework}/{backend} {variant} {precision} {mode}"
                try:
                    with precision_scope(precision):
                        step, sync = modes[mode]()
                        timing = time_runs(step, sync, settings.repeats, settings.warmup, label)
                        setting = matmul_setting()
                except Exception as error:  # a variant that cannot run on this machine is a row, not a crash
                    rows.append(error_row(framework, backend, variant, precision, mode, settings, one_line(error)))
                    continue
                rows.append(measured_row(framework, backend, variant, precision, mode, settings, timing, setting))
    return rows
