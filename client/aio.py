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
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from client.events import (
    RESUME_TOKEN_HEADER,
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
    """What both stream kinds share: start, iterate, status, close, and resuming.

    When the server goes away mid-stream and leaves a resume token (a replica draining on
    SIGTERM snapshots the session), the stream resumes it on its own through
    `ConnectOptions.resume_target` (default: the same target) for up to
    `RetryPolicy.resume_for_s`, and the caller's iteration goes on: chunks it already has are
    not yielded twice, and the fMP4 init segment is not sent twice. `resumes` counts them."""

    def __init__(self, client: AsyncClient, detach_grace_s: float = 0.0) -> None:
        self.client = client
        self.started: Started | None = None
        self._call: grpc.aio.Call | None = None
        self._assembler: Assembler | None = None
        self._deadline: float | None = None  # monotonic seconds: stream_timeout_s from start
        self._closed = False  # close() was called: a resume must not open a new call
        # a pusher task (or the sync face's threads) may start the stream as the reader does:
        # one of them opens the call, the others wait for its `started`
        self._start_lock = asyncio.Lock()
        self._detach_grace_s = detach_grace_s  # the request's, for the resumed session too
        self.resumes = 0  # times the session was resumed from a snapshot on another call
        self._last_index: int | None = None  # the last chunk yielded: a resume resends some
        self._check_gap = False  # after a resume: its first new chunk must follow the last

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

    @abc.abstractmethod
    async def _resume_call(
        self, request: pb.GenerateRequest, timeout: float | None, metadata
    ) -> grpc.aio.Call:
        """Start one call that continues the session from `request.resume`."""

    async def _resumed(self, started: Started) -> None:
        """Runs once a resumed call has sent its `started` (the snapshot's timeline)."""
        return None  # the generate stream has nothing to send on the new call

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

    def _is_new(self, chunk: ChunkEvent) -> bool:
        """False for a chunk a resume streamed again (identical to the one the caller has);
        after a resume, a chunk that skips ahead is the server breaking the protocol."""
        last = self._last_index
        if last is not None and chunk.index <= last:
            return False
        if self._check_gap and last is not None and chunk.index != last + 1:
            raise MagiError(
                grpc.StatusCode.INTERNAL,
                f"protocol error: the resumed stream went on at chunk {chunk.index}, "
                f"after chunk {last}",
                self.session_id,
            )
        self._check_gap = False
        self._last_index = chunk.index
        return True

    async def _on_break(self, error: MagiError) -> None:
        """The call ended with `error`: raise it, or (a resume token within the policy)
        replace `_call` and `_assembler` with a resumed call that continues the stream."""
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
            self._call, started = await self._reopen(token)
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
        await self._resumed(started)

    async def _reopen(self, token: str) -> tuple[grpc.aio.Call, Started]:
        """The resumed call, retrying UNAVAILABLE for `resume_for_s`: a replica that is
        draining refuses new sessions until the router picks another."""
        session_id = self.started.session_id
        request = resume_request(
            token, session_id, self.started.params.output_encoding, self._detach_grace_s
        )
        metadata = with_session(self.client.metadata, session_id)

        async def start(timeout: float | None) -> grpc.aio.Call:
            if self._closed:  # close() while waiting between tries
                raise MagiError(grpc.StatusCode.CANCELLED, "the stream was closed", session_id)
            return await self._resume_call(request, timeout, metadata)

        left_s = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
        policy = self.client.options.retry
        retrier = Retrier(policy, left_s, "resume", retry_for_s=policy.resume_for_s)
        return await self.client.open_stream(start, "resume", retrier)

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
    A stream whose server goes away with a resume token resumes on its own (see the base)."""

    def __init__(
        self,
        client: AsyncClient,
        start: Callable[[float | None], Awaitable[grpc.aio.Call]],
        method: str = "StreamGenerate",
        detach_grace_s: float = 0.0,
    ) -> None:
        super().__init__(client, detach_grace_s)
        self._start_call = start
        self._method = method  # StreamGenerate, or Attach

    async def _open(self) -> tuple[grpc.aio.Call, Started]:
        return await self.client.open_stream(self._start_call, self._method)

    async def _resume_call(
        self, request: pb.GenerateRequest, timeout: float | None, metadata
    ) -> grpc.aio.Call:
        return self.client.resume_stub.StreamGenerate(request, timeout=timeout, metadata=metadata)

    async def __aiter__(self) -> AsyncIterator[ChunkEvent]:
        async for item in self._messages():
            if isinstance(item, ChunkEvent) and self._is_new(item):
                yield item

    async def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        return await self.client.update_prompt(
            await self._require_id(), text, from_chunk, replace_later
        )

    async def cancel(self) -> str:
        """Cancels the session; the stream then ends with a CANCELLED `finished`."""
        return await self.client.cancel(await self._require_id())


@dataclasses.dataclass(eq=False)
class _Push:
    """One prompt pushed on an Interact stream, kept until a resume can no longer need it."""

    seq: int  # push order
    text: str
    from_chunk: int | None  # as pushed
    replace_later: bool
    ack: Ack | None = None  # the caller's answer, once known (yielded in push order)
    # (version, from_chunk) the session gave it last: a resume from a snapshot older than
    # that version pushes it again there
    applied: tuple[int, int] | None = None


class AsyncInteractStream(_AsyncStreamBase):
    """`async for` gives ChunkEvents and Acks (one per pushed prompt, in push order).

    It resumes on its own as the generate stream does, on a new Interact call whose start
    is the resume, and its prompts are not lost: pushes made while it resumes wait and go
    out on the new call in order; a prompt the snapshot does not hold is pushed again (see
    `_reconcile` for the rule)."""

    def __init__(self, client: AsyncClient, start: pb.ClientEvent) -> None:
        super().__init__(client, detach_grace_s=start.start.detach_grace_s)
        self._start_event = start
        self._seq = itertools.count()
        self._unyielded: deque[_Push] = deque()  # pushed, Ack not yet yielded: push order
        self._wire: deque[_Push] = deque()  # written on this call, its ack to come: in order
        self._applied: list[_Push] = []  # accepted since the last resume
        self._held_version: int | None = None  # newest version the session surely holds
        self._half_closed = False  # done_writing(): a resumed call is half-closed too
        self._cancel_sent = False  # cancel(): a resumed call sends it again
        self._resume_failed: MagiError | None = None
        # grpc.aio allows one write in flight; pushes from several tasks (or the sync face's
        # threads) take turns, so the queues and the request stream keep one order. A resume
        # holds it from the break to the last prompt pushed again.
        self._write_lock = asyncio.Lock()

    async def _open(self) -> tuple[grpc.aio.Call, Started]:
        return await self.client.open_stream(
            lambda timeout: self._interact(
                self.client.stub,
                self._start_event,
                timeout,
                with_session(self.client.metadata, self._start_event.start.session_id),
            ),
            "Interact",
        )

    async def _resume_call(
        self, request: pb.GenerateRequest, timeout: float | None, metadata
    ) -> grpc.aio.Call:
        start = pb.ClientEvent(start=request)
        return await self._interact(self.client.resume_stub, start, timeout, metadata)

    @staticmethod
    async def _interact(stub, start: pb.ClientEvent, timeout, metadata) -> grpc.aio.Call:
        call = stub.Interact(timeout=timeout, metadata=metadata)
        await call.write(start)
        return call

    async def __aiter__(self) -> AsyncIterator[ChunkEvent | Ack]:
        async for item in self._messages():
            if isinstance(item, pb.PromptAck):
                self._answered(item)
            elif self._is_new(item):
                yield item
            # acks in push order: one the snapshot held may wait for an earlier one's
            while self._unyielded and self._unyielded[0].ack is not None:
                yield self._unyielded.popleft().ack
        while self._unyielded and self._unyielded[0].ack is not None:
            yield self._unyielded.popleft().ack

    def _answered(self, message: pb.PromptAck) -> None:
        """The server's ack of the oldest prompt written on this call."""
        if self._wire:
            push = self._wire.popleft()
        else:  # an ack of nothing pushed: passed on as it was before resumes
            push = _Push(next(self._seq), "", None, False)
            self._unyielded.append(push)
        if push.ack is None:
            push.ack = ack_of(message, push.text)
        elif not message.prompt_version or message.from_chunk != (push.applied or (0, -1))[1]:
            # pushed again after a resume, its Ack already yielded: the session now differs
            logger.warning(
                "session %s: prompt %r, pushed again after a resume, was %s",
                self.session_id,
                push.text,
                message.rejection or f"applied from chunk {message.from_chunk}",
            )
        if message.prompt_version:
            push.applied = (message.prompt_version, message.from_chunk)
            self._applied.append(push)

    async def _on_break(self, error: MagiError) -> None:
        async with self._write_lock:  # pushes wait for the resume, then go on the new call
            try:
                await super()._on_break(error)
            except MagiError as failed:
                self._resume_failed = failed
                raise

    async def _resumed(self, started: Started) -> None:
        waiting = len(self._wire)
        again = self._reconcile(started.params.timeline)
        logger.info(
            "session %s: %d prompt(s) unanswered at the break; pushing %d again",
            self.session_id,
            waiting,
            len(again),
        )
        self._wire.extend(again)  # all of them: if this call breaks too, the next resume sees them
        for push in again:
            from_chunk = push.applied[1] if push.applied else push.from_chunk
            if not await self._send(prompt_event(push.text, from_chunk, push.replace_later)):
                return  # this call broke too: the next resume reconciles again
        if self._cancel_sent:
            await self._send(cancel_event())
        if self._half_closed:
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self._call.done_writing()

    def _reconcile(self, timeline) -> list[_Push]:
        """After a resume: the prompts to push again, in push order; the rest settled.

        Versions number a session's prompts in the order it applied them, and a stream's
        prompts are applied in push order. So an accepted prompt whose version is newer than
        the snapshot's newest (applied after it was taken) is pushed again, from the chunk
        it had landed on, and its new ack is not yielded (the caller has one). A prompt
        whose ack never came is held by the snapshot when its timeline has an entry newer
        than every version this stream had an ack for, with its text and a from_chunk at or
        after the one asked for (the server only moves a prompt later), matched in push
        order; it gets that entry's version as its Ack. Otherwise it is pushed again. (One
        applied and then replaced before the snapshot, by a later prompt at its from_chunk
        or with replace_later, is pushed again: rare, and its Ack then says where it
        landed.)"""
        newest = max((e.version for e in timeline), default=0)
        if self._held_version is None:  # the request's own entries are 1..n
            self._held_version = max((e.version for e in self.started.params.timeline), default=0)
        held = [p for p in self._applied if p.applied[0] <= newest]
        again = [p for p in self._applied if p.applied[0] > newest]
        self._held_version = max([self._held_version, *(p.applied[0] for p in held)])
        self._applied = []
        unanswered = list(self._wire)
        self._wire.clear()
        if again:  # the snapshot predates an acked prompt, so every later one too
            return sorted([*again, *unanswered], key=lambda p: p.seq)
        entries = sorted(
            (e for e in timeline if e.version > self._held_version), key=lambda e: e.version
        )
        resend, at = [], 0
        for push in unanswered:
            found = next(
                (
                    i
                    for i in range(at, len(entries))
                    if entries[i].text == push.text
                    and (push.from_chunk is None or entries[i].from_chunk >= push.from_chunk)
                ),
                None,
            )
            if found is None:
                resend.append(push)
                continue
            entry, at = entries[found], found + 1
            push.applied = (entry.version, entry.from_chunk)
            self._held_version = max(self._held_version, entry.version)
            if push.ack is None:
                push.ack = Ack(push.text, entry.version, entry.from_chunk)
        return resend

    async def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> None:
        """Sends a prompt; its Ack comes out of the iteration (after a resume too)."""
        event = prompt_event(text, from_chunk, replace_later)
        await self.start()
        async with self._write_lock:
            push = _Push(next(self._seq), text, from_chunk, replace_later)
            # queued before the write: the ack may come back before it returns
            self._unyielded.append(push)
            self._wire.append(push)
            try:
                await self._write(event)
            except MagiError:  # never sent: no ack comes for it
                self._unyielded.remove(push)
                self._wire.remove(push)
                raise

    async def cancel(self) -> None:
        """Ends the session; the stream then ends with a CANCELLED `finished`."""
        await self.start()
        async with self._write_lock:
            self._cancel_sent = True
            await self._write(cancel_event())

    async def done_writing(self) -> None:
        """Half-closes: no more prompts. The session still runs to its num_chunks."""
        await self.start()
        async with self._write_lock:
            self._half_closed = True
            await self._call.done_writing()

    async def _send(self, event: pb.ClientEvent) -> bool:
        """Writes on the call; False when the call has ended."""
        return await self._try_write(event) is None

    async def _try_write(self, event: pb.ClientEvent) -> Exception | None:
        try:
            await self._call.write(event)
        except (grpc.RpcError, asyncio.InvalidStateError) as e:
            return e
        return None

    async def _write(self, event: pb.ClientEvent) -> None:
        call = self._call
        error = await self._try_write(event)
        if error is None or await self._resumable(call):
            return  # written, or the resume writes it on the new call
        if isinstance(error, grpc.RpcError):
            raise MagiError.from_rpc(error, self.session_id) from None
        # InvalidStateError: the call ended, or done_writing() was called
        raise MagiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "the stream is closed for writing",
            self.session_id,
        ) from None

    async def _resumable(self, call: grpc.aio.Call) -> bool:
        """Whether a call a write failed on ended as one the reader resumes."""
        if (
            self._closed
            or self._half_closed
            or self._resume_failed is not None
            or self.client.options.retry.resume_for_s == 0
        ):
            return False
        try:
            code = await call.code()
            trailers = dict(await call.trailing_metadata() or ())
        except grpc.RpcError:
            return False
        return code == grpc.StatusCode.UNAVAILABLE and bool(trailers.get(RESUME_TOKEN_HEADER))
