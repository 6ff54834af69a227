"""What every command shares: domain errors as one line, option decorators, the console."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from ..errors import NeuronwatchError

__all__ = ["console", "domain_errors", "json_option", "quiet_option", "report_directory"]

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def domain_errors() -> Iterator[None]:
    """Turn neuronwatch's errors into one line on stderr and a non-zero exit, no traceback;
    their messages already name the file or argument and the fix."""
    try:
        yield
    except NeuronwatchError as exc:
        raise click.ClickException(str(exc)) from exc


def report_directory(fn: F) -> F:
    return click.argument(
        "directory",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
    )(fn)


def json_option(fn: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print the report summary as JSON (for jq)."
    )(fn)


def quiet_option(fn: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="No live progress display.")(fn)


def console() -> Console:
    # Created per command so it writes to whatever sys.stdout is now (CliRunner swaps it).
    return Console(highlight=False)
