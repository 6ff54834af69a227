"""Derived per-neuron statistics of one layer over one window (``docs/vocabulary.md``).

Everything here is a pure function of ``(LayerConfig, Partials)``: the same partials always give
the same verdicts, which is what lets reports be reloaded, merged and re-judged exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from .config import LayerConfig
from .families import FAMILIES
from .partials import Partials
from .scratch import SCRATCH
from .states import State, parse_state
from .wiring import Wiring, active_parameter_counts

__all__ = [
    "FREQUENCY_EDGES",
    "JoinedVerdicts",
    "JudgedLayers",
    "LayerStats",
    "VerdictCache",
    "judge_joined",
    "summarize",
    "summarize_many",
]

# Firing-frequency distribution: one bin for "never fired", then (0, 1e-3], (1e-3, 1e-2], ...
FREQUENCY_EDGES: tuple[float, ...] = (0.0, 1e-3, 1e-2, 5e-2, 0.25, 0.5, 0.75, 1.0)


_Array = TypeVar("_Array", bound=np.ndarray)


def _readonly(array: _Array) -> _Array:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class LayerStats:
    """Verdicts and per-neuron arrays of one layer over one window. Arrays are read-only.

    ``known`` is per neuron: the neuron's finite rows reached ``min_rows``. Every known neuron is
    in exactly one firing state (dead, leaking, asleep, active); the others are unknown.
    Dormant and saturated are overlays on known neurons (see :mod:`neuronwatch.states`).
    """

    config: LayerConfig
    partials: Partials
    finite_rows: NDArray[np.int64]
    frequency: NDArray[np.float64]
    mean_abs: NDArray[np.float64]
    dormancy: NDArray[np.float64]
    known: NDArray[np.bool_]
    unknown: NDArray[np.bool_]
    dead: NDArray[np.bool_]
    leaking: NDArray[np.bool_]
    asleep: NDArray[np.bool_]
    active: NDArray[np.bool_]
    dormant: NDArray[np.bool_]
    saturated: NDArray[np.bool_]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def neurons(self) -> int:
        return self.partials.neurons

    @property
    def rows(self) -> int:
        return self.partials.rows

    @property
    def complete(self) -> bool:
        """Every neuron is known: the window reached ``min_rows`` finite rows everywhere."""
        return bool(self.known.all())

    def mask(self, state: str | State) -> NDArray[np.bool_]:
        """Per-neuron mask of ``state`` (any name of :class:`~neuronwatch.states.State`)."""
        mask: NDArray[np.bool_] = getattr(self, parse_state(state).value)
        return mask

    def count(self, state: str | State) -> int:
        """Number of neurons in ``state``; an unknown name raises and lists the valid ones."""
        return int(self.mask(state).sum())

    def ratio(self, state: str | State) -> float:
        """Share of the layer's neurons in ``state`` (0 for a layer of no neurons)."""
        return self.count(state) / self.neurons if self.neurons else 0.0

    def indices(self, state: str | State) -> NDArray[np.intp]:
        return np.flatnonzero(self.mask(state))

    @property
    def dead_indices(self) -> NDArray[np.intp]:
        return np.flatnonzero(self.dead)

    @property
    def mean(self) -> NDArray[np.float64]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.partials.sum / self.finite_rows

    def frequency_distribution(self) -> NDArray[np.int64]:
        """Counts of known neurons per firing-frequency bin: bin 0 holds the neurons that never
        fired, bin j the ones with frequency in ``(FREQUENCY_EDGES[j-1], FREQUENCY_EDGES[j]]``."""
        f = self.frequency[self.known]
        edges = FREQUENCY_EDGES
        counts = [np.count_nonzero(f == 0.0)] + [
            np.count_nonzero((f > lo) & (f <= hi)) for lo, hi in itertools.pairwise(edges)
        ]
        return np.asarray(counts, dtype=np.int64)


def summarize(config: LayerConfig, partials: Partials) -> LayerStats:
    """Judge every neuron of one layer from its partials."""
    [stats] = summarize_many([config], [partials])
    return stats


@dataclass(frozen=True, eq=False)
class JoinedVerdicts:
    """Many layers judged together: every per-neuron array of :class:`LayerStats`, concatenated
    over the layers (layer ``i`` owns ``[bounds[i], bounds[i + 1])``). Exporters read these
    columns directly; :meth:`layers` cuts them into one :class:`LayerStats` per layer."""

    configs: Sequence[LayerConfig]
    partials: Sequence[Partials]
    bounds: list[int]
    arrays: Mapping[str, NDArray[Any]]

    @property
    def sizes(self) -> list[int]:
        return [hi - lo for lo, hi in itertools.pairwise(self.bounds)]

    def __getitem__(self, field: str) -> NDArray[Any]:
        return self.arrays[field]

    def layers(self) -> list[LayerStats]:
        arrays = self.arrays
        return [
            LayerStats(
                config=config,
                partials=part,
                **{name: array[lo:hi] for name, array in arrays.items()},
            )
            for config, part, lo, hi in zip(
                self.configs, self.partials, self.bounds[:-1], self.bounds[1:], strict=True
            )
        ]


def _layer_means(
    mean_abs: NDArray[np.float64], has_rows: NDArray[np.bool_], sizes: NDArray[np.intp]
) -> NDArray[np.float64]:
    """Per layer, the mean of ``mean_abs`` over the neurons that have rows, bit for bit what
    numpy's ``mean`` of that layer alone gives (so a layer judged alone or with others gets
    the same verdicts). Layers whose every neuron has rows are averaged as the rows of one
    2-D array per layer size (numpy sums each contiguous row pairwise, as it sums a 1-D
    array); the others, rare, one at a time."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    starts = bounds[:-1]
    means = np.zeros(len(sizes))
    nonempty = sizes > 0
    complete = np.zeros(len(sizes), dtype=bool)
    complete[nonempty] = np.logical_and.reduceat(has_rows, starts[nonempty])
    for size in np.unique(sizes[complete]).tolist():
        layers = np.flatnonzero(complete & (sizes == size))
        index = starts[layers][:, None] + np.arange(size)
        means[layers] = mean_abs[index].mean(axis=1)
    for layer in np.flatnonzero(nonempty & ~complete).tolist():
        values = mean_abs[bounds[layer] : bounds[layer + 1]][
            has_rows[bounds[layer] : bounds[layer + 1]]
        ]
        means[layer] = float(values.mean()) if values.size else 0.0
    return means


def judge_joined(configs: Sequence[LayerConfig], partials: Sequence[Partials]) -> JoinedVerdicts:
    """Judge many layers at once: the same verdicts as judging each alone, from one numpy pass
    over all their neurons (a 1,000-layer model is judged in a few milliseconds, where one
    pass per layer costs ~40 ms: numpy's fixed cost per call dominates small layers).

    Every array of the result is read-only.
    """
    if len(configs) != len(partials):
        raise ValueError(f"{len(configs)} configs for {len(partials)} partials")
    sizes = np.asarray([p.fired.shape[0] for p in partials], dtype=np.intp)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.intp)
    total = int(bounds[-1])

    def chosen(field: str, layers: NDArray[np.bool_]) -> NDArray[Any]:
        """``field`` of the ``layers`` chosen, zeros for the others (a family-specific field is
        not joined for the layers whose family never reads it)."""
        out = np.zeros(total, dtype=getattr(partials[0], field).dtype if partials else None)
        for index in np.flatnonzero(layers).tolist():
            out[bounds[index] : bounds[index + 1]] = getattr(partials[index], field)
        return out

    def per_layer(values: list[Any], dtype: type[np.generic]) -> NDArray[Any]:
        return np.repeat(np.asarray(values, dtype=dtype), sizes)

    with ExitStack() as buffers:  # the joined inputs live in reused buffers: no fresh pages
        fired, nonfinite, abs_sum = (
            buffers.enter_context(SCRATCH.joined([getattr(p, f) for p in partials], dtype))
            for f, dtype in (("fired", np.int64), ("nonfinite", np.int64), ("abs_sum", np.float64))
        )
        finite_rows = per_layer([p.rows for p in partials], np.int64) - nonfinite
        with np.errstate(invalid="ignore", divide="ignore"):
            frequency = fired / np.maximum(finite_rows, 1)
            mean_abs = abs_sum / np.maximum(finite_rows, 1)
        never_fired = fired == 0
    has_rows = finite_rows > 0
    without_rows = None if has_rows.all() else ~has_rows
    if without_rows is not None:  # what np.where(has_rows, ..., nan / 0) gives, in place
        frequency[without_rows] = np.nan
        mean_abs[without_rows] = 0.0
    known = finite_rows >= per_layer([c.min_rows for c in configs], np.int64)
    # ReDo score: a neuron's mean |a| over its layer's average mean |a| (0 where that is not
    # positive).
    means = _layer_means(mean_abs, has_rows, sizes)
    positive = means > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        dormancy = mean_abs / np.repeat(np.where(positive, means, 1.0), sizes)
    if not positive.all():
        dormancy[np.repeat(~positive, sizes)] = 0.0
    never = known & never_fired
    # Families without a flat region saturate nowhere: their counts are not even joined.
    saturates = np.asarray([c.saturates for c in configs], dtype=bool)
    saturated = (
        known & np.repeat(saturates, sizes) & (chosen("saturated", saturates) == finite_rows)
    )
    # Dead = no gradient on any row: never firing where the family is flat below its threshold,
    # or never firing while stuck in a flat region (saturated, or Hardswish's exact-zero floor).
    no_gradient = per_layer([c.can_die for c in configs], np.bool_) | saturated
    floor = np.asarray([FAMILIES[c.family].zero_floor for c in configs], dtype=bool)
    if floor.any():
        at_zero = (chosen("max", floor) == 0.0) & (chosen("min", floor) == 0.0)
        no_gradient |= np.repeat(floor, sizes) & at_zero
    dead = never & no_gradient
    leaking = never & ~dead
    asleep = known & ~never & (frequency < per_layer([c.asleep_below for c in configs], np.float64))
    active = known & ~never & ~asleep
    dormant = known & (dormancy <= per_layer([c.tau for c in configs], np.float64))
    arrays = {
        "finite_rows": np.asarray(finite_rows, dtype=np.int64),
        "frequency": frequency,
        "mean_abs": mean_abs,
        "dormancy": dormancy,
        "known": known,
        "unknown": ~known,
        "dead": dead,
        "leaking": leaking,
        "asleep": asleep,
        "active": active,
        "dormant": dormant,
        "saturated": saturated,
    }
    for array in arrays.values():
        _readonly(array)
    return JoinedVerdicts(list(configs), list(partials), bounds.tolist(), arrays)


class VerdictCache:
    """The verdicts last judged, handed out again for the very same inputs.

    Verdicts are a pure function of ``(LayerConfig, Partials)``, and both are immutable: a
    window's partials are the same objects from snapshot to snapshot until the window changes
    (the last complete window between rollovers, a layer no hook updated). An exporter that
    re-reads a new snapshot of the same window through one cache judges nothing again.
    Comparing is by identity (``is``), never by value: no array is read to decide.
    """

    def __init__(self) -> None:
        self._last: JoinedVerdicts | None = None

    def judge(self, configs: Sequence[LayerConfig], partials: Sequence[Partials]) -> JoinedVerdicts:
        last = self._last  # one read: another thread may replace it meanwhile
        if (
            last is not None
            and len(last.partials) == len(partials)
            and all(a is b for a, b in zip(last.partials, partials, strict=True))
            and all(a is b for a, b in zip(last.configs, configs, strict=True))
        ):
            return last
        verdicts = judge_joined(configs, partials)
        self._last = verdicts
        return verdicts


def summarize_many(
    configs: Sequence[LayerConfig], partials: Sequence[Partials]
) -> list[LayerStats]:
    """:func:`judge_joined`, one :class:`LayerStats` per layer (read-only views into arrays
    shared by the layers judged together)."""
    return judge_joined(configs, partials).layers()


def active_parameter_ratio(
    wiring: Mapping[str, Wiring], layers: Mapping[str, LayerStats]
) -> float | None:
    """Parameters not attached to a dead neuron over all parameters wired to the layers
    (Synaptic Stripping §III-D); ``None`` when nothing is wired."""
    # Only wired layers count: judging the others (all of a 1,000-layer model on a scrape that
    # exports a few, or a model with no wiring at all) would be wasted work.
    wired = [name for name in wiring if name in layers]
    judged = layers.judge(wired) if isinstance(layers, JudgedLayers) else [layers[n] for n in wired]
    dead = {name: stats.dead for name, stats in zip(wired, judged, strict=True)}
    active, total = active_parameter_counts(wiring, dead)
    return active / total if total else None


class JudgedLayers(Mapping[str, LayerStats]):
    """Layers of one window, judged on first access and then kept: a read-only mapping of
    layer name to :class:`LayerStats`. Safe to share between threads (judging is a pure
    function of immutable inputs; two threads judging one layer at once get equal results)."""

    def __init__(self, configs: Mapping[str, LayerConfig], partials: Mapping[str, Partials]):
        self._configs = configs
        self._partials = dict(partials)
        self._judged: dict[str, LayerStats] = {}

    def partials(self, name: str) -> Partials:
        """The layer's partials without judging it (cheaper when only sums are needed)."""
        return self._partials[name]

    def __getitem__(self, name: str) -> LayerStats:
        stats = self._judged.get(name)
        if stats is None:
            stats = summarize(self._configs[name], self._partials[name])
            self._judged[name] = stats
        return stats

    def judge(self, names: list[str]) -> list[LayerStats]:
        """The stats of ``names``, judging the ones not judged yet in one pass (what an
        exporter reading every layer of a large model wants)."""
        missing = [name for name in dict.fromkeys(names) if name not in self._judged]
        judged = summarize_many(
            [self._configs[name] for name in missing], [self._partials[name] for name in missing]
        )
        for name, stats in zip(missing, judged, strict=True):
            self._judged.setdefault(name, stats)
        return [self._judged[name] for name in names]

    def joined(self, names: list[str], cache: VerdictCache | None = None) -> JoinedVerdicts:
        """``names`` judged together as columns (what an exporter reading many layers wants:
        no per-layer objects), through ``cache`` when given. Not kept here."""
        judge = cache.judge if cache is not None else judge_joined
        return judge(
            [self._configs[name] for name in names], [self._partials[name] for name in names]
        )

    # Iterating every layer's stats judges them all in one pass, not one layer at a time.
    def values(self) -> ValuesView[LayerStats]:
        self.judge(list(self._partials))
        return super().values()

    def items(self) -> ItemsView[str, LayerStats]:
        self.judge(list(self._partials))
        return super().items()

    def __iter__(self) -> Iterator[str]:
        return iter(self._partials)

    def __len__(self) -> int:
        return len(self._partials)

    def __contains__(self, name: object) -> bool:
        return name in self._partials

    def __repr__(self) -> str:
        return f"JudgedLayers({list(self._partials)})"
