"""The chunk scheduler: which sessions' windows advance in the next engine step.

There is no "prefill" and no "decode" phase: each step moves every scheduled chunk one step along
the time grid, and all scheduled sessions (with their CFG branches) share one DiT forward.
Sessions are admitted by memory (KV cache + latents) into a budget, wait in a bounded queue
otherwise, and are refused past it. A session whose consumer lags (its output queue is full)
sits out until the consumer catches up. Among the rest, those served least go first, so every
session advances at the same rate in chunks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from scheduler.plan import SessionStep, StepOutput, StepPlan
from scheduler.session import ChunkOut, ForkMark, PromptEntry, Session, SessionState


@dataclass(frozen=True)
class SchedulerConfig:
    memory_budget_bytes: int = 8 << 30  # KV cache + latents of all running sessions, bytes
    max_queued: int = 16  # sessions waiting for memory; one more is refused
    max_chunk_slots: int = 512  # chunk slots per forward (each CFG branch counts), chunks
    output_queue_chunks: int = 2  # decoded chunks a session may hold before it pauses
    max_running: int | None = None  # sessions generating at once (None: memory decides alone)
    fork_history: int = 8  # chunks back a session can be forked at (0: no fork points kept)
    fork_ttl_s: float = 120.0  # how long an ended session can still be forked

    def __post_init__(self) -> None:
        if (
            self.memory_budget_bytes <= 0
            or self.max_chunk_slots < 1
            or self.output_queue_chunks < 1
        ):
            raise ValueError(
                "memory_budget_bytes, max_chunk_slots, output_queue_chunks must be > 0"
            )
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be >= 1 or None, got {self.max_running}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.fork_history < 0 or self.fork_ttl_s < 0:
            raise ValueError("fork_history and fork_ttl_s must be >= 0")


class AdmissionRefused(Exception):
    """No memory now and the queue is full; the message says how full."""


class RequestTooLarge(AdmissionRefused):
    """The request needs more memory than the whole budget: it can never be admitted."""


class ForkUnavailable(ValueError):
    """No fork point there: the session is unknown here, or the chunk is outside its history."""


@dataclass(frozen=True)
class ForkRange:
    """The chunks a session can be forked at now (output indices, both inclusive)."""

    first_chunk: int
    last_chunk: int
    ended_at: float | None  # monotonic time the session ended (its history then has a TTL)


class ChunkScheduler:
    def __init__(self, config: SchedulerConfig, branches: int) -> None:
        self.config = config
        self.branches = branches  # forward slots per chunk: 3 for cfg 3, about 1 for cfg 1
        self.sessions: dict[str, Session] = {}
        self._queue: deque[str] = deque()
        self._freed: list[str] = []  # ended since the last plan; the next plan frees them
        # ended sessions that can still be forked (their fork marks), oldest end first
        self.histories: dict[str, Session] = {}
        self._forgotten: list[str] = []  # histories dropped since the last plan

    # ---- requests from the outside ---------------------------------------------------------

    def add(self, session: Session) -> None:
        sid = session.session_id
        if sid in self.sessions and not self.sessions[sid].finished:
            raise ValueError(f"session id {sid!r} is already in use")
        budget = self.config.memory_budget_bytes
        if session.estimated_bytes > budget:
            raise RequestTooLarge(
                f"this request needs {session.estimated_bytes / 2**20:.0f} MiB of KV cache and "
                f"latents, more than the whole budget ({budget / 2**20:.0f} MiB): ask for a "
                "smaller size"
            )
        if sid in self.histories:  # the id is reused: the old session's history goes
            self._drop_history(sid)
        old = self.sessions.get(sid)
        if old is not None and old.fork_marks:
            self._drop_history(sid, old)
        if sid in self._freed:
            # an ended session's id reused before the next plan: the engine freed the old
            # session when it ended (Engine.cancel / Engine.step), and a free left in the plan
            # would now free the new one
            self._freed.remove(sid)
        if not self._queue and self._fits(session):
            self._start(session)
        elif len(self._queue) < self.config.max_queued:
            self._queue.append(sid)
        else:
            raise AdmissionRefused(
                f"server full: {self.running_count()} sessions running, {len(self._queue)} queued "
                f"(queue bound {self.config.max_queued})"
            )
        self.sessions[sid] = session

    def update_prompt(
        self, session_id: str, text: str, from_chunk: int | None = None, replace_later: bool = False
    ) -> PromptEntry:
        """Add a prompt from `from_chunk` (global index) on; a chunk that has already entered
        the window is too late, so the entry starts at the first chunk that has not."""
        session = self.get(session_id)
        if session.finished:
            raise ValueError(f"session {session_id!r} has ended ({session.state.value})")
        first_free = session.window.next_entering_chunk()
        if first_free is None:
            raise ValueError(f"session {session_id!r} admits no further chunks; nothing to steer")
        chunk = first_free if from_chunk is None else max(from_chunk, first_free)
        n = session.window.num_chunks
        if n is not None and chunk >= n:
            raise ValueError(
                f"chunk {chunk - session.prefix_chunks} is past the session's last chunk "
                f"{n - 1 - session.prefix_chunks}"
            )
        return session.timeline.add(chunk, text, replace_later)

    def cancel(
        self,
        session_id: str,
        state: SessionState = SessionState.CANCELLED,
        error: str | None = None,
    ) -> None:
        """End a session now and free all it holds; it leaves the next forward."""
        session = self.get(session_id)
        if session.finished:
            return
        session.state, session.error = state, error
        self._free(session)

    def get(self, session_id: str) -> Session:
        if session_id not in self.sessions:
            raise KeyError(session_id)
        return self.sessions[session_id]

    def forget(self, session_id: str) -> None:
        """Drop an ended session's record (after its stream has been closed); its fork marks
        stay in `histories` for fork_ttl_s."""
        session = self.sessions.get(session_id)
        if session is not None and session.finished:
            del self.sessions[session_id]
            if session.fork_marks and self.config.fork_ttl_s > 0:
                self.histories[session_id] = session
            elif session.fork_marks:
                self._drop_history(session_id, session)

    # ---- forks -----------------------------------------------------------------------------

    def fork_source(self, session_id: str) -> Session:
        """A running or recently ended session that may be forked."""
        session = self.sessions.get(session_id) or self.histories.get(session_id)
        if session is None:
            raise ForkUnavailable(
                f"session {session_id!r} cannot be forked: it is unknown here or ended more "
                f"than {self.config.fork_ttl_s:g} s ago"
            )
        return session

    def fork_mark(self, session_id: str, at_chunk: int) -> ForkMark:
        """The fork point of `session_id` at chunk `at_chunk` (global index)."""
        session = self.fork_source(session_id)
        marks = {m.chunk: m for m in session.fork_marks}
        if at_chunk not in marks:
            have = [session.to_output(m.chunk) for m in session.fork_marks]
            where = f"chunks {have[0]}..{have[-1]}" if have else "no chunk yet"
            raise ForkUnavailable(
                f"session {session_id!r} cannot be forked at chunk "
                f"{session.to_output(at_chunk)}: its fork history holds {where} (the last "
                f"{self.config.fork_history} chunks to start)"
            )
        return marks[at_chunk]

    def fork_range(self, session_id: str) -> ForkRange | None:
        """Where `session_id` (running, or ended and still held) can be forked now; None when
        it holds no fork point. Read-only: what fork_mark would accept."""
        session = self.sessions.get(session_id) or self.histories.get(session_id)
        if session is None:
            return None
        # a v2v prefix's chunks have no output index: a fork cannot name them
        chunks = [session.to_output(m.chunk) for m in session.fork_marks]
        chunks = [c for c in chunks if c >= 0]
        if not chunks:
            return None
        return ForkRange(chunks[0], chunks[-1], session.ended_at)

    def _drop_history(self, session_id: str, session: Session | None = None) -> None:
        session = session or self.histories.pop(session_id)
        session.fork_marks = []
        self._forgotten.append(session_id)

    def _expire_histories(self, now: float) -> None:
        ttl = self.config.fork_ttl_s
        for sid, session in list(self.histories.items()):
            if session.ended_at is None or now - session.ended_at >= ttl:
                self._drop_history(sid)

    def consumed(self, session_id: str) -> None:
        """The consumer took one more of this session's chunks: it may make another."""
        session = self.get(session_id)
        session.unconsumed = max(0, session.unconsumed - 1)

    # ---- accounting ------------------------------------------------------------------------

    def running_count(self) -> int:
        return sum(s.state is SessionState.RUNNING for s in self.sessions.values())

    def queued_count(self) -> int:
        return len(self._queue)

    def queue_position(self, session_id: str) -> int | None:
        return self._queue.index(session_id) if session_id in self._queue else None

    def reserved_bytes(self) -> int:
        """Running sessions' reservations (their own fork history included)."""
        return sum(
            s.estimated_bytes for s in self.sessions.values() if s.state is SessionState.RUNNING
        )

    def history_bytes(self, ended_only: bool = False) -> int:
        """Memory reserved for fork history (ended sessions', and running ones' unless
        `ended_only`)."""
        ended = [s for s in self.sessions.values() if s.finished] + list(self.histories.values())
        held = [s for s in ended if s.fork_marks]
        if not ended_only:
            held += [s for s in self.sessions.values() if s.state is SessionState.RUNNING]
        return sum(s.history_bytes for s in held)

    def account_waits(self, now: float | None = None) -> None:
        """Add the time since the last call to every session that was not served meanwhile:
        its next chunk to enter takes that wait as its queue time."""
        now = time.monotonic() if now is None else now
        for s in self.sessions.values():
            if s.finished:
                continue
            if s.forwards_served == s.served_at_check:
                s.waited_s += now - s.wait_checked_at
            s.served_at_check, s.wait_checked_at = s.forwards_served, now

    def chunks_in_flight(self) -> int:
        return sum(len(s.entered_at) for s in self.sessions.values() if not s.finished)

    def has_work(self) -> bool:
        return any(s.state is SessionState.RUNNING for s in self.sessions.values()) or bool(
            self._queue
        )

    # ---- one step --------------------------------------------------------------------------

    def pending_frees(self) -> tuple[str, ...]:
        """Sessions that ended since the last plan; the next plan frees them."""
        return tuple(self._freed)

    def take_freed(self) -> tuple[str, ...]:
        """Sessions that ended since the last plan (the engine frees their tensors)."""
        freed, self._freed = tuple(self._freed), []
        return freed

    def schedule(self) -> StepPlan:
        """Invariant: each step moves every scheduled chunk one step along its time grid;
        there is no prefill and no decode phase."""
        self._expire_histories(time.monotonic())
        self._admit()
        forwards = self._pack()
        return StepPlan(forwards, self.take_freed(), self.take_forgotten())

    def take_forgotten(self) -> tuple[str, ...]:
        """Ended sessions whose fork history was dropped since the last plan."""
        forgotten, self._forgotten = tuple(self._forgotten), []
        return forgotten

    def _admit(self) -> None:
        """First come, first served from the queue while the head fits the budget."""
        while self._queue:
            head = self.sessions[self._queue[0]]
            if head.finished:  # cancelled while queued
                self._queue.popleft()
                continue
            if not self._fits(head):
                return
            self._queue.popleft()
            self._start(head)

    def _pack(self) -> tuple[SessionStep, ...]:
        """Sessions served least first, skipping paused ones, until the forward is full."""
        ready = [
            s
            for s in self.sessions.values()
            if s.state is SessionState.RUNNING
            and not s.window.done
            and s.unconsumed < self.config.output_queue_chunks
        ]
        ready.sort(key=lambda s: (s.forwards_served, s.created_at))
        forwards, slots = [], 0
        for session in ready:
            # upper bound of this forward's chunk slots: the window plus the clean chunk
            per_session = (session.window.spec.window_size + 1) * self.branches
            if forwards and slots + per_session > self.config.max_chunk_slots:
                break
            plan = session.window.next_forward()
            if plan is None:
                continue
            if plan.entered is not None:
                self._mark(session, plan.entered)
                self._enter(session, plan.entered)
            prompts = () if plan.prefix_extraction else plan.chunk_indices
            forwards.append(
                SessionStep(
                    spec=session.spec,
                    forward=plan,
                    prompts=tuple((c, session.bound_prompts[c]) for c in prompts),
                    kv_keep_from=session.window.oldest_needed_chunk(),
                    marks_from=session.fork_marks[0].chunk if session.fork_marks else None,
                )
            )
            slots += per_session
        return tuple(forwards)

    def update_from_output(self, step: StepPlan, output: StepOutput) -> list[ChunkOut]:
        """Apply what the engine computed: count the forward, hand up finished chunks, end
        sessions whose window drained."""
        done = []
        for forward in step.forwards:
            session = self.sessions[forward.session_id]
            if session.finished:  # cancelled while the step ran
                continue
            session.forwards_served += 1
            for c in forward.forward.finished:
                finished = output.finished[(session.session_id, c)]
                if c < session.spec.output_from:  # a fork's chunk before its fork chunk
                    self._skip(session, c, finished.frame_count)
                    continue
                done.append(self._emit(session, c, finished.frame_count, finished.decode_s))
            if session.window.done:
                session.state = SessionState.FINISHED
                self._free(session)
        return done

    # ---- internals -------------------------------------------------------------------------

    def _fits(self, session: Session) -> bool:
        cap = self.config.max_running
        if cap is not None and self.running_count() >= cap:
            return False
        budget = self.config.memory_budget_bytes

        def fits() -> bool:  # ended sessions' fork history is reserved too, until dropped
            held = self.reserved_bytes() + self.history_bytes(ended_only=True)
            return held + session.estimated_bytes <= budget

        while not fits() and self.histories:  # it yields to new work, the oldest first
            self._drop_history(next(iter(self.histories)))
        return fits()

    def _mark(self, session: Session, chunk: int) -> None:
        """Chunk `chunk` is about to enter: remember how to fork from it (the runner marks its
        tensors as it runs this step); keep the last fork_history marks."""
        keep = self.config.fork_history
        if keep == 0:
            return
        session.fork_marks.append(
            ForkMark(
                chunk=chunk,
                window=session.window.spec,
                steps_done=session.window.steps_done - 1,
                bound_prompts=tuple(sorted(session.bound_prompts.items())),
                frames_out=session.frames_out,
            )
        )
        del session.fork_marks[:-keep]

    def _start(self, session: Session) -> None:
        session.state = SessionState.RUNNING

    def _enter(self, session: Session, chunk: int) -> None:
        """A chunk enters at pure noise (the engine draws it from the plan); its prompt is
        fixed now."""
        session.bound_prompts[chunk] = session.timeline.at(chunk)
        session.entered_at[chunk] = time.monotonic()
        session.queue_s[chunk], session.waited_s = session.waited_s, 0.0

    def _emit(self, session: Session, chunk: int, frame_count: int, decode_s: float) -> ChunkOut:
        entered = session.entered_at.pop(chunk, time.monotonic())
        result = ChunkOut(
            session_id=session.session_id,
            chunk_index=chunk,
            output_index=session.to_output(chunk),
            first_frame=session.frames_out,
            frame_count=frame_count,
            prompt=session.bound_prompts.pop(chunk),
            queue_s=session.queue_s.pop(chunk, 0.0),
            denoise_s=time.monotonic() - entered - decode_s,
            decode_s=decode_s,
        )
        session.chunks_out += 1
        session.frames_out += frame_count
        session.unconsumed += 1
        return result

    def _skip(self, session: Session, chunk: int, frame_count: int) -> None:
        """A chunk finished that is not handed up (it precedes a fork's fork chunk): its
        frames still count, so the fork's first chunk starts at the right frame."""
        session.entered_at.pop(chunk, None)
        session.bound_prompts.pop(chunk, None)
        session.queue_s.pop(chunk, None)
        session.frames_out += frame_count

    def _free(self, session: Session) -> None:
        """The session holds nothing from now on but its fork history; the next plan tells the
        engine to free it."""
        session.ended_at = time.monotonic()
        session.bound_prompts.clear()
        session.entered_at.clear()
        session.queue_s.clear()
        self._freed.append(session.session_id)
        if session.session_id in self._queue:
            self._queue.remove(session.session_id)
