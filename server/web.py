"""The HTTP port (`--http-port`): the playground page and the WebSocket realtime API.

Browsers cannot speak gRPC, so this port serves them (docs/realtime.md): `GET /` (and the page's
script and style) and `/v1/realtime`, where one WebSocket carries one `Interact` session
(server.realtime). It is built on the `websockets` library, which runs on the same asyncio loop
as the gRPC server: the session code is the servicer's own, called in-process.

Security is the gRPC port's: the same TLS certificate (reloaded at each handshake), the same
callers (server.auth decides), the same protected mode. Two checks are browser-specific:
- a WebSocket from a page of another origin is refused (403): otherwise any site a user visits
  could drive a server on their machine (cross-site WebSocket hijacking);
- in protected mode the Host header must name this machine (localhost or a loopback address),
  so that a DNS-rebinding page whose name resolves to 127.0.0.1 is not "loopback".
"""

from __future__ import annotations

import asyncio
import http
import logging
import mimetypes
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from engine.logs import event
from server.auth import Credentials, is_loopback_host
from server.metrics import Metrics
from server.realtime import PROTOCOL, Realtime

logger = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
PAGE_FOLDER = Path(__file__).resolve().parent / "playground"
# URL path -> file in PAGE_FOLDER; nothing else is served
PAGE_FILES = {
    "/": "index.html",
    "/playground.js": "playground.js",
    "/playground.css": "playground.css",
}
# The page loads nothing from elsewhere and talks only to this origin; a token typed into it
# never leaves in a Referer header.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "media-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class PageFile:
    body: bytes
    content_type: str


def load_page(folder: Path = PAGE_FOLDER) -> dict[str, PageFile]:
    """The page's files, read once at start (a missing file is a broken install)."""
    files = {}
    for path, name in PAGE_FILES.items():
        data = (folder / name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        files[path] = PageFile(data, f"{kind}; charset=utf-8" if kind.startswith("text/") else kind)
    return files


class WebServer:
    """Started by `start()`; `port` is the bound port; `close()` ends every connection."""

    def __init__(
        self,
        realtime: Realtime,
        credentials: Credentials,
        metrics: Metrics,
        allowed_origins: Sequence[str] = (),
    ) -> None:
        self.realtime = realtime
        self.credentials = credentials
        self.metrics = metrics
        self.allowed_origins = frozenset(o.rstrip("/") for o in allowed_origins)
        self.page = load_page()
        self._server: Server | None = None
        self.port = 0

    @property
    def scheme(self) -> str:
        return "https" if self.credentials.ssl_context() is not None else "http"

    async def start(self, host: str, port: int) -> None:
        self._server = await serve(
            self.realtime.handle,
            host,
            port,
            ssl=self.credentials.following_ssl_context(),
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            # video segments do not deflate, and compression would cost CPU per byte sent
            compression=None,
            max_size=self.realtime.max_message_bytes,
            server_header="magistream",
            logger=logging.getLogger("server.web.websockets"),
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 5.0) -> None:
        """Close the port and its connections; realtime connections still ending (a drained
        session's `finished` and error on their way out) get up to `grace_s` first, as the
        gRPC streams do (app._drain)."""
        if self._server is None:
            return
        deadline = time.monotonic() + grace_s
        while self.realtime.streaming and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._server.close(close_connections=True)
        await self._server.wait_closed()

    # ---- plain HTTP ---------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer GETs of the page; let `/v1/realtime` go on to the WebSocket handshake."""
        path = urlsplit(request.path).path
        refusal = self._refusal(connection, request)
        if refusal is not None:
            return refusal
        if path == REALTIME_PATH:
            return None
        page = self.page.get(path)
        if page is None:
            return _text(
                http.HTTPStatus.NOT_FOUND,
                f"not found; the playground is at /, the WebSocket API at {REALTIME_PATH}\n",
            )
        headers = Headers(PAGE_HEADERS)
        headers["Content-Type"] = page.content_type
        headers["Content-Length"] = str(len(page.body))
        return Response(http.HTTPStatus.OK, "OK", headers, page.body)

    def _refusal(self, connection: ServerConnection, request: Request) -> Response | None:
        """A 403 for requests a browser could be tricked into making; None for the others."""
        host_header = request.headers.get("Host", "")
        if self.credentials.protected:
            peer = connection.remote_address[0]
            if not is_loopback_host(peer):
                return self._forbidden(
                    "not_loopback",
                    "this server has no credentials configured and serves loopback clients "
                    "only (protected mode)",
                )
            if not _names_this_machine(host_header):
                return self._forbidden(
                    "host",
                    f"Host {host_header!r} is not this machine: in protected mode open the "
                    "page as http://localhost:PORT/ or http://127.0.0.1:PORT/",
                )
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, host_header):
            return self._forbidden(
                "origin",
                f"Origin {origin!r} is not this server's; a page may open the realtime API only "
                "from this server (the operator may allow more with --http-origins)",
            )
        return None

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return True
        return origin.lower() == f"{self.scheme}://{host_header}".lower()

    def _forbidden(self, reason: str, message: str) -> Response:
        self.metrics.auth_failures.labels(f"http_{reason}").inc()
        event(logger, "http.refused", reason=reason)
        return _text(http.HTTPStatus.FORBIDDEN, message + "\n")


def _text(status: http.HTTPStatus, text: str) -> Response:
    body = text.encode()
    headers = Headers(
        {
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Length": str(len(body)),
            "X-Content-Type-Options": "nosniff",
        }
    )
    return Response(status.value, status.phrase, headers, body)


def _select_subprotocol(connection: ServerConnection, offered: Sequence[str]) -> str | None:
    """`magistream.v1` when offered. A browser that offered subprotocols fails a handshake that
    selects none, so the page offers this one beside its `magistream.bearer.*` token, which is
    never echoed."""
    return PROTOCOL if PROTOCOL in offered else None


def _names_this_machine(host_header: str) -> bool:
    host = urlsplit(f"//{host_header}").hostname or ""
    return host in LOOPBACK_NAMES or is_loopback_host(host)


def page_address(scheme: str, host: str, port: int) -> str:
    """The URL to print: a wildcard bind address is opened as localhost."""
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}/"
