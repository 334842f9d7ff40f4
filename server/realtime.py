"""One WebSocket, one `Interact` session (docs/realtime.md).

Text messages are `ClientEvent`s in and `GenerateEvent`s out, in protobuf's canonical JSON
mapping; a chunk's media follows its JSON as binary messages instead of base64. The session
itself is the gRPC servicer's (`VideoGenerationService.interact`): the same validation, the same
messages, the same owner. An error becomes an `error` text message and a close code of 4000 +
its gRPC status code. Losing the connection cancels the session, as breaking a call does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from engine.logs import event
from proto import video_generation_pb2 as pb
from server.auth import Credentials, Denied, common_name, current_principal, is_loopback_host
from server.errors import InvalidRequest, ServiceError, status_of
from server.metrics import Metrics
from server.service import VideoGenerationService

logger = logging.getLogger(__name__)

PROTOCOL = "magistream.v1"  # the subprotocol the server selects
BEARER_PROTOCOL = "magistream.bearer."  # + base64url(token), no padding: a browser's token
CLOSE_OK = 1000
CLOSE_CODE_BASE = 4000  # + the gRPC status code
CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's reason is at most this long
_HOW = (
    "an `Authorization: Bearer TOKEN` header, a `magistream.bearer.<TOKEN in base64url>` "
    "subprotocol (beside `magistream.v1`) or an `access_token=TOKEN` query parameter"
)
# gRPC's refusals name gRPC metadata; a WebSocket carries its token in other places
WS_DENIALS = {
    "missing": f"this server requires credentials: send a bearer token as {_HOW}",
    "invalid_token": f"the bearer token is not valid here; check the token sent as {_HOW}",
}
# Fields whose bytes travel as binary messages after their event's JSON, in this order.
BINARY_FIELDS = {"chunk": ("init_segment", "media_segment"), "frame": ("rgb24",)}


class Realtime:
    """The `/v1/realtime` handler: one call of `handle` per WebSocket connection."""

    def __init__(
        self,
        service: VideoGenerationService,
        credentials: Credentials,
        metrics: Metrics,
        max_message_bytes: int,
    ) -> None:
        self.service = service
        self.credentials = credentials
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes  # the largest start message (base64 media)
        self.streaming = 0  # connections past authentication and not yet ended (WebServer.close)

    async def handle(self, ws: ServerConnection) -> None:
        principal = self._authenticate(ws)
        if isinstance(principal, Denied):
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if principal.forbidden
                else grpc.StatusCode.UNAUTHENTICATED
            )
            self.metrics.auth_failures.labels(principal.reason).inc()
            event(logger, "realtime.unauthenticated", reason=principal.reason)
            await self._end(ws, code, WS_DENIALS.get(principal.reason, principal.message))
            return
        current_principal.set(principal)  # this connection's own task: its own context
        code, message, retry_after_ms = grpc.StatusCode.OK, "", 0
        self.streaming += 1
        try:
            try:
                await self._run(ws)
            except ServiceError as e:
                code, message = status_of(e), str(e)
                retry_after_ms = int(dict(e.trailing_metadata()).get("retry-after-ms", 0))
            except ConnectionClosed:
                code = grpc.StatusCode.CANCELLED
            except Exception as e:  # noqa: BLE001 - a bug: the client still gets a status
                code, message = grpc.StatusCode.INTERNAL, f"internal error: {e}"
                logger.error("unexpected error in the realtime API", exc_info=e)
            await self._end(ws, code, message, retry_after_ms)
        finally:
            self.streaming -= 1

    async def _run(self, ws: ServerConnection) -> None:
        """Stream the session's events until it ends, or until the connection goes (then the
        session is cancelled: the stream's task is cancelled inside the servicer's code)."""
        events = self.service.interact(
            _client_events(ws),
            announce=_nothing,
            why_broken=lambda: ("client disconnected", grpc.StatusCode.CANCELLED),
        )
        pump = asyncio.create_task(_send_all(ws, events), name="realtime-send")
        gone = asyncio.create_task(ws.wait_closed(), name="realtime-closed")
        try:
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not pump.done():
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        if pump.cancelled():
            raise ConnectionClosed(None, None)
        pump.result()  # its error, if any, ends the connection with its status

    async def _end(
        self, ws: ServerConnection, code: grpc.StatusCode, message: str, retry_after_ms: int = 0
    ) -> None:
        """The error message and close code that end a connection; counted by code."""
        self.metrics.realtime_calls.labels(code.name).inc()
        if code == grpc.StatusCode.OK or code == grpc.StatusCode.CANCELLED and not message:
            with contextlib.suppress(ConnectionClosed):
                await ws.close(CLOSE_OK)
            return
        error = {
            "error": {
                "code": code.name,
                "codeNumber": code.value[0],
                "message": message,
                "retryAfterMs": retry_after_ms,
            }
        }
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(error, separators=(",", ":")))
            await ws.close(CLOSE_CODE_BASE + code.value[0], close_reason(message))

    def _authenticate(self, ws: ServerConnection) -> str | Denied:
        request = ws.request
        assert request is not None  # the handler runs after the handshake
        ssl_object = ws.transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        return self.credentials.check_service(
            is_loopback_host(ws.remote_address[0]),
            authorization_of(
                request.headers.get("Authorization"),
                request.headers.get_all("Sec-WebSocket-Protocol"),
                request.path,
            ),
            common_name(cert),
        )


def authorization_of(header: str | None, protocols: list[str], path: str) -> str | None:
    """The `authorization` value a WebSocket carries: its header, else a token in a
    `magistream.bearer.<base64url>` subprotocol, else an `access_token` query parameter."""
    if header:
        return header
    for value in protocols:
        for offered in value.split(","):
            offered = offered.strip()
            if offered.startswith(BEARER_PROTOCOL):
                encoded = offered[len(BEARER_PROTOCOL) :]
                try:
                    padded = encoded + "=" * (-len(encoded) % 4)
                    token = base64.b64decode(padded, altchars=b"-_", validate=True)
                    return "Bearer " + token.decode()
                except (binascii.Error, UnicodeDecodeError):
                    return "Bearer !invalid"  # a token that cannot match: refused as invalid
    tokens = parse_qs(urlsplit(path).query).get("access_token")
    return f"Bearer {tokens[0]}" if tokens else None


def close_reason(message: str) -> str:
    """`message` cut to fit a close frame (123 bytes of UTF-8), on a character boundary."""
    data = message.encode()
    if len(data) <= CLOSE_REASON_BYTES:
        return message
    return data[: CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


async def _nothing(session: object) -> None:
    """The started event names the session; a WebSocket has no header to add."""


async def _client_events(ws: ServerConnection) -> AsyncIterator[pb.ClientEvent]:
    """The client's messages, parsed. The connection closing ends them (there is no half-close:
    the connection's end cancels the session by itself)."""
    try:
        async for message in ws:
            yield parse_client_json(message)
    except ConnectionClosed:
        return


def parse_client_json(message: str | bytes) -> pb.ClientEvent:
    if isinstance(message, bytes):
        raise InvalidRequest(
            "message",
            f"a binary message ({len(message)} bytes) arrived; send each ClientEvent as a text "
            "message in protobuf's JSON mapping (media as base64 in its bytes fields)",
        )
    try:
        return json_format.Parse(message, pb.ClientEvent())
    except json_format.ParseError as e:
        raise InvalidRequest(
            "message",
            f"not a ClientEvent in protobuf's JSON mapping ({e}); send for example "
            '{"start": {"timeline": [{"text": "..."}], "numChunks": 4}}, then '
            '{"prompt": {"text": "..."}} or {"cancel": {}}',
        ) from None


async def _send_all(ws: ServerConnection, events: AsyncIterator[pb.GenerateEvent]) -> None:
    async with contextlib.aclosing(events):
        async for item in events:
            for message in event_messages(item):
                await ws.send(message)  # waits while the client is slow: backpressure


def event_messages(item: pb.GenerateEvent) -> list[str | bytes]:
    """A GenerateEvent's WebSocket messages: its JSON (every field printed, bytes fields left
    out), then those fields' bytes as binary messages, empty ones skipped."""
    kind = item.WhichOneof("event")
    fields = BINARY_FIELDS.get(kind or "", ())
    inner = getattr(item, kind) if kind else None
    blobs = [getattr(inner, name) for name in fields]
    for name in fields:
        inner.ClearField(name)
    data = json_format.MessageToDict(item, always_print_fields_with_no_presence=True)
    for name in fields:
        data[kind].pop(inner.DESCRIPTOR.fields_by_name[name].json_name, None)
    data = _in_field_order(data, item.DESCRIPTOR)
    return [json.dumps(data, separators=(",", ":")), *(b for b in blobs if b)]


def _in_field_order(value: object, descriptor: Descriptor | None) -> object:
    """JSON objects in the .proto's field order (MessageToDict puts zero fields last), so a
    transcript reads like the message definition."""
    if isinstance(value, list):
        return [_in_field_order(v, descriptor) for v in value]
    if not isinstance(value, dict) or descriptor is None:
        return value
    return {
        f.json_name: _in_field_order(value[f.json_name], f.message_type)
        for f in descriptor.fields
        if f.json_name in value
    }
