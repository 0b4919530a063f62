"""The `vlmkit` command: argument parsing over the library's functions."""

from vlmkit.cli.main import main

__all__ = ["main"]
