"""OTLP export of a real training run, received by a real collector process (rotel, from PyPI)
over gRPC and over HTTP, read back from the collector's debug output."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from exporter_harness import DEAD_IN_ACT2, Training, free_port

rotel = pytest.importorskip("rotel")
pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from neuronwatch.exporters import otel  # noqa: E402

from neuronwatch.metric_families import FAMILIES  # noqa: E402

AGENT = Path(rotel.__file__).parent / "rotel-agent"


@dataclass
class Point:
    attributes: dict[str, str]
    value: float


@dataclass
class Metric:
    name: str
    unit: str = ""
    kind: str = ""
    monotonic: bool = False
    points: list[Point] = field(default_factory=list)


@dataclass
class Received:
    resource: dict[str, str]
    metrics: dict[str, Metric]


ATTRIBUTE = re.compile(r"^\s*-> ([\w.]+): \w+\((.*)\)$")


def parse(text: str) -> list[Received]:
    """The collector's detailed debug output: one entry per ResourceMetrics."""
    batches: list[Received] = []
    metric: Metric | None = None
    section = ""
    for line in text.splitlines():
        if line.startswith("ResourceMetrics #"):
            batches.append(Received({}, {}))
            section = "resource"
        elif line.startswith("Resource attributes:"):
            section = "resource"
        elif line.startswith("Descriptor:"):
            section = "descriptor"
        elif line.startswith("NumberDataPoints #"):
            assert metric is not None
            metric.points.append(Point({}, float("nan")))
            section = "point"
        elif line.startswith(("ScopeMetrics", "Metric #", "InstrumentationScope")):
            section = ""
        elif line.startswith("Value: ") and metric is not None:
            metric.points[-1].value = float(line.split(": ", 1)[1])
        elif found := ATTRIBUTE.match(line):
            key, value = found[1], found[2]
            if section == "resource":
                batches[-1].resource[key] = value
            elif section == "point" and metric is not None:
                metric.points[-1].attributes[key] = value
        elif line.strip().startswith("-> ") and section == "descriptor":
            key, _, value = line.strip()[3:].partition(": ")
            if key == "Name":
                metric = Metric(value)
                batches[-1].metrics[value] = metric
            elif key == "Unit" and metric is not None:
                metric.unit = value
            elif key == "DataType" and metric is not None:
                metric.kind = value
            elif key == "IsMonotonic" and metric is not None:
                metric.monotonic = value == "true"
    return batches


class Collector:
    """rotel-agent on loopback: OTLP in over gRPC and HTTP, metrics printed to its stdout."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.grpc, self.http = free_port(), free_port()
        self.output = workdir / "collector.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Collector:
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    str(AGENT),
                    "start",
                    "--otlp-grpc-endpoint",
                    f"127.0.0.1:{self.grpc}",
                    "--otlp-http-endpoint",
                    f"127.0.0.1:{self.http}",
                    "--exporter",
                    "blackhole",
                    "--debug-log",
                    "metrics",
                    "--debug-log-verbosity",
                    "detailed",
                    "--pid-file",
                    str(self.workdir / "rotel.pid"),
                    "--log-file",
                    str(self.workdir / "rotel.log"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for port in (self.grpc, self.http):
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert self.process.poll() is None, self.text()
                    assert time.monotonic() < deadline, f"collector not listening: {self.text()}"
                    time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, name: str, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            batches = parse(self.text())
            if any(name in batch.metrics for batch in batches):
                return batches
            assert time.monotonic() < deadline, f"{name} never arrived:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def training() -> Iterator[Training]:
    run = Training().start()
    try:
        yield run
    finally:
        run.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_otlp_export_reaches_a_real_collector(
    protocol: str, training: Training, tmp_path: Path
) -> None:
    collector = Collector(tmp_path).start()
    try:
        endpoint = (
            f"127.0.0.1:{collector.grpc}"
            if protocol == "grpc"
            else f"http://127.0.0.1:{collector.http}/v1/metrics"
        )
        provider = otel.meter_provider(
            "e2e-trainer",
            instance=f"node-1:{protocol}",
            protocol=protocol,  # type: ignore[arg-type]
            endpoint=endpoint,
            insecure=True if protocol == "grpc" else None,
            interval=60,
        )
        otel.instrument(training.monitor, provider, labels={"run": "otel"})
        provider.shutdown()  # exports what the instruments observe now
        batches = collector.wait_for("neuronwatch.dead_neurons")
    finally:
        collector.stop()

    [batch] = [b for b in batches if "neuronwatch.dead_neurons" in b.metrics]
    assert batch.resource["service.name"] == "e2e-trainer"
    assert batch.resource["service.instance.id"] == f"node-1:{protocol}"
    expected = {
        name
        for f in FAMILIES
        for name in (
            [f"{f.otel_name}_{p}" for p in ("bucket", "gcount", "gsum")]
            if f.kind == "gaugehistogram"
            else [f.otel_name]
        )
    }
    assert set(batch.metrics) == expected
    for f in FAMILIES:
        if f.kind in ("gauge", "counter"):
            metric = batch.metrics[f.otel_name]
            assert metric.unit == f.otel_unit
            assert metric.kind == ("Sum" if f.kind == "counter" else "Gauge")
            assert metric.monotonic == (f.kind == "counter")
    [act2] = [
        p
        for p in batch.metrics["neuronwatch.dead_neurons"].points
        if p.attributes["layer"] == "act2"
    ]
    assert act2.attributes == {"model": "e2e-mlp", "layer": "act2", "kind": "post", "run": "otel"}
    assert act2.value >= DEAD_IN_ACT2
    buckets = [
        p
        for p in batch.metrics["neuronwatch.firing_frequency_ratio_bucket"].points
        if p.attributes["layer"] == "act2" and p.attributes["le"] == "0.0"
    ]
    assert [p.value for p in buckets] == [act2.value]  # the never-fired bucket holds the dead
