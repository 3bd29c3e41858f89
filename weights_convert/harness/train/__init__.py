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
the mask where the blobs are), so that the command runs on a fresh machine; or a folder of images
and masks (``ImageFolder``: ``DIR/images/<name>.<ext>`` with ``DIR/masks/<name>.<ext>``, PNG,
JPEG or TIFF, TIFF stacks for a 3D model), read through ``weights_convert.harness.images`` (Pillow,
tifffile; the ``images`` extra), cropped or padded to ``--crop`` and flipped at random. The loss is
``--loss`` (``weights_convert.core.losses``; default dice_bce for one output channel, dice_ce for
several), the one every implementation's training step and the parity checks use.

Validation (``validation``): on ``--val DIR`` (whole or centred images) or a seeded
``--val-fraction`` of the data (``data.held_out``; the synthetic data's own validation stream),
every ``--val-every`` steps: the validation loss, per class Dice and IoU
(``weights_convert.harness.metrics``), ``OUT/metrics.jsonl`` and ``OUT/best.<format>``.

Progress: a bar on stderr with the step, the loss (the mean over the devices) and the throughput
in images (volumes) per second (from the second step on: the first one compiles). Checkpoints:
``OUT/step_<k>.<format>`` every ``--every`` steps and after the last one, written by
``weights_convert.write`` (atomic; an existing file is kept unless ``--force``). A format that holds
no optimizer state (``weights.h5``) is refused unless ``--weights-only``, which writes the model's
tensors alone (in any format). On D devices the optimizer state written is the whole state: torch
DDP keeps the same state in every process (process 0 writes it), Flax and Keras replicate it.

The training loop is ``weights_convert.core.loop``'s, run by each framework's trainer
(``impl_<framework>.trainer.train``). The package: ``data`` (the data sources),
``progress`` (the bar and the checkpoints), ``validation`` (the validations and their records),
``command`` (the subcommand).
"""

from weights_convert.harness.train.command import (
    DEFAULT_BATCH,
    DEFAULT_EVERY,
    DEFAULT_STEPS,
    add_parser,
    cmd_train,
)
from weights_convert.harness.train.data import CropNeeded, FromStep, ImageFolder, SyntheticSegmentation
from weights_convert.harness.train.progress import Progress
from weights_convert.harness.train.validation import Validation

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_EVERY",
    "DEFAULT_STEPS",
    "CropNeeded",
    "FromStep",
    "ImageFolder",
    "Progress",
    "SyntheticSegmentation",
    "Validation",
    "add_parser",
    "cmd_train",
]
