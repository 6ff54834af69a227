"""Prometheus exporter: per-layer liveness at ``/metrics``, read from published snapshots.

>>> from neuronwatch.exporters.prometheus import serve     # doctest: +SKIP
>>> with neuronwatch.watch(model) as monitor, serve(monitor, labels={"run": "exp-3"}):
...     train(model, monitor)                              # doctest: +SKIP

A scrape reads each source's ``latest`` snapshot (:class:`~neuronwatch.SnapshotSource`); it never
flushes, never touches a device and never waits for a training step. What a snapshot exports is
computed once and its exposition cached until the next snapshot (:mod:`.prometheus_exporter`),
so 20 scrapes a second cost one rendering per flush; and the next snapshot of the same window
renders only what moved (the lifetime counters): the window's verdicts, its families' text and
their gzip segments are kept while their inputs are the same objects. The families are those of
:mod:`neuronwatch.metric_families` (``docs/metrics.md``).

- :func:`serve`: a server of its own (loopback by default, TLS with ``certfile``/``keyfile``).
- :func:`make_wsgi_app` / :func:`make_asgi_app`: mount ``/metrics`` in a server you already run.
- :meth:`PrometheusExporter.collector`: a prometheus_client ``Collector`` for a registry you
  already expose (it renders through prometheus_client: fine for small models).
"""

from __future__ import annotations

import errno
import logging
import socket
from types import TracebackType
from typing import Any

from neuronwatch.errors import ConfigError
from neuronwatch.monitor import SnapshotSource

from .prometheus_apps import make_asgi_app, make_wsgi_app
from .prometheus_exporter import NeuronwatchCollector, PrometheusExporter, as_exporter
from .prometheus_server import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT, MetricsServer, tls_context

__all__ = [
    "DEFAULT_PORT",
    "NeuronwatchCollector",
    "PrometheusExporter",
    "PrometheusServer",
    "make_asgi_app",
    "make_wsgi_app",
    "serve",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464  # the port OpenTelemetry's Prometheus exporters default to
MAX_TIMEOUT = 3600.0  # a connection deadline beyond an hour would be no deadline at all


class PrometheusServer:
    """A running ``/metrics`` server: :meth:`stop` it, or use it as a context manager."""

    def __init__(self, server: MetricsServer, exporter: PrometheusExporter) -> None:
        self._server = server
        self.exporter = exporter

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        host = self._server.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self._server.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port (idempotent)."""
        self._server.stop()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve(
    monitor: SnapshotSource | PrometheusExporter,
    port: int = DEFAULT_PORT,
    addr: str = "127.0.0.1",
    certfile: str | None = None,
    keyfile: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    **options: Any,
) -> PrometheusServer:
    """Serve ``monitor``'s metrics at ``http://addr:port/metrics`` from background threads.

    Binds the loopback address unless ``addr`` says otherwise (``"0.0.0.0"`` for every
    interface); ``port=0`` picks a free port (see ``.port``/``.url``). ``certfile`` and
    ``keyfile`` (PEM) switch to HTTPS. ``timeout`` (seconds) drops idle or slow connections;
    at most ``max_connections`` are served at once. ``options``: ``labels``, ``layers``,
    ``window`` of :class:`PrometheusExporter`.
    """
    exporter = as_exporter(monitor, options)
    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both certfile and keyfile (PEM files); got only one")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be an integer in 0-65535 (0: any free port), got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise ConfigError(
            f"addr must name an interface to listen on, got {addr!r}; "
            '"127.0.0.1" (this machine only) or "0.0.0.0" (every interface)'
        )
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise ConfigError(
            f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {timeout!r}; "
            "it bounds how long one scrape may hold a connection"
        )
    if (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or max_connections < 1
    ):
        raise ConfigError(f"max_connections must be a positive integer, got {max_connections!r}")
    tls = None
    if certfile is not None and keyfile is not None:
        try:
            tls = tls_context(certfile, keyfile)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"cannot load TLS certificate {certfile!r} / key {keyfile!r}: {exc}; "
                "pass PEM files (e.g. from openssl req -x509 -newkey rsa:2048 -nodes ...)"
            ) from exc

    def respond(
        path: str, accept: str | None, encoding: str | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if path.split("?", 1)[0] not in ("/metrics", "/"):
            return 404, [("Content-Type", "text/plain")], b"neuronwatch serves /metrics\n"
        return exporter.respond(accept, encoding)

    try:
        server = MetricsServer(
            addr, port, respond, tls=tls, timeout=timeout, max_connections=max_connections
        )
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot listen on {addr}:{port}: {addr!r} does not resolve ({exc.strerror or exc}); "
            'pass an interface address such as "127.0.0.1" or "0.0.0.0"'
        ) from exc
    except OSError as exc:
        hint = (
            "pick another port (port=0 takes any free one)"
            if exc.errno in (errno.EADDRINUSE, errno.EACCES)
            else "pass an address of this machine"
        )
        raise ConfigError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}; {hint}") from exc
    handle = PrometheusServer(server.start(), exporter)
    log.info("serving neuronwatch metrics at %s", handle.url)
    return handle
