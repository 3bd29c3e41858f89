"""What the parity harness runs in PyTorch. Each implementation has a ``runner`` module with the
same four functions; inputs and results are numpy in canonical layouts (NCHW, canonical names).

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``predictor(checkpoint, *, dtype, device)`` -> a function of x -> the eval-mode ``forward``
  dict, the model built once (``attention-unet predict`` runs every window through it).
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)`` -> ``grad/<name>`` for every
  trainable tensor (loss = mean((output - target)**2), train mode), and ``step/<name>`` for every
  trainable tensor after one step of a fresh optimizer (``weights_convert.core.optim``'s registry).
- ``fit(checkpoint, xs, targets, *, dtype, device, optimizer, trajectory, save_to)`` -> ``len(xs)``
  steps of the one training loop (``weights_convert.core.loop``, which says what it returns), step
  k on ``xs[k - 1]`` against ``targets[k - 1]``. From a training checkpoint (or its path) the fit
  continues that checkpoint's optimizer, which ``optimizer`` must name, and also returns its state
  after the last step; with ``save_to`` it then saves model and optimizer there, in the format the
  path names.

``train_step`` and ``fit`` are the trainer's (``impl_torch.trainer``: eager PyTorch, autograd,
``torch.optim``). ``dtype`` is "float32", "float64" or "mixed_bfloat16" (the trainer says how each
runs).
"""

from __future__ import annotations

import numpy as np
import torch

from impl_torch import trainer
from impl_torch.io import from_checkpoint
from impl_torch.model import AttentionUNet
from impl_torch.trainer import buffers as _buffers
from impl_torch.trainer import to_result, to_tensor, torch_device, train_step
from weights_convert.core.checkpoint import Checkpoint

__all__ = ["fit", "forward", "predictor", "train_step"]


def _model(checkpoint: Checkpoint, dtype: str, device: str, train: bool) -> AttentionUNet:
    model = from_checkpoint(checkpoint, dtype).to(torch_device(device))
    return model.train(train)


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    model = _model(checkpoint, dtype, device, train)
    with torch.no_grad():
        _, named = model(to_tensor(x, dtype, torch_device(device)), return_intermediates=True)
    results = {name: to_result(value) for name, value in named.items()}
    if train:
        results.update({f"state/{name}": to_result(value) for name, value in _buffers(model).items()})
    return results


def predictor(checkpoint: Checkpoint, *, dtype="float32", device="cpu"):
    """``forward`` in eval mode of one model built once, for many calls (``attention-unet predict``
    runs every window through it): a function of a batch -> ``{block name: NCHW array}``."""
    model = _model(checkpoint, dtype, device, train=False)

    def named_outputs(x: np.ndarray) -> dict:
        with torch.no_grad():
            _, named = model(to_tensor(x, dtype, torch_device(device)), return_intermediates=True)
        return {name: to_result(value) for name, value in named.items()}

    return named_outputs


def fit(checkpoint, xs, targets, **settings) -> dict:
    """``impl_torch.trainer.fit``, a fresh optimizer being one of the parity checks' two."""
    return trainer.fit(checkpoint, xs, targets, use="parity", **settings)
