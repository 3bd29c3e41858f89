"""``attention-unet``: ``inspect``, ``convert``, ``export``, ``init``, ``parity``, ``bench``, ``train``, ``predict``.

Exit status: 0 on success, 1 when a checkpoint is refused, a package a file needs is missing or
a check fails, 2 on bad usage (a missing package for a ``--frameworks`` / ``--keras-backends`` /
``--report`` choice included). Errors are one line on stderr, and nothing is written.

The package: ``arguments`` (what the subcommands share: argparse types, the usage error, the
framework selection), ``checkpoints`` (``inspect``, ``convert``, ``export``, ``init``),
``parity_command``, ``bench_command``; ``train`` is ``weights_convert.harness.train``, ``predict``
``weights_convert.harness.predict``. Here:
``build_parser`` and ``main``, which turns a refused file into exit 1 and one line.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from weights_convert.core.checkpoint import CheckpointError
from weights_convert.core.extras import PACKAGES, MissingPackage, install_hint
from weights_convert.harness.cli import bench_command, checkpoints, parity_command
from weights_convert.harness.quiet import quiet_frameworks
from weights_convert.termination import exit_on_sigterm


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth saying (not None, not a
    flag's False), sizes written as they are typed (``64 64``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        said = "default" in text.lower()
        if said or not text or not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, tuple | list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    import weights_convert

    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="attention-unet", description=description, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {weights_convert.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    checkpoints.add_inspect_parser(sub)
    checkpoints.add_convert_parser(sub)
    checkpoints.add_export_parser(sub)
    parity_command.add_parser(sub)

    from weights_convert.harness.train import add_parser as add_train_parser

    add_train_parser(sub)
    from weights_convert.harness.predict import add_parser as add_predict_parser

    add_predict_parser(sub)
    checkpoints.add_init_parser(sub)
    bench_command.add_parser(sub)
    for command in sub.choices.values():
        # An abbreviation that works today breaks a script when a new option shares its prefix.
        command.allow_abbrev = False
        command.formatter_class = DefaultsHelpFormatter
    parser.subcommands = sub.choices  # name -> its parser, for the usage of a mistyped option
    return parser


def _unrecognized(command: argparse.ArgumentParser, extra: list[str]) -> str:
    """``unrecognized arguments: ...``, with the closest option for each mistyped one."""
    import difflib

    options = [o for a in command._actions for o in a.option_strings]
    hints = []
    for word in extra:
        close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1) if word.startswith("-") else []
        hints += [f"{word} (did you mean {close[0]}?)" if close else word]
    return "unrecognized arguments: " + " ".join(hints)


def _for_the_command(message: str) -> str:
    """A library message in the command's terms: ``force=True`` is ``--force`` here."""
    return message.replace("pass force=True", "pass --force")


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends the command as an error does: its temporary folders and workers go with it.
    exit_on_sigterm()
    quiet_frameworks()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's usage, not the top level's, with the option meant
        command = parser.subcommands[args.command]
        command.error(_unrecognized(command, extra))
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
