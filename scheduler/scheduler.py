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

from torch import Tensor

from scheduler.plan import SessionForward, StepOutput, StepPlan
from scheduler.session import (
    LATENT_CHANNELS,
    ChunkDone,
    PromptEntry,
    Session,
    SessionState,
    chunk_noise,
)


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
    def __init__(self, config: SchedulerConfig, branches: int, chunk_width: int = 6) -> None:
        self.config = config
        self.branches = branches  # forward slots per chunk: 3 for cfg 3, about 1 for cfg 1
        self.chunk_width = chunk_width  # latent frames per chunk
        self.sessions: dict[str, Session] = {}
        self._queue: deque[str] = deque()

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

    def pop_output(self, session_id: str) -> ChunkDone | None:
        session = self.get(session_id)
        return session.outputs.popleft() if session.outputs else None

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

    def used_bytes(self, session_id: str) -> int:
        """KV cache and latents this session holds now."""
        s = self.get(session_id)
        kv = s.kv_cache.nbytes if s.kv_cache is not None else 0
        return kv + s.latent_bytes()

    def has_work(self) -> bool:
        return any(s.state is SessionState.RUNNING for s in self.sessions.values()) or bool(
            self._queue
        )

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self._admit()
        return self._pack()

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

    def _pack(self) -> StepPlan:
        """Sessions served least first, skipping paused ones, until the forward is full."""
        ready = [
            s
            for s in self.sessions.values()
            if s.state is SessionState.RUNNING
            and not s.window.done
            and len(s.outputs) < self.config.output_queue_chunks
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
            forwards.append(SessionForward(session.session_id, plan))
            slots += per_session
        return StepPlan(tuple(forwards))

    def update_from_output(self, step: StepPlan, output: StepOutput) -> list[ChunkDone]:
        done = []
        for forward in step.forwards:
            session = self.sessions[forward.session_id]
            if session.finished:  # cancelled while the step ran
                continue
            session.forwards_served += 1
            plan = forward.plan
            for c in plan.chunk_indices:
                if (session.session_id, c) in output.latents:
                    session.latents[c] = output.latents[(session.session_id, c)]
            if plan.clean_chunk is not None:  # its KV is cached now; the latent is not needed
                session.latents.pop(plan.clean_chunk, None)
            for c in plan.finished:
                frames, decode_s = output.decoded[(session.session_id, c)]
                latent = output.latents[(session.session_id, c)]
                done.append(self._emit(session, c, frames, latent, decode_s))
            if session.kv_cache is not None:
                session.kv_cache.drop_before(session.window.oldest_needed_chunk())
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
        """A chunk enters at pure noise; its prompt is fixed now."""
        h8, w8 = session.params.height // 8, session.params.width // 8
        shape = (LATENT_CHANNELS, self.chunk_width, h8, w8)
        session.latents[chunk] = chunk_noise(session.params.seed, chunk, shape)
        session.bound_prompts[chunk] = session.timeline.at(chunk)
        session.entered_at[chunk] = time.monotonic()

    def _emit(
        self, session: Session, chunk: int, frames: Tensor, latent: Tensor, decode_s: float
    ) -> ChunkDone:
        entered = session.entered_at.pop(chunk, time.monotonic())
        result = ChunkDone(
            session_id=session.session_id,
            chunk_index=chunk,
            output_index=session.chunks_out,
            first_frame=session.frames_out,
            frames=frames,
            latent=latent,
            prompt=session.bound_prompts.pop(chunk),
            denoise_s=time.monotonic() - entered - decode_s,
            decode_s=decode_s,
        )
        session.chunks_out += 1
        session.frames_out += frames.shape[0]
        session.outputs.append(result)
        return result

    def _free(self, session: Session) -> None:
        session.latents.clear()
        if session.kv_cache is not None:
            session.kv_cache.clear()
        if session.session_id in self._queue:
            self._queue.remove(session.session_id)
