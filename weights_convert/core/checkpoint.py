"""The canonical checkpoint: a config plus canonical tensors (PyTorch names and layouts), validated."""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.spec import ModelConfig, infer_config, param_specs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or trusted; the message is one line for the user."""


@dataclasses.dataclass
class Checkpoint:
    """Config and canonical tensors (name -> numpy array, OIHW conv kernels, state_dict order)."""

    config: ModelConfig
    tensors: dict[str, np.ndarray]

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, np.ndarray],
        config: ModelConfig | None = None,
        *,
        allow_nonfinite: bool = False,
        source: str = "checkpoint",
    ) -> Checkpoint:
        """Validate ``tensors`` against ``config`` (inferred from shapes when None) and order them."""
        if config is None:
            try:
                config = infer_config({k: tuple(np.shape(v)) for k, v in tensors.items()})
            except ValueError as error:
                raise CheckpointError(f"{source}: {error}") from None
        check_tensors(tensors, config, allow_nonfinite=allow_nonfinite, source=source)
        ordered = {p.name: np.asarray(tensors[p.name]) for p in param_specs(config)}
        return cls(config, ordered)

    @property
    def float_dtype(self) -> np.dtype:
        """The dtype of the floating tensors (they share one)."""
        return next(v.dtype for v in self.tensors.values() if v.dtype.kind not in "iub")

    def astype(self, dtype) -> Checkpoint:
        """Floating tensors cast to ``dtype``; integer counters kept as they are."""
        dtype = as_float_dtype(dtype)
        cast = {
            k: (v if v.dtype.kind in "iub" or v.dtype == dtype else v.astype(dtype)) for k, v in self.tensors.items()
        }
        return Checkpoint(self.config, cast)

    def parameter_count(self) -> int:
        return sum(
            int(v.size) for p, v in zip(param_specs(self.config), self.tensors.values(), strict=True) if not p.is_buffer
        )


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def as_float_dtype(dtype) -> np.dtype:
    """numpy dtype for "float16" | "bfloat16" | "float32" | "float64" (bfloat16 via ml_dtypes)."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in FLOAT_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; expected one of {', '.join(FLOAT_DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_tensors(
    tensors: dict[str, np.ndarray],
    config: ModelConfig,
    *,
    allow_nonfinite: bool = False,
    source: str = "checkpoint",
) -> None:
    """Raise one CheckpointError listing every missing, unexpected, misshapen, mistyped or
    non-finite tensor at once, sorted."""
    specs = {p.name: p for p in param_specs(config)}
    problems = []
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(set(tensors) - set(specs))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    wrong_shape, wrong_dtype, nonfinite = [], [], []
    for name in sorted(set(specs) & set(tensors)):
        value, spec = tensors[name], specs[name]
        shape = tuple(np.shape(value))
        if shape != spec.shape:
            wrong_shape.append(f"{name} {shape} (expected {spec.shape})")
            continue
        kind = np.asarray(value).dtype.kind
        is_float = kind == "f" or str(np.asarray(value).dtype) == "bfloat16"
        if spec.dtype_kind == "float" and not is_float:
            wrong_dtype.append(f"{name} {np.asarray(value).dtype} (expected floating)")
        elif spec.dtype_kind == "int" and kind not in "iu":
            wrong_dtype.append(f"{name} {np.asarray(value).dtype} (expected integer)")
        elif is_float and not allow_nonfinite and not np.isfinite(np.asarray(value, dtype=np.float64)).all():
            nonfinite.append(name)
    if wrong_shape:
        problems.append(f"wrong shapes for config {config.to_dict()}: " + "; ".join(wrong_shape))
    if wrong_dtype:
        problems.append("wrong dtypes: " + "; ".join(wrong_dtype))
    if nonfinite:
        problems.append(f"non-finite values (NaN or inf) in {nonfinite} (pass --allow-nonfinite to accept)")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
