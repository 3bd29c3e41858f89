"""The ``attention-unet`` command: ``inspect``, ``convert``, ``export``, ``init``, ``parity``, ``bench`` and ``train``.

Exit status: 0 on success, 1 when a checkpoint is refused, a package a file needs is missing or
a check fails, 2 on bad usage (a missing package for a ``--frameworks`` / ``--keras-backends`` /
``--report`` choice included). Errors are one line on stderr, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from pathlib import Path

from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.extras import PACKAGES, MissingPackage, install_hint

# Start-up logging of TensorFlow, gRPC and XLA (oneDNN notices, CUDA and TPU probing) that would
# land on the command's stderr; set before any framework is imported, unless the user set them.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOGGERS = ("jax._src.xla_bridge", "absl")


def _quiet_frameworks() -> None:
    import logging

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _count(name: str, minimum: int):
    """An argparse type: an integer of at least ``minimum``, refused naming ``name``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            kind = "non-negative" if minimum == 0 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {value}")
        return value

    return parse


def _config_json(config) -> str:
    """The config as the JSON that ``--config`` takes."""
    return json.dumps(config.to_dict())


def _config_arg(text: str):
    from weights_convert.core.spec import ModelConfig

    try:
        return ModelConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(f"bad --config {text!r}: {error}") from None


def cmd_inspect(args) -> int:
    import weights_convert
    from weights_convert.formats import format_for

    checkpoint = weights_convert.read(args.file, allow_nonfinite=True)
    dtypes: dict[str, int] = {}
    for value in checkpoint.tensors.values():
        dtypes[str(value.dtype)] = dtypes.get(str(value.dtype), 0) + 1
    info = {
        "file": str(args.file),
        "format": format_for(args.file).name,
        "config": checkpoint.config.to_dict(),  # printed as JSON: what --config takes
        "parameters": checkpoint.parameter_count(),
        "tensors": len(checkpoint.tensors),
        "dtypes": dtypes,
    }
    if checkpoint.optimizer is not None:
        info["optimizer"] = checkpoint.optimizer.name
        info["hyperparameters"] = checkpoint.optimizer.hyper
        info["step"] = checkpoint.optimizer.step
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict) else value}")
    return 0


def cmd_convert(args) -> int:
    import weights_convert

    checkpoint = weights_convert.convert(
        args.src,
        args.dst,
        dtype=args.dtype,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
        allow_overflow=args.allow_overflow,
        config=args.config,
        weights_only=args.weights_only,
    )
    dtypes = checkpoint.float_dtypes
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else ", ".join(f"{len(names)} {d}" for d, names in dtypes.items())
    print(
        f"wrote {args.dst}: {len(checkpoint.tensors)} tensors, {dtype}, config {_config_json(checkpoint.config)}",
        file=sys.stderr,
    )
    if checkpoint.optimizer is not None:
        kept = "dropped (--weights-only)" if args.weights_only else "kept"
        print(
            f"optimizer state: {checkpoint.optimizer.name} at step {checkpoint.optimizer.step}, {kept}", file=sys.stderr
        )
    return 0


def cmd_export(args) -> int:
    from weights_convert.harness import export

    verdict = export.export(
        args.src, args.dst, dtype=args.dtype, force=args.force, check=not args.no_check, config=args.config
    )
    fmt = export.format_for(args.dst)
    if verdict is None:
        print(f"wrote {args.dst}: {fmt.layout} {args.dtype}, not checked (--no-check)", file=sys.stderr)
        return 0
    print(verdict.line())
    return 0 if verdict.passed else 1


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return values

    return parse


def _usage_error(command: str, message: str) -> int:
    print(f"attention-unet {command}: error: {message}", file=sys.stderr)
    return 2


def _selection(command: str, frameworks, keras_backends):
    """The installed frameworks and Keras backends to run (``parity.select``), each one left out
    said on stderr; a usage error (exit 2) when a named one is not installed."""
    from weights_convert.harness import parity

    selection = parity.select(frameworks, keras_backends)
    for line in selection.skipped:
        print(f"{command}: {line}", file=sys.stderr, flush=True)
    return selection


def cmd_parity(args) -> int:
    from weights_convert.harness import parity

    def progress(message: str) -> None:
        if not args.json:
            print(f"parity: {message}", file=sys.stderr, flush=True)

    if args.report:
        # Checked before the run: a report that cannot be written fails now, not after it.
        try:
            from weights_convert.core.extras import require

            require(("matplotlib",), "--report")
        except MissingPackage as error:
            return _usage_error("parity", str(error))
        if Path(args.report).exists() and not args.force:
            return _usage_error("parity", f"--report {args.report}: already exists (pass --force to overwrite)")
    try:
        selection = _selection("parity", args.frameworks, args.keras_backends)
    except (parity.ParityError, MissingPackage) as error:
        return _usage_error("parity", str(error))
    try:
        report = parity.check(
            args.checkpoint,
            frameworks=selection.frameworks,
            keras_backends=selection.keras_backends,
            dtype=args.dtype,
            device=args.device,
            mode=args.mode,
            size=tuple(args.size),
            batch=args.batch,
            seed=args.seed,
            steps=args.steps,
            optimizer=args.optimizer,
            trajectory=bool(args.report),
            progress=progress,
            data_parallel=args.data_parallel,
            batchnorm=args.batchnorm,
            resume_at=args.resume_at,
        )
    except parity.ParityError as error:
        return _usage_error("parity", str(error))
    if args.json:
        print(json.dumps({**report.to_json(), "skipped": list(selection.skipped)}))
    else:
        print(parity.format_table(report, verbose=args.verbose))
    if args.report:
        for path in parity.write_report(report, args.report):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if report.passed else 1


def cmd_init(args) -> int:
    import weights_convert
    from weights_convert.core.random_init import random_checkpoint
    from weights_convert.core.spec import ModelConfig

    checkpoint = random_checkpoint(args.config or ModelConfig(), seed=args.seed, dtype=args.dtype)
    weights_convert.write(checkpoint, args.dst, force=args.force)
    print(f"wrote {args.dst}: config {_config_json(checkpoint.config)}, seed {args.seed}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from weights_convert.core.spec import ModelConfig
    from weights_convert.harness import bench
    from weights_convert.harness.parity import ParityError

    try:
        selection = _selection("bench", args.frameworks, args.keras_backends)
    except (ParityError, MissingPackage) as error:
        return _usage_error("bench", str(error))
    try:
        settings = bench.Settings(
            config=args.config or ModelConfig(),
            batch=args.batch,
            size=tuple(args.size),
            dtype=args.dtype,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            modes=tuple(args.modes),
            variants=tuple(args.variants) if args.variants else None,
        )
        report = bench.run(settings, selection.frameworks, selection.keras_backends, sgemm_n=args.sgemm_n)
    except ValueError as error:
        print(f"attention-unet bench: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else bench.format_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="attention-unet", description=description)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint: format, config, parameter count, dtypes")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert a checkpoint between formats (chosen by extension), losslessly")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), help="cast floating tensors")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/inf values instead of refusing them")
    p.add_argument("--allow-overflow", action="store_true", help="let --dtype turn values too large for it into inf")
    p.add_argument("--config", type=_config_arg, help="expected config as JSON; refused if the file contradicts it")
    p.add_argument("--weights-only", action="store_true", help="drop a training checkpoint's optimizer state")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "export",
        help="export a checkpoint for deployment (.onnx, .pt2, .torchscript, .savedmodel, .jaxexport) and check it",
        description="The format comes from DST's name. Exit 0 when the exported file matches the float64 "
        "reference, 1 when it does not (nothing is then written) or the export is refused.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="the exported model's dtype")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.add_argument("--no-check", action="store_true", help="skip running the export against the reference")
    p.add_argument("--config", type=_config_arg, help="expected config as JSON; refused if the file contradicts it")
    p.set_defaults(func=cmd_export)

    from weights_convert.harness.parity import (
        DEFAULT_BATCH,
        DEFAULT_SIZE,
        DEFAULT_STEPS,
        DTYPES,
        EXPORT_TARGETS,
        FRAMEWORKS,
        KERAS_BACKENDS,
        MODES,
        OPTIMIZER_NAMES,
        RESUME_OPTIMIZERS,
    )

    p = sub.add_parser(
        "parity",
        help="run one checkpoint through every framework and compare each block with a float64 reference",
        description="Exit 0 when every strict row passes, 1 when any fails, 2 on bad usage.",
    )
    p.add_argument("checkpoint", nargs="?", help="any supported checkpoint (default: seeded random default model)")
    p.add_argument(
        "--frameworks",
        type=_choices(FRAMEWORKS + tuple(EXPORT_TARGETS)),
        help="comma-separated (default: every installed framework); the export targets "
        f"{', '.join(EXPORT_TARGETS)} are checked only when named (eval mode; onnx float32 only)",
    )
    p.add_argument(
        "--keras-backends",
        type=_choices(KERAS_BACKENDS),
        help="comma-separated (default: KERAS_BACKEND if set, else every installed one)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="float64 must agree to 1e-10; float32 and mixed_bfloat16 (bfloat16 compute, float32 parameters) "
        "within a multiple of the reference's own rounding noise, measured in the same run",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="eval",
        help="eval: block outputs; train: also running statistics, gradients and one step of each optimizer; "
        "fit: --steps training steps (losses, final parameters and statistics)",
    )
    p.add_argument("--steps", type=_count("--steps", 1), default=DEFAULT_STEPS, help="training steps in fit mode")
    p.add_argument(
        "--optimizer",
        choices=tuple(dict.fromkeys(OPTIMIZER_NAMES + RESUME_OPTIMIZERS)),
        help="fit: the optimizer (default adam); train: only this one; with --resume-at: only this one of "
        f"{', '.join(RESUME_OPTIMIZERS)} (default all three)",
    )
    p.add_argument(
        "--resume-at",
        type=_count("--resume-at", 1),
        metavar="K",
        help="fit: every framework trains K of the --steps, saves a training checkpoint in its native format "
        "(.pt, .orbax, .keras), and every framework continues each of them after a convert; the rows "
        "resume/<from>-><to>/<optimizer>/... must match the uninterrupted reference run. Its optimizers are "
        "the training checkpoints' (sgd with momentum 0.9, adam, adamw)",
    )
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=DEFAULT_SIZE)
    p.add_argument("--batch", type=_count("--batch", 1), default=DEFAULT_BATCH, help="images per batch")
    p.add_argument("--seed", type=_count("--seed", 0), default=0, help="seed of the input (and training target)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose", action="store_true", help="one table row per tensor in train mode")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="write parity.png (fit: loss curves and parameter drift) and the per-row table to DIR "
        "(needs matplotlib: pip install 'attention-unet[report]')",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --report DIR")
    p.add_argument(
        "--data-parallel",
        type=_count("--data-parallel", 1),
        default=1,
        metavar="D",
        help="fit: train on D devices in every framework (CPU: D gloo processes, D JAX host devices)",
    )
    p.add_argument(
        "--batchnorm",
        choices=("sync", "local"),
        default="sync",
        help="with --data-parallel: global-batch statistics (must equal one device on the whole batch) or "
        "per-device ones (must equal the reference computed shard by shard, gradients averaged)",
    )
    p.set_defaults(func=cmd_parity)

    from weights_convert.harness.train import add_parser as add_train_parser

    add_train_parser(sub)

    p = sub.add_parser("init", help="write seeded random weights (non-trivial BatchNorm statistics)")
    p.add_argument("dst")
    p.add_argument("--seed", type=_count("--seed", 0), default=0)
    p.add_argument("--config", type=_config_arg, help="JSON, e.g. '{\"channels\": [8, 16, 32]}'")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=cmd_init)

    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    p = sub.add_parser("bench", help="time eval forward and training steps in every framework against sgemm")
    p.add_argument("--frameworks", type=names, help="comma-separated (default: every installed one)")
    p.add_argument(
        "--keras-backends", type=names, help="comma-separated (default: KERAS_BACKEND if set, else every installed one)"
    )
    p.add_argument("--variants", type=names, help="only these, e.g. 'eager,nnx.jit' (default: all)")
    p.add_argument("--modes", type=names, default=["forward", "train_step"], help="comma-separated")
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument(
        "--dtype",
        choices=("float32", "float64", "mixed_bfloat16"),
        default="float32",
        help="float32: strict float32 rows, and TF32 rows on GPU; mixed_bfloat16: bfloat16 compute, float32 parameters",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation happens here)")
    p.add_argument("--config", type=_config_arg, help="JSON, e.g. '{\"channels\": [8, 16, 32]}'")
    p.add_argument("--sgemm-n", type=int, help="side of the matmul ceilings (default 4096 CPU, 8192 GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
    return parser


def _for_the_command(message: str) -> str:
    """A library message in the command's terms: ``force=True`` is ``--force`` here."""
    return message.replace("pass force=True", "pass --force")


def main(argv: list[str] | None = None) -> int:
    _quiet_frameworks()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, MissingPackage) as error:
        print(f"attention-unet {args.command}: error: {_for_the_command(str(error))}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:  # an optional package imported without a check first
        module = next((m for m in PACKAGES if error.name and error.name.split(".")[0] == m.split(".")[0]), None)
        needs = install_hint(module) if module else f"{error.name}: pip install {error.name}"
        print(f"attention-unet {args.command}: error: this needs {needs}", file=sys.stderr)
        return 1
    except Exception as error:  # a last line of defence: hostile input never ends in a traceback
        message = _for_the_command(textwrap.shorten(str(error) or "-", 300, placeholder=" [...]"))
        print(f"attention-unet {args.command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
