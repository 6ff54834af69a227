"""The exporter's server: loopback by default, TLS that a real Prometheus scrapes, and bad or
abusive clients that never reach the training thread."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_harness import Prometheus, Training, get, self_signed
from neuronwatch.exporters.prometheus import serve


@pytest.fixture
def training() -> Iterator[Training]:
    run = Training(window=20, flush_every=5).start()
    try:
        yield run
    finally:
        run.stop()  # raises if anything reached the training thread


def raw(port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a plain connection; what the server answered before closing."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(payload)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass  # the server hung up on garbage: fine, it answered what it answered
    return b"".join(chunks)


def pace(training: Training, seconds: float) -> float:
    start = time.perf_counter()
    time.sleep(seconds)
    return training.steps_between(start, time.perf_counter()) / seconds


def test_the_server_binds_loopback_unless_told_otherwise(training: Training) -> None:
    with serve(training.monitor, port=0) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert server._server.socket.getsockname()[0] == "127.0.0.1"
        assert "neuronwatch_neurons" in get(server.url)
    with serve(training.monitor, port=0, addr="::1") as server:
        assert server.url.startswith("http://[::1]:")
        assert "neuronwatch_neurons" in get(server.url)


def test_tls_with_a_self_signed_certificate(training: Training, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with serve(training.monitor, port=0, certfile=str(cert), keyfile=str(key)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert "neuronwatch_dead_ratio" in get(server.url, context=trusted)
        # An untrusted certificate is refused by the client; plain HTTP gets no metrics.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(server.url, context=ssl.create_default_context())
        assert b"neuronwatch" not in raw(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")

        # A client that connects and never starts the handshake stalls nobody else (with
        # prometheus_client's start_http_server it blocks every later scrape).
        with socket.create_connection(("127.0.0.1", server.port)):
            started = time.monotonic()
            assert "neuronwatch_neurons" in get(server.url, context=trusted)
            assert time.monotonic() - started < 5

        # A real Prometheus scrapes it over TLS, checking the certificate.
        prometheus = Prometheus(
            tmp_path / "prometheus",
            [f"127.0.0.1:{server.port}"],
            scheme="https",
            ca_file=cert,
        ).start()
        try:
            prometheus.wait_for('up{job="neuronwatch"} == 1')
            assert prometheus.wait_for('neuronwatch_neurons{layer="act2"}')
        finally:
            prometheus.stop()


def test_malformed_requests_get_an_error_and_the_server_goes_on(training: Training) -> None:
    with serve(training.monitor, port=0) as server:
        before = training.steps
        assert raw(server.port, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.0 400")
        assert raw(server.port, b"GET /metrics HTTP/9.9\r\n\r\n").startswith(b"HTTP/1.0 505")
        long_line = b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n"
        assert raw(server.port, long_line).startswith(b"HTTP/1.0 414")
        many_headers = b"GET /metrics HTTP/1.0\r\n" + b"X: y\r\n" * 200 + b"\r\n"
        assert b" 431 " in raw(server.port, many_headers).split(b"\r\n")[0]
        assert raw(server.port, b"POST /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 501")
        assert raw(server.port, b"GET /other HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 404")
        head = raw(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200")
        assert head.endswith(b"\r\n\r\n")  # headers and no body
        assert raw(server.port, bytes(range(256)) * 4)[:8] in (b"HTTP/1.0", b"")
        assert "neuronwatch_neurons" in get(server.url)
        time.sleep(0.5)
        assert training.steps > before  # training went on meanwhile


def test_idle_connections_are_bounded_and_dropped(training: Training) -> None:
    with serve(training.monitor, port=0, timeout=1.0, max_connections=4) as server:
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        try:
            for sock in held:
                sock.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the end of the headers
            time.sleep(0.3)
            # Every slot is taken: one more connection is closed at once, not queued.
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.5) as extra:
                assert extra.recv(1) == b""
            # The silent ones are dropped after the timeout, and scrapes work again.
            time.sleep(1.5)
            for sock in held:
                sock.settimeout(0.5)
                assert sock.recv(65536) == b""
            assert "neuronwatch_neurons" in get(server.url)
        finally:
            for sock in held:
                sock.close()


def test_a_client_that_drips_bytes_is_cut_off_at_the_deadline(training: Training) -> None:
    # Slowloris: one header byte every 0.2 s resets a per-read timeout for ever; the deadline
    # covers the whole connection, so the server hangs up soon after ``timeout`` seconds.
    with serve(training.monitor, port=0, timeout=1.0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n")
            started = time.monotonic()
            cut = None
            while time.monotonic() - started < 8:
                try:
                    sock.sendall(b"X")
                except OSError:
                    cut = time.monotonic() - started
                    break
                sock.settimeout(0.2)
                try:
                    if sock.recv(65536) == b"":
                        cut = time.monotonic() - started
                        break
                except TimeoutError:
                    pass
            assert cut is not None, "the server kept a dripping client for 8 s"
        assert "neuronwatch_neurons" in get(server.url)


# Another process floods, as an attacker would: its own CPU use does not count against the
# training process's GIL. It opens connections as fast as it can, sends half a request on each
# and holds up to 200 at a time; prints how many it opened.
FLOOD = """
import socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
held, opened, end = [], 0, time.monotonic() + seconds
while time.monotonic() < end:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        sock.sendall(b"GET /metrics HTTP/1.0\\r\\n")
        held.append(sock)
        opened += 1
    except OSError:
        pass
    if len(held) >= 200:
        for sock in held:
            sock.close()
        held.clear()
print(opened)
"""


def test_a_flood_of_connections_never_reaches_the_training_thread(training: Training) -> None:
    with serve(training.monitor, port=0, timeout=1.0, max_connections=8) as server:
        quiet = pace(training, 2.0)
        started = time.perf_counter()
        flood = subprocess.run(
            [sys.executable, "-c", FLOOD, str(server.port), "3"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ended = time.perf_counter()
        flooded = training.steps_between(started, ended) / (ended - started)
        opened = int(flood.stdout)
        # The server accepts as fast as the GIL lets its thread run (~100/s next to a training
        # loop); the rest wait in the kernel's backlog, which is the point.
        assert opened > 100
        # Idle connections time out (1 s) and the server serves again.
        time.sleep(1.5)
        assert "neuronwatch_neurons" in get(server.url)
    print(f"steps/s quiet {quiet:.0f}, during a flood of {opened} connections {flooded:.0f}")
    # The training thread keeps stepping; the floor is generous: this is not a timing target.
    assert flooded > 0.3 * quiet
