"""WSGI and ASGI apps serving the exposition inside a web server you already run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from neuronwatch.monitor import SnapshotSource

from .prometheus_exporter import PrometheusExporter, as_exporter

__all__ = ["ASGIApp", "WSGIApp", "make_asgi_app", "make_wsgi_app"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[
    [
        dict[str, Any],
        Callable[[], Awaitable[dict[str, Any]]],
        Callable[[dict[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


def _not_get(method: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = f"{method} is not supported; scrape with GET\n".encode()
    return 405, [("Allow", "GET"), ("Content-Type", "text/plain")], body


def make_wsgi_app(source: SnapshotSource | PrometheusExporter, **options: Any) -> WSGIApp:
    """A WSGI app that serves the metrics on any path it is mounted at (``options``: those of
    :class:`PrometheusExporter`)."""
    exporter = as_exporter(source, options)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method != "GET":
            status, headers, body = _not_get(method)
        else:
            status, headers, body = exporter.respond(
                environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING")
            )
        start_response(
            f"{status} {_REASONS[status]}", [*headers, ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def make_asgi_app(source: SnapshotSource | PrometheusExporter, **options: Any) -> ASGIApp:
    """An ASGI app that serves the metrics on any path it is mounted at."""
    exporter = as_exporter(source, options)

    async def app(
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] != "GET":
            status, headers, body = _not_get(scope["method"])
        else:
            status, headers, body = exporter.respond(
                request.get("accept"), request.get("accept-encoding")
            )
        headers = [*headers, ("Content-Length", str(len(body)))]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
