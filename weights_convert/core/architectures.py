"""The networks a checkpoint may hold, by the ``architecture`` of its config: the article's
Attention U-Net (``core/spec.py``, the default) and MONAI's AttentionUnet (``core/monai_spec.py``).

Every reader goes through here to turn a config's JSON into a config, and to recognise the network
of a file that carries no config from its tensor names.
"""

from __future__ import annotations

import json

from weights_convert.core.monai_spec import ASSUMED, MARKER, MonaiConfig, infer_monai_config
from weights_convert.core.spec import ModelConfig, infer_article_config

ARCHITECTURES = {"article": ModelConfig, "monai": MonaiConfig}

# A config of either network.
Config = ModelConfig | MonaiConfig

# The fields any architecture's config may have, as JSON names them.
CONFIG_FIELDS = ("architecture", *dict.fromkeys(f for cls in ARCHITECTURES.values() for f in cls.__dataclass_fields__))

# What a user would call each network (``inspect`` names it so).
NAMES = {"article": "Attention U-Net of the article", "monai": "MONAI's AttentionUnet"}


def config_from_dict(data) -> Config:
    """The config a JSON object describes; ``architecture`` picks the network ("article" when absent)."""
    if not isinstance(data, dict):
        raise ValueError(f"config must be a JSON object, got {type(data).__name__}")
    architecture = data.get("architecture", "article")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    return ARCHITECTURES[architecture].from_dict(data)


def config_from_json(text: str) -> Config:
    """A config from JSON text (``--config``); a one-line ValueError for text that is not JSON,
    nests too deep for the parser, or is not a config."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError("the JSON nests too deep") from None
    except ValueError as error:
        raise ValueError(f"not JSON ({error})") from None
    return config_from_dict(data)


def infer_config(shapes: dict[str, tuple[int, ...]]) -> Config:
    """The config of a checkpoint that carries none, from its tensor names and shapes: MONAI's
    network when MONAI's head is there, the article's otherwise."""
    if MARKER in shapes:
        return infer_monai_config(shapes)
    return infer_article_config(shapes)


def assumed(config: Config) -> dict[str, str]:
    """The fields of a config inferred from shapes that no tensor held, with the value assumed."""
    return dict(ASSUMED) if isinstance(config, MonaiConfig) else {}


def assumed_line(fields: dict[str, str]) -> str:
    """One line saying what an inferred config assumed (``Checkpoint.assumed``), for commands to print."""
    values = ", ".join(f"{name} {value}" for name, value in fields.items())
    return f"{values} assumed: no tensor holds them; pass --config to give the network's own"


def warn_assumed(fields: dict[str, str], source) -> None:
    """A UserWarning naming ``source`` when a loaded checkpoint's config assumed some fields."""
    if fields:
        import warnings

        warnings.warn(f"{source}: {assumed_line(fields)} (config=)", UserWarning, stacklevel=3)
