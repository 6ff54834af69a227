"""The fourth report view: the watched layers in graph order, coloured by dead share.

dead-relu-viz draws dead neurons on the architecture graph; this map is read from the report
alone: call sites top to bottom in the order the model ran them, kinds side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from .plot_figures import (
    MAX_PANELS,
    STATE_COLORS,
    compact_height,
    label,
    percent,
    row_labels,
    sites,
)
from .report import Report
from .states import State
from .stats import LayerStats

__all__ = ["layer_map"]

# Segments of the liveness bar in the layer map: the firing states, which partition neurons.
BAR_STATES: tuple[State, ...] = (
    State.ACTIVE,
    State.ASLEEP,
    State.LEAKING,
    State.DEAD,
    State.UNKNOWN,
)
DEAD_CMAP = "Reds"


def layer_map(report: Report) -> Figure:
    """The watched layers in graph (report) order, call sites top to bottom, kinds side by side,
    each box filled by its dead share, with a liveness bar of its firing states."""
    kinds, layer_sites = sites(report)
    if len(layer_sites) > MAX_PANELS:
        return _compact_map(report, kinds, layer_sites)
    figure = Figure(
        figsize=(1.6 + 4.2 * len(kinds), 0.5 + 0.85 * len(layer_sites)), layout="constrained"
    )
    axes = figure.subplots()
    axes.set_xlim(0.0, float(len(kinds)))
    axes.set_ylim(float(len(layer_sites)), 0.0)
    axes.set_axis_off()
    cmap = colormaps[DEAD_CMAP]
    norm = Normalize(0.0, 1.0)
    for row, by_kind in enumerate(layer_sites):
        for column, kind in enumerate(kinds):
            stats = by_kind.get(kind)
            if stats is not None:
                _layer_box(axes, stats, column, row, cmap(norm(stats.ratio(State.DEAD))))
        if row + 1 < len(layer_sites):
            # Data flows from one call site to the next in graph order.
            middle = len(kinds) / 2.0
            axes.add_patch(
                FancyArrowPatch(
                    (middle, row + 0.88),
                    (middle, row + 1.06),
                    arrowstyle="-|>",
                    mutation_scale=9,
                    color="0.4",
                )
            )
    mappable = figure.colorbar(
        ScalarMappable(norm=norm, cmap=cmap), ax=axes, location="top", shrink=0.5, aspect=40
    )
    mappable.set_label("dead share of the layer's neurons", fontsize=8)
    figure.suptitle(label(f"{report.model}: watched layers in graph order"), fontsize=10)
    return figure


_STRIP = 100  # columns of a layer's liveness strip: one per percent of its neurons


def _strip(stats: LayerStats | None) -> np.ndarray:
    """A layer's firing states as a row of :data:`_STRIP` state indices (-1: not watched),
    dead at the left so its share reads off the axis."""
    if stats is None or not stats.neurons:
        return np.full(_STRIP, -1)
    order = (State.DEAD, State.LEAKING, State.ASLEEP, State.ACTIVE, State.UNKNOWN)
    shares = np.cumsum([stats.ratio(state) for state in order])
    ends = np.round(shares * _STRIP).astype(int)
    return np.searchsorted(ends, np.arange(_STRIP), side="right").clip(0, len(order) - 1)


def _compact_map(
    report: Report, kinds: list[str], layer_sites: list[dict[str, LayerStats]]
) -> Figure:
    """Many layers: per kind, a row per call site in graph order, a strip of its firing states
    (dead first), so a bounded figure still shows where along the depth neurons die."""
    order = (State.DEAD, State.LEAKING, State.ASLEEP, State.ACTIVE, State.UNKNOWN)
    cmap = ListedColormap([STATE_COLORS[s] for s in order]).with_extremes(under="white")
    figure = Figure(
        figsize=(1.6 + 3.6 * len(kinds), compact_height(len(layer_sites))), layout="constrained"
    )
    grid = figure.subplots(1, len(kinds), squeeze=False)
    names = [next(iter(by_kind.values())).name for by_kind in layer_sites]
    for axes, kind in zip(grid[0], kinds, strict=True):
        matrix = np.stack([_strip(by_kind.get(kind)) for by_kind in layer_sites])
        axes.imshow(
            matrix,
            aspect="auto",
            cmap=cmap,
            vmin=0,
            vmax=len(order) - 1,
            interpolation="nearest",
            extent=(0.0, 100.0, len(layer_sites) - 0.5, -0.5),
        )
        row_labels(axes, names)
        axes.set_title(f"kind {kind}", fontsize=9, loc="left")
        axes.set_xlabel("% of the layer's neurons", fontsize=8)
        axes.tick_params(axis="x", labelsize=7)
    handles = [Rectangle((0, 0), 1, 1, color=STATE_COLORS[s]) for s in order]
    figure.legend(
        handles, [s.value for s in order], loc="outside lower center", ncols=len(order), fontsize=8
    )
    figure.suptitle(
        label(f"{report.model}: watched layers in graph order, {len(layer_sites)} layers"),
        fontsize=10,
    )
    return figure


def _layer_box(
    axes: Axes, stats: LayerStats, column: int, row: int, fill: Sequence[float] | str
) -> None:
    x, y, width, height = column + 0.04, row + 0.06, 0.92, 0.8
    unknown = stats.count(State.UNKNOWN) > 0
    axes.add_patch(
        FancyBboxPatch(
            (x, y),
            width,
            height,
            boxstyle="round,pad=0,rounding_size=0.04",
            facecolor=fill,
            edgecolor="0.25",
            linestyle="--" if unknown else "-",
            linewidth=1.0,
        )
    )
    ink = "white" if stats.ratio(State.DEAD) > 0.6 else "black"
    rows = f"{stats.rows:,} rows"
    if unknown:
        rows += f" < min_rows {stats.config.min_rows:,}: {percent(stats, State.UNKNOWN)} unknown"
    lines = [
        f"{stats.name} [{stats.kind}]",
        f"{stats.config.activation or stats.config.family} · {stats.neurons} neurons · {rows}",
        f"dead {percent(stats, State.DEAD)} · leaking {percent(stats, State.LEAKING)} · "
        f"dormant {percent(stats, State.DORMANT)} · saturated "
        f"{percent(stats, State.SATURATED)}",
    ]
    axes.text(
        x + 0.02,
        y + 0.05,
        label("\n".join(lines)),
        va="top",
        ha="left",
        fontsize=7,
        color=ink,
        linespacing=1.3,
    )
    # Liveness bar along the bottom of the box: the firing states partition the neurons.
    left = x + 0.02
    for state in BAR_STATES:
        share = stats.ratio(state) * (width - 0.04)
        if share > 0:
            axes.add_patch(
                Rectangle(
                    (left, y + height - 0.16),
                    share,
                    0.1,
                    facecolor=STATE_COLORS[state],
                    edgecolor="none",
                )
            )
        left += share
