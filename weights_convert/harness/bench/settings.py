"""What one bench run measures (``Settings``, the same for every framework) and the data it runs on."""

from __future__ import annotations

import dataclasses

from weights_convert.core.architectures import config_from_dict
from weights_convert.core.frameworks import DEVICES
from weights_convert.core.precisions import DTYPES, param_dtype
from weights_convert.core.spec import ModelConfig, check_sides

MODES = ("forward", "train_step")
# Variant names as they appear in the results (and in ``--variants``); the same in every precision.
VARIANTS = {
    "torch": ("eager", "channels_last", "torch.compile", "torch.compile+channels_last"),
    "flax": ("eager", "nnx.jit"),
    "keras/tensorflow": ("eager", "tf.function", "jit_compile"),
    "keras/jax": ("eager", "jit_compile"),
    "keras/torch": ("eager", "jit_compile"),
}
# The optimizer of every training step, made by each implementation's ``training.make_optimizer``:
# plain SGD at the canonical learning rate, without momentum (whose canonical default is 0.9), so
# that a step keeps no momentum buffer, as the bench has always timed it.
OPTIMIZER = "sgd"
OPTIMIZER_HYPER = {"momentum": 0.0}
# The input when no size is given: an image at the paper's resolution, or a volume of as many voxels
# as a 512x512 image has pixels.
DEFAULT_BENCH_SIDES = {2: (256, 256), 3: (64, 64, 64)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one bench run measures; every framework gets the same."""

    config: ModelConfig = ModelConfig()
    batch: int = 1
    size: tuple[int, ...] | None = None  # H W, or D H W for a 3D config; None: 256 256 or 64 64 64
    dtype: str = "float32"  # what the rows compute in (core.precisions.DTYPES)
    device: str = "cpu"
    repeats: int = 7
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    variants: tuple[str, ...] | None = None  # None: every variant

    def __post_init__(self) -> None:
        if not (isinstance(self.batch, int) and self.batch > 0):
            raise ValueError(f"batch must be a positive integer, got {self.batch!r}")
        sides = check_sides(self.config, self.size, DEFAULT_BENCH_SIDES)
        object.__setattr__(self, "size", tuple(int(side) for side in sides))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats} and {self.warmup}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions of the rows (names of ``core.precisions.PRECISIONS``): float32 is strict
        float32, and on a GPU also TF32 (which a CPU lacks)."""
        if self.dtype == "float32":
            return ("float32", "tf32") if self.device == "gpu" else ("float32",)
        return (self.dtype,)

    @property
    def input_dtype(self) -> str:
        """The dtype of inputs, targets and parameters: float32 under mixed bfloat16."""
        return param_dtype(self.dtype)

    def wants(self, variant: str) -> bool:
        return self.variants is None or variant in self.variants

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Settings:
        data = dict(data)
        data["config"] = config_from_dict(data["config"])
        for key in ("size", "modes", "variants"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def inputs(settings: Settings, channels_last: bool):
    """Deterministic numpy input and target, channels first (NCHW, NCDHW) or last (NHWC, NDHWC),
    in ``settings.input_dtype``."""
    import numpy as np

    config = settings.config
    rng = np.random.default_rng(0)
    x = rng.standard_normal((settings.batch, config.in_channels, *settings.size))
    target = rng.standard_normal((settings.batch, config.out_channels, *settings.size))
    if channels_last:
        x, target = np.moveaxis(x, 1, -1).copy(), np.moveaxis(target, 1, -1).copy()
    return x.astype(settings.input_dtype), target.astype(settings.input_dtype)
