"""Which optional package each feature needs, and the one-line error naming what to install.

The base install (numpy, safetensors, ml_dtypes, h5py, msgpack) converts between every format
that needs no framework. Everything else comes with an extra of ``attention-unet``; a missing
package is reported as ``<what> needs <package>: pip install 'attention-unet[<extra>]'`` before
anything is read or written.
"""

from __future__ import annotations

import importlib.util
import os
import sys

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
    "flatbuffers": ("flatbuffers", "flax"),
    "keras": ("Keras", "keras"),
    "tensorflow": ("TensorFlow", "tensorflow"),
    "matplotlib": ("matplotlib", "report"),
    "onnx": ("ONNX", "export"),
    "onnxscript": ("onnxscript", "export"),
    "onnxruntime": ("ONNX Runtime", "export"),
    "PIL": ("Pillow", "images"),
    "tifffile": ("tifffile", "images"),
}

# what reading or writing each image format (``harness/images.py``, ``train --data``) imports
IMAGE_PACKAGES = {"PNG": "PIL", "JPEG": "PIL", "TIFF": "tifffile"}

# what each framework choice of ``parity``/``bench`` imports
FRAMEWORK_PACKAGES = {
    "torch": ("torch",),
    "flax": ("jax", "flax", "optax"),
    "keras": ("keras",),
}

# what each Keras backend imports besides Keras
KERAS_BACKEND_PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax",), "torch": ("torch",)}
# the extra that adds each Keras backend to ``[keras]``
KERAS_BACKEND_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


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


def framework_missing(framework: str) -> str | None:
    """Why ``framework`` (a ``FRAMEWORK_PACKAGES`` key) cannot run here, e.g.
    ``JAX is not installed (pip install 'attention-unet[flax]')``; None when it can."""
    absent = missing(FRAMEWORK_PACKAGES[framework])
    return _not_installed(absent[0]) if absent else None


def keras_backend_missing(backend: str) -> str | None:
    """Why the Keras backend ``backend`` cannot run here (its package is missing; Keras itself is
    ``framework_missing("keras")``), naming the extra that adds it to Keras, e.g.
    ``JAX is not installed (pip install 'attention-unet[jax]')``; None when it can."""
    absent = missing(KERAS_BACKEND_PACKAGES[backend])
    return _not_installed(absent[0], KERAS_BACKEND_EXTRAS[backend]) if absent else None


def require_keras_backend(backend: str, what: str) -> None:
    """Raise ``MissingPackage`` when the Keras backend ``backend`` is not installed, e.g.
    ``--keras-backends jax needs JAX: pip install 'attention-unet[jax]'``."""
    absent = missing(KERAS_BACKEND_PACKAGES[backend])
    if absent:
        name = PACKAGES.get(absent[0], (absent[0], None))[0]
        raise MissingPackage(f"{what} needs {name}: pip install 'attention-unet[{KERAS_BACKEND_EXTRAS[backend]}]'")


def _not_installed(module: str, extra: str | None = None) -> str:
    name, default_extra = PACKAGES.get(module, (module, None))
    extra = extra or default_extra
    package = f"attention-unet[{extra}]" if extra else "attention-unet"
    return f"{name} is not installed (pip install '{package}')"


def configured_keras_backend() -> str | None:
    """The Keras backend this process names: ``KERAS_BACKEND``, else the ``backend`` of
    ``$KERAS_HOME/keras.json`` (default ``~/.keras``); None when neither names one."""
    import json
    from pathlib import Path

    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        backend = json.loads((home / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None
    return backend if isinstance(backend, str) and backend else None


def default_keras_backend() -> str:
    """The backend importing Keras gets in this process: ``KERAS_BACKEND`` when set; else the
    one ``keras.json`` names (Keras writes "tensorflow" there on its first import) when it is
    installed; else the first installed of tensorflow, jax, torch ("tensorflow", Keras' own
    default, when none is)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    named = configured_keras_backend()
    if named in KERAS_BACKEND_PACKAGES and not missing(KERAS_BACKEND_PACKAGES[named]):
        return named
    for backend in ("tensorflow", "jax", "torch"):
        if not missing(KERAS_BACKEND_PACKAGES[backend]):
            return backend
    return "tensorflow"


def current_keras_backend() -> str:
    """The backend of this process: Keras' own if imported, else the one importing ``impl_keras``
    would pick (``default_keras_backend``)."""
    if "keras" in sys.modules:
        import keras

        return keras.backend.backend()
    return default_keras_backend()
