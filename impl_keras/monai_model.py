"""MONAI's AttentionUnet in Keras 3 (docs/architecture.md section 1b), layer for layer.

Mirrors ``impl_torch/monai_model.py`` class by class, attribute by attribute (``model``, ``ADN``
with ``N`` / ``D`` / ``A``, ``Convolution`` with ``conv`` / ``adn``, ...), and every layer is
*named* after its attribute, or its index in an ``nn.Sequential`` (a ``keras.Sequential`` here), so
a variable's path is MONAI's ``state_dict`` key with "/" and the Keras leaf name
(``model/1/submodule/0/conv/0/adn/N/moving_mean``) and ``impl_keras.io`` maps names mechanically.
How Keras saves this tree is ``weights_convert.core.keras_layout``'s.

Inputs and outputs are channels last (NHWC, or NDHWC with ``spatial_dims=3``) on every backend;
inside, the layout the backend's CPU convolutions prefer (``default_data_format``), as in
``impl_keras.model``, whose dtype policies (``"mixed_bfloat16"`` included) and BatchNorm this model
shares. The numerics the contract pins (the strided convolution's padding, the transposed
convolution, InstanceNorm, PReLU) are in ``impl_keras/layers.py``.

Keras' saving walks every public attribute of a layer, properties included, in alphabetical order,
and saves a layer under the first path that reaches it: so the ways down the tree that torch's
model has as properties (``down``, ``levels``) are methods here.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from impl_keras.layers import (
    BN_EPS,
    KERNEL_INITIALIZER,
    PACKAGE,
    ConvTranspose,
    InstanceNorm,
    PReLU,
    StridedConv,
    batch_norm,
    build_shape,
    channel_axis,
    check_backend_dtype,
    default_data_format,
    serializable,
    to_channels_last,
    to_internal,
    with_channels,
)
from weights_convert.core.monai_spec import MERGE_KERNEL, MonaiConfig
from weights_convert.core.spec import check_input_shape

# MONAI's blocks keep torch's class names, and the article's model has a ``ConvBlock`` too: they are
# registered under a package of their own (the model itself under ``PACKAGE``, which archives name).
BLOCKS_PACKAGE = f"{PACKAGE}_monai"


def block(cls):
    """Registered under ``BLOCKS_PACKAGE``, so a saved config of a block finds this class."""
    return keras.saving.register_keras_serializable(package=BLOCKS_PACKAGE)(cls)


# ADN's norms and activations by the names ``Convolution`` takes.
NORMS = ("batch", "instance")
ACTIVATIONS = ("relu", "prelu")


def chained_output_shape(members, input_shape):
    """The output shape of ``members`` applied one after the other."""
    shape = input_shape
    for member in members:
        shape = member.compute_output_shape(shape)
    return shape


@block
class ADN(layers.Layer):
    """MONAI's norm (``N``: BatchNorm or InstanceNorm) -> dropout (``D``) -> activation (``A``: ReLU
    or PReLU), in that order ("NDA")."""

    def __init__(self, norm: str, dropout: float, activation: str, dims=2, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS or activation not in ACTIVATIONS:
            raise ValueError(
                f"ADN takes a norm of {NORMS} and an activation of {ACTIVATIONS}, got {norm!r}, {activation!r}"
            )
        self.norm, self.dropout, self.activation = norm, dropout, activation
        self.dims, self.data_format = dims, data_format
        dtype = self.dtype_policy
        if norm == "batch":
            self.N = batch_norm("N", dtype, data_format, dims)
        else:
            self.N = InstanceNorm(BN_EPS, data_format, name="N", dtype=dtype)
        self.D = layers.Dropout(dropout, name="D", dtype=dtype)
        self.A = layers.ReLU(name="A", dtype=dtype) if activation == "relu" else PReLU(name="A", dtype=dtype)

    def build(self, input_shape):
        for layer in (self.N, self.D, self.A):
            layer.build(input_shape)

    def call(self, x, training=None):
        return self.A(self.D(self.N(x, training=training), training=training))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "norm": self.norm,
            "dropout": self.dropout,
            "activation": self.activation,
            "dims": self.dims,
            "data_format": self.data_format,
        }


@block
class Convolution(layers.Layer):
    """A convolution (``conv``: ``StridedConv``, or ``ConvTranspose`` when ``transposed``) and its
    ADN (``adn``); the convolution alone when ``norm`` is None (MONAI's ``conv_only``)."""

    def __init__(
        self,
        c_out: int,
        kernel: tuple[int, ...],
        stride: int = 1,
        transposed: bool = False,
        norm: str | None = None,
        dropout: float = 0.0,
        activation: str | None = None,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.c_out, self.kernel, self.stride, self.transposed = c_out, tuple(kernel), stride, transposed
        self.norm, self.dropout, self.activation, self.data_format = norm, dropout, activation, data_format
        dtype, dims = self.dtype_policy, len(self.kernel)
        conv_class = ConvTranspose if transposed else StridedConv
        self.conv = conv_class(c_out, self.kernel, stride, data_format, kernel_initializer, name="conv", dtype=dtype)
        self.adn = None if norm is None else ADN(norm, dropout, activation, dims, data_format, name="adn", dtype=dtype)

    def build(self, input_shape):
        self.conv.build(input_shape)
        if self.adn is not None:
            self.adn.build(self.conv.compute_output_shape(input_shape))

    def call(self, x, training=None):
        x = self.conv(x)
        return x if self.adn is None else self.adn(x, training=training)

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "c_out": self.c_out,
            "kernel": self.kernel,
            "stride": self.stride,
            "transposed": self.transposed,
            "norm": self.norm,
            "dropout": self.dropout,
            "activation": self.activation,
            "data_format": self.data_format,
        }


def conv_bn_relu(c_out, kernel, stride, dropout, name, dtype, init, data_format) -> Convolution:
    """MONAI's Convolution of a ConvBlock: conv -> BatchNorm -> dropout -> ReLU."""
    return Convolution(
        c_out,
        kernel,
        stride,
        norm="batch",
        dropout=dropout,
        activation="relu",
        kernel_initializer=init,
        data_format=data_format,
        name=name,
        dtype=dtype,
    )


@block
class ConvBlock(layers.Layer):
    """Two conv -> BN -> dropout -> ReLU (a Sequential ``conv`` of ``0`` and ``1``); the first
    carries the level's stride."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: int = 1,
        dropout: float = 0.0,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.kernel, self.stride, self.dropout = c_in, c_out, tuple(kernel), stride, dropout
        self.data_format = data_format
        dtype, init = self.dtype_policy, kernel_initializer
        self.conv = keras.Sequential(
            [
                conv_bn_relu(c_out, self.kernel, stride, dropout, "0", dtype, init, data_format),
                conv_bn_relu(c_out, self.kernel, 1, dropout, "1", dtype, init, data_format),
            ],
            name="conv",
        )

    def build(self, input_shape):
        self.conv.build(build_shape(self.c_in, self.data_format, len(self.kernel)))

    def call(self, x, training=None):
        return self.conv(x, training=training)

    def compute_output_shape(self, input_shape):
        return chained_output_shape(self.conv.layers, input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "c_in": self.c_in,
            "c_out": self.c_out,
            "kernel": self.kernel,
            "stride": self.stride,
            "dropout": self.dropout,
            "data_format": self.data_format,
        }


@block
class UpConv(layers.Layer):
    """Transposed conv (x stride) -> BN -> ReLU (``up``), from the level below's channels to this
    level's; no dropout (MONAI builds it without)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: int,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.c_in, self.c_out, self.kernel, self.stride = c_in, c_out, tuple(kernel), stride
        self.data_format = data_format
        self.up = Convolution(
            c_out,
            self.kernel,
            stride,
            transposed=True,
            norm="batch",
            activation="relu",
            kernel_initializer=kernel_initializer,
            data_format=data_format,
            name="up",
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        self.up.build(build_shape(self.c_in, self.data_format, len(self.kernel)))

    def call(self, x, training=None):
        return self.up(x, training=training)

    def compute_output_shape(self, input_shape):
        return self.up.compute_output_shape(input_shape)

    def get_config(self):
        return {
            **super().get_config(),
            "c_in": self.c_in,
            "c_out": self.c_out,
            "kernel": self.kernel,
            "stride": self.stride,
            "data_format": self.data_format,
        }


@block
class AttentionBlock(layers.Layer):
    """The gate: ``psi = sigmoid(BN(conv(relu(BN(W_g g) + BN(W_x x)))))``, one channel (Sequentials
    ``W_g``, ``W_x``, ``psi``, and ``relu``); returns (x * psi, psi)."""

    def __init__(
        self, channels: int, dims=2, kernel_initializer=KERNEL_INITIALIZER, data_format="channels_last", **kwargs
    ):
        super().__init__(**kwargs)
        self.channels, self.dims, self.data_format = channels, dims, data_format
        dtype, init, one = self.dtype_policy, kernel_initializer, (1,) * dims
        self.f_int = f_int = channels // 2

        def conv_only(c_out):  # a 1x1 (1x1x1) convolution, MONAI's conv_only Convolution
            return Convolution(c_out, one, kernel_initializer=init, data_format=data_format, name="0", dtype=dtype)

        self.W_g = keras.Sequential([conv_only(f_int), batch_norm("1", dtype, data_format, dims)], name="W_g")
        self.W_x = keras.Sequential([conv_only(f_int), batch_norm("1", dtype, data_format, dims)], name="W_x")
        self.psi = keras.Sequential(
            [
                conv_only(1),
                batch_norm("1", dtype, data_format, dims),
                layers.Activation("sigmoid", name="2", dtype=dtype),
            ],
            name="psi",
        )
        self.relu = layers.ReLU(name="relu", dtype=dtype)

    def build(self, g_shape, x_shape):
        fmt, dims = self.data_format, self.dims
        self.W_g.build(build_shape(self.channels, fmt, dims))
        self.W_x.build(build_shape(self.channels, fmt, dims))
        self.psi.build(build_shape(self.f_int, fmt, dims))
        self.relu.build(build_shape(self.f_int, fmt, dims))

    def call(self, g, x, training=None):
        psi = self.psi(self.relu(self.W_g(g, training=training) + self.W_x(x, training=training)), training=training)
        return x * psi, psi

    def compute_output_shape(self, g_shape, x_shape):
        return x_shape, with_channels(x_shape, 1, self.data_format)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "dims": self.dims, "data_format": self.data_format}


@block
class AttentionLayer(layers.Layer):
    """Level ``level`` of the network (0 = the top): ``attention``, ``upconv``, ``merge`` (conv 3 ->
    InstanceNorm -> dropout -> PReLU) and ``submodule``, the level's down block then the level below
    (a Sequential of ``0`` and ``1``), or the down block alone at the bottom.

    Built top-down from the config, as MONAI's ``_create_block`` recursion builds it; ``call`` is
    MONAI's forward of the layer, the model's ``call`` walks the levels itself to name every block."""

    def __init__(
        self,
        config: MonaiConfig | dict,
        level: int,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format="channels_last",
        **kwargs,
    ):
        super().__init__(**kwargs)
        config = config if isinstance(config, MonaiConfig) else MonaiConfig.from_dict(config)
        self.config, self.level, self.data_format = config, level, data_format
        c, dims, stride = config.channels, config.spatial_dims, config.strides[level]
        dtype, init, fmt = self.dtype_policy, kernel_initializer, data_format
        self.attention = AttentionBlock(c[level], dims, init, fmt, name="attention", dtype=dtype)
        self.upconv = UpConv(
            c[level + 1], c[level], config.kernel("up_kernel_size"), stride, init, fmt, name="upconv", dtype=dtype
        )
        # MONAI builds the merge at Convolution's default kernel, 3, whatever kernel_size is.
        self.merge = Convolution(
            c[level],
            (MERGE_KERNEL,) * dims,
            norm="instance",
            dropout=config.dropout,
            activation="prelu",
            kernel_initializer=init,
            data_format=fmt,
            name="merge",
            dtype=dtype,
        )
        bottom = level == config.depth - 1
        kernel = config.kernel("kernel_size")
        down_name = "submodule" if bottom else "0"
        down = ConvBlock(c[level], c[level + 1], kernel, stride, config.dropout, init, fmt, name=down_name, dtype=dtype)
        if bottom:
            self.submodule = down
        else:
            below = AttentionLayer(config, level + 1, init, fmt, name="1", dtype=dtype)
            self.submodule = keras.Sequential([down, below], name="submodule")

    def down(self) -> ConvBlock:
        """This level's down block."""
        return self.submodule if isinstance(self.submodule, ConvBlock) else self.submodule.layers[0]

    def below(self) -> AttentionLayer | None:
        """The level below, None at the bottom."""
        return None if isinstance(self.submodule, ConvBlock) else self.submodule.layers[1]

    def build(self, input_shape):
        c, fmt, dims = self.config.channels, self.data_format, self.config.spatial_dims
        level_shape = build_shape(c[self.level], fmt, dims)
        self.attention.build(level_shape, level_shape)
        self.upconv.build(build_shape(c[self.level + 1], fmt, dims))
        self.merge.build(build_shape(2 * c[self.level], fmt, dims))
        self.submodule.build(level_shape)

    def call(self, x, training=None):
        return self.decode(x, self.submodule(x, training=training), training)["merge"]

    def decode(self, x, below, training=None) -> dict:
        """This level's decoder from its input ``x`` (the skip) and the level below's output."""
        up = self.upconv(below, training=training)
        gated, psi = self.attention(up, x, training=training)
        merged = ops.concatenate([gated, up], axis=channel_axis(self.data_format, self.config.spatial_dims))
        return {"up": up, "ag": psi, "merge": self.merge(merged, training=training)}

    def compute_output_shape(self, input_shape):
        return with_channels(input_shape, self.config.channels[self.level], self.data_format)

    def get_config(self):
        return {
            **super().get_config(),
            "config": self.config.to_dict(),
            "level": self.level,
            "data_format": self.data_format,
        }


@serializable
class MonaiAttentionUNet(keras.Model):
    """MONAI's AttentionUnet, NHWC in and out (NDHWC with ``spatial_dims=3``); returns logits. The
    arguments are ``MonaiConfig``'s (MONAI's constructor's), then, as ``impl_keras.AttentionUNet``
    takes them, ``dtype`` (a Keras dtype policy: "float32" by default, "float64",
    "mixed_bfloat16"), ``kernel_initializer`` and ``data_format`` (the layout inside, by default the
    backend's; not part of ``get_config()``). Built on construction (any batch size, any sides that
    are multiples of ``config.side_multiple``).

    ``model`` is MONAI's Sequential: ``0`` the head (a ConvBlock), ``1`` the top AttentionLayer
    (the others nested in it), ``2`` the output convolution. With ``dropout`` > 0 each Dropout
    keeps Keras' random state (a ``seed_generator_state`` variable), which no checkpoint holds:
    torch's dropout draws from its global generator.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: tuple[int, ...] = (16, 32, 64, 128, 256),
        spatial_dims: int = 2,
        strides: tuple[int, ...] | None = None,
        kernel_size: int | tuple[int, ...] = 3,
        up_kernel_size: int | tuple[int, ...] = 3,
        dropout: float = 0.0,
        dtype=None,
        kernel_initializer=KERNEL_INITIALIZER,
        data_format: str | None = None,
        architecture: str = MonaiConfig.architecture,
        **kwargs,
    ):
        # ``architecture`` is part of ``get_config()`` (the config's ``to_dict``); only this network's is taken.
        config = MonaiConfig.from_dict(
            {
                "architecture": architecture,
                "in_channels": in_channels,
                "out_channels": out_channels,
                "channels": channels,
                "spatial_dims": spatial_dims,
                "strides": strides,
                "kernel_size": kernel_size,
                "up_kernel_size": up_kernel_size,
                "dropout": dropout,
            }
        )
        if data_format not in (None, "channels_first", "channels_last"):
            raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got {data_format!r}")
        super().__init__(dtype=dtype, **kwargs)
        check_backend_dtype(self.dtype_policy.variable_dtype)
        self.config = config
        self.data_format = fmt = data_format or default_data_format()
        c, dims, dtype, init = config.channels, config.spatial_dims, self.dtype_policy, kernel_initializer
        head = ConvBlock(
            config.in_channels, c[0], config.kernel("kernel_size"), 1, config.dropout, init, fmt, name="0", dtype=dtype
        )
        top = AttentionLayer(config, 0, init, fmt, name="1", dtype=dtype)
        output = Convolution(
            config.out_channels, (1,) * dims, kernel_initializer=init, data_format=fmt, name="2", dtype=dtype
        )
        self.model = keras.Sequential([head, top, output], name="model")
        self.build((None,) * (dims + 1) + (config.in_channels,))

    def levels(self) -> list[AttentionLayer]:
        """The AttentionLayers from the top level down."""
        found, layer = [], self.model.layers[1]
        while layer is not None:
            found.append(layer)
            layer = layer.below()
        return found

    def build(self, input_shape=None):
        if self.built:  # built in __init__; load_model calls build again with the saved build config
            return
        self.model.build(build_shape(self.config.in_channels, self.data_format, self.config.spatial_dims))

    def check_input(self, x) -> None:
        check_input_shape(self.config, tuple(x.shape) if hasattr(x, "shape") else tuple(ops.shape(x)), "channels_last")

    def __call__(self, x, *args, **kwargs):
        # Checked before Keras' own __call__, which would wrap the message in several lines of context.
        self.check_input(x)
        return super().__call__(x, *args, **kwargs)

    def call(self, x, training=None, return_intermediates: bool = False):
        """Logits (N, *sides, out_channels); with ``return_intermediates`` also every block's output
        (channels last) by ``config.block_names``: ``e1``.., ``b1``, ``d1.up``, ``d1.ag`` (psi),
        ``d1``.., ``output``."""
        head, _, output = self.model.layers
        levels = self.levels()
        depth = len(levels)
        x = head(to_internal(x, self.data_format), training=training)
        named = {"e1": x}
        inputs = [x]  # each level's input: its skip
        for level, layer in enumerate(levels):
            x = layer.down()(x, training=training)
            named[f"e{level + 2}" if level < depth - 1 else "b1"] = x
            inputs.append(x)
        for j in range(1, depth + 1):
            decoded = levels[depth - j].decode(inputs[depth - j], x, training)
            named[f"d{j}.up"], named[f"d{j}.ag"], named[f"d{j}"] = decoded["up"], decoded["ag"], decoded["merge"]
            x = decoded["merge"]
        logits = to_channels_last(output(x), self.data_format)
        if not return_intermediates:
            return logits
        named = {name: to_channels_last(value, self.data_format) for name, value in named.items()}
        named["output"] = logits
        return logits, named

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.config.out_channels)

    def get_config(self):
        return {**super().get_config(), **self.config.to_dict()}
