"""The ``smartprune`` command line."""

from smartprune.cli.main import main

__all__ = ["main"]
