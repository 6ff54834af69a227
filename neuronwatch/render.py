"""Terminal rendering of reports and training progress with rich (no framework imports).

Everything here builds rich renderables from :class:`~neuronwatch.Report` or per-layer
:class:`~neuronwatch.LayerStats`; the CLI decides where they are printed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from .report import Report
from .states import FIRING_STATES, OVERLAY_STATES, State
from .stats import LayerStats

__all__ = [
    "EpochLike",
    "TrainingProgress",
    "comparison_table",
    "live",
    "liveness_bar",
    "natural_width",
    "report_view",
]

BAR_WIDTH = 12
# Stacked bar segments, in drawing order. Each state has its own character as well as its own
# colour, so the bar still reads without colour (pipes, NO_COLOR); unknown neurons are "?" so
# they are never mistaken for alive ones.
_SEGMENTS: tuple[tuple[State, str, str], ...] = (
    (State.ACTIVE, "█", "green"),
    (State.ASLEEP, "▒", "yellow"),
    (State.LEAKING, "▓", "cyan"),
    (State.DEAD, "░", "red"),
    (State.UNKNOWN, "?", "magenta"),
)
assert {state for state, _, _ in _SEGMENTS} == set(FIRING_STATES)
# Unknown gets its own column only when a layer has unknown neurons.
_STATE_COLUMNS: tuple[State, ...] = (
    *(state for state in FIRING_STATES if state is not State.UNKNOWN),
    *OVERLAY_STATES,
)


def _unknown(stats: LayerStats) -> int:
    return stats.count(State.UNKNOWN)


def _percent(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "-"


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _count_cell(count: int, total: int) -> str:
    return f"{count} ({_percent(count, total)})"


def _cells(counts: Iterable[int], width: int) -> list[int]:
    """Split ``width`` bar cells over ``counts`` proportionally (largest remainder), so every
    bar has the same length and a non-zero share never rounds up to more than its due."""
    values = list(counts)
    total = sum(values)
    if total == 0:
        return [0] * len(values)
    exact = [width * v / total for v in values]
    cells = [int(e) for e in exact]
    by_remainder = sorted(range(len(values)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in by_remainder[: width - sum(cells)]:
        cells[i] += 1
    return cells


def liveness_bar(stats: LayerStats, width: int = BAR_WIDTH) -> Text:
    """A stacked bar of the layer's active / asleep / dead / unknown neurons."""
    counts = [stats.count(state) for state, _, _ in _SEGMENTS]
    bar = Text()
    for (_, char, style), cells in zip(_SEGMENTS, _cells(counts, width), strict=True):
        bar.append(char * cells, style=style)
    return bar


def _legend() -> Text:
    legend = Text("bar: ", style="dim")
    for state, char, style in _SEGMENTS:
        legend.append(char, style=style)
        legend.append(f" {state.value}  ", style="dim")
    return legend


def natural_width(console: Console, renderable: RenderableType) -> int:
    """Columns ``renderable`` takes when nothing forces it to wrap."""
    unbounded = console.options.update_width(10_000)
    return Measurement.get(console, unbounded, renderable).maximum


def _unknown_note(stats: LayerStats) -> str:
    return (
        f"layer {stats.name!r}: {_unknown(stats)} of {stats.neurons} neurons are unknown: the "
        f"window has {stats.rows} rows but needs min_rows={stats.config.min_rows} before a "
        "neuron is judged; they are not counted as dead or alive"
    )


def _stacked_cell(count: int, total: int) -> Text:
    # Count over its share, on two lines: keeps the state columns narrow enough for a terminal.
    return Text.assemble(str(count), "\n", (_percent(count, total), "dim"))


def report_table(report: Report) -> Table:
    """One row per layer: count and share of every state, plus a liveness bar."""
    layers = list(report.layers.values())
    show_unknown = any(_unknown(stats) for stats in layers)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    # A narrow terminal folds cells onto more lines rather than cutting them off.
    table.add_column("layer", overflow="fold", min_width=8)
    for column in ("kind", "activation"):
        table.add_column(column, overflow="fold")
    for column in ("neurons", "rows", *(state.value for state in _STATE_COLUMNS)):
        table.add_column(column, justify="right", overflow="fold")
    if show_unknown:
        table.add_column("unknown", justify="right", overflow="fold", style="bold magenta")
    table.add_column("liveness", no_wrap=True, min_width=BAR_WIDTH)
    for stats in layers:
        cells = [_stacked_cell(stats.count(state), stats.neurons) for state in _STATE_COLUMNS]
        if show_unknown:
            cells.append(_stacked_cell(_unknown(stats), stats.neurons))
        table.add_row(
            stats.name,
            stats.kind,
            stats.config.activation or "-",
            str(stats.neurons),
            str(stats.rows),
            *cells,
            liveness_bar(stats),
        )
    neurons = report.neurons
    totals = [_stacked_cell(report.count(state), neurons) for state in _STATE_COLUMNS]
    if show_unknown:
        totals.append(_stacked_cell(sum(_unknown(stats) for stats in layers), neurons))
    table.add_section()
    table.add_row("total", "", "", str(neurons), "", *totals, "", style="bold")
    return table


def report_view(report: Report) -> Group:
    """Header, per-layer table, active-parameter ratio and warnings about unknown neurons."""
    header = Text.assemble(
        ("model ", "dim"),
        (report.model, "bold"),
        ("  window ", "dim"),
        report.window,
        ("  step ", "dim"),
        str(report.step),
    )
    parts: list[RenderableType] = [header]
    if report.meta:
        meta = "  ".join(f"{key}={_short(value)}" for key, value in report.meta.items())
        parts.append(Text(meta, style="dim"))
    parts += [report_table(report), _legend()]
    ratio = report.active_parameter_ratio()
    if ratio is not None:
        parts.append(
            Text.assemble(
                "active-parameter ratio: ",
                (f"{ratio:.3f}", "bold"),
                (" (parameters not attached to a dead neuron, of the monitored layers)", "dim"),
            )
        )
    for stats in report.layers.values():
        if _unknown(stats):
            parts.append(Text("unknown: " + _unknown_note(stats), style="bold magenta"))
    return Group(*parts)


def comparison_table(reports: Mapping[str, Report]) -> Table:
    """Dead and leaking (never fired, gradient still flows) neurons per layer side by side, two
    columns per labelled report (e.g. one per activation function), with totals, test accuracy
    and active-parameter ratio."""
    table = Table(title="never fired in the last window", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", no_wrap=True)
    for label in reports:
        table.add_column(f"{label}\ndead", justify="right")
        table.add_column(f"{label}\nleaking", justify="right")
    names: list[str] = []
    for report in reports.values():
        names += [name for name in report.layers if name not in names]

    def cells(report: Report, name: str) -> list[str]:
        stats = report.layers.get(name)
        if stats is None:
            return ["-", "-"]
        unknown = f" ({_unknown(stats)} unknown)" if _unknown(stats) else ""
        return [
            _count_cell(stats.count(State.DEAD), stats.neurons) + unknown,
            _count_cell(stats.count(State.LEAKING), stats.neurons),
        ]

    for name in names:
        table.add_row(name, *(cell for report in reports.values() for cell in cells(report, name)))
    table.add_section()
    table.add_row(
        "total",
        *(
            _count_cell(r.count(state), r.neurons)
            for r in reports.values()
            for state in (State.DEAD, State.LEAKING)
        ),
        style="bold",
    )

    def spanning(values: list[str]) -> list[str]:
        return [cell for value in values for cell in (value, "")]

    accuracies = [r.meta.get("test_accuracy") for r in reports.values()]
    if any(a is not None for a in accuracies):
        table.add_row(
            "test accuracy",
            *spanning([f"{100 * a:.1f}%" if a is not None else "-" for a in accuracies]),
        )
    ratios = [r.active_parameter_ratio() for r in reports.values()]
    table.add_row(
        "active-parameter ratio", *spanning([f"{r:.3f}" if r is not None else "-" for r in ratios])
    )
    return table


class EpochLike(Protocol):
    """What a training loop reports after each epoch (see :class:`neuronwatch.demo.EpochRecord`)."""

    @property
    def model(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def loss(self) -> float: ...
    @property
    def test_accuracy(self) -> float: ...
    @property
    def layers(self) -> Mapping[str, LayerStats]: ...


class TrainingProgress:
    """Latest epoch of every run so far, as one renderable (redrawn by :func:`live`)."""

    def __init__(self) -> None:
        self._latest: dict[str, EpochLike] = {}

    def update(self, record: EpochLike) -> None:
        self._latest[record.model] = record

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = []
        for record in self._latest.values():
            parts.append(
                Text.assemble(
                    (record.model, "bold"),
                    f"  epoch {record.epoch}/{record.epochs}  loss {record.loss:.3f}  "
                    f"test accuracy {100 * record.test_accuracy:.1f}%",
                )
            )
            table = Table(box=None, show_header=False, pad_edge=False)
            for stats in record.layers.values():
                alive = stats.count("active") + stats.count("asleep")
                table.add_row(
                    f"  {stats.name}",
                    Text(f"{_percent(alive, stats.neurons)} alive", justify="right"),
                    liveness_bar(stats),
                )
            parts.append(table)
        return Group(*parts)


@contextmanager
def live(console: Console, renderable: RenderableType, enabled: bool = True) -> Iterator[None]:
    """Redraw ``renderable`` while the block runs. Outside a terminal (a pipe, a log file, a
    test) print its final state once instead: rich's ``Live`` would end it without a newline."""
    if not enabled:
        yield
    elif console.is_terminal:
        with Live(renderable, console=console, refresh_per_second=4):
            yield
    else:
        yield
        console.print(renderable)
