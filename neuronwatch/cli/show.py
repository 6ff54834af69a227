"""``neuronwatch show DIR``: a saved report in the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import render
from ..report import Report
from .options import console, domain_errors, json_option, report_directory


@click.command()
@report_directory
@json_option
def show(directory: Path, as_json: bool) -> None:
    """Show a saved report (a directory with report.json and report.npz)."""
    with domain_errors():
        report = Report.load(directory)
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2, allow_nan=False))
        return
    out = console()
    view = render.report_view(report)
    if not out.is_terminal:
        # Nothing downstream of a pipe or file re-wraps lines, so print at the table's natural
        # width rather than rich's 80-column default, which would fold every cell.
        out.width = max(out.width, render.natural_width(out, view))
    out.print(view)
