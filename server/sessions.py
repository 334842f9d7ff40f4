"""Sessions as the server tracks them: open, steer, cancel, stream bookkeeping, retention.

The worker owns generation; this side owns everything a client can see: state, stats, the
prompt timeline, and each session's event queue, which the stream reads in order (chunks,
then the end). Ended sessions stay visible to GetSession for `ttl_s`, then are forgotten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass

import grpc

from engine import ipc
from engine.logs import event
from scheduler.session import SessionParams, SessionState
from server.auth import ANONYMOUS
from server.config import Security
from server.errors import (
    InvalidRequest,
    NotForkable,
    NotSteerable,
    ServerFull,
    SessionExists,
    SessionNotFound,
    Unavailable,
)
from server.metrics import Metrics
from server.quota import PrincipalQuota, Slot
from server.supervisor import Supervisor
from server.validation import PromptSpec, complete_fork

logger = logging.getLogger(__name__)


# How an engine-side end reaches the client; FAILED (an engine error) is INTERNAL.
_END_CODES = {
    SessionState.FINISHED: grpc.StatusCode.OK,
    SessionState.CANCELLED: grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class SessionEnd:
    """The last item of a session's event queue."""

    state: SessionState  # FINISHED / CANCELLED / FAILED
    code: grpc.StatusCode
    message: str


@dataclass
class WorkerReport:
    """What the worker last said of itself; one, shared by every session's record (GetSession)."""

    memory: ipc.DeviceMemory | None = None  # None while the worker (re)starts


def fork_timeline(
    source: LiveSession, fork: SessionParams
) -> tuple[tuple[tuple[int, str, int], ...], int]:
    """A fork's timeline and newest version, as the engine makes it: the source's entries
    before the fork chunk (all of them when the fork gives none), then the fork's own."""
    at = fork.fork.at_chunk
    if not fork.prompts:
        return source.timeline, source.prompt_version
    kept = [e for e in source.timeline if e[0] < at]
    version = max((v for _, _, v in kept), default=0)
    own = [(f, text, version + i + 1) for i, (f, text) in enumerate(fork.prompts)]
    return (*kept, *own), version + len(own)


def session_key(owner: str, session_id: str) -> str:
    """The engine's name for a session: ids are per principal, so two principals may both
    have a session `demo` and neither can learn of the other's (`/` is in neither alphabet)."""
    return f"{owner}/{session_id}"


class LiveSession:
    """One session's client-visible record and its event queue."""

    def __init__(
        self,
        params: SessionParams,
        session_id: str,
        owner: str,
        slot: Slot | None = None,
        worker: WorkerReport | None = None,
    ) -> None:
        self.id = session_id  # what its owner calls it
        self.worker = worker or WorkerReport()  # the worker's (device memory), shown with it
        self.key = params.session_id  # what the engine calls it: session_key(owner, id)
        self.owner = owner  # the principal that opened it; only it (and admins) may see it
        self.slot = slot  # its claim on the owner's session limit, released when it ends
        # the request as opened, without its image or video: nothing is held past need
        self.spec = dataclasses.replace(params, image=None, video=None)
        self.seed = params.seed
        self.state = SessionState.QUEUED
        self.progressed = False  # a SessionProgress has been applied (newer than the open's answer)
        self.queue_position = 0
        self.next_steerable_chunk: int | None = 0
        self.timeline = tuple((f, text, i + 1) for i, (f, text) in enumerate(params.prompts))
        self.prompt_version = len(params.prompts)
        self.initial_timeline = self.timeline  # as it started (a fork's: sessions.fork_timeline)
        self.accepted_at = time.monotonic()
        self.time_to_first_chunk_s: float | None = None
        self.last_chunk_at: float | None = None
        self.ended_at: float | None = None
        self.chunks_done = 0  # chunks streamed
        self.frames_done = 0  # frames streamed
        self.end: SessionEnd | None = None
        self._events: asyncio.Queue[ipc.ChunkReady | SessionEnd | object] = asyncio.Queue()

    @property
    def ended(self) -> bool:
        return self.end is not None

    @property
    def wall_time_s(self) -> float:
        return (self.ended_at or time.monotonic()) - self.accepted_at

    async def next_event(self) -> ipc.ChunkReady | SessionEnd | object:
        return await self._events.get()

    def push(self, item: ipc.ChunkReady | SessionEnd | object) -> None:
        self._events.put_nowait(item)

    def drop_events(self) -> None:
        """Its stream is gone: chunks nobody will read are not kept for the TTL."""
        while not self._events.empty():
            self._events.get_nowait()


class SessionManager:
    def __init__(
        self,
        supervisor: Supervisor,
        metrics: Metrics,
        ttl_s: float,
        startup_timeout_s: float,
        security: Security | None = None,
    ) -> None:
        security = security or Security()
        self.admins = frozenset(security.admin_principals)
        self.quota = PrincipalQuota(security.principal_max_sessions, security.principal_max_queued)
        self.supervisor = supervisor
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.startup_timeout_s = startup_timeout_s
        self.sessions: dict[str, LiveSession] = {}
        self.worker = WorkerReport()
        self.draining = False
        self._opening: dict[str, asyncio.Future] = {}
        self._prompts: dict[int, asyncio.Future] = {}
        self._request_ids = itertools.count(1)
        self._chunk_interval_s: float | None = None  # smoothed, for the retry hint

    # ---- requests -------------------------------------------------------------------------

    async def open(
        self, params: SessionParams, owner: str = ANONYMOUS, slot: Slot | None = None
    ) -> LiveSession:
        """Hand a validated request (inputs decoded) to the worker; returns once it is running
        or queued. The record goes down as it is, with the session id and seed now set. The
        session belongs to `owner`; `slot` (its claim on the owner's limit) is released when
        it ends."""
        source = None
        if params.fork is not None:  # only the owner's own session: NOT_FOUND otherwise
            source = self.get(params.fork.session_id, owner)
            params = complete_fork(params, source.spec)
        params = await self._reserve(params, owner, slot)
        session = self.sessions[params.session_id]
        if source is not None:
            session.timeline, session.prompt_version = fork_timeline(source, params)
            session.initial_timeline = session.timeline
        try:
            answer = await self._ask(self._opening, session.key, ipc.OpenSession(params))
        except asyncio.CancelledError:  # the client left while we waited for the worker
            self.cancel(session, "client went away while the session opened")
            raise
        except Unavailable:
            del self.sessions[session.key]
            raise
        if isinstance(answer, ipc.OpenRefused):
            del self.sessions[session.key]
            if answer.reason == "full":
                raise ServerFull(answer.message, self.retry_after_ms())
            if answer.reason == "internal":
                raise RuntimeError(f"the engine could not open the session: {answer.message}")
            if answer.reason == "fork":
                raise NotForkable(answer.message.replace(params.fork.session_id, source.id))
            raise InvalidRequest("request", answer.message)
        if not session.ended and not session.progressed:
            # events that came with the answer (admission, an end) were applied while this
            # coroutine waited to resume: they are newer than the answer
            session.queue_position = answer.queue_position
            session.state = SessionState.QUEUED if answer.queue_position else SessionState.RUNNING
        self._refresh_gauges()
        event(
            logger,
            "session.opened",
            session.key,
            mode=params.mode,
            chunks=params.num_chunks,
            size=f"{params.width}x{params.height}",
            queue_position=answer.queue_position,
        )
        return session

    async def _reserve(self, params: SessionParams, owner: str, slot: Slot | None) -> SessionParams:
        """Claim the session id in the owner's namespace once the worker is up (or refuse); the
        record with its engine key and seed set."""
        self._refuse_if_draining()
        session_id = params.session_id or uuid.uuid4().hex
        key = session_key(owner, session_id)
        if key in self.sessions:
            raise SessionExists(session_id)
        await self.supervisor.wait_ready(self.startup_timeout_s)
        self._refuse_if_draining()
        if key in self.sessions:  # taken while we waited
            raise SessionExists(session_id)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        params = dataclasses.replace(params, session_id=key, seed=seed)
        self.sessions[key] = LiveSession(params, session_id, owner, slot, self.worker)
        return params

    async def _ask(self, pending: dict, key: object, command: ipc.Command) -> ipc.Event:
        """Send a command and wait for the event that answers it (matched by key)."""
        reply = asyncio.get_running_loop().create_future()
        pending[key] = reply
        try:
            self.supervisor.send(command)
            return await reply
        finally:
            pending.pop(key, None)

    async def update_prompt(self, prompt: PromptSpec, owner: str = ANONYMOUS) -> ipc.PromptApplied:
        session = self.get(prompt.session_id, owner)
        if session.ended:
            raise NotSteerable(
                f"session {session.id!r} has ended ({session.state.value}); "
                "there is no chunk left to steer"
            )
        n = session.spec.num_chunks
        if prompt.from_chunk is not None and n is not None and prompt.from_chunk >= n:
            raise InvalidRequest(
                "from_chunk", f"{prompt.from_chunk} is past the session's last chunk ({n - 1})"
            )
        request_id = next(self._request_ids)
        command = ipc.UpdatePrompt(
            request_id, session.key, prompt.text, prompt.from_chunk, prompt.replace_later
        )
        answer = await self._ask(self._prompts, request_id, command)
        if isinstance(answer, ipc.PromptRejected):
            self.metrics.prompt_updates.labels("rejected").inc()
            raise NotSteerable(f"session {session.id!r}: {answer.message}")
        # Concurrent prompts (Interact): the engine sends the timeline with the last answer of a
        # batch only, and answers may resume here out of order; keep the newest.
        if answer.timeline is not None and answer.version > session.prompt_version:
            session.timeline, session.prompt_version = answer.timeline, answer.version
        self.metrics.prompt_updates.labels("accepted").inc()
        event(
            logger,
            "session.prompt",
            session.key,
            version=answer.version,
            from_chunk=answer.from_chunk,
        )
        return answer

    def cancel(
        self,
        session: LiveSession,
        reason: str,
        state: SessionState = SessionState.CANCELLED,
        code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
    ) -> SessionState:
        """End a session now (the worker frees it within one step); its state afterwards.
        Callers find the session first (`get`, or `visible` for a client's call)."""
        if session.ended:
            return session.state
        if self.supervisor.ready.is_set():
            self.supervisor.send(ipc.CancelSession(session.key))
        self._end(session, state, code, reason)
        return session.state

    def get(self, session_id: str, owner: str = ANONYMOUS) -> LiveSession:
        """`owner`'s session `session_id`."""
        session = self.sessions.get(session_key(owner, session_id))
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def visible(self, session_id: str, principal: str) -> LiveSession:
        """The session `principal` means by `session_id`: its own; for an admin also another
        principal's, by its id when only one principal has it, else as OWNER/ID. NOT_FOUND
        otherwise, worded as for an unknown id: nobody learns of another's sessions."""
        owner, _, name = session_id.rpartition("/")
        session = self.sessions.get(session_key(owner or principal, name))
        if session is None and not owner and principal in self.admins:
            same = [s for s in self.sessions.values() if s.id == name]
            if len(same) > 1:
                raise InvalidRequest(
                    "session_id",
                    f"{len(same)} principals have a session {name!r}; name it as OWNER/{name} "
                    f"(owners: {', '.join(sorted(s.owner for s in same))})",
                )
            session = same[0] if same else None
        if session is None or not self.may_see(principal, session):
            raise SessionNotFound(session_id)
        return session

    def may_see(self, principal: str, session: LiveSession) -> bool:
        return session.owner == principal or principal in self.admins

    def listed(self, principal: str) -> list[LiveSession]:
        """The sessions `principal` may see, newest first."""
        mine = [s for s in self.sessions.values() if self.may_see(principal, s)]
        return sorted(mine, key=lambda s: s.accepted_at, reverse=True)

    def live(self) -> list[LiveSession]:
        return [s for s in self.sessions.values() if not s.ended]

    # ---- stream bookkeeping ---------------------------------------------------------------

    def chunk_streamed(self, session: LiveSession, chunk: ipc.ChunkReady) -> None:
        """The stream has sent this chunk: count it, and let the engine make another."""
        now = time.monotonic()
        if session.time_to_first_chunk_s is None:
            session.time_to_first_chunk_s = now - session.accepted_at
            self.metrics.time_to_first_chunk.observe(session.time_to_first_chunk_s)
        else:
            interval = now - session.last_chunk_at
            self.metrics.inter_chunk_latency.observe(interval)
            old = self._chunk_interval_s
            self._chunk_interval_s = interval if old is None else 0.8 * old + 0.2 * interval
        session.last_chunk_at = now
        session.chunks_done += 1
        session.frames_done += chunk.frame_count
        if not session.ended and self.supervisor.ready.is_set():
            self.supervisor.send(ipc.Consumed(session.key))

    def release(
        self, session: LiveSession, reason: str, code: grpc.StatusCode = grpc.StatusCode.CANCELLED
    ) -> None:
        """The stream is over; a session still going has lost its client. What it had not
        sent is dropped: an ended session keeps its summary only."""
        if not session.ended:
            self.cancel(session, reason, code=code)
        session.drop_events()

    def retry_after_ms(self) -> int:
        """About when a slot may free up: a chunk's time (a session may finish by then)."""
        interval = self._chunk_interval_s or 1.0
        return int(min(60.0, max(0.25, 2 * interval)) * 1000)

    def sweep(self) -> None:
        """Forget sessions that ended more than ttl_s ago."""
        horizon = time.monotonic() - self.ttl_s
        for key in [s.key for s in self.sessions.values() if s.ended and s.ended_at < horizon]:
            del self.sessions[key]

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise Unavailable(
                "the server is shutting down and takes no new sessions; retry on another replica"
            )

    # ---- from the worker ------------------------------------------------------------------

    def on_event(self, message: ipc.Event) -> None:
        if isinstance(message, ipc.SessionOpened | ipc.OpenRefused):
            self._answer(self._opening.get(message.session_id), message)
        elif isinstance(message, ipc.PromptApplied | ipc.PromptRejected):
            self._answer(self._prompts.get(message.request_id), message)
        elif isinstance(message, ipc.DeviceMemory):
            self.worker.memory = message
            self.metrics.observe_device_memory(message)
        else:
            session = self.sessions.get(message.session_id)
            # a session that ended here first (cancel, disconnect): the worker is catching up
            if session is not None and not session.ended:
                self._session_event(session, message)

    def _session_event(self, session: LiveSession, message: ipc.Event) -> None:
        if isinstance(message, ipc.SessionProgress):
            self._progress(session, message)
        elif isinstance(message, ipc.ChunkReady):
            self.metrics.chunks_generated.inc()
            self.metrics.frames_generated.inc(message.frame_count)
            session.push(message)
        elif isinstance(message, ipc.SessionEnded):
            code = _END_CODES.get(message.state, grpc.StatusCode.INTERNAL)
            self._end(session, message.state, code, message.error or "")

    @staticmethod
    def _answer(reply: asyncio.Future | None, message: ipc.Event) -> None:
        if reply is not None and not reply.done():
            reply.set_result(message)

    def _progress(self, session: LiveSession, progress: ipc.SessionProgress) -> None:
        admitted = session.state == SessionState.QUEUED and progress.state == SessionState.RUNNING
        session.progressed = True
        session.state = progress.state
        session.queue_position = progress.queue_position
        session.next_steerable_chunk = progress.next_steerable_chunk
        if admitted:
            event(logger, "session.admitted", session.key, waited_s=session.wall_time_s)
            self._refresh_gauges()

    def on_worker_lost(self, message: str) -> None:
        """The worker died: every request waiting on it and every live session fails."""
        self.worker.memory = None
        self.metrics.observe_device_memory(None)
        for reply in [*self._opening.values(), *self._prompts.values()]:
            if not reply.done():
                reply.set_exception(Unavailable(message))
        for session in self.live():
            self._end(session, SessionState.FAILED, grpc.StatusCode.UNAVAILABLE, message)

    def _end(
        self, session: LiveSession, state: SessionState, code: grpc.StatusCode, message: str
    ) -> None:
        session.end = SessionEnd(state, code, message)
        session.state = state
        session.ended_at = time.monotonic()
        session.push(session.end)
        if session.slot is not None:
            session.slot.release()
        self.metrics.sessions_finished.labels(state.value, code.name).inc()
        self._refresh_gauges()
        event(
            logger,
            "session.ended",
            session.key,
            state=state.value,
            code=code.name,
            streamed=session.chunks_done,
            wall_s=session.wall_time_s,
            reason=message or None,
        )

    def _refresh_gauges(self) -> None:
        live = self.live()
        self.metrics.sessions_active.set(sum(s.state == SessionState.RUNNING for s in live))
        self.metrics.sessions_queued.set(sum(s.state == SessionState.QUEUED for s in live))
