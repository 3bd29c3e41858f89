"""The training losses of ``weights_convert.core.losses`` in NumPy, each with its gradient with
respect to the logits written out by hand: the reference's end of the backward pass
(``weights_convert.harness.reference``). Independent of every framework, like the rest of the
reference.

Arrays are channels last, (N, *spatial, C), in the dtype they come in (float64, or float32 for
the float32 and mixed-bfloat16 references, whose loss is taken in float32 as every framework's
is). ``value_and_gradient(loss, z, t)`` returns (the loss, dloss/dz)."""

from __future__ import annotations

import numpy as np

from weights_convert.core.losses import DICE_SMOOTH_DR, DICE_SMOOTH_NR, LOSSES, terms, uses_sigmoid


def _mse(z: np.ndarray, t: np.ndarray):
    diff = z - t
    return np.mean(diff * diff), diff * (2 / diff.size)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow for either sign of z."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def _bce(z: np.ndarray, t: np.ndarray):
    # max(z, 0) - z t + log(1 + exp(-|z|)): the stable form of -t log s(z) - (1 - t) log(1 - s(z)).
    per_element = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
    return np.mean(per_element), (_sigmoid(z) - t) / z.size


def _softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(softmax over the channel axis, log-softmax), from the logits less their maximum."""
    shifted = z - np.max(z, axis=-1, keepdims=True)
    log_total = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    log_p = shifted - log_total
    return np.exp(log_p), log_p


def _ce(z: np.ndarray, t: np.ndarray):
    p, log_p = _softmax(z)
    pixels = z.size // z.shape[-1]
    loss = -np.sum(t * log_p) / pixels
    # d/dz_c of -sum_k t_k log_softmax(z)_k is p_c sum_k t_k - t_c (p_c - t_c for a one-hot t).
    return loss, (p * np.sum(t, axis=-1, keepdims=True) - t) / pixels


def _dice(z: np.ndarray, t: np.ndarray):
    sigmoid = uses_sigmoid(z.shape[-1])
    p = _sigmoid(z) if sigmoid else _softmax(z)[0]
    spatial = tuple(range(1, z.ndim - 1))
    intersection = np.sum(p * t, axis=spatial, keepdims=True)  # (N, 1.., C)
    denominator = np.sum(p, axis=spatial, keepdims=True) + np.sum(t, axis=spatial, keepdims=True) + DICE_SMOOTH_DR
    numerator = 2 * intersection + DICE_SMOOTH_NR
    pairs = z.shape[0] * z.shape[-1]  # the mean is over (sample, channel) pairs
    loss = np.mean(1 - numerator / denominator)
    # d(1 - a / b)/dp = -(da/dp b - a db/dp) / b**2 with da/dp = 2 t and db/dp = 1.
    grad_p = -(2 * t * denominator - numerator) / (denominator * denominator) / pairs
    if sigmoid:
        return loss, grad_p * p * (1 - p)
    # Through the softmax: dz_c = p_c (g_c - sum_k g_k p_k).
    return loss, p * (grad_p - np.sum(grad_p * p, axis=-1, keepdims=True))


PLAIN = {"mse": _mse, "bce": _bce, "ce": _ce, "dice": _dice}


def value_and_gradient(loss: str, z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the loss ``loss`` of logits ``z`` against target ``t``, its gradient with respect to ``z``),
    channels last, in ``z``'s dtype; a sum of losses is the sum of its terms' values and gradients."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    parts = [PLAIN[term](z, t) for term in terms(loss)]
    value = sum(part[0] for part in parts)
    gradient = sum(part[1] for part in parts)
    return np.asarray(value, z.dtype), np.asarray(gradient, z.dtype)
