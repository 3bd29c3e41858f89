"""The ``train`` subcommand: its options, their checks (usage errors exit 2, a refused data folder
exits 1, nothing written either way), and the run through the framework's trainer."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from weights_convert.core.architectures import config_from_json
from weights_convert.core.errors import shown
from weights_convert.core.frameworks import FRAMEWORKS
from weights_convert.core.losses import LOSSES, check_loss, default_loss
from weights_convert.core.precisions import DTYPES, param_dtype
from weights_convert.core.spec import ModelConfig, check_sides
from weights_convert.harness.cli.arguments import add_sides, framework_choice, framework_label
from weights_convert.harness.train.data import CropNeeded, FromStep, ImageFolder, SyntheticSegmentation, held_out
from weights_convert.harness.train.progress import Progress
from weights_convert.harness.train.validation import METRICS_FILE, Validation

DEFAULT_STEPS = 100
DEFAULT_BATCH = 8
DEFAULT_EVERY = 50


def add_parser(sub) -> None:
    """The ``train`` subcommand on ``sub`` (argparse subparsers)."""
    from weights_convert.core.data_parallel import BATCHNORM_MODES, TRAINING_OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="train in one framework on one device or several (--data-parallel), writing canonical checkpoints",
        description="Seeded synthetic segmentation data unless --data names a folder of images and masks "
        "(PNG, JPEG, TIFF; TIFF stacks for a 3D model).",
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="initial weights, any supported format (default: seeded random); a training checkpoint (with "
        "optimizer state) is continued: its optimizer, state and step numbers",
    )
    p.add_argument("--framework", choices=FRAMEWORKS, help="default: the first installed of " + ", ".join(FRAMEWORKS))
    p.add_argument("--out", required=True, help="directory for the checkpoints step_<k>.<format>")
    p.add_argument("--format", default="safetensors", help="checkpoint file extension (default safetensors)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="write the model's tensors without the optimizer state (needed for a format that holds none)",
    )
    p.add_argument("--every", type=int, default=DEFAULT_EVERY, help="write a checkpoint every N steps (and the last)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="DIR/images/<name>.<ext> with DIR/masks/<name>.<ext> (.png, .jpg, .jpeg, .tif, .tiff; 3D: TIFF stacks)",
    )
    add_sides(
        p,
        "--data: every sample cropped (randomly) or padded to H W, or D H W (default: the images' size, "
        "when they all agree); --val: centred",
        option="--crop",
    )
    p.add_argument(
        "--val",
        metavar="DIR",
        help="validate on a folder laid out as --data's: every image, centred in --crop (or whole), not flipped",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="validate on a seeded fraction F of --data's pairs, never trained on (synthetic data: a fixed set "
        "from a seed stream of its own, F / (1 - F) times the images trained on between validations)",
    )
    p.add_argument(
        "--val-every",
        type=int,
        metavar="N",
        help="validate every N steps and after the last, writing OUT/metrics.jsonl and OUT/best.<format> "
        "(default: --every)",
    )
    p.add_argument("--data-parallel", type=int, default=1, metavar="D", help="devices (processes for torch)")
    p.add_argument(
        "--batchnorm", choices=BATCHNORM_MODES, default="sync", help="statistics of the global batch or per device"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the precision to train in")
    p.add_argument(
        "--loss",
        choices=LOSSES,
        help="the loss to minimise (docs/architecture.md section 3b); default: dice_bce for one output channel, "
        "dice_ce for several",
    )
    p.add_argument(
        "--optimizer",
        choices=TRAINING_OPTIMIZERS,
        help="sgd (lr 0.1), adam (lr 1e-3, eps 1e-5) or adamw (weight decay 0.01); default adam, or a training "
        "CHECKPOINT's own",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps to train (after a training CHECKPOINT's)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="global batch (split over the devices)")
    add_sides(p, "the synthetic data's sides: H W, or D H W for a 3D model (default: 64 64, or 32 32 32)")
    p.add_argument("--config", help="JSON model config for random initial weights, e.g. '{\"channels\": [8, 16]}'")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the data order")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out, overwriting checkpoints")
    p.set_defaults(func=cmd_train)


def _usage(message: str) -> int:
    print(f"attention-unet train: error: {message}", file=sys.stderr)
    return 2


def cmd_train(args) -> int:
    import weights_convert
    from weights_convert.core.random_init import random_checkpoint
    from weights_convert.formats import format_for
    from weights_convert.formats.io import holds_optimizer

    for name, value, minimum in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--every", args.every, 1)):
        if value < minimum:
            return _usage(f"{name} must be at least {minimum}, got {value}")
    if args.data_parallel < 1 or args.batch % args.data_parallel:
        return _usage(f"--batch {args.batch} does not split into --data-parallel {args.data_parallel} equal shards")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        return _usage(f"--out {out}: exists and is not an empty directory (pass --force to write into it)")
    try:
        format_for(Path(f"step.{args.format}"))
        optimizer_format = holds_optimizer(Path(f"step.{args.format}"))
    except Exception as error:  # noqa: BLE001 - the format table's own one-line refusal
        return _usage(f"--format {args.format}: {error}")
    if not optimizer_format and not args.weights_only:
        return _usage(
            f"--format {args.format} holds no optimizer state, so its checkpoints could not continue training: "
            f"pass --weights-only to write the model's tensors alone"
        )
    framework, refusal = framework_choice(args.framework, "train in")
    if refusal:
        return _usage(refusal)
    args.framework = framework
    if args.config and args.checkpoint:
        return _usage("--config describes random initial weights; a CHECKPOINT brings its own config")
    try:
        config = config_from_json(args.config) if args.config else ModelConfig()
    except ValueError as error:
        return _usage(f"bad --config {shown(args.config, 60)}: {error}")
    checkpoint = weights_convert.read(args.checkpoint) if args.checkpoint else random_checkpoint(config, seed=args.seed)
    state = checkpoint.optimizer
    if state is not None and args.optimizer not in (None, state.name):
        return _usage(
            f"--optimizer {args.optimizer}: {args.checkpoint} is a training checkpoint that continues its own "
            f"{state.name} optimizer; leave --optimizer out (convert it with --weights-only for a fresh one)"
        )
    optimizer = state.name if state is not None else args.optimizer or "adam"
    first_step = (state.step or 0) if state is not None else 0  # torch SGD counts no steps: from 0
    checkpoint = checkpoint.astype(param_dtype(args.dtype))
    config = checkpoint.config
    loss = args.loss or default_loss(config.out_channels)
    try:
        check_loss(loss, config.out_channels)
    except ValueError as error:
        return _usage(f"--loss: {error}")
    if args.crop is not None and not (args.data or args.val):
        return _usage("--crop crops the images of --data DIR or --val DIR; the synthetic data takes --size")
    refusal = _validation_refusal(args)
    if refusal:
        return _usage(refusal)
    try:
        crop = None if args.crop is None else check_sides(config, args.crop, option="--crop")
    except ValueError as error:
        return _usage(str(error))
    if args.data:
        try:
            data = ImageFolder(args.data, config, args.batch, args.seed, crop)
        except CropNeeded as error:
            return _usage(str(error))
        except (OSError, ValueError) as error:  # a refused data folder: one line, exit 1, nothing written
            print(f"attention-unet train: error: {error}", file=sys.stderr)
            return 1
        try:
            check_sides(config, data.crop, option="--crop")
        except ValueError as error:
            return _usage(f"the images of --data are {' x '.join(map(str, data.crop))}: {error}; pass another --crop")
    else:
        try:
            size = check_sides(config, args.size)
        except ValueError as error:
            return _usage(str(error))
        data = SyntheticSegmentation(config, args.batch, size, args.seed)
    data, batches, status = _validation_data(args, config, data, crop)
    if status is not None:
        return status
    _prepare_jax(args)
    from weights_convert.harness.data_parallel import module

    if args.framework == "keras":
        from weights_convert.harness.quiet import quiet_import

        quiet_import("impl_keras")
    trained = framework_label(args.framework)
    if args.framework == "keras" and args.data_parallel > 1 and trained != "keras/jax":
        return _usage(
            f"--data-parallel {args.data_parallel} with Keras runs on the JAX backend (keras.distribution); "
            f"KERAS_BACKEND is {trained.removeprefix('keras/')}: set KERAS_BACKEND=jax or train on one device"
        )
    out.mkdir(parents=True, exist_ok=True)
    label = f"train {trained} x{args.data_parallel}" + (f" {args.batchnorm}" if args.data_parallel > 1 else "")
    validation = None
    if batches is not None:
        validation = Validation(args.framework, batches, loss, args.dtype, args.device, str(out), args.format)
        validation.start(first_step)
    progress = Progress(
        label,
        args.steps,
        args.batch,
        str(out),
        args.every,
        args.format,
        args.force,
        first_step,
        args.weights_only,
        validation,
        args.val_every or args.every,
        "vol/s" if config.spatial_dims == 3 else "img/s",
    )
    if state is not None:
        print(f"continuing {args.checkpoint}: {state.describe()}", file=sys.stderr)
    started = time.perf_counter()
    results = module(args.framework).train(
        checkpoint,
        FromStep(data, first_step),
        steps=args.steps,
        dtype=args.dtype,
        device=args.device,
        optimizer=optimizer,
        data_parallel=args.data_parallel,
        batchnorm=args.batchnorm,
        loss=loss,
        on_step=progress,
    )
    if results:  # torchrun's other processes return nothing
        seconds = time.perf_counter() - started
        final = float(results[f"loss/step{args.steps}"])
        print(
            f"trained steps {first_step + 1}..{first_step + args.steps} in {seconds:.1f} s, last loss {final:.5g} "
            f"({loss}); "
            f"checkpoints in {out}",
            file=sys.stderr,
        )
        if validation is not None:
            print(_best_line(out, args.format), file=sys.stderr)
    return 0


def _validation_refusal(args) -> str | None:
    """A usage refusal of the validation options before any data is read, or None."""
    if args.val and args.val_fraction is not None:
        return "--val DIR and --val-fraction F both choose the validation set: pass one"
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        return f"--val-fraction must be between 0 and 1 (both excluded), got {args.val_fraction}"
    if args.val_every is not None:
        if not (args.val or args.val_fraction is not None):
            return "--val-every sets how often to validate: pass --val DIR or --val-fraction F too"
        if args.val_every < 1:
            return f"--val-every must be at least 1, got {args.val_every}"
    return None


def _validation_data(args, config, data, crop):
    """(the training data, the validation batches or None, None), or a refusal's exit status in the
    third place: --val-fraction splits ``data`` (a folder) or draws the synthetic validation set;
    --val reads its folder, centred in ``crop`` (--crop, checked)."""
    if args.val_fraction is not None and isinstance(data, ImageFolder):
        try:
            names = held_out(data.stems, args.val_fraction, args.seed)
        except ValueError as error:
            return data, None, _usage(f"--data {args.data}: {error}")
        kept = [stem for stem in data.stems if stem not in set(names)]
        return data.subset(kept), data.subset(names).validation_batches(), None
    if args.val_fraction is not None:
        return data, data.validation_batches(args.val_fraction, args.val_every or args.every), None
    if not args.val:
        return data, None, None
    try:
        folder = ImageFolder(args.val, config, args.batch, args.seed, crop, option="--val")
        check_sides(config, folder.crop, option="--crop")
    except CropNeeded as error:
        return data, None, _usage(str(error))
    except (OSError, ValueError) as error:  # a refused folder, or images whose sides the model cannot take
        print(f"attention-unet train: error: --val: {error}", file=sys.stderr)
        return data, None, 1
    return data, folder.validation_batches(), None


def _best_line(out: Path, suffix: str) -> str:
    """The run's summary of its validations, from the last record of ``OUT/metrics.jsonl`` (the
    validations may have run in another process)."""
    import json

    lines = (out / METRICS_FILE).read_text().splitlines()
    last = json.loads(lines[-1])
    if last["best_step"] is None:
        return f"validated {len(lines)} times, no mean Dice yet (no foreground class seen); {out / METRICS_FILE}"
    return (
        f"best validation mean Dice {last['best_mean_dice']:.4f} at step {last['best_step']}: "
        f"{out / f'best.{suffix}'}; every validation in {out / METRICS_FILE}"
    )


def _prepare_jax(args) -> None:
    """Before JAX starts: D CPU host devices for a data-parallel run on the CPU, Keras on the JAX
    backend when data-parallel (``keras.distribution``), and x64 for Keras in float64."""
    if args.framework == "torch":
        return
    from weights_convert.processes import host_devices_flag

    if args.device == "cpu" and args.data_parallel > 1 and "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = host_devices_flag(args.data_parallel)
    if args.framework == "keras":
        if args.data_parallel > 1:
            os.environ.setdefault("KERAS_BACKEND", "jax")
        if args.dtype == "float64":
            os.environ.setdefault("JAX_ENABLE_X64", "1")
