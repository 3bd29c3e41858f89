"""One image through the model, window by window: the image padded to the windows
(``sizes``), the windows placed and blended (``tiling``), then cropped back to the image.

What is blended are the logits (``output``) and each attention gate's map (``dj.ag``: the mean over
its channels, a per-channel map in the article's network and one channel in MONAI's, resized to
the window by ``sizes.resized``), never probabilities: the probabilities are the sigmoid (one
output channel) or the softmax over the channels of the blended logits, and the mask is decided on
those same logits (logit > 0, or the largest), so mask and probabilities never disagree. Where
one window alone lies, the blend is the model's own output (exactly, with constant weights).

``run`` is a framework's predictor (``models.predictor``): a channels-first batch in, the named
block outputs out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from weights_convert.harness.metrics import hard_prediction
from weights_convert.harness.predict.sizes import fitted, padded, resized
from weights_convert.harness.predict.tiling import OVERLAP, Blend, weights, windows


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A whole image's blended logits (C_out, *sides) and gate maps (name -> (*sides)), float64,
    and how many windows gave them."""

    logits: np.ndarray
    gates: dict
    windows: int

    @property
    def probabilities(self) -> np.ndarray:
        """float32 (C_out, *sides): sigmoid for one output channel, softmax over several."""
        return probabilities(self.logits).astype(np.float32)

    @property
    def classes(self) -> np.ndarray:
        """int64 (*sides): 1 where the one channel's logit is positive, else the largest channel."""
        return classes(self.logits)


def probabilities(logits: np.ndarray) -> np.ndarray:
    if logits.shape[0] == 1:
        return np.exp(-np.logaddexp(0.0, -logits))  # sigmoid without overflow
    shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
    return shifted / shifted.sum(axis=0, keepdims=True)


def classes(logits: np.ndarray) -> np.ndarray:
    """The hard prediction of one image's (C, *sides) logits: the validation metrics' rule."""
    return hard_prediction(logits[None])[0]


def gate_names(config) -> list[str]:
    """The attention gates' maps among the named block outputs, from the deepest."""
    return [name for name in config.block_names if name.endswith(".ag")]


def window_sides(config, sides, tile=None) -> tuple[int, ...]:
    """The window: ``tile`` (already checked against the side rule), or the image's sides fitted
    to the architecture (``sizes.fitted``): one window over the whole padded image."""
    return tuple(tile) if tile is not None else fitted(config, sides)


def predict(
    run, config, image: np.ndarray, *, tile=None, overlap: float = OVERLAP, blend: str = "constant", batch: int = 1
) -> Prediction:
    """The prediction for ``image`` (C, *sides), float32 channels first, as ``read_image`` gives it."""
    sides = image.shape[1:]
    window = window_sides(config, sides, tile)
    canvas = tuple(max(side, w) for side, w in zip(sides, window, strict=True))
    source = padded(image, canvas)
    places = windows(canvas, window, overlap)
    gates = gate_names(config)
    blended = Blend(canvas, weights(window, blend))
    for first in range(0, len(places), batch):
        chunk = places[first : first + batch]
        named = run(np.stack([source[(slice(None), *place)] for place in chunk]))
        for k, place in enumerate(chunk):
            outputs = {"output": named["output"][k]}
            outputs.update({g: resized(np.mean(named[g][k], axis=0, keepdims=True), window) for g in gates})
            blended.add(place, outputs)
    crop = tuple(slice(0, side) for side in sides)
    logits = blended.result("output")[(slice(None), *crop)]
    maps = {g: blended.result(g)[(0, *crop)] for g in gates}
    return Prediction(logits, maps, len(places))
