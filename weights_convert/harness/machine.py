"""The machine a report was made on (a benchmark, a parity check): platform, processor, GPU, and the
versions of every library."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "keras", "tensorflow")


def machine_info(device: str = "cpu") -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {},
    }
    for package in PACKAGES:
        try:
            info["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if device == "gpu":
        info["gpu"] = _gpu_model()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_model() -> str | None:
    """Name, driver and memory of the first GPU, as ``nvidia-smi`` reports them (None without it)."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None
