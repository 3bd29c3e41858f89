"""MONAI's AttentionUnet in Flax NNX (docs/architecture.md section 1b), mirroring
``impl_torch/monai_model.py`` class by class.

NHWC activations (NDHWC in 3D) and channels-last kernels. The attribute tree is the torch one, each
``nn.Sequential`` an ``nnx.List`` holding the same layers at the same indices (parameter-free
activations included), so MONAI's ``model.1.attention.W_g.0.conv.weight`` lives at the state path
``("model", 1, "attention", "W_g", 0, "conv", "kernel")``: ``weights_convert.core.flax_layout.to_nnx``
of a MONAI checkpoint gives exactly this model's state. The layers that are not Flax's own
(strided convolutions padded as torch, PyTorch's transposed convolution, BatchNorm, InstanceNorm,
PReLU, Dropout) are in ``impl_flax/layers.py``.

Precision, train/eval switching and BatchNorm are ``impl_flax.AttentionUNet``'s: ``dtype`` is the
compute dtype, ``param_dtype`` that of the parameters and BatchNorm statistics (mixed bfloat16:
bfloat16 compute, float32 parameters, statistics and convolution biases, float32 BatchNorm and
InstanceNorm arithmetic). Dropout is active only in train mode and draws its masks from the
``dropout`` stream of ``rngs``; with ``config.dropout == 0`` it is the identity and holds no state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from impl_flax.layers import (
    BatchNorm,
    Dropout,
    InstanceNorm,
    PReLU,
    conv,
    conv_transpose,
    resolve_dtypes,
    sequential,
    strided_conv,
)
from weights_convert.core.monai_spec import MERGE_KERNEL, MonaiConfig
from weights_convert.core.spec import check_input_shape


class ADN(nnx.Module):
    """MONAI's norm (``N``) -> dropout (``D``) -> activation (``A``), in that order ("NDA")."""

    def __init__(self, norm: nnx.Module, dropout: Dropout, activation):
        self.N = norm
        self.D = dropout
        self.A = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.A(self.D(self.N(x)))


class Convolution(nnx.Module):
    """A convolution (``conv``) and its ADN (``adn``), or the convolution alone (``adn`` None)."""

    def __init__(self, conv_layer: nnx.Module, adn: ADN | None = None):
        self.conv = conv_layer
        self.adn = adn

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return x if self.adn is None else self.adn(x)


def conv_bn_relu(
    c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, dropout: float, *, dtype, param_dtype, rngs: nnx.Rngs
) -> Convolution:
    """Strided conv -> BatchNorm -> Dropout -> ReLU."""
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    return Convolution(
        strided_conv(c_in, c_out, kernel, stride, **dtypes, rngs=rngs),
        ADN(BatchNorm(c_out, **dtypes), Dropout(dropout, rngs=rngs), nnx.relu),
    )


class ConvBlock(nnx.Module):
    """Two conv -> BN -> dropout -> ReLU; the first carries the level's stride."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: tuple[int, ...],
        stride: int,
        dropout: float,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        first = conv_bn_relu(c_in, c_out, kernel, stride, dropout, **kw)
        self.conv = nnx.List([first, conv_bn_relu(c_out, c_out, kernel, 1, dropout, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return sequential(self.conv, x)


class UpConv(nnx.Module):
    """Transposed conv (x stride) -> BN -> ReLU, from the level below's channels to this level's;
    its dropout is MONAI's 0, the identity."""

    def __init__(
        self, c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.up = Convolution(
            conv_transpose(c_in, c_out, kernel, stride, **dtypes, rngs=rngs),
            ADN(BatchNorm(c_out, **dtypes), Dropout(0.0, rngs=rngs), nnx.relu),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(x)


class AttentionBlock(nnx.Module):
    """The gate: ``psi = sigmoid(BN(conv(relu(BN(W_g g) + BN(W_x x)))))``, one channel; returns
    (x * psi, psi)."""

    def __init__(self, channels: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        f_int = channels // 2

        def conv1x1(c_in: int, c_out: int) -> Convolution:
            return Convolution(conv(c_in, c_out, 1, dims, **dtypes, rngs=rngs))

        self.W_g = nnx.List([conv1x1(channels, f_int), BatchNorm(f_int, **dtypes)])
        self.W_x = nnx.List([conv1x1(channels, f_int), BatchNorm(f_int, **dtypes)])
        self.psi = nnx.List([conv1x1(f_int, 1), BatchNorm(1, **dtypes), nnx.sigmoid])
        self.relu = nnx.relu

    def __call__(self, g: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        psi = sequential(self.psi, self.relu(sequential(self.W_g, g) + sequential(self.W_x, x)))
        return x * psi, psi


class AttentionLayer(nnx.Module):
    """One level: ``submodule`` (the down block, then the next level: an nnx.List; the down block
    alone at the bottom), ``upconv``, ``attention`` and ``merge`` (conv 3 -> InstanceNorm -> Dropout
    -> PReLU)."""

    def __init__(
        self,
        config: MonaiConfig,
        level: int,
        below: AttentionLayer | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        c, dims, stride = config.channels, config.spatial_dims, config.strides[level]
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        kw = dict(**dtypes, rngs=rngs)
        self.attention = AttentionBlock(c[level], dims, **kw)
        self.upconv = UpConv(c[level + 1], c[level], config.kernel("up_kernel_size"), stride, **kw)
        # MONAI builds the merge at Convolution's default kernel (3) whatever kernel_size is.
        merge = strided_conv(2 * c[level], c[level], (MERGE_KERNEL,) * dims, 1, **kw)
        adn = ADN(InstanceNorm(**dtypes), Dropout(config.dropout, rngs=rngs), PReLU(**dtypes))
        self.merge = Convolution(merge, adn)
        down = ConvBlock(c[level], c[level + 1], config.kernel("kernel_size"), stride, config.dropout, **kw)
        self.submodule = down if below is None else nnx.List([down, below])

    @property
    def down(self) -> ConvBlock:
        return self.submodule if isinstance(self.submodule, ConvBlock) else self.submodule[0]

    def decode(self, x: jax.Array, below: jax.Array) -> dict[str, jax.Array]:
        """This level's decoder from its input ``x`` (the skip) and the level below's output."""
        up = self.upconv(below)
        gated, psi = self.attention(up, x)
        return {"up": up, "ag": psi, "merge": self.merge(jnp.concatenate([gated, up], axis=-1))}


class MonaiAttentionUNet(nnx.Module):
    """MONAI's AttentionUnet, NHWC in and out (NDHWC in 3D); returns logits. Starts in training
    mode, as torch modules do: ``model.eval()`` switches every BatchNorm to its running statistics
    and every Dropout off, ``model.train()`` back. ``dtype`` and ``param_dtype`` as in
    ``impl_flax.AttentionUNet`` (float32, float64, or ``dtype=jnp.bfloat16`` / "mixed_bfloat16":
    float32 parameters, bfloat16 compute and logits). ``rngs`` initialises the parameters
    (``params`` stream, or ``default``) and seeds the dropout masks (``dropout``, or ``default``)."""

    def __init__(self, config: MonaiConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        if not isinstance(config, MonaiConfig):
            raise TypeError(f"expected a MonaiConfig, got {type(config).__name__}")
        self.config = config
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        c, dims = config.channels, config.spatial_dims
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        kw = dict(**dtypes, rngs=rngs)
        head = ConvBlock(config.in_channels, c[0], config.kernel("kernel_size"), 1, config.dropout, **kw)
        below = None
        for level in reversed(range(config.depth)):
            below = AttentionLayer(config, level, below, **kw)
        output = Convolution(conv(c[0], config.out_channels, 1, dims, **kw))
        self.model = nnx.List([head, below, output])

    @property
    def levels(self) -> list[AttentionLayer]:
        """The AttentionLayers from the top level down."""
        layers, layer = [], self.model[1]
        while True:
            layers.append(layer)
            if isinstance(layer.submodule, ConvBlock):
                return layers
            layer = layer.submodule[1]

    @property
    def block_names(self) -> list[str]:
        """The keys of ``return_intermediates``, in computation order (``jax.jit`` returns dicts with
        sorted keys, so jitted callers restore the order from here)."""
        return self.config.block_names

    def check_input(self, x) -> None:
        check_input_shape(self.config, np.shape(x), "channels_last")

    def __call__(self, x: jax.Array, return_intermediates: bool = False):
        """Logits (N, *sides, out_channels); with ``return_intermediates`` also every block's output
        by ``config.block_names``: ``e1``.., ``b1``, ``d1.up``, ``d1.ag`` (psi), ``d1``.., ``output``."""
        self.check_input(x)
        x = jnp.asarray(x, self.dtype)
        levels = self.levels
        depth = len(levels)
        x = self.model[0](x)
        named: dict[str, jax.Array] = {"e1": x}
        inputs = [x]  # each level's input: its skip
        for level, layer in enumerate(levels):
            x = layer.down(x)
            named[f"e{level + 2}" if level < depth - 1 else "b1"] = x
            inputs.append(x)
        for j in range(1, depth + 1):
            level = depth - j
            decoded = levels[level].decode(inputs[level], x)
            named[f"d{j}.up"], named[f"d{j}.ag"], named[f"d{j}"] = decoded["up"], decoded["ag"], decoded["merge"]
            x = decoded["merge"]
        logits = self.model[2](x)
        named["output"] = logits
        return (logits, named) if return_intermediates else logits
