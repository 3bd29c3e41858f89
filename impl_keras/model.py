"""Attention U-Net in Keras 3 (ARCHITECTURE.md sections 1-3), 2D (NHWC, HWIO kernels) or 3D with
``spatial_dims=3`` (NDHWC, DHWIO kernels).

Mirrors ``impl_torch/model.py`` class by class and uses only ``keras.layers`` and ``keras.ops``, so
the same model runs under the TensorFlow, JAX and PyTorch backends. Inputs and outputs are
channels last (NHWC or NDHWC) on every backend; inside, the activations use the layout the
backend's CPU convolutions prefer (``default_data_format``). Every layer is *named* after its
attribute in the PyTorch module tree (``e1`` / ``conv`` / ``conv`` / ``0`` ...), so a variable's
path is the canonical module path plus its Keras leaf name (``attention_unet/e1/conv/conv/0/kernel``)
and the converter maps names mechanically (``impl_keras.io.keras_variables``).

The layers whose numerics the contract pins (BatchNorm, conv padding, pooling, upsampling, padding to
the skip) and the layout helpers are in ``impl_keras/layers.py``; the input check is
``core.spec.check_input_shape``. ``TorchAdam`` lives in ``impl_keras/training.py``.
"""

from __future__ import annotations

import keras
from keras import layers, ops

# at_least_float32 and serializable: impl_keras.steps and impl_keras.training import them from here.
from impl_keras.layers import (
    KERNEL_INITIALIZER,
    Upsample2x,
    batch_norm,
    build_shape,
    channel_axis,
    check_backend_dtype,
    conv,
    default_data_format,
    max_pool2x2,
    pad_to,
    serializable,
    spatial_axes,
    to_channels_last,
    to_internal,
    with_channels,
)
from impl_keras.layers import at_least_float32 as at_least_float32
from weights_convert.core.spec import ModelConfig, check_input_shape


@serializable
class ConvBlock(layers.Layer):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU (3x3x3 convs in 3D; torch's ``nn.Sequential``
    indices as names)."""

    def __init__(
        self, c_in, c_out, dims=2, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs
    ):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.dims, self.data_format = c_in, c_out, dims, data_format
        dtype, init, fmt = self.dtype_policy, kernel_initializer, data_format
        self.conv = keras.Sequential(
            [
                conv(c_out, 3, "0", dtype, init, fmt, dims),
                batch_norm("1", dtype, fmt, dims),
                layers.ReLU(name="2", dtype=dtype),
                conv(c_out, 3, "3", dtype, init, fmt, dims),
                batch_norm("4", dtype, fmt, dims),
                layers.ReLU(name="5", dtype=dtype),
            ],
            name="conv",
        )

    def build(self, input_shape):
        self.conv.build(build_shape(self.c_in, self.data_format, self.dims))

    def call(self, x, training=None):
        return self.conv(x, training=training)

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.c_out, self.data_format)

    def get_config(self):
        return {
            **super().get_config(),
            "c_in": self.c_in,
            "c_out": self.c_out,
            "dims": self.dims,
            "data_format": self.data_format,
        }


@serializable
class EncoderBlock(layers.Layer):
    """Conv block, then a 2x2 (2x2x2) max pool (floor for odd sizes); returns (skip, pooled)."""

    def __init__(
        self, c_in, c_out, dims=2, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs
    ):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.dims, self.data_format = c_in, c_out, dims, data_format
        dtype = self.dtype_policy
        self.conv = ConvBlock(c_in, c_out, dims, kernel_initializer, data_format, name="conv", dtype=dtype)
        self.pool = max_pool2x2("pool", dtype, data_format)

    def build(self, input_shape):
        self.conv.build(build_shape(self.c_in, self.data_format, self.dims))
        self.pool.build(build_shape(self.c_out, self.data_format, self.dims))

    def call(self, x, training=None):
        skip = self.conv(x, training=training)
        return skip, self.pool(skip)

    def compute_output_shape(self, input_shape):
        skip = with_channels(input_shape, self.c_out, self.data_format)
        return skip, self.pool.compute_output_shape(skip)

    def get_config(self):
        return {
            **super().get_config(),
            "c_in": self.c_in,
            "c_out": self.c_out,
            "dims": self.dims,
            "data_format": self.data_format,
        }


@serializable
class AttentionGate(layers.Layer):
    """Per-channel attention coefficients ``a`` from the gating signal g and the skip s; returns (a * s, a).

    ``output`` is a read-only property of every Keras layer, so that sub-layer is the attribute
    ``out``; its *name* stays ``output``, which is what variable paths (and the converter) use.
    """

    def __init__(self, c_g, c_s, dims=2, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_g, self.c_s, self.dims, self.data_format = c_g, c_s, dims, data_format
        dtype, init, fmt = self.dtype_policy, kernel_initializer, data_format

        def conv_bn(name):  # a 1x1 (1x1x1) conv and its BatchNorm
            return keras.Sequential(
                [conv(c_s, 1, "0", dtype, init, fmt, dims), batch_norm("1", dtype, fmt, dims)], name=name
            )

        self.Wg = conv_bn("Wg")
        self.Ws = conv_bn("Ws")
        self.relu = layers.ReLU(name="relu", dtype=dtype)
        self.out = keras.Sequential(
            [conv(c_s, 1, "0", dtype, init, fmt, dims), layers.Activation("sigmoid", name="1", dtype=dtype)],
            name="output",
        )

    def build(self, g_shape, s_shape):
        fmt, dims = self.data_format, self.dims
        self.Wg.build(build_shape(self.c_g, fmt, dims))
        self.Ws.build(build_shape(self.c_s, fmt, dims))
        self.relu.build(build_shape(self.c_s, fmt, dims))
        self.out.build(build_shape(self.c_s, fmt, dims))

    def call(self, g, s, training=None):
        attention = self.out(self.relu(self.Wg(g, training=training) + self.Ws(s, training=training)))
        return attention * s, attention

    def compute_output_shape(self, g_shape, s_shape):
        gated = with_channels(s_shape, self.c_s, self.data_format)
        return gated, gated

    def get_config(self):
        return {
            **super().get_config(),
            "c_g": self.c_g,
            "c_s": self.c_s,
            "dims": self.dims,
            "data_format": self.data_format,
        }


@serializable
class DecoderBlock(layers.Layer):
    """Upsample x2, pad to the skip, gate the skip, concatenate, conv block."""

    def __init__(self, c_g, c_s, dims=2, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.c_g, self.c_s, self.dims, self.data_format = c_g, c_s, dims, data_format
        dtype, init = self.dtype_policy, kernel_initializer
        self.up = Upsample2x(data_format, name="up", dtype=dtype)
        self.ag = AttentionGate(c_g, c_s, dims, init, data_format, name="ag", dtype=dtype)
        self.c1 = ConvBlock(c_g + c_s, c_s, dims, init, data_format, name="c1", dtype=dtype)

    def build(self, x_shape, skip_shape):
        fmt, dims = self.data_format, self.dims
        self.up.build(build_shape(self.c_g, fmt, dims))
        self.ag.build(build_shape(self.c_g, fmt, dims), build_shape(self.c_s, fmt, dims))
        self.c1.build(build_shape(self.c_g + self.c_s, fmt, dims))

    def call(self, x, skip, training=None):
        skip_shape = ops.shape(skip)
        skip_sizes = [skip_shape[axis] for axis in spatial_axes(self.data_format, self.dims)]
        x = pad_to(self.up(x), skip_sizes, self.data_format)
        gated, attention = self.ag(x, skip, training=training)
        x = ops.concatenate([x, gated], axis=channel_axis(self.data_format, self.dims))
        return self.c1(x, training=training), attention

    def compute_output_shape(self, x_shape, skip_shape):
        """The conv block's output and the attention map, both at the skip's size."""
        out = with_channels(skip_shape, self.c_s, self.data_format)
        return out, out

    def get_config(self):
        return {
            **super().get_config(),
            "c_g": self.c_g,
            "c_s": self.c_s,
            "dims": self.dims,
            "data_format": self.data_format,
        }


@serializable
class AttentionUNet(keras.Model):
    """Attention U-Net, NHWC in and out (NDHWC with ``spatial_dims=3``); returns logits. Built on
    construction (any batch size and resolution), so ``summary()`` and weight loading work before
    the first call.

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
        spatial_dims: int = 2,
        dtype=None,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format: str | None = None,
        architecture: str = ModelConfig.architecture,
        **kwargs,
    ):
        # ``architecture`` is part of ``get_config()`` (the config's ``to_dict``), so a model rebuilt
        # from its config passes it back; only this network's own is taken.
        config = ModelConfig.from_dict(
            {
                "architecture": architecture,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "channels": tuple(channels) if channels is not None else channels,
                "spatial_dims": spatial_dims,
            }
        )
        if data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        super().__init__(dtype=dtype, **kwargs)
        check_backend_dtype(self.dtype_policy.variable_dtype)
        self.config = config
        self.data_format = fmt = data_format or default_data_format()
        c, dims = config.channels, config.spatial_dims
        depth = config.depth
        dtype, init = self.dtype_policy, kernel_initializer
        levels_in = (in_channels,) + c[:-2]
        for i in range(depth):
            encoder = EncoderBlock(levels_in[i], c[i], dims, init, fmt, name=f"e{i + 1}", dtype=dtype)
            setattr(self, f"e{i + 1}", encoder)
        self.b1 = ConvBlock(c[-2], c[-1], dims, init, fmt, name="b1", dtype=dtype)
        for j in range(depth):
            decoder = DecoderBlock(c[-1 - j], c[-2 - j], dims, init, fmt, name=f"d{j + 1}", dtype=dtype)
            setattr(self, f"d{j + 1}", decoder)
        self.head = conv(out_channels, 1, "output", dtype, init, fmt, dims)
        self.build((None,) * (dims + 1) + (in_channels,))

    @property
    def encoders(self) -> list[EncoderBlock]:
        return [getattr(self, f"e{i + 1}") for i in range(self.config.depth)]

    @property
    def decoders(self) -> list[DecoderBlock]:
        return [getattr(self, f"d{j + 1}") for j in range(self.config.depth)]

    def build(self, input_shape=None):
        if self.built:  # built in __init__; load_model calls build again with the saved build config
            return
        c, fmt, dims = self.config.channels, self.data_format, self.config.spatial_dims
        for encoder in self.encoders:
            encoder.build(build_shape(encoder.c_in, fmt, dims))
        self.b1.build(build_shape(c[-2], fmt, dims))
        for decoder in self.decoders:
            decoder.build(build_shape(decoder.c_g, fmt, dims), build_shape(decoder.c_s, fmt, dims))
        self.head.build(build_shape(c[0], fmt, dims))

    def check_input(self, x) -> None:
        check_input_shape(self.config, tuple(x.shape) if hasattr(x, "shape") else tuple(ops.shape(x)), "channels_last")

    def __call__(self, x, *args, **kwargs):
        # Checked before Keras' own __call__, which would wrap the message in several lines of context.
        self.check_input(x)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None, return_intermediates: bool = False):
        """Logits of shape (N, H, W, out_channels) (N, D, H, W, out_channels in 3D); with
        ``return_intermediates`` also a dict of every block's output (NHWC or NDHWC): ``e1``..
        (skips), ``b1``, ``d1.ag`` (gate map), ``d1``.., ``output``."""
        named = {}
        skips = []
        x = to_internal(x, self.data_format)
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
        logits = to_channels_last(self.head(x), self.data_format)
        if not return_intermediates:
            return logits
        named = {name: to_channels_last(value, self.data_format) for name, value in named.items()}
        named["output"] = logits
        return logits, named

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.config.out_channels)

    def get_config(self):
        return {**super().get_config(), **self.config.to_dict()}


def empty_model(config: ModelConfig, dtype=None, model_class: type[AttentionUNet] | None = None) -> AttentionUNet:
    """A model of ``config`` (an ``AttentionUNet``, or ``model_class``, a subclass or a model class
    taking ``config.to_dict()``, as ``impl_keras.MonaiAttentionUNet`` does) whose kernels start at
    zeros, for weights about to be assigned: the random kernel initializer is costly under JAX, and
    every value is overwritten anyway."""
    return (model_class or AttentionUNet)(**config.to_dict(), dtype=dtype, kernel_initializer="zeros")
