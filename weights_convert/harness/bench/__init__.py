"""``attention-unet bench``: throughput of the same model in every framework, against the machine's matmul rate.

For each framework and variant (torch eager / channels_last / torch.compile; flax eager / nnx.jit;
keras eager / tf.function / jit_compile on each installed backend) this times an eval forward and a
training step (SGD, MSE loss, train-mode BatchNorm): a warm-up (which includes any compilation),
then the median of repeated timed runs. GFLOP/s come from the model's FLOPs counted from the spec.

Every row names its ``precision``:

- ``float64``, and ``float32`` strict: TF32 off in PyTorch and TensorFlow, JAX's matmul precision
  "highest" while the function is traced (Flax and Keras on JAX alike);
- ``tf32`` (GPU only, with ``--dtype float32``): TF32 on in PyTorch and TensorFlow, and JAX's
  default matmul precision, which is TF32 on the GPUs that have it;
- ``mixed_bfloat16``: float32 parameters and BatchNorm statistics, convolutions in bfloat16, as in
  parity: torch ``AttentionUNet(compute_dtype=torch.bfloat16)`` (autocast), Flax
  ``dtype=bfloat16, param_dtype=float32``, Keras ``dtype="mixed_bfloat16"``.

Each row also reports the matmul setting its framework had (``matmul_precision``); for JAX it is
the one seen inside the function while it was traced. The ceiling of each precision is a large
matmul timed on the same device in the same run (``matmul_gflops``: float32, tf32 on GPU, bfloat16,
and float64 for float64 runs), and each row's ``ratio_to_ceiling`` is to its own precision's.

The modules, bottom up: ``flops`` (counted from the spec), ``settings`` (what a run measures),
``timing``, ``rows`` (measured and error rows), ``matmul_settings`` (each framework's TF32 /
matmul precision per row), ``ceilings`` (the matmuls), ``torch_rows`` / ``flax_rows`` /
``keras_rows`` (each framework's timed steps; only these import a framework at module level, and
only ``workers`` imports them, once the framework is known to be installed), ``workers`` (which
process computes which rows), ``machine``, ``report`` (``run``) and ``table`` (``format_table``).
Importing this package imports no framework.
"""

from weights_convert.core.frameworks import DEVICES, FRAMEWORKS, KERAS_BACKENDS
from weights_convert.core.precisions import DTYPES, PRECISIONS
from weights_convert.harness.bench import ceilings, workers
from weights_convert.harness.bench.ceilings import CEILING, CEILINGS, measure_matmul, measure_sgemm
from weights_convert.harness.bench.flops import conv_flops, forward_flops, level_sizes, train_step_flops
from weights_convert.harness.bench.report import run
from weights_convert.harness.bench.settings import MODES, VARIANTS, Settings
from weights_convert.harness.bench.table import format_table
from weights_convert.harness.bench.workers import GPU_MEMORY_ENV, keras_backends_available, worker_env
from weights_convert.harness.machine import machine_info

__all__ = [
    "CEILING",
    "CEILINGS",
    "DEVICES",
    "DTYPES",
    "FRAMEWORKS",
    "GPU_MEMORY_ENV",
    "KERAS_BACKENDS",
    "MODES",
    "PRECISIONS",
    "VARIANTS",
    "Settings",
    "ceilings",
    "conv_flops",
    "format_table",
    "forward_flops",
    "keras_backends_available",
    "level_sizes",
    "machine_info",
    "measure_matmul",
    "measure_sgemm",
    "run",
    "train_step_flops",
    "worker_env",
    "workers",
]
