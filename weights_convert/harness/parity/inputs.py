"""What every implementation and the reference start from: the seeded input and training target
(``make_inputs``), the seeded default weights (``default_checkpoint``), and the training checkpoint
of a resumed fit (``start``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.losses import SEGMENTATION_LOSSES, one_hot
from weights_convert.core.optimizer_state import OptimizerState, hyperparameters
from weights_convert.core.random_init import random_checkpoint
from weights_convert.core.spec import ModelConfig
from weights_convert.harness import reference


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Seeded data: one batch ``x`` / ``target`` (eval and train), or one per step (fit: stacked)."""

    x: np.ndarray
    target: np.ndarray


def make_inputs(
    config: ModelConfig,
    batch: int,
    size: tuple[int, ...],
    seed: int = 0,
    steps: int | None = None,
    *,
    loss: str = "mse",
):
    """Seeded input in [0, 1] (NCHW, or NCDHW for a ``size`` of three sides): smooth blobs plus
    noise, so that masks and difference maps are readable; and the training target of ``loss``: a
    regression target for "mse", else a one-hot segmentation (``segmentation_target``). With
    ``steps``, one batch per step (seeds ``seed``, ``seed + 1``, ...) stacked on a new first axis.

    Values are float32-representable, so every precision starts from the same numbers and the
    rounding of the input is not counted as error."""
    if steps is not None:
        batches = [make_inputs(config, batch, size, seed + k, loss=loss) for k in range(steps)]
        return tuple(np.stack(arrays) for arrays in zip(*batches, strict=True))
    rng = np.random.default_rng(seed)
    size = tuple(size)
    grid = np.meshgrid(*(np.linspace(0, 1, side) for side in size), indexing="ij")
    per_channel = (config.in_channels,) + (1,) * len(size)
    x = 0.2 * rng.uniform(0.0, 1.0, (batch, config.in_channels, *size))
    for n in range(batch):
        for _ in range(4):
            centre = [rng.uniform(0.1, 0.9) for _ in size]
            radius = rng.uniform(0.08, 0.25)
            distance = sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True))
            blob = np.exp(-distance / (2 * radius**2))
            x[n] += 0.8 * blob * rng.uniform(0.3, 1.0, per_channel)
    target = rng.normal(0.0, 1.0, (batch, config.out_channels, *size))
    # Scaled into [0, 1], not clipped: a clipped plateau makes windows of exactly equal values, and
    # a 2x2 max pool over exact ties routes its gradient by rounding order, not by the mathematics.
    x = x / np.max(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    if loss in SEGMENTATION_LOSSES:
        target = segmentation_target(x, config.out_channels)
    return x.astype(np.float32).astype(np.float64), target.astype(np.float32).astype(np.float64)


def segmentation_target(x: np.ndarray, out_channels: int) -> np.ndarray:
    """A one-hot segmentation of the input ``x`` (N, C_in, *spatial) into ``out_channels`` classes
    (one channel: foreground or not): the channel mean cut at its quantiles into equally large
    classes, so that every class occurs and the boundaries follow the blobs."""
    intensity = np.mean(x, axis=1)  # (N, *spatial)
    classes = max(2, out_channels)
    cuts = np.quantile(intensity, np.arange(1, classes) / classes, axis=tuple(range(1, intensity.ndim)))
    index = sum((intensity > cut.reshape(-1, *(1,) * (intensity.ndim - 1))).astype(int) for cut in cuts)
    return np.moveaxis(one_hot(index, out_channels), 0, 1)  # (N, out_channels, *spatial)


def default_checkpoint(x: np.ndarray | None = None) -> Checkpoint:
    """Seeded random weights of the default config with non-trivial BatchNorm statistics; given
    the input ``x``, with its logits centred on ``x`` (``centred_logits``)."""
    checkpoint = random_checkpoint(ModelConfig(), seed=0)
    return checkpoint if x is None else centred_logits(checkpoint, x)


def logits_bias_name(config) -> str:
    """The bias of the network's last convolution, which adds to every logit of its channel: the
    last convolution bias of the parameter table with one value per output channel."""
    shape = (config.out_channels,)
    return [s.name for s in config.param_specs() if s.leaf == "bias" and s.layer != "bn" and s.shape == shape][-1]


def centred_logits(checkpoint: Checkpoint, x: np.ndarray) -> Checkpoint:
    """``checkpoint`` with the logits' bias shifted by minus each output channel's median logit on
    ``x`` (the eval-mode float64 reference), so that the logits straddle 0 and a mask of them has
    pixels of both classes: randomly initialised weights otherwise give logits of one sign."""
    name = logits_bias_name(checkpoint.config)
    logits = reference.forward(checkpoint.tensors, x, config=checkpoint.config)["output"]
    median = np.median(logits, axis=(0, *range(2, logits.ndim)))
    tensors = {**checkpoint.tensors, name: (checkpoint.tensors[name] - median).astype(checkpoint.tensors[name].dtype)}
    return dataclasses.replace(checkpoint, tensors=tensors)


def start(checkpoint: Checkpoint, optimizer: str) -> Checkpoint:
    """The training checkpoint a resumed fit starts from, in every target and the reference:
    ``checkpoint``'s tensors and a fresh ``optimizer`` (step 0, no slots) with its canonical
    hyperparameters."""
    state = OptimizerState(optimizer, hyperparameters(optimizer), 0, {})
    return Checkpoint(checkpoint.config, checkpoint.tensors, optimizer=state)
