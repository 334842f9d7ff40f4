"""A scripted grpc.aio VideoGeneration servicer on loopback, for client-behaviour tests.

It runs on its own event loop in a thread, so sync clients, async clients (on pytest's loop)
and CLI subprocesses can all talk to it. Chunks carry real fMP4 made by the client's own
encoder from synthetic frames, so what the CLI writes can be checked with ffprobe.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field

import grpc

from client.events import ChunkEvent
from client.writers import _encode_chunk, _init_length
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc

SESSION = "fake-1"
FPS = 24
FRAMES = 24


def frames(chunk: int, width: int, height: int) -> tuple[bytes, ...]:
    """Synthetic RGB24 frames: a flat colour per chunk and frame, so each is recognisable."""
    return tuple(
        bytes([(40 * chunk) % 256, (8 * k) % 256, 128]) * (width * height) for k in range(FRAMES)
    )


def fmp4_segments(chunk: int, width: int, height: int) -> tuple[bytes, bytes]:
    raw = ChunkEvent(
        chunk,
        chunk * FRAMES,
        FRAMES,
        width,
        height,
        FPS,
        "",
        1,
        pb.ChunkTimings(),
        frames=frames(chunk, width, height),
    )
    data = _encode_chunk(raw, crf=30, preset="ultrafast")
    cut = _init_length(data)
    return data[:cut], data[cut:]


@dataclass
class Script:
    """What the fake does; tests change it between calls."""

    unavailable_first: int = 0  # StreamGenerate / Interact calls refused with UNAVAILABLE
    refuse: tuple[grpc.StatusCode, str] | None = None  # every stream refused with this
    break_after_started: bool = False  # UNAVAILABLE right after `started`
    # what the stream opens with: "started" (the protocol), "nothing" (ends OK at once) or
    # "chunk" (a chunk where `started` belongs, then ends OK)
    opening: str = "started"
    chunk_delay_s: float = 0.0  # pause before each chunk
    hold_after_chunks: int | None = None  # stop sending after this many chunks, until cancelled
    calls: Counter = field(default_factory=Counter)  # RPC name -> calls received
    broken: int = 0  # streams the client broke (cancelled, closed) before they ended
    cancelled: list[str] = field(default_factory=list)  # CancelSession session ids
    metadata: list[dict] = field(default_factory=list)  # each stream call's metadata
    requests: list[pb.GenerateRequest] = field(default_factory=list)


class FakeService(pb_grpc.VideoGenerationServicer):
    def __init__(self, script: Script) -> None:
        self.script = script
        self._cancel = asyncio.Event()

    async def StreamGenerate(self, request, context):
        try:
            async for event in self._session("StreamGenerate", request, context):
                yield event
        except (asyncio.CancelledError, GeneratorExit):  # at an await, or at a yield
            self.script.broken += 1
            raise

    async def Interact(self, request_iterator, context):
        first = await anext(aiter(request_iterator))
        try:
            async for event in self._session("Interact", first.start, context):
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.script.broken += 1
            raise

    async def _session(self, name, request, context):
        s = self.script
        s.calls[name] += 1
        s.metadata.append(dict(context.invocation_metadata()))
        s.requests.append(request)
        if s.calls[name] <= s.unavailable_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker restarting")
        if s.refuse is not None:
            await context.abort(*s.refuse)
        await context.send_initial_metadata((("x-session-id", SESSION),))
        width, height = request.width_px or 64, request.height_px or 64
        if s.opening == "nothing":
            return
        if s.opening == "chunk":
            yield next(chunk_events(request, 0, width, height))
            return
        yield pb.GenerateEvent(
            started=pb.SessionStarted(
                session_id=SESSION,
                params=pb.SessionParams(
                    model="fake",
                    num_chunks=request.num_chunks,
                    width_px=width,
                    height_px=height,
                    fps=FPS,
                    frames_per_chunk=FRAMES,
                    seed=7,
                    output_encoding=request.output_encoding,
                ),
            )
        )
        if s.break_after_started:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker died")
        for chunk in range(request.num_chunks):
            if s.hold_after_chunks is not None and chunk >= s.hold_after_chunks:
                await self._cancel.wait()
                break
            await asyncio.sleep(s.chunk_delay_s)
            for event in chunk_events(request, chunk, width, height):
                yield event
        state = pb.SESSION_STATE_CANCELLED if self._cancel.is_set() else pb.SESSION_STATE_FINISHED
        yield pb.GenerateEvent(finished=pb.SessionFinished(state=state))

    async def CancelSession(self, request, context):
        self.script.calls["CancelSession"] += 1
        self.script.cancelled.append(request.session_id)
        self._cancel.set()
        return pb.CancelSessionResponse(state=pb.SESSION_STATE_CANCELLED)

    async def ListModels(self, request, context):
        self.script.calls["ListModels"] += 1
        if self.script.calls["ListModels"] <= self.script.unavailable_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "starting")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="fake")], default_model="fake")

    async def GetSession(self, request, context):
        self.script.calls["GetSession"] += 1
        await context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r} is unknown")


def chunk_events(request: pb.GenerateRequest, chunk: int, width: int, height: int):
    prompt = max((e for e in request.timeline if e.from_chunk <= chunk), key=lambda e: e.from_chunk)
    header = pb.Chunk(
        chunk_index=chunk,
        first_frame_index=chunk * FRAMES,
        frame_count=FRAMES,
        width_px=width,
        height_px=height,
        fps=FPS,
        prompt_text=prompt.text,
        prompt_version=list(request.timeline).index(prompt) + 1,
    )
    if request.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24:
        yield pb.GenerateEvent(chunk=header)
        for k, rgb in enumerate(frames(chunk, width, height)):
            yield pb.GenerateEvent(
                frame=pb.RawFrame(
                    chunk_index=chunk,
                    frame_index=chunk * FRAMES + k,
                    last_in_chunk=k == FRAMES - 1,
                    rgb24=rgb,
                )
            )
        return
    init, media = fmp4_segments(chunk, width, height)
    header.media_segment = media
    if chunk == 0:
        header.init_segment = init
    yield pb.GenerateEvent(chunk=header)


class FakeServer:
    """`with FakeServer(script) as target:` serves the script on 127.0.0.1 until the block
    ends."""

    def __init__(
        self, script: Script | None = None, credentials: grpc.ServerCredentials | None = None
    ) -> None:
        self.script = script or Script()
        self.credentials = credentials  # None = plaintext
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None

    def __enter__(self) -> str:
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return f"127.0.0.1:{port}"

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        pb_grpc.add_VideoGenerationServicer_to_server(FakeService(self.script), self._server)
        if self.credentials is None:
            port = self._server.add_insecure_port("127.0.0.1:0")
        else:
            port = self._server.add_secure_port("127.0.0.1:0", self.credentials)
        await self._server.start()
        return port

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
