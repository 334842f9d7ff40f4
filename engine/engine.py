"""The engine loop: schedule, execute, apply. Usable in-process (tests, benchmarks) and what the
engine process runs; it knows nothing of gRPC.

The scheduler decides (torch-free bookkeeping) and emits a self-contained `StepPlan`; the runner
computes it on tensors it owns; the scheduler applies the plain `StepOutput`. Chunks come back
as `ChunkDone` with their frames.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from engine.runner import LATENT_CHANNELS, Captions, DitForward, HostCopy, ModelRunner
from engine.snapshot import (
    SessionSnapshot,
    SnapshotError,
    capture,
    decode,
    model_fingerprint,
)
from model.folder import MagiModel
from model.text import TextConditioning
from scheduler.plan import StepPlan
from scheduler.scheduler import ChunkScheduler, SchedulerConfig
from scheduler.session import (
    ForkMark,
    PromptEntry,
    PromptTimeline,
    Session,
    SessionParams,
    SessionSpec,
    SessionState,
)
from scheduler.window import Window, WindowSpec, max_cached_at_entry, max_cached_chunks


@dataclass
class ChunkDone:
    """One finished, decoded chunk handed up to the consumer."""

    session_id: str
    chunk_index: int  # global chunk index (v2v prefix chunks count)
    output_index: int  # 0-based among the chunks this session outputs
    first_frame: int  # index of the first frame in the session's output video
    decoded: Tensor  # uint8 (T, H, W, 3) on the host: read it as `frames`, which waits for it
    latent: Tensor  # (16, 6, h, w) fp32: the clean latent the frames were decoded from
    prompt: PromptEntry  # the prompt that drove this chunk
    queue_s: float  # waiting before it entered (admission for the first chunk, pauses after)
    denoise_s: float  # wall time from the chunk entering the window to its last step
    decode_s: float  # VAE decode time (CUDA: the device's, once `frames` has been read)
    ready: HostCopy | None = None  # CUDA: the frames' copy to the host; None: they are there

    @property
    def frames(self) -> Tensor:
        """The frames, once their copy from the device has landed (blocks until then)."""
        if self.ready is not None:
            self.decode_s, self.ready = self.ready.wait(), None
        return self.decoded


@dataclass
class StepStats:
    """Where one engine step's time went (for metrics and bench/batching.py)."""

    sessions: int  # sessions in the forward
    chunk_slots: int  # chunks packed into the forward, CFG branches included
    dit_s: float
    decode_s: float
    schedule_s: float  # scheduling and bookkeeping outside the runner
    assemble_s: float  # building the packed forward, mixing, Euler updates


class PlanLink(Protocol):
    """Rank 0's line to the other ranks of a group (engine.ranks.StepLink). `captions`: rank
    0's T5, which encodes the prompts the plan uses that the other ranks do not hold yet."""

    def send(
        self, plan: StepPlan | None, opened: list[SessionParams], captions: Captions
    ) -> None: ...


class Engine:
    def __init__(
        self,
        model: MagiModel,
        config: SchedulerConfig | None = None,
        dit: DitForward | None = None,  # a worker group's forward (engine.ranks); None: model.dit
        *,
        text_conditioning: TextConditioning | None = None,  # None: TextConditioning() defaults
        link: PlanLink | None = None,  # rank 0 of a group: sends each plan to the other ranks
        batch_invariant: bool | None = None,  # None: on for the CPU (ModelRunner)
        overlap_decode: bool | None = None,  # None: on for CUDA (ModelRunner)
    ) -> None:
        self.model = model
        self.runner = ModelRunner(
            model,
            text_conditioning=text_conditioning,
            dit=dit,
            batch_invariant=batch_invariant,
            overlap_decode=overlap_decode,
        )
        self.link = link
        self._opened: list[SessionParams] = []  # opened since the last plan went to the link
        rc = model.config.runtime_config
        branches = 3 if rc.cfg_number == 3 else 2  # cfg 1: the nearly-clean copy at most
        self.scheduler = ChunkScheduler(config or SchedulerConfig(), branches)
        self.last_step: StepStats | None = None
        self._fingerprint: str | None = None

    # ---- sessions -------------------------------------------------------------------------

    def open(self, params: SessionParams) -> Session:
        """Create a session: encode its prefix, size its window, reserve its memory. Raises
        AdmissionRefused when full, ForkUnavailable for a fork point that is not held, and
        ValueError for a request the model cannot serve."""
        params.check_openable()
        rc = self.model.config.runtime_config
        existing = self.scheduler.sessions.get(params.session_id)
        if existing is not None and not existing.finished:
            raise ValueError(f"session id {params.session_id!r} is already in use")
        if params.fork is not None:
            return self._open_fork(params)
        if params.resume is not None:
            return self._open_snapshot(params)
        num_steps = params.num_steps or rc.num_steps
        # the window's shape is checked before any work (a bad step count fails here)
        shape = dataclasses.replace(WindowSpec.from_runtime(rc, None), num_steps=num_steps)
        prefix_frames = self.runner.open(params)
        return self._add(params, lambda: self._new_session(params, shape, prefix_frames))

    def _new_session(self, params: SessionParams, shape: WindowSpec, prefix_frames: int) -> Session:
        """A new session's scheduler side: its spec, window, timeline and memory estimate."""
        rc, ec = self.model.config.runtime_config, self.model.config.engine_config
        prefix_chunks = prefix_frames // rc.chunk_width if params.mode == "v2v" else 0
        total = None if params.num_chunks is None else prefix_chunks + params.num_chunks
        window = dataclasses.replace(shape, num_chunks=total, prefix_chunks=prefix_chunks)
        spec = SessionSpec(
            session_id=params.session_id,
            seed=params.seed,
            mode=params.mode,
            height=params.height,
            width=params.width,
            num_steps=shape.num_steps,
            shortcut_mode=params.shortcut_mode or ec.shortcut_mode,
            text_scales=params.text_scales,
            prev_chunk_scales=params.prev_chunk_scales,
            generated_total=params.num_chunks,
            prefix_latent_frames=prefix_frames,
            prefix_chunks=prefix_chunks,
        )
        history = self.history_bytes(spec, window)
        return Session(
            spec=spec,
            window=Window(window),
            timeline=PromptTimeline(params.prompts, first_chunk=prefix_chunks),
            estimated_bytes=self.session_bytes(spec, window) + history,
            history_bytes=history,
        )

    def _open_fork(self, params: SessionParams) -> Session:
        """A session that continues another from one of its fork points: the source's spec,
        window, in-flight latents, KV and the prompts of its chunks in flight then; its own
        timeline from the fork chunk on (the source's when it gives none). Its frames equal the
        source's for as long as the two timelines agree (batch invariance keeps that true
        whatever runs beside either)."""
        fork = params.fork
        source = self.scheduler.fork_source(fork.session_id)
        at = source.to_global(fork.at_chunk)
        mark = self.scheduler.fork_mark(fork.session_id, at)
        spec = dataclasses.replace(source.spec, session_id=params.session_id, output_from=at)
        if params.prompts:
            timeline = PromptTimeline.of([e for e in source.timeline.entries if e.from_chunk < at])
            for from_chunk, text in params.prompts:
                timeline.add(source.to_global(from_chunk), text)
        else:
            timeline = PromptTimeline.of(list(source.timeline.entries))
        self.runner.open(params)
        return self._add_at_mark(
            params, spec, mark, timeline, source.estimated_bytes, source.history_bytes
        )

    @property
    def fingerprint(self) -> str:
        """Which model this is, for snapshots (engine.snapshot.model_fingerprint)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model.folder)
        return self._fingerprint

    def snapshot(self, session_id: str) -> SessionSnapshot:
        """The session (running or recently ended) at its newest chunk boundary."""
        session = self.scheduler.fork_source(session_id)
        marks = self.runner.marks.get(session_id, {})
        if not session.fork_marks or session.fork_marks[-1].chunk not in marks:
            raise SnapshotError(
                f"session {session_id!r} has no chunk boundary to snapshot yet (it is queued, "
                "or forks are off: --fork-history 0)"
            )
        chunk = session.fork_marks[-1].chunk
        if self.link is not None and marks[chunk].cache.chunk_indices:
            self.link.gather_kv(session_id, chunk)  # the other ranks hand in their KV heads
        kv = self.runner.marked_kv(session_id, chunk)
        return capture(session, marks[chunk], kv, self.fingerprint)

    def _open_snapshot(self, params: SessionParams) -> Session:
        """A session resumed from a snapshot: its spec, window, timeline and tensors as they
        were at its boundary; it streams from the first chunk not handed up then."""
        snap = decode(params.resume, self.fingerprint, self.runner.device)
        spec = dataclasses.replace(snap.spec, session_id=params.session_id)
        history = self.history_bytes(spec, snap.mark.window)
        self.runner.open_snapshot(params.session_id, snap)
        estimated = self.session_bytes(spec, snap.mark.window) + history
        timeline = PromptTimeline.of(list(snap.timeline))
        return self._add_at_mark(params, spec, snap.mark, timeline, estimated, history)

    def _add_at_mark(
        self,
        params: SessionParams,
        spec: SessionSpec,
        mark: ForkMark,
        timeline: PromptTimeline,
        estimated_bytes: int,
        history_bytes: int,
    ) -> Session:
        """A fork's or a resumed session's scheduler side, from the mark its tensors (already
        opened by the runner) were taken at: the window replayed to it, its chunks in flight
        with their prompts, the frames handed up before it."""
        return self._add(
            params,
            lambda: Session(
                spec=spec,
                window=Window.replayed(mark.window, mark.steps_done),
                timeline=timeline,
                estimated_bytes=estimated_bytes,
                history_bytes=history_bytes,
                bound_prompts=dict(mark.bound_prompts),
                entered_at=dict.fromkeys((c for c, _ in mark.bound_prompts), time.monotonic()),
                frames_out=mark.frames_out,
            ),
        )

    def _add(self, params: SessionParams, make: Callable[[], Session]) -> Session:
        """Admit the session `make` builds for the tensors the runner has opened: the runner
        frees them if building or admitting it fails; a group's other ranks open it with the
        next plan."""
        try:
            session = make()
            self.scheduler.add(session)
        except Exception:
            self.runner.free(params.session_id)
            raise
        if self.link is not None:
            self._opened.append(params)
        return session

    def cancel(
        self,
        session_id: str,
        state: SessionState = SessionState.CANCELLED,
        error: str | None = None,
    ) -> None:
        """End a session now and free all its tensors; it leaves the next forward."""
        self.scheduler.cancel(session_id, state, error)
        self.runner.free(session_id)

    def consumed(self, session_id: str) -> None:
        self.scheduler.consumed(session_id)

    def session_bytes(self, spec: SessionSpec, window: WindowSpec) -> int:
        """Most memory a session holds at once: the clean chunks its kv ranges can reach (KV of
        every layer) plus the latents in flight and the one awaiting its clean re-forward."""
        kv_per_chunk, latent_per_chunk = self._chunk_bytes(spec)
        return (
            max_cached_chunks(window) * kv_per_chunk + (window.window_size + 1) * latent_per_chunk
        )

    def history_bytes(self, spec: SessionSpec, window: WindowSpec) -> int:
        """Most memory a session's fork history holds: per fork point, the latents then in
        flight (and the one awaiting its clean re-forward) and the KV cached then (none with
        window 4). Tensors shared with the live session count as if they were not."""
        keep = self.scheduler.config.fork_history
        if keep == 0:
            return 0
        per_chunk_kv, per_chunk_latent = self._chunk_bytes(spec)
        cached = max_cached_at_entry(window)
        return keep * ((window.window_size + 1) * per_chunk_latent + cached * per_chunk_kv)

    def _chunk_bytes(self, spec: SessionSpec) -> tuple[int, int]:
        """(KV of one chunk over all layers, one chunk's fp32 latent) at this size."""
        mc, rc = self.model.config.model_config, self.model.config.runtime_config
        h8, w8 = spec.height // 8, spec.width // 8
        tokens = rc.chunk_width * (h8 // mc.patch_size) * (w8 // mc.patch_size)
        kv = mc.num_layers * tokens * mc.num_query_groups * 2 * mc.kv_channels * mc.dtype.itemsize
        return kv, LATENT_CHANNELS * rc.chunk_width * h8 * w8 * 4

    def used_bytes(self, session_id: str) -> int:
        """Tensors this session holds now (KV cache, latents, prefix)."""
        held = self.runner.sessions.get(session_id)
        return 0 if held is None else held.nbytes

    def kv_cache_bytes(self) -> int:
        return sum(held.cache.nbytes for held in self.runner.sessions.values())

    # ---- steps ----------------------------------------------------------------------------

    def step(self) -> list[ChunkDone]:
        """One engine step: every scheduled chunk moves one step along its time grid."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if self.link is not None and (plan.forwards or plan.freed or self._opened):
            opened, self._opened = self._opened, []
            self.link.send(plan, opened, self.runner.captions)  # every rank runs this plan
        if not plan.forwards:
            self.runner.execute(plan)  # frees what ended, if anything
            self.last_step = None
            return []
        t1 = time.perf_counter()
        output, produced = self.runner.execute(plan)
        t2 = time.perf_counter()
        done = [
            ChunkDone(
                session_id=out.session_id,
                chunk_index=out.chunk_index,
                output_index=out.output_index,
                first_frame=out.first_frame,
                decoded=produced[(out.session_id, out.chunk_index)].frames,
                latent=produced[(out.session_id, out.chunk_index)].latent,
                prompt=out.prompt,
                queue_s=out.queue_s,
                denoise_s=out.denoise_s,
                decode_s=out.decode_s,
                ready=produced[(out.session_id, out.chunk_index)].ready,
            )
            for out in self.scheduler.update_from_output(plan, output)
        ]
        for session_id in self.scheduler.pending_frees():  # finished now: free here at once;
            self.runner.free(session_id)  # the next plan frees them on every rank
        t3 = time.perf_counter()
        self.last_step = StepStats(
            sessions=len(plan.forwards),
            chunk_slots=output.chunks_in_forward,
            dit_s=output.dit_s,
            decode_s=output.decode_s,
            schedule_s=(t1 - t0) + (t3 - t2),
            assemble_s=output.assemble_s,
        )
        return done

    def sync(self) -> None:
        """While idle (no step to run): send the other ranks of a group the frees and opens
        since the last plan, which also shows them rank 0 is alive."""
        if self.link is None:
            return
        freed, forgotten = self.scheduler.take_freed(), self.scheduler.take_forgotten()
        for session_id in forgotten:  # (rank 0 freed its own at once)
            self.runner.forget(session_id)
        opened, self._opened = self._opened, []
        plan = StepPlan((), freed, forgotten) if freed or forgotten else None
        self.link.send(plan, opened, self.runner.captions)

    def run_until_idle(self) -> list[ChunkDone]:
        """Step until no session has work, consuming outputs as they come (tests, CLI)."""
        done: list[ChunkDone] = []
        while self.scheduler.has_work():
            produced = self.step()
            for item in produced:
                self.consumed(item.session_id)
            done.extend(produced)
        return done
