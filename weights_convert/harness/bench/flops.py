"""The model's FLOPs, counted from the spec: every convolution, multiply-add = 2."""

from __future__ import annotations

import math

from weights_convert.core.monai_spec import MonaiConfig, down_prefix, level_prefix
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


def _article_positions(config: ModelConfig, size: tuple[int, ...]) -> dict[str, int]:
    """Output positions of each convolution of the article's network."""
    sizes = level_sizes(config, size)
    modules = dict.fromkeys(spec.module for spec in param_specs(config) if spec.leaf == "weight" and spec.layer != "bn")
    return {module: math.prod(sizes[_level(module, config.depth)]) for module in modules}


def _monai_positions(config: MonaiConfig, size: tuple[int, ...]) -> dict[str, int]:
    """The positions each convolution of MONAI's network is counted at: its output's, except a
    transposed convolution's, counted at its input (as ``torch.utils.flop_counter`` counts it: each
    input position multiplies the whole kernel). Level i runs at the input's sides divided by the
    strides above it."""
    sizes = [tuple(size)]
    for stride in config.strides:
        sizes.append(tuple(side // stride for side in sizes[-1]))
    here = [math.prod(sides) for sides in sizes]
    positions = {"model.0.conv.0.conv": here[0], "model.0.conv.1.conv": here[0], "model.2.conv": here[0]}
    for level in range(config.depth):
        prefix, down = level_prefix(level), down_prefix(config, level)
        for branch in ("W_g.0", "W_x.0", "psi.0"):
            positions[f"{prefix}.attention.{branch}.conv"] = here[level]
        positions[f"{prefix}.upconv.up.conv"] = here[level + 1]
        positions[f"{prefix}.merge.conv"] = here[level]
        positions[f"{down}.conv.0.conv"] = positions[f"{down}.conv.1.conv"] = here[level + 1]
    return positions


def conv_flops(config, size: tuple[int, ...]) -> dict[str, int]:
    """FLOPs of each convolution for one image or volume, multiply-add = 2 (``2 * c_in * c_out * k**d``
    times the number of positions, ``H * W`` or ``D * H * W``: the output's, a transposed
    convolution's input's).

    Biases, normalizations, activations, pooling, upsampling and the gate's products are elementwise and
    not counted (as in the usual GFLOP figure for this model: 91.2 GFLOP at 3x256x256).
    """
    positions = _monai_positions(config, size) if config.architecture == "monai" else _article_positions(config, size)
    flops = {}
    for spec in param_specs(config):
        if spec.module in positions and spec.leaf == "weight":
            c_out, c_in, *kernel = spec.shape  # a transposed kernel is (in, out, *k): the same product
            flops[spec.module] = 2 * c_in * c_out * math.prod(kernel) * positions[spec.module]
    return flops


def forward_flops(config: ModelConfig, size: tuple[int, ...], batch: int = 1) -> int:
    return batch * sum(conv_flops(config, size).values())


def train_step_flops(config: ModelConfig, size: tuple[int, ...], batch: int = 1) -> int:
    """Forward, plus each convolution's weight gradient and input gradient (each as many FLOPs as its
    forward), except the first convolution's input gradient: the input needs none."""
    per_conv = conv_flops(config, size)
    first = per_conv[next(iter(per_conv))]  # the first convolution, the one that reads the input
    return batch * (3 * sum(per_conv.values()) - first)


def mode_flops(mode: str, config: ModelConfig, size: tuple[int, ...], batch: int) -> int:
    return forward_flops(config, size, batch) if mode == "forward" else train_step_flops(config, size, batch)
