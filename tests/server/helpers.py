"""Small client-side helpers for the end-to-end tests (grpc.aio stubs, decoding checks)."""

from __future__ import annotations

import base64
import io
import json
import ssl
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import grpc
import numpy as np
from google.protobuf import json_format
from websockets.exceptions import ConnectionClosed
from websockets.sync import client as ws_sync
from websockets.sync.client import ClientConnection

from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc

PROMPT = "a red ball rolls"


def request(text: str = PROMPT, chunks: int = 2, size: int = 64, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        timeline=[pb.TimelineEntry(from_chunk=0, text=text)],
        num_chunks=chunks,
        # 0: until cancelled (the servers of these tests start with --allow-unbounded 1)
        unbounded=fields.pop("unbounded", chunks == 0),
        width_px=size,
        height_px=size,
        seed=fields.pop("seed", 1),
        **fields,
    )


def stub(channel: grpc.aio.Channel) -> pb_grpc.VideoGenerationStub:
    return pb_grpc.VideoGenerationStub(channel)


def kinds(events: list[pb.GenerateEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def chunks(events: list[pb.GenerateEvent]) -> list[pb.Chunk]:
    return [e.chunk for e in events if e.WhichOneof("event") == "chunk"]


def fmp4(events: list[pb.GenerateEvent]) -> bytes:
    return b"".join(c.init_segment + c.media_segment for c in chunks(events))


def decode_mp4(data: bytes) -> np.ndarray:
    """Every frame of an MP4, uint8 (T, H, W, 3)."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def ffprobe_frames(path: Path) -> tuple[int, int, int]:
    """(decoded frames, width, height) as ffprobe counts them."""
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=nb_read_frames,width,height",
            "-of",
            "csv=p=0",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    width, height, frames = (int(x) for x in out.split(","))
    return frames, width, height


def encode_image(rgb: np.ndarray, codec: str = "png") -> bytes:
    """PNG (codec png) or JPEG (codec mjpeg) bytes of an RGB image."""
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height = rgb.shape[1], rgb.shape[0]
    ctx.pix_fmt = "rgb24" if codec == "png" else "yuvj420p"
    ctx.time_base = Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    if codec != "png":
        frame = frame.reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """A plain (non-fragmented) H.264 MP4 of uint8 (T, H, W, 3) frames."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "0"}
        for rgb in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


# ---- the WebSocket realtime API (docs/realtime.md) ------------------------------------------


def ws_connect(
    http_address: str,
    token: str | None = None,
    via: str = "protocol",
    tls: ssl.SSLContext | None = None,
    origin: str | None = None,
) -> ClientConnection:
    """A WebSocket to /v1/realtime. `token` goes as a `magistream.bearer.*` subprotocol (as the
    page sends it), an `access_token` query parameter (`via="query"`) or a header
    (`via="header"`)."""
    protocols = ["magistream.v1"]
    headers, query = {}, ""
    if token is not None and via == "protocol":
        encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
        protocols.append(f"magistream.bearer.{encoded}")
    elif token is not None and via == "query":
        query = "?access_token=" + urllib.parse.quote(token)
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    scheme = "wss" if tls else "ws"
    return ws_sync.connect(
        f"{scheme}://{http_address}/v1/realtime{query}",
        subprotocols=protocols,
        additional_headers=headers,
        origin=origin,
        ssl=tls,
        max_size=None,
        open_timeout=20,
    )


@dataclass
class WsEnd:
    """How a realtime connection ended: its events (JSON, with their binary messages), the
    `error` message if one came, and the close code and reason."""

    events: list[dict] = field(default_factory=list)
    blobs: list[list[bytes]] = field(default_factory=list)  # per event, its binary messages
    error: dict | None = None
    close_code: int | None = None
    close_reason: str = ""

    def kinds(self) -> list[str]:
        return [next(iter(e)) for e in self.events]

    def of(self, kind: str) -> list[dict]:
        return [e[kind] for e in self.events if kind in e]

    def mp4(self) -> bytes:
        return b"".join(b"".join(blobs) for blobs in self.blobs)


def ws_next(ws: ClientConnection, end: WsEnd, timeout_s: float = 60.0) -> dict | None:
    """Read one event and the binary messages its sizes announce into `end`; None (and the
    close filled in) when the connection ends."""
    try:
        message = ws.recv(timeout=timeout_s)
        assert isinstance(message, str), f"a binary message where an event was due: {message!r}"
        data = json.loads(message)
        if "error" in data:
            end.error = data["error"]
            ws.recv(timeout=timeout_s)  # the close follows
            raise AssertionError(f"a message after the error: {message}")
        blobs = []
        if "chunk" in data:
            for size in (data["chunk"]["initSegmentSize"], data["chunk"]["mediaSegmentSize"]):
                if size:
                    blob = ws.recv(timeout=timeout_s)
                    assert isinstance(blob, bytes) and len(blob) == size, (len(blob), size)
                    blobs.append(blob)
        end.events.append(data)
        end.blobs.append(blobs)
        return data
    except ConnectionClosed as e:
        end.close_code = e.rcvd.code if e.rcvd else None
        end.close_reason = e.rcvd.reason if e.rcvd else ""
        return None


def ws_until_closed(ws: ClientConnection, end: WsEnd | None = None) -> WsEnd:
    end = end or WsEnd()
    while ws_next(ws, end) is not None:
        pass
    return end


def ws_first(ws: ClientConnection, message: dict | str | bytes) -> WsEnd:
    """Send one message (a dict is sent as JSON) and read until the connection ends."""
    try:
        ws.send(json.dumps(message) if isinstance(message, dict) else message)
    except ConnectionClosed:
        pass  # a refused caller's connection may close first; what it was told is still read
    return ws_until_closed(ws)


def ws_start(request: pb.GenerateRequest) -> dict:
    """A start message from a gRPC request, in the JSON mapping the page uses."""
    return {"start": json_format.MessageToDict(request)}
