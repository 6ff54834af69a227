"""The ``neuronwatch`` command line: one click group, one module per command (group).

Commands are thin wrappers over library calls. Each command's module is imported only when that
command runs (or ``--help`` lists them), so ``neuronwatch rescue`` starts without loading the
audit, demo or plotting code, and a missing extra disables one command with a one-line install
hint instead of breaking the whole CLI. Framework-heavy commands import their library inside
the command. Errors of neuronwatch print as one line and exit non-zero (see :mod:`.options`).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from .._version import __version__

__all__ = ["main"]

# command name -> the module of this package that defines it, as an attribute of the same name
COMMANDS = ("audit", "check", "demo", "grafana", "plot", "rescue", "show")


class LazyGroup(click.Group):
    """A group whose commands are imported when they are looked up (click's documented pattern
    for lazily loaded subcommands)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS and cmd_name not in self.commands:
            module = importlib.import_module(f"{__name__}.{cmd_name}")
            command: Any = getattr(module, cmd_name)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module.__name__}.{cmd_name} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="neuronwatch")
def main() -> None:
    """Find dead, dormant and saturated neurons."""
