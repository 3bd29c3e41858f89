"""Segmentation metrics, framework-free: per class Dice and IoU of the hard prediction against a
one-hot target, accumulated over a whole validation set.

Logits and targets are channels first, (N, C, *spatial), as every runner returns them. The hard
prediction is ``logit > 0`` for one output channel (the foreground probability sigmoid(logit)
above 1/2) and the argmax over the channels for several; the target's class is ``t > 1/2`` for
one channel and the argmax of the one-hot target for several.

The classes: 0..C-1 for C >= 2 output channels; the foreground class 1 alone for one channel.
For class c, with P the pixels predicted c and T the pixels of class c in the target,
``Dice = 2 |P & T| / (|P| + |T|)`` and ``IoU = |P & T| / |P | T|``, where the counts are sums over
every pixel of every image added (one pooled count per class over the whole set, not a mean of
per-image scores: MONAI's ``DiceMetric`` averages per image, which weighs a small image as much as
a large one). A class absent from both the predictions and the targets of the whole set has no
score (0 / 0): it is NaN here, ``null`` in JSON, and left out of the mean. A class present in only
one of them scores 0.

``mean_dice`` is the mean Dice over the foreground classes 1..C-1 that have a score (for one
channel the foreground class's Dice), NaN when none has one."""

from __future__ import annotations

import numpy as np


def hard_prediction(logits: np.ndarray) -> np.ndarray:
    """The predicted class of every pixel, int64 (N, *spatial): ``logit > 0`` (class 1) for one
    output channel, the argmax over the channels for several."""
    logits = np.asarray(logits)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return np.argmax(logits, axis=1).astype(np.int64)


def target_classes(target: np.ndarray) -> np.ndarray:
    """The class of every pixel of a one-hot target, int64 (N, *spatial): ``t > 1/2`` for one
    channel, the argmax over the channels for several."""
    target = np.asarray(target)
    if target.shape[1] == 1:
        return (target[:, 0] > 0.5).astype(np.int64)
    return np.argmax(target, axis=1).astype(np.int64)


def classes_scored(channels: int) -> tuple[int, ...]:
    """The classes the metrics report for a model of ``channels`` outputs: (1,) for one, 0..C-1."""
    return (1,) if channels == 1 else tuple(range(channels))


def foreground(channels: int) -> tuple[int, ...]:
    """The classes ``mean_dice`` averages: the foreground ones, 1..C-1 (1 for one channel)."""
    return (1,) if channels == 1 else tuple(range(1, channels))


class SegmentationCounts:
    """Per class pixel counts added up over batches: |P & T|, |P| and |T|; ``dice``, ``iou`` and
    ``mean_dice`` from the totals (the module's docstring says how)."""

    def __init__(self, channels: int):
        if channels < 1:
            raise ValueError(f"segmentation metrics need at least one output channel, got {channels}")
        self.channels = channels
        self.classes = classes_scored(channels)
        self.intersection = np.zeros(len(self.classes), np.int64)
        self.predicted = np.zeros(len(self.classes), np.int64)
        self.actual = np.zeros(len(self.classes), np.int64)

    def add(self, logits: np.ndarray, target: np.ndarray) -> None:
        """Counts the pixels of one batch of logits against its one-hot target, both (N, C, ...)."""
        logits, target = np.asarray(logits), np.asarray(target)
        if logits.shape != target.shape or logits.shape[1] != self.channels:
            raise ValueError(f"logits {logits.shape} and target {target.shape} must both be (N, {self.channels}, ...)")
        predicted, actual = hard_prediction(logits), target_classes(target)
        for i, c in enumerate(self.classes):
            in_prediction, in_target = predicted == c, actual == c
            self.intersection[i] += int(np.count_nonzero(in_prediction & in_target))
            self.predicted[i] += int(np.count_nonzero(in_prediction))
            self.actual[i] += int(np.count_nonzero(in_target))

    def dice(self) -> np.ndarray:
        """Dice per class (``self.classes``), NaN for a class in neither predictions nor targets."""
        denominator = self.predicted + self.actual
        return _ratio(2 * self.intersection, denominator)

    def iou(self) -> np.ndarray:
        """IoU per class (``self.classes``), NaN for a class in neither predictions nor targets."""
        union = self.predicted + self.actual - self.intersection
        return _ratio(self.intersection, union)

    def mean_dice(self) -> float:
        """The mean Dice of the foreground classes that have a score; NaN when none has."""
        scores = dict(zip(self.classes, self.dice(), strict=True))
        scored = [scores[c] for c in foreground(self.channels) if not np.isnan(scores[c])]
        return float(np.mean(scored)) if scored else float("nan")


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator as float64, NaN where the denominator is 0 (a class never seen)."""
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, np.nan)
