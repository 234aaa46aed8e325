"""Subcommands of the ``deltakern`` command line (see deltakern/cli.py)."""
