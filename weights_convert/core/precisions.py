"""The precisions a model runs in, by name, for every implementation, the harness and the command.

A precision is the dtype the parameters (and BatchNorm running statistics) are kept in, the dtype
the convolutions and activations compute in, and the matmul setting a GPU must use for it:

- ``"float64"`` and ``"float32"``: parameters and computation in that dtype. On a GPU float32 is
  *strict*: TF32 off (PyTorch ``allow_tf32=False``, JAX matmul precision ``"highest"``, TensorFlow
  ``enable_tensor_float_32_execution(False)``), whose defaults on a GPU are not full float32.
- ``"mixed_bfloat16"`` (Keras' name for the policy): float32 parameters and BatchNorm statistics,
  bfloat16 convolutions and activations. Optimizer updates and running statistics would lose most
  of their digits in bfloat16, so bfloat16 is a compute dtype only, never a parameter dtype.
- ``"tf32"`` (benchmarks and the GPU's informational parity rows only): float32 parameters and
  data, float32 matmuls and convolutions in TF32 (JAX's ``"default"``/``"tensorfloat32"``).

float32 and mixed bfloat16 have rounding noise of their own, which the parity bounds are measured
against (``NOISY``); float64 is the exact one, judged at a fixed 1e-10.
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass(frozen=True)
class Precision:
    name: str
    param_dtype: str  # numpy dtype name of parameters, running statistics, inputs and the loss
    compute_dtype: str  # numpy dtype name of convolutions and activations ("bfloat16": ml_dtypes')
    tf32: bool  # whether a GPU may use TF32 for its float32 matmuls and convolutions

    @property
    def mixed(self) -> bool:
        """Whether the computation is narrower than the parameters (autocast, Flax ``dtype``, a Keras policy)."""
        return self.compute_dtype != self.param_dtype


PRECISIONS = {
    "float32": Precision("float32", "float32", "float32", tf32=False),
    "float64": Precision("float64", "float64", "float64", tf32=False),
    "mixed_bfloat16": Precision("mixed_bfloat16", "float32", "bfloat16", tf32=False),
    "tf32": Precision("tf32", "float32", "float32", tf32=True),
}
# What a model is built, loaded, trained and checked in (``tf32`` is a GPU matmul setting, not a model's).
DTYPES = ("float32", "float64", "mixed_bfloat16")
# Rounded enough that parity measures their noise in the same run (tolerances.NOISE_BOUNDS).
NOISY = ("float32", "mixed_bfloat16")


def precision(name, choices=DTYPES) -> Precision:
    """The ``Precision`` called ``name``, one of ``choices``; a ValueError naming them otherwise."""
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"dtype must be one of {list(choices)}, got {name!r}")
    return PRECISIONS[name]


def param_dtype(name) -> str:
    """The parameters' dtype name for precision ``name``: float32 for ``mixed_bfloat16``."""
    return precision(name, tuple(PRECISIONS)).param_dtype


@contextlib.contextmanager
def torch_tf32(allow: bool):
    """PyTorch's CUDA matmuls and cuDNN convolutions with TF32 allowed or not, restored after."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def tensorflow_tf32(allow: bool):
    """TensorFlow's float32 matmuls and convolutions with TF32 allowed or not, restored after."""
    import tensorflow as tf

    saved = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(allow)
    try:
        yield
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(saved)


def jax_matmul_precision(allow_tf32: bool):
    """``jax.default_matmul_precision`` with TF32 allowed ("tensorfloat32") or full float32 ("highest")."""
    import jax

    return jax.default_matmul_precision("tensorfloat32" if allow_tf32 else "highest")
