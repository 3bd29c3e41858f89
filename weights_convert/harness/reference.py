"""An independent NumPy reference of the networks, written from ARCHITECTURE.md and sharing no
code with any implementation: the forward, a hand-written reverse mode, the optimizer steps and
multi-step training that every implementation is compared with. Both architectures
(``config.architecture``): the article's Attention U-Net (docs/architecture.md section 1) and
MONAI's AttentionUnet (section 1b), each a network of the same ops on the same tape
(``ArticleGraph``, ``MonaiGraph``).

Eval mode uses the running statistics; train mode normalises with the batch statistics and
returns the updated running statistics (torch's rule: ``new = 0.9 * old + 0.1 * batch``, the
variance unbiased) as ``state/<name>``. Inputs and results are NCHW arrays, NCDHW for a 3D model
(``spatial_dims``, inferred from the kernels' rank), with canonical names and layouts
(conv OIHW, OIDHW; a transposed conv (in, out, *k)); internally activations are channels last
(NHWC, NDHWC) and kernels HWIO (DHWIO), so that every convolution is one BLAS matmul of its taps
side by side (im2col: 9 for a 3x3 kernel, 27 for 3x3x3, any odd sides per axis, every
``stride``-th window) with the kernel; a transposed convolution is that convolution's adjoint, its
input gradient. Every op is one code path for both ranks: BatchNorm normalises over every axis but
the channels, InstanceNorm over each sample's spatial axes, the max pool takes 2x2 (2x2x2) windows,
the upsampling is bilinear (trilinear) as one interpolation matrix per axis, the zero padding pads
every spatial axis to the skip.

The reference has no dropout: a train-mode pass of a MONAI config with dropout > 0 is refused
(parity compares train mode at dropout 0); eval mode ignores dropout, as every framework does.

The backward is a tape: each op of the forward appends ``(backward, inputs, output)``, where
``backward`` maps the output's gradient to its inputs' gradients (and stores the gradients of
the op's parameters); ``Graph.backward`` walks the tape in reverse, summing the gradients of
activations used more than once (the skip connections, the gate's inputs).

``precision`` selects one of three runs of the same code path:

- ``"float64"``: every array float64 (the exact reference).
- ``"float32"``: every array float32 (weights, input, activations, gradients, optimizer state),
  NumPy float32 BLAS: a reference run at float32, to measure float32 rounding noise.
- ``"mixed_bfloat16"``: how frameworks train in mixed precision. Parameters, BatchNorm
  statistics, parameter gradients and the optimizer are float32; convolution operands are
  rounded to bfloat16 and their products accumulated in float32; every activation and every
  activation gradient is rounded to bfloat16 after its op; the loss is float32. BatchNorm and
  InstanceNorm compute their statistics in float32. The rounding is ``Precision.round``
  (bfloat16 values held in float32 arrays).
"""

from __future__ import annotations

import itertools
import math

import ml_dtypes
import numpy as np

from weights_convert.core.architectures import Config, infer_config
from weights_convert.core.monai_spec import MonaiConfig, down_prefix, level_prefix
from weights_convert.core.optim import check_fit_batches, check_optimizer, state_results
from weights_convert.core.optimizer_state import reference_step
from weights_convert.core.spec import ModelConfig, layout, param_specs, side_fits, side_rule
from weights_convert.harness import reference_losses

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch's convention: weight of the new batch statistic
PRECISIONS = ("float64", "float32", "mixed_bfloat16")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------------------------
# Precision: the only place that knows about dtypes and rounding.


class Precision:
    """Storage dtype of parameters, statistics and gradients, and the rounding of activations."""

    def __init__(self, name: str):
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
        self.name = name
        self.dtype = np.dtype(np.float64 if name == "float64" else np.float32)
        self.bfloat16 = name == "mixed_bfloat16"

    def array(self, x) -> np.ndarray:
        """A parameter, statistic, input or target in the storage dtype."""
        return np.asarray(x, dtype=self.dtype)

    def round(self, x: np.ndarray) -> np.ndarray:
        """An activation, activation gradient or convolution operand: bfloat16 in mixed precision."""
        if self.bfloat16:
            return x.astype(ml_dtypes.bfloat16).astype(np.float32)
        return x


# ---------------------------------------------------------------------------------------------
# Ops on channels-last arrays (N, *spatial, C): NHWC or NDHWC, forward and backward (one
# function each). Every op is written once for any number of spatial axes.


IM2COL_ELEMENTS = 2**23  # largest patch matrix built at once (64 MiB in float64); larger inputs go in row bands


def _row_bands(h: int, elements_per_row: int):
    """(start, stop) bands of output rows (indices along the first spatial axis: H, or D in 3D)
    whose patch matrices hold at most IM2COL_ELEMENTS."""
    rows = max(1, IM2COL_ELEMENTS // max(1, elements_per_row))
    return [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]


def _per_axis(value, dims: int) -> tuple[int, ...]:
    """A padding given once for every spatial axis, or per axis, as one entry per axis."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _taps(kernel_sides):
    """The kernel offsets, one tuple per tap, in row-major order ((dy, dx), or (dz, dy, dx)):
    ``prod(kernel_sides)`` of them."""
    return list(itertools.product(*(range(k) for k in kernel_sides)))


def _box(start, sides, stride: int = 1):
    """The index of a box of an (N, *spatial, C) array: ``sides`` positions from ``start`` on
    each spatial axis, every ``stride``-th one, every sample and channel (one tap's input window,
    a crop, a pooled region)."""
    spatial = (slice(a, a + (s - 1) * stride + 1, stride) for a, s in zip(start, sides, strict=True))
    return (slice(None), *spatial, slice(None))


def _patches(xp, kernel_sides, sides, stride: int = 1):
    """(N, *spatial, C) -> (N * prod(sides), prod(kernel_sides) * C): for each of the ``sides``
    output positions (every ``stride``-th window) the taps side by side, tap-major ((dy, dx, c),
    or (dz, dy, dx, c)), which is the row order of an HWIO (DHWIO) kernel reshaped to
    (prod(kernel_sides) * C, O)."""
    channels = xp.shape[-1]
    if stride == 1 and math.prod(kernel_sides) == 1:
        return xp.reshape(-1, channels)
    taps = [xp[_box(offset, sides, stride)] for offset in _taps(kernel_sides)]
    return np.concatenate(taps, axis=-1).reshape(-1, len(taps) * channels)


def _band_input(xp, kernel_sides, stride: int, r0: int, r1: int):
    """The padded input rows that output rows r0..r1 - 1 read: from r0 * stride to the last one's
    window end."""
    return xp[:, r0 * stride : (r1 - 1) * stride + kernel_sides[0]]


def _pad_spatial(x, pad):
    """Symmetric zero padding of every spatial axis of an (N, *spatial, C) array: ``pad`` on
    each side, one number for every axis or one per axis."""
    pad = _per_axis(pad, x.ndim - 2)
    if not any(pad):
        return x
    return np.pad(x, ((0, 0), *[(p, p) for p in pad], (0, 0)))


def _conv_products(x, kernel, pad, stride: int):
    """``conv`` without its bias: one matmul per band of output rows of the patches and the
    kernel (products summed in the operands' dtype)."""
    kernel_sides = kernel.shape[:-2]
    xp = _pad_spatial(x, pad)
    n = xp.shape[0]
    # Output sides, the banded axis first: (padded - k) // stride + 1 windows on each axis.
    h, *rest = ((side - k) // stride + 1 for side, k in zip(xp.shape[1:-1], kernel_sides, strict=True))
    kmat = kernel.reshape(-1, kernel.shape[-1])  # (prod(kernel_sides) * C, O)
    out = np.empty((n, h, *rest, kmat.shape[1]), dtype=np.result_type(x, kernel))
    for r0, r1 in _row_bands(h, n * math.prod(rest) * kmat.shape[0]):
        band = _patches(_band_input(xp, kernel_sides, stride, r0, r1), kernel_sides, (r1 - r0, *rest), stride)
        out[:, r0:r1] = (band @ kmat).reshape(n, r1 - r0, *rest, -1)
    return out


def conv(x, kernel, bias, pad, stride: int = 1):
    """x (N, *spatial, C), kernel (*kernel_sides, C, O) (HWIO or DHWIO, any sides) ->
    (N, *spatial', O): symmetric zero padding ``pad`` (one number or one per axis), the window
    every ``stride`` positions on each axis, then the bias. One matmul over the taps and the
    channels (products summed in the operands' dtype), in bands of output rows."""
    return _conv_products(x, kernel, pad, stride) + bias


def _conv_input_gradient(g, kernel, pad, stride: int, input_sides):
    """The gradient of ``conv`` with respect to its (N, *input_sides, C) input: g @ kernel^T
    scattered back onto the taps, each output position onto the window it read (``stride``
    apart); positions no window read get zero. This is also the transposed convolution of g."""
    pad = _per_axis(pad, len(input_sides))
    n, h, *rest, o = g.shape
    c = kernel.shape[-2]
    taps = _taps(kernel.shape[:-2])
    kmat = kernel.reshape(len(taps) * c, o)
    padded = [side + 2 * p for side, p in zip(input_sides, pad, strict=True)]
    gxp = np.zeros((n, *padded, c), dtype=np.result_type(g, kernel))
    for r0, r1 in _row_bands(h, n * math.prod(rest) * kmat.shape[0]):
        sides = (r1 - r0, *rest)
        gpatches = (g[:, r0:r1].reshape(-1, o) @ kmat.T).reshape(n, *sides, len(taps), c)
        for t, (first, *others) in enumerate(taps):
            gxp[_box((r0 * stride + first, *others), sides, stride)] += gpatches[..., t, :]
    return gxp[_box(pad, input_sides)] if any(pad) else gxp


def _conv_kernel_gradient(g, x, kernel_sides, pad, stride: int):
    """The gradient of ``conv`` with respect to its kernel: patches^T @ g, summed over the bands."""
    xp = _pad_spatial(x, pad)
    n, h, *rest, o = g.shape
    rows = math.prod(kernel_sides) * x.shape[-1]
    gkmat = np.zeros((rows, o), dtype=np.result_type(g, x))
    for r0, r1 in _row_bands(h, n * math.prod(rest) * rows):
        band = _patches(_band_input(xp, kernel_sides, stride, r0, r1), kernel_sides, (r1 - r0, *rest), stride)
        gkmat += band.T @ g[:, r0:r1].reshape(-1, o)
    return gkmat.reshape(*kernel_sides, x.shape[-1], o)


def conv_backward(g, x, kernel, pad, need_input=True, stride: int = 1):
    """Gradients of ``conv`` with respect to x (None unless ``need_input``), kernel and bias."""
    gx = _conv_input_gradient(g, kernel, pad, stride, x.shape[1:-1]) if need_input else None
    return gx, _conv_kernel_gradient(g, x, kernel.shape[:-2], pad, stride), channel_sum(g)


def _transposed_sides(sides, kernel_sides, pad, stride: int):
    """The output sides of ``conv_transpose``: ``(n - 1) * stride - 2 * pad + k + output_padding``
    with PyTorch's output_padding ``stride - 1``; ``n * stride`` for an odd k padded (k - 1) / 2."""
    pad = _per_axis(pad, len(sides))
    return [(n - 1) * stride - 2 * p + k + stride - 1 for n, k, p in zip(sides, kernel_sides, pad, strict=True)]


def conv_transpose(x, kernel, bias, pad, stride: int):
    """x (N, *spatial, I), kernel (*kernel_sides, O, I) -> (N, *spatial', O): PyTorch's
    ConvTranspose(k, stride, padding=pad, output_padding=stride - 1) with weight (I, O, *k), whose
    channels-last transpose is ``kernel``. It is the adjoint of ``conv(., kernel, pad, stride)``
    from O channels to I (docs/architecture.md section 1b): each input position i scatters the
    kernel onto outputs ``i * stride - pad + t``; outputs past the last window (the output
    padding) get the bias alone."""
    sides = _transposed_sides(x.shape[1:-1], kernel.shape[:-2], pad, stride)
    return _conv_input_gradient(x, kernel, pad, stride, sides) + bias


def conv_transpose_backward(g, x, kernel, pad, stride: int, need_input=True):
    """Gradients of ``conv_transpose`` with respect to x (None unless ``need_input``), kernel and
    bias: x's is the strided convolution of g, the kernel's that convolution's kernel gradient
    with the roles of input and output gradient swapped."""
    gx = _conv_products(g, kernel, pad, stride) if need_input else None
    return gx, _conv_kernel_gradient(x, g, kernel.shape[:-2], pad, stride), channel_sum(g)


def channel_sum(x):
    """Per-channel sum of an (..., C) array by pairwise summation (NumPy sums a contiguous last
    axis pairwise, other axes one row at a time): a float32 sum over every axis but the channels
    then errs ~log(n)*eps, as a framework's tree reduction does, not ~n*eps."""
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T).sum(axis=1)


def channel_mean(x):
    return channel_sum(x) / (x.size // x.shape[-1])


def batch_norm_backward(g, xhat, weight, inv_std, train):
    """Gradients with respect to x, weight and bias of ``y = xhat * weight + bias``, where
    ``xhat = (x - mean) * inv_std``; in train mode mean and inv_std depend on x (biased variance)."""
    gweight = channel_sum(g * xhat)
    gbias = channel_sum(g)
    if train:
        n = g.size // g.shape[-1]
        gx = (weight * inv_std) * (g - gbias / n - xhat * (gweight / n))
    else:
        gx = g * (weight * inv_std)
    return gx, gweight, gbias


def relu(x):
    return np.maximum(x, 0)


def relu_backward(g, y):
    """The gradient passes where the input was > 0 (equivalently, the output is > 0)."""
    return np.where(y > 0, g, 0)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sigmoid_backward(g, y):
    return g * (y * (1 - y))


def prelu(x, slope):
    """x where x > 0, slope * x elsewhere (``slope`` of shape (1,): PReLU's one parameter)."""
    return np.where(x > 0, x, slope * x)


def prelu_backward(g, x, slope):
    """Gradients of ``prelu`` with respect to x and the slope (the sum of g * x where x <= 0)."""
    negative = x <= 0
    gslope = np.where(negative, g * x, 0).ravel().sum()
    return np.where(negative, slope * g, g), np.reshape(gslope, slope.shape)


def sum_to(x, shape):
    """``x`` summed over the axes where ``shape`` is 1 and x is not (the gradient of an operand
    broadcast there); ``x`` itself when the shapes agree."""
    if x.shape == tuple(shape):
        return x
    axes = tuple(axis for axis, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
    return x.sum(axis=axes, keepdims=True)


def _samples_as_channels(x):
    """(N, *S, C) -> (*S, N * C): each (sample, channel) pair a channel of its own, so that the
    per-channel statistics of BatchNorm are InstanceNorm's per-sample ones."""
    return np.moveaxis(x, 0, -2).reshape(*x.shape[1:-1], -1)


def _samples_from_channels(x, shape):
    """The inverse of ``_samples_as_channels`` for an (N, *S, C) ``shape``."""
    n, *sides, c = shape
    return np.ascontiguousarray(np.moveaxis(x.reshape(*sides, n, c), -2, 0))


def _window_axes(dims: int) -> tuple[int, ...]:
    """The transpose of (N, S1//2, 2, S2//2, 2, .., C) to (N, S1//2, S2//2, .., C, 2, 2, ..): the
    window offsets last, in the order of the spatial axes."""
    return (0, *range(1, 2 * dims, 2), 2 * dims + 1, *range(2, 2 * dims + 1, 2))


def _pool_windows(x):
    """(N, *S, C) -> (N, *(S // 2), C, 2**dims): each 2x2 (2x2x2) window flattened in row-major
    order of its offsets ((dy, dx), or (dz, dy, dx)); odd sides floored."""
    n, *sides, c = x.shape
    dims = len(sides)
    pooled = [side // 2 for side in sides]
    covered = x[_box([0] * dims, [2 * p for p in pooled])]
    split = covered.reshape(n, *itertools.chain.from_iterable((p, 2) for p in pooled), c)
    return split.transpose(_window_axes(dims)).reshape(n, *pooled, c, 2**dims)


def max_pool(x):
    """2x2 (2x2x2), stride 2, floor for odd sizes."""
    return _pool_windows(x).max(axis=-1)


def max_pool_backward(g, x):
    """The gradient goes to each window's maximum; on ties, to the first in row-major order of
    the window's offsets (lexicographic over (dy, dx), or (dz, dy, dx)), as torch's kernels scan."""
    n, *pooled, c = g.shape
    dims = len(pooled)
    windows = _pool_windows(x)
    first_max = windows.argmax(axis=-1)[..., None] == np.arange(2**dims)
    gwindows = np.where(first_max, g[..., None], 0)
    covered = [2 * p for p in pooled]
    split = gwindows.reshape(n, *pooled, c, *[2] * dims).transpose(np.argsort(_window_axes(dims)))
    gx = np.zeros_like(x, dtype=g.dtype)
    gx[_box([0] * dims, covered)] = split.reshape(n, *covered, c)
    return gx


def interpolation_matrix(n: int, dtype=np.float64) -> np.ndarray:
    """(2n, n) linear interpolation weights along one axis with align_corners=True: output i
    samples input i*(n-1)/(2n-1)."""
    m = np.zeros((2 * n, n))
    for i in range(2 * n):
        src = i * (n - 1) / (2 * n - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m.astype(dtype)


# einsum letters of the spatial axes before (n) and after (2n) the upsampling; a 2D array takes
# the last two.
_SIDES = "dhw"
_SIDES_UPSAMPLED = "kij"


def _interpolate(x, sides, upsampled: bool):
    """Each spatial axis of x (N, *S, C) mapped by the interpolation matrix M (2s, s) of its
    ``sides`` entry s: by M (s -> 2s) when x is not ``upsampled``, else by M^T (2s -> s). One
    einsum, the operands in the order (M_1, x, M_2, ..): that order and these letters fix the
    contraction path NumPy picks, so that 2D computes bit for bit what ``ih,nhwc,jw->nijc`` does."""
    dims = len(sides)
    small, large = _SIDES[-dims:], _SIDES_UPSAMPLED[-dims:]
    given, result = (large, small) if upsampled else (small, large)
    matrices = [interpolation_matrix(side, x.dtype) for side in sides]
    subscripts = [f"{to}{of}" for to, of in zip(large, small, strict=True)]  # each M is (2s, s)
    operands = [matrices[0], x, *matrices[1:]]
    inputs = [subscripts[0], f"n{given}c", *subscripts[1:]]
    return np.einsum(f"{','.join(inputs)}->n{result}c", *operands, optimize=True)


def upsample(x):
    """Bilinear (trilinear in 3D) x2, align_corners=True: separable, the matrix of each axis
    applied along it (y = Mh x Mw^T on each (H, W) plane in 2D)."""
    return _interpolate(x, x.shape[1:-1], upsampled=False)


def upsample_backward(g):
    """The transpose of the interpolation: each axis mapped by its M^T (gx = Mh^T g Mw in 2D)."""
    return _interpolate(g, [side // 2 for side in g.shape[1:-1]], upsampled=True)


def _pad_widths(shape, target):
    """(before, after) zeros on each spatial axis from an (N, *S, C) ``shape`` to the ``target``
    shape's sides: d // 2 before, the rest after."""
    return [(d // 2, d - d // 2) for d in (t - s for s, t in zip(shape[1:-1], target[1:-1], strict=True))]


def pad_to(x, target):
    """Zeros on every spatial axis up to the ``target`` shape's sides (the skip's shape)."""
    return np.pad(x, ((0, 0), *_pad_widths(x.shape, target), (0, 0)))


def pad_to_backward(g, shape):
    """The gradient of the unpadded region: ``shape`` is the input's shape."""
    before = [b for b, _ in _pad_widths(shape, g.shape)]
    return g[_box(before, shape[1:-1])]


# ---------------------------------------------------------------------------------------------
# The network on a tape.


class Node:
    """An activation: its value and, during the backward, its gradient."""

    __slots__ = ("value", "grad", "needs_grad")

    def __init__(self, value, needs_grad=True):
        self.value = value
        self.grad = None
        self.needs_grad = needs_grad


class Graph:
    """One pass over canonical tensors: the tape and the ops; a subclass per architecture builds
    its network from them (``__call__``: the named block outputs). Collects BatchNorm state and
    (with ``record``) the tape that ``backward`` walks to fill ``grads`` (canonical names)."""

    def __init__(self, tensors: dict, *, train: bool, precision: str = "float64", record: bool = False):
        self.p = Precision(precision)
        self.t = {k: self.p.array(v) for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
        self.counters = {k: np.asarray(v) for k, v in tensors.items() if k.endswith("num_batches_tracked")}
        self.train = train
        self.state: dict[str, np.ndarray] = {}
        self.tape: list | None = [] if record else None
        self.grads: dict[str, np.ndarray] = {}

    # -- tape ---------------------------------------------------------------------------------

    def op(self, value, inputs, backward) -> Node:
        """A new activation ``value`` computed from ``inputs``; ``backward(g)`` returns one
        gradient per input (None for an input that needs none)."""
        node = Node(value)
        if self.tape is not None:
            self.tape.append((backward, inputs, node))
        return node

    def backward(self, output: Node, grad) -> None:
        """Walk the tape once, from ``output`` (whose gradient is ``grad``) back; consumes it, so
        that each op's saved arrays are freed as soon as its backward has run."""
        output.grad = grad
        while self.tape:
            backward, inputs, node = self.tape.pop()
            if node.grad is None:
                continue
            for x, g in zip(inputs, backward(node.grad), strict=True):
                if g is None or not x.needs_grad:
                    continue
                x.grad = g if x.grad is None else self.p.round(x.grad + g)
            node.grad = None  # done with it: frees memory on the way back

    # -- ops ----------------------------------------------------------------------------------

    def conv(self, x: Node, prefix: str, stride: int = 1) -> Node:
        """The convolution ``prefix`` of either network: zero padding (k - 1) / 2 on each side of
        each axis (1 for 3x3, 0 for 1x1), every ``stride``-th window, its bias."""
        r = self.p.round
        weight = self.t[f"{prefix}.weight"]
        kernel = r(weight).transpose(_channels_last_kernel(weight.ndim))  # OIHW -> HWIO, OIDHW -> DHWIO
        pad = _half_kernel(weight)
        xv = r(x.value)
        y = r(conv(xv, kernel, self.t[f"{prefix}.bias"], pad, stride))

        def backward(g):
            gx, gkernel, gbias = conv_backward(g, xv, kernel, pad, need_input=x.needs_grad, stride=stride)
            self.grads[f"{prefix}.weight"] = gkernel.transpose(np.argsort(_channels_last_kernel(weight.ndim)))
            self.grads[f"{prefix}.bias"] = gbias
            return (None if gx is None else r(gx),)

        return self.op(y, (x,), backward)

    def conv_transpose(self, x: Node, prefix: str, stride: int) -> Node:
        """The transposed convolution ``prefix`` (weight (in, out, *k)): padding (k - 1) / 2 and
        output padding ``stride - 1``, so that each side grows exactly ``stride``-fold. Rounded as
        ``conv`` is: bfloat16 operands, float32 sums, a bfloat16 result."""
        r = self.p.round
        weight = self.t[f"{prefix}.weight"]
        # (in, out, *k) -> (*k, out, in): the channels-last kernel of the convolution it is the adjoint of.
        kernel = r(weight).transpose(_channels_last_kernel(weight.ndim))
        pad = _half_kernel(weight)
        xv = r(x.value)
        y = r(conv_transpose(xv, kernel, self.t[f"{prefix}.bias"], pad, stride))

        def backward(g):
            gx, gkernel, gbias = conv_transpose_backward(g, xv, kernel, pad, stride, need_input=x.needs_grad)
            self.grads[f"{prefix}.weight"] = gkernel.transpose(np.argsort(_channels_last_kernel(weight.ndim)))
            self.grads[f"{prefix}.bias"] = gbias
            return (None if gx is None else r(gx),)

        return self.op(y, (x,), backward)

    def batch_norm(self, x: Node, prefix: str) -> Node:
        xv = x.value
        weight, bias = self.t[f"{prefix}.weight"], self.t[f"{prefix}.bias"]
        train = self.train
        if train:
            n = xv.size // xv.shape[-1]
            mean = channel_mean(xv)
            var = channel_mean((xv - mean) ** 2)  # biased: what normalises the batch
            unbiased = var * n / (n - 1)  # what torch stores in running_var
            old_mean, old_var = self.t[f"{prefix}.running_mean"], self.t[f"{prefix}.running_var"]
            self.state[f"{prefix}.running_mean"] = (1 - BN_MOMENTUM) * old_mean + BN_MOMENTUM * mean
            self.state[f"{prefix}.running_var"] = (1 - BN_MOMENTUM) * old_var + BN_MOMENTUM * unbiased
            counter = f"{prefix}.num_batches_tracked"
            self.state[counter] = np.asarray(self.counters.get(counter, 0) + 1, dtype=np.int64)
        else:
            mean, var = self.t[f"{prefix}.running_mean"], self.t[f"{prefix}.running_var"]
        inv_std = 1 / np.sqrt(var + BN_EPS)
        xhat = (xv - mean) * inv_std
        y = self.p.round(xhat * weight + bias)

        def backward(g):
            gx, gweight, gbias = batch_norm_backward(g, xhat, weight, inv_std, train)
            self.grads[f"{prefix}.weight"] = gweight
            self.grads[f"{prefix}.bias"] = gbias
            return (self.p.round(gx),)

        return self.op(y, (x,), backward)

    def instance_norm(self, x: Node) -> Node:
        """InstanceNorm without affine: each sample's channels normalised by their own statistics
        over the spatial axes (biased variance), the same in train and eval. It is train-mode
        BatchNorm of unit weight over an array whose channels are the (sample, channel) pairs;
        statistics in the storage dtype (float32 in mixed precision), as BatchNorm's."""
        shape = x.value.shape
        pairs = _samples_as_channels(x.value)
        mean = channel_mean(pairs)
        var = channel_mean((pairs - mean) ** 2)
        inv_std = 1 / np.sqrt(var + BN_EPS)
        xhat = (pairs - mean) * inv_std
        y = self.p.round(_samples_from_channels(xhat, shape))

        def backward(g):
            gpairs, _, _ = batch_norm_backward(_samples_as_channels(g), xhat, 1.0, inv_std, train=True)
            return (self.p.round(_samples_from_channels(gpairs, shape)),)

        return self.op(y, (x,), backward)

    # relu, max pool, pad and concat select or move values: exact on bfloat16 operands, as their
    # backwards are on bfloat16 gradients, so they need no rounding.

    def relu(self, x: Node) -> Node:
        y = relu(x.value)
        return self.op(y, (x,), lambda g: (relu_backward(g, y),))

    def prelu(self, x: Node, prefix: str) -> Node:
        """PReLU of the one slope ``prefix.weight``: x where x > 0, slope * x elsewhere."""
        xv, slope = x.value, self.t[f"{prefix}.weight"]
        y = self.p.round(prelu(xv, slope))

        def backward(g):
            gx, self.grads[f"{prefix}.weight"] = prelu_backward(g, xv, slope)
            return (self.p.round(gx),)

        return self.op(y, (x,), backward)

    def sigmoid(self, x: Node) -> Node:
        y = self.p.round(sigmoid(x.value))
        return self.op(y, (x,), lambda g: (self.p.round(sigmoid_backward(g, y)),))

    def add(self, a: Node, b: Node) -> Node:
        return self.op(self.p.round(a.value + b.value), (a, b), lambda g: (g, g))

    def multiply(self, a: Node, b: Node) -> Node:
        """a * b, either one broadcast over the other's channels (MONAI's one-channel gate): the
        broadcast operand's gradient is summed over the channels."""
        av, bv = a.value, b.value

        def backward(g):
            return self.p.round(sum_to(g * bv, av.shape)), self.p.round(sum_to(g * av, bv.shape))

        return self.op(self.p.round(av * bv), (a, b), backward)

    def max_pool(self, x: Node) -> Node:
        xv = x.value
        return self.op(max_pool(xv), (x,), lambda g: (max_pool_backward(g, xv),))

    def upsample(self, x: Node) -> Node:
        return self.op(self.p.round(upsample(x.value)), (x,), lambda g: (self.p.round(upsample_backward(g)),))

    def pad_to(self, x: Node, target: tuple[int, ...]) -> Node:
        """``x`` zero-padded to the spatial sides of the ``target`` shape (the skip's)."""
        shape = x.value.shape
        return self.op(pad_to(x.value, target), (x,), lambda g: (pad_to_backward(g, shape),))

    def concat(self, a: Node, b: Node) -> Node:
        split = a.value.shape[-1]
        return self.op(np.concatenate([a.value, b.value], axis=-1), (a, b), lambda g: (g[..., :split], g[..., split:]))


class ArticleGraph(Graph):
    """The article's Attention U-Net (docs/architecture.md section 1) on the tape."""

    def conv_block(self, x: Node, prefix: str) -> Node:
        x = self.relu(self.batch_norm(self.conv(x, f"{prefix}.0"), f"{prefix}.1"))
        return self.relu(self.batch_norm(self.conv(x, f"{prefix}.3"), f"{prefix}.4"))

    def gate(self, g: Node, s: Node, prefix: str) -> Node:
        a = self.relu(
            self.add(
                self.batch_norm(self.conv(g, f"{prefix}.Wg.0"), f"{prefix}.Wg.1"),
                self.batch_norm(self.conv(s, f"{prefix}.Ws.0"), f"{prefix}.Ws.1"),
            )
        )
        return self.sigmoid(self.conv(a, f"{prefix}.output.0"))

    def __call__(self, x: Node, config: ModelConfig) -> dict[str, Node]:
        named: dict[str, Node] = {}
        skips = []
        for i in range(1, config.depth + 1):
            s = named[f"e{i}"] = self.conv_block(x, f"e{i}.conv.conv")
            skips.append(s)
            x = self.max_pool(s)
        x = named["b1"] = self.conv_block(x, "b1.conv")
        for j in range(1, config.depth + 1):
            s = skips[-j]
            x = self.pad_to(self.upsample(x), s.value.shape)
            a = named[f"d{j}.ag"] = self.gate(x, s, f"d{j}.ag")
            x = named[f"d{j}"] = self.conv_block(self.concat(x, self.multiply(a, s)), f"d{j}.c1.conv")
        named["output"] = self.conv(x, "output")
        return named


class MonaiGraph(Graph):
    """MONAI's AttentionUnet (docs/architecture.md section 1b) on the tape, at dropout 0 (the
    reference has no dropout: ``_graph`` refuses a train-mode pass of a config with dropout)."""

    def convolution(self, x: Node, prefix: str, stride: int) -> Node:
        """MONAI's ``Convolution``: conv (``stride``) -> BatchNorm -> ReLU."""
        return self.relu(self.batch_norm(self.conv(x, f"{prefix}.conv", stride), f"{prefix}.adn.N"))

    def conv_block(self, x: Node, prefix: str, stride: int) -> Node:
        """Two Convolutions, the first carrying the level's stride (the downsampling)."""
        x = self.convolution(x, f"{prefix}.conv.0", stride)
        return self.convolution(x, f"{prefix}.conv.1", 1)

    def up(self, x: Node, prefix: str, stride: int) -> Node:
        """The transposed conv (``stride``-fold sides) -> BatchNorm -> ReLU."""
        return self.relu(self.batch_norm(self.conv_transpose(x, f"{prefix}.conv", stride), f"{prefix}.adn.N"))

    def gate(self, g: Node, x: Node, prefix: str) -> Node:
        """psi = sigmoid(BN(conv(relu(BN(W_g g) + BN(W_x x))))): one channel, the attention map."""
        a = self.relu(
            self.add(
                self.batch_norm(self.conv(g, f"{prefix}.W_g.0.conv"), f"{prefix}.W_g.1"),
                self.batch_norm(self.conv(x, f"{prefix}.W_x.0.conv"), f"{prefix}.W_x.1"),
            )
        )
        return self.sigmoid(self.batch_norm(self.conv(a, f"{prefix}.psi.0.conv"), f"{prefix}.psi.1"))

    def merge(self, x: Node, prefix: str) -> Node:
        """Conv 3 (3x3x3) -> InstanceNorm -> PReLU."""
        return self.prelu(self.instance_norm(self.conv(x, f"{prefix}.conv")), f"{prefix}.adn.A")

    def __call__(self, x: Node, config: MonaiConfig) -> dict[str, Node]:
        """The head, each level's strided down block, then from the deepest level up: the
        transposed conv, the gate on that level's input, the merge of the gated input and the
        upsampled one; the output conv. Named by ``config.block_names``."""
        depth = config.depth
        x = self.conv_block(x, "model.0", 1)
        named: dict[str, Node] = {"e1": x}
        inputs = [x]  # each level's input: its skip
        for level in range(depth):
            x = self.conv_block(x, down_prefix(config, level), config.strides[level])
            named[f"e{level + 2}" if level < depth - 1 else "b1"] = x
            inputs.append(x)
        for j in range(1, depth + 1):
            level = depth - j
            prefix, skip = level_prefix(level), inputs[level]
            up = named[f"d{j}.up"] = self.up(x, f"{prefix}.upconv.up", config.strides[level])
            psi = named[f"d{j}.ag"] = self.gate(up, skip, f"{prefix}.attention")
            x = named[f"d{j}"] = self.merge(self.concat(self.multiply(skip, psi), up), f"{prefix}.merge")
        named["output"] = self.conv(x, "model.2.conv")
        return named


# The network on the tape of each architecture (``config.architecture``).
GRAPHS = {"article": ArticleGraph, "monai": MonaiGraph}


def _graph(config, tensors: dict, *, train: bool, precision: str, record: bool = False) -> Graph:
    """The tape of ``config``'s network; a train-mode pass of a config with dropout is refused:
    the reference has no dropout (its masks are random streams no two frameworks share)."""
    dropout = getattr(config, "dropout", 0.0)  # the article's network has none
    if train and dropout > 0:
        raise ValueError(
            f"the reference compares train mode at dropout 0 (it has no dropout): pass a config with dropout 0.0, "
            f"got dropout {dropout}"
        )
    return GRAPHS[config.architecture](tensors, train=train, precision=precision, record=record)


def _channels_last_kernel(rank: int) -> tuple[int, ...]:
    """The transpose of a canonical kernel to channels last: OIHW -> HWIO, OIDHW -> DHWIO."""
    return (*range(2, rank), 1, 0)


def _half_kernel(weight) -> tuple[int, ...]:
    """(k - 1) / 2 for each spatial side k of a canonical kernel (OIHW, OIDHW, or a transposed
    convolution's (in, out, *k)): every convolution's symmetric padding, in either network."""
    return tuple((k - 1) // 2 for k in weight.shape[2:])


def _channels_last(x):
    """NCHW -> NHWC, NCDHW -> NDHWC."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def _channels_first(x):
    """NHWC -> NCHW, NDHWC -> NCDHW."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def _input(x, config: Config, p: Precision) -> Node:
    """The network's input as a channels-last node, refused unless of rank ``spatial_dims + 2``
    with sides the network takes (for MONAI's, multiples of the strides' product)."""
    x = p.array(x)
    if x.ndim != config.spatial_dims + 2:
        axes = layout(config, "channels_first")
        raise ValueError(
            f"the {config.spatial_dims}D model takes {axes} inputs, got a {x.ndim}-D array of shape {x.shape}"
        )
    if not all(side_fits(config, side) for side in x.shape[2:]):
        raise ValueError(f"the model takes spatial sides {side_rule(config)}, got an input of shape {x.shape}")
    return Node(_channels_last(x), needs_grad=False)


def _config(tensors, config):
    return config or infer_config({k: np.shape(v) for k, v in tensors.items()})


def _trainable(config: Config) -> list[str]:
    return [p.name for p in param_specs(config) if not p.is_buffer]


def _buffers(config: Config) -> list[str]:
    return [p.name for p in param_specs(config) if p.is_buffer]


# ---------------------------------------------------------------------------------------------
# Public API.


def forward(
    tensors: dict, x, *, train: bool = False, config: Config | None = None, precision: str = "float64"
) -> dict[str, np.ndarray]:
    """Named block outputs in ``config.block_names`` order (``e1``.., ``b1``, per decoder ``d1.ag``
    (the attention map), ``d1``, and for MONAI's network first ``d1.up``; ``output``), NCHW (NCDHW
    in 3D), computed at ``precision`` (see the module docstring); in train mode also
    ``state/<name>`` for every running statistic after the pass."""
    config = _config(tensors, config)
    graph = _graph(config, tensors, train=train, precision=precision)
    named = graph(_input(x, config, graph.p), config)
    results = {k: _channels_first(v.value) for k, v in named.items()}
    results.update({f"state/{k}": v for k, v in graph.state.items()})
    return results


def _loss_and_gradients(tensors: dict, x, target, config: Config, precision: str, loss: str = "mse"):
    """(loss, {name: gradient}, {name: running statistic after the pass}, {block: NCHW or NCDHW
    output}) of one train-mode pass; ``loss`` one of ``weights_convert.core.losses.LOSSES``."""
    graph = _graph(config, tensors, train=True, precision=precision, record=True)
    p = graph.p
    named = graph(_input(x, config, p), config)
    blocks = {k: _channels_first(v.value) for k, v in named.items()}  # before the backward frees the tape
    output = named["output"]
    logits = np.asarray(output.value, p.dtype)  # the loss in at least float32, as every framework's
    value, logits_gradient = reference_losses.value_and_gradient(loss, logits, _channels_last(p.array(target)))
    graph.backward(output, p.round(logits_gradient))
    grads = {name: np.ascontiguousarray(graph.grads[name], dtype=p.dtype) for name in _trainable(config)}
    return value, grads, graph.state, blocks


def gradients(
    tensors: dict, x, target, *, config: Config | None = None, precision: str = "float64", loss: str = "mse"
) -> dict:
    """``loss`` (``weights_convert.core.losses``; "mse": mean((output - target)**2)) of the
    train-mode forward, ``grad/<name>`` for every trainable tensor (canonical layout) and
    ``state/<name>`` for every running statistic."""
    config = _config(tensors, config)
    value, grads, state, _ = _loss_and_gradients(tensors, x, target, config, precision, loss)
    results = {"loss": np.asarray(value)}
    results.update({f"grad/{k}": v for k, v in grads.items()})
    results.update({f"state/{k}": state[k] for k in _buffers(config)})
    return results


class Optimizer:
    """SGD (``p -= lr * g``) or Adam with PyTorch's definition (eps added to the bias-corrected
    sqrt(v)), hyperparameters from ``weights_convert.core.optim.OPTIMIZERS``; holds the state, so that
    successive ``step`` calls continue one run."""

    def __init__(self, name: str):
        self.name = name
        self.hyper = dict(check_optimizer(name))
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict, grads: dict) -> dict:
        """The parameters after one step (new arrays, in the parameters' dtype)."""
        self.t += 1
        lr = self.hyper["lr"]
        if self.name == "sgd":
            return {k: p - lr * grads[k] for k, p in params.items()}
        b1, b2, eps = self.hyper["b1"], self.hyper["b2"], self.hyper["eps"]
        step_size = lr / (1 - b1**self.t)
        bias_correction2_sqrt = (1 - b2**self.t) ** 0.5
        updated = {}
        for k, p in params.items():
            g = grads[k]
            self.m[k] = b1 * self.m.get(k, np.zeros_like(p)) + (1 - b1) * g
            self.v[k] = b2 * self.v.get(k, np.zeros_like(p)) + (1 - b2) * (g * g)
            updated[k] = p - step_size * (self.m[k] / (np.sqrt(self.v[k]) / bias_correction2_sqrt + eps))
        return updated


class _Continued:
    """A training checkpoint's optimizer continued with the canonical definitions
    (``weights_convert.core.optimizer_state.reference_step``), its slots in the storage dtype."""

    def __init__(self, state, precision: Precision):
        self.state = state.astype(precision.dtype)

    def step(self, params: dict, grads: dict) -> dict:
        params, self.state = reference_step(params, grads, self.state)
        return params


def train_step(
    tensors: dict,
    x,
    target,
    *,
    optimizer: str,
    config: Config | None = None,
    precision: str = "float64",
    loss: str = "mse",
) -> dict:
    """``grad/<name>`` (as ``gradients``) and ``step/<name>``: every trainable tensor after one
    step of a fresh ``optimizer``."""
    results = train_steps(tensors, x, target, optimizers=(optimizer,), config=config, precision=precision, loss=loss)
    return {name.replace(f"step/{optimizer}/", "step/", 1): value for name, value in results.items()}


def train_steps(
    tensors: dict,
    x,
    target,
    *,
    optimizers,
    config: Config | None = None,
    precision: str = "float64",
    forward: bool = False,
    loss: str = "mse",
) -> dict:
    """``grad/<name>``, then ``step/<optimizer>/<name>`` for each of ``optimizers``: one step of
    each, fresh, from the same weights and gradient (one backward pass for all). With ``forward``,
    first what ``forward(train=True)`` returns, taken from the same pass."""
    config = _config(tensors, config)
    p = Precision(precision)
    _, grads, state, blocks = _loss_and_gradients(tensors, x, target, config, precision, loss)
    params = {k: p.array(tensors[k]) for k in grads}
    results = {**blocks, **{f"state/{k}": v for k, v in state.items()}} if forward else {}
    results.update({f"grad/{k}": v for k, v in grads.items()})
    for optimizer in optimizers:
        stepped = Optimizer(optimizer).step(params, grads)
        results.update({f"step/{optimizer}/{k}": v for k, v in stepped.items()})
    return results


def _sharded_loss_and_gradients(
    tensors: dict, x, target, config: Config, precision: str, shards: int, loss: str = "mse"
):
    """(loss, gradients, running statistics) of one step on ``shards`` consecutive equal parts of
    the batch, each with its own BatchNorm statistics: the mean loss and gradient over the parts,
    part 0's statistics. One part is the whole batch."""
    x, target = np.asarray(x), np.asarray(target)
    if shards < 1 or len(x) % shards:
        raise ValueError(f"batch {len(x)} does not split into {shards} equal shards")
    size = len(x) // shards
    parts = [
        _loss_and_gradients(
            tensors, x[r * size : (r + 1) * size], target[r * size : (r + 1) * size], config, precision, loss
        )[:3]
        for r in range(shards)
    ]
    if shards == 1:
        return parts[0]
    dtype = Precision(precision).dtype
    loss = np.asarray(sum(part[0] for part in parts) / shards, dtype)
    grads = {name: np.asarray(sum(part[1][name] for part in parts) / shards, dtype) for name in parts[0][1]}
    return loss, grads, parts[0][2]


def fit(
    tensors: dict,
    xs,
    targets,
    *,
    optimizer,
    config: Config | None = None,
    precision: str = "float64",
    trajectory: bool = False,
    shards: int = 1,
    loss: str = "mse",
) -> dict:
    """``len(xs)`` training steps with one ``optimizer`` whose state persists: step k runs the
    train-mode forward on ``xs[k-1]`` (updating the running statistics), and one optimizer step on
    the gradient of ``loss`` (``weights_convert.core.losses``; "mse": mean((output - targets[k-1])**2)).

    With ``shards`` > 1, data-parallel training with per-device BatchNorm statistics (torch DDP's
    default, ``batchnorm="local"`` in ``weights_convert.core.data_parallel``): each step's batch is
    split into ``shards`` consecutive equal parts, each part has its own train-mode forward and
    backward, the gradient is the mean of the parts' gradients (as DDP averages them), the loss the
    mean of their losses, and the running statistics are part 0's.

    Returns ``loss/step<k>`` (before step k's update) for every step, then ``param/<name>`` for
    every trainable tensor and ``state/<name>`` for every running statistic after the last step.
    With ``trajectory``, also ``trajectory/step<k>/<name>``: every trainable tensor after step k.

    ``optimizer`` is a name of ``weights_convert.core.optim.OPTIMIZERS``, or the ``OptimizerState``
    of a training checkpoint (``weights_convert.core.optimizer_state``: SGD with momentum, Adam,
    AdamW, at any step), which the run continues with the canonical definitions
    (``reference_step``); the results then also hold the optimizer's state after the last step
    (``weights_convert.core.optim.state_results``)."""
    config = _config(tensors, config)
    p = Precision(precision)
    xs, targets = check_fit_batches(xs, targets)
    params = {k: p.array(tensors[k]) for k in _trainable(config)}
    state = {
        k: np.asarray(tensors[k]) if k.endswith("num_batches_tracked") else p.array(tensors[k])
        for k in _buffers(config)
        if k in tensors
    }
    opt = Optimizer(optimizer) if isinstance(optimizer, str) else _Continued(optimizer, p)
    results: dict[str, np.ndarray] = {}
    for k in range(len(xs)):
        value, grads, new_state = _sharded_loss_and_gradients(
            {**params, **state}, xs[k], targets[k], config, precision, shards, loss
        )
        results[f"loss/step{k + 1}"] = np.asarray(value)
        params = opt.step(params, grads)
        state.update(new_state)
        if trajectory:
            results.update({f"trajectory/step{k + 1}/{name}": v for name, v in params.items()})
    results.update({f"param/{k}": v for k, v in params.items()})
    results.update({f"state/{k}": state[k] for k in _buffers(config) if k in state})
    if isinstance(opt, _Continued):
        results.update(state_results(opt.state))
    return results
