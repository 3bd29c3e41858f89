"""MONAI's AttentionUnet in PyTorch (docs/architecture.md section 1b), module for module.

The attribute tree is MONAI's, so ``state_dict()`` keys are MONAI's own and
``model.load_state_dict(monai_state_dict, strict=True)`` works both ways; nothing here imports MONAI.
``impl_flax/monai_model.py`` and ``impl_keras/monai_model.py`` mirror this file class by class.
Mixed precision is ``impl_torch.model``'s: float32 parameters under bfloat16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from impl_torch.layers import batch_norm, conv, conv_transpose, instance_norm, strided_conv
from impl_torch.model import COMPUTE_DTYPES
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.spec import check_input_shape


class ADN(nn.Module):
    """MONAI's norm (``N``) -> dropout (``D``) -> activation (``A``), in that order ("NDA")."""

    def __init__(self, norm: nn.Module, dropout: float, activation: nn.Module):
        super().__init__()
        self.N = norm
        self.D = nn.Dropout(dropout)
        self.A = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.D(self.N(x)))


class Convolution(nn.Module):
    """A convolution (``conv``) and its ADN (``adn``), or the convolution alone."""

    def __init__(self, conv_layer: nn.Module, adn: ADN | None = None):
        super().__init__()
        self.conv = conv_layer
        if adn is not None:
            self.adn = adn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.adn(x) if hasattr(self, "adn") else x


def conv_bn_relu(c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, dropout: float) -> Convolution:
    return Convolution(
        strided_conv(c_in, c_out, kernel, stride), ADN(batch_norm(c_out, len(kernel)), dropout, nn.ReLU())
    )


class ConvBlock(nn.Module):
    """Two conv -> BN -> dropout -> ReLU; the first carries the level's stride."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...], stride: int, dropout: float):
        super().__init__()
        self.conv = nn.Sequential(
            conv_bn_relu(c_in, c_out, kernel, stride, dropout), conv_bn_relu(c_out, c_out, kernel, 1, dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConv(nn.Module):
    """Transposed conv (x stride) -> BN -> ReLU, from the level below's channels to this level's."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...], stride: int):
        super().__init__()
        self.up = Convolution(
            conv_transpose(c_in, c_out, kernel, stride), ADN(batch_norm(c_out, len(kernel)), 0.0, nn.ReLU())
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class AttentionBlock(nn.Module):
    """The gate: ``psi = sigmoid(BN(conv(relu(BN(W_g g) + BN(W_x x)))))``, one channel; returns
    (x * psi, psi)."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        f_int = channels // 2
        self.W_g = nn.Sequential(Convolution(conv(channels, f_int, 1, dims)), batch_norm(f_int, dims))
        self.W_x = nn.Sequential(Convolution(conv(channels, f_int, 1, dims)), batch_norm(f_int, dims))
        self.psi = nn.Sequential(Convolution(conv(f_int, 1, 1, dims)), batch_norm(1, dims), nn.Sigmoid())
        self.relu = nn.ReLU()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        psi = self.psi(self.relu(self.W_g(g) + self.W_x(x)))
        return x * psi, psi


class AttentionLayer(nn.Module):
    """One level: ``submodule`` (the down block, then the next level: a Sequential; the down block
    alone at the bottom), ``upconv``, ``attention`` and ``merge`` (conv 3 -> InstanceNorm -> PReLU)."""

    def __init__(self, config: MonaiConfig, level: int, below: AttentionLayer | None):
        super().__init__()
        c, dims, stride = config.channels, config.spatial_dims, config.strides[level]
        self.attention = AttentionBlock(c[level], dims)
        self.upconv = UpConv(c[level + 1], c[level], config.kernel("up_kernel_size"), stride)
        merge = strided_conv(2 * c[level], c[level], (3,) * dims, 1)
        self.merge = Convolution(merge, ADN(instance_norm(c[level], dims), config.dropout, nn.PReLU()))
        down = ConvBlock(c[level], c[level + 1], config.kernel("kernel_size"), stride, config.dropout)
        self.submodule = down if below is None else nn.Sequential(down, below)

    __jit_unused_properties__ = ["down"]  # the model reads it; TorchScript compiles forward only

    @property
    def down(self) -> ConvBlock:
        return self.submodule if isinstance(self.submodule, ConvBlock) else self.submodule[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MONAI's recursion: the levels below run inside ``submodule``, this one decodes their output."""
        return self.decode(x, self.submodule(x))["merge"]

    def decode(self, x: torch.Tensor, below: torch.Tensor) -> dict[str, torch.Tensor]:
        """This level's decoder from its input ``x`` (the skip) and the level below's output:
        ``up`` (the upsampled signal), ``ag`` (psi) and ``merge`` (the level's output)."""
        up = self.upconv(below)
        gated, psi = self.attention(up, x)
        return {"up": up, "ag": psi, "merge": self.merge(torch.cat([gated, up], dim=1))}


class MonaiAttentionUNet(nn.Module):
    """MONAI's AttentionUnet, NCHW in and out (NCDHW in 3D); returns logits. ``compute_dtype`` as
    in ``impl_torch.AttentionUNet`` (None, or torch.bfloat16 for mixed precision)."""

    def __init__(self, config: MonaiConfig, *, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be None (the parameters' dtype) or one of {list(COMPUTE_DTYPES)}, "
                f"got {compute_dtype!r}"
            )
        if not isinstance(config, MonaiConfig):
            raise TypeError(f"expected a MonaiConfig, got {type(config).__name__}")
        self.compute_dtype = compute_dtype
        self.config = config
        c, dims = config.channels, config.spatial_dims
        kernel = config.kernel("kernel_size")
        head = ConvBlock(config.in_channels, c[0], kernel, 1, config.dropout)
        below = None
        for level in reversed(range(config.depth)):
            below = AttentionLayer(config, level, below)
        self.model = nn.Sequential(head, below, Convolution(conv(c[0], config.out_channels, 1, dims)))

    @property
    def levels(self) -> list[AttentionLayer]:
        """The AttentionLayers from the top level down."""
        layers, layer = [], self.model[1]
        while True:
            layers.append(layer)
            if isinstance(layer.submodule, ConvBlock):
                return layers
            layer = layer.submodule[1]

    def check_input(self, x: torch.Tensor) -> None:
        check_input_shape(self.config, x.shape, "channels_first")

    def forward(self, x: torch.Tensor, return_intermediates: bool = False):
        """Logits (N, out_channels, *sides); with ``return_intermediates`` also every block's output
        by ``config.block_names``: ``e1``.., ``b1``, ``d1.up``, ``d1.ag`` (psi), ``d1``.., ``output``."""
        self.check_input(x)
        if self.compute_dtype is None:
            return self._forward(x, return_intermediates)
        with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype):
            return self._forward(x, return_intermediates)

    def _forward(self, x: torch.Tensor, return_intermediates: bool):
        levels = self.levels
        depth = len(levels)
        x = self.model[0](x)
        named: dict[str, torch.Tensor] = {"e1": x}
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
