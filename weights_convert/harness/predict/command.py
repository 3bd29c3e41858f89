"""The ``predict`` subcommand: its options, their checks (usage errors exit 2 and write nothing; a
refused checkpoint or input exits 1, leaving nothing of that input), the model built once, and one
progress line per input on stderr."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from weights_convert.core.extras import require
from weights_convert.core.frameworks import DEVICES, FRAMEWORKS
from weights_convert.core.precisions import DTYPES
from weights_convert.core.spec import check_sides
from weights_convert.harness.cli.arguments import (
    add_config,
    add_sides,
    count,
    framework_choice,
    framework_label,
    note_assumed,
    usage_error,
)
from weights_convert.harness.predict.tiling import BLENDS, OVERLAP

COMMAND = "predict"
DEFAULT_BATCH = 4


def overlap_arg(text: str) -> float:
    """An argparse type: a fraction in [0, 1)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--overlap must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--overlap must be in [0, 1), got {value}")
    return value


def add_parser(sub) -> None:
    """The ``predict`` subcommand on ``sub`` (argparse subparsers)."""
    p = sub.add_parser(
        COMMAND,
        help="segment images or volumes: masks, probabilities and attention overlays",
        description="Writes <stem>_mask.png (volumes: .tif), <stem>_prob.tif and <stem>_overlay.png per INPUT "
        "into --out. Images of any size: zero-padded to the sides the architecture takes and cropped back; "
        "with --tile, overlapping windows blended as MONAI's sliding_window_inference blends them.",
    )
    p.add_argument("checkpoint", help="the model, any supported checkpoint format, either architecture, 2D or 3D")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="images: .png, .jpg, .jpeg, .tif, .tiff (3D: TIFF stacks)"
    )
    p.add_argument("--out", required=True, help="directory for the outputs (created if missing)")
    p.add_argument("--framework", choices=FRAMEWORKS, help="default: the first installed of " + ", ".join(FRAMEWORKS))
    add_config(p)
    add_sides(
        p,
        "windows of H W (3D: D H W), each side fitting the architecture; default: one window, the whole padded image",
        option="--tile",
    )
    p.add_argument("--overlap", type=overlap_arg, default=OVERLAP, help="the fraction of a window its neighbour shares")
    p.add_argument("--blend", choices=BLENDS, default="constant", help="the windows' weights where they overlap")
    p.add_argument("--batch", type=count("--batch", 1), default=DEFAULT_BATCH, help="windows per forward pass")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the precision to run in")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=cmd_predict)


def cmd_predict(args) -> int:
    import weights_convert
    from weights_convert.harness.predict.outputs import output_paths

    framework, refusal = framework_choice(args.framework, "predict with")
    if refusal:
        return usage_error(COMMAND, refusal)
    inputs = [Path(name) for name in args.inputs]
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem in stems:
            return usage_error(COMMAND, f"{stems[path.stem]} and {path} would write the same <stem>_* files")
        stems[path.stem] = path
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return usage_error(COMMAND, f"--out {out}: exists and is not a directory")
    for path in inputs:
        if not os.path.lexists(path):
            print(f"attention-unet {COMMAND}: error: {path}: no such file", file=sys.stderr)
            return 1
    # Before any work: the images' readers and writers and the overlay's plotting (exit 1 naming the extra).
    require(("PIL", "tifffile", "matplotlib"), COMMAND)
    checkpoint = weights_convert.read(args.checkpoint, config=args.config)
    note_assumed(COMMAND, checkpoint)
    config = checkpoint.config
    tile = None
    if args.tile is not None:
        try:
            tile = check_sides(config, args.tile, option="--tile")
        except ValueError as error:
            return usage_error(COMMAND, str(error))
    if not args.force:
        existing = [p for path in inputs for p in output_paths(out, path.stem, config.spatial_dims).values()]
        existing = [p for p in existing if os.path.lexists(p)]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            return usage_error(COMMAND, f"{existing[0]}{more} exist: pass --force to overwrite")
    return _run(args, framework, checkpoint, inputs, out, tile)


def _run(args, framework: str, checkpoint, inputs, out: Path, tile) -> int:
    from weights_convert.harness.images import ImageError
    from weights_convert.harness.predict import models
    from weights_convert.harness.predict.outputs import output_paths, write_outputs
    from weights_convert.harness.predict.prediction import predict
    from weights_convert.harness.train.data import model_image

    if framework == "keras" and args.dtype == "float64" and "jax" not in sys.modules:
        os.environ.setdefault("JAX_ENABLE_X64", "1")  # Keras on JAX holds float64 only with x64 on
    config = checkpoint.config
    run = models.predictor(framework, checkpoint, dtype=args.dtype, device=args.device)
    label = framework_label(framework)
    out.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(inputs, start=1):
        started = time.perf_counter()
        try:
            image = model_image(path, config)
        except ImageError as error:
            print(f"attention-unet {COMMAND}: error: {error}", file=sys.stderr)
            return 1
        prediction = predict(run, config, image, tile=tile, overlap=args.overlap, blend=args.blend, batch=args.batch)
        paths = output_paths(out, path.stem, config.spatial_dims)
        write_outputs(paths, path.name, image, prediction, config, force=args.force)
        seconds = time.perf_counter() - started
        sides = " x ".join(map(str, image.shape[1:]))
        windows = f"{prediction.windows} window{'s' if prediction.windows > 1 else ''}"
        written = ", ".join(p.name for p in paths.values())
        print(
            f"predict {label} [{number}/{len(inputs)}] {path} ({sides}, {windows}, {seconds:.2f} s): {written}",
            file=sys.stderr,
            flush=True,
        )
    return 0
