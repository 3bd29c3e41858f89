"""The ``bench`` subcommand: eval forward and training steps timed in every framework against
sgemm (``weights_convert.harness.bench``)."""

from __future__ import annotations

import json

from weights_convert.core.extras import MissingPackage
from weights_convert.harness.cli.arguments import add_sides, config_arg, options, selection, usage_error

# The options ``bench.Settings`` takes as they are parsed, under the same names.
SETTINGS_OPTIONS = ("batch", "dtype", "device", "repeats", "warmup")


def cmd_bench(args) -> int:
    from weights_convert.core.spec import ModelConfig
    from weights_convert.harness import bench
    from weights_convert.harness.parity import ParityError

    try:
        selected = selection("bench", args.frameworks, args.keras_backends)
    except (ParityError, MissingPackage) as error:
        return usage_error("bench", str(error))
    try:
        settings = bench.Settings(
            config=args.config or ModelConfig(),
            size=args.size,
            modes=tuple(args.modes),
            variants=tuple(args.variants) if args.variants else None,
            **options(args, SETTINGS_OPTIONS),
        )
        report = bench.run(settings, selected.frameworks, selected.keras_backends, sgemm_n=args.sgemm_n)
    except ValueError as error:
        return usage_error("bench", str(error))
    print(json.dumps(report) if args.json else bench.format_table(report))
    return 0


def names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_parser(sub) -> None:
    """The ``bench`` subcommand on ``sub`` (argparse subparsers)."""
    p = sub.add_parser("bench", help="time eval forward and training steps in every framework against sgemm")
    p.add_argument("--frameworks", type=names, help="comma-separated (default: every installed one)")
    p.add_argument(
        "--keras-backends", type=names, help="comma-separated (default: KERAS_BACKEND if set, else every installed one)"
    )
    p.add_argument("--variants", type=names, help="only these, e.g. 'eager,nnx.jit' (default: all)")
    p.add_argument("--modes", type=names, default=["forward", "train_step"], help="comma-separated")
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    add_sides(p, "the input's sides: H W, or D H W for a 3D config (default: 256 256, or 64 64 64)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64", "mixed_bfloat16"),
        default="float32",
        help="float32: strict float32 rows, and TF32 rows on GPU; mixed_bfloat16: bfloat16 compute, float32 parameters",
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (the median is reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed runs first, at least (compilation happens here); more follow until two consecutive runs "
        "agree within 5%%",
    )
    p.add_argument("--config", type=config_arg, help="JSON, e.g. '{\"channels\": [8, 16, 32]}'")
    p.add_argument("--sgemm-n", type=int, help="side of the matmul ceilings (default 4096 CPU, 8192 GPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)
