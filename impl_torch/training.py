"""Training checkpoints in PyTorch: the model and its ``torch.optim`` optimizer (SGD, Adam, AdamW)
saved to and loaded from any format that holds optimizer state, through the canonical optimizer
state of ``weights_convert.core.optimizer_state`` (torch's definitions are the canonical ones)."""

from __future__ import annotations

import torch

import weights_convert
from impl_torch.io import check_model, from_checkpoint, precision, to_checkpoint
from impl_torch.model import AttentionUNet
from weights_convert.core.architectures import warn_assumed
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.optim import hyperparameters
from weights_convert.core.optimizer_state import OptimizerState
from weights_convert.formats.torch_format import canonical_optimizer_state, torch_optimizer_state


def make_optimizer(model: AttentionUNet, name: str = "adam", **hyper) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` / ``Adam`` / ``AdamW`` over ``model.parameters()`` with the canonical
    hyperparameters of ``name`` (the registry, ``weights_convert.core.optim``) and ``hyper``."""
    hyper = hyperparameters(name, **hyper)
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=hyper["lr"],
            momentum=hyper["momentum"],
            nesterov=hyper["nesterov"],
            weight_decay=hyper["weight_decay"],
        )
    adam = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    betas = (hyper["b1"], hyper["b2"])
    return adam(model.parameters(), lr=hyper["lr"], betas=betas, eps=hyper["eps"], weight_decay=hyper["weight_decay"])


def optimizer_state(model: AttentionUNet, optimizer: torch.optim.Optimizer) -> OptimizerState:
    """The canonical state of ``optimizer``, which must be over ``model.parameters()`` in one group."""
    return canonical_optimizer_state(optimizer.state_dict(), model.config, source="torch optimizer")


def to_training_checkpoint(model: AttentionUNet, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Model tensors and optimizer state as one canonical checkpoint."""
    checkpoint = to_checkpoint(model)
    return Checkpoint.from_tensors(
        checkpoint.tensors, checkpoint.config, allow_nonfinite=True, optimizer=optimizer_state(model, optimizer)
    )


def from_training_checkpoint(
    checkpoint: Checkpoint, dtype="float32", *, device="cpu"
) -> tuple[AttentionUNet, torch.optim.Optimizer]:
    """A train-mode model on ``device`` and its optimizer with the checkpoint's state (on the same
    device), ready for the next step."""
    if checkpoint.optimizer is None:
        raise CheckpointError("the checkpoint holds no optimizer state (a weights-only checkpoint)")
    model = from_checkpoint(checkpoint, dtype).to(device).train()
    return model, restored_optimizer(model, checkpoint)


def restored_optimizer(model: AttentionUNet, checkpoint: Checkpoint) -> torch.optim.Optimizer:
    """Training checkpoint ``checkpoint``'s optimizer over ``model.parameters()``, its state
    restored (``load_state_dict`` casts the slots to each parameter's dtype and device)."""
    state = checkpoint.optimizer
    optimizer = make_optimizer(model, state.name, **state.hyper)
    optimizer.load_state_dict(torch_optimizer_state(state, checkpoint.config))
    return optimizer


def save_training(model: AttentionUNet, optimizer: torch.optim.Optimizer, path, *, force: bool = False) -> None:
    """Save model and optimizer state in the format named by ``path`` (``.pt`` natively:
    ``{"model": state_dict, "optimizer": optimizer.state_dict()}``); atomic, existing files kept
    unless ``force``."""
    check_model(model)
    weights_convert.write(to_training_checkpoint(model, optimizer), path, force=force)


def load_training(path, *, dtype="float32", config=None) -> tuple[AttentionUNet, torch.optim.Optimizer]:
    """(train-mode model, optimizer) from a training checkpoint in any format that holds one;
    ``config`` as in ``impl_torch.load`` (a MONAI model's ``.pt`` cannot tell its strides)."""
    precision(dtype)
    checkpoint = weights_convert.read(path, config=config)
    warn_assumed(checkpoint.assumed, path)
    return from_training_checkpoint(checkpoint, dtype)
