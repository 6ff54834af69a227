"""The Prometheus exporter: its fast exposition equals prometheus_client's rendering of the same
collector, scrapes are cached per snapshot, and the WSGI/ASGI apps speak their protocols."""

from __future__ import annotations

import asyncio
import gzip
import logging
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
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

from neuronwatch import Engine, Monitor, Snapshot  # noqa: E402
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


def test_a_live_run_wins_over_a_closed_one_of_the_same_name() -> None:
    old, new = planted_monitor(model="a", windows=3), planted_monitor(model="a", windows=1)
    old.close()
    for sources in ((old, new), (new, old)):
        [reading] = PrometheusExporter(*sources).readings()
        assert reading.snapshot is new.latest
    # Both live: the newest snapshot wins.
    live_old = planted_monitor(model="a", windows=3)
    fresher = planted_monitor(model="a", windows=1)
    [reading] = PrometheusExporter(live_old, fresher).readings()
    assert reading.snapshot is fresher.latest


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
    # A weight of zero refuses: no OpenMetrics, no gzip.
    assert choose_format("application/openmetrics-text;q=0,text/plain;q=1") is False
    status, headers, body = exporter.respond(None, "gzip;q=0, identity")
    assert "Content-Encoding" not in dict(headers)
    assert body == exporter.render(openmetrics=False)
    assert dict(exporter.respond(None, "GZIP;q=0.5")[1])["Content-Encoding"] == "gzip"


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
    for timeout in (0, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match=r"timeout must be a number of seconds in \(0, 36"):
            serve(monitor, port=0, timeout=timeout)
    with pytest.raises(ConfigError, match="addr must name an interface"):
        serve(monitor, port=0, addr=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="does not resolve"):
        serve(monitor, port=0, addr="no-such-host.invalid")
    with pytest.raises(ConfigError, match="max_connections must be a positive integer"):
        serve(monitor, port=0, max_connections=0)
    with pytest.raises(ConfigError, match="to the PrometheusExporter"):
        serve(PrometheusExporter(monitor), port=0, labels={"run": "x"})


def test_an_encrypted_key_is_an_error_not_a_terminal_prompt(
    monitor: Monitor, tmp_path: Path
) -> None:
    # OpenSSL's default is to prompt on the terminal, which hangs a server started from a job.
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key), "-out",
         str(cert), "-days", "1", "-subj", "/CN=localhost", "-passout", "pass:secret"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="is encrypted; decrypt it first"):
        serve(monitor, port=0, certfile=str(cert), keyfile=str(key))


def test_a_busy_port_is_a_one_line_error(monitor: Monitor) -> None:
    with serve(monitor, port=0) as server, pytest.raises(ConfigError, match="cannot listen"):
        serve(monitor, port=server.port)


def test_names_with_lone_surrogates_still_render() -> None:
    # Module names built from undecodable bytes hold lone surrogates; UTF-8 cannot carry them.
    engine = Engine("m\udcff", min_rows=1)
    engine.add_layer("fc\udcfe.act", "ReLU")
    source = Monitor(engine, flush_every=1)
    engine.observe("fc\udcfe.act", np.ones((3, 2)))
    source.step()
    exporter = PrometheusExporter(source)
    for openmetrics in (False, True):
        parsed = families(exporter.render(openmetrics=openmetrics).decode(), openmetrics)
        labels = {dict(pairs)["layer"] for _, pairs in parsed["neuronwatch_neurons"][2]}
        assert labels == {"fc\\udcfe.act"}
    assert reference(exporter, openmetrics=False)  # prometheus_client encodes it too
