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
from scheduler.session import ChunkOut, PromptEntry, Session, SessionState


@dataclass(frozen=True)
class SchedulerConfig:
    memory_budget_bytes: int = 8 << 30  # KV cache + latents of all running sessions, bytes
    max_queued: int = 16  # sessions waiting for memory; one more is refused
    max_chunk_slots: int = 512  # chunk slots per forward (each CFG branch counts), chunks
    output_queue_chunks: int = 2  # decoded chunks a session may hold before it pauses
    max_running: int | None = None  # sessions generating at once (None: memory decides alone)

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


class AdmissionRefused(Exception):
    """No memory now and the queue is full; the message says how full."""


class RequestTooLarge(AdmissionRefused):
    """The request needs more memory than the whole budget: it can never be admitted."""


class ChunkScheduler:
    def __init__(self, config: SchedulerConfig, branches: int) -> None:
        self.config = config
        self.branches = branches  # forward slots per chunk: 3 for cfg 3, about 1 for cfg 1
        self.sessions: dict[str, Session] = {}
        self._queue: deque[str] = deque()
        self._freed: list[str] = []  # ended since the last plan; the next plan frees them

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
        """Drop an ended session's record (after its stream has been closed)."""
        session = self.sessions.get(session_id)
        if session is not None and session.finished:
            del self.sessions[session_id]

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
        return sum(
            s.estimated_bytes for s in self.sessions.values() if s.state is SessionState.RUNNING
        )

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
        self._admit()
        forwards = self._pack()
        return StepPlan(forwards, self.take_freed())

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
                self._enter(session, plan.entered)
            prompts = () if plan.prefix_extraction else plan.chunk_indices
            forwards.append(
                SessionStep(
                    spec=session.spec,
                    forward=plan,
                    prompts=tuple((c, session.bound_prompts[c]) for c in prompts),
                    kv_keep_from=session.window.oldest_needed_chunk(),
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
        return self.reserved_bytes() + session.estimated_bytes <= self.config.memory_budget_bytes

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

    def _free(self, session: Session) -> None:
        """The session holds nothing from now on; the next plan tells the engine to free it."""
        session.bound_prompts.clear()
        session.entered_at.clear()
        session.queue_s.clear()
        self._freed.append(session.session_id)
        if session.session_id in self._queue:
            self._queue.remove(session.session_id)
