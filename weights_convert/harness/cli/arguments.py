"""What the subcommands of ``attention-unet`` share: argparse types, the usage error (exit 2),
the framework selection of ``parity`` and ``bench``, and parsed options passed on by name."""

from __future__ import annotations

import argparse
import json
import sys

from weights_convert.core.errors import shown


def count(name: str, minimum: int):
    """An argparse type: an integer of at least ``minimum``, refused naming ``name``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            kind = "non-negative" if minimum == 0 else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {value}")
        return value

    return parse


def choices(allowed):
    """An argparse type: a comma-separated list of ``allowed`` names, at least one."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(allowed)}")
        return values

    return parse


def add_sides(parser, help_text: str, option: str = "--size") -> None:
    """An option of two sides (H W) or three (D H W), ``--size`` unless named (``--crop``,
    ``--tile``), checked against the model later (``core.spec.check_sides``), since the model's
    dimension is known only from its config."""
    parser.add_argument(option, type=count(option, 1), nargs="+", metavar="SIDE", help=help_text)


def config_json(config) -> str:
    """The config as the JSON that ``--config`` takes."""
    return json.dumps(config.to_dict())


def config_arg(text: str):
    """An argparse type: ``--config`` JSON as a ``ModelConfig``."""
    from weights_convert.core.architectures import config_from_json

    try:
        return config_from_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad --config {shown(text, 60)}: {error}") from None


def add_config(parser, help_text: str = "expected config as JSON; refused if the file contradicts it") -> None:
    """The ``--config`` option: a config as JSON (``core.architectures.config_from_json``)."""
    parser.add_argument("--config", type=config_arg, help=help_text)


def note_assumed(command: str, checkpoint) -> None:
    """One line on stderr when the checkpoint's config assumed fields no tensor held."""
    if checkpoint.assumed:
        from weights_convert.core.architectures import assumed_line

        print(f"{command}: {assumed_line(checkpoint.assumed)}", file=sys.stderr, flush=True)


def options(args, names) -> dict:
    """The parsed options ``names`` (``resume_at`` for ``--resume-at``) as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def usage_error(command: str, message: str) -> int:
    print(f"attention-unet {command}: error: {message}", file=sys.stderr)
    return 2


def selection(command: str, frameworks, keras_backends):
    """The installed frameworks and Keras backends to run (``parity.select``), each one left out
    said on stderr; a usage error (exit 2) when a named one is not installed."""
    from weights_convert.harness import parity

    selected = parity.select(frameworks, keras_backends)
    for line in selected.skipped:
        print(f"{command}: {line}", file=sys.stderr, flush=True)
    return selected


def framework_label(framework: str) -> str:
    """``torch``, ``flax`` or ``keras/<backend>`` (Keras' backend in this process): what runs, for
    the progress lines of ``train`` and ``predict``."""
    if framework != "keras":
        return framework
    from weights_convert.core.extras import current_keras_backend

    return f"keras/{current_keras_backend()}"


def framework_choice(chosen: str | None, purpose: str) -> tuple[str | None, str | None]:
    """(the framework to run, or a usage refusal naming ``--framework``) for ``train`` and
    ``predict``: the one chosen, if installed, else the first installed of ``FRAMEWORKS``;
    ``purpose`` completes "no framework to ..." when none is."""
    from weights_convert.core.extras import framework_missing
    from weights_convert.core.frameworks import FRAMEWORKS

    if chosen is not None:
        why = framework_missing(chosen)
        return chosen, why and f"--framework {chosen}: {why}"
    installed = [f for f in FRAMEWORKS if framework_missing(f) is None]
    if not installed:
        return None, f"no framework to {purpose}: {framework_missing(FRAMEWORKS[0])}, or [flax], or [keras]"
    return installed[0], None
