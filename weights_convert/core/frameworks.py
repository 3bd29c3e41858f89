"""The names every layer uses for what runs a model: frameworks, Keras backends, devices, and the
BatchNorm running statistics (the buffers a checkpoint carries besides the trainable parameters)."""

from __future__ import annotations

FRAMEWORKS = ("torch", "flax", "keras")
# Keras 3's backends, in the order ``import impl_keras`` picks an installed one without KERAS_BACKEND.
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
DEVICES = ("cpu", "gpu")
# BatchNorm's running statistics and counter, torch's names (the canonical ones): state, not parameters.
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer(name: str) -> bool:
    """Whether canonical tensor ``name`` is a BatchNorm running statistic (not a trainable parameter)."""
    return name.rsplit(".", 1)[-1] in BUFFERS


def check_choice(what: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; a ValueError naming ``what`` and the choices otherwise."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, got {value!r}")
    return value
