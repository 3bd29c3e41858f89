"""Keras runner calls under any backend, from a process that need not import Keras.

Keras fixes its backend when it is first imported, so the parity harness runs the Keras runner
(``impl_keras.runner``: ``forward``, ``train_step``, ``fit``) in a process of the requested
backend: in this one when Keras already runs there under that backend, otherwise in one
``KERAS_BACKEND=<backend> python -m impl_keras.runner JOB_DIR`` subprocess per batch of calls.
Nothing here imports Keras or ``impl_keras`` in a process that has not imported Keras itself, so
a parity run never imports Keras under a backend that is not installed, and its backends'
start-up logging stays in the subprocesses' captured stderr.

The job directory holds ``job.json`` (one entry per call: function, checkpoint, keyword
arguments), each distinct checkpoint as ``checkpoint_<k>.safetensors`` and each call's arrays as
``input_<i>.npz``; the worker writes ``result_<i>.npz``. JAX runs with ``jax_enable_x64`` in the
subprocess, which float64 needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint

BACKENDS = ("tensorflow", "jax", "torch")
FUNCTIONS = ("forward", "train_step", "fit")
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = "impl_keras.runner"


@dataclasses.dataclass
class Call:
    """One runner call: ``function`` (one of ``FUNCTIONS``) with its arguments; for "fit", ``x`` and
    ``target`` are the stacked ``xs`` and ``targets``."""

    function: str
    checkpoint: Checkpoint | str | os.PathLike
    x: np.ndarray
    target: np.ndarray | None = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.function not in FUNCTIONS:
            raise ValueError(f"function must be one of {FUNCTIONS}, got {self.function!r}")
        takes_target = self.function != "forward"
        if takes_target != (self.target is not None):
            raise ValueError(f"{self.function} takes {'a' if takes_target else 'no'} target")


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
    with tempfile.TemporaryDirectory(prefix="keras-runner-") as tmp:
        tmp = Path(tmp)
        write_job(tmp, calls)
        env = {**os.environ, "KERAS_BACKEND": backend}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        if backend == "jax":
            env["JAX_ENABLE_X64"] = "1"
        process = subprocess.run(
            [sys.executable, "-m", WORKER_MODULE, str(tmp)], env=env, capture_output=True, text=True
        )
        if process.returncode != 0:
            raise BackendFailed(
                f"Keras under {backend} failed (exit {process.returncode}): {last_error_line(process.stderr)}"
            )
        return [load_npz(tmp / f"result_{i}.npz") for i in range(len(calls))]


def last_error_line(stderr: str) -> str:
    """The line of a failed Python process's stderr that says what went wrong: the exception line
    of its last traceback (``ModuleNotFoundError: No module named 'tensorflow'``; the first line of
    a message of several), else its last non-empty line."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        # The traceback's frames are indented; the exception line is the first one that is not.
        exception = next((line for line in lines[starts[-1] + 1 :] if line.strip() and not line[0].isspace()), None)
        if exception:
            return exception.strip()
    non_empty = [line.strip() for line in lines if line.strip()]
    return non_empty[-1] if non_empty else "no error output"


def current_backend() -> str:
    """The backend of this process: Keras' own if imported, else the one importing ``impl_keras``
    would pick (``weights_convert.core.extras.default_keras_backend``)."""
    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    from weights_convert.core.extras import default_keras_backend

    return default_keras_backend()


def _runs_here(backend: str, calls: list[Call]) -> bool:
    """Only where Keras already runs under ``backend``: a process that has not imported Keras
    (the command's) keeps it, and the start-up logging of its backend, in the subprocess."""
    if "keras" not in sys.modules or backend != current_backend():
        return False
    if backend == "jax" and any(call.kwargs.get("dtype") == "float64" for call in calls):
        import jax  # x64 must be on before any array exists; a subprocess gets it from the start

        return bool(jax.config.jax_enable_x64)
    return True


def write_job(tmp: Path, calls: list[Call]) -> None:
    """The job directory of ``calls`` (see the module doc)."""
    import weights_convert

    checkpoint_files: dict[int, str] = {}
    job = []
    for i, call in enumerate(calls):
        if isinstance(call.checkpoint, Checkpoint):
            key = id(call.checkpoint)
            if key not in checkpoint_files:
                checkpoint_files[key] = str(tmp / f"checkpoint_{len(checkpoint_files)}.safetensors")
                weights_convert.write(call.checkpoint, checkpoint_files[key])
            checkpoint = {"safetensors": checkpoint_files[key]}
        else:
            checkpoint = {"path": str(Path(call.checkpoint).resolve())}
        arrays = {"x": np.asarray(call.x)}
        if call.target is not None:
            arrays["target"] = np.asarray(call.target)
        np.savez(tmp / f"input_{i}.npz", **arrays)
        job.append({"function": call.function, "checkpoint": checkpoint, "kwargs": call.kwargs})
    (tmp / "job.json").write_text(json.dumps(job))


def read_job(tmp: Path) -> list[Call]:
    """The calls of the job directory ``tmp`` (each distinct checkpoint read once)."""
    import weights_convert

    checkpoints: dict[str, Checkpoint] = {}
    calls = []
    for i, entry in enumerate(json.loads((tmp / "job.json").read_text())):
        source = entry["checkpoint"]
        if "safetensors" in source:
            if source["safetensors"] not in checkpoints:
                checkpoints[source["safetensors"]] = weights_convert.read(source["safetensors"])
            checkpoint = checkpoints[source["safetensors"]]
        else:
            checkpoint = source["path"]
        arrays = load_npz(tmp / f"input_{i}.npz")
        calls.append(Call(entry["function"], checkpoint, arrays["x"], arrays.get("target"), entry["kwargs"]))
    return calls


def load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
