"""The ``neuronwatch`` command line: thin commands over library calls.

Framework-heavy commands import their module inside the command, so ``neuronwatch show`` (and
``import neuronwatch.cli``) never loads torch, and a missing extra disables one command with a
one-line install hint instead of breaking the whole CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from . import render
from ._version import __version__
from .errors import NeuronwatchError
from .report import Report

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_DEMO_OUT = Path("neuronwatch-demo")


@contextmanager
def domain_errors() -> Iterator[None]:
    """Turn neuronwatch's errors into one line on stderr and a non-zero exit, no traceback;
    their messages already name the file or argument and the fix."""
    try:
        yield
    except NeuronwatchError as exc:
        raise click.ClickException(str(exc)) from exc


# -- shared options ------------------------------------------------------------------------------


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


def _console() -> Console:
    # Created per command so it writes to whatever sys.stdout is now (CliRunner swaps it).
    return Console(highlight=False)


# -- commands ------------------------------------------------------------------------------------


@click.group()
@click.version_option(__version__, prog_name="neuronwatch")
def main() -> None:
    """Find dead, dormant and saturated neurons."""


@main.command()
@report_directory
@json_option
def show(directory: Path, as_json: bool) -> None:
    """Show a saved report (a directory with report.json and report.npz)."""
    with domain_errors():
        report = Report.load(directory)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
        return
    console = _console()
    view = render.report_view(report)
    if not console.is_terminal:
        # Nothing downstream of a pipe or file re-wraps lines, so print at the table's natural
        # width rather than rich's 80-column default, which would fold every cell.
        console.width = max(console.width, render.natural_width(console, view))
    console.print(view)


@main.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DEMO_OUT,
    show_default=True,
    help="Directory for the two reports (relu/ and leaky_relu/).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs per run; one epoch is one window. [default: the tuned setting, printed]",
)
@click.option("--seed", type=int, default=None, help="Training seed. [default: the tuned one]")
@quiet_option
def demo(out: Path, epochs: int | None, seed: int | None, quiet: bool) -> None:
    """Watch ReLUs die on real handwritten digits.

    Trains a 5x128 MLP on scikit-learn's digits with ReLU, then with LeakyReLU from the same
    initial weights, saves both reports and compares how many neurons died. Needs:
    pip install 'neuronwatch[demo]'.
    """
    console = _console()
    started = time.perf_counter()
    with domain_errors():
        from . import demo as digits  # torch and scikit-learn: only this command needs them

        epochs = digits.DEFAULT_EPOCHS if epochs is None else epochs
        seed = digits.DEFAULT_SEED if seed is None else seed
        console.print(
            f"{digits.HIDDEN_LAYERS}x{digits.WIDTH} MLP on {digits.DATASET}, Adam lr "
            f"{digits.DEFAULT_LR}, {epochs} epochs, seed {seed}, activations "
            f"{', '.join(digits.ACTIVATIONS)}; dead = never fired during the last epoch",
            soft_wrap=True,
        )
        progress = render.TrainingProgress()
        with render.live(console, progress, enabled=not quiet):
            runs = digits.run_demo(out, epochs=epochs, seed=seed, on_epoch=progress.update)
    for run in runs:
        console.print(
            f"{run.activation}: trained in {run.seconds:.1f} s, wrote {run.saved}  "
            f"(see it with: neuronwatch show {run.saved})",
            soft_wrap=True,
        )
    console.print(render.comparison_table({run.activation: run.report for run in runs}))
    console.print(f"done in {time.perf_counter() - started:.1f} s")
