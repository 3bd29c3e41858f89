"""The matmul setting each framework runs a row of each precision with, and the setting a row reports
(its ``matmul_precision``). The switches themselves are ``weights_convert.core.precisions``'.

PyTorch and TensorFlow: TF32 on for the tf32 rows and off for every other (a bfloat16 convolution
ignores it; the float32 operations left under mixed precision are then exact). JAX: "highest" (full
float32, on a GPU too) for the strict rows.
"""

from __future__ import annotations

from weights_convert.core.precisions import PRECISIONS, jax_matmul_precision, tensorflow_tf32, torch_tf32


def torch_scope(precision: str):
    return torch_tf32(PRECISIONS[precision].tf32)


def torch_setting() -> str:
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if matmul == cudnn:
        return "tf32" if matmul else "ieee"
    return f"matmul {'tf32' if matmul else 'ieee'}, cudnn {'tf32' if cudnn else 'ieee'}"


def tensorflow_scope(precision: str):
    """TensorFlow allows TF32 by default on GPU; the strict and bfloat16 rows turn it off."""
    return tensorflow_tf32(PRECISIONS[precision].tf32)


def tensorflow_setting() -> str:
    import tensorflow as tf

    return "tf32" if tf.config.experimental.tensor_float_32_execution_enabled() else "ieee"


def jax_scope(precision: str):
    """``jax.default_matmul_precision`` for a row: "highest" for the strict rows (float32, float64);
    JAX's "default" for the tf32 rows (TF32 on GPUs that have it) and for the bfloat16 rows, whose
    operands are bfloat16 already, so that they run, and report, JAX's own default rather than
    ``core.precisions``' explicit "tensorfloat32". JAX keys its compilation cache on this setting,
    so a function traced inside the scope keeps it."""
    strict = not (PRECISIONS[precision].tf32 or PRECISIONS[precision].mixed)
    if strict:
        return jax_matmul_precision(allow_tf32=False)
    import jax

    return jax.default_matmul_precision("default")


def jax_setting() -> str:
    """The matmul precision JAX applies at this point (inside a trace: the one the trace uses)."""
    import jax

    return jax.config.jax_default_matmul_precision or "default"


class TraceRecord:
    """The JAX matmul setting seen inside a traced function, one row at a time: ``note()`` is called
    from inside the function (during tracing under ``jit``, on every call in eager mode); ``take()``
    returns the last one seen and forgets it, so a row whose function was never run reports None."""

    def __init__(self) -> None:
        self.seen: str | None = None

    def note(self) -> None:
        self.seen = jax_setting()

    def take(self) -> str | None:
        seen, self.seen = self.seen, None
        return seen
