"""Bilinear (2D) and trilinear (3D) x2 upsampling with align_corners=True (ARCHITECTURE.md
section 3), written once for the Flax and the Keras model; imports nothing.

PyTorch has it built in (``F.interpolate(x, scale_factor=2.0, mode="bilinear"`` or ``"trilinear",
align_corners=True)``) and no other framework does: ``jax.image.resize``, ``keras.layers.UpSampling2D`` and
``tf.image.resize`` sample at half-pixel centres ((i + 0.5) / 2 - 0.5), a different function. Here,
as in torch's kernel, output i of 2n samples input position i * (n - 1) / (2n - 1), so the first
and last outputs are the input's edge samples: one linear interpolation along each spatial axis in
turn (H then W; D, H then W), which is the bilinear (trilinear) rule since it is separable.

``ops`` is ``keras.ops`` or a namespace with the same names over another array library
(``impl_flax.layers.JNP_OPS``, over ``jax.numpy``): ``arange``, ``cast``, ``floor``, ``minimum``,
``reshape``, ``shape``, ``take``. Nothing branches on a size, so a symbolic one (``jax.export``
shape polymorphism, a TensorFlow SavedModel's ``None``) flows through the same arithmetic.
"""

from __future__ import annotations


def upsample2x(ops, x, axes: tuple[int, ...], compute_dtype):
    """``x`` upsampled twice along every one of ``axes`` (its spatial axes), returned in ``x``'s dtype.

    Sample positions, weights and the blend are computed in ``compute_dtype``: the input's dtype,
    but at least float32, as torch's kernel does for bfloat16 input (its "opmath" type): bfloat16
    positions (8 significant bits) would be off by up to half a pixel from n = 128 on. The result
    is rounded to the input's dtype once."""
    dtype = x.dtype
    shape = ops.shape(x)
    x = ops.cast(x, compute_dtype)
    for axis in axes:
        x = interpolate_axis(ops, x, axis, shape[axis], compute_dtype)
    return ops.cast(x, dtype)


def interpolate_axis(ops, x, axis: int, n, dtype):
    """Linear interpolation of ``x`` from ``n`` to ``2n`` samples along ``axis``, corners aligned,
    in ``dtype`` (``x``'s own)."""
    scale = ops.cast(n - 1, dtype) / ops.cast(2 * n - 1, dtype)
    position = ops.cast(ops.arange(2 * n), dtype) * scale
    lower = ops.floor(position)
    weight = position - lower
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, n - 1)  # the last output sits on the last input: no row n
    broadcast = [1] * len(x.shape)
    broadcast[axis] = -1
    weight = ops.reshape(weight, broadcast)
    return ops.take(x, lower, axis=axis) * (1 - weight) + ops.take(x, upper, axis=axis) * weight
