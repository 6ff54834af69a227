"""The Prometheus exporter: its fast exposition equals prometheus_client's rendering of the same
collector, scrapes are cached per snapshot, and the WSGI/ASGI apps speak their protocols."""

from __future__ import annotations

import asyncio
import gzip
import logging
from typing import Any

import pytest
from exporter_fixtures import planted_monitor

prometheus_client = pytest.importorskip("prometheus_client")

from neuronwatch.exporters.prometheus import (  # noqa: E402
    PrometheusExporter,
    make_asgi_app,
    make_wsgi_app,
    serve,
)
from neuronwatch.exporters.prometheus_text import (  # noqa: E402
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    choose_format,
)
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.openmetrics import exposition as om_exposition  # noqa: E402
from prometheus_client.openmetrics import parser as om_parser  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from neuronwatch import Monitor, Snapshot  # noqa: E402
from neuronwatch.errors import ConfigError  # noqa: E402

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def families(text: str, openmetrics: bool) -> dict[str, Any]:
    """Parsed exposition: {family: (type, unit, {(sample name, sorted labels): value})}."""
    parse = (
        om_parser.text_string_to_metric_families if openmetrics else text_string_to_metric_families
    )
    return {
        f.name: (
            f.type,
            f.unit,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples},
        )
        for f in parse(text)
    }


def reference(exporter: PrometheusExporter, openmetrics: bool) -> str:
    registry = CollectorRegistry()
    registry.register(exporter.collector())
    generate = om_exposition.generate_latest if openmetrics else generate_latest
    return bytes(generate(registry)).decode()


@pytest.fixture
def monitor() -> Monitor:
    return planted_monitor(steps=3, windows=1)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_the_fast_exposition_equals_prometheus_client_rendering(
    monitor: Monitor, openmetrics: bool
) -> None:
    exporter = PrometheusExporter(monitor, labels={"run": 'exp "3"\\a\nb', "rank": 0})
    ours = families(exporter.render(openmetrics).decode(), openmetrics)
    theirs = families(reference(exporter, openmetrics), openmetrics)
    assert ours == theirs
    dead = ours["neuronwatch_dead_neurons"][2]
    key = (
        "neuronwatch_dead_neurons",
        (
            ("kind", "post"),
            ("layer", "fc1.act"),
            ("model", "mlp"),
            ("rank", "0"),
            ("run", 'exp "3"\\a\nb'),
        ),
    )
    assert dead[key] == 3.0


def test_the_exposition_has_the_expected_types_and_samples(monitor: Monitor) -> None:
    text = PrometheusExporter(monitor).render(openmetrics=True).decode()
    assert text.endswith("# EOF\n")
    parsed = families(text, openmetrics=True)
    assert parsed["neuronwatch_rows_observed"][0] == "counter"
    assert parsed["neuronwatch_build"][0] == "info"
    assert parsed["neuronwatch_dead_ratio"][:2] == ("gauge", "ratio")
    histogram = parsed["neuronwatch_firing_frequency_ratio"]
    assert histogram[0] == "gaugehistogram"
    fc1 = (("kind", "post"), ("layer", "fc1.act"), ("model", "mlp"))
    samples = histogram[2]

    def bucket(le: str) -> float:
        labels = (*fc1[:2], ("le", le), fc1[2])
        return float(samples[("neuronwatch_firing_frequency_ratio_bucket", labels)])

    # fc1: three dead neurons never fired (le=0), the asleep one fired on 2 % of rows.
    assert bucket("0.0") == 3
    assert bucket("0.01") == 3
    assert bucket("0.05") == 4
    assert bucket("+Inf") == 8
    assert samples[("neuronwatch_firing_frequency_ratio_gcount", fc1)] == 8


def test_each_snapshot_is_rendered_once_per_format(monitor: Monitor) -> None:
    exporter = PrometheusExporter(monitor)
    first = exporter.render(openmetrics=True)
    assert exporter.render(openmetrics=True) is first  # cached bytes, no new rendering
    assert exporter.render(openmetrics=False) is not first
    monitor.flush()  # a new snapshot
    assert exporter.render(openmetrics=True) is not first


def test_scrapes_read_the_published_snapshot_and_never_flush(monitor: Monitor) -> None:
    published = monitor.latest
    exporter = PrometheusExporter(monitor)
    exporter.render()
    assert monitor.latest is published
    assert exporter.readings()[0].snapshot is published


class Empty:
    latest: Snapshot | None = None


def test_a_source_that_published_nothing_yet_exports_nothing() -> None:
    exporter = PrometheusExporter(Empty())
    assert exporter.render(openmetrics=False) == b""
    assert exporter.render(openmetrics=True) == b"# EOF\n"


def test_several_models_share_one_exposition_and_duplicates_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = planted_monitor(model="a"), planted_monitor(model="b")
    exporter = PrometheusExporter(a, b, planted_monitor(model="a"))
    with caplog.at_level(logging.WARNING):
        parsed = families(exporter.render().decode(), openmetrics=False)
    models = {dict(labels)["model"] for _, labels in parsed["neuronwatch_neurons"][2]}
    assert models == {"a", "b"}
    assert "two watched models are both called 'a'" in caplog.text


def test_the_layer_option_keeps_matching_layers(monitor: Monitor) -> None:
    parsed = families(PrometheusExporter(monitor, layers=["fc*"]).render().decode(), False)
    layers = {dict(labels)["layer"] for _, labels in parsed["neuronwatch_neurons"][2]}
    assert layers == {"fc1.act", "fc2.act"}


def test_respond_negotiates_the_format_and_compression(monitor: Monitor) -> None:
    exporter = PrometheusExporter(monitor)
    status, headers, body = exporter.respond(OPENMETRICS, "gzip, deflate")
    assert status == 200
    assert dict(headers) == {"Content-Type": CONTENT_TYPE_OPENMETRICS, "Content-Encoding": "gzip"}
    assert gzip.decompress(body) == exporter.render(openmetrics=True)
    status, headers, body = exporter.respond(None, None)
    assert dict(headers) == {"Content-Type": CONTENT_TYPE_TEXT}
    assert body == exporter.render(openmetrics=False)
    assert choose_format("text/plain;version=0.0.4") is False


def test_the_wsgi_app(monitor: Monitor) -> None:
    app = make_wsgi_app(monitor, labels={"run": "w"})
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen.update(status=status, headers=dict(headers))

    body = b"".join(app({"REQUEST_METHOD": "GET", "HTTP_ACCEPT": OPENMETRICS}, start_response))
    assert seen["status"] == "200 OK"
    assert seen["headers"]["Content-Length"] == str(len(body))
    assert 'run="w"' in body.decode()
    body = b"".join(app({"REQUEST_METHOD": "POST"}, start_response))
    assert seen["status"] == "405 Method Not Allowed"


def test_the_asgi_app(monitor: Monitor) -> None:
    app = make_asgi_app(monitor)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/metrics",
        "headers": [(b"accept", OPENMETRICS.encode())],
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert (b"content-type", CONTENT_TYPE_OPENMETRICS.encode()) in sent[0]["headers"]
    assert sent[1]["body"] == PrometheusExporter(monitor).render(openmetrics=True)

    lifespan = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent.clear()

    async def next_message() -> dict[str, Any]:
        return next(lifespan)

    asyncio.run(app({"type": "lifespan"}, next_message, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_bad_arguments_name_the_fix(monitor: Monitor) -> None:
    with pytest.raises(ConfigError, match="window must be one of"):
        PrometheusExporter(monitor, window="previous")
    with pytest.raises(ConfigError, match="layers must be a list"):
        PrometheusExporter(monitor, layers="fc*")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not a snapshot source"):
        PrometheusExporter(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="both certfile and keyfile"):
        serve(monitor, port=0, certfile="cert.pem")
    with pytest.raises(ConfigError, match="port must be an integer"):
        serve(monitor, port=70_000)
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        serve(monitor, port=0, certfile="missing.pem", keyfile="missing.key")
    with pytest.raises(ConfigError, match="timeout must be a positive number"):
        serve(monitor, port=0, timeout=0)
    with pytest.raises(ConfigError, match="max_connections must be a positive integer"):
        serve(monitor, port=0, max_connections=0)
    with pytest.raises(ConfigError, match="to the PrometheusExporter"):
        serve(PrometheusExporter(monitor), port=0, labels={"run": "x"})


def test_a_busy_port_is_a_one_line_error(monitor: Monitor) -> None:
    with serve(monitor, port=0) as server, pytest.raises(ConfigError, match="cannot listen"):
        serve(monitor, port=server.port)
