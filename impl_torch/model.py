"""Attention U-Net in PyTorch: the reference implementation (ARCHITECTURE.md sections 1-3).

Attribute names reproduce the article's module tree, so ``state_dict()`` keys are the canonical
parameter names. ``impl_flax/model.py`` and ``impl_keras/model.py`` mirror this file class by class;
the layers whose numerics the contract pins (BatchNorm, conv padding, pooling, upsampling, padding to
the skip) are in ``impl_torch/layers.py``, and the input check is ``core.spec.check_input_shape``.

Precision: the parameters' dtype (``model.to(torch.float64)``) is the compute dtype, unless the model
is built with ``compute_dtype=torch.bfloat16``: mixed precision, PyTorch's way. The parameters and
BatchNorm statistics stay float32 and the forward runs under
``torch.autocast(x.device.type, dtype=torch.bfloat16)``; ``impl_torch.load(path, dtype="mixed_bfloat16")``
and ``impl_torch.from_checkpoint(checkpoint, "mixed_bfloat16")`` build that model. Where bfloat16 is
used then follows autocast's op lists (torch 2.13, ``aten/src/ATen/autocast_mode.cpp``; the CPU entries
checked by experiment, the CUDA ones read from that source):

- conv2d (conv3d) is on the lower-precision list for CPU and CUDA: input and float32 weights are cast to
  bfloat16, products accumulate in float32 inside oneDNN/cuDNN, the output is bfloat16.
- batch_norm is on no list, so it receives the bfloat16 conv output as it is, with float32 weight,
  bias and running statistics. PyTorch's BatchNorm kernels for that mixed case (CPU, CUDA and cuDNN)
  accumulate the batch mean and variance in float32, update the float32 running statistics and
  normalize in float32, then return bfloat16: the statistics are float32 without an explicit cast
  (on CPU they equal a float32 BatchNorm of the upcast input to float32 rounding; the test suite
  checks it), as in Flax's and Keras' BatchNorm under mixed precision.
- relu, max_pool2d, sigmoid, the gate product and the zero padding are on no list and keep their
  bfloat16 input's dtype. max_pool3d is on CPU's float32 list: the pooled volume is float32 there,
  holding the bfloat16 values it selected unchanged (a maximum rounds nothing), so the next
  convolution's cast back to bfloat16 is exact and 3D computes what 2D does.
- upsample_bilinear2d (upsample_trilinear3d) differs by device: on CPU it is on no list and
  computes in bfloat16; on CUDA it is on the float32 list, so the upsampled tensor and the
  concatenation that contains it are float32 there (the next convolution casts them back to bfloat16).
- The logits are bfloat16 (the head is a convolution): cast them to float32 before the loss.
  Gradients are float32, the parameters' dtype.

autocast leaves float64 tensors alone, so ``compute_dtype`` only takes effect on float32 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from impl_torch.layers import Upsample2x, batch_norm, conv, max_pool2x2, pad_to
from weights_convert.core.spec import ModelConfig, check_input_shape


class ConvBlock(nn.Module):
    """Conv3x3 -> BN -> ReLU -> Conv3x3 -> BN -> ReLU (3x3x3 convs in 3D)."""

    def __init__(self, c_in: int, c_out: int, dims: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv(c_in, c_out, 3, dims),
            batch_norm(c_out, dims),
            nn.ReLU(inplace=True),
            conv(c_out, c_out, 3, dims),
            batch_norm(c_out, dims),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class EncoderBlock(nn.Module):
    """Conv block, then a 2x2 (2x2x2) max pool (floor for odd sizes); returns (skip, pooled)."""

    def __init__(self, c_in: int, c_out: int, dims: int):
        super().__init__()
        self.conv = ConvBlock(c_in, c_out, dims)
        self.pool = max_pool2x2(dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.conv(x)
        return skip, self.pool(skip)


class AttentionGate(nn.Module):
    """Per-channel attention coefficients ``a`` from the gating signal g and the skip s; returns (a * s, a)."""

    def __init__(self, c_g: int, c_s: int, dims: int):
        super().__init__()
        self.Wg = nn.Sequential(conv(c_g, c_s, 1, dims), batch_norm(c_s, dims))
        self.Ws = nn.Sequential(conv(c_s, c_s, 1, dims), batch_norm(c_s, dims))
        self.relu = nn.ReLU(inplace=True)
        self.output = nn.Sequential(conv(c_s, c_s, 1, dims), nn.Sigmoid())

    def forward(self, g: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.output(self.relu(self.Wg(g) + self.Ws(s)))
        return attention * s, attention


class DecoderBlock(nn.Module):
    """Upsample x2, pad to the skip, gate the skip, concatenate, conv block."""

    def __init__(self, c_g: int, c_s: int, dims: int):
        super().__init__()
        self.up = Upsample2x(dims)
        self.ag = AttentionGate(c_g, c_s, dims)
        self.c1 = ConvBlock(c_g + c_s, c_s, dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pad_to(self.up(x), skip)
        gated, attention = self.ag(x, skip)
        return self.c1(torch.cat([x, gated], dim=1)), attention


# Compute dtypes for mixed precision: what autocast runs convolutions in, with float32 parameters.
COMPUTE_DTYPES = (torch.bfloat16,)


class AttentionUNet(nn.Module):
    """Attention U-Net, NCHW in and out (NCDHW with ``spatial_dims=3``); returns logits.

    ``compute_dtype=None`` computes in the parameters' dtype (float32, or float64 after
    ``.to(torch.float64)``). ``compute_dtype=torch.bfloat16`` is mixed precision: parameters and
    BatchNorm running statistics stay float32, the forward runs under ``torch.autocast`` with bfloat16
    (convolutions and activations in bfloat16, BatchNorm statistics in float32; see the module
    docstring for each op), and the logits are bfloat16. ``impl_torch.load(path, dtype="mixed_bfloat16")``
    builds the same model from a file, and ``impl_torch.to_checkpoint`` of it gives float32 tensors.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        spatial_dims: int = 2,
        *,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be None (the parameters' dtype) or one of {list(COMPUTE_DTYPES)}, "
                f"got {compute_dtype!r}"
            )
        self.compute_dtype = compute_dtype
        self.config = ModelConfig(in_channels, out_channels, tuple(channels), spatial_dims)
        c, dims = self.config.channels, self.config.spatial_dims
        depth = self.config.depth
        levels_in = (in_channels,) + c[:-2]
        for i in range(depth):
            setattr(self, f"e{i + 1}", EncoderBlock(levels_in[i], c[i], dims))
        self.b1 = ConvBlock(c[-2], c[-1], dims)
        for j in range(depth):
            setattr(self, f"d{j + 1}", DecoderBlock(c[-1 - j], c[-2 - j], dims))
        self.output = conv(c[0], out_channels, 1, dims)

    @property
    def encoders(self) -> list[EncoderBlock]:
        return [getattr(self, f"e{i + 1}") for i in range(self.config.depth)]

    @property
    def decoders(self) -> list[DecoderBlock]:
        return [getattr(self, f"d{j + 1}") for j in range(self.config.depth)]

    def check_input(self, x: torch.Tensor) -> None:
        check_input_shape(self.config, x.shape, "channels_first")

    def forward(self, x: torch.Tensor, return_intermediates: bool = False):
        """Logits of shape (N, out_channels, H, W) (or D, H, W); with ``return_intermediates`` also a dict of
        every block's output: ``e1``.. (skips), ``b1``, ``d1.ag`` (gate map), ``d1``.., ``output``."""
        self.check_input(x)
        if self.compute_dtype is None:
            return self._forward(x, return_intermediates)
        with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype):
            return self._forward(x, return_intermediates)

    def _forward(self, x: torch.Tensor, return_intermediates: bool):
        named: dict[str, torch.Tensor] = {}
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
