"""Derived per-neuron statistics of one layer over one window (``docs/vocabulary.md``).

Everything here is a pure function of ``(LayerConfig, Partials)``: the same partials always give
the same verdicts, which is what lets reports be reloaded, merged and re-judged exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from .config import LayerConfig
from .families import FAMILIES
from .partials import Partials
from .states import State, parse_state
from .wiring import Wiring, active_parameter_counts

__all__ = ["FREQUENCY_EDGES", "JudgedLayers", "LayerStats", "summarize", "summarize_many"]

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


def _per_neuron(values: Sequence[float], sizes: NDArray[np.intp]) -> NDArray[Any]:
    """One value per layer repeated over that layer's neurons."""
    return np.repeat(np.asarray(values), sizes)


def summarize_many(
    configs: Sequence[LayerConfig], partials: Sequence[Partials]
) -> list[LayerStats]:
    """Judge many layers at once: the same verdicts as judging each alone, from one numpy pass
    over all their neurons (a 1,000-layer model is judged in a few milliseconds, where one
    pass per layer costs ~40 ms: numpy's fixed cost per call dominates small layers).

    Every array of the result is a read-only view into arrays shared by the layers judged
    together.
    """
    if len(configs) != len(partials):
        raise ValueError(f"{len(configs)} configs for {len(partials)} partials")
    if not configs:
        return []
    sizes = np.asarray([p.neurons for p in partials], dtype=np.intp)
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def joined(field: str) -> NDArray[Any]:
        return np.concatenate([getattr(p, field) for p in partials])

    fired, nonfinite, abs_sum = joined("fired"), joined("nonfinite"), joined("abs_sum")
    finite_rows = _per_neuron([p.rows for p in partials], sizes).astype(np.int64) - nonfinite
    has_rows = finite_rows > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = np.where(has_rows, fired / np.maximum(finite_rows, 1), np.nan)
        mean_abs = np.where(has_rows, abs_sum / np.maximum(finite_rows, 1), 0.0)
    known = finite_rows >= _per_neuron([c.min_rows for c in configs], sizes)
    # ReDo score: a neuron's mean |a| over its layer's average mean |a| (per layer, with
    # numpy's own mean, so a layer judged alone or with others gets the same bits).
    layer_means = []
    for lo, hi in itertools.pairwise(bounds.tolist()):
        values = mean_abs[lo:hi][has_rows[lo:hi]]
        layer_means.append(float(values.mean()) if values.size else 0.0)
    layer_mean = _per_neuron(layer_means, sizes)
    with np.errstate(invalid="ignore", divide="ignore"):
        dormancy = np.where(layer_mean > 0, mean_abs / np.where(layer_mean > 0, layer_mean, 1), 0.0)
    never = known & (fired == 0)
    saturates = _per_neuron([c.saturates for c in configs], sizes).astype(bool)
    saturated = known & saturates & (joined("saturated") == finite_rows)
    # Dead = no gradient on any row: never firing where the family is flat below its threshold,
    # or never firing while stuck in a flat region (saturated, or Hardswish's exact-zero floor).
    can_die = _per_neuron([c.can_die for c in configs], sizes).astype(bool)
    zero_floor = _per_neuron([FAMILIES[c.family].zero_floor for c in configs], sizes)
    no_gradient = can_die | saturated
    no_gradient |= zero_floor.astype(bool) & (joined("max") == 0.0) & (joined("min") == 0.0)
    dead = never & no_gradient
    leaking = never & ~dead
    asleep = known & ~never & (frequency < _per_neuron([c.asleep_below for c in configs], sizes))
    active = known & ~never & ~asleep
    dormant = known & (dormancy <= _per_neuron([c.tau for c in configs], sizes))
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
    return [
        LayerStats(
            config=config,
            partials=part,
            **{name: array[lo:hi] for name, array in arrays.items()},
        )
        for config, part, lo, hi in zip(
            configs, partials, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True
        )
    ]


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
