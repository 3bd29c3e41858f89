"""The ``parity`` subcommand: one checkpoint through every framework, each block compared with a
float64 reference (``weights_convert.harness.parity``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from weights_convert.core.extras import MissingPackage
from weights_convert.core.losses import LOSSES
from weights_convert.harness.cli.arguments import add_config, add_sides, choices, count, options, selection, usage_error

# The options ``parity.check`` takes as they are parsed, under the same names.
CHECK_OPTIONS = (
    "dtype",
    "device",
    "mode",
    "batch",
    "seed",
    "steps",
    "optimizer",
    "data_parallel",
    "batchnorm",
    "resume_at",
    "config",
    "loss",
)


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
            return usage_error("parity", str(error))
        if Path(args.report).exists() and not args.force:
            return usage_error("parity", f"--report {args.report}: already exists (pass --force to overwrite)")
    try:
        selected = selection("parity", args.frameworks, args.keras_backends)
    except (parity.ParityError, MissingPackage) as error:
        return usage_error("parity", str(error))
    try:
        report = parity.check(
            args.checkpoint,
            frameworks=selected.frameworks,
            keras_backends=selected.keras_backends,
            size=args.size,
            trajectory=bool(args.report),
            progress=progress,
            **options(args, CHECK_OPTIONS),
        )
    except parity.ParityError as error:
        return usage_error("parity", str(error))
    if args.json:
        print(json.dumps({**report.to_json(), "skipped": list(selected.skipped)}))
    else:
        print(parity.format_table(report, verbose=args.verbose))
    if args.report:
        for path in parity.write_report(report, args.report):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if report.passed else 1


def add_parser(sub) -> None:
    """The ``parity`` subcommand on ``sub`` (argparse subparsers)."""
    from weights_convert.harness import parity

    p = sub.add_parser(
        "parity",
        help="run one checkpoint through every framework and compare each block with a float64 reference",
        description="Each row passes when its relative error is within its bound: 1e-10 in float64, a multiple "
        "of the rounding noise measured in the same run in float32 and mixed bfloat16. "
        "Exit 0 when every strict row passes, 1 when any fails, 2 on bad usage.",
    )
    p.add_argument("checkpoint", nargs="?", help="any supported checkpoint (default: seeded random default model)")
    p.add_argument(
        "--frameworks",
        type=choices(parity.FRAMEWORKS + tuple(parity.EXPORT_TARGETS)),
        help="comma-separated (default: every installed framework); the export targets "
        f"{', '.join(parity.EXPORT_TARGETS)} are checked only when named (eval mode; onnx float32 only)",
    )
    p.add_argument(
        "--keras-backends",
        type=choices(parity.KERAS_BACKENDS),
        help="comma-separated (default: KERAS_BACKEND if set, else every installed one)",
    )
    p.add_argument(
        "--dtype",
        choices=parity.DTYPES,
        default="float32",
        help="float64 must agree to 1e-10; float32 and mixed_bfloat16 (bfloat16 compute, float32 parameters) "
        "within a multiple of the reference's own rounding noise, measured in the same run",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--mode",
        choices=parity.MODES,
        default="eval",
        help="eval: block outputs; train: also running statistics, gradients and one step of each optimizer; "
        "fit: --steps training steps (losses, final parameters and statistics)",
    )
    p.add_argument("--steps", type=count("--steps", 1), default=parity.DEFAULT_STEPS, help="training steps in fit mode")
    p.add_argument(
        "--optimizer",
        choices=tuple(dict.fromkeys(parity.OPTIMIZER_NAMES + parity.RESUME_OPTIMIZERS)),
        help="fit: the optimizer (default adam); train: only this one; with --resume-at: only this one of "
        f"{', '.join(parity.RESUME_OPTIMIZERS)} (default all three)",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="mse",
        help="train and fit: the loss whose gradients are compared (docs/architecture.md section 3b); a "
        "segmentation loss trains on a seeded one-hot target",
    )
    p.add_argument(
        "--resume-at",
        type=count("--resume-at", 1),
        metavar="K",
        help="fit: every framework trains K of the --steps, saves a training checkpoint in its native format "
        "(.pt, .orbax, .keras), and every framework continues each of them after a convert; the rows "
        "resume/<from>-><to>/<optimizer>/... must match the uninterrupted reference run. Its optimizers are "
        "the training checkpoints' (sgd with momentum 0.9, adam, adamw)",
    )
    add_config(p)
    add_sides(p, "the input's sides: H W, or D H W for a 3D model (default: 64 64, or 32 32 32)")
    p.add_argument("--batch", type=count("--batch", 1), default=parity.DEFAULT_BATCH, help="images per batch")
    p.add_argument("--seed", type=count("--seed", 0), default=0, help="seed of the input (and training target)")
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
        type=count("--data-parallel", 1),
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
