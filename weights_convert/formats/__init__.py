"""Checkpoint formats: one reader and one writer each, all going through the canonical form.

A format module defines ``read(path) -> (tensors, config_or_None)`` returning canonical names and
PyTorch layouts, and ``write(checkpoint, path)`` writing to a path that does not exist yet (the
caller makes the write atomic). Modules are imported only when their format is used, so formats
that need no framework never import one.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.extras import require


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    suffixes: tuple[str, ...]
    module: str
    requires: tuple[str, ...]  # the modules reading or writing it imports, beyond numpy
    is_directory: bool = False
    # Whether the file carries the model's config; a reader of one that does not infers it from the
    # tensor shapes (which cannot show MONAI's strides and dropout: ``Checkpoint.assumed``).
    holds_config: bool = False

    def load_module(self):
        """The format's reader and writer; ``MissingPackage`` names the extra when a module is absent."""
        require(self.requires, f"{self.suffixes[0]}")
        return importlib.import_module(f"weights_convert.formats.{self.module}")


FORMATS = (
    Format("safetensors", (".safetensors",), "safetensors_format", ("safetensors",), holds_config=True),
    Format("pytorch", (".pt", ".pth"), "torch_format", ("torch",)),
    Format("keras-weights", (".weights.h5",), "keras_h5_format", ("h5py",)),
    Format("keras", (".keras",), "keras_archive_format", ("h5py",), holds_config=True),
    Format("flax-msgpack", (".msgpack",), "flax_msgpack_format", ("msgpack",)),
    Format("orbax", (".orbax",), "orbax_format", ("orbax.checkpoint", "jax"), is_directory=True),
)


def format_for(path: str | Path) -> Format:
    """The format named by ``path``'s extension (the longest matching suffix wins)."""
    name = Path(path).name.lower()
    matches = [(len(s), f) for f in FORMATS for s in f.suffixes if name.endswith(s)]
    if not matches:
        known = ", ".join(s for f in FORMATS for s in f.suffixes)
        raise CheckpointError(f"{path}: unknown checkpoint extension; expected one of {known}")
    return max(matches, key=lambda m: m[0])[1]
