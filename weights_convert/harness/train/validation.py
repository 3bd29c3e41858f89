"""Validation during ``attention-unet train``: the snapshot's model in eval mode on a fixed
validation set, in the framework being trained, its loss and segmentation metrics, one record
per validation in ``OUT/metrics.jsonl`` and the best checkpoint so far in ``OUT/best.<format>``.

- The model is built once per validation (``impl_<framework>.runner.predictor``) and runs on the
  validation batches (``--batch`` images each; Keras in this process, under its backend).
- ``val_loss``: the training loss in its NumPy definition (``harness/reference_losses.py``, channels
  last, float64) of the whole set as one batch: the batches' losses weighted by their sizes, the
  same number since every loss is a mean over samples of one size.
- ``dice``, ``iou``, ``mean_dice``: ``weights_convert.harness.metrics`` (pooled counts over the
  whole set per class; a class in neither predictions nor targets is ``null`` and left out).
- ``metrics.jsonl``: one JSON object a line, appended and flushed after each validation:
  ``step``, ``loss`` (the training loss of that step), ``val_loss``, ``dice`` and ``iou``
  (``{class: score}``; for one output channel the foreground class "1"), ``mean_dice``,
  ``images`` (the validation set's size), ``best_step`` and ``best_mean_dice`` (what
  ``best.<format>`` holds after this validation).
- ``best.<format>``: the checkpoint of the highest ``mean_dice`` so far, replaced (atomically, by
  ``weights_convert.write``) only when a validation beats it; a ``null`` mean Dice never does.

A run that continues a checkpoint of step K into an ``--out`` already holding ``metrics.jsonl``
(``--force``) keeps its records of steps up to K, drops the later ones (they belong to the run
being redone, whose checkpoints are overwritten as well) and appends; the best so far is the kept
records' best, unless a dropped record had replaced ``best.<format>``: then the run's first
validation writes it afresh."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from weights_convert.harness.metrics import SegmentationCounts
from weights_convert.harness.predict.models import predictor
from weights_convert.harness.reference_losses import value_and_gradient

METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class Scores:
    """One validation's numbers: the loss and the per class counts of the whole set."""

    val_loss: float
    counts: SegmentationCounts
    images: int


@dataclasses.dataclass
class Validation:
    """The validation set (``batches``: NCHW ``(x, target)`` pairs) and what a validation needs:
    the framework, the loss, the precision and device, and the out directory and format for
    ``metrics.jsonl`` and ``best.<suffix>``. Picklable: a spawned process runs it."""

    framework: str
    batches: list
    loss: str
    dtype: str = "float32"
    device: str = "cpu"
    out: str = "."
    suffix: str = "safetensors"
    best_step: int | None = None
    best_dice: float = -math.inf

    @property
    def images(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def evaluate(self, checkpoint) -> Scores:
        """The loss and the metrics of ``checkpoint``'s model, in eval mode, on the whole set."""
        model = predictor(self.framework, checkpoint, dtype=self.dtype, device=self.device)  # built once
        logits = [model(x)["output"] for x, _ in self.batches]
        counts = SegmentationCounts(checkpoint.config.out_channels)
        total = 0.0
        for output, (_, target) in zip(logits, self.batches, strict=True):
            counts.add(output, target)
            total += len(target) * batch_loss(self.loss, output, target)
        return Scores(total / self.images, counts, self.images)

    def start(self, first_step: int) -> None:
        """Before the run's first validation: ``metrics.jsonl``'s records after ``first_step``
        dropped, and the best so far read from those kept (the module's docstring)."""
        path = Path(self.out) / METRICS_FILE
        if not path.exists():
            return
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r["step"] <= first_step]
        if len(kept) < len(records):
            _replace(path, "".join(json.dumps(r) + "\n" for r in kept))
        last_best = records[-1]["best_step"] if records else None
        if kept and kept[-1]["best_step"] == last_best and kept[-1]["best_mean_dice"] is not None:
            self.best_step, self.best_dice = kept[-1]["best_step"], kept[-1]["best_mean_dice"]

    def __call__(self, step: int, train_loss: float, checkpoint) -> dict:
        """Validates ``checkpoint`` (the one written after run step ``step``), keeps it as
        ``best.<suffix>`` when it beats the best so far, appends its record; returns the record."""
        import weights_convert

        scores = self.evaluate(checkpoint)
        mean_dice = scores.counts.mean_dice()
        if not math.isnan(mean_dice) and mean_dice > self.best_dice:
            weights_convert.write(checkpoint, Path(self.out) / f"best.{self.suffix}", force=True)
            self.best_step, self.best_dice = step, mean_dice
        classes = [str(c) for c in scores.counts.classes]
        record = {
            "step": step,
            "loss": train_loss,
            "val_loss": scores.val_loss,
            "dice": dict(zip(classes, map(_number, scores.counts.dice()), strict=True)),
            "iou": dict(zip(classes, map(_number, scores.counts.iou()), strict=True)),
            "mean_dice": _number(mean_dice),
            "images": scores.images,
            "best_step": self.best_step,
            "best_mean_dice": None if self.best_step is None else self.best_dice,
        }
        with open(Path(self.out) / METRICS_FILE, "a") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        return record


def batch_loss(loss: str, logits: np.ndarray, target: np.ndarray) -> float:
    """The loss ``loss`` of channels-first ``logits`` against ``target``, by its NumPy definition
    (channels last, float64)."""
    z = np.moveaxis(np.asarray(logits, np.float64), 1, -1)
    t = np.moveaxis(np.asarray(target, np.float64), 1, -1)
    return float(value_and_gradient(loss, z, t)[0])


def _number(value) -> float | None:
    """A score for JSON: NaN (no score) as None."""
    value = float(value)
    return None if math.isnan(value) else value


def _replace(path: Path, text: str) -> None:
    """``path``'s contents replaced by ``text`` atomically (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
