"""The blocking client: `Client`, and the stream handles it returns.

    with Client("localhost:50051") as client:
        with client.generate("a red ball rolls", chunks=4) as stream:
            for chunk in stream:
                out.write(chunk.payload)

Leaving a stream's `with` block early (an exception, Ctrl-C) cancels the call, and the server
cancels a session whose call broke.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

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
from client.options import (
    ConnectOptions,
    GenerateOptions,
    connect_options,
    generate_options,
)
from client.requests import (
    call_metadata,
    cancel_event,
    channel_credentials,
    channel_options,
    generate_request,
    prompt_event,
    prompt_update,
    session_id_from,
    start_event,
    with_session,
)
from client.retry import NO_RETRY, Retrier
from proto import video_generation_pb2 as pb
from proto import video_generation_pb2_grpc as pb_grpc


class Client:
    """One channel to a magistream server; thread-safe like the gRPC channel under it."""

    def __init__(self, target: ConnectOptions | str) -> None:
        self.options = connect_options(target)
        opts = channel_options(self.options)
        if self.options.tls is None:
            self._channel = grpc.insecure_channel(self.options.target, options=opts)
        else:
            creds = channel_credentials(self.options.tls)
            self._channel = grpc.secure_channel(self.options.target, creds, options=opts)
        self.stub = pb_grpc.VideoGenerationStub(self._channel)
        self.metadata = call_metadata(self.options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- unary calls ------------------------------------------------------------------------

    def list_models(self) -> pb.ListModelsResponse:
        return self._unary("ListModels", pb.ListModelsRequest(), retry=True)

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self._unary(
            "GetSession",
            pb.GetSessionRequest(session_id=session_id),
            retry=True,
            session_id=session_id,
        )

    def cancel(self, session_id: str) -> str:
        """Cancels a session; returns its state after the call (CANCELLED, or how it ended)."""
        reply = self._unary(
            "CancelSession",
            pb.CancelSessionRequest(session_id=session_id),
            retry=True,
            session_id=session_id,
        )
        return STATE_NAMES.get(reply.state, str(reply.state))

    def update_prompt(
        self, session_id: str, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        request = prompt_update(session_id, text, from_chunk, replace_later)
        # not retried: UpdatePrompt is not idempotent (a second delivery adds a version)
        reply = self._unary("UpdatePrompt", request, retry=False, session_id=session_id)
        return ack_of(reply, text)

    def _unary(self, name: str, request, retry: bool, session_id: str | None = None):
        method = getattr(self.stub, name)
        policy = self.options.retry if retry else NO_RETRY
        retrier = Retrier(policy, self.options.unary_timeout_s, name)
        while True:
            try:
                return method(
                    request,
                    timeout=retrier.timeout_s(),
                    metadata=with_session(self.metadata, session_id),
                )
            except grpc.RpcError as e:
                delay = retrier.delay_s(e)
                if delay is None:
                    raise MagiError.from_rpc(e, session_id) from None
                time.sleep(delay)

    # ---- streams ------------------------------------------------------------------------------

    def generate(self, options: GenerateOptions | str, **fields) -> GenerateStream:
        """A session on StreamGenerate. Pass GenerateOptions, or a prompt and its fields."""
        request = generate_request(generate_options(options, fields))
        return GenerateStream(
            self,
            lambda timeout: self.stub.StreamGenerate(
                request, timeout=timeout, metadata=with_session(self.metadata, request.session_id)
            ),
        )

    def interact(self, options: GenerateOptions | str, **fields) -> InteractStream:
        """A session on Interact: push prompts and cancel on the same stream."""
        return InteractStream(self, start_event(generate_options(options, fields)))

    def open_stream(
        self, start: Callable[[float | None], object], what: str
    ) -> tuple[object, Started]:
        """Starts a stream call, retrying UNAVAILABLE until its first event (`started`)."""
        retrier = Retrier(self.options.retry, self.options.stream_timeout_s, what)
        while True:
            call = start(retrier.timeout_s())
            try:
                first = next(call)
            except StopIteration:
                raise MagiError(
                    grpc.StatusCode.UNKNOWN,
                    "the stream ended before it started",
                    session_id_from(call.initial_metadata()),
                ) from None
            except grpc.RpcError as e:
                delay = retrier.delay_s(e)
                if delay is None:
                    raise MagiError.from_rpc(e, _header_id(call)) from None
                time.sleep(delay)
                continue
            if first.WhichOneof("event") != "started":
                call.cancel()
                raise MagiError(
                    grpc.StatusCode.INTERNAL,
                    f"protocol error: the first event is {first.WhichOneof('event')}",
                )
            return call, started_of(first)


def _header_id(call) -> str | None:
    try:
        return session_id_from(call.initial_metadata())
    except grpc.RpcError:
        return None


class _StreamBase(abc.ABC):
    """What both stream kinds share: start, iterate, status, close."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.started: Started | None = None
        self._call = None
        self._assembler: Assembler | None = None
        self._start_lock = threading.Lock()  # push_prompt may start it from another thread

    @property
    def session_id(self) -> str | None:
        return self.started.session_id if self.started else None

    @property
    def finished(self) -> Finished | None:
        """How the session ended; set once the stream is read to its end."""
        return self._assembler.finished if self._assembler else None

    def start(self) -> Started:
        """Opens the call (retrying UNAVAILABLE) and waits for `started`. Iterating does this
        too; call it to know the session id before the first chunk."""
        with self._start_lock:
            if self.started is None:
                self._call, started = self._open()
                raw = started.params.output_encoding == pb.OUTPUT_ENCODING_RAW_RGB24
                self._assembler = Assembler(raw=raw, session_id=started.session_id)
                self.started = started  # last: a set `started` means the rest is ready
        return self.started

    @abc.abstractmethod
    def _open(self) -> tuple[object, Started]:
        """Start the call (retrying UNAVAILABLE) and return it with its `started` event."""

    def _messages(self) -> Iterator[ChunkEvent | pb.PromptAck]:
        self.start()
        try:
            for message in self._call:
                item = self._assembler.feed(message)
                if item is not None:
                    yield item
        except grpc.RpcError as e:
            raise MagiError.from_rpc(e, self.session_id) from None

    def status(self) -> pb.SessionInfo:
        return self.client.get_session(self._require_id())

    def close(self) -> None:
        """Breaks the call if it is still open; the server then cancels the session."""
        if self._call is not None:
            self._call.cancel()

    def _require_id(self) -> str:
        return self.start().session_id

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GenerateStream(_StreamBase):
    """Iterate for ChunkEvents; `push_prompt`, `cancel` and `status` use unary calls."""

    def __init__(self, client: Client, start: Callable[[float | None], object]) -> None:
        super().__init__(client)
        self._start_call = start

    def _open(self) -> tuple[object, Started]:
        return self.client.open_stream(self._start_call, "StreamGenerate")

    def __iter__(self) -> Iterator[ChunkEvent]:
        for item in self._messages():
            if isinstance(item, ChunkEvent):
                yield item

    def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        return self.client.update_prompt(self._require_id(), text, from_chunk, replace_later)

    def cancel(self) -> str:
        """Cancels the session; the stream then ends with a CANCELLED `finished`."""
        return self.client.cancel(self._require_id())


_CLOSE = object()  # ends the request iterator: the client half-closes


class InteractStream(_StreamBase):
    """Iterate for ChunkEvents and Acks (one per pushed prompt, in push order)."""

    def __init__(self, client: Client, start: pb.ClientEvent) -> None:
        super().__init__(client)
        self._start_event = start
        self._outbox: queue.Queue = queue.Queue()
        self._texts: deque[str] = deque()  # pushed texts awaiting their ack
        self._lock = threading.Lock()

    def _open(self) -> tuple[object, Started]:
        def start(timeout: float | None):
            self._outbox = queue.Queue()  # a retry starts over with a fresh request stream
            self._outbox.put(self._start_event)
            return self.client.stub.Interact(
                _drain(self._outbox),
                timeout=timeout,
                metadata=with_session(self.client.metadata, self._start_event.start.session_id),
            )

        return self.client.open_stream(start, "Interact")

    def __iter__(self) -> Iterator[ChunkEvent | Ack]:
        for item in self._messages():
            if isinstance(item, pb.PromptAck):
                yield ack_of(item, self._texts.popleft() if self._texts else "")
            else:
                yield item

    def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> None:
        """Sends a prompt; its Ack comes out of the iteration. Safe from another thread."""
        event = prompt_event(text, from_chunk, replace_later)
        self.start()
        with self._lock:  # the text queue and the request stream keep the same order
            self._texts.append(text)
            self._outbox.put(event)

    def cancel(self) -> None:
        """Ends the session; the stream then ends with a CANCELLED `finished`."""
        self.start()
        self._outbox.put(cancel_event())

    def done_writing(self) -> None:
        """Half-closes: no more prompts. The session still runs to its num_chunks."""
        self._outbox.put(_CLOSE)

    def close(self) -> None:
        self._outbox.put(_CLOSE)  # frees gRPC's request-reading thread
        super().close()


def _drain(outbox: queue.Queue) -> Iterator[pb.ClientEvent]:
    while (item := outbox.get()) is not _CLOSE:
        yield item
