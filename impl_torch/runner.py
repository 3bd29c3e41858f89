"""What the parity harness runs in PyTorch. Each implementation has a ``runner`` module with the
same two functions; inputs and results are numpy in canonical layouts (NCHW, canonical names).

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)`` -> ``grad/<name>`` for every
  trainable tensor (loss = mean((output - target)**2), train mode), and ``step/<name>`` for every
  trainable tensor after one optimizer step (``optimizer`` in ``weights_convert.optim.OPTIMIZERS``).
"""

from __future__ import annotations

import numpy as np
import torch

from impl_torch.io import from_checkpoint, torch_dtype
from impl_torch.model import AttentionUNet
from weights_convert.checkpoint import Checkpoint
from weights_convert.formats.torch_format import to_numpy
from weights_convert.optim import OPTIMIZERS


def torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def _model(checkpoint: Checkpoint, dtype: str, device: str, train: bool) -> AttentionUNet:
    model = from_checkpoint(checkpoint, dtype).to(torch_device(device))
    return model.train(train)


def _input(x: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).to(device=torch_device(device), dtype=torch_dtype(dtype))


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    model = _model(checkpoint, dtype, device, train)
    with torch.no_grad():
        _, named = model(_input(x, dtype, device), return_intermediates=True)
    results = {name: to_numpy(value) for name, value in named.items()}
    if train:
        for name, value in model.state_dict().items():
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
                results[f"state/{name}"] = to_numpy(value)
    return results


def train_step(checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    model = _model(checkpoint, dtype, device, train=True)
    output = model(_input(x, dtype, device))
    loss = torch.mean((output - _input(target, dtype, device)) ** 2)
    loss.backward()
    params = dict(model.named_parameters())
    results = {f"grad/{name}": to_numpy(p.grad) for name, p in params.items()}
    hyper = OPTIMIZERS[optimizer]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params.values(), lr=hyper["lr"])
    else:
        opt = torch.optim.Adam(params.values(), lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])
    opt.step()
    results.update({f"step/{name}": to_numpy(p.detach()) for name, p in params.items()})
    return results
