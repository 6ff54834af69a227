"""A small threaded HTTP(S) server for ``/metrics`` that protects the process it runs in.

Why not prometheus_client's ``start_http_server``: it wraps the *listening* socket in TLS, so
the handshake runs in its accept loop, and one client that connects and sends nothing stalls
every later scrape; its handler threads also wait forever on idle connections. Here:

- every connection is served by its own daemon thread with a socket timeout, TLS included
  (the handshake happens in that thread, under the timeout);
- at most ``max_connections`` are served at once; further ones are closed at once, so a flood
  costs accept() calls, not threads;
- a malformed request gets the standard library's 400 and is logged at debug level; nothing
  raised while serving ever leaves the server's threads.

The training thread shares nothing with the server but the published snapshot it reads.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import TCPServer, ThreadingMixIn
from typing import Any

__all__ = ["MetricsServer", "Responder", "tls_context"]

log = logging.getLogger(__name__)

# (path, Accept, Accept-Encoding) -> (HTTP status, headers, body)
Responder = Callable[[str, str | None, str | None], tuple[int, list[tuple[str, str]], bytes]]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 16


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) for ``certfile``/``keyfile``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=certfile, keyfile=keyfile)
    return context


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    default_request_version = "HTTP/1.0"  # errors to unparsable requests get a status line
    server_version = "neuronwatch"
    sys_version = ""

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_seconds)
        context = self.server.tls
        if context is not None:
            # In this connection's thread, under its timeout: a silent client stalls nobody.
            self.request = context.wrap_socket(self.request, server_side=True)
        # The class attribute `timeout` stays None: the socket already has its timeout.
        super().setup()

    def do_GET(self) -> None:
        try:
            status, headers, body = self.server.respond(
                self.path, self.headers.get("Accept"), self.headers.get("Accept-Encoding")
            )
        except Exception:  # a broken scrape must not take the server down: count it as 500
            log.exception("rendering %s failed", self.path)
            status, headers, body = 500, [("Content-Type", "text/plain")], b"render failed\n"
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer(ThreadingMixIn, HTTPServer):
    """Serves ``respond`` on ``(addr, port)`` from daemon threads; see the module docstring.

    ``port=0`` picks a free port (read it from :attr:`port`).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        addr: str,
        port: int,
        respond: Responder,
        *,
        tls: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]
        self.respond = respond
        self.tls = tls
        self.timeout_seconds = timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._thread: threading.Thread | None = None
        host, bound_port = str(infos[0][4][0]), int(infos[0][4][1])
        super().__init__((host, bound_port), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def host(self) -> str:
        return str(self.server_address[0])

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS query) for a name we never use.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.host, self.port

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("dropping a connection from %s: too many at once", client_address)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshakes that fail, clients that hang up: their business, not the user's stderr.
        log.debug("connection from %s failed", client_address, exc_info=True)

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"neuronwatch-metrics:{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close the socket and wait for the accept loop (idempotent)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
