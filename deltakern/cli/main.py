"""The ``deltakern`` command line: one subcommand per module in ``deltakern.cli.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func``; heavy imports happen inside the command, so ``deltakern --help`` stays fast.
deltakern's own argument errors are printed as one line naming the flag; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys

from deltakern._version import __version__
from deltakern.core.errors import DeltakernError

# command name -> module in deltakern.cli.commands, in the order --help lists them
COMMANDS = {
    "env": "env",
    "demo": "demo",
    "eval": "evaluate",
    "encode": "encode",
    "score": "score",
    "calibrate": "calibrate",
    "filter": "filter",
    "inspect": "inspect",
    "models": "models",
    "train": "train",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every installed subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deltakern",
        description="Fused ΔEnergy OOD scoring, evaluation, prompt tuning and benchmarks for "
        "vision-language models. Run `deltakern COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"deltakern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f"deltakern.cli.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deltakern.cli.commands.{module_name}":
                continue  # a command not shipped in this installation
            raise
        module.register(sub)
    return parser


def _flag_for(param: str | None, message: str, subparser: argparse.ArgumentParser | None) -> str | None:
    """The command-line flag of the library parameter an error is about: its ``param``, or the
    identifier the message starts with when that is one of the command's options."""
    if subparser is None:
        return None
    flags = {a.dest: a.option_strings[-1] for a in subparser._actions if a.option_strings}
    if param is None:
        match = re.match(r"([A-Za-z_]\w*)\b", message)
        param = match.group(1) if match else None
    return flags.get(param) if param else None


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command)
    return None


def _unknown_arguments(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit with ``parser``'s usage, naming the unknown arguments and the nearest option of each."""
    options = [o for a in parser._actions for o in a.option_strings]
    hints = []
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75) if flag.startswith("-") else []
        if close:
            hints.append(f"{flag} (did you mean {close[0]}?)")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    parser.error(message + (f"; {', '.join(hints)}" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltakern`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would report these with the top-level usage; the subcommand's usage (and the
        # nearest of its options) is what helps.
        _unknown_arguments(_subparser(parser, args.command) or parser, unknown)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here when the output was short
        return code
    except DeltakernError as exc:
        # A caller's mistake: one clear line naming the flag, not a traceback.
        message = str(exc)
        flag = _flag_for(exc.param, message, _subparser(parser, args.command))
        where = f"argument {flag}: " if flag else ""
        print(f"deltakern {args.command}: error: {where}{message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`deltakern env | head`): stop quietly as Unix tools do. Point
        # stdout at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the signal
