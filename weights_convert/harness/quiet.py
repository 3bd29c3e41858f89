"""Frameworks' start-up logging kept off the user's terminal.

TensorFlow, gRPC and XLA log oneDNN notices and CUDA and TPU probing from C++ when they load. The
environment variables below silence what honours them; TensorFlow 2.21's absl logging prints its
load-time lines ("All log messages before absl::InitializeLog()", oneDNN, cudart) whatever
``TF_CPP_MIN_LOG_LEVEL`` says, so ``quiet_import`` loads a framework with the process's stderr
descriptor pointed at /dev/null (Python's own errors are raised as usual, after it is restored).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOGGERS = ("jax._src.xla_bridge", "absl")


def quiet_frameworks() -> None:
    """Before any framework is imported: the environment and loggers above, unless the user set them."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def native_stderr_silenced():
    """File descriptor 2 on /dev/null for the duration (what C++ libraries write there is dropped)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def quiet_import(module: str) -> None:
    """Import ``module`` (and the frameworks it loads) without their load-time C++ logging; an
    import that fails raises as usual."""
    if module in sys.modules:
        return
    with native_stderr_silenced():
        importlib.import_module(module)
