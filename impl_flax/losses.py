"""The training losses of ``weights_convert.core.losses`` in JAX, on NHWC (NDHWC) logits and
one-hot targets: (logits, target) -> the loss. optax's binary and softmax cross-entropy
(``optax.sigmoid_binary_cross_entropy``, ``optax.softmax_cross_entropy``); Dice as the spec writes
it. ``impl_torch/losses.py`` and ``impl_keras/losses.py`` hold the same names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from weights_convert.core.losses import DICE_SMOOTH_DR, DICE_SMOOTH_NR, terms, uses_sigmoid

CHANNELS = -1  # the channel axis of NHWC (NDHWC)


def mse(output: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean((output - target) ** 2)


def bce(output: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(output, target))


def ce(output: jax.Array, target: jax.Array) -> jax.Array:
    # Per pixel over the channel axis, then the mean over pixels.
    return jnp.mean(optax.softmax_cross_entropy(output, target, axis=CHANNELS))


def dice(output: jax.Array, target: jax.Array) -> jax.Array:
    sigmoid = uses_sigmoid(output.shape[CHANNELS])
    probabilities = jax.nn.sigmoid(output) if sigmoid else jax.nn.softmax(output, axis=CHANNELS)
    spatial = tuple(range(1, output.ndim - 1))
    intersection = jnp.sum(probabilities * target, axis=spatial)  # (N, C)
    denominator = jnp.sum(probabilities, axis=spatial) + jnp.sum(target, axis=spatial) + DICE_SMOOTH_DR
    return jnp.mean(1 - (2 * intersection + DICE_SMOOTH_NR) / denominator)


PLAIN = {"mse": mse, "bce": bce, "ce": ce, "dice": dice}


def loss_value(name: str, output: jax.Array, target: jax.Array) -> jax.Array:
    """The loss ``name`` (a sum of ``PLAIN`` terms) of ``output`` against ``target``."""
    return sum(PLAIN[term](output, target) for term in terms(name))
