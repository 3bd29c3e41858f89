"""Attention U-Net in Keras 3 (ARCHITECTURE.md sections 1-3), NHWC activations and HWIO kernels.

Mirrors ``impl_torch/model.py`` class by class and uses only ``keras.layers`` and ``keras.ops``, so
the same model runs under the TensorFlow, JAX and PyTorch backends. Inputs and outputs are NHWC on
every backend; inside, the activations use the layout the backend's CPU convolutions prefer
(``default_data_format``). Every layer is *named* after
its attribute in the PyTorch module tree (``e1`` / ``conv`` / ``conv`` / ``0`` ...), so a variable's
path is the canonical module path plus its Keras leaf name (``attention_unet/e1/conv/conv/0/kernel``)
and the converter maps names mechanically (``impl_keras.io.keras_variables``).

``TorchAdam`` (at the end) is Keras' Adam with PyTorch's update, for training that must follow torch's.
"""

from __future__ import annotations

import functools
import warnings

import keras
import numpy as np
from keras import layers, ops

from weights_convert.core.spec import ModelConfig

PACKAGE = "attention_unet"

# torch's BatchNorm numerics are the contract. Keras' defaults differ: eps is 1e-3, and momentum
# weighs the *old* value (torch's momentum 0.1 is Keras' 0.9).
BN_EPS = 1e-5
BN_MOMENTUM = 0.9

# Keras' Conv2D default. ``impl_keras.io`` builds models whose values come from a checkpoint with
# "zeros" instead: under JAX a random initializer is compiled once per kernel shape (seconds each).
KERNEL_INITIALIZER = "glorot_uniform"


def serializable(cls):
    """Registered under one package name, so a saved ``.keras`` file loads with ``safe_mode`` on."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def check_backend_dtype(dtype: str) -> None:
    """JAX without x64 silently computes float64 in float32: refuse rather than mislead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX warns that it truncates the requested dtype
        available = keras.backend.standardize_dtype(ops.zeros((), dtype=dtype).dtype)
    if available != dtype:
        raise ValueError(
            f"{dtype} is not available under the {keras.backend.backend()} backend (it gives {available}); "
            "under JAX set JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True) first"
        )


def default_data_format() -> str:
    """The layout of the activations inside the model.

    Under the torch backend a channels_last Keras convolution copies its input to NCHW and back
    (40-60% slower than torch's own convolution on CPU), so the model computes in channels_first
    there; TensorFlow's CPU convolutions need channels_last, and XLA's are fastest with it.
    """
    return "channels_first" if keras.backend.backend() == "torch" else "channels_last"


def at_least_float32(dtype) -> str:
    """float64 and float32 as they are; bfloat16 and float16 as float32 (where the model and the
    loss compute what half precision would round away). Not ``keras.backend.result_type(dtype,
    "float32")``: under JAX and torch that gives float32 for float64 too."""
    dtype = keras.backend.standardize_dtype(dtype)
    return dtype if dtype in ("float32", "float64") else "float32"


def channel_axis(data_format: str) -> int:
    return 1 if data_format == "channels_first" else 3


def spatial_axes(data_format: str) -> tuple[int, int]:
    return (2, 3) if data_format == "channels_first" else (1, 2)


def build_shape(channels: int, data_format: str) -> tuple:
    """The build shape of a layer that sees ``channels`` channels at any batch size and resolution."""
    return (None, channels, None, None) if data_format == "channels_first" else (None, None, None, channels)


def with_channels(shape, channels: int, data_format: str) -> tuple:
    """``shape`` with its channel dimension set to ``channels`` (for ``compute_output_shape``)."""
    shape = list(shape)
    shape[channel_axis(data_format)] = channels
    return tuple(shape)


@serializable
class BatchNorm(layers.Layer):
    """BatchNorm over the channel (last) axis with PyTorch's numerics and state.

    ``keras.layers.BatchNormalization`` is not used: it updates the moving variance with the
    *biased* batch variance while torch stores the unbiased one (times n / (n - 1)), so the two
    drift apart after the first training step; and it has no ``num_batches_tracked``, which torch
    checkpoints carry and which is kept here (+1 per training-mode call) so conversion is lossless.

    Under a mixed policy (``"mixed_bfloat16"``) it computes as ``keras.layers.BatchNormalization``
    does: the input is upcast to float32 (``statistics_dtype``); batch statistics, normalization
    and running-statistic updates are float32, and only the output is cast back to the compute
    dtype. Its weights are created with ``autocast=False`` for that: inside a mixed layer's
    ``call``, Keras otherwise hands out autocast variables, bfloat16 copies of the float32 values,
    and ``variable.dtype`` itself reads "bfloat16".
    """

    def __init__(self, epsilon: float = BN_EPS, momentum: float = BN_MOMENTUM, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.momentum = momentum
        self.axis = axis

    def build(self, input_shape):
        self.axis = self.axis % len(input_shape)
        self.reduction_axes = tuple(i for i in range(len(input_shape)) if i != self.axis)
        self.broadcast_shape = tuple(-1 if i == self.axis else 1 for i in range(len(input_shape)))
        c = (input_shape[self.axis],)
        # Not autocast: a bfloat16 copy of gamma or the running statistics would round every use.
        weight = functools.partial(self.add_weight, shape=c, autocast=False)
        self.gamma = weight(initializer="ones", name="gamma")
        self.beta = weight(initializer="zeros", name="beta")
        self.moving_mean = weight(initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = weight(initializer="ones", trainable=False, name="moving_variance")
        # "int" is int64 where the backend has it (JAX without x64 has only int32); torch's is int64.
        self.num_batches_tracked = self.add_weight(
            shape=(), initializer="zeros", dtype="int", trainable=False, name="num_batches_tracked"
        )

    @property
    def statistics_dtype(self) -> str:
        """The dtype of every computation in ``call``: the compute dtype, or float32 for bfloat16
        and float16, as Keras' and torch's own BatchNorms do."""
        return at_least_float32(self.compute_dtype)

    def call(self, x, training=None):
        x = ops.cast(x, self.statistics_dtype)
        if training:
            mean, variance = self.batch_statistics(x)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        # torch's CPU kernel computes x * alpha + (beta - mean * alpha), alpha = gamma / sqrt(var + eps).
        alpha = self.gamma * ops.rsqrt(variance + self.constant(self.epsilon))
        shift = self.beta - mean * alpha
        if self.axis != len(self.broadcast_shape) - 1:
            alpha, shift = ops.reshape(alpha, self.broadcast_shape), ops.reshape(shift, self.broadcast_shape)
        return ops.cast(x * alpha + shift, self.compute_dtype)

    def batch_statistics(self, x):
        """Mean and biased variance of the batch (they normalize it); the running statistics get
        the unbiased variance, as torch's do."""
        shape = ops.shape(x)
        n = 1
        for i in self.reduction_axes:
            n = n * shape[i]
        if isinstance(n, int) and n < 2:
            raise ValueError(f"expected more than 1 value per channel when training, got input shape {tuple(shape)}")
        n = ops.cast(n, x.dtype)
        # sum / n, not ops.mean: under JAX, Keras' mean accumulates float64 input in float32.
        mean = ops.sum(x, axis=self.reduction_axes, keepdims=True) / n
        squares = ops.sum(ops.square(x - mean), axis=self.reduction_axes)
        mean = ops.reshape(mean, (-1,))
        variance = squares / n
        unbiased = squares / (n - 1)
        keep = self.constant(self.momentum)
        self.moving_mean.assign(self.moving_mean * keep + mean * (1 - keep))
        self.moving_variance.assign(self.moving_variance * keep + unbiased * (1 - keep))
        self.num_batches_tracked.assign(self.num_batches_tracked + 1)
        return mean, variance

    def constant(self, value: float):
        # A tensor of ``statistics_dtype``: a bare Python float meets a float64 tensor as a float32
        # under the torch backend (0.9 -> 0.89999998), which shows in a float64 comparison.
        return ops.convert_to_tensor(value, dtype=self.statistics_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "momentum": self.momentum, "axis": self.axis}


def batch_norm(name: str, dtype, data_format: str) -> BatchNorm:
    return BatchNorm(BN_EPS, BN_MOMENTUM, axis=channel_axis(data_format), name=name, dtype=dtype)


def conv2d(c_out: int, kernel_size: int, name: str, dtype, kernel_initializer, data_format: str) -> layers.Conv2D:
    # At stride 1, "same" for a 3x3 kernel is exactly the symmetric pad 1 of the contract.
    padding = "same" if kernel_size == 3 else "valid"
    return layers.Conv2D(
        c_out,
        kernel_size,
        padding=padding,
        data_format=data_format,
        kernel_initializer=kernel_initializer,
        name=name,
        dtype=dtype,
    )


@serializable
class ConvBlock(layers.Layer):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU (torch's ``nn.Sequential`` indices as names)."""

    def __init__(self, c_in, c_out, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.data_format = c_in, c_out, data_format
        dtype, init, fmt = self.dtype_policy, kernel_initializer, data_format
        self.conv = keras.Sequential(
            [
                conv2d(c_out, 3, "0", dtype, init, fmt),
                batch_norm("1", dtype, fmt),
                layers.ReLU(name="2", dtype=dtype),
                conv2d(c_out, 3, "3", dtype, init, fmt),
                batch_norm("4", dtype, fmt),
                layers.ReLU(name="5", dtype=dtype),
            ],
            name="conv",
        )

    def build(self, input_shape):
        self.conv.build(build_shape(self.c_in, self.data_format))

    def call(self, x, training=None):
        return self.conv(x, training=training)

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.c_out, self.data_format)

    def get_config(self):
        return {**super().get_config(), "c_in": self.c_in, "c_out": self.c_out, "data_format": self.data_format}


@serializable
class EncoderBlock(layers.Layer):
    """Conv block, then a 2x2 max pool (floor for odd sizes); returns (skip, pooled)."""

    def __init__(self, c_in, c_out, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.data_format = c_in, c_out, data_format
        dtype = self.dtype_policy
        self.conv = ConvBlock(c_in, c_out, kernel_initializer, data_format, name="conv", dtype=dtype)
        self.pool = layers.MaxPooling2D(pool_size=2, data_format=data_format, name="pool", dtype=dtype)

    def build(self, input_shape):
        self.conv.build(build_shape(self.c_in, self.data_format))
        self.pool.build(build_shape(self.c_out, self.data_format))

    def call(self, x, training=None):
        skip = self.conv(x, training=training)
        return skip, self.pool(skip)

    def compute_output_shape(self, input_shape):
        skip = with_channels(input_shape, self.c_out, self.data_format)
        pooled = list(skip)
        for axis in spatial_axes(self.data_format):
            pooled[axis] = None if skip[axis] is None else skip[axis] // 2
        return skip, tuple(pooled)

    def get_config(self):
        return {**super().get_config(), "c_in": self.c_in, "c_out": self.c_out, "data_format": self.data_format}


@serializable
class AttentionGate(layers.Layer):
    """Per-channel attention coefficients ``a`` from the gating signal g and the skip s; returns (a * s, a).

    ``output`` is a read-only property of every Keras layer, so that sub-layer is the attribute
    ``out``; its *name* stays ``output``, which is what variable paths (and the converter) use.
    """

    def __init__(self, c_g, c_s, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_g, self.c_s, self.data_format = c_g, c_s, data_format
        dtype, init, fmt = self.dtype_policy, kernel_initializer, data_format
        self.Wg = keras.Sequential([conv2d(c_s, 1, "0", dtype, init, fmt), batch_norm("1", dtype, fmt)], name="Wg")
        self.Ws = keras.Sequential([conv2d(c_s, 1, "0", dtype, init, fmt), batch_norm("1", dtype, fmt)], name="Ws")
        self.relu = layers.ReLU(name="relu", dtype=dtype)
        self.out = keras.Sequential(
            [conv2d(c_s, 1, "0", dtype, init, fmt), layers.Activation("sigmoid", name="1", dtype=dtype)],
            name="output",
        )

    def build(self, g_shape, s_shape):
        self.Wg.build(build_shape(self.c_g, self.data_format))
        self.Ws.build(build_shape(self.c_s, self.data_format))
        self.relu.build(build_shape(self.c_s, self.data_format))
        self.out.build(build_shape(self.c_s, self.data_format))

    def call(self, g, s, training=None):
        attention = self.out(self.relu(self.Wg(g, training=training) + self.Ws(s, training=training)))
        return attention * s, attention

    def compute_output_shape(self, g_shape, s_shape):
        gated = with_channels(s_shape, self.c_s, self.data_format)
        return gated, gated

    def get_config(self):
        return {**super().get_config(), "c_g": self.c_g, "c_s": self.c_s, "data_format": self.data_format}


@serializable
class Upsample2x(layers.Layer):
    """Bilinear x2 with align_corners=True: output i samples input i * (n - 1) / (2n - 1).

    ``keras.layers.UpSampling2D(interpolation="bilinear")`` and ``tf.image.resize`` sample at
    half-pixel centres ((i + 0.5) / 2 - 0.5): a different function. Separable: one linear
    interpolation along H, then one along W, with the sample positions and weights computed in
    the input's dtype as torch does, but at least in float32, as torch's kernel does for bfloat16
    input (its "opmath" type): bfloat16 positions (8 significant bits) would be off by up to half
    a pixel from n = 128 on. The result is rounded to the input's dtype once.
    """

    def __init__(self, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.data_format = data_format

    def call(self, x):
        shape = ops.shape(x)
        for axis in spatial_axes(self.data_format):
            x = interpolate_axis(x, axis, shape[axis])
        return x

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in spatial_axes(self.data_format):
            shape[axis] = None if shape[axis] is None else 2 * shape[axis]
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}


def interpolate_axis(x, axis: int, n):
    """Linear interpolation of ``x`` from ``n`` to ``2n`` samples along ``axis``, corners aligned;
    computed in float32 or float64, returned in ``x``'s dtype."""
    input_dtype = x.dtype
    dtype = at_least_float32(input_dtype)
    x = ops.cast(x, dtype)
    scale = ops.cast(n - 1, dtype) / ops.cast(2 * n - 1, dtype)
    position = ops.cast(ops.arange(2 * n), dtype) * scale
    lower = ops.floor(position)
    weight = position - lower
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, n - 1)
    broadcast = [1] * len(x.shape)
    broadcast[axis] = -1
    weight = ops.reshape(weight, broadcast)
    blended = ops.take(x, lower, axis=axis) * (1 - weight) + ops.take(x, upper, axis=axis) * weight
    return ops.cast(blended, input_dtype)


def pad_to(x, height, width, data_format="channels_last"):
    """Zero-pad H and W up to the skip's size: d // 2 before, the rest after."""
    shape = ops.shape(x)
    h_axis, w_axis = spatial_axes(data_format)
    dh, dw = height - shape[h_axis], width - shape[w_axis]
    if isinstance(dh, int) and isinstance(dw, int) and dh == 0 and dw == 0:
        return x
    pad = [[0, 0]] * 4
    pad[h_axis], pad[w_axis] = [dh // 2, dh - dh // 2], [dw // 2, dw - dw // 2]
    return ops.pad(x, pad)


@serializable
class DecoderBlock(layers.Layer):
    """Upsample x2, pad to the skip, gate the skip, concatenate, conv block."""

    def __init__(self, c_g, c_s, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_g, self.c_s, self.data_format = c_g, c_s, data_format
        dtype, init = self.dtype_policy, kernel_initializer
        self.up = Upsample2x(data_format, name="up", dtype=dtype)
        self.ag = AttentionGate(c_g, c_s, init, data_format, name="ag", dtype=dtype)
        self.c1 = ConvBlock(c_g + c_s, c_s, init, data_format, name="c1", dtype=dtype)

    def build(self, x_shape, skip_shape):
        self.up.build(build_shape(self.c_g, self.data_format))
        self.ag.build(build_shape(self.c_g, self.data_format), build_shape(self.c_s, self.data_format))
        self.c1.build(build_shape(self.c_g + self.c_s, self.data_format))

    def call(self, x, skip, training=None):
        skip_shape = ops.shape(skip)
        h_axis, w_axis = spatial_axes(self.data_format)
        x = pad_to(self.up(x), skip_shape[h_axis], skip_shape[w_axis], self.data_format)
        gated, attention = self.ag(x, skip, training=training)
        x = ops.concatenate([x, gated], axis=channel_axis(self.data_format))
        return self.c1(x, training=training), attention

    def compute_output_shape(self, x_shape, skip_shape):
        """The conv block's output and the attention map, both at the skip's size."""
        out = with_channels(skip_shape, self.c_s, self.data_format)
        return out, out

    def get_config(self):
        return {**super().get_config(), "c_g": self.c_g, "c_s": self.c_s, "data_format": self.data_format}


@serializable
class AttentionUNet(keras.Model):
    """Attention U-Net, NHWC in and out; returns logits. Built on construction (any batch size
    and resolution), so ``summary()`` and weight loading work before the first call.

    ``dtype`` is a Keras dtype policy ("float32" by default, "float64", ...). With
    ``"mixed_bfloat16"`` the variables (parameters and running statistics) are float32 and the
    convolutions and activations compute in bfloat16, Keras' own mixed precision: every layer
    casts its input and its autocast variables to bfloat16. The BatchNorms (as
    ``keras.layers.BatchNormalization`` does) and the bilinear upsampling (as torch's kernel does)
    compute in float32 and return bfloat16; running statistics are updated in float32. The logits
    are bfloat16: cast them to float32 before a loss. Two arguments only
    shape how the model computes, not what, so they are not part of ``get_config()`` (a model
    rebuilt from a config gets the defaults): ``kernel_initializer`` initializes every conv
    kernel before any weights are loaded; ``data_format`` is the layout inside the model
    (default: ``default_data_format()`` for the current backend); variables have the same shapes
    in both.

    The 1x1 head is the attribute ``head`` (``output`` is a read-only Keras property); its layer
    name is ``output``, as in the canonical tree.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        dtype=None,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format: str | None = None,
        **kwargs,
    ):
        config = ModelConfig(in_channels, out_channels, tuple(channels) if channels is not None else channels)
        if data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        super().__init__(dtype=dtype, **kwargs)
        check_backend_dtype(self.dtype_policy.variable_dtype)
        self.config = config
        self.data_format = fmt = data_format or default_data_format()
        c = config.channels
        depth = config.depth
        dtype, init = self.dtype_policy, kernel_initializer
        levels_in = (in_channels,) + c[:-2]
        for i in range(depth):
            setattr(self, f"e{i + 1}", EncoderBlock(levels_in[i], c[i], init, fmt, name=f"e{i + 1}", dtype=dtype))
        self.b1 = ConvBlock(c[-2], c[-1], init, fmt, name="b1", dtype=dtype)
        for j in range(depth):
            setattr(self, f"d{j + 1}", DecoderBlock(c[-1 - j], c[-2 - j], init, fmt, name=f"d{j + 1}", dtype=dtype))
        self.head = conv2d(out_channels, 1, "output", dtype, init, fmt)
        self.build((None, None, None, in_channels))

    @property
    def encoders(self) -> list[EncoderBlock]:
        return [getattr(self, f"e{i + 1}") for i in range(self.config.depth)]

    @property
    def decoders(self) -> list[DecoderBlock]:
        return [getattr(self, f"d{j + 1}") for j in range(self.config.depth)]

    def build(self, input_shape=None):
        if self.built:  # built in __init__; load_model calls build again with the saved build config
            return
        c, fmt = self.config.channels, self.data_format
        for encoder in self.encoders:
            encoder.build(build_shape(encoder.c_in, fmt))
        self.b1.build(build_shape(c[-2], fmt))
        for decoder in self.decoders:
            decoder.build(build_shape(decoder.c_g, fmt), build_shape(decoder.c_s, fmt))
        self.head.build(build_shape(c[0], fmt))

    def check_input(self, x) -> None:
        """Same checks and messages as the PyTorch model, in NHWC; unknown (symbolic) sizes pass."""
        cfg = self.config
        shape = tuple(x.shape) if hasattr(x, "shape") else tuple(ops.shape(x))
        expected = f"(N, H, W, {cfg.in_channels}) with H, W >= {cfg.min_size}"
        if len(shape) != 4:
            raise ValueError(f"expected input of shape {expected}, got a {len(shape)}-D tensor of shape {shape}")
        # Symbolic sizes (a traced or exported model's) are not checked: only known integers are.
        shape = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape)
        too_small = any(d is not None and d < cfg.min_size for d in shape[1:3])
        if shape[3] not in (None, cfg.in_channels) or too_small:
            raise ValueError(f"expected input of shape {expected}, got {shape}")

    def __call__(self, x, *args, **kwargs):
        # Checked before Keras' own __call__, which would wrap the message in several lines of context.
        self.check_input(x)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None, return_intermediates: bool = False):
        """Logits of shape (N, H, W, out_channels); with ``return_intermediates`` also a dict of
        every block's output (NHWC): ``e1``.. (skips), ``b1``, ``d1.ag`` (gate map), ``d1``.., ``output``."""
        named = {}
        skips = []
        x = self.to_internal(x)
        for i, encoder in enumerate(self.encoders):
            skip, x = encoder(x, training=training)
            skips.append(skip)
            named[f"e{i + 1}"] = skip
        x = self.b1(x, training=training)
        named["b1"] = x
        for j, decoder in enumerate(self.decoders):
            x, attention = decoder(x, skips[-1 - j], training=training)
            named[f"d{j + 1}.ag"] = attention
            named[f"d{j + 1}"] = x
        logits = self.to_nhwc(self.head(x))
        if not return_intermediates:
            return logits
        named = {name: self.to_nhwc(value) for name, value in named.items()}
        named["output"] = logits
        return logits, named

    def to_internal(self, x):
        return ops.transpose(x, (0, 3, 1, 2)) if self.data_format == "channels_first" else x

    def to_nhwc(self, x):
        return ops.transpose(x, (0, 2, 3, 1)) if self.data_format == "channels_first" else x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.config.out_channels)

    def get_config(self):
        return {**super().get_config(), **self.config.to_dict()}


@serializable
class TorchAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with PyTorch's update (``torch.optim.Adam``) at every step t = 1, 2, ...::

        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    Keras' own Adam adds eps to sqrt(v) *before* the bias correction,
    p -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps): a different update wherever eps
    is not negligible next to sqrt(v), and no single rescaled eps matches torch at every step.

    Same arguments, slots (``momentums``, ``velocities``; ``velocity_hats`` with amsgrad, which
    takes torch's max(v_hat, v) likewise) and state as ``keras.optimizers.Adam``. Keras'
    ``weight_decay`` is decoupled (AdamW's), torch Adam's is an L2 term in g: it is refused.
    """

    def __init__(self, *args, weight_decay=None, **kwargs):
        if weight_decay:
            raise ValueError(f"TorchAdam takes no weight_decay (torch Adam's is not Keras'), got {weight_decay!r}")
        super().__init__(*args, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype

        def constant(value):
            # Through a numpy float64: Keras' TensorFlow backend converts a bare Python float through a
            # float32 tensor (0.999 -> 0.99900001287 in float64, 1 - b2 off by 1.3e-5 relative).
            return ops.cast(np.float64(value), dtype)

        lr = ops.cast(learning_rate, dtype)
        g = ops.cast(gradient, dtype)
        t = ops.cast(self.iterations + 1, dtype)
        b1, b2, eps, one = constant(self.beta_1), constant(self.beta_2), constant(self.epsilon), constant(1)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        self.assign(m, b1 * m + (one - b1) * g)
        self.assign(v, b2 * v + (one - b2) * ops.square(g))
        if self.amsgrad:
            v_hat = self._velocity_hats[index]
            self.assign(v_hat, ops.maximum(v_hat, v))
            v = v_hat
        step_size = lr / (one - ops.power(b1, t))
        denominator = ops.sqrt(v) / ops.sqrt(one - ops.power(b2, t)) + eps
        self.assign_sub(variable, step_size * m / denominator)
