"""Three report views drawn with matplotlib (the fourth is in :mod:`.plot_layer_map`); only
:func:`neuronwatch.plots.write_plots` imports these modules.

Everything is read from a :class:`~neuronwatch.Report`: no model, no framework. Figures are built
as bare :class:`matplotlib.figure.Figure` objects, never through ``pyplot``, so drawing leaves the
user's backend and open windows alone and needs no display.
"""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import NDArray

from .config import KINDS
from .report import Report
from .states import State
from .stats import LayerStats

__all__ = [
    "STATE_COLORS",
    "firing_frequency",
    "histograms",
    "label",
    "percent",
    "png_bytes",
    "sites",
    "state_ratios",
]

DPI = 100
# One colour per state, in every view (and close to the terminal's colours in render.py).
STATE_COLORS: dict[State, str] = {
    State.ACTIVE: "#2ca02c",
    State.ASLEEP: "#e6c229",
    State.LEAKING: "#17becf",
    State.DEAD: "#d62728",
    State.UNKNOWN: "#b0b0b0",
    State.DORMANT: "#9467bd",
    State.SATURATED: "#ff7f0e",
}
RATIO_STATES: tuple[State, ...] = (State.DEAD, State.LEAKING, State.DORMANT, State.SATURATED)
# Line width, style and marker per state in the depth plot.
_LINES: dict[State, tuple[float, str, str]] = {
    State.DEAD: (1.6, "-", "o"),
    State.LEAKING: (1.6, "-", "s"),
    State.DORMANT: (4.0, ":", "D"),
    State.SATURATED: (3.0, "-.", "^"),
    State.UNKNOWN: (1.2, "--", "x"),
}
FREQUENCY_CMAP = "viridis"  # dark blue: never fires, yellow: fires on every row (as in the seed)
# Beyond this many layers (call sites) the per-layer views draw one matrix, a row per layer,
# instead of a panel per layer: a 300-layer model gave 28000-pixel-tall PNGs after a minute.
MAX_PANELS = 40
MAX_INCHES = 30.0  # the tallest or widest a figure gets, however many layers
MAX_LABELS = 60  # tick labels per axis; every k-th layer is named beyond that
_COMPACT_COLUMNS = 128  # neurons of a layer resampled to this many columns in the matrix


def label(value: str) -> str:
    """``value`` safe for a matplotlib label: a ``$`` in a layer name must not start mathtext."""
    return value.replace("$", r"\$")


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp or version in the PNG, so equal reports give equal files.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def site_of(stats: LayerStats) -> str:
    """The call site a layer belongs to: ``act:pre`` (kind pre) and ``act`` share ``act``."""
    if stats.kind == "pre" and stats.name.endswith(":pre"):
        return stats.name[: -len(":pre")]
    return stats.name


def sites(report: Report) -> tuple[list[str], list[dict[str, LayerStats]]]:
    """The kinds present (``pre`` before ``post``: data-flow order) and, per call site in report
    (graph) order, its layers by kind."""
    by_site: dict[str, dict[str, LayerStats]] = {}
    for stats in report.layers.values():
        by_site.setdefault(site_of(stats), {})[stats.kind] = stats
    present = {stats.kind for stats in report.layers.values()}
    kinds = [kind for kind in ("pre", "post", *KINDS) if kind in present]
    return list(dict.fromkeys(kinds)), list(by_site.values())


def compact_height(rows: int) -> float:
    """Figure height (inches) of a one-matrix view of ``rows`` layers: bounded."""
    return min(MAX_INCHES, 1.6 + 0.12 * rows)


def row_labels(axes: Axes, names: list[str]) -> None:
    """Name the rows of a matrix view, every k-th one when there are too many to read."""
    step = max(1, math.ceil(len(names) / MAX_LABELS))
    rows = list(range(0, len(names), step))
    axes.set_yticks(rows, [label(names[i]) for i in rows], fontsize=6)


def percent(stats: LayerStats, state: State) -> str:
    return f"{100.0 * stats.ratio(state):.1f}%"


def _unknown_note(stats: LayerStats) -> str:
    unknown = stats.count(State.UNKNOWN)
    if not unknown:
        return ""
    return f" · {unknown} unknown (< min_rows)"


# -- 1. firing-frequency heatmap ----------------------------------------------------------------


def firing_frequency(report: Report) -> Figure:
    """Per call site (rows) and kind (columns), the neurons sorted by firing frequency."""
    kinds, layer_sites = sites(report)
    if len(layer_sites) > MAX_PANELS:
        return _compact_frequency(report, kinds, layer_sites)
    figure = Figure(
        figsize=(1.0 + 5.0 * len(kinds), 0.6 + 0.95 * len(layer_sites)),
        layout="constrained",
    )
    grid = figure.subplots(len(layer_sites), len(kinds), squeeze=False)
    cmap = colormaps[FREQUENCY_CMAP].with_extremes(bad=STATE_COLORS[State.UNKNOWN])
    image = None
    for row, by_kind in enumerate(layer_sites):
        for column, kind in enumerate(kinds):
            axes: Axes = grid[row][column]
            axes.set_yticks([])
            stats = by_kind.get(kind)
            if stats is None:
                axes.set_xticks([])
                axes.text(
                    0.5,
                    0.5,
                    f"{kind}: not watched",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="0.5",
                    transform=axes.transAxes,
                )
                for spine in axes.spines.values():
                    spine.set_visible(False)
                continue
            # Neurons without a finite row have no frequency (NaN): drawn grey, sorted last.
            frequency = np.sort(stats.frequency)[None, :]
            image = axes.imshow(
                frequency,  # imshow masks the NaN: drawn in the colormap's 'bad' grey
                aspect="auto",
                cmap=cmap,
                vmin=0.0,
                vmax=1.0,
                extent=(0.0, float(stats.neurons), 0.0, 1.0),
            )
            never = int(np.count_nonzero(stats.partials.fired == 0))
            axes.set_title(
                label(
                    f"{stats.name} [{kind}] · {stats.config.activation or stats.config.family} · "
                    f"{stats.neurons} neurons · never fired {never}" + _unknown_note(stats)
                ),
                fontsize=8,
                loc="left",
            )
            axes.tick_params(labelsize=7)
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for column, kind in enumerate(kinds):
        # The label goes under the lowest pane of each column that is drawn.
        drawn = [row for row, by_kind in enumerate(layer_sites) if kind in by_kind]
        grid[drawn[-1]][column].set_xlabel("neurons, sorted by firing frequency", fontsize=8)
    if image is not None:
        # On top, so the bar keeps its size however many layers the figure stacks.
        bar = figure.colorbar(image, ax=grid, location="top", shrink=0.5, aspect=40)
        bar.set_label("firing frequency (share of rows above fire_threshold)", fontsize=8)
    figure.suptitle(label(f"{report.model}: firing frequency per neuron"), fontsize=10)
    return figure


def _resampled(frequency: NDArray[np.float64]) -> NDArray[np.float64]:
    """A layer's sorted frequencies (NaN last) at :data:`_COMPACT_COLUMNS` evenly spaced ranks."""
    ordered = np.sort(frequency)
    if ordered.size == 0:
        return np.full(_COMPACT_COLUMNS, np.nan)
    ranks = np.linspace(0, ordered.size - 1, _COMPACT_COLUMNS).round().astype(int)
    return np.asarray(ordered[ranks], dtype=np.float64)


def _compact_frequency(
    report: Report, kinds: list[str], layer_sites: list[dict[str, LayerStats]]
) -> Figure:
    """Many layers: one matrix per kind, a row per call site, its neurons sorted by frequency
    and resampled to a fixed width (the x axis is the neurons' rank, 0 to 1)."""
    figure = Figure(
        figsize=(1.6 + 4.0 * len(kinds), compact_height(len(layer_sites))), layout="constrained"
    )
    grid = figure.subplots(1, len(kinds), squeeze=False)
    cmap = colormaps[FREQUENCY_CMAP].with_extremes(bad=STATE_COLORS[State.UNKNOWN])
    names = [next(iter(by_kind.values())).name for by_kind in layer_sites]
    image = None
    for axes, kind in zip(grid[0], kinds, strict=True):
        matrix = np.stack(
            [
                _resampled(by_kind[kind].frequency)
                if kind in by_kind
                else np.full(_COMPACT_COLUMNS, np.nan)
                for by_kind in layer_sites
            ]
        )
        image = axes.imshow(
            matrix,
            aspect="auto",
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(0.0, 1.0, len(layer_sites) - 0.5, -0.5),
        )
        row_labels(axes, names)
        axes.set_title(f"kind {kind}", fontsize=9, loc="left")
        axes.set_xlabel("neurons, sorted by firing frequency (share of the layer)", fontsize=8)
        axes.tick_params(axis="x", labelsize=7)
    if image is not None:
        bar = figure.colorbar(image, ax=grid, location="top", shrink=0.5, aspect=40)
        bar.set_label("firing frequency (grey: not watched or no finite row)", fontsize=8)
    figure.suptitle(
        label(f"{report.model}: firing frequency per neuron, {len(layer_sites)} layers"),
        fontsize=10,
    )
    return figure


# -- 2. activation histograms -------------------------------------------------------------------


def _edge_label(value: float) -> str:
    return f"{value:g}"


def histograms(report: Report, columns: int = 3) -> Figure:
    """Each layer's value histogram over its fixed edges, one panel per layer. Bins are drawn
    at equal width (the default edges are log-like), labelled with their edges."""
    layers = list(report.layers.values())
    if len(layers) > MAX_PANELS:
        return _compact_histograms(report, layers)
    columns = max(1, min(columns, len(layers)))
    rows = math.ceil(len(layers) / columns)
    figure = Figure(figsize=(4.6 * columns, 0.6 + 2.6 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes, stats in itertools.zip_longest(grid.flat, layers):
        if stats is None:
            axes.set_axis_off()
            continue
        _histogram_panel(axes, stats)
    figure.suptitle(
        label(f"{report.model}: activation histograms (share of values per bin)"), fontsize=10
    )
    return figure


def _compact_histograms(report: Report, layers: list[LayerStats]) -> Figure:
    """Many layers: one matrix, a row per layer, its share of values per bin (the bins are
    labelled with their edges when every layer has the same edges)."""
    width = max(len(s.partials.histogram) for s in layers)
    matrix = np.full((len(layers), width), np.nan)
    for row, stats in enumerate(layers):
        counts = stats.partials.histogram.astype(np.float64)
        total = float(counts.sum())
        if total:
            matrix[row, : len(counts)] = counts / total
    figure = Figure(figsize=(9.0, compact_height(len(layers))), layout="constrained")
    axes = figure.subplots()
    cmap = colormaps["magma"].with_extremes(bad=STATE_COLORS[State.UNKNOWN])
    image = axes.imshow(matrix, aspect="auto", cmap=cmap, vmin=0.0, interpolation="nearest")
    row_labels(axes, [f"{s.name} [{s.kind}]" for s in layers])
    edges = layers[0].config.histogram_edges
    if all(tuple(s.config.histogram_edges) == tuple(edges) for s in layers):
        axes.set_xticks(
            np.arange(len(edges)) + 0.5, [_edge_label(e) for e in edges], rotation=90, fontsize=6
        )
    axes.set_xlabel("bin (upper edge); grey: no values sampled", fontsize=8)
    bar = figure.colorbar(image, ax=axes, location="top", shrink=0.5, aspect=40)
    bar.set_label("share of the layer's values in the bin", fontsize=8)
    figure.suptitle(
        label(f"{report.model}: activation histograms, {len(layers)} layers"), fontsize=10
    )
    return figure


def _histogram_panel(axes: Axes, stats: LayerStats) -> None:
    edges = stats.config.histogram_edges
    counts = stats.partials.histogram.astype(np.float64)
    total = float(counts.sum())
    axes.set_title(label(f"{stats.name} [{stats.kind}]"), fontsize=8, loc="left")
    if total == 0:
        axes.text(
            0.5,
            0.5,
            "no values sampled",
            ha="center",
            va="center",
            fontsize=8,
            color="0.5",
            transform=axes.transAxes,
        )
        axes.set_xticks([])
        axes.set_yticks([])
        return
    # Bin j holds (edges[j-1], edges[j]]: it lies at or below the fire threshold when its
    # upper edge does (the last bin is unbounded above).
    threshold = stats.config.fire_threshold
    below = [j < len(edges) and edges[j] <= threshold for j in range(len(counts))]
    colors = [STATE_COLORS[State.UNKNOWN] if b else "#1f77b4" for b in below]
    axes.bar(np.arange(len(counts)), counts / total, width=0.9, color=colors)
    axes.set_xticks(
        np.arange(len(edges)) + 0.5, [_edge_label(e) for e in edges], rotation=90, fontsize=6
    )
    axes.set_xlim(-0.6, len(counts) - 0.4)
    # Each panel scales to its own tallest bar: a spike at zero must not flatten the tails.
    axes.set_ylim(0.0, min(1.0, 1.2 * float(counts.max()) / total))
    axes.tick_params(axis="y", labelsize=7)
    axes.text(
        0.99,
        0.97,
        f"{int(total):,} values\ngrey: <= fire_threshold {threshold:g}",
        ha="right",
        va="top",
        fontsize=6,
        color="0.3",
        transform=axes.transAxes,
    )


# -- 3. state ratios across depth ---------------------------------------------------------------


def state_ratios(report: Report) -> Figure:
    """Dead, leaking, dormant and saturated share per layer as lines across depth, one panel
    per kind (``pre``, ``post``, ``attn``), plus unknown where a layer is not judged yet."""
    kinds, _ = sites(report)
    by_kind = {k: [s for s in report.layers.values() if s.kind == k] for k in kinds}
    longest = max(len(layers) for layers in by_kind.values())
    figure = Figure(
        figsize=(min(MAX_INCHES, max(6.0, 1.5 + 0.35 * longest)), 0.8 + 3.6 * len(kinds)),
        layout="constrained",
    )
    grid = figure.subplots(len(kinds), 1, squeeze=False)
    show_unknown = any(s.count(State.UNKNOWN) for s in report.layers.values())
    states = (*RATIO_STATES, State.UNKNOWN) if show_unknown else RATIO_STATES
    for axes, kind in zip(grid[:, 0], kinds, strict=True):
        layers = by_kind[kind]
        depth = np.arange(len(layers))
        for state in states:
            width, style, marker = _LINES[state]
            axes.plot(
                depth,
                [s.ratio(state) for s in layers],
                marker=marker,
                markersize=4,
                linestyle=style,
                linewidth=width,
                color=STATE_COLORS[state],
                label=state.value,
                # Equal shares overlap (a dead ReLU neuron is dormant too): the thinner lines
                # of the firing states are drawn on top of the wide overlay lines.
                zorder=6.0 - width,
            )
        step = max(1, math.ceil(len(layers) / MAX_LABELS))  # every k-th name when too many
        axes.set_xticks(
            depth[::step],
            [label(s.name) for s in layers[::step]],
            rotation=60,
            ha="right",
            fontsize=7,
        )
        axes.set_xlim(-0.5, max(len(layers) - 0.5, 0.5))
        axes.set_ylim(-0.03, 1.03)
        axes.set_ylabel("share of neurons", fontsize=8)
        axes.set_title(f"kind {kind}: layers in graph order", fontsize=9, loc="left")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(label(f"{report.model}: share of neurons per state across depth"), fontsize=10)
    return figure
