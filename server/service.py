"""The VideoGeneration servicer: one async function per RPC, read top to bottom.

Streams go: validate, open, yield, free. A client that disconnects or whose deadline passes
arrives as CancelledError (or, if it happens while gRPC is sending, as the generator being
closed): the session is cancelled and the worker frees it within one step.
Errors are raised as server.errors exceptions; server.interceptors maps them to status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from engine import ipc
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc
from scheduler.session import SessionParams, SessionState
from server import convert
from server.config import Limits
from server.encode import VideoEncoding, encode_fmp4_chunk, split_raw_frames
from server.errors import InvalidRequest, NotSteerable, ServiceError, SessionFailed, Unavailable
from server.interceptors import deadline_passed
from server.metrics import Metrics
from server.sessions import LiveSession, SessionEnd, SessionManager
from server.validation import (
    ServedModel,
    decode_inputs,
    parse_cancel,
    parse_client_event,
    parse_generate,
    parse_get_session,
    parse_prompt_update,
)

SESSION_ID_HEADER = "x-session-id"


class VideoGenerationService(pb_grpc.VideoGenerationServicer):
    def __init__(
        self,
        sessions: SessionManager,
        model: ServedModel,
        limits: Limits,
        encoding: VideoEncoding,
        pool: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self.sessions = sessions
        self.model = model
        self.limits = limits
        self.encoding = encoding
        self.pool = pool
        self.metrics = metrics

    async def StreamGenerate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        spec = parse_generate(request, self.model, self.limits)
        session = await self._open(spec)
        await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))
        with self._released_if_broken(session, context):
            async for item in self._events(session):
                yield item

    async def Interact(
        self, request_iterator: AsyncIterator[pb.ClientEvent], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidRequest("event", "the stream closed before its start event")
        parse_client_event(first, first=True)
        session = await self._open(parse_generate(first.start, self.model, self.limits))
        await context.send_initial_metadata(((SESSION_ID_HEADER, session.id),))
        reader = asyncio.create_task(self._read_client(requests, session))
        try:
            with self._released_if_broken(session, context):
                async for item in self._events(session):
                    yield item
        finally:
            reader.cancel()

    async def UpdatePrompt(
        self, request: pb.PromptUpdate, context: grpc.aio.ServicerContext
    ) -> pb.PromptAck:
        applied = await self.sessions.update_prompt(parse_prompt_update(request, self.limits))
        return convert.prompt_ack(applied)

    async def CancelSession(
        self, request: pb.CancelSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelSessionResponse:
        state = self.sessions.cancel(parse_cancel(request), "cancelled by CancelSession")
        return pb.CancelSessionResponse(state=convert.STATES[state])

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SessionInfo:
        session = self.sessions.get(parse_get_session(request))
        return convert.session_info(session, self.model)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_info(self.model, self.limits)], default_model=self.model.name
        )

    # ---- shared by both streams -----------------------------------------------------------

    @contextlib.contextmanager
    def _released_if_broken(
        self, session: LiveSession, context: grpc.aio.ServicerContext
    ) -> Iterator[None]:
        """Around a call's event stream: a cancelled, disconnected or failed call frees its
        session (and says why) before the error goes on."""
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            self.sessions.release(session, *_why_broken(context))
            raise
        except Exception as e:
            self.sessions.release(session, f"its call failed: {e}")
            raise

    async def _open(self, params: SessionParams) -> LiveSession:
        """Decode the inputs off the event loop, then hand the session to the worker."""
        image, video = await asyncio.get_running_loop().run_in_executor(
            self.pool, decode_inputs, params, self.model, self.limits
        )
        return await self.sessions.open(dataclasses.replace(params, image=image, video=video))

    async def _events(self, session: LiveSession) -> AsyncIterator[pb.GenerateEvent]:
        """started, then each chunk as it comes (encoded in the pool), then finished."""
        yield convert.started(session, self.model)
        first_chunk = True
        while True:
            item = await session.next_event()
            if isinstance(item, ipc.ChunkReady):
                for message in await self._encode(session, item, first_chunk):
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
                    raise SessionFailed(item.code, item.message)
                return

    async def _encode(
        self, session: LiveSession, chunk: ipc.ChunkReady, first: bool
    ) -> list[pb.GenerateEvent]:
        raw = session.spec.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
        messages, seconds = await asyncio.get_running_loop().run_in_executor(
            self.pool, _encode_chunk, chunk, raw, first, self.model.fps, self.encoding
        )
        self.metrics.encode.labels("raw_rgb24" if raw else "fmp4_h264").observe(seconds)
        return messages

    async def _read_client(
        self, requests: AsyncIterator[pb.ClientEvent], session: LiveSession
    ) -> None:
        """Interact's client side: prompts are acked in order, cancel ends the session, a
        protocol error ends the call. Half-closing leaves the session running."""
        try:
            async for message in requests:
                kind = parse_client_event(message, first=False)
                if kind == "prompt":
                    session.push(await self._interact_prompt(message.prompt, session))
                elif kind == "cancel":
                    self.sessions.cancel(
                        parse_cancel(message.cancel, session.id), "cancelled by the client"
                    )
        except ServiceError as e:
            session.push(e)
        except grpc.aio.AioRpcError:
            pass  # the client's side broke; its stream is being cancelled too

    async def _interact_prompt(self, update: pb.PromptUpdate, session: LiveSession) -> pb.PromptAck:
        try:
            spec = parse_prompt_update(update, self.limits, stream_session=session.id)
            return convert.prompt_ack(await self.sessions.update_prompt(spec))
        except InvalidRequest as e:
            if e.field == "session_id":
                raise  # another session's id: a malformed sequence, not a bad prompt
            rejection = str(e)
        except (NotSteerable, Unavailable) as e:
            rejection = str(e)
        return pb.PromptAck(session_id=session.id, prompt_version=0, rejection=rejection)


def _encode_chunk(
    chunk: ipc.ChunkReady, raw: bool, first: bool, fps: int, settings: VideoEncoding
) -> tuple[list[pb.GenerateEvent], float]:
    """Runs in the pool: the chunk's wire messages and the time it took."""
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


def _why_broken(context: grpc.aio.ServicerContext) -> tuple[str, grpc.StatusCode]:
    """Why a stream stopped before its session ended: its deadline, or its client left."""
    if deadline_passed(context):
        return "deadline exceeded", grpc.StatusCode.DEADLINE_EXCEEDED
    return "client disconnected", grpc.StatusCode.CANCELLED
