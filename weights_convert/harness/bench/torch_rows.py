"""PyTorch's rows: eager, channels_last, torch.compile and both, each an eval forward and a training step.

The model is ``impl_torch.io.from_checkpoint`` of the seeded weights in the run's dtype
("mixed_bfloat16": float32 parameters under bfloat16 autocast), its optimizer
``impl_torch.training.make_optimizer``'s. Imported only where torch is installed.
"""

from __future__ import annotations

import torch

from impl_torch.io import from_checkpoint
from impl_torch.trainer import train_step_once
from impl_torch.training import make_optimizer
from weights_convert.core.random_init import random_checkpoint
from weights_convert.harness.bench.matmul_settings import torch_scope, torch_setting
from weights_convert.harness.bench.rows import error_rows, run_variants
from weights_convert.harness.bench.settings import MODES, OPTIMIZER, OPTIMIZER_HYPER, VARIANTS, Settings, inputs

# variant -> (whether the model and its data are channels last, whether the model runs through torch.compile)
OPTIONS = {
    "eager": (False, False),
    "channels_last": (True, False),
    "torch.compile": (False, True),
    "torch.compile+channels_last": (True, True),
}
# The channels-last memory format of a 2D (NCHW) and a 3D (NCDHW) model.
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def rows(settings: Settings) -> list[dict]:
    if settings.device == "gpu" and not torch.cuda.is_available():
        return error_rows("torch", "torch", settings, "--device gpu: torch sees no CUDA device")
    device = torch.device("cuda" if settings.device == "gpu" else "cpu")
    weights = random_checkpoint(settings.config, seed=0)
    x, target = inputs(settings, channels_last=False)

    def timed(mode: str, channels_last: bool, compiled: bool):
        memory_format = CHANNELS_LAST[settings.config.spatial_dims] if channels_last else torch.contiguous_format

        def build_step():
            model = from_checkpoint(weights, settings.dtype).to(device=device, memory_format=memory_format)
            run = torch.compile(model) if compiled else model
            x_on, target_on = (on_device(a, device, memory_format) for a in (x, target))
            if mode == "forward":
                return forward_step(run, x_on)
            optimizer = make_optimizer(model, OPTIMIZER, **OPTIMIZER_HYPER)
            return train_step(run, optimizer, x_on, target_on)

        return build_step

    variants = {name: {mode: timed(mode, *OPTIONS[name]) for mode in MODES} for name in VARIANTS["torch"]}
    return run_variants("torch", "torch", settings, variants, torch_scope, torch_setting)


def on_device(array, device: torch.device, memory_format) -> torch.Tensor:
    return torch.from_numpy(array).to(device).contiguous(memory_format=memory_format)


def device_sync(device: torch.device):
    """What waits for a step's work on ``device``: CUDA runs asynchronously, the CPU does not."""
    if device.type == "cuda":
        return lambda _: torch.cuda.synchronize()
    return lambda _: None


def forward_step(model, x):
    """(step, sync) of one eval forward of ``model`` (the module or its compiled form); the step
    returns the logits."""
    model.eval()

    def step():
        with torch.inference_mode():
            return model(x)

    return step, device_sync(x.device)


def train_step(model, optimizer, x, target):
    """(step, sync) of one train-mode step of ``model`` (the module or its compiled form) with
    ``optimizer`` (over its parameters): the trainer's step (``impl_torch.trainer.train_step_once``:
    MSE loss, backward, optimizer step); the step returns the loss."""
    model.train()
    return (lambda: train_step_once(model, optimizer, x, target)), device_sync(x.device)
