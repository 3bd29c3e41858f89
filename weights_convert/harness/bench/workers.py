"""Which process computes each framework's rows: this one, or a worker subprocess of its own.

Keras runs in one worker per backend, because its backend is fixed when Keras is first imported;
with ``isolate`` (the default on a GPU) torch and Flax run in one each too, so that no framework's
memory pool starves the next, and JAX and TensorFlow never preallocate GPU memory there. A worker
is ``python -m weights_convert.harness.bench worker FRAMEWORK BACKEND SETTINGS_JSON`` in
``weights_convert.processes.environment``; its rows come back as JSON on stdout. A framework that
is not installed, and a worker that fails, give error rows, never an exception.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from weights_convert import termination
from weights_convert.core.extras import FRAMEWORK_PACKAGES, KERAS_BACKEND_PACKAGES, installed
from weights_convert.core.frameworks import KERAS_BACKENDS
from weights_convert.harness.bench.rows import error_rows
from weights_convert.harness.bench.settings import Settings
from weights_convert.harness.bench.timing import progress
from weights_convert.processes import environment, run_child

WORKER_MODULE = "weights_convert.harness.bench"
# Set in every bench process before JAX is imported: JAX would otherwise take most of a GPU's
# memory at start-up, and TensorFlow all of it, leaving none to the next framework.
GPU_MEMORY_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}


def missing(module: str) -> bool:
    return not installed(module)


def keras_backends_available() -> list[str]:
    return [b for b in KERAS_BACKENDS if not any(missing(m) for m in KERAS_BACKEND_PACKAGES[b])]


def framework_rows(settings: Settings, framework: str, keras_backends, isolate: bool) -> list[dict]:
    """The rows of ``framework`` (Keras: of each of ``keras_backends``, default every installed one)."""
    if framework == "keras":
        return keras_rows(settings, keras_backends)
    backend = "torch" if framework == "torch" else "jax"
    return worker_subprocess(framework, backend, settings) if isolate else local_rows(framework, backend, settings)


def keras_rows(settings: Settings, backends: tuple[str, ...] | None = None) -> list[dict]:
    if missing("keras"):
        return error_rows("keras", "-", settings, "not installed (pip install attention-unet[keras])")
    available = keras_backends_available()
    rows = []
    for backend in backends or available:
        if backend not in KERAS_BACKENDS:
            rows += error_rows("keras", backend, settings, f"unknown backend; known: {KERAS_BACKENDS}")
        elif backend not in available:
            rows += error_rows("keras", backend, settings, f"backend {backend} not installed")
        else:
            rows += worker_subprocess("keras", backend, settings)
    return rows


def local_rows(framework: str, backend: str, settings: Settings) -> list[dict]:
    """The rows of ``framework`` computed in this process (Keras: whose backend is ``backend``); the
    framework's module is imported only here, once it is known to be installed."""
    if any(missing(module) for module in FRAMEWORK_PACKAGES[framework]):
        return error_rows(framework, backend, settings, f"not installed (pip install attention-unet[{framework}])")
    implementation = importlib.import_module(f"impl_{framework}")
    if not hasattr(implementation, "AttentionUNet"):
        return error_rows(framework, backend, settings, no_model(implementation))
    if framework == "keras":
        from weights_convert.harness.bench.keras_rows import rows as keras_backend_rows

        return keras_backend_rows(settings, backend)
    if framework == "flax":
        from weights_convert.harness.bench.flax_rows import rows as flax_rows

        return flax_rows(settings)
    from weights_convert.harness.bench.torch_rows import rows as torch_rows

    return torch_rows(settings)


def no_model(package) -> str:
    where = getattr(package, "__file__", None)
    # A package without __file__ was found as a bare directory: a stale editable install.
    hint = f"imported from {where}" if where else "found only as a namespace package; reinstall with pip install -e ."
    return f"{package.__name__} provides no AttentionUNet ({hint})"


def worker_env(settings: Settings, keras_backend: str | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: no GPU memory preallocation; on CPU no GPU at all
    (TensorFlow and JAX would otherwise take one when present); Keras' backend when it runs Keras."""
    overrides = dict(GPU_MEMORY_ENV)
    if keras_backend is not None:
        overrides["KERAS_BACKEND"] = keras_backend
    if settings.device == "cpu":
        overrides.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    return environment(**overrides)


def worker_subprocess(framework: str, backend: str, settings: Settings) -> list[dict]:
    """One framework (Keras: one backend) in its own process; its rows come back as JSON on stdout,
    and a worker that exits with an error or prints no rows gives error rows."""
    command = [sys.executable, "-m", WORKER_MODULE, "worker", framework, backend, json.dumps(settings.to_dict())]
    progress(f"{framework}/{backend}: starting a subprocess")
    env = worker_env(settings, backend if framework == "keras" else None)
    # stderr stays this process's, so the worker's progress lines show as it runs.
    result = run_child(command, env=env, stdout=subprocess.PIPE)
    try:
        rows = json.loads(result.stdout)
    except json.JSONDecodeError:
        rows = None
    if result.returncode != 0 or not isinstance(rows, list):
        return error_rows(framework, backend, settings, f"worker exited with status {result.returncode}")
    return rows


def serve(argv: list[str]) -> int:
    """The worker's side: ``worker FRAMEWORK BACKEND SETTINGS_JSON`` -> the rows as JSON on stdout."""
    if len(argv) != 4 or argv[0] != "worker":
        print(f"usage: python -m {WORKER_MODULE} worker FRAMEWORK BACKEND SETTINGS_JSON", file=sys.stderr)
        return 2
    termination.exit_on_sigterm()
    termination.die_with_parent()
    # Anything the frameworks print goes to stderr; stdout carries only the JSON rows.
    rows_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    rows_out.write(json.dumps(local_rows(argv[1], argv[2], Settings.from_dict(json.loads(argv[3])))))
    rows_out.close()
    return 0
