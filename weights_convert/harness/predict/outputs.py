"""The files ``predict`` writes for one input, in ``--out``: ``<stem>_mask.png`` (a volume:
``<stem>_mask.tif``), 0 and 255 for one output channel, the class indices otherwise
(``images.write_mask``); ``<stem>_prob.tif``, the probabilities, float32 channels first; and
``<stem>_overlay.png`` (``overlay``). The three are written to hidden temporary files beside their
places and moved there only once all are complete, so a failure leaves nothing of the input behind;
an existing file is kept unless ``force``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from weights_convert.formats.io import modes_from_umask
from weights_convert.harness.images import write_image, write_mask
from weights_convert.harness.predict.overlay import write_overlay

KINDS = ("mask", "prob", "overlay")


def output_paths(out, stem: str, spatial_dims: int) -> dict[str, Path]:
    """kind -> the file that ``write_outputs`` writes for an input named ``stem``."""
    out = Path(out)
    mask = ".png" if spatial_dims == 2 else ".tif"
    names = {"mask": f"{stem}_mask{mask}", "prob": f"{stem}_prob.tif", "overlay": f"{stem}_overlay.png"}
    return {kind: out / name for kind, name in names.items()}


def mask_values(classes: np.ndarray, out_channels: int) -> np.ndarray:
    """What the mask file holds: 0 and 255 for one output channel (``read_mask`` reads it back as a
    binary mask), the class indices otherwise."""
    return classes * 255 if out_channels == 1 else classes


def write_outputs(paths: dict, title: str, image: np.ndarray, prediction, config, *, force: bool = False) -> None:
    """The three files of ``paths`` for ``image`` and its ``prediction``, all or none."""
    writers = {
        "mask": lambda path: write_mask(path, mask_values(prediction.classes, config.out_channels)),
        "prob": lambda path: write_image(path, prediction.probabilities, grey=True),
        "overlay": lambda path: write_overlay(path, title, image, prediction, config),
    }
    temporary: dict[str, Path] = {}
    try:
        for kind in KINDS:
            place = Path(paths[kind])
            descriptor, name = tempfile.mkstemp(dir=place.parent, prefix=f".{place.name}.", suffix=place.suffix)
            os.close(descriptor)
            temporary[kind] = Path(name)
            writers[kind](temporary[kind])
        for name in temporary.values():
            modes_from_umask(name)  # a new file's mode, not mkstemp's private 0o600
        existing = [str(paths[kind]) for kind in KINDS if os.path.lexists(paths[kind])]
        if existing and not force:
            raise FileExistsError(f"{existing[0]} exists (pass --force to overwrite)")
        for kind in KINDS:
            os.replace(temporary.pop(kind), paths[kind])
    finally:
        for name in temporary.values():
            with contextlib.suppress(OSError):
                name.unlink()
