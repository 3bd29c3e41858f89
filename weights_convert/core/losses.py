"""The training losses, framework-free: their names, definitions, constants and which model each
fits. Every trainer (``impl_<framework>/losses.py``) and the NumPy reference
(``weights_convert.harness.reference``, forward and hand-written backward) compute these
definitions; ``docs/architecture.md`` section 3b states them.

``z`` is the model's logits and ``t`` the target, both (N, C, *spatial) in the canonical layout
(channels last inside Flax and Keras), taken in at least float32 (bfloat16 logits are cast first).
A segmentation target is one-hot: ``t[n, c, ...]`` is 1 for the pixel's class and 0 for the others
(one output channel: 1 for foreground, 0 for background). Means are over every element for "mse"
and "bce", over every pixel (N x spatial) for "ce", over every (sample, channel) pair for "dice".

- "mse": mean((z - t)**2), a regression of the logits.
- "bce": binary cross-entropy with logits, mean(max(z, 0) - z * t + log(1 + exp(-|z|))), for one
  output channel (the probability of foreground is sigmoid(z)).
- "ce": softmax cross-entropy over the classes (C >= 2), mean over pixels of
  -sum_c t_c * log_softmax(z)_c.
- "dice": soft Dice on the probabilities p (sigmoid(z) for one output channel, softmax over the
  channels otherwise), per sample n and channel c over the spatial axes:
  1 - (2 * sum(p * t) + DICE_SMOOTH_NR) / (sum(p) + sum(t) + DICE_SMOOTH_DR), averaged over (n, c).
  MONAI's ``DiceLoss`` with its defaults (every channel, the background's included).
- "dice_bce" = "dice" + "bce"; "dice_ce" = "dice" + "ce", each term weighted 1 (MONAI's
  ``DiceCELoss``).
"""

from __future__ import annotations

import numpy as np

LOSSES = ("mse", "bce", "ce", "dice", "dice_bce", "dice_ce")

# MONAI's DiceLoss defaults: a smoothing term on the numerator and the denominator, so that a
# sample and channel with no foreground in either p or t has Dice 1 (loss 0), not 0 / 0.
DICE_SMOOTH_NR = 1e-5
DICE_SMOOTH_DR = 1e-5

# The losses whose target is a segmentation (one-hot classes); "mse" regresses any target.
SEGMENTATION_LOSSES = ("bce", "ce", "dice", "dice_bce", "dice_ce")
# The losses made for one output channel (sigmoid), and those for several classes (softmax).
ONE_CHANNEL_LOSSES = ("bce", "dice_bce")
CLASS_LOSSES = ("ce", "dice_ce")


def check_loss(loss: str, out_channels: int) -> None:
    """A ValueError naming the problem unless ``loss`` is one of ``LOSSES`` and fits a model of
    ``out_channels`` output channels."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss in ONE_CHANNEL_LOSSES and out_channels != 1:
        raise ValueError(f"loss {loss} is for one output channel; this model has {out_channels} (use dice_ce or ce)")
    if loss in CLASS_LOSSES and out_channels < 2:
        raise ValueError(f"loss {loss} is for two or more classes; this model has 1 output channel (use dice_bce)")


def default_loss(out_channels: int) -> str:
    """What ``train`` minimises unless told: Dice plus binary cross-entropy for one output channel,
    Dice plus softmax cross-entropy for several."""
    return "dice_bce" if out_channels == 1 else "dice_ce"


def one_hot(classes: np.ndarray, out_channels: int) -> np.ndarray:
    """The one-hot target (float64, a new first axis of ``out_channels``) of integer ``classes``:
    channel j is 1 where the class is j; for one output channel, 1 where the class is above 0."""
    classes = np.asarray(classes)
    if out_channels == 1:
        return (classes > 0)[None].astype(np.float64)
    channels = np.arange(out_channels).reshape(-1, *([1] * classes.ndim))
    return (classes[None] == channels).astype(np.float64)


def uses_sigmoid(out_channels: int) -> bool:
    """Whether "dice" takes sigmoid probabilities (one output channel) rather than softmax ones."""
    return out_channels == 1


def terms(loss: str) -> tuple[str, ...]:
    """The plain losses whose sum ``loss`` is: ("dice", "bce") for "dice_bce", (loss,) otherwise."""
    return tuple(loss.split("_")) if loss in ("dice_bce", "dice_ce") else (loss,)
