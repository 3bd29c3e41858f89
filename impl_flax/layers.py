"""The layers of the Flax model where Flax's defaults are not the contract (ARCHITECTURE.md
section 3): BatchNorm with torch's semantics, explicit conv padding, max pooling that floors odd
sizes, the bilinear (trilinear) x2 upsampling with aligned corners and the zero padding to the
skip, each for 2D and 3D (``dims``, the config's ``spatial_dims``); and the precision rule
(compute dtype, parameter dtype) every layer is built with. For MONAI's AttentionUnet (section 1b):
strided convolutions, PyTorch's transposed convolution, InstanceNorm, PReLU and Dropout.

Activations are NHWC or NDHWC: the channel axis is last, the spatial axes are all those between
the batch and the channels, so every layer but ``conv`` takes its rank from its input.
``impl_torch/layers.py`` and ``impl_keras/layers.py`` hold the same names.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from weights_convert.core import precisions as core_precisions
from weights_convert.core import upsampling

# torch's BatchNorm contract (eps 1e-5, running average weight 0.1 on the new batch) in Flax's
# convention, where momentum is the weight kept on the old value: new = 0.9 * old + 0.1 * batch.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9

# The precisions a model can be built in (``weights_convert.core.precisions``), by name: (compute
# dtype, parameter dtype). "mixed_bfloat16" is in Flax terms dtype=bfloat16, param_dtype=float32.
PRECISIONS = {
    name: (core_precisions.PRECISIONS[name].compute_dtype, core_precisions.param_dtype(name))
    for name in core_precisions.DTYPES
}
DTYPES = core_precisions.DTYPES


def _dtype_name(dtype) -> str | None:
    try:
        return np.dtype(dtype).name  # numpy, jnp and ml_dtypes types, and their names
    except TypeError:
        return None


def resolve_dtypes(dtype, param_dtype=None) -> tuple[np.dtype, np.dtype]:
    """(compute dtype, parameter dtype) for a model; float64 only when JAX's 64-bit mode is already on.

    ``dtype`` is a name of ``DTYPES`` or a dtype (float32, float64, bfloat16). ``param_dtype`` defaults
    to ``dtype`` for float32 and float64, and to float32 for bfloat16 (Flax's default): bfloat16 is a
    compute dtype only, never a parameter dtype, because optimizer updates and BatchNorm running
    statistics lose most of their digits in it. Without x64, JAX silently computes a requested float64
    in float32, so that is refused instead of returning float32 results labelled float64; this never
    switches x64 on itself.
    """
    if isinstance(dtype, str) and dtype in PRECISIONS:
        compute, default_param = PRECISIONS[dtype]
    else:
        compute = _dtype_name(dtype)
        if compute not in ("float32", "float64", "bfloat16"):
            raise ValueError(f"dtype must be one of {list(DTYPES)} or jnp.bfloat16, got {dtype!r}")
        default_param = "float32" if compute == "bfloat16" else compute
    param = default_param if param_dtype is None else _dtype_name(param_dtype)
    if compute == "bfloat16" and param != "float32":
        raise ValueError(f"bfloat16 computes with float32 parameters only (mixed precision), got {param_dtype!r}")
    if compute != "bfloat16" and param != compute:
        raise ValueError(f"dtype {compute} needs param_dtype {compute} (or None), got {param_dtype!r}")
    if compute == "float64" and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype float64 needs JAX's 64-bit mode, which is off: call jax.config.update('jax_enable_x64', True) "
            "first or work inside `with jax.enable_x64(True):`"
        )
    return np.dtype(compute), np.dtype(param)


def check_dtype(dtype, param_dtype=None) -> np.dtype:
    """The compute dtype of ``resolve_dtypes``, after checking the pair."""
    return resolve_dtypes(dtype, param_dtype)[0]


class BatchNorm(nnx.Module):
    """BatchNorm over the channel (last) axis with torch's training semantics: the statistics are
    over the batch and every spatial axis (BatchNorm2d on NHWC, BatchNorm3d on NDHWC).

    ``nnx.BatchNorm`` cannot be used: it stores the biased batch variance in the running variance,
    while torch stores the unbiased one (times n / (n - 1)), so the two drift apart after the first
    training step; it also has no ``num_batches_tracked`` counter, and by default computes the
    variance as E[x^2] - E[x]^2, which cancels digits. This layer normalizes with the biased
    variance of the centred batch (as torch does), stores the unbiased one, and keeps the counter
    so that checkpoints round-trip.

    Precision as in ``nnx.BatchNorm``: scale, bias and running statistics are ``param_dtype``; the
    batch statistics and the normalization are computed in at least float32 (a bfloat16 input is
    widened first: its 8-bit mantissa cannot hold a mean over thousands of values), and the output
    is cast to the compute ``dtype``.
    """

    def __init__(self, num_features: int, *, dtype=jnp.float32, param_dtype=None, use_running_average: bool = False):
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        self.scale = nnx.Param(jnp.ones((num_features,), self.param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), self.param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), self.param_dtype))
        self.var = nnx.BatchStat(jnp.ones((num_features,), self.param_dtype))
        # The default integer type: int64 under x64, int32 otherwise (2**31 steps is plenty).
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), int))
        self.use_running_average = use_running_average
        self.momentum = BN_MOMENTUM
        self.epsilon = BN_EPS

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.promote_types(self.param_dtype, jnp.float32))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            n = x.size // x.shape[-1]
            if n < 2:
                # torch refuses too: one value per channel has no variance.
                raise ValueError(f"expected more than 1 value per channel when training, got input shape {x.shape}")
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            stop = jax.lax.stop_gradient
            m = self.momentum
            self.mean[...] = stop(m * self.mean[...] + (1 - m) * mean)
            # torch keeps the unbiased variance in the running average; it normalizes with the biased one.
            self.var[...] = stop(m * self.var[...] + (1 - m) * var * (n / (n - 1)))
            self.num_batches_tracked[...] += 1
        # Folded into one multiply-add per element, as torch's CPU kernel does.
        alpha = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
        return jnp.asarray(x * alpha + (self.bias[...] - mean * alpha), self.dtype)


class Conv(nnx.Conv):
    """``nnx.Conv`` whose bias is added in at least float32 and the sum rounded once to the compute
    dtype. Under mixed bfloat16, nnx.Conv adds a bfloat16 bias, so the bias's gradient, a sum over
    every position of the batch, would accumulate in bfloat16 (8 significant bits: a volume's
    thousands of terms drift by tens of percent); here it accumulates in float32, as torch's
    autocast convolutions and the NumPy reference do. Same variables (``kernel``, ``bias``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, promote_dtype=_promote_keeping_bias, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.asarray(super().__call__(x), self.dtype)


def _promote_keeping_bias(args, /, *, dtype=None, inexact=True):
    """nnx.Conv's cast of (inputs, kernel, bias): inputs and kernel to the compute ``dtype``, the
    bias to at least float32."""
    inputs, kernel, bias = args
    inputs, kernel = promote_dtype((inputs, kernel), dtype=dtype, inexact=inexact)
    return inputs, kernel, None if bias is None else jnp.asarray(bias, jnp.promote_types(bias.dtype, jnp.float32))


def conv(c_in: int, c_out: int, kernel_size: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> Conv:
    """A ``kernel_size`` convolution along each of ``dims`` spatial axes (3x3 or 3x3x3, 1x1 or 1x1x1)."""
    return strided_conv(c_in, c_out, (kernel_size,) * dims, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def strided_conv(
    c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
) -> Conv:
    """A convolution of odd ``kernel`` (one side per spatial axis) and ``stride`` on every axis, zero
    padded by (k - 1) / 2 on each side of each axis: torch's ``padding=k // 2`` (MONAI's, section 1b)."""
    # Explicit symmetric padding: 'SAME' is not torch's for every kernel size and stride (for a
    # stride of 2 on an even side it pads 0 before and 1 after, shifting the output by one pixel).
    return Conv(
        c_in,
        c_out,
        tuple(kernel),
        strides=(stride,) * len(kernel),
        padding=tuple((k // 2, k // 2) for k in kernel),
        dtype=dtype,  # inputs and kernel are cast to it: bfloat16 convolutions under mixed precision
        param_dtype=param_dtype,
        rngs=rngs,
    )


# The layout strings of lax.conv_general_dilated, channels last, by the number of spatial axes.
CONV_DIMENSIONS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


class ConvTranspose(nnx.Module):
    """torch's ``ConvTranspose(c_in, c_out, kernel, stride, padding=(k - 1) / 2,
    output_padding=stride - 1)`` with a bias, channels last: a side of n becomes exactly n * stride
    (MONAI's upsampling, ARCHITECTURE.md section 1b).

    Written as the contract states it: the full ('VALID') transposed convolution, whose (n - 1) * s + k
    rows hold every position an input scatters onto, then its rows [p : p + n * s] on each axis
    (p = (k - 1) / 2), with zeros past its end where it is shorter (s > p + 1: k = 1 and s = 2, k = 3
    and s = 3); never 'SAME', which for k = 3, s = 2 starts one row later than torch. The kernel is
    ``kernel`` of shape (*k, out, in): torch's (in, out, *k) under ``layouts.oihw_to_hwio``, the layout
    of Keras' ConvTranspose kernels. The bias is added in at least float32, as in ``Conv``, after the
    slice (so the zero rows carry it too, as in torch)."""

    def __init__(
        self, c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        self.kernel_size, self.stride = tuple(kernel), stride
        # nnx.ConvTranspose's initialisation: lecun_normal with fan_in = c_in * prod(kernel).
        init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        self.kernel = nnx.Param(init(rngs.params(), (*self.kernel_size, c_out, c_in), self.param_dtype))
        self.bias = nnx.Param(jnp.zeros((c_out,), self.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        dims, s = len(self.kernel_size), self.stride
        spatial = tuple(range(dims))
        # A scatter of torch's weight is a gather over the input dilated by s (s - 1 zeros between
        # values) and zero padded by k - 1 on each side, with the kernel flipped along each spatial
        # axis and its channels swapped to (*k, in, out).
        gather_kernel = jnp.swapaxes(jnp.flip(kernel, axis=spatial), -1, -2)
        full = jax.lax.conv_general_dilated(
            x,
            gather_kernel,
            window_strides=(1,) * dims,
            padding=[(k - 1, k - 1) for k in self.kernel_size],
            lhs_dilation=(s,) * dims,
            dimension_numbers=CONV_DIMENSIONS[dims],
        )
        # Rows [p : p + n * s] of the full (n - 1) * s + k: drop p before and keep n * s, which ends
        # s - 1 - p rows past the full output (zeros) or p + 1 - s rows before its end (dropped). As
        # one lax.pad: a negative width removes rows, a positive one appends zeros.
        widths = [(0, 0, 0), *((-(k // 2), s - 1 - k // 2, 0) for k in self.kernel_size), (0, 0, 0)]
        y = jax.lax.pad(full, jnp.zeros((), full.dtype), widths)
        bias = jnp.asarray(self.bias[...], jnp.promote_types(self.bias.dtype, jnp.float32))
        return jnp.asarray(y + bias, self.dtype)


def conv_transpose(
    c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
) -> ConvTranspose:
    """MONAI's upsampling (``impl_torch.layers.conv_transpose``): each side times ``stride``."""
    return ConvTranspose(c_in, c_out, kernel, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class InstanceNorm(nnx.Module):
    """torch's ``InstanceNorm(affine=False, track_running_stats=False)``, channels last: each sample
    and channel normalized by its own mean and biased variance over the spatial axes (eps 1e-5);
    nothing learned, nothing tracked, the same in train and eval mode (MONAI's merge). Computed in at
    least float32 (a bfloat16 input is widened first, as in ``BatchNorm``), returned in ``dtype``."""

    def __init__(self, *, dtype=jnp.float32, param_dtype=None):
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        self.epsilon = BN_EPS

    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = x.shape[1:-1]
        if all(_is_concrete(side) for side in spatial) and np.prod(spatial) == 1:
            # torch refuses too: one value has no variance.
            raise ValueError(f"expected more than 1 spatial element for InstanceNorm, got input shape {x.shape}")
        x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
        axes = tuple(range(1, x.ndim - 1))
        mean = jnp.mean(x, axis=axes, keepdims=True)
        centred = x - mean
        var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
        return jnp.asarray(centred * jax.lax.rsqrt(var + self.epsilon), self.dtype)


class PReLU(nnx.Module):
    """torch's ``nn.PReLU()``: one learned slope ``a`` for every channel (``negative_slope``, shape
    (1,), initially 0.25), ``x if x > 0 else a * x``; computed in the compute dtype."""

    def __init__(self, *, dtype=jnp.float32, param_dtype=None):
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        self.negative_slope = nnx.Param(jnp.full((1,), 0.25, self.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        return jnp.where(x > 0, x, jnp.asarray(self.negative_slope[...], self.dtype) * x)


class Dropout(nnx.Dropout):
    """torch's ``nn.Dropout(rate)``: in train mode each element is zeroed with probability ``rate``
    and the rest scaled by 1 / (1 - rate), in eval mode (``deterministic``) the identity. The mask
    comes from the ``dropout`` stream of ``rngs`` (its ``default`` one when it has none), forked
    into this layer's state; a rate of 0 is the identity in either mode and holds no stream, so the
    state of a model without dropout is its parameters and statistics alone. Starts in train mode,
    as torch modules do."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs):
        super().__init__(rate, rngs=rngs if rate > 0 else None)


def sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    """torch's ``nn.Sequential`` call: an ``nnx.List`` keeps the layers at torch's indices (so the
    state paths are the canonical names) but is not callable itself."""
    for layer in layers:
        x = layer(x)
    return x


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 (2x2x2) max pool, stride 2, flooring odd sizes (torch's MaxPool2d(2), MaxPool3d(2)) on
    NHWC (NDHWC): the odd last slice of every spatial axis is dropped first, so the reshape holds
    with symbolic sizes too. Each spatial side ``s`` is split into (s // 2, 2) and the 2s reduced."""
    n, *sides, c = x.shape
    halves = [side // 2 for side in sides]
    x = x[(slice(None), *(slice(None, half * 2) for half in halves))]
    windows = [size for half in halves for size in (half, 2)]
    window_axes = tuple(range(2, 2 + 2 * len(sides), 2))
    return jnp.max(x.reshape(n, *windows, c), axis=window_axes)


# The keras.ops names the shared upsampling rule (weights_convert.core.upsampling) calls, over jax.numpy.
JNP_OPS = types.SimpleNamespace(
    arange=jnp.arange,
    cast=lambda x, dtype: jnp.asarray(x, dtype),
    floor=jnp.floor,
    minimum=jnp.minimum,
    reshape=jnp.reshape,
    shape=jnp.shape,
    take=jnp.take,
)


# jitted so that eager callers get one fused kernel per shape rather than a dozen array passes;
# inside an outer nnx.jit it is simply inlined.
@jax.jit
def upsample2x(x: jax.Array) -> jax.Array:
    """Bilinear (trilinear) x2 with align_corners=True on NHWC (NDHWC): along each spatial axis,
    output i samples input i * (n - 1) / (2n - 1).

    ``jax.image.resize`` samples at half-pixel centres instead, a different function; the rule is
    ``weights_convert.core.upsampling``'s, the Keras model's too: one linear interpolation along
    each spatial axis in turn (trilinear is three of them, torch's one kernel to rounding).
    Computed in at least float32, as torch's kernel does for bfloat16 input, and returned in
    ``x``'s dtype."""
    spatial_axes = tuple(range(1, x.ndim - 1))
    return upsampling.upsample2x(JNP_OPS, x, spatial_axes, jnp.promote_types(x.dtype, jnp.float32))


def _is_concrete(size) -> bool:
    """Whether a dimension is a known integer (not a symbolic size of ``jax.export``)."""
    return isinstance(size, (int, np.integer))


def pad_to(x: jax.Array, skip: jax.Array) -> jax.Array:
    """Zero-pad every spatial axis of ``x`` (NHWC, NDHWC) up to the skip's size: d // 2 before, the
    rest after.

    With symbolic sizes (``jax.export``) the pad widths are symbolic too, and it is always a pad."""
    differences = [target - side for target, side in zip(skip.shape[1:-1], x.shape[1:-1], strict=True)]
    if all(_is_concrete(d) and d == 0 for d in differences):
        return x
    no_pad = (0, 0, 0)
    widths = (no_pad, *((d // 2, d - d // 2, 0) for d in differences), no_pad)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), widths)
