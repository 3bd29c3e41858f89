"""The training losses of ``weights_convert.core.losses`` in Keras (``keras.ops``, every backend),
on NHWC (NDHWC) logits and one-hot targets: (logits, target) -> the loss. Keras' own binary and
categorical cross-entropy from logits (``ops.binary_crossentropy``, ``ops.categorical_crossentropy``);
Dice as the spec writes it. ``impl_torch/losses.py`` and ``impl_flax/losses.py`` hold the same
names.

Means are sums over a count, not ``ops.mean``: under JAX, Keras' mean accumulates float64 input in
float32."""

from __future__ import annotations

from keras import ops

from weights_convert.core.losses import DICE_SMOOTH_DR, DICE_SMOOTH_NR, terms, uses_sigmoid

CHANNELS = -1  # the channel axis of NHWC (NDHWC)


def _mean(values):
    return ops.sum(values) / ops.cast(ops.size(values), values.dtype)


def mse(output, target):
    return _mean(ops.square(output - target))


def bce(output, target):
    return _mean(ops.binary_crossentropy(target, output, from_logits=True))


def ce(output, target):
    # Per pixel over the channel axis, then the mean over pixels.
    return _mean(ops.categorical_crossentropy(target, output, from_logits=True, axis=CHANNELS))


def dice(output, target):
    sigmoid = uses_sigmoid(output.shape[CHANNELS])
    probabilities = ops.sigmoid(output) if sigmoid else ops.softmax(output, axis=CHANNELS)
    spatial = tuple(range(1, len(output.shape) - 1))
    intersection = ops.sum(probabilities * target, axis=spatial)  # (N, C)
    denominator = ops.sum(probabilities, axis=spatial) + ops.sum(target, axis=spatial) + DICE_SMOOTH_DR
    return _mean(1 - (2 * intersection + DICE_SMOOTH_NR) / denominator)


PLAIN = {"mse": mse, "bce": bce, "ce": ce, "dice": dice}


def loss_value(name: str, output, target):
    """The loss ``name`` (a sum of ``PLAIN`` terms) of ``output`` against ``target``."""
    return sum(PLAIN[term](output, target) for term in terms(name))
