"""The layers of the PyTorch model where the contract's numerics are spelled out (ARCHITECTURE.md
section 3): BatchNorm, conv padding, max pooling, the bilinear (trilinear) x2 upsampling and the zero
padding to the skip, each in its 2D and 3D form (``dims``, the config's ``spatial_dims``).

torch's defaults *are* the contract, so each of these is torch's own layer with its arguments
written out; ``impl_flax/layers.py`` and ``impl_keras/layers.py`` hold the same names where their
framework's defaults differ. Activations are NCHW or NCDHW: the channel axis is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch's BatchNorm defaults are the contract (eps 1e-5, momentum 0.1, unbiased running variance);
# spelled out so the three implementations can be read side by side.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class Conv3d(nn.Conv3d):
    """``nn.Conv3d``, its zero padding made explicit where torch's own padding goes wrong: on the CPU
    in bfloat16 (torch 2.13, oneDNN 3.12, on CPUs with AVX512-BF16), a stride-1 convolution whose
    input depth D is 1 < D < its kernel's depth, at batch >= 2, gets a wrong weight gradient (NaN,
    or values near 1e36), while the same convolution of the input zero-padded beforehand is right.
    Both compute the same sums, so nothing else changes; a 3D network meets such depths at its
    deepest levels (a side of 9 is 2 after two poolings)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript exports are float32 or float64
            if _bfloat16_on_cpu(input) and self.padding_mode == "zeros" and any(self.padding):
                return self._padded_beforehand(input, weight, bias)
        return F.conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.jit.unused
    def _padded_beforehand(self, input, weight, bias):
        before_and_after = [side for pad in reversed(self.padding) for side in (pad, pad)]  # F.pad: last axis first
        padded = F.pad(input, before_and_after)
        return F.conv3d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)


@torch.jit.unused
def _bfloat16_on_cpu(x: torch.Tensor) -> bool:
    """Whether a convolution of ``x`` computes in bfloat16 on the CPU (a bfloat16 input, or under
    bfloat16 autocast)."""
    if x.device.type != "cpu":
        return False
    return x.dtype == torch.bfloat16 or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )


# The torch classes of each spatial rank.
BATCH_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVS = {2: nn.Conv2d, 3: Conv3d}
MAX_POOLS = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
INTERPOLATIONS = {2: "bilinear", 3: "trilinear"}
CONV_TRANSPOSES = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
INSTANCE_NORMS = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def batch_norm(channels: int, dims: int) -> nn.BatchNorm2d | nn.BatchNorm3d:
    # Under bfloat16 autocast this takes a bfloat16 input and still computes its statistics in
    # float32 (torch's mixed-dtype BatchNorm kernels; see impl_torch/model.py), so no cast is needed.
    return BATCH_NORMS[dims](channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv(c_in: int, c_out: int, kernel_size: int, dims: int) -> nn.Conv2d | nn.Conv3d:
    # Explicit symmetric padding (1 for 3x3, 0 for 1x1), the contract the other two reproduce.
    return CONVS[dims](c_in, c_out, kernel_size=kernel_size, padding=kernel_size // 2)


def strided_conv(c_in: int, c_out: int, kernel: tuple[int, ...], stride: int) -> nn.Conv2d | nn.Conv3d:
    """MONAI's convolution: padding (k - 1) / 2 on each side of each axis, any stride (section 1b)."""
    return CONVS[len(kernel)](c_in, c_out, kernel_size=kernel, stride=stride, padding=tuple(k // 2 for k in kernel))


def conv_transpose(c_in: int, c_out: int, kernel: tuple[int, ...], stride: int) -> nn.ConvTranspose2d:
    """MONAI's upsampling: padding (k - 1) / 2 and output padding stride - 1, so that a side n
    becomes exactly n * stride (section 1b)."""
    return CONV_TRANSPOSES[len(kernel)](
        c_in,
        c_out,
        kernel_size=kernel,
        stride=stride,
        padding=tuple(k // 2 for k in kernel),
        output_padding=stride - 1,
    )


def instance_norm(channels: int, dims: int) -> nn.InstanceNorm2d | nn.InstanceNorm3d:
    # MONAI's merge: statistics of each sample over its spatial axes, biased variance, nothing
    # learned and nothing tracked (torch's defaults), the same in train and eval.
    return INSTANCE_NORMS[dims](channels, eps=BN_EPS, affine=False, track_running_stats=False)


def max_pool2x2(dims: int) -> nn.MaxPool2d | nn.MaxPool3d:
    # 2x2 (2x2x2), stride 2, flooring odd sizes: torch's default is the contract.
    return MAX_POOLS[dims](kernel_size=2)


class Upsample2x(nn.Module):
    """Bilinear (trilinear in 3D) x2 with align_corners=True: along each spatial axis, output i
    samples input i * (n - 1) / (2n - 1).

    The scale factor is a float for ``torch.jit.script``; with corners aligned the sample positions
    depend only on the input and output sizes, so it computes exactly what an integer factor does."""

    def __init__(self, dims: int):
        super().__init__()
        self.mode = INTERPOLATIONS[dims]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode=self.mode, align_corners=True)


def pad_to(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Zero-pad every spatial axis of ``x`` up to the skip's size: d // 2 before, the rest after.

    Always a pad, even by zero: a branch on the sizes would be frozen into an exported graph at the
    sizes it was traced with (``torch.export``, the ONNX exporter), and a zero pad is an exact copy."""
    widths: list[int] = []
    for axis in range(x.dim() - 1, 1, -1):  # F.pad takes the last axis first
        d = skip.shape[axis] - x.shape[axis]
        widths += [d // 2, d - d // 2]
    return F.pad(x, widths)
