"""The layers of the Keras model where Keras' defaults are not the contract (ARCHITECTURE.md
section 3): BatchNorm with torch's numerics and state, conv padding, max pooling, the bilinear x2
upsampling with aligned corners and the zero padding to the skip, each for 2D or 3D (``dims``, the
config's ``spatial_dims``: ``Conv2D`` or ``Conv3D``, bilinear or trilinear); and the layout helpers,
since the activations inside the model use the layout the backend's CPU convolutions prefer
(``default_data_format``) while the model takes and returns channels last (NHWC or NDHWC).

Only ``keras.layers`` and ``keras.ops``, so every backend runs them. ``impl_torch/layers.py`` and
``impl_flax/layers.py`` hold the same names.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import keras
from keras import layers, ops

from weights_convert.core import upsampling

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


def channel_axis(data_format: str, dims: int) -> int:
    """The channel axis of a ``dims``-spatial-axis activation (NCHW / NCDHW: 1; NHWC / NDHWC: last)."""
    return 1 if data_format == "channels_first" else dims + 1


def spatial_axes(data_format: str, dims: int) -> tuple[int, ...]:
    """The spatial axes (H, W or D, H, W) of a ``dims``-spatial-axis activation."""
    first = 2 if data_format == "channels_first" else 1
    return tuple(range(first, first + dims))


def build_shape(channels: int, data_format: str, dims: int) -> tuple:
    """The build shape of a layer that sees ``channels`` channels at any batch size and resolution."""
    shape = [None] * (dims + 2)
    shape[channel_axis(data_format, dims)] = channels
    return tuple(shape)


def with_channels(shape, channels: int, data_format: str) -> tuple:
    """``shape`` (of any rank) with its channel dimension set to ``channels`` (for ``compute_output_shape``)."""
    shape = list(shape)
    shape[channel_axis(data_format, len(shape) - 2)] = channels
    return tuple(shape)


def to_internal(x, data_format: str):
    """Channels-last input (NHWC or NDHWC) in the model's internal layout."""
    if data_format != "channels_first":
        return x
    rank = len(x.shape)
    return ops.transpose(x, (0, rank - 1, *range(1, rank - 1)))


def to_channels_last(x, data_format: str):
    """An activation of the internal layout as NHWC (NDHWC), the model's output layout on every backend."""
    if data_format != "channels_first":
        return x
    rank = len(x.shape)
    return ops.transpose(x, (0, *range(2, rank), 1))


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


@serializable
class Conv3D(layers.Conv3D):
    """``layers.Conv3D`` of an odd kernel at stride 1 whose symmetric zero padding ((k - 1) / 2 on
    each side of each axis: "same") is made explicit, an ``ops.pad`` and then a "valid" convolution.
    The same sums; but TensorFlow's bfloat16 weight gradient on the CPU (oneDNN, on CPUs with
    AVX512-BF16) comes out wrong (NaN, or values near 1e36) for "same" padding at an input depth
    below the kernel's, which a 3D network meets at its deepest levels (a side of 9 is 2 after two
    poolings); torch's has the same fault (``impl_torch.layers.Conv3d``)."""

    def __init__(self, filters, kernel_size, **kwargs):
        kwargs["padding"] = "valid"
        super().__init__(filters, kernel_size, **kwargs)

    def call(self, inputs):
        spatial = spatial_axes(self.data_format, 3)
        widths = [[0, 0] for _ in inputs.shape]
        for axis, side in zip(spatial, self.kernel_size, strict=True):
            widths[axis] = [side // 2, side // 2]
        return super().call(ops.pad(inputs, widths))


# The Keras convolutions of each spatial rank (``impl_torch.layers`` has torch's under the same name).
CONVS = {2: layers.Conv2D, 3: Conv3D}


def batch_norm(name: str, dtype, data_format: str, dims: int) -> BatchNorm:
    return BatchNorm(BN_EPS, BN_MOMENTUM, axis=channel_axis(data_format, dims), name=name, dtype=dtype)


def conv(
    c_out: int, kernel_size: int, name: str, dtype, kernel_initializer, data_format: str, dims: int
) -> layers.Conv2D | layers.Conv3D:
    # At stride 1, "same" for a 3x3 (3x3x3) kernel is exactly the symmetric pad 1 of the contract.
    padding = "same" if kernel_size == 3 else "valid"
    return CONVS[dims](
        c_out,
        kernel_size,
        padding=padding,
        data_format=data_format,
        kernel_initializer=kernel_initializer,
        name=name,
        dtype=dtype,
    )


def max_pool2x2(name: str, dtype, data_format: str) -> MaxPool2x:
    return MaxPool2x(data_format, name=name, dtype=dtype)


@serializable
class MaxPool2x(layers.Layer):
    """2x2 (2x2x2 for a volume) max pooling, stride 2, "valid": odd sizes floor, as torch's
    MaxPool2d(2) / MaxPool3d(2) do; the spatial axes are those of the input's rank.

    ``ops.max_pool``, what ``keras.layers.MaxPooling2D`` / ``MaxPooling3D`` call, except where
    the backend has no such kernel: TensorFlow's MaxPool3D takes no float64. There the maximum is
    taken over the window's 2**dims strided slices, in the window's scan order, so a tie's gradient
    goes to the first maximum, as torch's does.
    """

    def __init__(self, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.data_format = data_format

    def call(self, x):
        dims = len(x.shape) - 2
        dtype = keras.backend.standardize_dtype(x.dtype)
        no_kernel = keras.backend.backend() == "tensorflow" and dims == 3 and dtype == "float64"
        if not no_kernel:
            return ops.max_pool(x, pool_size=2, strides=2, padding="valid", data_format=self.data_format)
        return self.max_of_slices(x, spatial_axes(self.data_format, dims))

    @staticmethod
    def max_of_slices(x, axes):
        shape = ops.shape(x)
        pooled = None
        for offsets in itertools.product((0, 1), repeat=len(axes)):
            index = [slice(None)] * len(shape)
            for axis, offset in zip(axes, offsets, strict=True):
                index[axis] = slice(offset, offset + 2 * (shape[axis] // 2), 2)
            window = x[tuple(index)]
            pooled = window if pooled is None else ops.maximum(pooled, window)
        return pooled

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in spatial_axes(self.data_format, len(shape) - 2):
            shape[axis] = None if shape[axis] is None else shape[axis] // 2
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}


@serializable
class Upsample2x(layers.Layer):
    """Bilinear (trilinear for a volume) x2 with align_corners=True: along each spatial axis,
    output i samples input i * (n - 1) / (2n - 1). The spatial axes are those of the input's rank
    (NHWC / NCHW or NDHWC / NCDHW).

    ``keras.layers.UpSampling2D(interpolation="bilinear")`` and ``tf.image.resize`` sample at
    half-pixel centres ((i + 0.5) / 2 - 0.5): a different function. The rule is
    ``weights_convert.core.upsampling``'s, the Flax model's too, one linear interpolation per axis
    (separable, as torch's trilinear kernel is): computed in at least float32, as torch's kernel
    does for bfloat16 input, and rounded to the input's dtype once.
    """

    def __init__(self, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.data_format = data_format

    def call(self, x):
        axes = spatial_axes(self.data_format, len(x.shape) - 2)
        return upsampling.upsample2x(ops, x, axes, at_least_float32(x.dtype))

    def compute_output_shape(self, input_shape):
        shape = list(input_shape)
        for axis in spatial_axes(self.data_format, len(shape) - 2):
            shape[axis] = None if shape[axis] is None else 2 * shape[axis]
        return tuple(shape)

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}


def pad_to(x, sizes, data_format="channels_last"):
    """Zero-pad every spatial axis of ``x`` up to ``sizes``, the skip's spatial sizes (H, W or
    D, H, W): d // 2 before, the rest after.

    Known equal sizes return ``x`` itself; a symbolic size (a SavedModel trace) always pads, its
    widths symbolic too, so the exported graph holds for every size."""
    shape = ops.shape(x)
    axes = spatial_axes(data_format, len(shape) - 2)
    if len(sizes) != len(axes):
        raise ValueError(f"pad_to takes {len(axes)} sizes for a {len(shape)}-D tensor, got {tuple(sizes)}")
    missing = {axis: size - shape[axis] for axis, size in zip(axes, sizes, strict=True)}
    if all(isinstance(d, int) and d == 0 for d in missing.values()):
        return x
    pad = [[0, 0]] * len(shape)
    for axis, d in missing.items():
        pad[axis] = [d // 2, d - d // 2]
    return ops.pad(x, pad)


# ----------------------------------------------------------------------------------------------
# MONAI's AttentionUnet (docs/architecture.md section 1b): its convolutions, transposed
# convolutions, InstanceNorm and PReLU. Dropout is ``keras.layers.Dropout`` itself (inverted
# dropout in training only, as torch's; at rate 0 it holds no random state).


def padded_sides(kernel: tuple[int, ...]) -> tuple[int, ...]:
    """MONAI's padding of an odd kernel side k: (k - 1) / 2 on each side."""
    return tuple((k - 1) // 2 for k in kernel)


class _MonaiConv(layers.Layer):
    """What MONAI's two convolutions share: ``filters`` outputs, an odd kernel (one side per
    spatial axis), a stride, a kernel and a bias (initialised as Keras' Conv2D initialises its own)."""

    def __init__(
        self,
        filters: int,
        kernel_size: tuple[int, ...],
        strides: int = 1,
        data_format: str = "channels_last",
        kernel_initializer=KERNEL_INITIALIZER,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters, self.kernel_size, self.strides = filters, tuple(kernel_size), strides
        self.data_format, self.kernel_initializer = data_format, kernel_initializer

    @property
    def axes(self) -> tuple[int, ...]:
        return spatial_axes(self.data_format, len(self.kernel_size))

    def kernel_shape(self, c_in: int) -> tuple[int, ...]:
        raise NotImplementedError

    def build(self, input_shape):
        c_in = input_shape[channel_axis(self.data_format, len(self.kernel_size))]
        self.kernel = self.add_weight(shape=self.kernel_shape(c_in), initializer=self.kernel_initializer, name="kernel")
        self.bias = self.add_weight(shape=(self.filters,), initializer="zeros", name="bias")

    def output_side(self, side: int) -> int:
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        shape = list(with_channels(input_shape, self.filters, self.data_format))
        for axis in self.axes:
            shape[axis] = None if shape[axis] is None else self.output_side(shape[axis])
        return tuple(shape)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "data_format": self.data_format,
        }


@serializable
class StridedConv(_MonaiConv):
    """MONAI's convolution: zero padding (k - 1) / 2 on *both* sides of each axis, any stride, bias;
    kernel (*kernel, in, out) as Keras' Conv2D's.

    'SAME' is that padding only at stride 1: at stride 2 it pads (0, 1) on an even side where torch
    pads (1, 1), which shifts every output. So at stride > 1 the input is padded explicitly and
    convolved 'valid', which gives ceil(n / s) positions, as torch's padding does for odd kernels."""

    def kernel_shape(self, c_in: int) -> tuple[int, ...]:
        return (*self.kernel_size, c_in, self.filters)

    def output_side(self, side: int) -> int:
        return -(-side // self.strides)

    def call(self, x):
        if self.strides == 1:
            y = ops.conv(x, self.kernel, strides=1, padding="same", data_format=self.data_format)
        else:
            pad = [[0, 0]] * len(x.shape)
            for axis, side in zip(self.axes, padded_sides(self.kernel_size), strict=True):
                pad[axis] = [side, side]
            padded = ops.pad(x, pad)
            y = ops.conv(padded, self.kernel, strides=self.strides, padding="valid", data_format=self.data_format)
        return add_bias(y, self.bias, self.data_format)


@serializable
class ConvTranspose(_MonaiConv):
    """PyTorch's ``ConvTranspose(k, s, padding=(k - 1) / 2, output_padding=s - 1)`` exactly, which
    turns a side n into n * s: kernel (*kernel, out, in), the layout of Keras' Conv2DTranspose and
    of ``layouts.oihw_to_hwio`` applied to torch's (in, out, *kernel).

    Written as torch defines it: the full transposed convolution (``ops.conv_transpose``, 'valid',
    ``output_padding=0``: (n - 1) * s + k positions on every backend), then on each axis its
    positions p .. p + n*s - 1 (p = (k - 1) / 2); where the full output ends first (k < s + p, as for
    k = 1 or k = s = 3) the missing positions are zeros, and every position gets the bias. Never
    'SAME': for k = 3, s = 2 it keeps positions 0 .. 2n - 1, one to the left of torch's."""

    def kernel_shape(self, c_in: int) -> tuple[int, ...]:
        return (*self.kernel_size, self.filters, c_in)

    def output_side(self, side: int) -> int:
        return side * self.strides

    def call(self, x):
        s = self.strides
        full = ops.conv_transpose(
            x, self.kernel, strides=s, padding="valid", output_padding=0, data_format=self.data_format
        )
        # On an axis of kernel side k, torch's output is positions p .. p + n*s - 1 of the full
        # (n - 1) * s + k: ``missing`` zeros after its end, or ``extra`` positions cut there. Both
        # depend on k and s alone, so a symbolic side (an export's) works too.
        pad = [[0, 0]] * len(full.shape)
        index = [slice(None)] * len(full.shape)
        for axis, k, p in zip(self.axes, self.kernel_size, padded_sides(self.kernel_size), strict=True):
            missing, extra = max(0, p + s - k), max(0, k - s - p)
            pad[axis] = [0, missing]
            index[axis] = slice(p, -extra if extra else None)
        if any(after for _, after in pad):
            full = ops.pad(full, pad)
        return add_bias(full[tuple(index)], self.bias, self.data_format)


def add_bias(x, bias, data_format: str):
    """``x + bias`` along the channel axis of either layout."""
    if data_format == "channels_first":
        bias = ops.reshape(bias, (-1,) + (1,) * (len(x.shape) - 2))
    return x + bias


@serializable
class InstanceNorm(layers.Layer):
    """torch's ``InstanceNorm(affine=False, track_running_stats=False)``, MONAI's merge norm: each
    sample and channel normalised by the mean and *biased* variance over its own spatial axes,
    eps 1e-5; no weights and no running statistics, so train and eval compute the same. Under a
    mixed policy it computes in float32 and returns the compute dtype, as ``BatchNorm`` does."""

    def __init__(self, epsilon: float = BN_EPS, data_format: str = "channels_last", **kwargs):
        super().__init__(**kwargs)
        self.epsilon, self.data_format = epsilon, data_format

    def call(self, x):
        dtype = at_least_float32(self.compute_dtype)
        x = ops.cast(x, dtype)
        axes = spatial_axes(self.data_format, len(x.shape) - 2)
        shape = ops.shape(x)
        n = 1
        for axis in axes:
            n = n * shape[axis]
        n = ops.cast(n, dtype)
        # sum / n, not ops.mean: under JAX, Keras' mean accumulates float64 input in float32.
        mean = ops.sum(x, axis=axes, keepdims=True) / n
        centred = x - mean
        variance = ops.sum(ops.square(centred), axis=axes, keepdims=True) / n
        epsilon = ops.convert_to_tensor(self.epsilon, dtype=dtype)
        return ops.cast(centred * ops.rsqrt(variance + epsilon), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon, "data_format": self.data_format}


@serializable
class PReLU(layers.Layer):
    """torch's ``nn.PReLU()``: one slope ``alpha`` of shape (1,) shared by every channel, 0.25 at
    first; ``x if x > 0 else alpha * x``. ``keras.layers.PReLU`` keeps one slope per position
    unless told which axes to share, in another shape."""

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(1,), initializer=keras.initializers.Constant(0.25), name="alpha")

    def call(self, x):
        return ops.where(x > 0, x, self.alpha * x)

    def compute_output_shape(self, input_shape):
        return input_shape
