"""Sessions as the server tracks them: open, steer, cancel, stream bookkeeping, retention.

The worker owns generation; this side owns everything a client can see: state, stats, the
prompt timeline, and each session's event queue, which the stream reads in order (chunks,
then the end). Ended sessions stay visible to GetSession for `ttl_s`, then are forgotten.

A session with a detach grace outlives a broken call: it is detached (the server stops
acknowledging chunks, so the engine pauses after two), keeps its last few encoded chunks, and
is cancelled when the grace runs out unless Attach resumes it first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass

import grpc

from engine import ipc
from engine.logs import event
from engine.snapshot_format import SnapshotError
from proto import video_generation_pb2 as pb
from scheduler.session import SessionParams, SessionState
from server.auth import ANONYMOUS
from server.config import Security
from server.errors import (
    InvalidRequest,
    NotForkable,
    NotSteerable,
    ResumeNotFound,
    ServerFull,
    ServiceError,
    SessionExists,
    SessionFailed,
    SessionNotFound,
    SnapshotUnusable,
    Unavailable,
)
from server.metrics import Metrics
from server.quota import PrincipalQuota, Slot
from server.snapshots import NOT_IN_STORE, SnapshotNotFound, SnapshotStore
from server.supervisor import Supervisor
from server.validation import PromptSpec, complete_fork, complete_resume

logger = logging.getLogger(__name__)

# What a session with a detach grace keeps for Attach: its last chunks' wire messages, at most
# this many, and no more bytes than this beyond the newest chunk (a 1280x720 RAW_RGB24 chunk is
# 66 MB; fMP4 chunks are far smaller).
KEPT_CHUNKS = 4
KEPT_BYTES = 64 << 20


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
    resume: tuple[str, int] | None = None  # (token, from chunk): written to a snapshot first


class NotAttachable(SessionFailed):
    """Attach refused, with its own code: FAILED_PRECONDITION (another call streams the session,
    or the chunk is no longer kept) or NOT_FOUND (the session ended)."""


@dataclass
class KeptChunk:
    index: int  # the chunk's output index
    messages: list[pb.GenerateEvent]  # as the stream sent them (a header, then frames if raw)
    nbytes: int


class KeptChunks:
    """A session's last encoded chunks, for a client that lost its call mid-chunk: the newest
    always, older ones while within KEPT_CHUNKS and KEPT_BYTES."""

    def __init__(self, most: int = KEPT_CHUNKS, most_bytes: int = KEPT_BYTES) -> None:
        self.most, self.most_bytes = most, most_bytes
        self._chunks: deque[KeptChunk] = deque()
        self.nbytes = 0
        self.init_segment = b""  # fMP4: every chunk's init segment is the same; kept once

    def add(self, index: int, messages: list[pb.GenerateEvent]) -> None:
        first = messages[0].chunk
        if first.init_segment and not self.init_segment:
            self.init_segment = first.init_segment
        nbytes = sum(m.ByteSize() for m in messages)
        self._chunks.append(KeptChunk(index, messages, nbytes))
        self.nbytes += nbytes
        while len(self._chunks) > 1 and (
            len(self._chunks) > self.most or self.nbytes > self.most_bytes
        ):
            self.nbytes -= self._chunks.popleft().nbytes

    @property
    def oldest(self) -> int | None:
        return self._chunks[0].index if self._chunks else None

    def since(self, index: int) -> list[KeptChunk]:
        return [c for c in self._chunks if c.index >= index]

    def clear(self) -> None:
        self._chunks.clear()
        self.nbytes = 0
        self.init_segment = b""


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
        self.spec = dataclasses.replace(params, image=None, video=None, resume=None)
        self.seed = params.seed
        self.state = SessionState.QUEUED
        self.progressed = False  # a SessionProgress has been applied (newer than the open's answer)
        self.queue_position = 0
        self.next_steerable_chunk: int | None = 0
        # where it can be forked, as the worker last said (it outlives the session by
        # --fork-ttl-s); None: nowhere
        self.fork_history: ipc.ForkHistory | None = None
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
        # Reattach (GenerateRequest.detach_grace_s; 0: a broken call cancels it)
        self.detach_grace_s = 0.0
        self.attached = True  # a call streams it (the one that opened it, or an Attach)
        self.detached_at: float | None = None  # since when it waits for Attach, paused
        self.last_snapshot: tuple[str, int] | None = None  # --snapshot-every: (token, chunk)
        self.expiry: asyncio.TimerHandle | None = None  # cancels it when the grace runs out
        self.kept = KeptChunks()  # its last chunks' messages (only with a grace)
        self.next_chunk = params.fork.at_chunk if params.fork is not None else 0  # to stream
        # taken from the queue and not yet acknowledged: its call broke while sending it
        self.unacked: ipc.ChunkReady | None = None

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

    def put_back(self, item: ipc.ChunkReady | SessionEnd | object) -> None:
        """An event taken by a call that broke before sending it: first in line again."""
        rest = []
        while not self._events.empty():
            rest.append(self._events.get_nowait())
        for queued in (item, *rest):
            self._events.put_nowait(queued)

    @property
    def empty(self) -> bool:
        """Nothing waits to be sent: no queued event, no chunk whose sending was cut short."""
        return self._events.empty() and self.unacked is None

    def drop_events(self) -> None:
        """Its stream is gone: chunks nobody will read are not kept for the TTL."""
        while not self._events.empty():
            self._events.get_nowait()
        self.kept.clear()

    def drop_acks(self) -> None:
        """A broken Interact call's prompt acks (and protocol errors) were its own: an Attach
        gets the output only."""
        items = []
        while not self._events.empty():
            items.append(self._events.get_nowait())
        for item in items:
            if isinstance(item, ipc.ChunkReady | SessionEnd):
                self._events.put_nowait(item)


class SessionManager:
    def __init__(
        self,
        supervisor: Supervisor,
        metrics: Metrics,
        ttl_s: float,
        startup_timeout_s: float,
        security: Security | None = None,
        store: SnapshotStore | None = None,
        snapshot_every: int = 0,
    ) -> None:
        security = security or Security()
        self.store = store  # --snapshot-dir; None: snapshots off
        self.snapshot_every = snapshot_every  # chunks between periodic snapshots; 0 = none
        self._periodic: set[asyncio.Task] = set()  # periodic snapshots being written
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
        self._snapshots: dict[int, asyncio.Future] = {}
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
        source, snapshot = None, None
        if params.fork is not None:  # only the owner's own session: NOT_FOUND otherwise
            source = self.get(params.fork.session_id, owner)
            params = complete_fork(params, source.spec)
        if isinstance(params.resume, str):  # the token: the file from the store
            data, snapshot = await self._read_snapshot(params.resume, owner)
            params = complete_resume(params, snapshot, data)
        params = await self._reserve(params, owner, slot)
        session = self.sessions[params.session_id]
        if source is not None:
            session.timeline, session.prompt_version = fork_timeline(source, params)
            session.initial_timeline = session.timeline
        if snapshot is not None:  # the timeline with its versions, in output indices
            prefix = snapshot["spec"]["prefix_chunks"]
            session.timeline = tuple((f - prefix, t, v) for f, t, v in snapshot["timeline"])
            session.initial_timeline = session.timeline
            session.prompt_version = max((v for _, _, v in session.timeline), default=0)
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
            if answer.reason == "snapshot":
                raise SnapshotUnusable(answer.message)
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

    async def _read_snapshot(self, token: str, owner: str) -> tuple[bytes, dict]:
        """The snapshot file a resume token names, and its header; only its taker's."""
        store = self._store()
        try:  # file I/O (maybe over a network): off the event loop
            data, meta = await asyncio.to_thread(store.get, token)
        except SnapshotNotFound as e:
            raise ResumeNotFound(str(e)) from None
        except SnapshotError as e:
            raise SnapshotUnusable(str(e)) from None
        if meta.get("owner") != owner:  # worded as for a token never written: nothing leaks
            raise ResumeNotFound(NOT_IN_STORE)
        return data, meta

    def _store(self) -> SnapshotStore:
        if self.store is None:
            raise SnapshotUnusable(
                "snapshots are off on this server: start it with --snapshot-dir (a directory "
                "its replicas share, or an fsspec URL)"
            )
        return self.store

    async def snapshot(self, session_id: str, owner: str) -> tuple[str, int, int]:
        """Write `owner`'s session at its newest chunk boundary to the store: (token, the
        chunk a resume streams from, the file's size)."""
        session = self.get(session_id, owner)  # NOT_FOUND for anyone else's
        store = self._store()
        request_id = next(self._request_ids)
        command = ipc.TakeSnapshot(request_id, session.key, owner)
        answer = await self._ask(self._snapshots, request_id, command)
        if answer.data is None:
            raise SnapshotUnusable(answer.error.replace(session.key, session.id))
        token = await asyncio.to_thread(store.put, answer.data)
        event(
            logger,
            "session.snapshot",
            session.key,
            bytes=len(answer.data),
            from_chunk=answer.from_chunk,
        )
        return token, answer.from_chunk, len(answer.data)

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
        resume: tuple[str, int] | None = None,
    ) -> SessionState:
        """End a session now (the worker frees it within one step); its state afterwards.
        Callers find the session first (`get`, or `visible` for a client's call). `resume`:
        the snapshot it was just written to, for its client (a drain)."""
        if not session.ended:
            if self.supervisor.ready.is_set():
                self.supervisor.send(ipc.CancelSession(session.key))
            self._end(session, state, code, reason, resume)
        if session.detached_at is not None:  # nobody reads it, and Attach now finds it ended
            self._undetach(session)
            session.drop_events()
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
        session.unacked = None
        if not session.ended and self.supervisor.ready.is_set():
            self.supervisor.send(ipc.Consumed(session.key))
        every = self.snapshot_every
        if (
            every
            and self.store is not None
            and not session.ended
            and session.chunks_done % every == 0
        ):
            self._periodic.add(
                asyncio.get_running_loop().create_task(self._periodic_snapshot(session))
            )

    async def _periodic_snapshot(self, session: LiveSession) -> None:
        """--snapshot-every: the session written to the store every N chunks; if its worker
        dies, its call ends with the newest one's token (docs/service.md)."""
        try:
            token, from_chunk, _ = await self.snapshot(session.id, session.owner)
        except (ServiceError, OSError) as e:  # a full disk must not end the session
            event(logger, "session.snapshot_failed", session.key, error=str(e))
            return
        finally:
            self._periodic.discard(asyncio.current_task())
        session.last_snapshot = (token, from_chunk)

    def chunk_taken(
        self, session: LiveSession, chunk: ipc.ChunkReady, messages: list[pb.GenerateEvent]
    ) -> None:
        """The stream is about to send this chunk: keep its messages for Attach (with a grace),
        before a broken call can lose them."""
        session.unacked = chunk
        session.next_chunk = chunk.chunk_index + 1
        if session.detach_grace_s:
            session.kept.add(chunk.chunk_index, messages)

    def release(
        self,
        session: LiveSession,
        reason: str,
        code: grpc.StatusCode = grpc.StatusCode.CANCELLED,
        detach: bool = False,
    ) -> None:
        """The stream is over; a session still going has lost its client. `detach` (its call
        broke) with a grace and something left to send: it waits for Attach. Otherwise what it
        had not sent is dropped: an ended session keeps its summary only."""
        session.attached = False
        if detach and session.detach_grace_s and not (session.ended and session.empty):
            self._detach(session)
            return
        if not session.ended:
            self.cancel(session, reason, code=code)
        session.drop_events()

    def attach(
        self, session_id: str, from_chunk: int, owner: str
    ) -> tuple[LiveSession, list[KeptChunk]]:
        """`owner`'s detached session, now attached to a new call, and the kept chunks to send
        again from `from_chunk` on; the rest follow from its queue."""
        session = self.get(session_id, owner)  # NOT_FOUND for anyone else's
        if session.attached:
            raise NotAttachable(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session_id!r} is streaming to another call; one reader at a time: "
                "break that call first",
            )
        if session.detached_at is None:
            why = f" ({session.end.message})" if session.end and session.end.message else ""
            raise NotAttachable(
                grpc.StatusCode.NOT_FOUND,
                f"session {session_id!r} has ended ({session.state.value}{why}); there is "
                "nothing to attach to",
            )
        oldest, _ = self.attach_range(session)
        if from_chunk < oldest:
            raise NotAttachable(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session_id!r}: chunk {from_chunk} is no longer kept; the oldest kept "
                f"is chunk {oldest} (the last {KEPT_CHUNKS} streamed); attach from {oldest}..."
                f"{session.next_chunk}",
            )
        if from_chunk > session.next_chunk:
            raise InvalidRequest(
                "from_chunk",
                f"{from_chunk} is past the session's next chunk {session.next_chunk}; use "
                f"{oldest}..{session.next_chunk}",
            )
        self._undetach(session)
        session.attached = True
        session.drop_acks()
        event(logger, "session.attached", session.key, from_chunk=from_chunk)
        return session, session.kept.since(from_chunk)

    @staticmethod
    def attach_range(session: LiveSession) -> tuple[int, int]:
        """The chunks an Attach can start from: the oldest kept one .. the next to stream."""
        oldest = session.kept.oldest if session.kept.oldest is not None else session.next_chunk
        return oldest, session.next_chunk

    def _detach(self, session: LiveSession) -> None:
        session.detached_at = time.monotonic()
        session.expiry = asyncio.get_running_loop().call_later(
            session.detach_grace_s, self._expire, session
        )
        self._refresh_gauges()
        event(
            logger,
            "session.detached",
            session.key,
            grace_s=session.detach_grace_s,
            next_chunk=session.next_chunk,
        )

    def _expire(self, session: LiveSession) -> None:
        """Its grace ran out with no Attach: cancel it (if it still runs) and drop what it kept."""
        self._undetach(session)
        self.cancel(session, f"detached longer than its grace ({session.detach_grace_s:g} s)")
        session.drop_events()

    def _undetach(self, session: LiveSession) -> None:
        session.expiry.cancel()
        session.expiry = session.detached_at = None
        self._refresh_gauges()

    def chunk_interval_s(self) -> float:
        """The recent time between two chunks of a stream (smoothed over all); 1 s before any."""
        return self._chunk_interval_s or 1.0

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
        elif isinstance(message, ipc.SnapshotTaken):
            self._answer(self._snapshots.get(message.request_id), message)
        elif isinstance(message, ipc.DeviceMemory):
            self.worker.memory = message
            self.metrics.observe_device_memory(message)
        elif isinstance(message, ipc.ForkHistory):
            session = self.sessions.get(message.session_id)
            if session is not None:  # ended ones too: their history outlives them
                held = message.first_chunk is not None
                session.fork_history = message if held else None
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
        for session in self.sessions.values():  # the fork points died with the worker
            session.fork_history = None
        for reply in [*self._opening.values(), *self._prompts.values(), *self._snapshots.values()]:
            if not reply.done():
                reply.set_exception(Unavailable(message))
        for session in self.live():
            # its newest periodic snapshot, if any: the client can continue from there
            self._end(
                session,
                SessionState.FAILED,
                grpc.StatusCode.UNAVAILABLE,
                message,
                session.last_snapshot,
            )

    def _end(
        self,
        session: LiveSession,
        state: SessionState,
        code: grpc.StatusCode,
        message: str,
        resume: tuple[str, int] | None = None,
    ) -> None:
        session.end = SessionEnd(state, code, message, resume)
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
        detached = sum(s.detached_at is not None for s in self.sessions.values())
        self.metrics.sessions_detached.set(detached)
        live = self.live()
        self.metrics.sessions_active.set(sum(s.state == SessionState.RUNNING for s in live))
        self.metrics.sessions_queued.set(sum(s.state == SessionState.QUEUED for s in live))
