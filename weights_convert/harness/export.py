"""Deployment exports of any checkpoint, by destination name, and the parity check of an exported file.

========================  ==========================  =============  ==========================  ================
destination               written by                  layout         runs in                     dtypes
========================  ==========================  =============  ==========================  ================
``*.onnx``                torch dynamo ONNX exporter  NCHW, NCDHW    onnxruntime                 float32
``*.pt2``                 ``torch.export``            NCHW, NCDHW    ``torch.export.load``       float32, float64
``*.torchscript``         ``torch.jit.script``        NCHW, NCDHW    ``torch.jit.load``          float32, float64
``*.savedmodel`` (dir)    Keras ``model.export``      NHWC, NDHWC    ``tf.saved_model.load``     float32, float64
``*.jaxexport``           ``jax.export`` (Flax)       NHWC, NDHWC    ``jax.export.deserialize``  float32, float64
========================  ==========================  =============  ==========================  ================

Every file computes the eval forward (logits; BatchNorm with its running statistics) and has a
dynamic batch and dynamic sides (H, W, or D, H, W for a 3D model): any batch >= 1 and any side
>= the model's ``min_size`` (2**depth), odd sizes included. ONNX is float32 only because onnxruntime has no float64
convolution on CPU; that is refused in one line.

Writes follow ``convert``'s rules: an existing destination is kept unless ``force``; the file is
written to a temporary sibling, checked there, and renamed into place only when complete and
(unless ``check=False``) when it passed, so a failed export or check leaves nothing behind.

The check (``check``) runs the exported file in its own runtime on seeded inputs (``CHECK_CASES``:
batch 2 at an odd size, and batch 1 at another size (volumes for a 3D model), neither the batch nor the size traced at
export) and compares its logits with the float64 NumPy reference (``weights_convert.harness.reference``),
as the parity command compares a framework's output: float64 files to 1e-10; float32 files within
the noise-relative float32 bound of ``weights_convert.harness.parity.tolerances``, the noise measured on
the same input from the reference computed in float32; plus the mask row (logit > 0 agrees on
every pixel decided beyond the bound).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.extras import require
from weights_convert.core.spec import ModelConfig, axes_layout
from weights_convert.harness import reference
from weights_convert.harness.parity.compare import Row, compare, mask_row, rel_diff
from weights_convert.harness.parity.inputs import make_inputs

DTYPES = ("float32", "float64")


class ExportError(CheckpointError):
    """An export that cannot be made (unknown destination, unsupported dtype); one line for the user."""


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One export format: its destination suffix, the framework that writes it, the runtime that
    runs it, where its inputs' channels sit, the dtypes it keeps and the modules it needs."""

    suffix: str
    framework: str  # the module with ``export(checkpoint, path, dtype)`` and ``run(path, x)``
    writer: str
    runtime: str
    data_format: str  # "channels_first" (NCHW, NCDHW) or "channels_last" (NHWC, NDHWC), of the input and the logits
    dtypes: tuple[str, ...]
    modules: tuple[str, ...]
    is_directory: bool = False
    dtype_reason: str = ""

    def module(self):
        require(self.modules, f"{self.suffix} export")
        if self.framework == "torch":
            from impl_torch import export
        elif self.framework == "flax":
            from impl_flax import export
        else:
            from impl_keras import export
        return export


FORMATS = {
    fmt.suffix: fmt
    for fmt in (
        ExportFormat(
            ".onnx",
            "torch",
            "the torch dynamo ONNX exporter",
            "onnxruntime",
            "channels_first",
            ("float32",),
            ("torch", "onnx", "onnxscript", "onnxruntime"),
            dtype_reason="onnxruntime has no float64 convolution on CPU",
        ),
        ExportFormat(".pt2", "torch", "torch.export", "torch.export.load", "channels_first", DTYPES, ("torch",)),
        ExportFormat(
            ".torchscript", "torch", "torch.jit.script", "torch.jit.load", "channels_first", DTYPES, ("torch",)
        ),
        ExportFormat(
            ".savedmodel",
            "keras",
            "Keras model.export (TensorFlow backend)",
            "tf.saved_model.load",
            "channels_last",
            DTYPES,
            ("keras", "tensorflow"),
            is_directory=True,
        ),
        # jax.export serializes through flatbuffers, which JAX itself does not install.
        ExportFormat(
            ".jaxexport",
            "flax",
            "jax.export",
            "jax.export.deserialize",
            "channels_last",
            DTYPES,
            ("jax", "flax", "flatbuffers"),
        ),
    )
}


def format_for(path) -> ExportFormat:
    """The export format named by ``path``'s suffix; an unknown one is refused in one line."""
    suffix = Path(path).suffix
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise ExportError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; choose from {known}")
    return FORMATS[suffix]


def check_cases(config: ModelConfig) -> list[tuple[int, ...]]:
    """(batch, *sides) of each checked input, with the model's ``min_size`` m. Images: batch 2 at
    37x53 (odd, and (2m+5)x(3m+5) when m is above 37), and batch 1 at (m + 3)x(m + 1), where the
    bottleneck is 1x1. Volumes, which cost a side more: batch 2 at (2m+1)x(2m+3)x(2m+5), and
    batch 1 at (m + 3)x(m + 1)x(m + 5). MONAI's network, with m its ``side_multiple``: batch 2 at
    3m x 5m (x 7m), batch 1 at m x 2m (x m), the bottom then 1 x 2 (x 1)."""
    if config.side_multiple > 1:  # MONAI's network: multiples of the strides' product, the smallest included
        m, dims = config.side_multiple, config.spatial_dims
        return [(2, *(3 * m, 5 * m, 7 * m)[:dims]), (1, *(m, 2 * m, m)[:dims])]
    m = config.min_size
    if config.spatial_dims == 3:
        return [(2, 2 * m + 1, 2 * m + 3, 2 * m + 5), (1, m + 3, m + 1, m + 5)]
    odd = (37, 53) if m <= 37 else (2 * m + 5, 3 * m + 5)
    return [(2, *odd), (1, m + 3, m + 1)]


@dataclasses.dataclass(frozen=True)
class CaseResult:
    shape: tuple[int, ...]  # channels first: NCHW, NCDHW
    output: Row
    mask: Row
    logits: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)  # channels first

    @property
    def passed(self) -> bool:
        return self.output.passed and self.mask.passed


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """The verdict on one exported file: one output row and one mask row per checked input."""

    path: str
    fmt: ExportFormat
    dtype: str
    cases: tuple[CaseResult, ...]

    @property
    def layout(self) -> str:
        """The file's input layout: NCHW, NHWC, NCDHW or NDHWC."""
        return axes_layout(len(self.cases[0].shape) - 2, self.fmt.data_format)

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    def line(self) -> str:
        """The one-line verdict."""
        verdict = "passed" if self.passed else "FAILED"
        shapes = ", ".join("x".join(map(str, case.shape)) for case in self.cases)
        worst = max(self.cases, key=lambda case: case.output.rel_diff / max(case.output.tolerance, 1e-300))
        masks = sum(int(case.mask.max_abs_diff) for case in self.cases)
        canonical = axes_layout(len(self.cases[0].shape) - 2, "channels_first")
        return (
            f"export check {verdict}: {self.path} ({self.layout} {self.dtype}) in {self.fmt.runtime} against "
            f"the float64 reference at {shapes} ({canonical}): output rel diff {worst.output.rel_diff:.3g} "
            f"(bound {worst.output.tolerance:.3g}), {masks} decided mask pixels differ"
        )


def _dtype_of(fmt: ExportFormat, dtype: str | None) -> str:
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise ExportError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype not in fmt.dtypes:
        supported = ", ".join(fmt.dtypes)
        raise ExportError(f"{fmt.suffix} export supports {supported} only ({fmt.dtype_reason}), got {dtype}")
    return dtype


def export(
    src,
    dst,
    *,
    dtype: str | None = None,
    force: bool = False,
    check: bool = True,
    config: ModelConfig | None = None,
) -> ExportCheck | None:
    """Export the checkpoint ``src`` (any supported format, or a ``Checkpoint``) to ``dst``, the
    format chosen by ``dst``'s name, at ``dtype`` (default float32). With ``check`` the exported
    file is checked (``check``) before it is moved into place: a failing file is not kept, and the
    failing verdict is returned. Returns the verdict, or None without ``check``."""
    from weights_convert.formats.io import _atomic_target, _signals_clean_up, read

    dst = Path(dst)
    fmt = format_for(dst)
    module = fmt.module()  # a missing package is refused before anything is read
    if dst.exists() and not force:
        raise ExportError(f"{dst}: already exists (pass force=True to overwrite)")
    dtype = _dtype_of(fmt, dtype)
    checkpoint = src if isinstance(src, Checkpoint) else read(src, config=config)
    verdict = None
    try:
        with _signals_clean_up(), _atomic_target(dst, fmt.is_directory, force=force) as tmp:
            module.export(checkpoint, tmp, dtype)
            if check:
                verdict = dataclasses.replace(check_file(tmp, checkpoint, dtype=dtype, trusted=True), path=str(dst))
                if not verdict.passed:
                    raise _CheckFailed  # leaves the temporary folder, and nothing is put in place
    except _CheckFailed:
        pass
    return verdict


class _CheckFailed(Exception):
    """The exported file failed its check: it is not moved to its destination."""


def run(path, x: np.ndarray, fmt: ExportFormat | None = None, *, trusted: bool = False) -> np.ndarray:
    """The logits (channels first: NCHW, NCDHW) of the exported file ``path`` on ``x`` (channels
    first), run in its own runtime: ``x`` is transposed to the file's layout, keeping its dtype.

    An export file is a program, not data: its runtime runs whatever its graph does (a TorchScript
    forward can write files). ``trusted=True`` says the caller made the file or vouches for it;
    without it nothing is loaded. Checkpoint formats are data, and their readers never run code."""
    fmt = fmt or format_for(path)
    if not trusted:
        raise ExportError(
            f"{path}: a {fmt.suffix} file is a program that {fmt.runtime} runs; pass trusted=True only for a "
            f"file you made or vouch for"
        )
    module = fmt.module()
    if fmt.data_format == "channels_last":
        logits = module.run(path, np.ascontiguousarray(np.moveaxis(x, 1, -1)))
        return np.moveaxis(logits, -1, 1)
    return module.run(path, np.ascontiguousarray(x))


@dataclasses.dataclass(frozen=True)
class ReferenceCase:
    """One checked input (channels first, float64), the float64 reference's logits on it, and (below
    float64) the noise of the reference computed at the checked dtype, which sets the bound."""

    x: np.ndarray
    expected: np.ndarray
    noise: dict | None


def reference_cases(checkpoint: Checkpoint, *, dtype: str = "float32", cases=None, seed: int = 0):
    """The ``ReferenceCase`` of each (batch, *sides) of ``cases`` (default ``check_cases``),
    on seeded inputs (seed ``seed + k`` for the k-th case), computed once for any number of files."""
    config = checkpoint.config
    exact = checkpoint.astype("float64").tensors
    references = []
    for k, (batch, *sides) in enumerate(cases or check_cases(config)):
        x, _ = make_inputs(config, batch, tuple(sides), seed=seed + k)
        expected = reference.forward(exact, x, config=config)["output"]
        noise = None
        if dtype != "float64":
            at_dtype = reference.forward(checkpoint.tensors, x, config=config, precision=dtype)["output"]
            noise = {"output": rel_diff(at_dtype, expected, dtype)[1]}
        references.append(ReferenceCase(x, expected, noise))
    return references


def judge_file(path, references, *, dtype: str = "float32", trusted: bool = False) -> ExportCheck:
    """Run the exported file ``path`` on each ``ReferenceCase`` of ``references`` and compare its
    output and mask with the float64 reference; a runtime that fails is an ``ExportError`` naming
    why. ``trusted`` as in ``run``: the file is a program."""
    fmt = format_for(path)
    results = []
    for case in references:
        try:
            actual = run(path, case.x.astype(dtype), fmt, trusted=trusted)
        except ExportError:
            raise
        except Exception as error:  # an export that cannot run a supported input is refused, naming why
            message = " ".join(str(error).split())[:200]
            shape = "x".join(map(str, case.x.shape))
            raise ExportError(f"{path}: {fmt.runtime} failed on a {shape} input: {message}") from error
        (output,) = compare({"output": actual}, {"output": case.expected}, dtype, noise=case.noise)
        mask = mask_row(actual, case.expected, output.tolerance, dtype)
        results.append(CaseResult(case.x.shape, output, mask, np.asarray(actual)))
    return ExportCheck(str(path), fmt, dtype, tuple(results))


def check_file(
    path, checkpoint: Checkpoint, *, dtype: str = "float32", cases=None, seed: int = 0, trusted: bool = False
) -> ExportCheck:
    """Run the exported file ``path`` (written from ``checkpoint`` at ``dtype``) on seeded inputs
    of ``cases`` ((batch, *sides); default ``check_cases``) and compare each output and mask
    with the float64 reference; see the module docstring. ``trusted`` as in ``run``."""
    references = reference_cases(checkpoint, dtype=dtype, cases=cases, seed=seed)
    return judge_file(path, references, dtype=dtype, trusted=trusted)
