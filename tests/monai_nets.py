"""MONAI's own AttentionUnet, randomly initialised, as the MONAI tests' oracle (``monai`` is a test
dependency only: the project never imports it)."""

import numpy as np
import torch
from monai.networks import nets as monai_nets

from weights_convert.core.monai_spec import MonaiConfig


def monai_net(config: MonaiConfig, seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """MONAI's AttentionUnet of ``config``, torch-initialised from ``seed``, with random BatchNorm
    scales, shifts, running statistics and counters and random PReLU slopes (their defaults, ones
    and zeros and 0.25, would hide a swapped or ignored tensor)."""
    torch.manual_seed(seed)
    net = monai_nets.AttentionUnet(
        spatial_dims=config.spatial_dims,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        channels=config.channels,
        strides=config.strides,
        kernel_size=config.kernel_size,
        up_kernel_size=config.up_kernel_size,
        dropout=config.dropout,
    ).to(dtype)
    rng = np.random.default_rng(seed)

    def fill(tensor, values):
        tensor.copy_(torch.from_numpy(np.asarray(values)).to(tensor.dtype))

    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                fill(module.weight, rng.uniform(0.5, 1.5, n))
                fill(module.bias, rng.normal(0.0, 0.3, n))
                fill(module.running_mean, rng.normal(0.0, 0.3, n))
                fill(module.running_var, rng.uniform(0.5, 1.5, n))
                fill(module.num_batches_tracked, rng.integers(1, 1000))
            elif isinstance(module, torch.nn.PReLU):
                fill(module.weight, rng.uniform(0.05, 0.45, module.weight.shape))
    return net
