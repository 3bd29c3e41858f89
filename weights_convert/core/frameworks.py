"""The names every layer uses for what runs a model: frameworks, Keras backends, devices, and the
BatchNorm running statistics (the buffers a checkpoint carries besides the trainable parameters)."""

from __future__ import annotations

FRAMEWORKS = ("torch", "flax", "keras")
# Keras 3's backends, in the order ``import impl_keras`` picks an installed one without KERAS_BACKEND.
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
DEVICES = ("cpu", "gpu")
# BatchNorm's running statistics and counter, torch's names (the canonical ones): state, not parameters.
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
