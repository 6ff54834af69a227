"""The ``neuronwatch`` command line: one click group, one module per command (group).

Commands are thin wrappers over library calls. Framework-heavy commands import their library
inside the command, so ``neuronwatch show`` (and ``import neuronwatch.cli``) never loads torch,
and a missing extra disables one command with a one-line install hint instead of breaking the
whole CLI. Errors of neuronwatch print as one line and exit non-zero (see :mod:`.options`).
"""

from __future__ import annotations

import click

from .._version import __version__
from .audit import audit
from .check import check
from .demo import demo
from .grafana import grafana
from .plot import plot
from .rescue import rescue
from .show import show

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="neuronwatch")
def main() -> None:
    """Find dead, dormant and saturated neurons."""


for command in (audit, check, demo, grafana, plot, rescue, show):
    main.add_command(command)
