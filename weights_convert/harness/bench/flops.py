"""The model's FLOPs, counted from the spec: every convolution, multiply-add = 2."""

from __future__ import annotations

import math

from weights_convert.core.spec import ModelConfig, param_specs


def level_sizes(config: ModelConfig, size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Spatial sides at each level (H W, or D H W): level 0 is the input, each max pool floors a
    halving of every side; the last is the bridge."""
    sizes = [tuple(size)]
    for _ in range(config.depth):
        sizes.append(tuple(side // 2 for side in sizes[-1]))
    return sizes


def _level(module: str, depth: int) -> int:
    """The level whose resolution a layer runs at: ``e{i}`` at i - 1, the bridge at ``depth``, ``d{j}`` at
    ``depth - j`` (decoders pad back to their skip's size), the head at 0."""
    block = module.split(".", 1)[0]
    if block == "output":
        return 0
    if block == "b1":
        return depth
    index = int(block[1:])
    return index - 1 if block[0] == "e" else depth - index


def conv_flops(config: ModelConfig, size: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of each convolution for one image or volume, multiply-add = 2 (``2 * c_in * c_out * k**d``
    times the number of output positions, ``H * W`` or ``D * H * W``).

    Biases, BatchNorm, activations, pooling, upsampling and the gate's products are elementwise and
    not counted (as in the usual GFLOP figure for this model: 91.2 GFLOP at 3x256x256).
    """
    sizes = level_sizes(config, size)
    flops = {}
    for spec in param_specs(config):
        if spec.layer in ("conv3", "conv1") and spec.leaf == "weight":
            c_out, c_in, *kernel = spec.shape
            positions = math.prod(sizes[_level(spec.module, config.depth)])
            flops[spec.module] = 2 * c_in * c_out * math.prod(kernel) * positions
    return flops


def forward_flops(config: ModelConfig, size: tuple[int, ...], batch: int = 1) -> int:
    return batch * sum(conv_flops(config, size).values())


def train_step_flops(config: ModelConfig, size: tuple[int, ...], batch: int = 1) -> int:
    """Forward, plus each convolution's weight gradient and input gradient (each as many FLOPs as its
    forward), except the first convolution's input gradient: the input needs none."""
    per_conv = conv_flops(config, size)
    first = per_conv["e1.conv.conv.0"]
    return batch * (3 * sum(per_conv.values()) - first)


def mode_flops(mode: str, config: ModelConfig, size: tuple[int, ...], batch: int) -> int:
    return forward_flops(config, size, batch) if mode == "forward" else train_step_flops(config, size, batch)
