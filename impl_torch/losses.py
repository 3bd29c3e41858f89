"""The training losses of ``weights_convert.core.losses`` in PyTorch, on NCHW (NCDHW) logits and
one-hot targets: (logits, target) -> the loss. torch's own binary and softmax cross-entropy
(``F.binary_cross_entropy_with_logits``, ``F.cross_entropy`` with class-probability targets);
Dice as the spec writes it. ``impl_flax/losses.py`` and ``impl_keras/losses.py`` hold the same
names."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from weights_convert.core.losses import DICE_SMOOTH_DR, DICE_SMOOTH_NR, terms, uses_sigmoid

CHANNELS = 1  # the channel axis of NCHW (NCDHW)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((output - target) ** 2)


def bce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(output, target)


def ce(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # A target of the logits' shape is read as class probabilities over dim 1; the mean is over pixels.
    return F.cross_entropy(output, target)


def dice(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    sigmoid = uses_sigmoid(output.shape[CHANNELS])
    probabilities = torch.sigmoid(output) if sigmoid else torch.softmax(output, dim=CHANNELS)
    spatial = tuple(range(2, output.dim()))
    intersection = torch.sum(probabilities * target, dim=spatial)  # (N, C)
    denominator = torch.sum(probabilities, dim=spatial) + torch.sum(target, dim=spatial) + DICE_SMOOTH_DR
    return torch.mean(1 - (2 * intersection + DICE_SMOOTH_NR) / denominator)


PLAIN = {"mse": mse, "bce": bce, "ce": ce, "dice": dice}


def loss_value(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss ``name`` (a sum of ``PLAIN`` terms) of ``output`` against ``target``."""
    return sum(PLAIN[term](output, target) for term in terms(name))
