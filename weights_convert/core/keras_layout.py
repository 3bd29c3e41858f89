"""How Keras 3 saves ``impl_keras.AttentionUNet`` and ``impl_keras.MonaiAttentionUNet``: the layer
tree as its saving walks it, the HDF5 group and dataset of every canonical tensor, the shapes Keras
stores them in, and the dtype policy that holds a checkpoint's tensors. Names and shapes only: no
h5py, no Keras.

Keras writes one HDF5 group per layer at the layer's *attribute* path, a ``layers`` group for each
``keras.Sequential`` whose members are named after their class (``conv2d``, or ``conv3d`` in 3D,
``batch_norm``, ``re_lu``, then ``conv2d_1`` ...), and below each layer a ``vars`` group carrying the layer's
*name* as an attribute and its variables as datasets ``0``, ``1``, ... in creation order. The
layer names are the canonical module names and the creation order is the canonical leaf order, so
``keras_layers(config)`` (the model's layer tree, mirroring ``impl_keras/model.py`` class by class)
and the spec fix every dataset's path, shape and meaning.

Keras walks a layer's attributes in alphabetical order and saves a layer under the first path that
reaches it. In MONAI's model (``impl_keras/monai_model.py``) every ``nn.Sequential`` of MONAI's is a
``keras.Sequential`` (its members under ``layers/``: ``convolution``, ``batch_norm``,
``conv_block``, ``attention_layer`` ...), and the model's own ``layers`` property (its direct
layers: the Sequential ``model`` alone) sorts before ``model``, so the whole tree lies under
``layers/sequential``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from weights_convert.core.checkpoint import Checkpoint
from weights_convert.core.layouts import has_kernel_rank, module_path, rule
from weights_convert.core.monai_spec import MonaiConfig
from weights_convert.core.spec import LEAVES, ModelConfig, ParamSpec, param_specs

# The model's own ``vars`` group carries its name: Keras' default name for the class, by architecture.
MODEL_NAMES = {"article": "attention_u_net", "monai": "monai_attention_u_net"}
# The package impl_keras registers its classes under (``register_keras_serializable(package=...)``).
PACKAGE = "attention_unet"


def keras_path(spec: ParamSpec) -> str:
    """The Keras variable path of a canonical tensor, below the model's own name:
    ``e1.conv.conv.0.weight`` -> ``e1/conv/conv/0/kernel``."""
    return "/".join((*module_path(spec), rule(spec).keras))


@dataclasses.dataclass(frozen=True)
class KerasLayer:
    """One saveable of the model: its HDF5 group (``""`` for the model), its layer name (the
    ``vars`` group's ``name`` attribute) and the canonical module whose tensors it holds, if any."""

    path: str
    name: str
    module: str | None = None


def keras_layers(config: ModelConfig | MonaiConfig) -> list[KerasLayer]:
    """Every layer of the Keras model of ``config`` (``impl_keras.AttentionUNet`` or
    ``impl_keras.MonaiAttentionUNet``) with the group Keras saves it under."""
    if config.architecture == "monai":
        return _monai_layers(config)
    conv = f"conv{config.spatial_dims}d"  # Keras' Conv2D or Conv3D, saved under its snake-case name
    layers = [KerasLayer("", MODEL_NAMES["article"])]
    for i in range(config.depth):
        layers += _encoder_block(f"e{i + 1}", conv)
    layers += _conv_block("b1", "b1", "b1", conv)
    for j in range(config.depth):
        layers += _decoder_block(f"d{j + 1}", conv)
    layers.append(KerasLayer("head", "output", "output"))  # the attribute ``head``, named ``output``
    return layers


def _sequential(path: str, name: str, module: str, members) -> list[KerasLayer]:
    """A ``keras.Sequential`` and its members ``(Keras class, layer name, holds weights)``; Keras
    saves the members under ``layers/`` by snake-case class name, numbered from the second on."""
    groups = _member_groups([class_name for class_name, _, _ in members])
    return [KerasLayer(path, name)] + [
        KerasLayer(f"{path}/layers/{group}", layer_name, f"{module}.{layer_name}" if holds_weights else None)
        for group, (_, layer_name, holds_weights) in zip(groups, members, strict=True)
    ]


def _member_groups(class_names: list[str]) -> list[str]:
    """The groups of a Sequential's members below its ``layers/``: each member's snake-case class
    name, numbered ``_1``, ``_2`` ... from the second member of a class on."""
    used: dict[str, int] = {}
    groups = []
    for class_name in class_names:
        count = used.get(class_name, -1) + 1
        used[class_name] = count
        groups.append(class_name if count == 0 else f"{class_name}_{count}")
    return groups


def _conv_block(path: str, name: str, module: str, conv: str) -> list[KerasLayer]:
    """``ConvBlock``: a Sequential ``conv`` of Conv(0) BN(1) ReLU(2) Conv(3) BN(4) ReLU(5)."""
    members = (
        (conv, "0", True),
        ("batch_norm", "1", True),
        ("re_lu", "2", False),
        (conv, "3", True),
        ("batch_norm", "4", True),
        ("re_lu", "5", False),
    )
    return [KerasLayer(path, name), *_sequential(f"{path}/conv", "conv", f"{module}.conv", members)]


def _encoder_block(name: str, conv: str) -> list[KerasLayer]:
    """``EncoderBlock``: ``conv`` (a ConvBlock) and ``pool``."""
    return [
        KerasLayer(name, name),
        *_conv_block(f"{name}/conv", "conv", f"{name}.conv", conv),
        KerasLayer(f"{name}/pool", "pool"),
    ]


def _attention_gate(path: str, module: str, conv: str) -> list[KerasLayer]:
    """``AttentionGate``: Sequentials ``Wg`` and ``Ws`` (conv, BN), ``relu``, and the Sequential
    named ``output`` (conv, sigmoid) held as the attribute ``out``."""
    conv_bn = ((conv, "0", True), ("batch_norm", "1", True))
    return [
        KerasLayer(path, "ag"),
        *_sequential(f"{path}/Wg", "Wg", f"{module}.Wg", conv_bn),
        *_sequential(f"{path}/Ws", "Ws", f"{module}.Ws", conv_bn),
        KerasLayer(f"{path}/relu", "relu"),
        *_sequential(f"{path}/out", "output", f"{module}.output", ((conv, "0", True), ("activation", "1", False))),
    ]


def _decoder_block(name: str, conv: str) -> list[KerasLayer]:
    """``DecoderBlock``: ``up``, ``ag`` (an AttentionGate) and ``c1`` (a ConvBlock)."""
    return [
        KerasLayer(name, name),
        KerasLayer(f"{name}/up", "up"),
        *_attention_gate(f"{name}/ag", f"{name}.ag", conv),
        *_conv_block(f"{name}/c1", "c1", f"{name}.c1", conv),
    ]


# ----------------------------------------------------------------------------------------------
# MONAI's AttentionUnet (impl_keras/monai_model.py), class by class

# Where Keras saves the Sequential ``model`` (see the module docstring).
MONAI_ROOT = "layers/sequential"
# The ADN (norm, activation) of the two kinds of MONAI Convolution that have one.
BN_RELU = ("batch", "relu")
INSTANCE_PRELU = ("instance", "prelu")

# A member of a Sequential: (its Keras class in snake case, its layers given the group it is saved in).
Member = tuple[str, Callable[[str], list[KerasLayer]]]


def _monai_layers(config: MonaiConfig) -> list[KerasLayer]:
    """``MonaiAttentionUNet``: the Sequential ``model`` of the head (``0``), the top level (``1``,
    the others nested in it) and the output convolution (``2``)."""
    model: list[Member] = [
        ("conv_block", lambda group: _monai_conv_block(group, "0", "model.0")),
        ("attention_layer", lambda group: _attention_layer(group, "1", "model.1", config, 0)),
        ("convolution", lambda group: _convolution(group, "2", "model.2")),
    ]
    return [KerasLayer("", MODEL_NAMES["monai"]), *_sequential_of(MONAI_ROOT, "model", model)]


def _sequential_of(path: str, name: str, members: list[Member]) -> list[KerasLayer]:
    """A ``keras.Sequential`` of layers that may hold layers themselves."""
    groups = _member_groups([class_name for class_name, _ in members])
    found = [KerasLayer(path, name)]
    for group, (_, layers_at) in zip(groups, members, strict=True):
        found += layers_at(f"{path}/layers/{group}")
    return found


def _convolution(path: str, name: str, module: str, adn: tuple[str, str] | None = None) -> list[KerasLayer]:
    """``Convolution``: ``conv``, and ``adn`` (``N``, ``D``, ``A``) unless conv-only. BatchNorm and
    PReLU hold tensors; InstanceNorm, Dropout and ReLU none."""
    found = [KerasLayer(path, name), KerasLayer(f"{path}/conv", "conv", f"{module}.conv")]
    if adn is not None:
        norm, activation = adn
        found += [
            KerasLayer(f"{path}/adn", "adn"),
            KerasLayer(f"{path}/adn/A", "A", f"{module}.adn.A" if activation == "prelu" else None),
            KerasLayer(f"{path}/adn/D", "D"),
            KerasLayer(f"{path}/adn/N", "N", f"{module}.adn.N" if norm == "batch" else None),
        ]
    return found


def _monai_conv_block(path: str, name: str, module: str) -> list[KerasLayer]:
    """``ConvBlock``: a Sequential ``conv`` of two conv -> BN -> dropout -> ReLU."""
    members: list[Member] = [
        ("convolution", lambda group: _convolution(group, "0", f"{module}.conv.0", BN_RELU)),
        ("convolution", lambda group: _convolution(group, "1", f"{module}.conv.1", BN_RELU)),
    ]
    return [KerasLayer(path, name), *_sequential_of(f"{path}/conv", "conv", members)]


def _attention_block(path: str, module: str) -> list[KerasLayer]:
    """``AttentionBlock``: Sequentials ``W_g`` and ``W_x`` (1x1 conv, BN) and ``psi`` (1x1 conv, BN,
    sigmoid), and ``relu``."""

    def conv_bn(branch: str, *rest: Member) -> list[KerasLayer]:
        members: list[Member] = [
            ("convolution", lambda group: _convolution(group, "0", f"{module}.{branch}.0")),
            ("batch_norm", lambda group: [KerasLayer(group, "1", f"{module}.{branch}.1")]),
            *rest,
        ]
        return _sequential_of(f"{path}/{branch}", branch, members)

    sigmoid: Member = ("activation", lambda group: [KerasLayer(group, "2")])
    return [
        KerasLayer(path, "attention"),
        *conv_bn("W_g"),
        *conv_bn("W_x"),
        *conv_bn("psi", sigmoid),
        KerasLayer(f"{path}/relu", "relu"),
    ]


def _attention_layer(path: str, name: str, module: str, config: MonaiConfig, level: int) -> list[KerasLayer]:
    """``AttentionLayer`` of ``level``: ``attention``, ``upconv`` (its Convolution ``up``), ``merge``
    and ``submodule``: the down block alone at the bottom, else a Sequential of the down block
    (``0``) and the level below (``1``)."""
    found = [
        KerasLayer(path, name),
        *_attention_block(f"{path}/attention", f"{module}.attention"),
        KerasLayer(f"{path}/upconv", "upconv"),
        *_convolution(f"{path}/upconv/up", "up", f"{module}.upconv.up", BN_RELU),
        *_convolution(f"{path}/merge", "merge", f"{module}.merge", INSTANCE_PRELU),
    ]
    submodule = f"{module}.submodule"
    if level == config.depth - 1:
        return found + _monai_conv_block(f"{path}/submodule", "submodule", submodule)
    members: list[Member] = [
        ("conv_block", lambda group: _monai_conv_block(group, "0", f"{submodule}.0")),
        ("attention_layer", lambda group: _attention_layer(group, "1", f"{submodule}.1", config, level + 1)),
    ]
    return found + _sequential_of(f"{path}/submodule", "submodule", members)


def dataset_paths(config: ModelConfig | MonaiConfig) -> dict[str, str]:
    """Canonical tensor name -> its HDF5 dataset (``e1/conv/conv/layers/conv2d/vars/0``), in
    ``state_dict`` order; the layer tree and the spec must name the same modules."""
    groups = {layer.module: layer.path for layer in keras_layers(config) if layer.module}
    specs = param_specs(config)
    if set(groups) != {spec.module for spec in specs}:
        raise AssertionError("the Keras layer tree and the parameter table name different modules")
    return {spec.name: f"{groups[spec.module]}/vars/{LEAVES[spec.layer].index(spec.leaf)}" for spec in specs}


def stored_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The shape Keras stores a canonical tensor in (conv kernels HWIO)."""
    return rule(spec).to_channels_last(np.broadcast_to(np.empty((), np.uint8), spec.shape)).shape


def canonical_shape(spec: ParamSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The canonical shape of a stored shape (a kernel of neither a 2D nor a 3D rank is left as it is)."""
    stored = np.broadcast_to(np.empty((), np.uint8), shape)
    if not has_kernel_rank(stored):
        return tuple(shape)
    return rule(spec).from_channels_last(stored).shape


def policy_dtype(checkpoint: Checkpoint) -> str:
    """The one float dtype of the tensors, or for mixed ones the narrowest holding each exactly:
    the widest present, float32 when the widest are float16 and bfloat16 together."""
    names = {v.dtype.name for v in checkpoint.tensors.values() if v.dtype.kind == "f" or v.dtype.name == "bfloat16"}
    if len(names) == 1:
        return names.pop()
    widest = max(np.dtype(name).itemsize if name != "bfloat16" else 2 for name in names)
    return "float32" if widest == 2 else f"float{8 * widest}"
