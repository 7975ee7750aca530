"""The `fedshield` command (cli.commands) and its `federation` subcommands (cli.federation)."""

from .commands import main

__all__ = ["main"]
