"""Work handed to a Python subprocess: the one place that starts one.

A computation needs a process of its own where a framework fixes something when it starts: Keras
its backend (``KERAS_BACKEND``), JAX its CPU host device count (``XLA_FLAGS``) and 64-bit mode, a
GPU benchmark its memory allocator. Every launcher builds the child's environment with
``environment`` (this repository on ``PYTHONPATH``, TensorFlow's C++ logging off unless asked for)
and starts it with ``run_child`` (``run_module`` for ``python -m``, whose failure names the child's
own last error line). A child runs with a temporary directory of its own as ``TMPDIR``, removed
when it ends with whatever any runtime wrote there (TensorFlow's generated code, a DDP rendezvous);
a child this process stops waiting for (an error, a signal) is ended (``termination.end_process``),
and a child ends with this process (``termination.die_with_parent``, called by every worker's entry).

Runner calls (``forward``, ``train_step``, ``fit``) travel through a job directory: ``job.json``
(one entry per call: function, checkpoint, keyword arguments), each distinct checkpoint as
``checkpoint_<k>.safetensors`` (a training checkpoint's optimizer state included) or the path of a
file the worker reads itself, each call's arrays as ``input_<i>.npz``; the worker writes
``result_<i>.npz``. ``run_calls`` is the parent's side, ``serve_calls`` the child's.
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

from weights_convert import termination
from weights_convert.core.checkpoint import Checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ("forward", "train_step", "fit")


class ProcessFailed(RuntimeError):
    """A subprocess exited with an error; the message ends with its last error line."""


def environment(**overrides: str) -> dict[str, str]:
    """This process's environment for a child: this repository first on ``PYTHONPATH``, TensorFlow's
    C++ logging off (unless ``TF_CPP_MIN_LOG_LEVEL`` is set), this process's ID for
    ``termination.die_with_parent``, then ``overrides``."""
    env = {**os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env[termination.CHILD_PARENT_VARIABLE] = str(os.getpid())
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def host_devices_flag(devices: int) -> str:
    """``XLA_FLAGS`` with ``devices`` CPU host devices (replacing any count already set): read by
    JAX when it initializes, so it is set for a new process."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


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


def run_child(command: list[str], *, env: dict[str, str], **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(command, env=env, text=True, **popen)`` in a temporary directory of the child's
    own (its ``TMPDIR``, removed with whatever is in it once the child has ended); the child is ended
    (``termination.end_process``) if anything interrupts the wait, a signal included."""
    with tempfile.TemporaryDirectory(prefix="attention-unet-child-") as tmp:
        # The child's runtimes write their temporary files in tmp; torch's compile cache stays where
        # torch keeps it (under the usual temporary directory), so compiled kernels are reused.
        env = {"TORCHINDUCTOR_CACHE_DIR": _torch_compile_cache(), **env, "TMPDIR": tmp}
        with subprocess.Popen(command, env=env, text=True, **popen) as process:
            try:
                stdout, stderr = process.communicate()
            finally:
                termination.end_process(process)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _torch_compile_cache() -> str:
    """Where torch (``torch._inductor``) keeps compiled kernels when ``TORCHINDUCTOR_CACHE_DIR`` is unset."""
    import getpass

    return str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")


def run_module(
    module: str, *args, env: dict[str, str], what: str, failure=ProcessFailed
) -> subprocess.CompletedProcess:
    """``python -m module *args`` with ``env`` (from ``environment``) by ``run_child``, its output
    captured; a non-zero exit raises ``failure`` saying ``what`` failed, its exit status and its
    last error line."""
    command = [sys.executable, "-m", module, *map(str, args)]
    process = run_child(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if process.returncode != 0:
        raise failure(f"{what} failed (exit {process.returncode}): {last_error_line(process.stderr or '')}")
    return process


@dataclasses.dataclass
class Call:
    """One runner call: ``function`` (one of ``FUNCTIONS``) with its arguments; for "fit", ``x`` and
    ``target`` are the stacked ``xs`` and ``targets``. ``checkpoint`` is a ``Checkpoint`` or a path."""

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


def write_job(directory, calls: list[Call]) -> None:
    """The job directory of ``calls`` (see the module doc)."""
    from weights_convert.formats.io import write

    directory = Path(directory)
    checkpoint_files: dict[int, str] = {}
    job = []
    for i, call in enumerate(calls):
        if isinstance(call.checkpoint, Checkpoint):
            key = id(call.checkpoint)
            if key not in checkpoint_files:
                checkpoint_files[key] = str(directory / f"checkpoint_{len(checkpoint_files)}.safetensors")
                write(call.checkpoint, checkpoint_files[key])
            checkpoint = {"safetensors": checkpoint_files[key]}
        else:
            checkpoint = {"path": str(Path(call.checkpoint).resolve())}
        arrays = {"x": np.asarray(call.x)} | ({} if call.target is None else {"target": np.asarray(call.target)})
        np.savez(directory / f"input_{i}.npz", **arrays)
        job.append({"function": call.function, "checkpoint": checkpoint, "kwargs": call.kwargs})
    (directory / "job.json").write_text(json.dumps(job))


def read_job(directory) -> list[Call]:
    """The calls of the job directory (each distinct checkpoint read once)."""
    from weights_convert.formats.io import read

    directory = Path(directory)
    checkpoints: dict[str, Checkpoint] = {}
    calls = []
    for i, entry in enumerate(json.loads((directory / "job.json").read_text())):
        source = entry["checkpoint"]
        if "safetensors" in source:
            if source["safetensors"] not in checkpoints:
                checkpoints[source["safetensors"]] = read(source["safetensors"])
            checkpoint = checkpoints[source["safetensors"]]
        else:
            checkpoint = source["path"]
        arrays = load_arrays(directory / f"input_{i}.npz")
        calls.append(Call(entry["function"], checkpoint, arrays["x"], arrays.get("target"), entry["kwargs"]))
    return calls


def load_arrays(path) -> dict:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def run_calls(module: str, calls: list[Call], *, env: dict[str, str], what: str, failure=ProcessFailed) -> list[dict]:
    """The results of ``calls`` run by ``python -m module JOB_DIR`` (whose ``main`` is
    ``serve_calls``) in one subprocess with ``env``; a failure raises ``failure`` as ``run_module``."""
    with tempfile.TemporaryDirectory(prefix=f"{module.replace('.', '-')}-") as tmp:
        write_job(tmp, calls)
        run_module(module, tmp, env=env, what=what, failure=failure)
        return [load_arrays(Path(tmp) / f"result_{i}.npz") for i in range(len(calls))]


def fit_in_subprocess(module: str, checkpoint, xs, targets, options: dict, *, env: dict[str, str], what: str) -> dict:
    """A trainer's ``fit(checkpoint, xs, targets, **options)`` in one ``python -m <module> JOB_DIR``
    subprocess started with ``env`` (where JAX must start with other devices or another backend)."""
    [results] = run_calls(module, [Call("fit", checkpoint, xs, targets, options)], env=env, what=what)
    return results


def serve_calls(argv: list[str], run_call, usage: str) -> int:
    """The subprocess side of ``run_calls``: ``run_call(call)`` for every call of ``<dir>/job.json``,
    results to ``<dir>/result_<i>.npz``. Exit status 2 with ``usage`` on stderr unless ``argv`` is
    that one directory. The worker ends with its parent, and on SIGTERM as on an error."""
    termination.exit_on_sigterm()
    termination.die_with_parent()
    if len(argv) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    for i, call in enumerate(read_job(argv[0])):
        np.savez(Path(argv[0]) / f"result_{i}.npz", **run_call(call))
    return 0
