"""The ``deltakern`` command line (the top layer: it may import every other layer).

``python -m deltakern.cli`` runs it too (as ``torchrun ... -m deltakern.cli`` does)."""

from deltakern.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
