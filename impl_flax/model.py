"""Attention U-Net in Flax NNX, mirroring ``impl_torch/model.py`` class by class (ARCHITECTURE.md sections 1-3).

NHWC activations and HWIO kernels, or with ``spatial_dims=3`` NDHWC and DHWIO (3x3x3 convs,
2x2x2 pools, trilinear upsampling); one code path for both, the layers taking their rank from
``dims`` or from their input. The attribute tree is the torch module tree: an ``nn.Sequential``
becomes an ``nnx.List`` holding the same layers at the same indices (parameter-free activations
included), so ``e1.conv.conv.0.weight`` lives at the state path ``("e1", "conv", "conv", 0, "kernel")``;
``weights_convert.core.flax_layout.nnx_path`` is that rule. Where Flax's defaults are not the contract
(BatchNorm, conv padding, pooling, upsampling, padding to the skip), the layer is in
``impl_flax/layers.py``; the input check is ``core.spec.check_input_shape``.

Precision follows Flax's own layers: ``dtype`` is the compute dtype, ``param_dtype`` the dtype of the
parameters and BatchNorm statistics. float32 and float64 compute in their own dtype; mixed bfloat16
(``dtype=jnp.bfloat16`` with float32 parameters, or ``dtype="mixed_bfloat16"``, the name that
``impl_flax.load`` and ``from_checkpoint`` take too) keeps float32 parameters and computes convolutions
and activations in bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from impl_flax.layers import BatchNorm, conv, max_pool2x2, pad_to, resolve_dtypes, sequential, upsample2x

# impl_flax.training imports it from here.
from impl_flax.layers import check_dtype as check_dtype
from weights_convert.core.spec import ModelConfig, check_input_shape


class ConvBlock(nnx.Module):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU (3x3x3 convs in 3D)."""

    def __init__(self, c_in: int, c_out: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv = nnx.List(
            [
                conv(c_in, c_out, 3, dims, **dtypes, rngs=rngs),
                BatchNorm(c_out, **dtypes),
                nnx.relu,
                conv(c_out, c_out, 3, dims, **dtypes, rngs=rngs),
                BatchNorm(c_out, **dtypes),
                nnx.relu,
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return sequential(self.conv, x)


class EncoderBlock(nnx.Module):
    """Conv block, then a 2x2 (2x2x2) max pool (floor for odd sizes); returns (skip, pooled)."""

    def __init__(self, c_in: int, c_out: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = ConvBlock(c_in, c_out, dims, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pool = max_pool2x2

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        skip = self.conv(x)
        return skip, self.pool(skip)


class AttentionGate(nnx.Module):
    """Per-channel attention coefficients ``a`` from the gating signal g and the skip s; returns (a * s, a)."""

    def __init__(self, c_g: int, c_s: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.Wg = nnx.List([conv(c_g, c_s, 1, dims, **dtypes, rngs=rngs), BatchNorm(c_s, **dtypes)])
        self.Ws = nnx.List([conv(c_s, c_s, 1, dims, **dtypes, rngs=rngs), BatchNorm(c_s, **dtypes)])
        self.relu = nnx.relu
        self.output = nnx.List([conv(c_s, c_s, 1, dims, **dtypes, rngs=rngs), nnx.sigmoid])

    def __call__(self, g: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
        attention = sequential(self.output, self.relu(sequential(self.Wg, g) + sequential(self.Ws, s)))
        return attention * s, attention


class DecoderBlock(nnx.Module):
    """Upsample x2, pad to the skip, gate the skip, concatenate, conv block."""

    def __init__(self, c_g: int, c_s: int, dims: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.up = upsample2x
        self.ag = AttentionGate(c_g, c_s, dims, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c1 = ConvBlock(c_g + c_s, c_s, dims, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = pad_to(self.up(x), skip)
        gated, attention = self.ag(x, skip)
        return self.c1(jnp.concatenate([x, gated], axis=-1)), attention


class AttentionUNet(nnx.Module):
    """Attention U-Net, NHWC in and out (NDHWC with ``spatial_dims=3``); returns logits. Starts in
    training mode, as torch modules do: ``model.eval()`` switches every BatchNorm to its running
    statistics, ``model.train()`` back.

    ``dtype`` is the compute dtype and ``param_dtype`` the dtype of the parameters and BatchNorm
    statistics, as in Flax's own layers; ``param_dtype`` defaults to ``dtype`` for float32 and float64.
    Mixed precision is ``dtype=jnp.bfloat16`` (``param_dtype`` then defaults to float32, the only one
    allowed), or ``dtype="mixed_bfloat16"``: convolutions, activations and the gates compute in
    bfloat16 and the logits are bfloat16; the upsampling interpolates in float32 and returns
    bfloat16 (as torch's kernel does); BatchNorm computes its batch statistics and the
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
        spatial_dims: int = 2,
        *,
        dtype=jnp.float32,
        param_dtype=None,
        rngs: nnx.Rngs,
    ):
        self.config = ModelConfig(in_channels, out_channels, tuple(channels), spatial_dims)
        self.dtype, self.param_dtype = resolve_dtypes(dtype, param_dtype)
        c, dims = self.config.channels, self.config.spatial_dims
        depth = self.config.depth
        levels_in = (in_channels,) + c[:-2]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)
        for i in range(depth):
            setattr(self, f"e{i + 1}", EncoderBlock(levels_in[i], c[i], dims, **kw))
        self.b1 = ConvBlock(c[-2], c[-1], dims, **kw)
        for j in range(depth):
            setattr(self, f"d{j + 1}", DecoderBlock(c[-1 - j], c[-2 - j], dims, **kw))
        self.output = conv(c[0], out_channels, 1, dims, **kw)

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
        check_input_shape(self.config, np.shape(x), "channels_last")

    def __call__(self, x: jax.Array, return_intermediates: bool = False):
        """Logits of shape (N, H, W, out_channels) (or N, D, H, W, out_channels); with
        ``return_intermediates`` also a dict of every block's output (NHWC, NDHWC): ``e1``..
        (skips), ``b1``, ``d1.ag`` (gate map), ``d1``.., ``output``."""
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
