"""The asyncio client: `AsyncClient`, the same calls as `client.sync.Client`, awaited.

    async with AsyncClient("localhost:50051") as client:
        async for chunk in client.generate("a red ball rolls", chunks=4):
            out.write(chunk.payload)

Requests, retries and event folding are shared with the sync face (client.requests,
client.retry, client.events); only the waiting differs.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from client.events import (
    STATE_NAMES,
    Ack,
    Assembler,
    ChunkEvent,
    Finished,
    MagiError,
    Started,
    ack_of,
    started_of,
)
from client.options import ConnectOptions, GenerateOptions, connect_options, generate_options
from client.requests import (
    call_metadata,
    cancel_event,
    channel_credentials,
    channel_options,
    generate_request,
    prompt_event,
    prompt_update,
    resume_request,
    session_id_from,
    start_event,
    with_session,
)
from client.retry import NO_RETRY, Retrier
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class AsyncClient:
    """One grpc.aio channel; create it inside the event loop that uses it."""

    def __init__(
        self,
        target: ConnectOptions | str,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`credentials`: made from `options.tls` when None. The sync Client makes them on the
        caller's thread, so a missing PEM file fails at `Client(...)`, not at its first call."""
        self.options = connect_options(target)
        if self.options.tls is not None:
            credentials = credentials or channel_credentials(self.options.tls)
        self._credentials = credentials
        self._channel = self._channel_to(self.options.target)
        self.stub = pb_grpc.VideoGenerationStub(self._channel)
        self.metadata = call_metadata(self.options)
        # made at the first resume, when ConnectOptions.resume_target names another target
        self._resume_channel: grpc.aio.Channel | None = None
        self._resume_stub: pb_grpc.VideoGenerationStub | None = None

    def _channel_to(self, target: str) -> grpc.aio.Channel:
        opts = channel_options(self.options)
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, self._credentials, options=opts)

    @property
    def resume_stub(self) -> pb_grpc.VideoGenerationStub:
        """Where resumes go: ConnectOptions.resume_target, or this channel's own target."""
        target = self.options.resume_target
        if target is None or target == self.options.target:
            return self.stub
        if self._resume_stub is None:
            self._resume_channel = self._channel_to(target)
            self._resume_stub = pb_grpc.VideoGenerationStub(self._resume_channel)
        return self._resume_stub

    async def close(self) -> None:
        if self._resume_channel is not None:
            await self._resume_channel.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- unary calls ------------------------------------------------------------------------

    async def list_models(self) -> pb.ListModelsResponse:
        return await self._unary("ListModels", pb.ListModelsRequest(), retry=True)

    async def list_sessions(self) -> list[pb.SessionInfo]:
        """The caller's sessions the server still knows (an admin's: everyone's), newest first."""
        reply = await self._unary("ListSessions", pb.ListSessionsRequest(), retry=True)
        return list(reply.sessions)

    async def get_session(self, session_id: str) -> pb.SessionInfo:
        return await self._unary(
            "GetSession",
            pb.GetSessionRequest(session_id=session_id),
            retry=True,
            session_id=session_id,
        )

    async def cancel(self, session_id: str) -> str:
        """Cancels a session; returns its state after the call (CANCELLED, or how it ended)."""
        reply = await self._unary(
            "CancelSession",
            pb.CancelSessionRequest(session_id=session_id),
            retry=True,
            session_id=session_id,
        )
        return STATE_NAMES.get(reply.state, str(reply.state))

    async def snapshot(self, session_id: str) -> pb.SnapshotResponse:
        """Writes the session at its newest chunk boundary to the server's snapshot store: the
        token `GenerateOptions.resume` takes, and the chunk a resume streams from."""
        request = pb.SnapshotRequest(session_id=session_id)
        # not retried: each call writes a file (a retry after a lost reply would write another)
        return await self._unary("SnapshotSession", request, retry=False, session_id=session_id)

    async def update_prompt(
        self, session_id: str, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        request = prompt_update(session_id, text, from_chunk, replace_later)
        # not retried: UpdatePrompt is not idempotent (a second delivery adds a version)
        reply = await self._unary("UpdatePrompt", request, retry=False, session_id=session_id)
        return ack_of(reply, text)

    async def _unary(self, name: str, request, retry: bool, session_id: str | None = None):
        method = getattr(self.stub, name)
        policy = self.options.retry if retry else NO_RETRY
        retrier = Retrier(policy, self.options.unary_timeout_s, name)
        while True:
            try:
                return await method(
                    request,
                    timeout=retrier.timeout_s(),
                    metadata=with_session(self.metadata, session_id),
                )
            except grpc.RpcError as e:
                delay = retrier.delay_s(e)
                if delay is None:
                    raise MagiError.from_rpc(e, session_id) from None
                await asyncio.sleep(delay)

    # ---- streams ------------------------------------------------------------------------------

    def generate(self, options: GenerateOptions | str, **fields) -> AsyncGenerateStream:
        """A session on StreamGenerate. Pass GenerateOptions, or a prompt and its fields."""
        request = generate_request(generate_options(options, fields))

        async def start(timeout: float | None) -> grpc.aio.Call:
            return self.stub.StreamGenerate(
                request, timeout=timeout, metadata=with_session(self.metadata, request.session_id)
            )

        return AsyncGenerateStream(self, start, detach_grace_s=request.detach_grace_s)

    def interact(self, options: GenerateOptions | str, **fields) -> AsyncInteractStream:
        """A session on Interact: push prompts and cancel on the same stream."""
        return AsyncInteractStream(self, start_event(generate_options(options, fields)))

    def attach(self, session_id: str, from_chunk: int = 0) -> AsyncGenerateStream:
        """Your session whose stream broke within its `detach_grace_s`, streamed again from
        `from_chunk` (one of the last few it sent, or the next one), like `generate`."""
        if from_chunk < 0:
            raise ValueError(f"from_chunk must be >= 0, got {from_chunk}")
        request = pb.AttachRequest(session_id=session_id, from_chunk=from_chunk)

        async def start(timeout: float | None) -> grpc.aio.Call:
            return self.stub.Attach(
                request, timeout=timeout, metadata=with_session(self.metadata, session_id)
            )

        return AsyncGenerateStream(self, start, "Attach")

    async def open_stream(
        self,
        start: Callable[[float | None], Awaitable[grpc.aio.Call]],
        what: str,
        retrier: Retrier | None = None,
    ) -> tuple[grpc.aio.Call, Started]:
        """Starts a stream call, retrying UNAVAILABLE until its first event (`started`).
        `retrier`: default, the connection's policy and the stream's whole deadline."""
        retrier = retrier or Retrier(self.options.retry, self.options.stream_timeout_s, what)
        while True:
            call = None
            try:
                call = await start(retrier.timeout_s())
                first = await call.read()
            except grpc.RpcError as e:
                delay = retrier.delay_s(e)
                if delay is None:
                    raise MagiError.from_rpc(e, await _header_id(call)) from None
                await asyncio.sleep(delay)
                continue
            if first is grpc.aio.EOF or first.WhichOneof("event") != "started":
                # INTERNAL, not UNKNOWN: a stream that ends with status OK (EOF) before
                # `started`, or opens with another event, is the server breaking the
                # protocol, as are the Assembler's errors. The status says nothing failed, so
                # there is nothing to retry either.
                session_id = await _header_id(call)  # read before cancel() discards it
                call.cancel()
                what = "ended" if first is grpc.aio.EOF else f"began with {_kind(first)}"
                raise MagiError(
                    grpc.StatusCode.INTERNAL,
                    f"protocol error: the stream {what} before its `started` event",
                    session_id,
                )
            return call, started_of(first)


def _kind(message: pb.GenerateEvent) -> str:
    return message.WhichOneof("event") or "an empty event"


async def _header_id(call: grpc.aio.Call | None) -> str | None:
    if call is None:
        return None
    try:
        found = session_id_from(await call.initial_metadata())
        if found is None and call.done():
            # a call that ends at once may come back trailers-only: its headers arrive there
            found = session_id_from(await call.trailing_metadata())
        return found
    except grpc.RpcError:
        return None


class _AsyncStreamBase(abc.ABC):
    """What both stream kinds share: start, iterate, status, close."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.started: Started | None = None
        self._call: grpc.aio.Call | None = None
        self._assembler: Assembler | None = None
        self._deadline: float | None = None  # monotonic seconds: stream_timeout_s from start
        self._closed = False  # close() was called: a resume must not open a new call
        # a pusher task (or the sync face's threads) may start the stream as the reader does:
        # one of them opens the call, the others wait for its `started`
        self._start_lock = asyncio.Lock()

    @property
    def session_id(self) -> str | None:
        return self.started.session_id if self.started else None

    @property
    def finished(self) -> Finished | None:
        """How the session ended; set once the stream is read to its end."""
        return self._assembler.finished if self._assembler else None

    async def start(self) -> Started:
        """Opens the call (retrying UNAVAILABLE) and waits for `started`. Iterating does this
        too; await it to know the session id before the first chunk."""
        async with self._start_lock:
            if self.started is None:
                timeout_s = self.client.options.stream_timeout_s
                if timeout_s is not None:
                    self._deadline = time.monotonic() + timeout_s
                self._call, started = await self._open()
                raw = started.params.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
                self._assembler = Assembler(raw=raw, session_id=started.session_id)
                self.started = started  # last: a set `started` means the rest is ready
        return self.started

    @abc.abstractmethod
    async def _open(self) -> tuple[grpc.aio.Call, Started]:
        """Start the call (retrying UNAVAILABLE) and return it with its `started` event."""

    async def _messages(self) -> AsyncIterator[ChunkEvent | pb.PromptAck]:
        await self.start()
        while True:
            try:
                while (message := await self._call.read()) is not grpc.aio.EOF:
                    item = self._assembler.feed(message)
                    if item is not None:
                        yield item
                return
            except grpc.RpcError as e:
                error = MagiError.from_rpc(e, self.session_id)
            await self._on_break(error)  # raises it, or opens a call that reads on

    async def _on_break(self, error: MagiError) -> None:
        """The call ended with `error`: raise it, or replace `_call` (and `_assembler`) with
        one that continues the stream."""
        raise error

    async def status(self) -> pb.SessionInfo:
        return await self.client.get_session(await self._require_id())

    def close(self) -> None:
        """Breaks the call if it is still open; the server then cancels the session."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def _require_id(self) -> str:
        return (await self.start()).session_id

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncGenerateStream(_AsyncStreamBase):
    """`async for` gives ChunkEvents; `push_prompt`, `cancel` and `status` use unary calls.

    When the server goes away mid-stream and leaves a resume token (a replica draining on
    SIGTERM snapshots the session), the stream resumes it on its own through
    `ConnectOptions.resume_target` (default: the same target) for up to
    `RetryPolicy.resume_for_s`, and the caller's iteration goes on: chunks it already has are
    not yielded twice, and the fMP4 init segment is not sent twice. `resumes` counts them."""

    def __init__(
        self,
        client: AsyncClient,
        start: Callable[[float | None], Awaitable[grpc.aio.Call]],
        method: str = "StreamGenerate",
        detach_grace_s: float = 0.0,
    ) -> None:
        super().__init__(client)
        self._start_call = start
        self._method = method  # StreamGenerate, or Attach
        self._detach_grace_s = detach_grace_s  # the request's, for the resumed session too
        self.resumes = 0  # times the session was resumed from a snapshot on another call
        self._last_index: int | None = None  # the last chunk yielded: a resume resends some
        self._check_gap = False  # after a resume: its first new chunk must follow the last

    async def _open(self) -> tuple[grpc.aio.Call, Started]:
        return await self.client.open_stream(self._start_call, self._method)

    async def __aiter__(self) -> AsyncIterator[ChunkEvent]:
        async for item in self._messages():
            if not isinstance(item, ChunkEvent):
                continue
            last = self._last_index
            if last is not None and item.index <= last:
                continue  # streamed again by a resume, identical to the one the caller has
            if self._check_gap and last is not None and item.index != last + 1:
                raise MagiError(
                    grpc.StatusCode.INTERNAL,
                    f"protocol error: the resumed stream went on at chunk {item.index}, "
                    f"after chunk {last}",
                    self.session_id,
                )
            self._check_gap = False
            self._last_index = item.index
            yield item

    async def _on_break(self, error: MagiError) -> None:
        policy = self.client.options.retry
        token = error.resume_token
        if (
            token is None
            or error.code != grpc.StatusCode.UNAVAILABLE
            or policy.resume_for_s == 0
            or self._closed
        ):
            raise error
        session_id = self.started.session_id
        logger.info(
            "session %s: the server went away (%s); resuming from chunk %s",
            session_id,
            error.message,
            error.resume_from_chunk,
        )
        broken = self._assembler
        # a fresh one: `finished` stays unset until the resumed stream ends
        self._assembler = Assembler(
            raw=broken.raw, session_id=session_id, init_segment=broken.init_segment
        )
        try:
            self._call, _ = await self._reopen(token)
        except MagiError as failed:
            self._assembler = broken  # its `finished` says how the server left the session
            if failed.resume_token is None:  # the token is still good for a resume by hand
                failed.resume_token = token
                failed.resume_from_chunk = error.resume_from_chunk
            raise failed from None
        self.resumes += 1
        self._check_gap = True
        logger.info(
            "session %s: resumed (%d so far) from chunk %s",
            session_id,
            self.resumes,
            error.resume_from_chunk,
        )

    async def _reopen(self, token: str) -> tuple[grpc.aio.Call, Started]:
        """StreamGenerate(resume=token), retrying UNAVAILABLE for `resume_for_s`: a replica
        that is draining refuses new sessions until the router picks another."""
        session_id = self.started.session_id
        request = resume_request(
            token, session_id, self.started.params.output_encoding, self._detach_grace_s
        )
        metadata = with_session(self.client.metadata, session_id)

        async def start(timeout: float | None) -> grpc.aio.Call:
            if self._closed:  # close() while waiting between tries
                raise MagiError(grpc.StatusCode.CANCELLED, "the stream was closed", session_id)
            return self.client.resume_stub.StreamGenerate(
                request, timeout=timeout, metadata=metadata
            )

        left_s = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
        policy = self.client.options.retry
        retrier = Retrier(policy, left_s, "resume", retry_for_s=policy.resume_for_s)
        return await self.client.open_stream(start, "resume", retrier)

    async def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        return await self.client.update_prompt(
            await self._require_id(), text, from_chunk, replace_later
        )

    async def cancel(self) -> str:
        """Cancels the session; the stream then ends with a CANCELLED `finished`."""
        return await self.client.cancel(await self._require_id())


class AsyncInteractStream(_AsyncStreamBase):
    """`async for` gives ChunkEvents and Acks (one per pushed prompt, in push order)."""

    def __init__(self, client: AsyncClient, start: pb.ClientEvent) -> None:
        super().__init__(client)
        self._start_event = start
        self._texts: deque[str] = deque()  # pushed texts awaiting their ack
        # grpc.aio allows one write in flight; pushes from several tasks (or the sync face's
        # threads) take turns, so the texts queue and the request stream keep one order
        self._write_lock = asyncio.Lock()

    async def _open(self) -> tuple[grpc.aio.Call, Started]:
        async def start(timeout: float | None) -> grpc.aio.Call:
            call = self.client.stub.Interact(
                timeout=timeout,
                metadata=with_session(self.client.metadata, self._start_event.start.session_id),
            )
            await call.write(self._start_event)
            return call

        return await self.client.open_stream(start, "Interact")

    async def __aiter__(self) -> AsyncIterator[ChunkEvent | Ack]:
        async for item in self._messages():
            if isinstance(item, pb.PromptAck):
                yield ack_of(item, self._texts.popleft() if self._texts else "")
            else:
                yield item

    async def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> None:
        """Sends a prompt; its Ack comes out of the iteration."""
        event = prompt_event(text, from_chunk, replace_later)
        await self.start()
        async with self._write_lock:
            self._texts.append(text)  # before the write: the ack may come back before it returns
            await self._write(event)

    async def cancel(self) -> None:
        """Ends the session; the stream then ends with a CANCELLED `finished`."""
        await self.start()
        async with self._write_lock:
            await self._write(cancel_event())

    async def done_writing(self) -> None:
        """Half-closes: no more prompts. The session still runs to its num_chunks."""
        await self.start()
        async with self._write_lock:
            await self._call.done_writing()

    async def _write(self, event: pb.ClientEvent) -> None:
        try:
            await self._call.write(event)
        except grpc.RpcError as e:
            raise MagiError.from_rpc(e, self.session_id) from None
        except asyncio.InvalidStateError:  # the call ended, or done_writing() was called
            raise MagiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the stream is closed for writing",
                self.session_id,
            ) from None
