"""Reports: one window of one model, judged, saved as ``report.json`` (summary) + ``report.npz``
(per-neuron arrays), loaded back exactly, merged across shards or runs.

Saving and loading live in :mod:`neuronwatch.report_files`; this module holds the numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._version import __version__
from .errors import MergeError
from .jsonmeta import encode_meta, meta_key, normalize_meta
from .snapshot import Snapshot, steps_silent
from .states import STATES, State
from .stats import FREQUENCY_EDGES, LayerStats, active_parameter_ratio, summarize
from .wiring import Wiring

__all__ = ["SCHEMA_VERSION", "Report"]

SCHEMA_VERSION = 2


@dataclass(frozen=True, eq=False)
class Report:
    """Every monitored layer of one model judged over one window.

    ``meta`` holds JSON-compatible values (numpy scalars and paths are converted; anything
    else raises and names the key). ``==`` compares models, windows, thresholds, partials,
    wiring and meta exactly, so ``Report.load(d) == report`` after ``report.save(d)``.

    >>> report = monitor.report()          # doctest: +SKIP
    >>> report.save("runs/relu")           # doctest: +SKIP
    >>> Report.load("runs/relu").layers["fc1.act"].dead_indices   # doctest: +SKIP
    """

    model: str
    window: str
    step: int
    layers: Mapping[str, LayerStats]
    wiring: Mapping[str, Wiring] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", MappingProxyType(normalize_meta(self.meta)))

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, window: str = "auto", meta: Mapping[str, Any] | None = None
    ) -> Report:
        """The snapshot's ``window`` as a report.

        ``last_fired_step`` is an age, not a count: every layer carries the lifetime value, so
        a report of the last window still tells how long each neuron has been silent.
        """
        name = snapshot.resolve_window(window)
        lifetime = snapshot.windows["lifetime"]
        layers = {
            layer: stats
            if layer not in lifetime or stats is lifetime[layer]
            else summarize(
                stats.config,
                stats.partials.replace(
                    last_fired_step=lifetime[layer].partials.last_fired_step
                ).frozen(),
            )
            for layer, stats in snapshot.windows[name].items()
        }
        return cls(
            model=snapshot.model,
            window=name,
            step=snapshot.step,
            layers=MappingProxyType(layers),
            wiring=snapshot.wiring,
            meta=dict(meta or {}),
        )

    # -- numbers --------------------------------------------------------------------------------

    def count(self, state: str | State) -> int:
        return sum(stats.count(state) for stats in self.layers.values())

    def ratio(self, state: str | State) -> float:
        neurons = self.neurons
        return self.count(state) / neurons if neurons else 0.0

    @property
    def neurons(self) -> int:
        return sum(stats.neurons for stats in self.layers.values())

    def active_parameter_ratio(self) -> float | None:
        return active_parameter_ratio(self.wiring, self.layers)

    def steps_silent(self, layer: str) -> NDArray[np.int64]:
        """Per neuron, steps since it last fired as of this report's step (see Snapshot)."""
        return steps_silent(self.layers[layer].partials.last_fired_step, self.step)

    def silent(self, steps: int) -> dict[str, NDArray[np.intp]]:
        """Indices of the neurons of each layer silent for at least ``steps`` steps."""
        return {name: np.flatnonzero(self.steps_silent(name) >= steps) for name in self.layers}

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary that ``report.json`` holds (without per-neuron arrays);
        non-finite numbers in ``meta`` are tagged (``{"$float": "nan"}``) so it is valid JSON."""
        neurons = self.neurons
        totals: dict[str, Any] = {"layers": len(self.layers), "neurons": neurons}
        for state in STATES:
            totals[state.value] = self.count(state)
            totals[f"{state.value}_ratio"] = self.ratio(state)
        totals["active_parameter_ratio"] = self.active_parameter_ratio()
        return {
            "schema_version": SCHEMA_VERSION,
            "neuronwatch_version": __version__,
            "model": self.model,
            "window": self.window,
            "step": self.step,
            "created": self.created,
            "meta": encode_meta(dict(self.meta)),
            "totals": totals,
            "layers": [self._layer_json(stats) for stats in self.layers.values()],
        }

    def _layer_json(self, stats: LayerStats) -> dict[str, Any]:
        config = stats.config
        wiring = self.wiring.get(stats.name)
        entry: dict[str, Any] = {
            "name": stats.name,
            "kind": stats.kind,
            "activation": config.activation,
            "family": config.family,
            "neurons": stats.neurons,
            "rows": stats.rows,
            "complete": stats.complete,
        }
        for state in STATES:
            entry[state.value] = stats.count(state)
            entry[f"{state.value}_ratio"] = stats.ratio(state)
        entry["nonfinite"] = int(stats.partials.nonfinite.sum())
        entry["dead_indices"] = stats.dead_indices.tolist()
        entry["frequency_distribution"] = {
            "edges": list(FREQUENCY_EDGES),
            "counts": stats.frequency_distribution().tolist(),
        }
        entry["thresholds"] = config.to_json()
        entry["wiring"] = wiring.to_json() if wiring is not None else None
        return entry

    # -- files ----------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` and ``report.npz`` into ``directory`` (created if needed).

        Everything is serialised and checked before anything is replaced, and the JSON (which
        carries the npz's checksum) is renamed into place last: a failed save leaves the
        previous report as it was, and a crash between the two renames is caught by ``load``.
        """
        from .report_files import save_report

        return save_report(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """Load a saved report; every malformed input raises :class:`ReportError` naming the
        file and what is wrong. Verdicts are recomputed from the partials and checked against
        the summary."""
        from .report_files import load_report

        return load_report(Path(directory))

    # -- merging --------------------------------------------------------------------------------

    def merged(self, other: Report) -> Report:
        """Both reports' partials added layer by layer (audit shards, ranks, repeated runs)."""
        if other.model != self.model:
            raise MergeError(f"cannot merge reports of models {self.model!r} and {other.model!r}")
        layers: dict[str, LayerStats] = dict(self.layers)
        for name, stats in other.layers.items():
            mine = layers.get(name)
            if mine is None:
                layers[name] = stats
                continue
            if mine.config != stats.config:
                raise MergeError(f"layer {name!r} has different thresholds in the two reports")
            layers[name] = summarize(mine.config, mine.partials.merged(stats.partials).frozen())
        wiring = dict(self.wiring)
        for name, layer_wiring in other.wiring.items():
            if wiring.setdefault(name, layer_wiring) != layer_wiring:
                raise MergeError(f"layer {name!r} has different wiring in the two reports")
        return Report(
            model=self.model,
            window=self.window if self.window == other.window else "merged",
            step=max(self.step, other.step),
            layers=MappingProxyType(layers),
            wiring=MappingProxyType(wiring),
            meta={**other.meta, **self.meta},
            created=max(self.created, other.created),
        )

    def equals(self, other: Report) -> bool:
        """Same model, window, step, layers, thresholds, partials, wiring and meta."""
        return (
            (self.model, self.window, self.step) == (other.model, other.window, other.step)
            and list(self.layers) == list(other.layers)
            and all(
                mine.config == other.layers[name].config
                and mine.partials.equals(other.layers[name].partials)
                for name, mine in self.layers.items()
            )
            and dict(self.wiring) == dict(other.wiring)
            and meta_key(self.meta) == meta_key(other.meta)
            and (self.created == other.created or math.isclose(self.created, other.created))
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Report) and self.equals(other)

    __hash__ = None  # type: ignore[assignment]  # mutable-looking mappings inside
