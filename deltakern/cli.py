"""The ``deltakern`` command line: one subcommand per module in ``deltakern.commands``.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func``; heavy imports happen inside the command, so ``deltakern --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module in deltakern.commands, in the order --help lists them
COMMANDS = {
    "env": "env",
    "demo": "demo",
    "eval": "evaluate",
    "encode": "encode",
    "score": "score",
    "train": "train",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltakern",
        description="Fused ΔEnergy OOD scoring, evaluation, prompt tuning and benchmarks for "
        "vision-language models. Run `deltakern COMMAND --help` for a command's options.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"deltakern {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f"deltakern.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"deltakern.commands.{module_name}":
                continue  # a command not shipped in this installation
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltakern`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        # User errors: one clear line, not a traceback.
        print(f"deltakern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
