"""The subcommands on checkpoint files: ``inspect``, ``convert``, ``export`` and ``init``."""

from __future__ import annotations

import json
import sys

from weights_convert.harness.cli.arguments import add_config, config_json, count, note_assumed


def cmd_inspect(args) -> int:
    import weights_convert
    from weights_convert.core.architectures import NAMES, assumed_line
    from weights_convert.formats import format_for

    checkpoint = weights_convert.read(args.file, config=args.config, allow_nonfinite=True)
    dtypes: dict[str, int] = {}
    for value in checkpoint.tensors.values():
        dtypes[str(value.dtype)] = dtypes.get(str(value.dtype), 0) + 1
    info = {
        "file": str(args.file),
        "format": format_for(args.file).name,
        "network": NAMES[checkpoint.config.architecture],
        "config": checkpoint.config.to_dict(),  # printed as JSON: what --config takes
        "parameters": checkpoint.parameter_count(),
        "tensors": len(checkpoint.tensors),
        "dtypes": dtypes,
    }
    if checkpoint.assumed:
        info["assumed"] = assumed_line(checkpoint.assumed)
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
    note_assumed("convert", checkpoint)
    dtypes = checkpoint.float_dtypes
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else ", ".join(f"{len(names)} {d}" for d, names in dtypes.items())
    print(
        f"wrote {args.dst}: {len(checkpoint.tensors)} tensors, {dtype}, config {config_json(checkpoint.config)}",
        file=sys.stderr,
    )
    if checkpoint.optimizer is not None:
        kept = "dropped (--weights-only)" if args.weights_only else "kept"
        print(
            f"optimizer state: {checkpoint.optimizer.name} at step {checkpoint.optimizer.step}, {kept}", file=sys.stderr
        )
    return 0


def cmd_export(args) -> int:
    from weights_convert.core.extras import installed
    from weights_convert.harness import export
    from weights_convert.harness.quiet import quiet_import

    try:
        modules = export.format_for(args.dst).modules
    except export.ExportError:  # an unknown suffix: export.export refuses it in its own words
        modules = ()
    if "tensorflow" in modules and installed("tensorflow"):
        quiet_import("tensorflow")  # the check loads the SavedModel here: its load-time logging stays off
    verdict = export.export(
        args.src, args.dst, dtype=args.dtype, force=args.force, check=not args.no_check, config=args.config
    )
    fmt = export.format_for(args.dst)
    if verdict is None:
        print(f"wrote {args.dst}: {fmt.data_format} {args.dtype}, not checked (--no-check)", file=sys.stderr)
        return 0
    print(verdict.line())
    return 0 if verdict.passed else 1


def cmd_init(args) -> int:
    import weights_convert
    from weights_convert.core.random_init import random_checkpoint
    from weights_convert.core.spec import ModelConfig

    checkpoint = random_checkpoint(args.config or ModelConfig(), seed=args.seed, dtype=args.dtype)
    checkpoint = centred_on_a_seeded_input(checkpoint, args.seed)
    weights_convert.write(checkpoint, args.dst, force=args.force)
    print(f"wrote {args.dst}: config {config_json(checkpoint.config)}, seed {args.seed}", file=sys.stderr)
    return 0


# The sides of the seeded input ``init`` centres the logits on: at least this, fitted to the
# model's side rule (enough pixels for a median, and fast in the NumPy reference).
CENTRING_SIDE = 8


def centred_on_a_seeded_input(checkpoint, seed: int):
    """``checkpoint`` with its logits' bias set so that the median logit of each output channel on
    a seeded input is 0 (``parity.inputs.centred_logits``): random weights otherwise give logits of
    one sign, a model that marks every pixel foreground."""
    from weights_convert.core.spec import fitted_side
    from weights_convert.harness.parity.inputs import centred_logits, make_inputs

    config = checkpoint.config
    side = fitted_side(config, CENTRING_SIDE)
    x, _ = make_inputs(config, 1, (side,) * config.spatial_dims, seed=seed)
    return centred_logits(checkpoint, x)


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe a checkpoint: format, config, parameter count, dtypes")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config(p)
    p.set_defaults(func=cmd_inspect)


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between formats (chosen by extension), losslessly")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), help="cast floating tensors")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/inf values instead of refusing them")
    p.add_argument("--allow-overflow", action="store_true", help="let --dtype turn values too large for it into inf")
    add_config(p)
    p.add_argument("--weights-only", action="store_true", help="drop a training checkpoint's optimizer state")
    p.set_defaults(func=cmd_convert)


def add_export_parser(sub) -> None:
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
    add_config(p)
    p.set_defaults(func=cmd_export)


def add_init_parser(sub) -> None:
    p = sub.add_parser("init", help="write seeded random weights (non-trivial BatchNorm statistics)")
    p.add_argument("dst")
    p.add_argument("--seed", type=count("--seed", 0), default=0)
    add_config(p, 'JSON, e.g. \'{"channels": [8, 16, 32]}\' or \'{"architecture": "monai", "strides": [2, 2]}\'')
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=cmd_init)
