"""``attention-unet predict``: segment images and volumes with a checkpoint of either architecture,
in one framework, and write each input's mask, probabilities and an overlay of the image, the mask
and every attention gate's map.

An input of any size is zero-padded to the sides the architecture takes (``sizes``) and cropped
back; with ``--tile`` it is cut into overlapping windows whose logits are blended as MONAI's
``sliding_window_inference`` blends them (``tiling``, NumPy alone). The model is built once per run
(``models``: ``impl_<framework>.runner.predictor``); ``prediction`` runs one image through it,
``outputs`` and ``overlay`` write the files, ``command`` is the subcommand.
"""

from weights_convert.harness.predict.command import add_parser, cmd_predict
from weights_convert.harness.predict.prediction import Prediction, predict
from weights_convert.harness.predict.tiling import BLENDS, OVERLAP, Blend, starts, weights, windows

__all__ = [
    "BLENDS",
    "OVERLAP",
    "Blend",
    "Prediction",
    "add_parser",
    "cmd_predict",
    "predict",
    "starts",
    "weights",
    "windows",
]
