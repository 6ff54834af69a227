"""PNG plots and an ``index.html`` for any report, from training or audit alike.

>>> write_plots(Report.load("runs/relu"), Path("runs/relu"))   # doctest: +SKIP
[PosixPath('runs/relu/firing_frequency.png'), ..., PosixPath('runs/relu/index.html')]

matplotlib (the ``plots`` extra) is imported only here, when plots are written: ``import
neuronwatch`` never loads it, and without it this raises :class:`MissingExtraError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import write_files_atomic
from .errors import ConfigError, MissingExtraError, ReportError
from .report import Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["HTML_NAME", "VIEWS", "View", "write_plots"]

HTML_NAME = "index.html"


@dataclass(frozen=True)
class View:
    """One figure of the page: its file, heading and what it shows (the image's alt text)."""

    key: str
    file: str
    title: str
    caption: str


VIEWS: tuple[View, ...] = (
    View(
        "firing_frequency",
        "firing_frequency.png",
        "Firing frequency per neuron",
        "For every watched layer, its neurons sorted by firing frequency (the share of rows on "
        "which the value is above the layer's fire_threshold): dark blue never fires, yellow "
        "fires on every row, grey has no finite row. Pre-activations (kind pre) sit beside "
        "the activation outputs (kind post) of the same call site.",
    ),
    View(
        "histograms",
        "histograms.png",
        "Activation histograms",
        "Each layer's values over the layer's fixed histogram edges, as a share of all values "
        "counted; grey bins lie at or below the fire threshold.",
    ),
    View(
        "state_ratios",
        "state_ratios.png",
        "Dead, leaking, dormant and saturated share across depth",
        "Share of each layer's neurons that are dead (never fired, no gradient), leaking (never "
        "fired, gradient still flows), dormant (ReDo score <= tau) or saturated (flat region on "
        "every row), layers in graph order, one panel per kind.",
    ),
    View(
        "layers",
        "layers.png",
        "Watched layers in graph order",
        "The watched layers in the order the model runs them, each box filled by its dead "
        "share, with a bar of its active, asleep, leaking, dead and unknown neurons; a dashed "
        "box has neurons not judged yet (fewer rows than min_rows).",
    ),
)


def _figures() -> dict[str, Callable[[Report], Figure]]:
    try:
        from . import plot_figures, plot_layer_map
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "matplotlib":
            raise MissingExtraError("matplotlib", "plots") from exc
        raise
    return {
        "firing_frequency": plot_figures.firing_frequency,
        "histograms": plot_figures.histograms,
        "state_ratios": plot_figures.state_ratios,
        "layers": plot_layer_map.layer_map,
    }


def render_views(report: Report) -> dict[View, bytes]:
    """Every view of ``report`` as PNG bytes (nothing is written)."""
    if not report.layers:
        raise ReportError(f"report of {report.model!r} has no layers: there is nothing to plot")
    figures = _figures()  # raises MissingExtraError first when matplotlib is missing
    from .plot_figures import png_bytes

    return {view: png_bytes(figures[view.key](report)) for view in VIEWS}


def write_plots(report: Report, directory: Path) -> list[Path]:
    """Write the four PNG views and ``index.html`` into ``directory`` (created if needed);
    returns the paths written, the page last.

    Everything is drawn in memory first and then written under temporary names and renamed,
    the page last: a failure leaves no half-written file and no page pointing at missing
    images.
    """
    from .html_page import render_page

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory; pass a directory for plots")
    images = render_views(report)
    page = render_page(report, [(view, _png_size(data)) for view, data in images.items()])
    files = {directory / view.file: data for view, data in images.items()}
    files[directory / HTML_NAME] = page.encode("utf-8")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_files_atomic(files)
    except OSError as exc:  # an uncreatable or read-only folder: one line, not a traceback
        raise ConfigError(
            f"cannot write the plots into {directory}: {exc.strerror or exc}; pass a directory "
            "that can be created and written"
        ) from exc
    return list(files)


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24), for the page's <img> sizes."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
