"""Running the command as a user with only some packages installed (see ``hidden/sitecustomize.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

HIDDEN = Path(__file__).parent / "hidden"

# What each install leaves out of this test environment, which has every package.
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "optax", "orbax", "keras", "tensorflow")
WITHOUT = {
    "base": FRAMEWORKS,
    "torch": tuple(p for p in FRAMEWORKS if p != "torch"),
    "flax": ("torch", "keras", "tensorflow"),
    "keras-jax": ("torch", "tensorflow", "flax", "optax", "orbax"),
    "no-tensorflow": ("tensorflow",),
    "all": (),
}


def environment(hide, **extra) -> dict[str, str]:
    """This environment without ``KERAS_BACKEND``, with the packages ``hide`` hidden, on the CPU;
    ``extra`` sets variables (a value of None removes one)."""
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(HIDDEN), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["ATTENTION_UNET_HIDE"] = ",".join(hide)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_as(install: str, *args, timeout: float = 600, also_hide=(), **extra_env) -> subprocess.CompletedProcess:
    """``attention-unet ARGS`` in a subprocess that sees only what ``install`` would have installed
    (less ``also_hide``)."""
    return subprocess.run(
        [sys.executable, "-m", "weights_convert.harness.cli", *map(str, args)],
        env=environment((*WITHOUT[install], *also_hide), **extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def python_as(install: str, script: str, timeout: float = 600, **extra_env) -> subprocess.CompletedProcess:
    """``python -c SCRIPT`` in a subprocess that sees only what ``install`` would have installed."""
    return subprocess.run(
        [sys.executable, "-c", script],
        env=environment(WITHOUT[install], **extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
