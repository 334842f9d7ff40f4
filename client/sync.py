"""The blocking client: `Client`, and the stream handles it returns.

    with Client("localhost:50051") as client:
        with client.generate("a red ball rolls", chunks=4) as stream:
            for chunk in stream:
                out.write(chunk.payload)

Leaving a stream's `with` block early (an exception, Ctrl-C) cancels the call, and the server
cancels a session whose call broke.

This face is a thin one over the asyncio client (client.aio): each call runs the AsyncClient's
coroutine on the Client's own event loop, in a thread started by the first call and stopped by
close(). Requests, retries, protocol checks and event folding exist once, so the two faces
cannot drift apart; this module only carries calls and results between threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import grpc

from client.aio import AsyncClient, AsyncGenerateStream, AsyncInteractStream
from client.events import Ack, ChunkEvent, Finished, MagiError, Started
from client.options import ConnectOptions, GenerateOptions, connect_options, generate_options
from client.requests import call_metadata, channel_credentials
from proto import video_generation_pb2 as pb

T = TypeVar("T")
INTERRUPT_WAIT_S = 5.0  # after Ctrl-C, how long to wait for the loop to cancel the call, s
CLOSE_WAIT_S = 10.0  # how long close() waits for the channel to close and the thread to end, s
_END = object()  # what _next() returns when the async iterator is exhausted


class ClientClosed(ValueError):
    """A call on a closed Client (a ValueError, as a call on a closed grpc channel is)."""


class _LoopThread:
    """The event loop a Client's AsyncClient lives on, run by a daemon thread (a Client left
    open must not keep the process alive). Started by the first call, stopped by close()."""

    def __init__(
        self, options: ConnectOptions, credentials: grpc.ChannelCredentials | None
    ) -> None:
        self._options = options
        self._credentials = credentials
        self._lock = threading.Lock()  # start, submit and close, from any caller thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: AsyncClient | None = None  # made and used in the loop thread only
        self._closed = False

    def run(
        self,
        work: Callable[[AsyncClient], Awaitable[T]],
        stream: AsyncGenerateStream | AsyncInteractStream | None = None,
    ) -> T:
        """Runs `work(client)` in the loop thread and waits for its result. Ctrl-C (or any
        exception raised into the waiting thread) cancels it there, as asyncio would."""
        done = threading.Event()
        future = self._submit(self._guarded(work, stream, done))
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            # close() from another thread: the loop cancelled what was still running
            session_id = stream.session_id if stream else None
            raise MagiError(
                grpc.StatusCode.CANCELLED, "the client was closed", session_id
            ) from None
        except BaseException:
            if not future.done():  # interrupted while waiting: stop the work, then go on
                future.cancel()
                done.wait(INTERRUPT_WAIT_S)
            raise

    def soon(self, callback: Callable[[], object]) -> None:
        """Runs `callback` in the loop thread without waiting for it: for finalizers, which
        may run in any thread (the loop's own included) and must not block or take locks."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed: close() has ended every call already
            pass

    def close(self) -> None:
        """Closes the channel (which cancels its calls), stops the loop and ends the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None:
            return  # never started: no thread, no channel
        if threading.current_thread() is thread:  # a finalizer in the loop thread itself
            loop.create_task(self._shut_down(loop))
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shut_down(loop), loop).result(CLOSE_WAIT_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_WAIT_S)

    @property
    def closed(self) -> bool:
        return self._closed

    def _submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                coroutine.close()
                raise ClientClosed("the client is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_serve, args=(self._loop,), name="magi-client-loop", daemon=True
                )
                self._thread.start()
            if threading.current_thread() is self._thread:
                coroutine.close()
                raise RuntimeError("a Client call cannot wait on its own event loop")
            # under the lock: close() cannot stop the loop between this check and the submit
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _guarded(
        self,
        work: Callable[[AsyncClient], Awaitable[T]],
        stream: AsyncGenerateStream | AsyncInteractStream | None,
        done: threading.Event,
    ) -> T:
        try:
            if self._client is None:
                self._client = AsyncClient(self._options, self._credentials)
            return await work(self._client)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # this task was cancelled: Ctrl-C in the caller, or close()
            # A grpc.aio call cancelled on this side (stream.close() or client.close() from
            # another thread) raises CancelledError in its reader; the blocking face raises
            # the status such a call ends with.
            session_id = stream.session_id if stream else None
            raise MagiError(
                grpc.StatusCode.CANCELLED, "the call was cancelled on this side", session_id
            ) from None
        finally:
            done.set()

    async def _shut_down(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._client is not None:
                await self._client.close()
        finally:
            loop.stop()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        # what close() left running (a retry's backoff, say) ends as cancelled, so no caller
        # waits on a loop that will never run again
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


async def _ready(value: T) -> T:
    return value


async def _next(iterator: AsyncIterator[T]) -> T | object:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _END


async def _aclose(iterator) -> None:
    try:
        await iterator.aclose()
    except RuntimeError:  # still running: an interrupted read that outlived its wait
        pass


class Client:
    """One channel to a magistream server; thread-safe like the gRPC channel under it.

    Its calls run on a private event loop in a thread of their own, started by the first call;
    close() (or leaving the `with` block) closes the channel and ends the thread."""

    def __init__(self, target: ConnectOptions | str) -> None:
        self.options = connect_options(target)
        self.metadata = call_metadata(self.options)
        # made on the caller's thread, so a missing PEM file fails here, not at the first call
        creds = None if self.options.tls is None else channel_credentials(self.options.tls)
        self._loop = _LoopThread(self.options, creds)
        # a Client dropped without close() still closes its channel and ends its thread
        self._finalizer = weakref.finalize(self, self._loop.close)

    def close(self) -> None:
        """Closes the channel (open streams end with CANCELLED) and ends the loop's thread.
        Safe to call more than once, and from any thread."""
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- unary calls ------------------------------------------------------------------------

    def list_models(self) -> pb.ListModelsResponse:
        return self._loop.run(lambda client: client.list_models())

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self._loop.run(lambda client: client.get_session(session_id))

    def list_sessions(self) -> list[pb.SessionInfo]:
        """The caller's sessions the server still knows (an admin's: everyone's), newest first."""
        return self._loop.run(lambda client: client.list_sessions())

    def cancel(self, session_id: str) -> str:
        """Cancels a session; returns its state after the call (CANCELLED, or how it ended)."""
        return self._loop.run(lambda client: client.cancel(session_id))

    def snapshot(self, session_id: str) -> pb.SnapshotResponse:
        """Writes the session at its newest chunk boundary to the server's snapshot store: the
        token `GenerateOptions.resume` takes, and the chunk a resume streams from."""
        return self._loop.run(lambda client: client.snapshot(session_id))

    def update_prompt(
        self, session_id: str, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        return self._loop.run(
            lambda client: client.update_prompt(session_id, text, from_chunk, replace_later)
        )

    # ---- streams ------------------------------------------------------------------------------

    def generate(self, options: GenerateOptions | str, **fields) -> GenerateStream:
        """A session on StreamGenerate. Pass GenerateOptions, or a prompt and its fields."""
        checked = generate_options(options, fields)  # a bad option fails before any thread
        return GenerateStream(self, self._loop.run(lambda client: _ready(client.generate(checked))))

    def interact(self, options: GenerateOptions | str, **fields) -> InteractStream:
        """A session on Interact: push prompts and cancel on the same stream."""
        checked = generate_options(options, fields)
        return InteractStream(self, self._loop.run(lambda client: _ready(client.interact(checked))))

    def attach(self, session_id: str, from_chunk: int = 0) -> GenerateStream:
        """Your session whose stream broke within its `detach_grace_s`, streamed again from
        `from_chunk` (one of the last few it sent, or the next one), like `generate`."""
        if from_chunk < 0:  # before any thread, as generate's options
            raise ValueError(f"from_chunk must be >= 0, got {from_chunk}")
        return GenerateStream(
            self, self._loop.run(lambda client: _ready(client.attach(session_id, from_chunk)))
        )


class _StreamBase:
    """What both stream kinds share: start, iterate, status, close; each runs the async
    stream's own method in the Client's loop."""

    def __init__(self, client: Client, stream: AsyncGenerateStream | AsyncInteractStream) -> None:
        self.client = client
        self._stream = stream
        # A stream dropped without close() has its call cancelled in the loop thread: grpc.aio
        # objects belong to their loop, and their own cancel-on-collection would run in
        # whichever thread dropped the last reference.
        weakref.finalize(self, client._loop.soon, stream.close)

    @property
    def started(self) -> Started | None:
        return self._stream.started

    @property
    def session_id(self) -> str | None:
        return self._stream.session_id

    @property
    def finished(self) -> Finished | None:
        """How the session ended; set once the stream is read to its end."""
        return self._stream.finished

    @property
    def resumes(self) -> int:
        """Times the session was resumed from a snapshot after its server went away."""
        return self._stream.resumes

    def start(self) -> Started:
        """Opens the call (retrying UNAVAILABLE) and waits for `started`. Iterating does this
        too; call it to know the session id before the first chunk. Safe from any thread."""
        return self._run(lambda: self._stream.start())

    def status(self) -> pb.SessionInfo:
        return self._run(lambda: self._stream.status())

    def close(self) -> None:
        """Breaks the call if it is still open; the server then cancels the session."""
        try:
            self.client._loop.run(lambda _: _ready(self._stream.close()))
        except ClientClosed:
            pass  # closing the client cancelled every call

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return self.client._loop.run(lambda _: work(), self._stream)
        except ClientClosed:
            if self.started is None:
                raise  # never opened: as any call on a closed client
            # its call was cancelled when the client closed, and says so
            raise MagiError(
                grpc.StatusCode.CANCELLED, "the client was closed", self.session_id
            ) from None

    def _items(self) -> Iterator:
        """The async stream's items, each fetched by a call on the loop. Breaking out (or
        dropping the iterator) closes the async iterator in its loop; the call stays open,
        as an iterated grpc call does, until close() or the stream is dropped."""
        items = aiter(self._stream)  # only made here; it first runs in the loop thread
        try:
            while (item := self._run(lambda: _next(items))) is not _END:
                yield item
        finally:
            self.client._loop.soon(lambda: asyncio.get_running_loop().create_task(_aclose(items)))


class GenerateStream(_StreamBase):
    """Iterate for ChunkEvents; `push_prompt`, `cancel` and `status` use unary calls. A stream
    whose server went away with a resume token is resumed on its own (AsyncGenerateStream)."""

    def __iter__(self) -> Iterator[ChunkEvent]:
        return self._items()

    def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> Ack:
        return self._run(lambda: self._stream.push_prompt(text, from_chunk, replace_later))

    def cancel(self) -> str:
        """Cancels the session; the stream then ends with a CANCELLED `finished`."""
        return self._run(lambda: self._stream.cancel())


class InteractStream(_StreamBase):
    """Iterate for ChunkEvents and Acks (one per pushed prompt, in push order). A stream whose
    server went away with a resume token is resumed on its own, its prompts with it
    (AsyncInteractStream); a push made meanwhile waits for the resume."""

    def __iter__(self) -> Iterator[ChunkEvent | Ack]:
        return self._items()

    def push_prompt(
        self, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> None:
        """Sends a prompt; its Ack comes out of the iteration. Safe from another thread."""
        self._run(lambda: self._stream.push_prompt(text, from_chunk, replace_later))

    def cancel(self) -> None:
        """Ends the session; the stream then ends with a CANCELLED `finished`."""
        self._run(lambda: self._stream.cancel())

    def done_writing(self) -> None:
        """Half-closes: no more prompts. The session still runs to its num_chunks."""
        self._run(lambda: self._stream.done_writing())
