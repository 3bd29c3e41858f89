"""The canonical checkpoint: a config plus canonical tensors (PyTorch names and layouts), validated."""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.core.architectures import Config, assumed, infer_config
from weights_convert.core.errors import CheckpointError
from weights_convert.core.optimizer_state import OptimizerState
from weights_convert.core.spec import LISTED_NAMES, capped, param_specs


@dataclasses.dataclass
class Checkpoint:
    """Config and canonical tensors (name -> numpy array, OIHW conv kernels, state_dict order); a
    training checkpoint also has ``optimizer``, the canonical optimizer state
    (``weights_convert.core.optimizer_state``)."""

    config: Config
    tensors: dict[str, np.ndarray]
    optimizer: OptimizerState | None = None
    # Config fields that neither the file nor its tensors held, with the value assumed
    # (``architectures.assumed``): MONAI's strides and dropout of a plain state_dict.
    assumed: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, np.ndarray],
        config: Config | None = None,
        *,
        allow_nonfinite: bool = False,
        source: str = "checkpoint",
        optimizer: OptimizerState | None = None,
    ) -> Checkpoint:
        """Validate ``tensors`` against ``config`` (inferred from shapes when None) and order them;
        ``optimizer``, when given, is validated against the same config."""
        assumed_fields = {}
        if config is None:
            try:
                config = infer_config({k: tuple(np.shape(v)) for k, v in tensors.items()})
            except ValueError as error:
                raise CheckpointError(f"{source}: {error}") from None
            assumed_fields = assumed(config)
        check_tensors(tensors, config, allow_nonfinite=allow_nonfinite, source=source)
        ordered = {p.name: np.asarray(tensors[p.name]) for p in param_specs(config)}
        if optimizer is not None:
            optimizer.check(config, allow_nonfinite=allow_nonfinite, source=source)
            optimizer = optimizer.ordered(config)
        return cls(config, ordered, optimizer, assumed_fields)

    def weights_only(self) -> Checkpoint:
        """The same model tensors without the optimizer state."""
        return Checkpoint(self.config, self.tensors, assumed=self.assumed)

    @property
    def float_dtype(self) -> np.dtype:
        """The dtype of the first floating tensor (of all of them, unless ``float_dtypes`` has several)."""
        return next(v.dtype for v in self.tensors.values() if v.dtype.kind not in "iub")

    @property
    def float_dtypes(self) -> dict[str, list[str]]:
        """Name of each floating dtype -> the tensors holding it, in ``state_dict`` order. A checkpoint
        read from a foreign file may mix them (say float16 weights and float32 statistics)."""
        names: dict[str, list[str]] = {}
        for name, value in self.tensors.items():
            if value.dtype.kind not in "iub":
                names.setdefault(str(value.dtype), []).append(name)
        return names

    def astype(self, dtype, *, allow_overflow: bool = False) -> Checkpoint:
        """Floating tensors cast to ``dtype``; integer counters kept as they are.

        A finite value that the cast would turn into inf (above 65504 for float16, for instance) is
        refused with one CheckpointError naming the first such tensor and its largest magnitude,
        unless ``allow_overflow``. NaN and inf already in the checkpoint stay what they are.
        """
        dtype = as_float_dtype(dtype)
        cast, overflowed = {}, []
        for name, value in self.tensors.items():
            if value.dtype.kind in "iub" or value.dtype == dtype:
                cast[name] = value
                continue
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is judged below, in one line
                cast[name] = value.astype(dtype)
            if not allow_overflow and (np.isinf(cast[name]) & np.isfinite(value)).any():
                overflowed.append(name)
        if overflowed:
            first = self.tensors[overflowed[0]]
            largest = float(np.max(np.abs(first[np.isfinite(first)].astype(np.float64))))
            others = len(overflowed) - 1
            more = f" (and {others} more tensor{'s' * (others > 1)})" if others else ""
            raise CheckpointError(
                f"casting to {dtype} overflows to inf: {overflowed[0]} has max |value| {largest:.6g}, above "
                f"{float(ml_finfo(dtype).max):.6g} (the largest {dtype}){more}; pass --allow-overflow to write inf"
            )
        optimizer = self.optimizer
        if optimizer is not None:
            slots = optimizer.astype(dtype)
            for name, value in slots.tensors().items():
                with np.errstate(over="ignore", invalid="ignore"):
                    if not allow_overflow and (np.isinf(value) & np.isfinite(optimizer.tensors()[name])).any():
                        raise CheckpointError(
                            f"casting to {dtype} overflows to inf in {name}; pass --allow-overflow to write inf"
                        )
            optimizer = slots
        return Checkpoint(self.config, cast, optimizer, self.assumed)

    def parameter_count(self) -> int:
        return sum(
            int(v.size) for p, v in zip(param_specs(self.config), self.tensors.values(), strict=True) if not p.is_buffer
        )


FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def ml_finfo(dtype):
    """``finfo`` of any floating dtype, bfloat16 included."""
    import ml_dtypes

    return ml_dtypes.finfo(dtype)


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
    config: Config,
    *,
    allow_nonfinite: bool = False,
    source: str = "checkpoint",
) -> None:
    """Raise one CheckpointError naming every missing, unexpected, misshapen, mistyped or non-finite
    tensor at once, sorted; each list shows its first ``LISTED_NAMES`` and counts the rest."""
    specs = {p.name: p for p in param_specs(config)}
    problems = []
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(set(tensors) - set(specs), key=str)
    if missing:
        problems.append(f"missing tensors {capped(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {capped(unexpected)}")
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
        elif is_float and not allow_nonfinite and not np.isfinite(np.asarray(value)).all():
            nonfinite.append(name)
    if wrong_shape:
        problems.append(f"wrong shapes for config {config.to_dict()}: " + _joined(wrong_shape))
    if wrong_dtype:
        problems.append("wrong dtypes: " + _joined(wrong_dtype))
    if nonfinite:
        problems.append(f"non-finite values (NaN or inf) in {capped(nonfinite)} (pass --allow-nonfinite to accept)")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def _joined(items: list[str]) -> str:
    """``a; b; c`` for the first ``LISTED_NAMES`` items, then ``and N more``."""
    shown = "; ".join(items[:LISTED_NAMES])
    return shown if len(items) <= LISTED_NAMES else f"{shown}; and {len(items) - LISTED_NAMES} more"
