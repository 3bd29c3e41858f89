"""Keras runner calls under any backend, from a process that need not import Keras.

Keras fixes its backend when it is first imported, so the parity harness runs the Keras runner
(``impl_keras.runner``: ``forward``, ``train_step``, ``fit``) in a process of the requested
backend: in this one when Keras already runs there under that backend, otherwise in one
``KERAS_BACKEND=<backend> python -m impl_keras.runner JOB_DIR`` subprocess per batch of calls
(``weights_convert.processes.run_calls``). Nothing here imports Keras or ``impl_keras`` in a
process that has not imported Keras itself, so a parity run never imports Keras under a backend
that is not installed, and its backends' start-up logging stays in the subprocesses' captured
stderr. JAX runs with ``jax_enable_x64`` in the subprocess, which float64 needs.
"""

from __future__ import annotations

import sys

from weights_convert.core.extras import current_keras_backend as current_backend
from weights_convert.core.frameworks import KERAS_BACKENDS as BACKENDS
from weights_convert.processes import FUNCTIONS, Call, environment, last_error_line, run_calls  # noqa: F401

WORKER_MODULE = "impl_keras.runner"


class BackendFailed(RuntimeError):
    """The Keras worker under a backend exited with an error; the message ends with the worker's
    last error line (the one naming, e.g., the missing module)."""


def run_in_backend(backend: str, function: str, checkpoint, x, target=None, **kwargs) -> dict:
    """``forward`` / ``train_step`` / ``fit`` (by name) under Keras backend ``backend``."""
    return run_batch_in_backend(backend, [Call(function, checkpoint, x, target, kwargs)])[0]


def run_batch_in_backend(backend: str, calls: list[Call]) -> list[dict]:
    """Every call under ``backend``, with at most one subprocess for the whole batch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if _runs_here(backend, calls):
        from impl_keras import runner

        return [runner.run_call(call) for call in calls]
    env = environment(KERAS_BACKEND=backend, **({"JAX_ENABLE_X64": "1"} if backend == "jax" else {}))
    return run_calls(WORKER_MODULE, calls, env=env, what=f"Keras under {backend}", failure=BackendFailed)


def _runs_here(backend: str, calls: list[Call]) -> bool:
    """Only where Keras already runs under ``backend``: a process that has not imported Keras
    (the command's) keeps it, and the start-up logging of its backend, in the subprocess."""
    if "keras" not in sys.modules or backend != current_backend():
        return False
    if backend == "jax" and any(call.kwargs.get("dtype") == "float64" for call in calls):
        import jax  # x64 must be on before any array exists; a subprocess gets it from the start

        return bool(jax.config.jax_enable_x64)
    return True
