"""``neuronwatch plot DIR``: PNG plots and an index.html for a saved report (training or audit)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import NeuronwatchError
from ..report import Report
from .check import BadInput
from .options import console, report_directory

__all__ = ["plot"]


@click.command()
@report_directory
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the PNGs and index.html. [default: the report's own directory]",
)
def plot(directory: Path, out: Path | None) -> None:
    """Write the plots and an HTML page of the report in DIRECTORY.

    \b
    firing_frequency.png  neurons sorted by firing frequency, pre beside post
    histograms.png        each layer's value histogram
    state_ratios.png      dead/leaking/dormant/saturated share across depth
    layers.png            watched layers in graph order, coloured by dead share
    index.html            all of them with the per-layer table
    Needs: pip install 'neuronwatch[plots]'.
    """
    # Exit 2 on bad input (an unreadable report, an unwritable --out), as check and audit do.
    try:
        from ..plots import write_plots

        report = Report.load(directory)
        written = write_plots(report, directory if out is None else out)
    except NeuronwatchError as exc:
        raise BadInput(str(exc)) from exc
    screen = console()
    for path in written:
        screen.print(f"wrote {path}", soft_wrap=True)
    page = written[-1].resolve()
    screen.print(f"open {page.as_uri()}", soft_wrap=True)
