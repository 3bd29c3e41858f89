"""The whole bench run: the matmul ceilings before and after the frameworks, every framework's rows,
and the report (JSON-ready) that carries them with the FLOPs, settings, load and machine."""

from __future__ import annotations

import datetime
import os

from weights_convert.core.frameworks import FRAMEWORKS
from weights_convert.harness.bench.ceilings import CEILING, CEILINGS, measure_matmul
from weights_convert.harness.bench.flops import forward_flops, train_step_flops
from weights_convert.harness.bench.settings import Settings
from weights_convert.harness.bench.timing import load_averages, significant
from weights_convert.harness.bench.workers import GPU_MEMORY_ENV, framework_rows
from weights_convert.harness.machine import machine_info


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
    load_start = load_averages()
    ceilings = CEILINGS + (("float64",) if settings.dtype == "float64" else ())
    matmul_runs = {ceiling: measure_matmul(ceiling, settings.device, sgemm_n) for ceiling in ceilings}
    results: list[dict] = []
    for framework in frameworks:
        results += framework_rows(settings, framework, keras_backends, isolate)
    for ceiling in ceilings:
        matmul_runs[ceiling] += measure_matmul(ceiling, settings.device, sgemm_n)
    best = {ceiling: _best(runs) for ceiling, runs in matmul_runs.items()}
    matmul_gflops = {ceiling: None if b is None else b["gflops"] for ceiling, b in best.items()}
    sgemm = matmul_gflops["float32"]
    for row in results:
        if row.get("gflops") is not None:
            ceiling = matmul_gflops[CEILING[row["precision"]]]
            row["ratio_to_ceiling"] = None if ceiling is None else significant(row["gflops"] / ceiling, 4)
            row["ratio_to_sgemm"] = significant(row["gflops"] / sgemm, 4)
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
        "load_avg_start": load_start,
        "load_avg_end": load_averages(),
        "machine": machine_info(settings.device),
        "results": results,
    }
