"""OpenTelemetry exporter: every neuronwatch family as an observable instrument.

>>> from neuronwatch.exporters import otel                          # doctest: +SKIP
>>> provider = otel.meter_provider(service_name="trainer", protocol="grpc")
>>> otel.instrument(monitor, meter_provider=provider)               # doctest: +SKIP

:func:`instrument` registers observable instruments on the user's (or the global) MeterProvider;
their callbacks read the source's latest snapshot at collection time, never the live engine.
:func:`meter_provider` builds a provider that ships OTLP over HTTP or gRPC through the standard
exporters, with ``service.name`` and ``service.instance.id`` resource attributes and a
per-stream cardinality limit raised for many-layer models (the SDK drops attribute sets past
2,000 per instrument into an overflow point by default; a 1,000-layer model has 9,000 bucket
points).

Names and units are those of :mod:`neuronwatch.metric_families`, chosen so that the standard
OTLP-to-Prometheus translation lands on the names of the native Prometheus exporter. A
gauge-histogram has no OpenTelemetry instrument: it is exported as three gauges
(``<name>_bucket`` with an ``le`` attribute, ``<name>_gcount``, ``<name>_gsum``) that translate
to exactly the series Prometheus would scrape, so the dashboards work on either path.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from neuronwatch._version import __version__
from neuronwatch.errors import ConfigError, MissingExtraError
from neuronwatch.metric_families import FAMILIES, MetricFamily, validate_labels
from neuronwatch.metric_values import Reading, check_patterns, check_source, read
from neuronwatch.monitor import SnapshotSource
from neuronwatch.stats import VerdictCache

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation
except ImportError as exc:
    raise MissingExtraError("opentelemetry-api", "otel") from exc

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import View

__all__ = [
    "DEFAULT_CARDINALITY_LIMIT",
    "Instrumentation",
    "instrument",
    "meter_provider",
    "views",
]

log = logging.getLogger(__name__)

# Enough for 10,000 layers of the widest family (9 frequency buckets per layer).
DEFAULT_CARDINALITY_LIMIT = 100_000

Callback = Callable[[CallbackOptions], Iterable[Observation]]


class Instrumentation:
    """One monitor's share of the neuronwatch instruments of a MeterProvider; :meth:`close`
    takes it out (the instruments stay: OpenTelemetry cannot unregister them)."""

    def __init__(
        self,
        source: SnapshotSource,
        labels: Mapping[str, str],
        layers: tuple[str, ...] | None,
        window: str,
    ) -> None:
        self.source = source
        self.labels = dict(labels)
        self.layers = layers
        self.window = window
        self.instruments: list[Any] = []
        self.hub: _Hub | None = None
        self._closed = False
        self._failing = False
        self._cache: Reading | None = None
        self._verdicts = VerdictCache()  # a window's verdicts, judged once
        self._pinned = threading.local()

    def close(self) -> None:
        self._closed = True
        hub = self.hub
        if hub is not None:
            hub.remove(self)

    def _reading(self, refresh: bool) -> Reading | None:
        """The reading of this collection. The first instrument's callback (the SDK calls them
        in creation order) pins the latest snapshot for the thread collecting, so every family
        of one collection comes from one snapshot even if a flush publishes a new one
        meanwhile."""
        if self._closed:
            return None
        pinned: Reading | None = getattr(self._pinned, "reading", None)
        if refresh or pinned is None:
            snapshot = self.source.latest
            if snapshot is None:
                pinned = None
            else:
                cache = self._cache
                if cache is None or cache.snapshot is not snapshot:
                    cache = self._cache = read(snapshot, self.window, self.layers, self._verdicts)
                pinned = cache
            self._pinned.reading = pinned
        return pinned

    def _attributes(self, names: Sequence[str], values: Sequence[str]) -> dict[str, str]:
        attributes = dict(zip(names, values, strict=True))
        attributes.update(self.labels)
        return attributes

    def observe(self, family: MetricFamily, part: str, first: bool) -> list[Observation]:
        """This monitor's points of one instrument: ``part`` is ``value`` or, for a
        gauge-histogram, ``bucket``, ``gcount`` or ``gsum``. Never raises."""
        try:
            reading = self._reading(refresh=first)
            observations = (
                [] if reading is None else list(self._observations(reading, family, part))
            )
        except Exception:  # a callback must never raise into the SDK's collection
            if not self._failing:  # once per failure streak, not per instrument
                log.exception("collecting neuronwatch metrics (%s) failed", family.name)
            self._failing = True
            return []
        self._failing = False
        return observations

    def _observations(
        self, reading: Reading, family: MetricFamily, part: str
    ) -> Iterable[Observation]:
        series = reading.series[family.name]
        names = family.labels
        if part == "value":
            for values, value in zip(series.labels, series.values, strict=True):
                yield Observation(value, self._attributes(names, values))
            return
        for values, histogram in zip(series.labels, series.values, strict=True):
            attributes = self._attributes(names, values)
            if part == "bucket":
                for le, count in zip(family.bucket_labels, histogram.buckets, strict=True):
                    yield Observation(count, {**attributes, "le": le})
            else:
                yield Observation(
                    histogram.gcount if part == "gcount" else histogram.gsum, attributes
                )


def instrument(
    monitor: SnapshotSource,
    meter_provider: Any = None,
    *,
    labels: Mapping[str, object] | None = None,
    layers: Sequence[str] | None = None,
    window: str = "auto",
) -> Instrumentation:
    """Register an observable instrument for every family of ``monitor`` on ``meter_provider``
    (default: the global one, ``opentelemetry.metrics.get_meter_provider()``).

    ``labels`` become attributes of every point (``{"run": "exp-3", "rank": 0}``); ``layers``
    keeps the matching layers (globs); ``window`` is ``auto``, ``current``, ``last`` or
    ``lifetime``. Nothing is read until a reader collects.
    """
    check_source(monitor)
    if window not in ("auto", "current", "last", "lifetime"):
        raise ConfigError(
            f"window must be one of 'auto', 'current', 'last', 'lifetime'; got {window!r}"
        )
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    handle = Instrumentation(monitor, validate_labels(labels), check_patterns(layers), window)
    with _HUBS_LOCK:
        hub = _HUBS.get(id(provider))
        if hub is None or hub.provider is not provider:
            hub = _HUBS[id(provider)] = _Hub(provider)
    hub.add(handle)
    handle.instruments = hub.instruments
    return handle


class _Hub:
    """The neuronwatch instruments of one MeterProvider, created once: the SDK hands back the
    first instrument when a name repeats (and drops the new callbacks), so every monitor
    instrumented on a provider shares these, each adding its own points."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self._handles: list[Instrumentation] = []
        self._lock = threading.Lock()
        meter = provider.get_meter("neuronwatch", __version__)
        self.instruments: list[Any] = []
        first = True
        for family in FAMILIES:
            if family.kind == "gaugehistogram":
                for part in ("bucket", "gcount", "gsum"):
                    self.instruments.append(
                        meter.create_observable_gauge(
                            f"{family.otel_name}_{part}",
                            callbacks=[self._callback(family, part, first)],
                            unit="",
                            description=family.help,
                        )
                    )
                    first = False
                continue
            create = (
                meter.create_observable_counter
                if family.kind == "counter"
                else meter.create_observable_gauge
            )
            self.instruments.append(
                create(
                    family.otel_name,
                    callbacks=[self._callback(family, "value", first)],
                    unit=family.otel_unit,
                    description=family.help,
                )
            )
            first = False

    def add(self, handle: Instrumentation) -> None:
        with self._lock:
            self._handles.append(handle)
        handle.hub = self

    def remove(self, handle: Instrumentation) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def _callback(self, family: MetricFamily, part: str, first: bool) -> Callback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            with self._lock:
                handles = list(self._handles)
            return [point for h in handles for point in h.observe(family, part, first)]

        return observe


# One hub per provider, for as long as the provider lives (providers live for the process).
_HUBS: dict[int, _Hub] = {}
_HUBS_LOCK = threading.Lock()


def views(cardinality_limit: int = DEFAULT_CARDINALITY_LIMIT) -> list[View]:
    """SDK views that raise the per-stream cardinality limit of neuronwatch's instruments:
    ``MeterProvider(views=otel.views(), ...)``. Other instruments keep the SDK's defaults."""
    from opentelemetry.sdk.metrics.view import View

    if (
        isinstance(cardinality_limit, bool)
        or not isinstance(cardinality_limit, int)
        or cardinality_limit < 1
    ):
        raise ConfigError(
            f"cardinality_limit must be a positive integer, got {cardinality_limit!r}"
        )
    return [View(instrument_name="neuronwatch.*", aggregation_cardinality_limit=cardinality_limit)]


MAX_INTERVAL = 86_400.0  # a day; the SDK's timer takes milliseconds and cannot sleep for ever


def meter_provider(
    service_name: str = "neuronwatch",
    *,
    instance: str | None = None,
    protocol: Literal["http", "grpc"] = "http",
    endpoint: str | None = None,
    insecure: bool | None = None,
    interval: float = 15.0,
    cardinality_limit: int = DEFAULT_CARDINALITY_LIMIT,
    resource_attributes: Mapping[str, str] | None = None,
) -> MeterProvider:
    """An SDK MeterProvider that exports OTLP every ``interval`` seconds.

    - ``protocol``: ``http`` (``/v1/metrics``, default port 4318) or ``grpc`` (port 4317),
      through ``opentelemetry-exporter-otlp-proto-http`` / ``-grpc``.
    - ``endpoint``: e.g. ``http://collector:4318/v1/metrics`` or ``collector:4317``; ``None``
      reads the standard ``OTEL_EXPORTER_OTLP_*`` environment variables.
    - ``insecure``: gRPC without TLS (the exporter's own default when ``None``).
    - Resource: ``service.name`` and ``service.instance.id`` (``instance``, default
      ``host:pid``), plus ``resource_attributes`` and ``OTEL_RESOURCE_ATTRIBUTES``.

    Call ``provider.shutdown()`` at the end to flush the last export.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise MissingExtraError("opentelemetry-sdk", "otel") from exc
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0 < interval <= MAX_INTERVAL
    ):
        raise ConfigError(
            f"interval must be a number of seconds in (0, {MAX_INTERVAL:g}], got {interval!r}"
        )
    exporter: Any
    if protocol == "http":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError as exc:
            raise MissingExtraError("opentelemetry-exporter-otlp-proto-http", "otel") from exc
        exporter = OTLPMetricExporter(endpoint=endpoint)
    elif protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcExporter,
            )
        except ImportError as exc:
            raise MissingExtraError("opentelemetry-exporter-otlp-proto-grpc", "otel") from exc
        exporter = GrpcExporter(endpoint=endpoint, insecure=insecure)
    else:
        raise ConfigError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    attributes = {
        "service.name": service_name,
        "service.instance.id": instance or f"{socket.gethostname()}:{os.getpid()}",
        **(resource_attributes or {}),
    }
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
    return MeterProvider(
        metric_readers=[reader],
        resource=Resource.create(attributes),
        views=views(cardinality_limit),
    )
