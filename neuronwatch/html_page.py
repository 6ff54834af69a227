"""The ``index.html`` written beside a report's plots: one self-contained page.

No script, no stylesheet or font from the network: the page shows the same offline, from a CI
artifact or a file share, as on the machine that wrote it. Every value taken from the report
(layer names, meta) is HTML-escaped.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .report import Report
from .states import FIRING_STATES, OVERLAY_STATES, State
from .stats import LayerStats

if TYPE_CHECKING:
    from .plots import View

__all__ = ["render_page"]

_COLUMNS: tuple[State, ...] = (*FIRING_STATES, *OVERLAY_STATES)
_STYLE = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
.meta { color: #555; margin: 0.2em 0; }
.totals span { margin-right: 1.2em; white-space: nowrap; }
.warning { border-left: 4px solid #b0b0b0; background: #f4f4f4; padding: 0.4em 0.8em; }
figure { margin: 2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; max-width: 60em; margin-top: 0.4em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
td.over { color: #d62728; font-weight: bold; }
dl.states dt { font-weight: bold; float: left; clear: left; width: 7em; }
dl.states dd { margin-left: 8em; color: #444; }
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _share(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total else "-"


def _meta_items(meta: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``report.meta`` as ``key=value`` pairs for the header: nested mappings flattened to
    dotted keys (``onnx.provider``), long collections counted, empty ones left out; never a
    raw ``dict`` repr (an audit's meta holds its sites and initializer map)."""
    items: list[tuple[str, str]] = []
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not prefix:
            items += _meta_items(value, f"{name}.")
        elif isinstance(value, (dict, list, tuple)):
            if value:
                items.append((name, f"{len(value)} entries"))
        elif value is not None:
            items.append((name, str(value)))
    return items


def _header(report: Report) -> list[str]:
    created = datetime.datetime.fromtimestamp(report.created, tz=datetime.timezone.utc)
    parts = [
        f"<h1>{_e(report.model)}: neuron liveness</h1>",
        f'<p class="meta">window <b>{_e(report.window)}</b> · step {report.step} · written '
        f"{created:%Y-%m-%d %H:%M:%S} UTC · neuronwatch {_e(__version__)}</p>",
    ]
    items = " · ".join(f"{_e(k)}={_e(v)}" for k, v in _meta_items(report.meta))
    if items:
        parts.append(f'<p class="meta">{items}</p>')
    neurons = report.neurons
    totals = [f"<span>{len(report.layers)} layers</span>", f"<span>{neurons} neurons</span>"]
    for state in _COLUMNS:
        count = report.count(state)
        if count or state is not State.UNKNOWN:
            totals.append(f"<span>{state.value} {count} ({_share(count, neurons)})</span>")
    ratio = report.active_parameter_ratio()
    if ratio is not None:
        totals.append(f"<span>active-parameter ratio {ratio:.3f}</span>")
    parts.append(f'<p class="totals">{" ".join(totals)}</p>')
    return parts


def _warnings(layers: Iterable[LayerStats]) -> list[str]:
    notes = [
        f"<li>{_e(stats.name)}: {stats.count(State.UNKNOWN)} of {stats.neurons} neurons are "
        f"unknown: the window has {stats.rows} rows but needs min_rows="
        f"{stats.config.min_rows} before a neuron is judged; they are counted neither as dead "
        "nor as alive</li>"
        for stats in layers
        if stats.count(State.UNKNOWN)
    ]
    if not notes:
        return []
    return ['<div class="warning"><b>Not judged yet</b><ul>', *notes, "</ul></div>"]


def _figure(view: View, size: tuple[int, int]) -> str:
    width, height = size
    return (
        f'<figure id="{_e(view.key)}"><h2>{_e(view.title)}</h2>'
        f'<img src="{_e(view.file)}" alt="{_e(view.caption)}" width="{width}" '
        f'height="{height}"><figcaption>{_e(view.caption)}</figcaption></figure>'
    )


def _table(layers: Iterable[LayerStats]) -> list[str]:
    head = "".join(f"<th>{_e(s.value)}</th>" for s in _COLUMNS)
    rows = [
        '<h2 id="layers-table">Layers</h2><table>',
        f"<tr><th>layer</th><th>kind</th><th>activation</th><th>neurons</th><th>rows</th>{head}"
        "</tr>",
    ]
    for stats in layers:
        cells = "".join(
            f"<td{' class=over' if s in (State.DEAD, State.UNKNOWN) and stats.count(s) else ''}>"
            f"{stats.count(s)} ({_share(stats.count(s), stats.neurons)})</td>"
            for s in _COLUMNS
        )
        rows.append(
            f'<tr><td>{_e(stats.name)}</td><td class="text">{_e(stats.kind)}</td>'
            f'<td class="text">{_e(stats.config.activation or stats.config.family)}</td>'
            f"<td>{stats.neurons}</td><td>{stats.rows}</td>{cells}</tr>"
        )
    rows.append("</table>")
    return rows


def _vocabulary() -> list[str]:
    items = "".join(f"<dt>{_e(s.value)}</dt><dd>{_e(s.description)}</dd>" for s in _COLUMNS)
    return [f'<h2 id="states">States</h2><dl class="states">{items}</dl>']


def render_page(report: Report, figures: Sequence[tuple[View, tuple[int, int]]]) -> str:
    """The page: header and totals, warnings about layers not judged yet, every figure (with
    its pixel size), the per-layer table and what each state means."""
    layers = list(report.layers.values())
    body = [
        *_header(report),
        *_warnings(layers),
        *(_figure(view, size) for view, size in figures),
        *_table(layers),
        *_vocabulary(),
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(report.model)} · neuronwatch report</title>",
            f"<style>{_STYLE}</style></head><body>",
            *body,
            "</body></html>",
            "",
        ]
    )
