"""The Prometheus endpoint, with the same transport security and callers as the gRPC port.

prometheus_client's own server cannot check a bearer token or apply protected mode, so this is
a small threading HTTP server around its exposition: `GET /metrics` (and `/`), TLS from
`Credentials.ssl_context()` taken at each connection (a reloaded certificate applies to the next
scrape), the caller decided by `Credentials.check_http` (401 with the reason otherwise).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from engine.logs import event
from server.auth import Credentials, Denied
from server.metrics import Metrics

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0  # a client that opens a socket and says nothing is dropped


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    credentials: Credentials
    registry: CollectorRegistry
    metrics: Metrics

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        """The TLS handshake runs here, in the connection's thread, not in the accept loop."""
        context = self.credentials.ssl_context()
        if context is not None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT_S)
                request = context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ssl.SSLError) as e:
                event(logger, "metrics.tls_failed", level=logging.DEBUG, error=str(e))
                self.metrics.auth_failures.labels("tls_handshake").inc()
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._reply(404, b"not found; scrape /metrics\n", "text/plain")
            return
        cert = self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        decision = self.server.credentials.check_http(
            self.client_address[0], self.headers.get("Authorization"), cert
        )
        if isinstance(decision, Denied):
            self.server.metrics.auth_failures.labels(decision.reason).inc()
            code = 403 if decision.forbidden else 401
            self._reply(code, (decision.message + "\n").encode(), "text/plain")
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        self._reply(200, encoder(self.server.registry), content_type)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if code == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="magistream metrics"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # scrapes are not worth a log line each


class MetricsServer:
    """Started on construction; `port` is the bound port; `shutdown()` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        metrics: Metrics,
        credentials: Credentials,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsHTTPServer", (_Server,), {"address_family": family})
        self._server = server_class((host, port), _Handler)
        self._server.credentials, self._server.registry = credentials, registry
        self._server.metrics = metrics
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
