"""Seeded random weights for any config, framework-free and identical on every platform.

BatchNorm statistics and affine parameters are drawn too, so that eval-mode BatchNorm is not the
identity and a checkpoint made here exercises every tensor.
"""

from __future__ import annotations

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.spec import ModelConfig, param_specs

NUM_BATCHES_TRACKED = 100
# The layer kinds whose weight is a convolution kernel (fan-in: every axis but the first, as torch has it).
CONVOLUTIONS = ("conv3", "conv1", "conv", "convT")


def random_checkpoint(config=None, seed: int = 0, dtype="float32") -> Checkpoint:
    """Kaiming-uniform-like convolutions (PyTorch's default scale), random BatchNorm state."""
    config = config or ModelConfig()
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    fan_in: dict[str, int] = {}
    for p in param_specs(config):
        if p.layer in CONVOLUTIONS and p.leaf == "weight":
            fan_in[p.module] = int(np.prod(p.shape[1:]))
            bound = 1.0 / np.sqrt(fan_in[p.module])
            value = rng.uniform(-bound, bound, p.shape)
        elif p.layer in CONVOLUTIONS:
            bound = 1.0 / np.sqrt(fan_in[p.module])
            value = rng.uniform(-bound, bound, p.shape)
        elif p.layer == "prelu":  # a slope around torch's 0.25
            value = rng.uniform(0.05, 0.45, p.shape)
        elif p.leaf == "weight":
            value = rng.uniform(0.5, 1.5, p.shape)
        elif p.leaf in ("bias", "running_mean"):
            value = rng.normal(0.0, 0.1, p.shape)
        elif p.leaf == "running_var":
            value = rng.uniform(0.5, 1.5, p.shape)
        else:
            tensors[p.name] = np.array(NUM_BATCHES_TRACKED, dtype=np.int64)
            continue
        tensors[p.name] = value.astype(dtype)
    return Checkpoint(config, tensors)
