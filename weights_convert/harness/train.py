"""``attention-unet train``: train the Attention U-Net in one framework, on one device or D
(``--data-parallel D``), and write training checkpoints in the canonical form: the model's tensors
and the optimizer's state (``weights_convert.core.optimizer_state``: name, hyperparameters, step,
slots), so that a run continues in any framework where it stopped.

Optimizers (``--optimizer``): ``sgd`` (plain, lr 0.1, no momentum), ``adam`` (lr 1e-3, eps 1e-5) and
``adamw`` (Adam's constants, decoupled weight decay 0.01), the canonical hyperparameters of
``weights_convert.core.data_parallel.training_hyperparameters``, run by each framework's
``impl_<framework>.training.make_optimizer``. Starting from a training checkpoint (one with optimizer
state) continues it: its optimizer, with its hyperparameters and state (an ``--optimizer`` naming
another is refused), the step numbers going on from the checkpoint's step K (``--steps N`` writes
``step_<K+1>`` .. ``step_<K+N>``) and the data with them (step k trains on the batch of step k), so
that K steps, then N more from ``step_<K>``, are the K + N steps of one uninterrupted run. A
checkpoint without optimizer state (weights only) starts a fresh optimizer at step 0.

Data: seeded synthetic segmentation images by default (``SyntheticSegmentation``: blobs on noise,
the mask where the blobs are), so that the command runs on a fresh machine; or a folder of PNG
files (``PngFolder``: ``DIR/images/<name>.png`` with ``DIR/masks/<name>.png``), read by the
minimal PNG reader here (``read_png``: zlib and NumPy only, no imaging package). The loss is the
one every implementation's training step and the parity checks use: mean((logits - mask)**2).

Progress: a bar on stderr with the step, the loss (the mean over the devices) and the throughput
in images per second (from the second step on: the first one compiles). Checkpoints:
``OUT/step_<k>.<format>`` every ``--every`` steps and after the last one, written by
``weights_convert.write`` (atomic; an existing file is kept unless ``--force``). A format that holds
no optimizer state (``weights.h5``) is refused unless ``--weights-only``, which writes the model's
tensors alone (in any format). On D devices the optimizer state written is the whole state: torch
DDP keeps the same state in every process (process 0 writes it), Flax and Keras replicate it.

The training loops are the implementations' own (``impl_<framework>.distributed.train``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from weights_convert.core.spec import ModelConfig

FRAMEWORKS = ("torch", "flax", "keras")
DEFAULT_STEPS = 100
DEFAULT_BATCH = 8
DEFAULT_SIZE = (64, 64)
DEFAULT_EVERY = 50


# ---------------------------------------------------------------------------------------------
# PNG files: 8- and 16-bit greyscale, grey+alpha, RGB and RGBA, not interlaced.

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_png(path) -> np.ndarray:
    """(H, W, C) float64 in [0, 1] (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA); a ValueError naming the
    file and the problem for anything else (palette, bit depths below 8, interlacing, corruption)."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    chunks, offset = {}, len(PNG_SIGNATURE)
    idat = []
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        body = data[offset + 8 : offset + 8 + length]
        crc = data[offset + 8 + length : offset + 12 + length]
        if len(body) != length or len(crc) != 4 or zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise ValueError(f"{path}: corrupt PNG chunk {kind!r}")
        if kind == b"IDAT":
            idat.append(body)
        chunks.setdefault(kind, body)
        offset += 12 + length
        if kind == b"IEND":
            break
    if b"IHDR" not in chunks or not idat:
        raise ValueError(f"{path}: PNG without a header or image data")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    if colour not in PNG_CHANNELS or depth not in (8, 16) or interlace:
        raise ValueError(
            f"{path}: PNG colour type {colour}, bit depth {depth}, interlace {interlace}: only 8- or 16-bit "
            f"grey, grey+alpha, RGB or RGBA without interlacing is read"
        )
    channels, width_bytes = PNG_CHANNELS[colour], depth // 8
    bpp = channels * width_bytes  # bytes per pixel
    stride = width * bpp
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as error:
        raise ValueError(f"{path}: corrupt PNG image data ({error})") from None
    if raw.size != height * (stride + 1):
        raise ValueError(f"{path}: PNG image data of {raw.size} bytes, expected {height * (stride + 1)}")
    rows = raw.reshape(height, stride + 1)
    image = np.zeros((height, stride), np.uint8)
    previous = np.zeros(stride, np.uint8)
    for y in range(height):
        image[y] = previous = _unfilter(rows[y, 0], rows[y, 1:], previous, bpp, path)
    if width_bytes == 2:
        image = image.reshape(height, width * channels, 2).astype(np.uint16)
        values, top = (image[..., 0] << 8) | image[..., 1], 65535.0
    else:
        values, top = image, 255.0
    return values.reshape(height, width, channels).astype(np.float64) / top


def _unfilter(kind: int, line: np.ndarray, previous: np.ndarray, bpp: int, path) -> np.ndarray:
    """One scanline with its PNG filter undone (arithmetic modulo 256)."""
    if kind == 0:
        return line
    if kind == 2:  # Up
        return line + previous
    if kind == 1:  # Sub: a running sum along the row, per byte of the pixel
        padded = np.zeros(-(-line.size // bpp) * bpp, np.int64)
        padded[: line.size] = line
        return (np.cumsum(padded.reshape(-1, bpp), axis=0).reshape(-1)[: line.size] % 256).astype(np.uint8)
    if kind not in (3, 4):
        raise ValueError(f"{path}: unknown PNG filter {kind}")
    out = np.zeros(line.size + bpp, np.int64)  # bpp zeros in front: the pixel left of the first
    up = np.concatenate([np.zeros(bpp, np.int64), previous.astype(np.int64)])
    line = line.astype(np.int64)
    for i in range(bpp, line.size + bpp, bpp):
        a, b, c = out[i - bpp : i], up[i : i + bpp], up[i - bpp : i]
        if kind == 3:  # Average
            predictor = (a + b) // 2
        else:  # Paeth
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        out[i : i + bpp] = (line[i - bpp : i] + predictor) % 256
    return out[bpp:].astype(np.uint8)


def write_png(path, image: np.ndarray) -> None:
    """An (H, W), (H, W, 1) or (H, W, 3) array in [0, 1] as an 8-bit grey or RGB PNG."""
    image = np.asarray(image, np.float64)
    image = image[..., None] if image.ndim == 2 else image
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"write_png takes (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    height, width, channels = image.shape
    pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).reshape(height, width * channels)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()  # filter 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    Path(path).write_bytes(
        PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------
# Data sources: ``batch(step)`` -> (x, target), the global NCHW batch of step ``step`` (from 0).


@dataclasses.dataclass
class SyntheticSegmentation:
    """Seeded images of blobs on noise and their masks (channel j: the blobs of class j); step k's
    batch depends on (seed, k) only, so every process of a data-parallel run draws the same one."""

    config: ModelConfig
    batch_size: int
    size: tuple[int, int]
    seed: int = 0

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        h, w = self.size
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        c_in, c_out = self.config.in_channels, self.config.out_channels
        x = 0.15 * rng.uniform(0, 1, (self.batch_size, c_in, h, w))
        target = np.zeros((self.batch_size, c_out, h, w))
        for n in range(self.batch_size):
            for _ in range(rng.integers(1, 5)):
                cy, cx = rng.uniform(0.15, 0.85, 2)
                ry, rx = rng.uniform(0.06, 0.22, 2)
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                x[n][:, inside] += rng.uniform(0.4, 0.85, (c_in, 1))
                target[n, rng.integers(c_out), inside] = 1.0
        return np.clip(x, 0, 1), target


class PngFolder:
    """``directory/images/<name>.png`` and ``directory/masks/<name>.png`` pairs, all one size, read
    once. Images: grey, or RGB(A) (alpha dropped), with the model's input channels (grey is repeated
    to fill them). Masks: grey; with one output channel, mask > 0 is the target; with C, the mask's
    8-bit values 0..C-1 are class indices, one-hot encoded. Batches cycle through the pairs in a
    seeded order, reshuffled every epoch."""

    def __init__(self, directory, config: ModelConfig, batch_size: int, seed: int = 0):
        directory = Path(directory)
        images = {p.stem: p for p in sorted((directory / "images").glob("*.png"))}
        masks = {p.stem: p for p in sorted((directory / "masks").glob("*.png"))}
        names = sorted(set(images) & set(masks))
        if not names:
            raise ValueError(f"{directory}: no images/<name>.png with a masks/<name>.png of the same name")
        unpaired = sorted(set(images) ^ set(masks))
        if unpaired:
            raise ValueError(f"{directory}: {len(unpaired)} PNG files without a partner, e.g. {unpaired[0]}.png")
        self.x = self._stack([(images[n], self._image(images[n], config)) for n in names])
        self.target = self._stack([(masks[n], self._mask(masks[n], config)) for n in names])
        if self.x.shape[2:] != self.target.shape[2:]:
            raise ValueError(f"{directory}: images are {self.x.shape[2:]} but masks {self.target.shape[2:]}")
        if min(self.x.shape[2:]) < config.min_size:
            raise ValueError(
                f"{directory}: images of {self.x.shape[2:]} are below the model's minimum {config.min_size}"
            )
        self.batch_size, self.seed = batch_size, seed

    @staticmethod
    def _stack(arrays: list) -> np.ndarray:
        """One array of (path, CHW array) pairs; a ValueError naming the first of another size."""
        first = arrays[0][1].shape[1:]
        for path, array in arrays:
            if array.shape[1:] != first:
                raise ValueError(f"{path}: {array.shape[1:]} pixels, the first file has {first}: sizes must agree")
        return np.stack([array for _, array in arrays])

    @staticmethod
    def _image(path: Path, config: ModelConfig) -> np.ndarray:
        image = read_png(path)
        image = image[..., :3] if image.shape[2] in (3, 4) else image[..., :1]  # alpha dropped
        if image.shape[2] == 1:
            image = np.repeat(image, config.in_channels, axis=2)
        if image.shape[2] != config.in_channels:
            raise ValueError(f"{path}: {image.shape[2]} colour channels, the model takes {config.in_channels}")
        return image.transpose(2, 0, 1)

    @staticmethod
    def _mask(path: Path, config: ModelConfig) -> np.ndarray:
        mask = read_png(path)[..., 0]
        if config.out_channels == 1:
            return (mask > 0)[None].astype(np.float64)
        classes = np.round(mask * 255).astype(int)
        if classes.max() >= config.out_channels:
            raise ValueError(f"{path}: class {classes.max()} in a mask for {config.out_channels} output channels")
        return (classes[None] == np.arange(config.out_channels)[:, None, None]).astype(np.float64)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.x)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = positions // n
        index = [
            np.random.default_rng([self.seed, e]).permutation(n)[p % n] for p, e in zip(positions, epochs, strict=True)
        ]
        return self.x[index], self.target[index]


@dataclasses.dataclass
class FromStep:
    """``data``'s batches from step ``start`` on: ``batch(k)`` is ``data.batch(start + k)``, so that a
    continued run trains on the batches the uninterrupted run would have."""

    data: object
    start: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.data.batch(self.start + step)


# ---------------------------------------------------------------------------------------------
# Progress and checkpoints.


@dataclasses.dataclass
class Progress:
    """``on_step`` of the training loops: the bar on stderr and the checkpoints every ``every``
    steps and after the last (``out/step_<k>.<suffix>``). The loop counts its steps from 1; the run's
    step numbers go on from ``first_step`` (the step of the checkpoint it continues). Each
    checkpoint is the loop's snapshot, a training checkpoint, or its model tensors alone with
    ``weights_only``. SGD's step is set to the run's step: its update does not use the count, and
    torch's SGD keeps none (it reads as 0, or None with momentum).
    Picklable: a spawned process runs it."""

    label: str
    steps: int
    batch_size: int
    out: str
    every: int
    suffix: str = "safetensors"
    force: bool = False
    first_step: int = 0
    weights_only: bool = False
    width: int = 24
    start: float | None = None
    last_print: float = 0.0

    def __call__(self, step: int, loss: float, snapshot) -> None:
        import weights_convert

        now = time.perf_counter()
        if step == 1 or self.start is None:
            self.start = now  # the first step compiles: throughput is timed from its end
        run_step, last = self.first_step + step, self.first_step + self.steps
        written = ""
        if run_step % self.every == 0 or step == self.steps:
            path = Path(self.out) / f"step_{run_step:0{len(str(last))}d}.{self.suffix}"
            weights_convert.write(self.checkpoint(snapshot(), run_step), path, force=self.force)
            written = f"  wrote {path.name}"
        rate = (step - 1) * self.batch_size / (now - self.start) if step > 1 and now > self.start else None
        done = int(self.width * step / self.steps)
        bar = "#" * done + "-" * (self.width - done)
        speed = f"{rate:8.1f} img/s" if rate else "  warming up"
        line = f"{self.label} [{bar}] {run_step}/{last}  loss {loss:.5g}  {speed}{written}"
        tty = sys.stderr.isatty()
        if tty or written or step == self.steps or now - self.last_print >= 1.0:
            end = "" if tty and step < self.steps and not written else "\n"
            print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)
            self.last_print = now

    def checkpoint(self, snapshot, run_step: int):
        """What is written after step ``run_step`` of the run: ``snapshot``, SGD's step set to
        ``run_step``, or its model tensors alone with ``weights_only``."""
        if self.weights_only:
            return snapshot.weights_only()
        if snapshot.optimizer.name != "sgd":
            return snapshot  # Adam's count is its bias correction: every framework keeps it
        return dataclasses.replace(snapshot, optimizer=dataclasses.replace(snapshot.optimizer, step=run_step))


# ---------------------------------------------------------------------------------------------
# The command.


def add_parser(sub) -> None:
    """The ``train`` subcommand on ``sub`` (argparse subparsers)."""
    from weights_convert.core.data_parallel import BATCHNORM_MODES, TRAINING_OPTIMIZERS

    p = sub.add_parser(
        "train",
        help="train in one framework on one device or several (--data-parallel), writing canonical checkpoints",
        description="Seeded synthetic segmentation data unless --data names a folder of PNG images and masks.",
    )
    p.add_argument(
        "checkpoint",
        nargs="?",
        help="initial weights, any supported format (default: seeded random); a training checkpoint (with "
        "optimizer state) is continued: its optimizer, state and step numbers",
    )
    p.add_argument("--framework", choices=FRAMEWORKS, default="torch")
    p.add_argument("--out", required=True, help="directory for the checkpoints step_<k>.<format>")
    p.add_argument("--format", default="safetensors", help="checkpoint file extension (default safetensors)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="write the model's tensors without the optimizer state (needed for a format that holds none)",
    )
    p.add_argument("--every", type=int, default=DEFAULT_EVERY, help="write a checkpoint every N steps (and the last)")
    p.add_argument("--data", metavar="DIR", help="DIR/images/<name>.png with DIR/masks/<name>.png")
    p.add_argument("--data-parallel", type=int, default=1, metavar="D", help="devices (processes for torch)")
    p.add_argument(
        "--batchnorm", choices=BATCHNORM_MODES, default="sync", help="statistics of the global batch or per device"
    )
    p.add_argument("--dtype", choices=("float32", "float64", "mixed_bfloat16"), default="float32")
    p.add_argument(
        "--optimizer",
        choices=TRAINING_OPTIMIZERS,
        help="sgd (lr 0.1), adam (lr 1e-3, eps 1e-5) or adamw (weight decay 0.01); default adam, or a training "
        "CHECKPOINT's own",
    )
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="steps to train (after a training CHECKPOINT's)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="global batch (split over the devices)")
    p.add_argument("--size", type=int, nargs=2, default=DEFAULT_SIZE, metavar=("H", "W"), help="synthetic data")
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
    if args.config and args.checkpoint:
        return _usage("--config describes random initial weights; a CHECKPOINT brings its own config")
    try:
        config = ModelConfig.from_dict(json.loads(args.config)) if args.config else ModelConfig()
    except (ValueError, TypeError) as error:
        return _usage(f"bad --config {args.config!r}: {error}")
    checkpoint = weights_convert.read(args.checkpoint) if args.checkpoint else random_checkpoint(config, seed=args.seed)
    state = checkpoint.optimizer
    if state is not None and args.optimizer not in (None, state.name):
        return _usage(
            f"--optimizer {args.optimizer}: {args.checkpoint} is a training checkpoint that continues its own "
            f"{state.name} optimizer; leave --optimizer out (convert it with --weights-only for a fresh one)"
        )
    optimizer = state.name if state is not None else args.optimizer or "adam"
    first_step = (state.step or 0) if state is not None else 0  # torch SGD counts no steps: from 0
    checkpoint = checkpoint.astype("float32" if args.dtype == "mixed_bfloat16" else args.dtype)
    config = checkpoint.config
    if args.data:
        try:
            data = PngFolder(args.data, config, args.batch, args.seed)
        except (OSError, ValueError) as error:  # a refused data folder: one line, exit 1, nothing written
            print(f"attention-unet train: error: {error}", file=sys.stderr)
            return 1
    else:
        if min(args.size) < config.min_size:
            return _usage(f"--size {args.size[0]} {args.size[1]} is below the model's minimum {config.min_size}")
        data = SyntheticSegmentation(config, args.batch, tuple(args.size), args.seed)
    _prepare_jax(args)
    from weights_convert.harness.data_parallel import module

    out.mkdir(parents=True, exist_ok=True)
    label = f"train {args.framework} x{args.data_parallel}" + (f" {args.batchnorm}" if args.data_parallel > 1 else "")
    progress = Progress(
        label, args.steps, args.batch, str(out), args.every, args.format, args.force, first_step, args.weights_only
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
        on_step=progress,
    )
    if results:  # torchrun's other processes return nothing
        seconds = time.perf_counter() - started
        final = float(results[f"loss/step{args.steps}"])
        print(
            f"trained steps {first_step + 1}..{first_step + args.steps} in {seconds:.1f} s, last loss {final:.5g}; "
            f"checkpoints in {out}",
            file=sys.stderr,
        )
    return 0


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
