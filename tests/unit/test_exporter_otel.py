"""The OpenTelemetry exporter, read back through the SDK's in-memory reader."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from exporter_fixtures import FC1_DEAD, planted_monitor

pytest.importorskip("opentelemetry.sdk")

from neuronwatch.exporters import otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from neuronwatch import Engine, Monitor, Snapshot
from neuronwatch.errors import ConfigError
from neuronwatch.metric_families import FAMILIES
from neuronwatch.metric_values import read


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    if data is None:  # nothing observed at all
        return {}
    return {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


def points(metric: Any) -> dict[tuple[tuple[str, Any], ...], float]:
    return {tuple(sorted(p.attributes.items())): p.value for p in metric.data.data_points}


def provider(**options: Any) -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader], **options), reader


def test_every_family_is_an_instrument_with_the_readings_values() -> None:
    monitor = planted_monitor(steps=3, windows=1)
    meters, reader = provider()
    otel.instrument(monitor, meters, labels={"run": "r1"})
    metrics = collect(reader)
    reading = read(monitor.latest)  # type: ignore[arg-type]
    for fam in FAMILIES:
        series = reading.series[fam.name]
        if fam.kind == "gaugehistogram":
            buckets = points(metrics[f"{fam.otel_name}_bucket"])
            for labels, histogram in zip(series.labels, series.values, strict=True):
                base = dict(zip(fam.labels, labels, strict=True)) | {"run": "r1"}
                for le, count in zip(fam.bucket_labels, histogram.buckets, strict=True):
                    assert buckets[tuple(sorted((base | {"le": le}).items()))] == count
            continue
        metric = metrics[fam.otel_name]
        assert metric.unit == fam.otel_unit
        assert metric.description == fam.help
        expected = {
            tuple(
                sorted((dict(zip(fam.labels, labels, strict=True)) | {"run": "r1"}).items())
            ): value
            for labels, value in zip(series.labels, series.values, strict=True)
        }
        assert points(metric) == expected, fam.name
        if fam.kind == "counter":
            assert metric.data.is_monotonic


def test_planted_dead_neurons_arrive_with_their_attributes() -> None:
    meters, reader = provider()
    otel.instrument(planted_monitor(), meters, labels={"rank": 3})
    dead = points(collect(reader)["neuronwatch.dead_neurons"])
    key = (("kind", "post"), ("layer", "fc1.act"), ("model", "mlp"), ("rank", "3"))
    assert dead[key] == len(FC1_DEAD)


class Alternating:
    """A source whose latest snapshot changes on every read: a flush between any two callbacks."""

    def __init__(self, snapshots: list[Snapshot]) -> None:
        self.snapshots = snapshots
        self.reads = 0

    @property
    def latest(self) -> Snapshot:
        self.reads += 1
        return self.snapshots[self.reads % 2]


def test_one_collection_reads_one_snapshot() -> None:
    monitor = planted_monitor(steps=1, windows=0)
    first = monitor.latest
    monitor.step()
    second = monitor.flush()
    assert first is not None
    assert first.step != second.step
    source = Alternating([first, second])
    meters, reader = provider()
    otel.instrument(source, meters)
    for _ in range(3):
        metrics = collect(reader)
        steps = next(iter(points(metrics["neuronwatch.steps"]).values()))
        snapshot = first if steps == first.step else second
        rows = set(points(metrics["neuronwatch.rows_observed"]).values())
        assert rows == {float(snapshot.windows["lifetime"]["fc1.act"].rows)}
    assert source.reads == 3  # one read per collection, by the first instrument


def many_layers(layers: int) -> Monitor:
    engine = Engine("wide", min_rows=1)
    for i in range(layers):
        engine.observe(f"l{i}", np.ones((2, 2)))
    monitor = Monitor(engine)
    monitor.flush()
    return monitor


def test_the_cardinality_limit_is_raised_for_many_layers() -> None:
    monitor = many_layers(300)  # 300 layers x 9 buckets = 2,700 points > the SDK's 2,000
    meters, reader = provider()
    otel.instrument(monitor, meters)
    buckets = collect(reader)["neuronwatch.firing_frequency_ratio_bucket"].data.data_points
    assert any(p.attributes.get("otel.metric.overflow") for p in buckets)  # the default drops

    meters, reader = provider(views=otel.views())
    otel.instrument(monitor, meters)
    buckets = collect(reader)["neuronwatch.firing_frequency_ratio_bucket"].data.data_points
    assert len(buckets) == 300 * 9
    assert not any(p.attributes.get("otel.metric.overflow") for p in buckets)


def test_nothing_is_reported_before_the_first_snapshot_or_after_close() -> None:
    engine = Engine("m")
    monitor = Monitor(engine)
    meters, reader = provider()
    handle = otel.instrument(monitor, meters)
    assert collect(reader) == {}
    engine.observe("act", np.ones((2, 2)))
    monitor.flush()
    assert "neuronwatch.neurons" in collect(reader)
    handle.close()
    assert collect(reader) == {}


def test_a_failing_snapshot_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @property
        def latest(self) -> Snapshot:
            raise RuntimeError("boom")

    meters, reader = provider()
    otel.instrument(Broken(), meters)
    assert collect(reader) == {}
    assert collect(reader) == {}
    # Logged once, not once per instrument and collection.
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "boom" in caplog.text


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="not a snapshot source"):
        otel.instrument(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="window must be one of"):
        otel.instrument(planted_monitor(), window="all")
    with pytest.raises(ConfigError, match="cardinality_limit"):
        otel.views(0)
    with pytest.raises(ConfigError, match="protocol must be"):
        otel.meter_provider(protocol="udp")  # type: ignore[arg-type]
    for interval in (0, float("inf"), float("nan"), "15"):
        with pytest.raises(ConfigError, match=r"interval must be a number of seconds in \(0, "):
            otel.meter_provider(interval=interval)  # type: ignore[arg-type]


def test_meter_provider_sets_the_resource() -> None:
    meters = otel.meter_provider("trainer", instance="node-7:0", protocol="http")
    try:
        attributes = meters._sdk_config.resource.attributes  # no public accessor in the SDK
        assert attributes["service.name"] == "trainer"
        assert attributes["service.instance.id"] == "node-7:0"
    finally:
        meters.shutdown(timeout_millis=1000)


def test_two_monitors_on_one_provider_are_both_exported_and_close_alone() -> None:
    first = planted_monitor(steps=2, windows=1, model="first")
    second = planted_monitor(steps=2, windows=1, model="second")
    meters, reader = provider()
    one = otel.instrument(first, meters)
    otel.instrument(second, meters)
    models = {dict(k)["model"] for k in points(collect(reader)["neuronwatch.neurons"])}
    assert models == {"first", "second"}
    one.close()
    models = {dict(k)["model"] for k in points(collect(reader)["neuronwatch.neurons"])}
    assert models == {"second"}
    third = planted_monitor(steps=2, windows=1, model="third")
    otel.instrument(third, meters)  # a later run on the same provider is exported too
    models = {dict(k)["model"] for k in points(collect(reader)["neuronwatch.neurons"])}
    assert models == {"second", "third"}
