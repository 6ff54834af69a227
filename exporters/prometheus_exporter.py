"""The Prometheus exporter proper: what a scrape of one or more snapshot sources returns.

:class:`PrometheusExporter` reads each source's latest snapshot, computes its values once
(:func:`neuronwatch.metric_values.read`) and caches the exposition until the next snapshot, so
20 scrapes a second cost one rendering per flush. :class:`NeuronwatchCollector` hands the same
families to a prometheus_client registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from neuronwatch.errors import ConfigError, MissingExtraError
from neuronwatch.metric_families import FAMILIES, validate_labels
from neuronwatch.metric_values import Reading, check_patterns, check_source, read
from neuronwatch.monitor import SnapshotSource
from neuronwatch.snapshot import Snapshot
from neuronwatch.stats import VerdictCache

from .prometheus_text import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    Renderer,
    accepted,
    choose_format,
)

__all__ = ["NeuronwatchCollector", "PrometheusExporter", "as_exporter"]

log = logging.getLogger(__name__)


class PrometheusExporter:
    """Renders the latest snapshot of one or more sources (one per watched model).

    - ``labels``: constant labels on every series (``{"run": "exp-3", "rank": 0}``).
    - ``layers``: globs; only matching layers are exported (``["blocks.*.mlp.act"]``).
    - ``window``: ``auto`` (the last complete window, else lifetime), ``current``, ``last`` or
      ``lifetime``.
    """

    def __init__(
        self,
        *sources: SnapshotSource,
        labels: Mapping[str, object] | None = None,
        layers: Sequence[str] | None = None,
        window: str = "auto",
    ) -> None:
        self.labels = validate_labels(labels)
        self.layers = check_patterns(layers)
        if window not in ("auto", "current", "last", "lifetime"):
            raise ConfigError(
                f"window must be one of 'auto', 'current', 'last', 'lifetime'; got {window!r}"
            )
        self.window = window
        self._sources: list[SnapshotSource] = []
        self._lock = threading.Lock()
        self._readings: dict[int, Reading] = {}
        self._key: tuple[Snapshot, ...] = ()
        self._rendered: dict[tuple[bool, bool], bytes] = {}
        self._renderer = Renderer(self.labels)
        self._verdicts: dict[str, VerdictCache] = {}  # per model: its window's verdicts
        self._duplicates_logged: set[str] = set()
        for source in sources:
            self.add(source)

    def add(self, source: SnapshotSource) -> None:
        """Export one more source (e.g. the next model a script trains)."""
        check_source(source)
        with self._lock:
            self._sources.append(source)

    # -- reading --------------------------------------------------------------------------------

    def _snapshots(self) -> tuple[Snapshot, ...]:
        """Each source's latest snapshot, read once; one per model name: a live source's
        over a closed one's, then the newest (a rerun that reuses a name replaces the old run)."""
        seen: dict[str, tuple[tuple[bool, float], Snapshot]] = {}
        for source in list(self._sources):
            snapshot = source.latest
            if snapshot is None:
                continue
            rank = (not getattr(source, "closed", False), snapshot.taken_at)
            if snapshot.model in seen:
                # Two sources of one model name would give duplicate series: keep one.
                if snapshot.model not in self._duplicates_logged:
                    self._duplicates_logged.add(snapshot.model)
                    log.warning(
                        "two watched models are both called %r; exporting the live or newest "
                        "one only (give each a name: neuronwatch.watch(model, name=...))",
                        snapshot.model,
                    )
                if seen[snapshot.model][0] >= rank:
                    continue
            seen[snapshot.model] = (rank, snapshot)
        return tuple(snapshot for _, snapshot in seen.values())

    def _readings_of(self, snapshots: tuple[Snapshot, ...]) -> list[Reading]:
        readings = []
        by_model = {r.snapshot.model: r for r in self._readings.values()}
        for snapshot in snapshots:
            reading = self._readings.get(id(snapshot))
            if reading is None or reading.snapshot is not snapshot:
                cache = self._verdicts.setdefault(snapshot.model, VerdictCache())
                previous = by_model.get(snapshot.model)
                reading = read(snapshot, self.window, self.layers, cache, previous)
            readings.append(reading)
        # Keep only the current ones: each holds its snapshot, so an id is never reused.
        self._readings = {id(r.snapshot): r for r in readings}
        models = {r.snapshot.model for r in readings}
        self._verdicts = {m: c for m, c in self._verdicts.items() if m in models}
        return readings

    def readings(self) -> list[Reading]:
        """What one scrape exports now, one reading per model."""
        with self._lock:
            return self._readings_of(self._snapshots())

    def render(self, openmetrics: bool = False, compress: bool = False) -> bytes:
        """The exposition of the latest snapshots, rendered once per snapshot and format."""
        with self._lock:  # concurrent scrapes of a new snapshot render it once, not n times
            snapshots = self._snapshots()
            if len(snapshots) != len(self._key) or any(
                a is not b for a, b in zip(snapshots, self._key, strict=True)
            ):
                self._key, self._rendered = snapshots, {}
            return self._body(openmetrics, compress)

    def _body(self, openmetrics: bool, compress: bool) -> bytes:
        body = self._rendered.get((openmetrics, compress))
        if body is None:
            if compress:
                # Family by family: the ~5 MB text of a large model is never held whole just
                # to be compressed, and a family unchanged since the last snapshot is not
                # compressed again.
                body = self._renderer.render_gzip(self._readings_of(self._key), openmetrics)
            else:
                body = self._renderer.render(self._readings_of(self._key), openmetrics)
            self._rendered[(openmetrics, compress)] = body
        return body

    def respond(
        self, accept: str | None, accept_encoding: str | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """HTTP status, headers and body of a scrape with these request headers."""
        openmetrics = choose_format(accept)
        compress = accepted(accept_encoding, "gzip")
        body = self.render(openmetrics, compress)
        headers = [("Content-Type", CONTENT_TYPE_OPENMETRICS if openmetrics else CONTENT_TYPE_TEXT)]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        return 200, headers, body

    def collector(self) -> NeuronwatchCollector:
        """A prometheus_client collector of the same families, for an existing registry."""
        return NeuronwatchCollector(self)


class NeuronwatchCollector:
    """prometheus_client ``Collector``: ``REGISTRY.register(exporter.collector())``."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise MissingExtraError("prometheus_client", "prometheus") from exc
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeHistogramMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        readings = self.exporter.readings()
        constant = list(self.exporter.labels.values())
        for family in FAMILIES:
            points = [
                (labels, value)
                for reading in readings
                for labels, value in zip(
                    reading.series[family.name].labels,
                    reading.series[family.name].values,
                    strict=True,
                )
            ]
            if not points:
                continue
            base = family.labels[: len(family.labels) - len(family.info_labels)]
            names = [*base, *self.exporter.labels]
            metric: Any
            if family.kind == "info":
                metric = InfoMetricFamily(family.name, family.help, labels=names)
                for values, _ in points:
                    info = dict(zip(family.info_labels, values[len(base) :], strict=True))
                    metric.add_metric([*values[: len(base)], *constant], info)
            elif family.kind == "gaugehistogram":
                metric = GaugeHistogramMetricFamily(
                    family.name, family.help, labels=names, unit=family.unit
                )
                for values, value in points:
                    buckets = list(zip(family.bucket_labels, value.buckets, strict=True))
                    metric.add_metric([*values, *constant], buckets, value.gsum)
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(family.name, family.help, labels=names, unit=family.unit)
                for values, value in points:
                    metric.add_metric([*values, *constant], value)
            yield metric


def as_exporter(
    source: SnapshotSource | PrometheusExporter, options: dict[str, Any]
) -> PrometheusExporter:
    """``source`` itself if it is an exporter, else a new exporter of it with ``options``."""
    if isinstance(source, PrometheusExporter):
        if options:
            raise ConfigError(f"pass {sorted(options)} to the PrometheusExporter, not next to it")
        return source
    return PrometheusExporter(source, **options)
