"""Interact's client side: prompts steer the session while its stream flows.

Each prompt goes to the engine as soon as it is read (the engine applies every command that
is waiting before its next step, so a burst lands in about one step), and the reader goes
straight on to the next message: a `cancel` takes effect at once, ahead of prompts still
waiting for their answer. Acks go out in the order the prompts were read, one per prompt.

When the session ends, every prompt read so far is answered before `finished`: with its real
answer where the engine gave one, otherwise with a rejection. The reader then stops; a prompt
the server had not read by then is after the end, and `finished` is its answer. A drain that
saved the session for the client to resume is the exception: `service.interact` stops the
reader, and unanswered prompts get no ack (the client pushes them again on the resumed call).

At most `max_in_flight` prompts are read and not yet acked (an ack counts until the stream
hands it to gRPC, whose own buffers HTTP/2 flow control bounds); past that the reader stops
reading, and flow control holds the client back. Nothing is dropped or refused for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from engine.logs import event
from proto import video_generation_pb2 as pb
from scheduler.session import SessionState
from server import convert
from server.config import Limits
from server.errors import InvalidRequest, ServiceError
from server.sessions import LiveSession, SessionManager
from server.validation import PromptSpec, parse_cancel, parse_client_event, parse_prompt_update

logger = logging.getLogger(__name__)

# Prompts read and not yet acked, per stream. Each holds its text (at most max_prompt_chars)
# here and in one engine command, so a stream's share stays at a few MB even with the longest
# texts; a burst of 1000 (issue 18) still goes to the engine at once.
MAX_PROMPTS_IN_FLIGHT = 1024


class ClientReader:
    """Reads one Interact call's client events after `start`; acks its prompts in order."""

    def __init__(
        self,
        session: LiveSession,
        sessions: SessionManager,
        limits: Limits,
        max_in_flight: int = MAX_PROMPTS_IN_FLIGHT,
    ) -> None:
        self.session = session
        self.sessions = sessions
        self.limits = limits
        self._slots = asyncio.Semaphore(max_in_flight)
        # in the order read: each prompt's answer to come, or the protocol error that ends the call
        self._order: asyncio.Queue[asyncio.Future[pb.PromptAck] | ServiceError] = asyncio.Queue()
        self._head: asyncio.Future[pb.PromptAck] | None = None  # the answer the acker awaits
        self._tasks: list[asyncio.Task] = []

    def start(self, requests: AsyncIterator[pb.ClientEvent]) -> None:
        self._tasks = [
            asyncio.create_task(self._read(requests), name=f"interact-read-{self.session.id}"),
            asyncio.create_task(self._ack(), name=f"interact-ack-{self.session.id}"),
        ]

    def sent(self) -> None:
        """The stream has handed one ack to gRPC: its slot is free."""
        self._slots.release()

    async def close(self) -> list[pb.PromptAck]:
        """The session has ended: stop reading, and the acks of every prompt read and not yet
        answered, in order. A prompt still waiting for the engine is rejected at once when the
        session was cancelled or failed; on a normal finish the engine has answered it already
        or does so at once (it answers every command before it reports the end)."""
        for task in self._tasks:
            task.cancel()
        waiting = [] if self._head is None else [self._head]
        self._head = None
        while not self._order.empty():
            item = self._order.get_nowait()
            if not isinstance(item, ServiceError):  # the call ends with `finished` instead
                waiting.append(item)
        acks = []
        for answer in waiting:
            if not answer.done() and self.session.state is not SessionState.FINISHED:
                answer.cancel()  # its late answer changes nothing: no chunk is left to show it
                acks.append(self._ended_first())
                continue
            await asyncio.wait([answer])
            acks.append(self._result(answer))
        return acks

    def stop(self) -> None:
        """The call is over: stop reading and acking, and forget prompts still waiting."""
        for task in self._tasks:
            task.cancel()
        if self._head is not None:
            self._head.cancel()
        while not self._order.empty():
            item = self._order.get_nowait()
            if isinstance(item, asyncio.Future):
                item.cancel()

    # ---- the two tasks --------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[pb.ClientEvent]) -> None:
        """Prompts go to the engine as they come; cancel ends the session; a protocol error
        ends the call once the prompts before it are acked. Half-closing leaves the session
        running."""
        try:
            while True:
                # room for one more prompt before reading on: a message read and then held
                # would be a prompt the end could leave unanswered
                await self._slots.acquire()
                message = await anext(requests, None)
                if message is None:
                    return
                kind = parse_client_event(message, first=False)
                if kind == "prompt":
                    self._order.put_nowait(self._steer(message.prompt))
                    continue
                self._slots.release()
                if kind == "cancel":
                    parse_cancel(message.cancel, self.session.id)  # this stream's session only
                    self.sessions.cancel(self.session, "cancelled by the client")
        except ServiceError as e:
            self._order.put_nowait(e)
        except grpc.aio.AioRpcError:
            pass  # the client's side broke; its stream is being cancelled too

    async def _ack(self) -> None:
        """Push each answer, in the order read, to the session's events while it runs."""
        while True:
            item = await self._order.get()
            if isinstance(item, ServiceError):
                self.session.push(item)  # the stream raises it: the call ends
                return
            self._head = item
            await asyncio.wait([item])  # not `await item`: cancelling this task must not cancel it
            if self.session.ended:
                return  # `finished` is queued: close() answers this one before it
            self._head = None
            self.session.push(self._result(item))

    # ---- one prompt -----------------------------------------------------------------------

    def _steer(self, update: pb.PromptUpdate) -> asyncio.Future[pb.PromptAck]:
        """The prompt's answer to come. Raises InvalidRequest for another session's id (a
        malformed sequence, not a bad prompt)."""
        try:
            spec = parse_prompt_update(update, self.limits, stream_session=self.session.id)
        except InvalidRequest as e:
            if e.field == "session_id":
                raise
            answer = asyncio.get_running_loop().create_future()
            answer.set_result(self._rejection(str(e)))
            return answer
        return asyncio.ensure_future(self._apply(spec))

    async def _apply(self, spec: PromptSpec) -> pb.PromptAck:
        try:
            applied = await self.sessions.update_prompt(spec, self.session.owner)
            return convert.prompt_ack(applied, self.session.id)
        except ServiceError as e:  # bad from_chunk, nothing left to steer, worker down
            return self._rejection(str(e))

    def _result(self, answer: asyncio.Future[pb.PromptAck]) -> pb.PromptAck:
        if answer.cancelled():
            return self._ended_first()
        error = answer.exception()
        if error is not None:  # a bug: still one ack per prompt, and a log line saying what
            event(
                logger,
                "interact.prompt_failed",
                self.session.id,
                level=logging.ERROR,
                error=f"{type(error).__name__}: {error}",
            )
            return self._rejection(f"the server failed to apply it ({type(error).__name__})")
        return answer.result()

    def _ended_first(self) -> pb.PromptAck:
        state = self.session.state.value
        return self._rejection(
            f"session {self.session.id!r} ended ({state}) before this prompt was applied"
        )

    def _rejection(self, reason: str) -> pb.PromptAck:
        return pb.PromptAck(session_id=self.session.id, prompt_version=0, rejection=reason)
