"""Which optional package each feature needs, and the one-line error naming what to install.

The base install (numpy, safetensors, ml_dtypes, h5py, msgpack) converts between every format
that needs no framework. Everything else comes with an extra of ``attention-unet``; a missing
package is reported as ``<what> needs <package>: pip install 'attention-unet[<extra>]'`` before
anything is read or written.
"""

from __future__ import annotations

import importlib.util

# importable module -> (the package's name in messages, the extra that installs it)
PACKAGES = {
    "numpy": ("NumPy", None),
    "safetensors": ("safetensors", None),
    "ml_dtypes": ("ml_dtypes", None),
    "h5py": ("h5py", None),
    "msgpack": ("msgpack", None),
    "torch": ("PyTorch", "torch"),
    "jax": ("JAX", "flax"),
    "flax": ("Flax", "flax"),
    "optax": ("optax", "flax"),
    "orbax.checkpoint": ("Orbax", "flax"),
    "keras": ("Keras", "keras"),
    "tensorflow": ("TensorFlow", "tensorflow"),
    "matplotlib": ("matplotlib", "report"),
    "onnx": ("ONNX", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("ONNX Runtime", "export"),
}

# what each framework choice of ``parity``/``bench`` imports
FRAMEWORK_PACKAGES = {
    "torch": ("torch",),
    "flax": ("jax", "flax", "optax"),
    "keras": ("keras",),
}

# what each Keras backend imports besides Keras
KERAS_BACKEND_PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax",), "torch": ("torch",)}


class MissingPackage(ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a dotted name imports its parent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(modules) -> list[str]:
    """The modules of ``modules`` that are not installed, in order."""
    return [module for module in modules if not installed(module)]


def install_hint(module: str) -> str:
    """``Name: pip install ...`` for ``module``, naming the extra that brings it."""
    name, extra = PACKAGES.get(module, (module, None))
    package = f"attention-unet[{extra}]" if extra else "attention-unet"
    return f"{name}: pip install '{package}'"


def require(modules, what: str) -> None:
    """Raise ``MissingPackage`` naming the first of ``modules`` not installed, e.g.
    ``.pt needs PyTorch: pip install 'attention-unet[torch]'``."""
    absent = missing(modules)
    if absent:
        raise MissingPackage(f"{what} needs {install_hint(absent[0])}")
