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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, overload

import numpy as np
from numpy.typing import NDArray

from ._version import __version__
from .config import LayerConfig
from .errors import ConfigError
from .metric_families import FAMILIES, SILENT_STEP_BUCKETS
from .scratch import SCRATCH
from .snapshot import Snapshot
from .states import STATES
from .stats import FREQUENCY_EDGES, JoinedVerdicts, JudgedLayers, LayerStats, VerdictCache

__all__ = [
    "Histogram",
    "Histograms",
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


class Histograms(Sequence[Histogram]):
    """The gauge-histogram points of many layers as one table: row ``i`` is layer ``i``'s
    cumulative buckets (``+Inf`` last), then its count and sum.

    Indexing gives a :class:`Histogram`, built on demand. Renderers read :meth:`flat` and
    :meth:`column` instead: a 1,000-layer scrape then makes three lists, not 2,000 points and
    4,000 tuples that outlive it. Those survivors set off the garbage collector's full
    collections (10-25 ms each) in the middle of scrapes.
    """

    __slots__ = ("_table",)

    def __init__(self, table: NDArray[np.float64]) -> None:
        if table.ndim != 2 or table.shape[1] < 3:
            raise ValueError(f"a histogram table is [layers, buckets + 2], got {table.shape}")
        self._table = table

    def __len__(self) -> int:
        return int(self._table.shape[0])

    @overload
    def __getitem__(self, index: int) -> Histogram: ...

    @overload
    def __getitem__(self, index: slice) -> Histograms: ...

    def __getitem__(self, index: int | slice) -> Histogram | Histograms:
        if isinstance(index, slice):
            return Histograms(self._table[index])
        *buckets, gcount, gsum = self._table[index].tolist()
        return Histogram(tuple(buckets), gcount, gsum)

    @classmethod
    def of(cls, points: Sequence[Histogram]) -> Histograms:
        """A table of separate points (e.g. those of several models, joined)."""
        if isinstance(points, Histograms):
            return points
        rows = [(*point.buckets, point.gcount, point.gsum) for point in points]
        if not rows:
            raise ValueError("no histogram points")
        return cls(np.asarray(rows, dtype=np.float64))

    def flat(self, summaries: bool = True) -> list[float]:
        """Layer by layer: its buckets and (``summaries``) its count and sum, in one list."""
        table = self._table if summaries else self._table[:, :-2]
        values: list[float] = table.ravel().tolist()
        return values

    def column(self, field: str) -> list[float]:
        """``gcount`` or ``gsum`` of every layer."""
        values: list[float] = self._table[:, {"gcount": -2, "gsum": -1}[field]].tolist()
        return values


def histograms(
    buckets: NDArray[np.float64], counts: Sequence[float], sums: Sequence[float]
) -> Histograms:
    """:class:`Histograms` from per-layer bucket counts below the finite bounds (``[layers,
    bounds]``), each layer's count (also its ``+Inf`` bucket) and sum."""
    counts_column = np.asarray(counts, dtype=np.float64)[:, None]
    sums_column = np.asarray(sums, dtype=np.float64)[:, None]
    return Histograms(np.hstack([buckets, counts_column, counts_column, sums_column]))


@dataclass(frozen=True)
class Series:
    """The points of one family: ``labels[i]`` (values in the order of the family's label
    names) goes with ``values[i]`` (floats, or :class:`Histograms` for gauge-histograms).
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
    # The window's verdicts the series came from (a later read of the same ones reuses them).
    verdicts: JoinedVerdicts | None = field(default=None, repr=False, compare=False)


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
    """Per-layer sums and cumulative counts of per-neuron arrays joined over many layers (a
    handful of numpy calls for the whole model: a 1,000-layer model has 256,000 neurons)."""

    def __init__(self, sizes: list[int]) -> None:
        self.count = len(sizes)
        sizes_array = np.asarray(sizes, dtype=np.intp)
        self._nonempty = np.flatnonzero(sizes_array)
        # reduceat needs the start of every non-empty segment; empty layers sum to 0.
        self._starts = (np.cumsum(sizes_array) - sizes_array)[self._nonempty]

    def sums(self, values: NDArray[Any]) -> list[float]:
        sums = np.zeros(self.count)
        if self._nonempty.size:
            # dtype=: booleans and counts are summed as float64 chunk by chunk, no full copy.
            sums[self._nonempty] = np.add.reduceat(values, self._starts, dtype=np.float64)
        result: list[float] = sums.tolist()
        return result

    def at_most(
        self, values: NDArray[Any], bounds: Sequence[float], keep: NDArray[np.bool_] | None = None
    ) -> NDArray[np.float64]:
        """Per layer, how many (kept) neurons have a value ``<=`` each bound: the cumulative
        buckets of a histogram with those ``le`` bounds, ``[layers, bounds]``."""
        columns = np.zeros((len(bounds), self.count))
        for column, bound in zip(columns, bounds, strict=True):
            below = values <= bound
            if keep is not None:
                below &= keep
            if self._nonempty.size:
                column[self._nonempty] = np.add.reduceat(below, self._starts, dtype=np.float64)
        table: NDArray[np.float64] = columns.T
        return table


_INFO: dict[int, tuple[LayerConfig, tuple[str, ...]]] = {}
_INFO_KEEP = 10_000  # configs (one per layer) kept; a model that renames its layers refills it


def _concat(arrays: list[NDArray[Any]], dtype: type[np.generic]) -> NDArray[Any]:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _judged(
    layers: Mapping[str, LayerStats], names: list[str], cache: VerdictCache | None
) -> JoinedVerdicts:
    """The verdicts of ``names`` as joined columns: judged in one pass from a snapshot's
    window (through ``cache``), or joined from the stats of another mapping (a loaded
    report's layers)."""
    if isinstance(layers, JudgedLayers):
        return layers.joined(names, cache)
    stats = [layers[name] for name in names]
    bounds = np.concatenate([[0], np.cumsum([s.neurons for s in stats])]).astype(np.intp)
    fields = ("known", "frequency", *(state.value for state in STATES))
    arrays = {
        field: _concat(
            [getattr(s, field) for s in stats], np.float64 if field == "frequency" else np.bool_
        )
        for field in fields
    }
    return JoinedVerdicts(
        [s.config for s in stats], [s.partials for s in stats], bounds.tolist(), arrays
    )


def _info_labels(config: LayerConfig) -> tuple[str, ...]:
    """The layer's info labels; kept per config object (configs outlive snapshots, and three
    float reprs per layer are ~2 ms of a 1,000-layer scrape)."""
    kept = _INFO.get(id(config))
    if kept is not None and kept[0] is config:
        return kept[1]
    if len(_INFO) >= _INFO_KEEP:
        _INFO.clear()
    labels = _describe(config)
    _INFO[id(config)] = (config, labels)
    return labels


def _describe(config: LayerConfig) -> tuple[str, ...]:
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


# Families whose every value comes from the judged window (the rest are lifetime counters,
# the steps since last fired, and per-model figures).
WINDOW_FAMILIES: tuple[str, ...] = (
    "neuronwatch_layer",
    "neuronwatch_neurons",
    *(f"neuronwatch_{state.value}_{what}" for state in STATES for what in ("neurons", "ratio")),
    "neuronwatch_window_rows",
    "neuronwatch_firing_frequency_ratio",
)


def read(
    snapshot: Snapshot,
    window: str = "auto",
    layers: Sequence[str] | None = None,
    cache: VerdictCache | None = None,
    previous: Reading | None = None,
) -> Reading:
    """The series of every family for ``snapshot``.

    Per-layer figures cover ``window`` (``auto``: the last complete window, else lifetime);
    counters (rows observed, non-finite values, hook errors) and steps since last fired are
    lifetime figures. ``layers`` keeps only the layers matching one of its globs.

    An exporter reading snapshot after snapshot passes a ``cache`` (one per watched model) and
    the model's ``previous`` reading: while the window's verdicts are the very objects the
    previous reading used (the last complete window between rollovers), its window families
    are taken over as they are and only the lifetime ones are computed.
    """
    resolved = snapshot.resolve_window(window)
    shown = snapshot.windows[resolved]
    lifetime = snapshot.windows["lifetime"]
    series = _model_series(snapshot, resolved)

    selected = select_layers(list(shown), layers)
    judged = _judged(shown, selected, cache)
    lifetime_partials = getattr(lifetime, "partials", None)  # lifetime holds every layer
    lives = (
        [lifetime_partials(name) for name in selected]
        if callable(lifetime_partials)
        else [lifetime[name].partials for name in selected]
    )
    model = label_text(snapshot.model)
    sizes = judged.sizes
    neurons = [float(n) for n in sizes]
    per = _Layers(sizes)
    if (
        previous is not None
        and previous.verdicts is judged
        and previous.window == resolved
        and previous.layers == tuple(selected)
        and previous.snapshot.model == snapshot.model
    ):
        labels = previous.series["neuronwatch_neurons"].labels
        series.update({name: previous.series[name] for name in WINDOW_FAMILIES})
    else:
        kept = _kept_labels(previous, snapshot.model, selected, judged)
        labels = kept or [
            (model, label_text(name), config.kind)
            for name, config in zip(selected, judged.configs, strict=True)
        ]
        info = previous.series["neuronwatch_layer"].labels if kept and previous else None
        series.update(_window_series(judged, labels, per, neurons, info))

    def layer_series(values: Sequence[Any]) -> Series:
        return Series(labels, values)

    series["neuronwatch_rows_observed"] = layer_series([float(p.rows) for p in lives])
    with SCRATCH.joined([p.nonfinite for p in lives], np.int64) as nonfinite:
        series["neuronwatch_nonfinite_values"] = layer_series(per.sums(nonfinite))

    with SCRATCH.joined([p.last_fired_step for p in lives], np.int64) as silent:
        never = silent < 0
        np.subtract(snapshot.step, silent, out=silent)  # steps_silent, in the buffer
        silent[never] = snapshot.step
        # A neuron silent for exactly 10 steps is in le="10.0", as le means.
        buckets = per.at_most(silent, SILENT_STEP_BUCKETS)
        series["neuronwatch_steps_since_last_fired"] = layer_series(
            histograms(buckets, neurons, per.sums(silent))
        )

    # A layer whose every update failed has errors but no statistics: still count them.
    errors = snapshot.errors
    failed_only = select_layers(sorted(set(errors) - set(shown)), layers)
    failed_labels = [
        (model, label_text(name), lifetime[name].kind if name in lifetime else "")
        for name in failed_only
    ]
    series["neuronwatch_hook_errors"] = Series(
        [*labels, *failed_labels] if failed_labels else labels,  # shared list: labelled once
        [float(errors.get(name, 0)) for name in (*selected, *failed_only)],
    )
    missing = {f.name for f in FAMILIES} ^ set(series)
    assert not missing, f"families without a series: {sorted(missing)}"
    return Reading(snapshot, resolved, tuple(selected), series, judged)


def _kept_labels(
    previous: Reading | None, model: str, selected: list[str], judged: JoinedVerdicts
) -> Sequence[tuple[str, ...]] | None:
    """The previous reading's layer labels when they still hold: the same model, layers and
    layer configs (a window rollover changes none of them). Reused as they are, a new window
    makes no new label tuples (1,000 layers: 2,000 tuples that outlive the scrape and wake the
    garbage collector), and the renderer finds their text by identity."""
    if (
        previous is None
        or previous.snapshot.model != model
        or previous.layers != tuple(selected)
        or previous.verdicts is None
        or len(previous.verdicts.configs) != len(judged.configs)
        or any(a is not b for a, b in zip(previous.verdicts.configs, judged.configs, strict=True))
    ):
        return None
    return previous.series["neuronwatch_neurons"].labels


def _window_series(
    judged: JoinedVerdicts,
    labels: Sequence[tuple[str, ...]],
    per: _Layers,
    neurons: list[float],
    info: Sequence[tuple[str, ...]] | None = None,
) -> dict[str, Series]:
    """The :data:`WINDOW_FAMILIES` of the judged window; ``info``: the labels of
    ``neuronwatch_layer`` when they are known to be unchanged."""

    def layer_series(values: Sequence[Any]) -> Series:
        return Series(labels, values)

    series = {
        "neuronwatch_layer": Series(
            info
            or [
                (*label, *_info_labels(config))
                for label, config in zip(labels, judged.configs, strict=True)
            ],
            [1.0] * len(labels),
        ),
        "neuronwatch_neurons": layer_series(neurons),
    }
    for state in (s.value for s in STATES):
        # One segmented sum per state over the joined verdicts, not one call per layer.
        counts = per.sums(judged[state])
        series[f"neuronwatch_{state}_neurons"] = layer_series(counts)
        series[f"neuronwatch_{state}_ratio"] = layer_series(_ratios(counts, neurons))
    series["neuronwatch_window_rows"] = layer_series([float(p.rows) for p in judged.partials])
    known = judged["known"]
    frequency = judged["frequency"]
    # le="0.0" holds the neurons that never fired, le=edge those at or below it: as
    # LayerStats.frequency_distribution counts them, cumulated. Unknown neurons are left out.
    buckets = per.at_most(frequency, FREQUENCY_EDGES, keep=known)
    known_counts = per.sums(known)
    series["neuronwatch_firing_frequency_ratio"] = layer_series(
        histograms(buckets, known_counts, per.sums(np.where(known, frequency, 0.0)))
    )
    return series
