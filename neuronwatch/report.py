"""Reports: one window of one model, saved as ``report.json`` (summary) + ``report.npz``
(per-neuron arrays), loaded back exactly, merged across shards or runs."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ._version import __version__
from .atomic import atomic_writer, write_text_atomic
from .config import LayerConfig
from .errors import MergeError, ReportError
from .partials import FIELD_RULES, Partials
from .snapshot import Snapshot
from .stats import FREQUENCY_EDGES, LayerStats, active_parameter_ratio, summarize
from .wiring import Wiring

__all__ = ["SCHEMA_VERSION", "STATES", "Report"]

SCHEMA_VERSION = 1
STATES: tuple[str, ...] = ("dead", "asleep", "active", "dormant", "saturated")
JSON_NAME = "report.json"
NPZ_NAME = "report.npz"
# Derived per-neuron arrays saved beside the partials for users who read the npz directly.
# State masks are named "is_<state>" so that "saturated" (a mask) never collides with the
# partials field "saturated" (a count).
_DERIVED = {
    "frequency": "frequency",
    "mean_abs": "mean_abs",
    "dormancy": "dormancy",
    "known": "is_known",
    **{state: f"is_{state}" for state in STATES},
}


@dataclass(frozen=True)
class Report:
    """Every monitored layer of one model judged over one window.

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

    @classmethod
    def from_snapshot(
        cls, snapshot: Snapshot, window: str = "auto", meta: Mapping[str, Any] | None = None
    ) -> Report:
        name = snapshot.resolve_window(window)
        return cls(
            model=snapshot.model,
            window=name,
            step=snapshot.step,
            layers=snapshot.windows[name],
            wiring=snapshot.wiring,
            meta=MappingProxyType(dict(meta or {})),
        )

    # -- numbers --------------------------------------------------------------------------------

    def count(self, state: str) -> int:
        return sum(stats.count(state) for stats in self.layers.values())

    @property
    def neurons(self) -> int:
        return sum(stats.neurons for stats in self.layers.values())

    def active_parameter_ratio(self) -> float | None:
        return active_parameter_ratio(self.wiring, self.layers)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary that ``report.json`` holds (without per-neuron arrays)."""
        neurons = self.neurons
        totals: dict[str, Any] = {"layers": len(self.layers), "neurons": neurons}
        for state in STATES:
            totals[state] = self.count(state)
            totals[f"{state}_ratio"] = totals[state] / neurons if neurons else 0.0
        totals["active_parameter_ratio"] = self.active_parameter_ratio()
        return {
            "schema_version": SCHEMA_VERSION,
            "neuronwatch_version": __version__,
            "model": self.model,
            "window": self.window,
            "step": self.step,
            "created": self.created,
            "meta": dict(self.meta),
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
            "unknown": stats.neurons - stats.count("known"),
        }
        for state in STATES:
            entry[state] = stats.count(state)
            entry[f"{state}_ratio"] = stats.ratio(state)
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

        Each file is written to a temporary name and renamed, so an interrupted save leaves the
        previous report intact.
        """
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise ReportError(f"{out} exists and is not a directory; pass a directory path")
        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for name, stats in self.layers.items():
            arrays[f"{name}/rows"] = np.asarray(stats.rows, dtype=np.int64)
            for key, array in stats.partials.arrays():
                arrays[f"{name}/{key}"] = array
            for attribute, key in _DERIVED.items():
                arrays[f"{name}/{key}"] = getattr(stats, attribute)

        with atomic_writer(out / NPZ_NAME) as handle:
            np.savez_compressed(handle, **arrays)  # type: ignore[arg-type]  # numpy stub quirk
        write_text_atomic(out / JSON_NAME, json.dumps(self.summary(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Report:
        """Load a saved report; the verdicts are recomputed from the partials and checked
        against the summary, so a hand-edited or mismatched pair of files is caught."""
        where = Path(directory)
        json_path, npz_path = where / JSON_NAME, where / NPZ_NAME
        for path in (json_path, npz_path):
            if not path.is_file():
                raise ReportError(
                    f"{path} not found: a report directory holds {JSON_NAME} and {NPZ_NAME} "
                    "(write one with monitor.report().save(DIR))"
                )
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{json_path} is not valid JSON: {exc}") from exc
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReportError(
                f"{json_path} has schema_version {version!r}; this neuronwatch reads "
                f"{SCHEMA_VERSION} (upgrade neuronwatch to read newer reports)"
            )
        layers: dict[str, LayerStats] = {}
        wiring: dict[str, Wiring] = {}
        with np.load(npz_path) as npz:
            for entry in data["layers"]:
                name = entry["name"]
                try:
                    partials = Partials.from_arrays(
                        rows=int(npz[f"{name}/rows"]),
                        **{key: npz[f"{name}/{key}"] for key in FIELD_RULES},
                    ).frozen()
                except KeyError as exc:
                    raise ReportError(f"{npz_path} lacks arrays of layer {name!r}: {exc}") from exc
                stats = summarize(LayerConfig.from_json(entry["thresholds"]), partials)
                for state in STATES:
                    if stats.count(state) != entry[state]:
                        raise ReportError(
                            f"{where}: layer {name!r} says {entry[state]} {state} neurons in "
                            f"{JSON_NAME} but {stats.count(state)} in {NPZ_NAME}; the two files "
                            "do not belong together"
                        )
                layers[name] = stats
                if entry.get("wiring") is not None:
                    wiring[name] = Wiring.from_json(entry["wiring"])
        return cls(
            model=data["model"],
            window=data["window"],
            step=int(data["step"]),
            layers=MappingProxyType(layers),
            wiring=MappingProxyType(wiring),
            meta=MappingProxyType(dict(data.get("meta", {}))),
            created=float(data["created"]),
        )

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
            meta=MappingProxyType({**other.meta, **self.meta}),
            created=max(self.created, other.created),
        )

    def equals(self, other: Report) -> bool:
        """Same model, window, layers, thresholds, partials and wiring."""
        return (
            (self.model, self.window, self.step) == (other.model, other.window, other.step)
            and self.layers.keys() == other.layers.keys()
            and all(
                mine.config == other.layers[name].config
                and mine.partials.equals(other.layers[name].partials)
                for name, mine in self.layers.items()
            )
            and dict(self.wiring) == dict(other.wiring)
            and math.isclose(self.created, other.created)
        )
