"""The value of every metric family for one snapshot, computed once for every exporter.

:func:`read` turns an immutable :class:`~neuronwatch.Snapshot` into a :class:`Reading`: for
each family of :data:`~neuronwatch.metric_families.FAMILIES`, a :class:`Series` of label values
and values. Every per-layer figure of a reading comes from one window of one snapshot, so an
exporter that renders one reading can never mix two windows ("torn" scrapes). Prometheus and
OpenTelemetry both render readings, so their numbers cannot drift apart either.

Readings are columnar (one list of values per family, the label lists shared between families)
and computed with a few numpy calls for the whole model, not per layer: a 1,000-layer model
exports ~40,000 samples and a scrape must stay well under 50 ms.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from ._version import __version__
from .errors import ConfigError
from .metric_families import FAMILIES, SILENT_STEP_BUCKETS
from .snapshot import Snapshot, steps_silent
from .states import STATES
from .stats import FREQUENCY_EDGES, JudgedLayers, LayerStats

__all__ = [
    "Histogram",
    "Reading",
    "Series",
    "check_patterns",
    "check_source",
    "read",
    "select_layers",
]


class Histogram(NamedTuple):
    """A gauge-histogram point: cumulative bucket counts (``+Inf`` last), their count and sum."""

    buckets: tuple[float, ...]
    gcount: float
    gsum: float


@dataclass(frozen=True)
class Series:
    """The points of one family: ``labels[i]`` (values in the order of the family's label
    names) goes with ``values[i]`` (floats, or :class:`Histogram` for gauge-histograms).
    Families of one scope share the same ``labels`` list object."""

    labels: Sequence[tuple[str, ...]]
    values: Sequence[Any]

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Reading:
    """What one snapshot exports: ``series[family name]``, layers in snapshot order.
    Every value is finite."""

    snapshot: Snapshot
    window: str
    layers: tuple[str, ...]
    series: dict[str, Series]


def select_layers(names: Sequence[str], patterns: Sequence[str] | None) -> list[str]:
    """The names matching any glob of ``patterns`` (all of them for ``None``)."""
    if patterns is None:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_patterns(
    patterns: Sequence[str] | str | None, argument: str = "layers"
) -> tuple[str, ...] | None:
    """``patterns`` as a tuple of globs; a ConfigError for a bare string or a non-string."""
    if patterns is None:
        return None
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(
            f"{argument} must be a list of layer names or globs, e.g. [{patterns!r}], "
            f"got {patterns!r}"
        )
    return tuple(patterns)


def check_source(source: object) -> None:
    """A ConfigError unless ``source`` has a ``latest`` attribute (a snapshot source).

    Not ``isinstance(source, SnapshotSource)``: before Python 3.12 that evaluates the
    ``latest`` property, i.e. reads (or fails to read) a snapshot just to check a type.
    """
    missing = object()
    if inspect.getattr_static(source, "latest", missing) is missing:
        raise ConfigError(
            f"{type(source).__name__} is not a snapshot source: it needs a `latest` property "
            "(a neuronwatch Monitor has one)"
        )


class _Layers:
    """Per-layer sums and histograms of per-neuron arrays concatenated over many layers."""

    def __init__(self, sizes: list[int]) -> None:
        self.count = len(sizes)
        sizes_array = np.asarray(sizes, dtype=np.intp)
        self.owner = np.repeat(np.arange(self.count), sizes_array)
        self._nonempty = np.flatnonzero(sizes_array)
        # reduceat needs the start of every non-empty segment; empty layers sum to 0.
        self._starts = (np.cumsum(sizes_array) - sizes_array)[self._nonempty]

    def sums(self, values: NDArray[Any]) -> list[float]:
        sums = np.zeros(self.count)
        if self._nonempty.size:
            sums[self._nonempty] = np.add.reduceat(values.astype(np.float64), self._starts)
        result: list[float] = sums.tolist()
        return result

    def histograms(
        self, index: NDArray[np.intp], bins: int, keep: NDArray[np.bool_] | None = None
    ) -> list[list[float]]:
        """Cumulative counts of the (kept) neurons per bin ``index``, one row per layer."""
        flat = self.owner * bins + index
        if keep is not None:
            flat = flat[keep]
        counts = np.bincount(flat, minlength=self.count * bins).reshape(self.count, bins)
        cumulative: list[list[float]] = np.cumsum(counts, axis=1).astype(np.float64).tolist()
        return cumulative


def _concat(arrays: list[NDArray[Any]], dtype: type[np.generic]) -> NDArray[Any]:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _info_labels(stats: LayerStats) -> tuple[str, ...]:
    config = stats.config
    return (
        config.activation or "",
        config.family,
        repr(config.fire_threshold),
        repr(config.asleep_below),
        repr(config.tau),
        str(config.min_rows),
    )


def label_text(name: str) -> str:
    """``name`` as a label value every exposition can encode: Python names may hold lone
    surrogates (from undecodable bytes), which UTF-8 cannot carry; they become ``\\udcff``."""
    if name.isascii():
        return name
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _model_series(snapshot: Snapshot, window: str) -> dict[str, Series]:
    model = label_text(snapshot.model)
    by_model = [(model,)]
    series = {
        "neuronwatch_build": Series([(model, __version__)], [1.0]),
        "neuronwatch_steps": Series(by_model, [float(snapshot.step)]),
        "neuronwatch_windows_completed": Series(by_model, [float(snapshot.windows_completed)]),
        "neuronwatch_last_update_timestamp_seconds": Series(by_model, [snapshot.taken_at]),
    }
    capacity = snapshot.active_parameter_ratio(window)
    series["neuronwatch_active_parameter_ratio"] = Series(
        by_model if capacity is not None else [], [] if capacity is None else [capacity]
    )
    return series


def _ratios(counts: list[float], neurons: list[float]) -> list[float]:
    return [c / n if n else 0.0 for c, n in zip(counts, neurons, strict=True)]


def read(snapshot: Snapshot, window: str = "auto", layers: Sequence[str] | None = None) -> Reading:
    """The series of every family for ``snapshot``.

    Per-layer figures cover ``window`` (``auto``: the last complete window, else lifetime);
    counters (rows observed, non-finite values, hook errors) and steps since last fired are
    lifetime figures. ``layers`` keeps only the layers matching one of its globs.
    """
    resolved = snapshot.resolve_window(window)
    shown = snapshot.windows[resolved]
    lifetime = snapshot.windows["lifetime"]
    series = _model_series(snapshot, resolved)

    selected = select_layers(list(shown), layers)
    chosen = (
        shown.judge(selected)
        if isinstance(shown, JudgedLayers)
        else [shown[name] for name in selected]
    )
    lives = [snapshot.partials(name) for name in selected]  # lifetime holds every layer
    model = label_text(snapshot.model)
    labels = [
        (model, label_text(name), stats.kind) for name, stats in zip(selected, chosen, strict=True)
    ]
    neurons = [float(stats.neurons) for stats in chosen]
    per = _Layers([stats.neurons for stats in chosen])

    def layer_series(values: Sequence[Any]) -> Series:
        return Series(labels, values)

    series["neuronwatch_layer"] = Series(
        [(*label, *_info_labels(stats)) for label, stats in zip(labels, chosen, strict=True)],
        [1.0] * len(chosen),
    )
    series["neuronwatch_neurons"] = layer_series(neurons)
    for state in (s.value for s in STATES):
        # One concatenation and one segmented sum per state, not one call per layer.
        counts = per.sums(_concat([getattr(stats, state) for stats in chosen], np.bool_))
        series[f"neuronwatch_{state}_neurons"] = layer_series(counts)
        series[f"neuronwatch_{state}_ratio"] = layer_series(_ratios(counts, neurons))
    series["neuronwatch_window_rows"] = layer_series([float(stats.rows) for stats in chosen])
    series["neuronwatch_rows_observed"] = layer_series([float(p.rows) for p in lives])
    series["neuronwatch_nonfinite_values"] = layer_series(
        per.sums(_concat([p.nonfinite for p in lives], np.int64))
    )

    known = _concat([stats.known for stats in chosen], np.bool_)
    frequency = np.where(known, _concat([stats.frequency for stats in chosen], np.float64), 0.0)
    # Bin 0 holds the neurons that never fired (le="0.0"), bin j those in
    # (edges[j-1], edges[j]]: as LayerStats.frequency_distribution counts them.
    bins = np.searchsorted(np.asarray(FREQUENCY_EDGES), frequency, side="left")
    buckets = per.histograms(bins, len(FREQUENCY_EDGES), keep=known)
    known_counts = per.sums(known)
    series["neuronwatch_firing_frequency_ratio"] = layer_series(
        [
            Histogram((*b, n), n, s)
            for b, n, s in zip(buckets, known_counts, per.sums(frequency), strict=True)
        ]
    )

    silent = steps_silent(_concat([p.last_fired_step for p in lives], np.int64), snapshot.step)
    # side="left": a neuron silent for exactly 10 steps is in le="10.0", as le means.
    bins = np.searchsorted(np.asarray(SILENT_STEP_BUCKETS), silent, side="left")
    buckets = per.histograms(bins, len(SILENT_STEP_BUCKETS) + 1)
    series["neuronwatch_steps_since_last_fired"] = layer_series(
        [
            Histogram(tuple(b), n, s)
            for b, n, s in zip(buckets, neurons, per.sums(silent), strict=True)
        ]
    )

    # A layer whose every update failed has errors but no statistics: still count them.
    errors = snapshot.errors
    failed_only = select_layers(sorted(set(errors) - set(shown)), layers)
    failed_labels = [
        (model, label_text(name), lifetime[name].kind if name in lifetime else "")
        for name in failed_only
    ]
    series["neuronwatch_hook_errors"] = Series(
        labels + failed_labels if failed_labels else labels,  # shared list: labelled once
        [float(errors.get(name, 0)) for name in (*selected, *failed_only)],
    )
    missing = {f.name for f in FAMILIES} ^ set(series)
    assert not missing, f"families without a series: {sorted(missing)}"
    return Reading(snapshot, resolved, tuple(selected), series)
