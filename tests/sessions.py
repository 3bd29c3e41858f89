"""A test's script run in a fresh process with Keras on JAX, x64 on and several JAX CPU host devices,
as data-parallel work on one CPU needs (JAX reads the device count when it starts)."""

from __future__ import annotations

import json
import subprocess
import sys

from weights_convert.processes import environment, host_devices_flag


def run_jax_session(script: str, *args, devices: int) -> tuple[dict, str]:
    """(the JSON of the script's ``RESULT <json>`` line, its stderr) of ``python -c script *args``
    with ``devices`` CPU host devices; a failed run fails the test with the end of its stderr."""
    env = environment(
        KERAS_BACKEND="jax", JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", XLA_FLAGS=host_devices_flag(devices)
    )
    process = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True, timeout=600
    )
    assert process.returncode == 0, process.stderr[-3000:]
    line = next(line for line in process.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), process.stderr
