"""The ``attention-unet`` command: ``inspect``, ``convert``, ``export``, ``init``, ``parity``, ``bench`` and ``train``.

Exit status: 0 on success, 1 when a checkpoint is refused, a package a file needs is missing or
a check fails, 2 on bad usage (a missing package for a ``--frameworks`` / ``--keras-backends`` /
``--report`` choice included). Errors are one line on stderr, and nothing is written.

The package: ``arguments`` (what the subcommands share: argparse types, the usage error, the
framework selection), ``checkpoints`` (``inspect``, ``convert``, ``export``, ``init``),
``parity_command``, ``bench_command``; ``train`` is ``weights_convert.harness.train``. Here:
``build_parser`` and ``main``, which turns a refused file into exit 1 and one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.extras import PACKAGES, MissingPackage, install_hint
from weights_convert.harness.cli import bench_command, checkpoints, parity_command

# Start-up logging of TensorFlow, gRPC and XLA (oneDNN notices, CUDA and TPU probing) that would
# land on the command's stderr; set before any framework is imported, unless the user set them.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
QUIET_LOGGERS = ("jax._src.xla_bridge", "absl")


def _quiet_frameworks() -> None:
    import logging

    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="attention-unet", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    checkpoints.add_inspect_parser(sub)
    checkpoints.add_convert_parser(sub)
    checkpoints.add_export_parser(sub)
    parity_command.add_parser(sub)

    from weights_convert.harness.train import add_parser as add_train_parser

    add_train_parser(sub)
    checkpoints.add_init_parser(sub)
    bench_command.add_parser(sub)
    return parser


def _for_the_command(message: str) -> str:
    """A library message in the command's terms: ``force=True`` is ``--force`` here."""
    return message.replace("pass force=True", "pass --force")


def main(argv: list[str] | None = None) -> int:
    _quiet_frameworks()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, MissingPackage) as error:
        print(f"attention-unet {args.command}: error: {_for_the_command(str(error))}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:  # an optional package imported without a check first
        module = next((m for m in PACKAGES if error.name and error.name.split(".")[0] == m.split(".")[0]), None)
        needs = install_hint(module) if module else f"{error.name}: pip install {error.name}"
        print(f"attention-unet {args.command}: error: this needs {needs}", file=sys.stderr)
        return 1
    except Exception as error:  # a last line of defence: hostile input never ends in a traceback
        message = _for_the_command(textwrap.shorten(str(error) or "-", 300, placeholder=" [...]"))
        print(f"attention-unet {args.command}: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
