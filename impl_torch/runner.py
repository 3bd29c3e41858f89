"""What the parity harness runs in PyTorch. Each implementation has a ``runner`` module with the
same three functions; inputs and results are numpy in canonical layouts (NCHW, canonical names).

- ``forward(checkpoint, x, *, dtype, device, train)`` -> ``{block name: NCHW array}`` (every named
  intermediate and ``output``); with ``train=True`` the BatchNorms use batch statistics and the
  dict also holds ``state/<canonical name>`` for every running statistic after the forward.
- ``train_step(checkpoint, x, target, *, dtype, device, optimizer)`` -> ``grad/<name>`` for every
  trainable tensor (loss = mean((output - target)**2), train mode), and ``step/<name>`` for every
  trainable tensor after one optimizer step (``optimizer`` in ``weights_convert.core.optim.OPTIMIZERS``).
- ``fit(checkpoint, xs, targets, *, dtype, device, optimizer)`` -> ``len(xs)`` training steps with
  one optimizer whose state persists: ``loss/step<k>`` (step k's loss, before its update) for every
  step, then ``param/<name>`` for every trainable tensor and ``state/<name>`` for every running
  statistic after the last step; with ``trajectory=True`` also ``trajectory/step<k>/<name>``, every
  trainable tensor after each step. From a training checkpoint (one with optimizer state, or the
  path of one) the fit continues that checkpoint's optimizer, which ``optimizer`` must name, and
  also returns its state after the last step (``weights_convert.core.optim.state_results``); with
  ``save_to`` it then saves model and optimizer there, in the format the path names
  (``save_training``).

``train_step`` and ``fit`` run the same eager PyTorch training step (``torch.optim``, autograd);
eager mode is how PyTorch is normally trained, so nothing is compiled.

``dtype`` is "float32", "float64" or "mixed_bfloat16": float32 parameters and input, the model's
forward under bfloat16 autocast (``impl_torch.model``), the loss in float32 from the logits cast to
float32, float32 gradients and optimizer updates. Every result is float32/float64 numpy (bfloat16
activations are widened exactly), or int64 for the counters.
"""

from __future__ import annotations

import numpy as np
import torch

import weights_convert
from impl_torch import training
from impl_torch.io import from_checkpoint, torch_dtype
from impl_torch.model import AttentionUNet
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.optim import check_fit_batches, check_optimizer, check_training, state_results
from weights_convert.formats.torch_format import to_numpy

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def torch_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "gpu" else "cpu")


def _model(checkpoint: Checkpoint, dtype: str, device: str, train: bool) -> AttentionUNet:
    model = from_checkpoint(checkpoint, dtype).to(torch_device(device))
    return model.train(train)


def _input(x: np.ndarray, dtype: str, device: str) -> torch.Tensor:
    """In the parameters' dtype: float32 under mixed precision, which autocast casts per op."""
    return torch.from_numpy(np.asarray(x)).to(device=torch_device(device), dtype=torch_dtype(dtype))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array; bfloat16 widened to float32 (exact), which every framework's numpy reads."""
    return to_numpy(tensor.float() if tensor.dtype == torch.bfloat16 else tensor)


def _buffers(model: AttentionUNet) -> dict:
    """Every running statistic, in state_dict order."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in BUFFERS}


def make_optimizer(parameters, optimizer: str) -> torch.optim.Optimizer:
    """``torch.optim`` SGD or Adam with the hyperparameters of ``weights_convert.core.optim.OPTIMIZERS``."""
    hyper = check_optimizer(optimizer)
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=hyper["lr"])
    return torch.optim.Adam(parameters, lr=hyper["lr"], betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"])


def _training(checkpoint: Checkpoint, dtype: str, device: str, optimizer: str):
    """A train-mode model and a fresh optimizer over its parameters."""
    model = _model(checkpoint, dtype, device, train=True)
    return model, make_optimizer(model.parameters(), optimizer)


def _backward(model: AttentionUNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor):
    """One train-mode forward (updating the running statistics) and the gradients of
    mean((output - target)**2) in the parameters' ``.grad``; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    # Under mixed precision the logits are bfloat16: the loss is taken in float32 (the target's dtype).
    loss = torch.mean((model(x).to(target.dtype) - target) ** 2)
    loss.backward()
    return loss.detach()


def forward(checkpoint: Checkpoint, x: np.ndarray, *, dtype="float32", device="cpu", train=False) -> dict:
    model = _model(checkpoint, dtype, device, train)
    with torch.no_grad():
        _, named = model(_input(x, dtype, device), return_intermediates=True)
    results = {name: _numpy(value) for name, value in named.items()}
    if train:
        results.update({f"state/{name}": _numpy(value) for name, value in _buffers(model).items()})
    return results


def train_step(checkpoint: Checkpoint, x, target, *, dtype="float32", device="cpu", optimizer="sgd") -> dict:
    model, opt = _training(checkpoint, dtype, device, optimizer)
    _backward(model, opt, _input(x, dtype, device), _input(target, dtype, device))
    params = dict(model.named_parameters())
    results = {f"grad/{name}": _numpy(p.grad) for name, p in params.items()}
    opt.step()
    results.update({f"step/{name}": _numpy(p.detach()) for name, p in params.items()})
    return results


def fit(
    checkpoint,
    xs,
    targets,
    *,
    dtype="float32",
    device="cpu",
    optimizer="sgd",
    trajectory=False,
    save_to=None,
) -> dict:
    """``xs`` (steps, N, C, H, W), ``targets`` (steps, N, out_channels, H, W): step k trains on
    ``xs[k-1]`` against ``targets[k-1]`` with one optimizer (Adam's t runs 1, 2, ...)."""
    xs, targets = check_fit_batches(xs, targets)
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = weights_convert.read(checkpoint)
    check_training(checkpoint, optimizer, save_to)
    if checkpoint.optimizer is None:
        model, opt = _training(checkpoint, dtype, device, optimizer)
    else:
        model, opt = training.from_training_checkpoint(checkpoint, dtype, device=torch_device(device))
    losses, path = [], {}
    for k, (x, target) in enumerate(zip(_input(xs, dtype, device), _input(targets, dtype, device), strict=True)):
        losses.append(_backward(model, opt, x, target))
        opt.step()
        if trajectory:  # copies: the optimizer updates the parameters in place
            path.update({f"trajectory/step{k + 1}/{n}": _numpy(p).copy() for n, p in model.named_parameters()})
    results = {f"loss/step{k + 1}": _numpy(loss) for k, loss in enumerate(losses)}
    results.update({f"param/{name}": _numpy(p.detach()) for name, p in model.named_parameters()})
    results.update({f"state/{name}": _numpy(value) for name, value in _buffers(model).items()})
    if checkpoint.optimizer is not None:
        results.update(state_results(training.optimizer_state(model, opt)))
        if save_to is not None:
            training.save_training(model, opt, save_to)
    return results | path
