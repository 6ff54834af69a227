"""Derived per-neuron statistics of one layer over one window (``docs/vocabulary.md``).

Everything here is a pure function of ``(LayerConfig, Partials)``: the same partials always give
the same verdicts, which is what lets reports be reloaded, merged and re-judged exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from .config import LayerConfig
from .families import FAMILIES
from .partials import Partials
from .states import State, parse_state
from .wiring import Wiring, active_parameter_counts

__all__ = ["FREQUENCY_EDGES", "JudgedLayers", "LayerStats", "summarize"]

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
    finite_rows = partials.rows - partials.nonfinite
    has_rows = finite_rows > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        frequency = np.where(has_rows, partials.fired / np.maximum(finite_rows, 1), np.nan)
        mean_abs = np.where(has_rows, partials.abs_sum / np.maximum(finite_rows, 1), 0.0)
    known = finite_rows >= config.min_rows
    # ReDo score: a neuron's mean |a| over the layer's average mean |a|.
    layer_mean = float(mean_abs[has_rows].mean()) if has_rows.any() else 0.0
    dormancy = mean_abs / layer_mean if layer_mean > 0 else np.zeros_like(mean_abs)
    never = known & (partials.fired == 0)
    if config.saturates:
        saturated = known & (partials.saturated == finite_rows)
    else:
        saturated = np.zeros_like(known)
    # Dead = no gradient on any row: never firing where the family is flat below its threshold,
    # or never firing while stuck in a flat region (saturated, or Hardswish's exact-zero floor).
    no_gradient = saturated.copy() if not config.can_die else np.ones_like(never)
    if FAMILIES[config.family].zero_floor:
        no_gradient |= (partials.max == 0.0) & (partials.min == 0.0)
    dead = never & no_gradient
    leaking = never & ~dead
    asleep = known & ~never & (frequency < config.asleep_below)
    active = known & ~never & ~asleep
    dormant = known & (dormancy <= config.tau)
    return LayerStats(
        config=config,
        partials=partials,
        finite_rows=_readonly(np.asarray(finite_rows, dtype=np.int64)),
        frequency=_readonly(frequency),
        mean_abs=_readonly(mean_abs),
        dormancy=_readonly(dormancy),
        known=_readonly(known),
        unknown=_readonly(~known),
        dead=_readonly(dead),
        leaking=_readonly(leaking),
        asleep=_readonly(asleep),
        active=_readonly(active),
        dormant=_readonly(dormant),
        saturated=_readonly(saturated),
    )


def active_parameter_ratio(
    wiring: Mapping[str, Wiring], layers: Mapping[str, LayerStats]
) -> float | None:
    """Parameters not attached to a dead neuron over all parameters wired to the layers
    (Synaptic Stripping §III-D); ``None`` when nothing is wired."""
    dead = {name: stats.dead for name, stats in layers.items()}
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

    def __iter__(self) -> Iterator[str]:
        return iter(self._partials)

    def __len__(self) -> int:
        return len(self._partials)

    def __contains__(self, name: object) -> bool:
        return name in self._partials

    def __repr__(self) -> str:
        return f"JudgedLayers({list(self._partials)})"
