"""A small threaded HTTP(S) server for ``/metrics`` that protects the process it runs in.

Why not prometheus_client's ``start_http_server``: it wraps the *listening* socket in TLS, so
the handshake runs in its accept loop, and one client that connects and sends nothing stalls
every later scrape; its handler threads also wait forever on idle connections. Here:

- every connection is served by its own daemon thread under one deadline for the whole
  exchange, TLS handshake included (the handshake happens in that thread): a client that
  drips a byte at a time, or reads the answer a byte at a time, is cut off when it passes;
- at most ``max_connections`` are served at once; further ones are closed at once, so a flood
  costs accept() calls, not threads;
- a malformed request gets the standard library's 400 and is logged at debug level; nothing
  raised while serving ever leaves the server's threads.

The training thread shares nothing with the server but the published snapshot it reads.
"""

from __future__ import annotations

import io
import logging
import socket
import ssl
import threading
import time
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
    context.load_cert_chain(certfile=certfile, keyfile=keyfile, password=_no_passphrase(keyfile))
    return context


def _no_passphrase(keyfile: str) -> Callable[[], bytes]:
    # Without a password callback OpenSSL prompts on the terminal for an encrypted key and a
    # server started from a job would hang there.
    def refuse() -> bytes:
        raise ValueError(
            f"the TLS key {keyfile!r} is encrypted; decrypt it first "
            "(openssl pkey -in KEY -out KEY.plain) and keep it readable by this process only"
        )

    return refuse


class _DeadlineIO(io.RawIOBase):
    """Socket reads and writes that all share one deadline.

    A socket timeout bounds each recv/send alone, so a client sending one byte every few
    seconds would hold a thread for ever; re-arming the timeout with what is left of the
    deadline before every call bounds the whole exchange.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the connection used up its deadline")
        self._sock.settimeout(remaining)

    def readinto(self, buffer: Any) -> int:
        self._arm()
        return self._sock.recv_into(buffer)

    def write(self, data: Any) -> int:
        self._arm()
        return self._sock.send(data)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    default_request_version = "HTTP/1.0"  # errors to unparsable requests get a status line
    server_version = "neuronwatch"
    sys_version = ""

    def setup(self) -> None:
        # One deadline for the whole connection, handshake included (the ssl module bounds a
        # whole handshake by the socket timeout, so arming it with the full budget is enough).
        deadline = time.monotonic() + self.server.timeout_seconds
        self.request.settimeout(self.server.timeout_seconds)
        context = self.server.tls
        if context is not None:
            # In this connection's thread: a silent client stalls nobody else.
            self.request = context.wrap_socket(self.request, server_side=True)
        self.connection = self.request
        raw = _DeadlineIO(self.request, deadline)
        self.rfile = io.BufferedReader(raw)
        self.wfile = io.BufferedWriter(raw)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        try:
            status, headers, content = self.server.respond(
                self.path, self.headers.get("Accept"), self.headers.get("Accept-Encoding")
            )
        except Exception:  # a broken scrape must not take the server down: count it as 500
            log.exception("rendering %s failed", self.path)
            status, headers, content = 500, [("Content-Type", "text/plain")], b"render failed\n"
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)

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
