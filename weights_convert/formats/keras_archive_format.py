"""Keras 3 ``.keras`` archive of ``impl_keras.AttentionUNet`` or ``impl_keras.MonaiAttentionUNet``,
read and written with zipfile, json and h5py alone: ``config.json`` holds the model's class and
hyperparameters (so the config travels with the weights), ``metadata.json`` the Keras version,
``model.weights.h5`` the variables in the layout of ``keras_h5_format``. Written as ``model.save``
writes it (stored, uncompressed members), so the file loads with ``keras.saving.load_model(path)``
(safe mode included) once ``impl_keras`` is imported.

A training checkpoint is the archive of a compiled model, as ``model.compile(optimizer=
impl_keras.training.make_optimizer(...), loss="mean_squared_error")``, training steps and
``model.save`` leave it: ``compile_config`` names the optimizer (``attention_unet>TorchSGD``,
``TorchAdam`` or ``TorchAdamW``) and the weights member holds its variables under
``optimizer/vars``; ``keras_optimizer`` maps both to and from the canonical optimizer state. A model
that is not compiled, or compiled with any other optimizer, reads as weights only.

Reading builds nothing and runs nothing: ``config.json`` is parsed as JSON and must name
``impl_keras.AttentionUNet`` or ``impl_keras.MonaiAttentionUNet`` (the class gives the config's
architecture; its own ``architecture`` field, when present, must agree); any other class (a
``Lambda`` layer, an unregistered class, another model) is refused by name. The weights member is
read into memory (never extracted to disk), with its CRC-32 checked, after its declared size is
checked against the claimed config; every dataset's declared shape is then checked against that
config's parameter table before any data is read, so a config that contradicts the weights costs
nothing. Member names that would escape a directory are refused.
"""

from __future__ import annotations

import datetime
import io
import json
import zipfile

import numpy as np

from weights_convert.core.architectures import CONFIG_FIELDS, Config, config_from_dict
from weights_convert.core.checkpoint import Checkpoint, CheckpointError
from weights_convert.core.errors import shown
from weights_convert.core.keras_layout import MODEL_NAMES, PACKAGE, policy_dtype
from weights_convert.core.optimizer_state import OptimizerState
from weights_convert.core.spec import param_specs
from weights_convert.formats.keras_optimizer import (
    compile_config,
    compiled_optimizer,
    optimizer_variables,
    read_optimizer,
    write_variables,
)
from weights_convert.formats.keras_weights import MAX_EXPANSION, read_weights, write_weights
from weights_convert.formats.vetting import one_line

# The weights member keeps each tensor's dtype (the config's dtype policy holds them all exactly).
KEEPS_MIXED_DTYPES = True
# A compiled model's archive holds its optimizer's variables (see the module docstring).
HOLDS_OPTIMIZER = True
CONFIG_MEMBER = "config.json"
METADATA_MEMBER = "metadata.json"
WEIGHTS_MEMBER = "model.weights.h5"
# The model class of each architecture, (module, class name), as impl_keras registers it
# (``keras.saving.register_keras_serializable(package=PACKAGE)``), and the architecture by registered name.
MODEL_CLASSES = {
    "article": ("impl_keras.model", "AttentionUNet"),
    "monai": ("impl_keras.monai_model", "MonaiAttentionUNet"),
}
ARCHITECTURES = {f"{PACKAGE}>{class_name}": architecture for architecture, (_, class_name) in MODEL_CLASSES.items()}
# The Keras release whose archive layout this is, written when Keras itself is not installed.
KERAS_VERSION = "3.0.0"
# A JSON member larger than this is not a config of this model (one is about 500 bytes).
MAX_JSON_BYTES = 1 << 20
# Room in the weights member beyond four float64 copies of the parameters (the weights and an
# optimizer's slots): HDF5 headers and groups, about 1 KiB per dataset.
WEIGHTS_OVERHEAD_BYTES = 1 << 20
WEIGHTS_OVERHEAD_PER_TENSOR = 4096


def read(path) -> tuple[dict[str, np.ndarray], Config, OptimizerState | None]:
    import h5py

    if not zipfile.is_zipfile(str(path)):
        raise CheckpointError(f"{path}: not a Keras .keras archive (not a zip file)")
    try:
        with zipfile.ZipFile(str(path)) as archive:
            members = _members(archive, path)
            document = _json_member(archive, members, CONFIG_MEMBER, path)
            config = _model_config(document, path)
            compiled = compiled_optimizer(document, path)
            weights = _weights_member(archive, members, config, path)
        with h5py.File(io.BytesIO(weights), "r") as f:
            source = f"{path}: {WEIGHTS_MEMBER}"
            tensors = read_weights(f, source, config)
            optimizer = None if compiled is None else read_optimizer(f, source, config, *compiled)
    except CheckpointError:
        raise
    except Exception as error:  # zipfile and h5py raise BadZipFile, OSError, KeyError, ... on damage
        raise CheckpointError(f"{path}: not a readable Keras .keras archive ({one_line(error)[:200]})") from None
    return tensors, config, optimizer


def _members(archive: zipfile.ZipFile, path) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name; a name that would escape a directory, or one that occurs
    twice, is refused."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise CheckpointError(f"{path}: refused: the member name {name!r} points outside the archive")
        if name in members:
            raise CheckpointError(f"{path}: refused: the member {name!r} occurs twice")
        members[name] = info
    return members


def _json_member(archive: zipfile.ZipFile, members: dict, name: str, path):
    info = members.get(name)
    if info is None:
        raise CheckpointError(f"{path}: not a Keras .keras archive (no {name})")
    if info.file_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {name} declares {info.file_size} bytes; a model config is far smaller")
    try:
        return json.loads(archive.read(info))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: {name} is not JSON ({one_line(error)[:200]})") from None


def _model_config(document, path) -> Config:
    """The config in ``config.json``, which must describe an ``impl_keras.AttentionUNet`` or an
    ``impl_keras.MonaiAttentionUNet``: of the class's architecture."""
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: {CONFIG_MEMBER} holds a {type(document).__name__}, not a model config")
    registered = document.get("registered_name")
    architecture = ARCHITECTURES.get(registered) if isinstance(registered, str) else None
    if architecture is None or document.get("class_name") != MODEL_CLASSES[architecture][1]:
        top, *inner = _class_names(document) or ["no class"]
        naming = f" (naming {', '.join(inner[:10])}{f' and {len(inner) - 10} more' if len(inner) > 10 else ''})"
        raise CheckpointError(
            f"{path}: holds a {top}{naming if inner else ''}, not an impl_keras.AttentionUNet or MonaiAttentionUNet"
        )
    config = document.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {CONFIG_MEMBER} has no config object")
    fields = {k: config[k] for k in CONFIG_FIELDS if k in config}
    claimed = fields.setdefault("architecture", architecture)
    if claimed != architecture:
        raise CheckpointError(
            f"{path}: {CONFIG_MEMBER} names the class {registered} but the architecture {shown(claimed)}"
        )
    try:
        return config_from_dict(fields)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: bad config in {CONFIG_MEMBER}: {one_line(error)[:200]}") from None


def _class_names(node, found=None) -> list[str]:
    """Every class a Keras config names (its registered name where it has one), in order, once."""
    found = [] if found is None else found
    if isinstance(node, dict):
        name = node.get("registered_name") or node.get("class_name")
        if isinstance(name, str) and "class_name" in node and name not in found:
            found.append(name)
        for value in node.values():
            _class_names(value, found)
    elif isinstance(node, list):
        for value in node:
            _class_names(value, found)
    return found


def _weights_member(archive: zipfile.ZipFile, members: dict, config: Config, path) -> bytes:
    """The weights member's bytes (CRC-32 checked), refused first if it declares more than the
    claimed config can need or more than its compressed bytes can hold."""
    info = members.get(WEIGHTS_MEMBER)
    if info is None:
        raise CheckpointError(f"{path}: not a Keras .keras archive of this model (no {WEIGHTS_MEMBER})")
    specs = param_specs(config)
    elements = sum(int(np.prod(spec.shape, dtype=object)) for spec in specs)
    budget = 4 * 8 * elements + WEIGHTS_OVERHEAD_BYTES + WEIGHTS_OVERHEAD_PER_TENSOR * len(specs)
    compressed_limit = (
        info.compress_size if info.compress_type == zipfile.ZIP_STORED else MAX_EXPANSION * info.compress_size
    )
    if info.file_size > budget or info.file_size > compressed_limit:
        raise CheckpointError(
            f"{path}: {WEIGHTS_MEMBER} declares {info.file_size} bytes, more than the config "
            f"{config.to_dict()} needs ({budget}) or its {info.compress_size} stored bytes can hold"
        )
    return archive.read(info)


def write(checkpoint: Checkpoint, path) -> None:
    import h5py

    variables = None if checkpoint.optimizer is None else optimizer_variables(checkpoint)
    weights = io.BytesIO()
    with h5py.File(weights, "w") as f:
        write_weights(f, checkpoint)
        if variables is not None:
            write_variables(f, checkpoint, variables)
    with zipfile.ZipFile(str(path), "x") as archive:  # "x": never over an existing file
        archive.writestr(METADATA_MEMBER, json.dumps(metadata()))
        archive.writestr(CONFIG_MEMBER, json.dumps(model_config(checkpoint)))
        archive.writestr(WEIGHTS_MEMBER, weights.getvalue())


def metadata() -> dict:
    """``metadata.json`` as ``model.save`` writes it: the Keras version and the time of saving."""
    return {"keras_version": _keras_version(), "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}


def _keras_version() -> str:
    from importlib import metadata as package_metadata

    try:
        return package_metadata.version("keras")
    except package_metadata.PackageNotFoundError:
        return KERAS_VERSION


def model_config(checkpoint: Checkpoint) -> dict:
    """``config.json`` as ``model.save`` writes it for the model class of the checkpoint's
    architecture (``MODEL_CLASSES``). The dtype policy is the tensors' float dtype; with mixed
    dtypes, the narrowest that holds every one exactly (Keras casts each tensor to it on loading;
    the weights keep their own dtypes)."""
    config = checkpoint.config
    module, class_name = MODEL_CLASSES[config.architecture]
    return {
        "module": module,
        "class_name": class_name,
        "config": {
            "name": MODEL_NAMES[config.architecture],
            "trainable": True,
            "dtype": {
                "module": "keras",
                "class_name": "DTypePolicy",
                "config": {"name": policy_dtype(checkpoint)},
                "registered_name": None,
            },
            **config.to_dict(),
        },
        "registered_name": f"{PACKAGE}>{class_name}",
        "build_config": {"input_shape": [None] * (config.spatial_dims + 1) + [config.in_channels]},
        "compile_config": {} if checkpoint.optimizer is None else compile_config(checkpoint),
    }
