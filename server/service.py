"""The VideoGeneration servicer: one async function per RPC, read top to bottom.

Streams go: validate, open, yield, free. A client that disconnects or whose deadline passes
arrives as CancelledError (or, if it happens while gRPC is sending, as the generator being
closed): the session is cancelled and the worker frees it within one step, or, when the request
set a detach grace, detached until Attach streams it again (server/sessions.py).
Errors are raised as server.errors exceptions; server.interceptors maps them to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import numpy as np

from engine import ipc
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from scheduler.session import SessionParams, SessionState
from server import convert
from server.auth import current_principal
from server.config import Limits
from server.encode import VideoEncoding, encode_fmp4_chunk, split_raw_frames
from server.errors import InvalidRequest, ServiceError, SessionFailed
from server.interact import ClientReader
from server.interceptors import deadline_passed
from server.metrics import Metrics
from server.pools import BoundedPool
from server.sessions import KeptChunk, LiveSession, SessionEnd, SessionManager
from server.validation import (
    ServedModel,
    decode_inputs,
    parse_attach,
    parse_cancel,
    parse_client_event,
    parse_detach_grace,
    parse_generate,
    parse_get_session,
    parse_prompt_update,
    parse_snapshot,
)

SESSION_ID_HEADER = "x-session-id"


class VideoGenerationService(pb_grpc.VideoGenerationServicer):
    def __init__(
        self,
        sessions: SessionManager,
        model: ServedModel,
        limits: Limits,
        encoding: VideoEncoding,
        decode_pool: BoundedPool,
        encode_pool: BoundedPool,
        metrics: Metrics,
    ) -> None:
        self.sessions = sessions
        self.model = model
        self.limits = limits
        self.encoding = encoding
        self.decode_pool, self.encode_pool = decode_pool, encode_pool
        self.metrics = metrics

    async def StreamGenerate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        grace = parse_detach_grace(request, self.limits)
        session = await self._open(parse_generate(request, self.model, self.limits), grace)
        del request  # decoded: its bytes are not held while the session streams
        with self._released_if_broken(session, lambda: _why_broken(context)):
            await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))
            async for item in self._events(session):
                yield item

    async def Interact(
        self, request_iterator: AsyncIterator[pb.ClientEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async def announce(session: LiveSession) -> None:
            await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))

        async for item in self.interact(request_iterator, announce, lambda: _why_broken(context)):
            yield item

    async def interact(
        self,
        requests: AsyncIterator[pb.ClientEvent],
        announce: Callable[[LiveSession], Awaitable[None]],
        why_broken: Callable[[], tuple[str, grpc.StatusCode]],
    ) -> AsyncIterator[pb.GenerateEvent]:
        """One Interact session, whatever carries it (gRPC here, a WebSocket in
        server.realtime): `announce` runs once the session is open, `why_broken` says why the
        carrier stopped early. The caller is `current_principal`."""
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None:
            raise InvalidRequest("event", "the stream closed before its start event")
        parse_client_event(first, first=True)
        grace = parse_detach_grace(first.start, self.limits)
        session = await self._open(parse_generate(first.start, self.model, self.limits), grace)
        del first  # decoded: its bytes are not held while the session streams
        await announce(session)
        reader = ClientReader(session, self.sessions, self.limits)
        reader.start(requests)
        try:
            with self._released_if_broken(session, why_broken):
                async for item in self._events(session):
                    if item.WhichOneof("event") == "finished" and session.end.resume:
                        # saved for the client to resume (a drain): a prompt not answered by
                        # now gets no ack here; the client pushes it again on the resumed
                        # call unless the snapshot's timeline holds it
                        reader.stop()
                    elif item.WhichOneof("event") == "finished":
                        # every prompt read so far is answered before the end
                        for ack in await reader.close():
                            yield pb.GenerateEvent(prompt_ack=ack)
                    yield item
                    if item.WhichOneof("event") == "prompt_ack":
                        reader.sent()
        finally:
            reader.stop()

    async def Attach(
        self, request: pb.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        session_id, from_chunk = parse_attach(request)
        session, kept = self.sessions.attach(session_id, from_chunk, current_principal.get())
        with self._released_if_broken(session, lambda: _why_broken(context)):
            await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))
            async for item in self._events(session, kept):
                yield item

    async def SnapshotSession(
        self, request: pb.SnapshotRequest, context: grpc.aio.ServicerContext
    ) -> pb.SnapshotResponse:
        session_id = parse_snapshot(request)
        token, from_chunk, size = await self.sessions.snapshot(session_id, current_principal.get())
        return pb.SnapshotResponse(token=token, from_chunk=from_chunk, size_bytes=size)

    async def UpdatePrompt(
        self, request: pb.PromptUpdate, context: grpc.aio.ServicerContext
    ) -> pb.PromptAck:
        spec = parse_prompt_update(request, self.limits)
        session = self.sessions.visible(spec.session_id, current_principal.get())
        spec = dataclasses.replace(spec, session_id=session.id)
        applied = await self.sessions.update_prompt(spec, session.owner)
        return convert.prompt_ack(applied, session.id)

    async def CancelSession(
        self, request: pb.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelSessionResponse:
        session = self.sessions.visible(parse_cancel(request), current_principal.get())
        state = self.sessions.cancel(session, "cancelled by CancelSession")
        return pb.CancelSessionResponse(state=convert.STATES[state])

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        session = self.sessions.visible(parse_get_session(request), current_principal.get())
        return convert.session_info(session, self.model)

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        listed = self.sessions.listed(current_principal.get())
        return pb.ListSessionsResponse(
            sessions=[convert.session_info(s, self.model) for s in listed]
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info(self.model, self.limits)], default_model=self.model.name
        )

    # ---- shared by both streams -----------------------------------------------------------

    @contextlib.contextmanager
    def _released_if_broken(
        self, session: LiveSession, why_broken: Callable[[], tuple[str, grpc.StatusCode]]
    ) -> Iterator[None]:
        """Around a call's event stream: a cancelled, disconnected or failed call frees its
        session (and says why) before the error goes on; a broken one with a detach grace
        detaches it instead."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            self.sessions.release(session, *why_broken(), detach=True)
            raise
        except Exception as e:
            self.sessions.release(session, f"its call failed: {e}")
            raise
        self.sessions.release(session, "its call ended")  # ended: nothing more is kept

    async def _open(self, params: SessionParams, detach_grace_s: float) -> LiveSession:
        """Wait for the caller's own session limit, decode the inputs off the event loop, then
        hand the session, owned by the caller, to the worker."""
        owner = current_principal.get()
        slot = await self.sessions.quota.acquire(owner)
        try:
            image = video = None
            if params.image is not None or params.video is not None:  # t2v: nothing to decode
                image, video = await self.decode_pool.run(
                    decode_inputs, params, self.model, self.limits
                )
            # the encoded bytes go here, before the wait for the worker
            params = dataclasses.replace(params, image=image, video=video)
            session = await self.sessions.open(params, owner, slot)
        except BaseException:
            slot.release()  # no session holds it (a session that ended released it already)
            raise
        session.detach_grace_s = detach_grace_s
        return session

    async def _events(
        self, session: LiveSession, kept: list[KeptChunk] | None = None
    ) -> AsyncIterator[pb.GenerateEvent]:
        """started, then (on Attach) the `kept` chunks again, then each chunk as it comes
        (encoded in the pool), then finished."""
        yield convert.started(session, self.model)
        first_chunk = True
        for chunk in kept or ():
            for message in _with_init(chunk.messages, session.kept.init_segment, first_chunk):
                yield message
            first_chunk = False
        if session.unacked is not None:  # the broken call's last chunk has now gone out
            self.sessions.chunk_streamed(session, session.unacked)
        while True:
            item = await session.next_event()
            if isinstance(item, ipc.ChunkReady):
                try:
                    messages = await self._encode(session, item, first_chunk)
                except asyncio.CancelledError:  # the call broke while the chunk was encoded:
                    session.put_back(item)  # an Attach within the grace sends it
                    raise
                self.sessions.chunk_taken(session, item, messages)
                for message in messages:
                    yield message
                first_chunk = False
                self.sessions.chunk_streamed(session, item)
            elif isinstance(item, pb.PromptAck):
                yield pb.GenerateEvent(prompt_ack=item)
            elif isinstance(item, ServiceError):  # Interact: the client broke the protocol
                raise item
            elif isinstance(item, SessionEnd):
                yield convert.finished(session)
                if item.state == SessionState.FAILED:
                    raise SessionFailed(item.code, item.message, item.resume)
                return

    async def _encode(
        self, session: LiveSession, chunk: ipc.ChunkReady, first: bool
    ) -> list[pb.GenerateEvent]:
        raw = session.spec.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
        messages, seconds = await self.encode_pool.run(
            _encode_chunk, chunk, raw, first, self.model.fps, self.encoding
        )
        self.metrics.encode.labels("raw_rgb24" if raw else "fmp4_h264").observe(seconds)
        return messages


def _encode_chunk(
    chunk: ipc.ChunkReady, raw: bool, first: bool, fps: int, settings: VideoEncoding
) -> tuple[list[pb.GenerateEvent], float]:
    """Runs in the encode pool: the chunk's wire messages and the time it took."""
    t0 = time.perf_counter()
    if raw:
        frames = split_raw_frames(chunk.frames, chunk.frame_count)
        ms = (time.perf_counter() - t0) * 1e3
        return [convert.chunk(chunk, fps, ms), *convert.raw_frames(chunk, frames)], ms / 1e3
    pixels = np.frombuffer(chunk.frames, np.uint8).reshape(
        chunk.frame_count, chunk.height, chunk.width, 3
    )
    encoded = encode_fmp4_chunk(pixels, chunk.first_frame, chunk.chunk_index, fps, settings)
    ms = (time.perf_counter() - t0) * 1e3
    init = encoded.init_segment if first else b""
    return [convert.chunk(chunk, fps, ms, init, encoded.media_segment)], ms / 1e3


def _with_init(
    messages: list[pb.GenerateEvent], init_segment: bytes, first: bool
) -> list[pb.GenerateEvent]:
    """A kept chunk as a stream's first chunk event: fMP4 needs the init segment there."""
    if not first or not init_segment or messages[0].chunk.init_segment:
        return messages
    head = pb.GenerateEvent()
    head.CopyFrom(messages[0])
    head.chunk.init_segment = init_segment
    head.chunk.init_segment_size = len(init_segment)
    return [head, *messages[1:]]


def _why_broken(context: grpc.aio.ServicerContext) -> tuple[str, grpc.StatusCode]:
    """Why a stream stopped before its session ended: its deadline, or its client left."""
    if deadline_passed(context):
        return "deadline exceeded", grpc.StatusCode.DEADLINE_EXCEEDED
    return "client disconnected", grpc.StatusCode.CANCELLED
