"""Work for a subprocess through a directory: a list of calls, each a function name, a checkpoint
(safetensors, a training checkpoint's optimizer state included), named arrays (npz) and JSON keyword
arguments; and their results (npz). Used where a computation needs a process of its own (another
Keras backend, JAX with more host devices). ``fit_in_subprocess`` and ``serve_fits`` are the two
sides of one data-parallel fit handed to such a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_job(directory, calls: list[tuple[str, Checkpoint, dict, dict]]) -> None:
    """``calls``: (function, checkpoint, {name: array}, keyword arguments) each."""
    from weights_convert.formats.io import write

    directory = Path(directory)
    written: dict[int, str] = {}
    job = []
    for i, (function, checkpoint, arrays, kwargs) in enumerate(calls):
        if id(checkpoint) not in written:
            written[id(checkpoint)] = str(directory / f"checkpoint_{len(written)}.safetensors")
            write(checkpoint, written[id(checkpoint)])
        np.savez(directory / f"input_{i}.npz", **arrays)
        job.append({"function": function, "checkpoint": written[id(checkpoint)], "kwargs": kwargs})
    (directory / "job.json").write_text(json.dumps(job))


def read_job(directory) -> list[tuple[str, Checkpoint, dict, dict]]:
    from weights_convert.formats.io import read

    directory = Path(directory)
    checkpoints: dict[str, Checkpoint] = {}
    calls = []
    for i, entry in enumerate(json.loads((directory / "job.json").read_text())):
        path = entry["checkpoint"]
        checkpoints.setdefault(path, read(path))
        calls.append((entry["function"], checkpoints[path], load_arrays(directory / f"input_{i}.npz"), entry["kwargs"]))
    return calls


def load_arrays(path) -> dict:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def run_job(module: str, directory, env: dict, what: str) -> list[dict]:
    """``python -m module directory`` with ``env`` added to this environment; the results of the
    job's calls (``result_<i>.npz``). A failure raises RuntimeError with the end of its stderr."""
    directory = Path(directory)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), environment.get("PYTHONPATH")) if p)
    process = subprocess.run(
        [sys.executable, "-m", module, str(directory)], env=environment, capture_output=True, text=True
    )
    if process.returncode != 0:
        tail = process.stderr.strip()[-3000:]
        raise RuntimeError(f"{what} failed (exit {process.returncode}):\n{tail}")
    count = len(json.loads((directory / "job.json").read_text()))
    return [load_arrays(directory / f"result_{i}.npz") for i in range(count)]


def fit_in_subprocess(module: str, checkpoint: Checkpoint, data, settings: dict, env: dict, what: str) -> dict:
    """The results of ``module``'s ``train(checkpoint, data, steps=data.steps, **settings)`` run in one
    ``python -m module`` subprocess with ``env`` added (whose ``main`` is ``serve_fits``); ``data``
    an ``ArrayBatches``. A failure raises RuntimeError naming ``what``, as ``run_job``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"{module.replace('.', '-')}-") as tmp:
        write_job(tmp, [("fit", checkpoint, {"xs": data.xs, "targets": data.targets}, settings)])
        return run_job(module, tmp, env, what)[0]


def serve_fits(argv: list[str], train, usage: str) -> int:
    """The subprocess side of ``fit_in_subprocess``: ``train(checkpoint, data, steps=data.steps,
    **settings)`` for every call of ``<dir>/job.json``, results to ``<dir>/result_<i>.npz``. Exit
    status 2 with ``usage`` on stderr unless ``argv`` is that one directory."""
    from weights_convert.core.data_parallel import ArrayBatches

    if len(argv) != 1:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    for i, (_, checkpoint, arrays, settings) in enumerate(read_job(argv[0])):
        data = ArrayBatches(arrays["xs"], arrays["targets"])
        np.savez(Path(argv[0]) / f"result_{i}.npz", **train(checkpoint, data, steps=data.steps, **settings))
    return 0


def host_devices_flag(devices: int) -> str:
    """``XLA_FLAGS`` with ``devices`` CPU host devices (replacing any count already set): read by
    JAX when it initializes, so it is set for a new process."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
