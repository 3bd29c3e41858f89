"""Attention U-Net in Flax NNX, mirroring ``impl_torch/model.py`` class by class (ARCHITECTURE.md sections 1-3).

NHWC activations and HWIO kernels. The attribute tree is the torch module tree: an ``nn.Sequential``
becomes an ``nnx.List`` holding the same layers at the same indices (parameter-free activations
included), so ``e1.conv.conv.0.weight`` lives at the state path ``("e1", "conv", "conv", 0, "kernel")``;
``weights_convert.core.flax_layout.nnx_path`` is that rule.

Precision follows Flax's own layers: ``dtype`` is the compute dtype, ``param_dtype`` the dtype of the
parameters and BatchNorm statistics. float32 and float64 compute in their own dtype; mixed bfloat16
(``dtype=jnp.bfloat16`` with float32 parameters, or ``dtype="mixed_bfloat16"``, the name that
``impl_flax.load`` and ``from_checkpoint`` take too) keeps float32 parameters and computes convolutions
and activations in bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from weights_convert.core.spec import ModelConfig

# torch's BatchNorm contract (eps 1e-5, running average weight 0.1 on the new batch) in Flax's
# convention, where momentum is the weight kept on the old value: new = 0.9 * old + 0.1 * batch.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9

# The precisions a model can be built in, by name: (compute dtype, parameter dtype). "mixed_bfloat16"
# is Keras' name for the policy; in Flax terms it is dtype=bfloat16, param_dtype=float32.
PRECISIONS = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}
DTYPES = tuple(PRECISIONS)


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
    """BatchNorm over the channel (last) axis with torch's training semantics.

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


def conv(c_in: int, c_out: int, kernel_size: int, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
    # Explicit symmetric padding: 'SAME' is not torch's padding=1 for every kernel size.
    pad = kernel_size // 2
    return nnx.Conv(
        c_in,
        c_out,
        (kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,  # inputs and kernel are cast to it: bfloat16 convolutions under mixed precision
        param_dtype=param_dtype,
        rngs=rngs,
    )


def sequential(layers: nnx.List, x: jax.Array) -> jax.Array:
    for layer in layers:
        x = layer(x)
    return x


class ConvBlock(nnx.Module):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv = nnx.List(
            [
                conv(c_in, c_out, 3, **dtypes, rngs=rngs),
                BatchNorm(c_out, **dtypes),
                nnx.relu,
                conv(c_out, c_out, 3, **dtypes, rngs=rngs),
                BatchNorm(c_out, **dtypes),
                nnx.relu,
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return sequential(self.conv, x)


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, flooring odd sizes (torch's MaxPool2d(2))."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class EncoderBlock(nnx.Module):
    """Conv block, then a 2x2 max pool (floor for odd sizes); returns (skip, pooled)."""

    def __init__(self, c_in: int, c_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = ConvBlock(c_in, c_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pool = max_pool2x2

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        skip = self.conv(x)
        return skip, self.pool(skip)


class AttentionGate(nnx.Module):
    """Per-channel attention coefficients ``a`` from the gating signal g and the skip s; returns (a * s, a)."""

    def __init__(self, c_g: int, c_s: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.Wg = nnx.List([conv(c_g, c_s, 1, **dtypes, rngs=rngs), BatchNorm(c_s, **dtypes)])
        self.Ws = nnx.List([conv(c_s, c_s, 1, **dtypes, rngs=rngs), BatchNorm(c_s, **dtypes)])
        self.relu = nnx.relu
        self.output = nnx.List([conv(c_s, c_s, 1, **dtypes, rngs=rngs), nnx.sigmoid])

    def __call__(self, g: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        attention = sequential(self.output, self.relu(sequential(self.Wg, g) + sequential(self.Ws, s)))
        return attention * s, attention


def _interpolation_weights(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear x2 with align_corners=True along an axis of length n, in closed form.

    Output i samples input i * (n - 1) / (2n - 1): corners of input and output coincide
    (``jax.image.resize`` samples at half-pixel centres instead, a different function). Written
    out, output 2k samples k - k / (2n - 1) and output 2k + 1 samples k + (n - 1 - k) / (2n - 1),
    so every even output mixes rows k - 1 and k, every odd one rows k and k + 1: two shifted
    copies and a lerp, with exact rational weights, instead of a gather.
    """
    k = np.arange(n)
    return k / (2 * n - 1), (n - 1 - k) / (2 * n - 1)  # weight on row k - 1 (even), on row k + 1 (odd)


def _traced_interpolation_weights(n, dtype) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The weights of ``_interpolation_weights`` and their complements for a symbolic ``n`` (under
    ``jax.export`` with shape polymorphism), computed from the traced size.

    Each weight is one division of two exact integers, k / (2n - 1), (2n - 1 - k) / (2n - 1),
    (n - 1 - k) / (2n - 1) and (n + k) / (2n - 1), in at least float32, then cast to ``dtype``.
    XLA's float32 division is not always correctly rounded, so a weight may differ from the
    concrete path's by one ulp of float32: an exported graph's rounding, not its function."""
    wide = jnp.promote_types(dtype, jnp.float32)
    k = jnp.arange(n).astype(wide)
    size = jnp.asarray(n, wide)
    denominator = 2 * size - 1
    quotients = (k, denominator - k, size - 1 - k, size + k)
    return tuple((numerator / denominator).astype(dtype) for numerator in quotients)


def _is_concrete(size) -> bool:
    """Whether a dimension is a known integer (not a symbolic size of ``jax.export``)."""
    return isinstance(size, (int, np.integer))


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
    n = x.shape[axis]
    if _is_concrete(n):
        prev_weight, next_weight = _interpolation_weights(n)
        weights = (prev_weight, 1 - prev_weight, next_weight, 1 - next_weight)  # in float64, then cast
        weights = tuple(jnp.asarray(w, x.dtype) for w in weights)
    else:
        weights = _traced_interpolation_weights(n, x.dtype)
    w_prev, keep_even, w_next, keep_odd = (w.reshape([n if a == axis else 1 for a in range(x.ndim)]) for w in weights)
    rows = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
    # Rows k - 1 and k + 1, repeating the edge row where its weight is 0 (k = 0, k = n - 1).
    prev = jnp.concatenate([rows(0, 1), rows(0, n - 1)], axis=axis)
    next_ = jnp.concatenate([rows(1, n), rows(n - 1, n)], axis=axis)
    even = prev * w_prev + x * keep_even
    odd = x * keep_odd + next_ * w_next
    # Interleave: output 2k is even[k], output 2k + 1 is odd[k].
    return jnp.stack([even, odd], axis=axis + 1).reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1 :])


# jitted so that eager callers get one fused kernel per shape rather than a dozen array passes;
# inside an outer nnx.jit it is simply inlined.
@jax.jit
def upsample2x(x: jax.Array) -> jax.Array:
    """Bilinear x2 with align_corners=True on NHWC: output i samples input i * (n - 1) / (2n - 1)."""
    return _upsample_axis(_upsample_axis(x, 1), 2)


def pad_to(x: jax.Array, height: int, width: int) -> jax.Array:
    """Zero-pad H and W up to the skip's size: d // 2 before, the rest after.

    With symbolic sizes (``jax.export``) the pad widths are symbolic too, and it is always a pad."""
    dh, dw = height - x.shape[1], width - x.shape[2]
    if _is_concrete(dh) and _is_concrete(dw) and dh == 0 and dw == 0:
        return x
    no_pad = (0, 0, 0)
    widths = (no_pad, (dh // 2, dh - dh // 2, 0), (dw // 2, dw - dw // 2, 0), no_pad)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), widths)


class DecoderBlock(nnx.Module):
    """Upsample x2, pad to the skip, gate the skip, concatenate, conv block."""

    def __init__(self, c_g: int, c_s: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.ag = AttentionGate(c_g, c_s, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c1 = ConvBlock(c_g + c_s, c_s, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = pad_to(upsample2x(x), skip.shape[1], skip.shape[2])
        gated, attention = self.ag(x, skip)
        return self.c1(jnp.concatenate([x, gated], axis=-1)), attention


class AttentionUNet(nnx.Module):
    """Attention U-Net, NHWC in and out; returns logits. Starts in training mode, as torch modules
    do: ``model.eval()`` switches every BatchNorm to its running statistics, ``model.train()`` back.

    ``dtype`` is the compute dtype and ``param_dtype`` the dtype of the parameters and BatchNorm
    statistics, as in Flax's own layers; ``param_dtype`` defaults to ``dtype`` for float32 and float64.
    Mixed precision is ``dtype=jnp.bfloat16`` (``param_dtype`` then defaults to float32, the only one
    allowed), or ``dtype="mixed_bfloat16"``: convolutions, activations, the upsampling and the gates
    compute in bfloat16 and the logits are bfloat16; BatchNorm computes its batch statistics and the
    normalization in float32 (output bfloat16) and updates float32 running statistics; gradients and
    optimizer updates are float32 (cast the logits to float32 before the loss).
    ``impl_flax.load(path, dtype="mixed_bfloat16")`` builds the same model from a file, and
    ``impl_flax.to_checkpoint`` of it gives float32 tensors.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        *,
        dtype=jnp.float32,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.config = ModelConfig(in_channels, out_channels, tuple(channels))
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        c = self.config.channels
        depth = self.config.depth
        levels_in = (in_channels,) + c[:-2]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        for i in range(depth):
            setattr(self, f"e{i + 1}", EncoderBlock(levels_in[i], c[i], **kw))
        self.b1 = ConvBlock(c[-2], c[-1], **kw)
        for j in range(depth):
            setattr(self, f"d{j + 1}", DecoderBlock(c[-1 - j], c[-2 - j], **kw))
        self.output = conv(c[0], out_channels, 1, **kw)

    @property
    def encoders(self) -> list[EncoderBlock]:
        return [getattr(self, f"e{i + 1}") for i in range(self.config.depth)]

    @property
    def decoders(self) -> list[DecoderBlock]:
        return [getattr(self, f"d{j + 1}") for j in range(self.config.depth)]

    @property
    def block_names(self) -> list[str]:
        """The keys of ``return_intermediates``, in computation order (``jax.jit`` returns dicts with
        sorted keys, so jitted callers restore the order from here)."""
        return self.config.block_names

    def check_input(self, x) -> None:
        cfg = self.config
        expected = f"(N, H, W, {cfg.in_channels}) with H, W >= {cfg.min_size}"
        shape = tuple(np.shape(x))
        if len(shape) != 4:
            raise ValueError(f"expected input of shape {expected}, got a {len(shape)}-D array of shape {shape}")
        # Symbolic sizes (``jax.export`` with shape polymorphism) are not checked here.
        too_small = any(_is_concrete(d) and d < cfg.min_size for d in shape[1:3])
        if (_is_concrete(shape[3]) and shape[3] != cfg.in_channels) or too_small:
            raise ValueError(f"expected input of shape {expected}, got {shape}")

    def __call__(self, x: jax.Array, return_intermediates: bool = False):
        """Logits of shape (N, H, W, out_channels); with ``return_intermediates`` also a dict of
        every block's output (NHWC): ``e1``.. (skips), ``b1``, ``d1.ag`` (gate map), ``d1``.., ``output``."""
        self.check_input(x)
        x = jnp.asarray(x, self.dtype)
        named: dict[str, jax.Array] = {}
        skips = []
        for i, encoder in enumerate(self.encoders):
            skip, x = encoder(x)
            skips.append(skip)
            named[f"e{i + 1}"] = skip
        x = self.b1(x)
        named["b1"] = x
        for j, decoder in enumerate(self.decoders):
            x, attention = decoder(x, skips[-1 - j])
            named[f"d{j + 1}.ag"] = attention
            named[f"d{j + 1}"] = x
        logits = self.output(x)
        named["output"] = logits
        return (logits, named) if return_intermediates else logits
