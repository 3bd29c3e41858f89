"""Deployment exports of the PyTorch model, and the runtimes that run them: ONNX (onnxruntime),
``torch.export`` (``.pt2``) and TorchScript (``.torchscript``).

Every file takes NCHW input and returns NCHW logits (NCDHW for a 3D model; eval mode: BatchNorm
uses its running statistics), with a dynamic batch and spatial sides: any batch >= 1 and any H, W
(D, H, W) >= the model's ``min_size`` (2**depth), odd sizes included; for MONAI's network any
multiple of ``side_multiple``, the strides' product. ``impl_flax/export.py`` and
``impl_keras/export.py`` mirror this file for ``jax.export`` and TensorFlow SavedModel.

- ``.onnx``: the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) from the same
  ``torch.export`` program as ``.pt2``, opset ``ONNX_OPSET``; input ``x``, output ``logits``.
  float32 only: onnxruntime's CPU provider has no float64 convolution.
- ``.pt2``: ``torch.export.save`` of ``torch.export.export`` with symbolic batch and spatial sides
  (sizes of 1 included: exported with ``backed_size_oblivious``, so a batch of 1 or a 1x1
  bottleneck are not specialised away).
- ``.torchscript``: ``torch.jit.script`` of ``ScriptedLogits``, the model's eval forward written
  for TorchScript over the model's own blocks.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from impl_torch.io import from_checkpoint
from impl_torch.model import AttentionUNet
from impl_torch.monai_model import MonaiAttentionUNet
from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.spec import SPATIAL_NAMES, expected_input, layout

SUFFIXES = (".onnx", ".pt2", ".torchscript")
ONNX_OPSET = 20
INPUT_NAME = "x"
OUTPUT_NAME = "logits"


class ScriptedLogits(nn.Module):
    """``AttentionUNet``'s eval forward (logits only) in a form ``torch.jit.script`` compiles: the
    encoders and decoders in ``nn.ModuleList``s (the model holds them as ``e1``, ``d1``, ...
    attributes, named for the canonical checkpoint), and the input check of
    ``weights_convert.core.spec.check_input_shape`` with its message prebuilt. Shares the model's
    blocks, so it computes what ``model(x)`` computes."""

    def __init__(self, model: AttentionUNet):
        super().__init__()
        config = model.config
        self.encoders = nn.ModuleList(model.encoders)
        self.b1 = model.b1
        self.decoders = nn.ModuleList(model.decoders)
        self.head = model.output
        self.rank = config.spatial_dims + 2
        self.in_channels = config.in_channels
        self.min_size = config.min_size
        self.expected = expected_input(config, "channels_first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.rank or x.shape[1] != self.in_channels or min(x.shape[2:]) < self.min_size:
            raise ValueError(self.expected + ", got " + str(x.shape))
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            skip, x = encoder(x)
            skips.append(skip)
        x = self.b1(x)
        depth = len(skips)
        for j, decoder in enumerate(self.decoders):
            x, _ = decoder(x, skips[depth - 1 - j])
        return self.head(x)


class ScriptedMonaiLogits(nn.Module):
    """``MonaiAttentionUNet``'s eval forward (logits only) for ``torch.jit.script``: MONAI's own
    recursion (the model's ``model`` Sequential, each level running the levels below inside its
    ``submodule``), behind the input check with its message prebuilt. Shares the model's blocks."""

    def __init__(self, model: MonaiAttentionUNet):
        super().__init__()
        config = model.config
        self.model = model.model
        self.rank = config.spatial_dims + 2
        self.in_channels = config.in_channels
        self.side_multiple = config.side_multiple
        self.expected = expected_input(config, "channels_first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        misfit = x.dim() != self.rank or x.shape[1] != self.in_channels
        for side in x.shape[2:]:
            misfit = misfit or side < self.side_multiple or side % self.side_multiple != 0
        if misfit:
            raise ValueError(self.expected + ", got " + str(x.shape))
        return self.model(x)


def output_weight(model) -> torch.Tensor:
    """The head's kernel, whose dtype is the model's."""
    return model.output.weight if isinstance(model, AttentionUNet) else model.model[2].conv.weight


def example_sides(config) -> tuple[int, ...]:
    """Distinct sides above the smallest the network takes (a side of 1, of ``min_size``, or two
    equal sides would let a tracer specialise): odd ones for the article's network, odd multiples
    of ``side_multiple`` for MONAI's."""
    if config.side_multiple > 1:
        m = config.side_multiple
        return (3 * m, 5 * m, 7 * m)[-config.spatial_dims :]
    m = config.min_size
    return (2 * m + 3, 2 * m + 1, 2 * m + 5)[-config.spatial_dims :]


def example_input(model) -> torch.Tensor:
    """The input traced at export: batch 2 at ``example_sides``; the exported graph is symbolic
    in every axis but the channels."""
    config = model.config
    return torch.zeros(2, config.in_channels, *example_sides(config), dtype=output_weight(model).dtype)


def dynamic_axes(model: AttentionUNet) -> dict[int, str]:
    """The input's dynamic axes, by position (channels first): ``batch``, then ``depth`` (3D),
    ``height`` and ``width``."""
    spatial = SPATIAL_NAMES[model.config.spatial_dims]
    return {0: "batch", **{axis: name for axis, name in enumerate(spatial, start=2)}}


def exported_program(model: AttentionUNet) -> torch.export.ExportedProgram:
    """``torch.export`` of the eval model with a dynamic batch (>= 1) and spatial sides (>= ``min_size``)."""
    import torch.fx.experimental._config as fx_config

    dim = torch.export.Dim
    config = model.config
    axes = dynamic_axes(model)
    dynamic = {"x": {axis: dim(name, min=1 if axis == 0 else config.min_size) for axis, name in axes.items()}}
    if config.side_multiple > 1:  # MONAI's network: every side a multiple of the strides' product
        m = config.side_multiple
        dynamic["x"] |= {axis: m * dim(f"{name}_blocks", min=1) for axis, name in axes.items() if axis > 0}
    # Without it, torch.export specialises every size the trace sees as 1 or compares with 1.
    with fx_config.patch(backed_size_oblivious=True), _quiet():
        return torch.export.export(model.eval(), (example_input(model),), dynamic_shapes=dynamic)


def export_pt2(model: AttentionUNet, path) -> None:
    torch.export.save(exported_program(model), str(path))


def export_onnx(model: AttentionUNet, path) -> None:
    if output_weight(model).dtype != torch.float32:
        dtype = output_weight(model).dtype
        raise ValueError(f"ONNX export is float32 only (onnxruntime has no float64 convolution on CPU), got {dtype}")
    with _quiet():
        program = torch.onnx.export(
            exported_program(model),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
        proto = program.model_proto
    _name_axes(proto, model)
    import onnx

    onnx.save(proto, str(path))


def _name_axes(proto, model: AttentionUNet) -> None:
    """The exported model's dynamic axes named as ``dynamic_axes`` names them (``batch``,
    ``height``, ...) wherever the exporter's symbols (``s77``) stand, and the input contract in its
    metadata (``min_size``: the smallest spatial side, which onnxruntime would refuse only with a
    kernel's shape error), in place."""
    import re

    import onnx

    axes = dynamic_axes(model)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    names = {dims[axis].dim_param: name for axis, name in axes.items() if dims[axis].dim_param}
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: names[m.group(1)], dim.dim_param)
    config = model.config
    contract = {
        "layout": layout(config, "channels_first"),
        "min_size": str(config.min_size),
        "side_multiple": str(config.side_multiple),
        "axes": ",".join(axes.values()),
    }
    onnx.helper.set_model_props(proto, contract)


def export_torchscript(model: AttentionUNet, path) -> None:
    wrapper = ScriptedLogits if isinstance(model, AttentionUNet) else ScriptedMonaiLogits
    scripted = torch.jit.script(wrapper(model.eval()))
    torch.jit.save(scripted, str(path))


EXPORTERS = {".onnx": export_onnx, ".pt2": export_pt2, ".torchscript": export_torchscript}


def export(checkpoint: Checkpoint, path, dtype: str = "float32") -> None:
    """Write ``checkpoint``'s model at ``dtype`` (float32 or float64) in the format named by ``path``'s suffix."""
    suffix = Path(path).suffix
    if suffix not in EXPORTERS:
        raise ValueError(f"{path}: not a PyTorch export (expected one of {', '.join(SUFFIXES)})")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"export dtype must be float32 or float64, got {dtype!r}")
    model = from_checkpoint(checkpoint, dtype).eval()
    with torch.no_grad():
        EXPORTERS[suffix](model, path)


def run(path, x: np.ndarray) -> np.ndarray:
    """The logits (NCHW, NCDHW) of the exported file ``path`` on ``x`` (NCHW, NCDHW, in the file's dtype), in the
    file's own runtime: onnxruntime, ``torch.export.load`` or ``torch.jit.load``."""
    suffix = Path(path).suffix
    if suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0]
    if suffix == ".pt2":
        module = torch.export.load(str(path)).module()
    elif suffix == ".torchscript":
        module = torch.jit.load(str(path))
    else:
        raise ValueError(f"{path}: not a PyTorch export (expected one of {', '.join(SUFFIXES)})")
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


@contextlib.contextmanager
def _quiet():
    """The exporters log and warn about optional packages (torchvision) and deprecations that say
    nothing about the export; errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
