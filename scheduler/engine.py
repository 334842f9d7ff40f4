"""The engine loop: schedule, execute, apply. Usable in-process (tests, benchmarks) and what the
worker processes run; it knows nothing of gRPC."""

from __future__ import annotations

import time
from dataclasses import dataclass

from model.folder import MagiModel
from scheduler.plan import StepOutput
from scheduler.runner import DitForward, ModelRunner
from scheduler.scheduler import ChunkScheduler, SchedulerConfig
from scheduler.session import (
    LATENT_CHANNELS,
    ChunkDone,
    PromptTimeline,
    Session,
    SessionParams,
)
from scheduler.window import Window, WindowSpec


@dataclass
class StepStats:
    """Where one engine step's time went (for metrics and bench/batching.py)."""

    sessions: int  # sessions in the forward
    chunk_slots: int  # chunks packed into the forward, CFG branches included
    dit_s: float
    decode_s: float
    schedule_s: float  # scheduling and bookkeeping outside the runner
    assemble_s: float  # building the packed forward, mixing, Euler updates


class Engine:
    def __init__(
        self,
        model: MagiModel,
        config: SchedulerConfig | None = None,
        dit: DitForward | None = None,  # a worker group's forward (model.group); None: model.dit
    ) -> None:
        self.model = model
        self.runner = ModelRunner(model, dit=dit)
        rc = model.config.runtime_config
        branches = 3 if rc.cfg_number == 3 else 2  # cfg 1: the nearly-clean copy at most
        self.scheduler = ChunkScheduler(config or SchedulerConfig(), branches, rc.chunk_width)
        self.last_step: StepStats | None = None

    def open(self, params: SessionParams) -> Session:
        """Create a session: encode its prefix, size its window, reserve its memory. Raises
        AdmissionRefused when full and ValueError for a request the model cannot serve."""
        rc = self.model.config.runtime_config
        prefix = self.runner.encode_prefix(params)
        prefix_frames = 0 if prefix is None else prefix.shape[1]
        prefix_chunks = prefix_frames // rc.chunk_width if params.mode == "v2v" else 0
        num_steps = params.num_steps or rc.num_steps
        total = None if params.num_chunks is None else prefix_chunks + params.num_chunks
        spec = WindowSpec(
            num_steps=num_steps,
            window_size=rc.window_size,
            num_chunks=total,
            prefix_chunks=prefix_chunks,
            noise2clean_kvrange=tuple(rc.noise2clean_kvrange),
            clean_chunk_kvrange=rc.clean_chunk_kvrange,
        )
        session = Session(
            params=params,
            window=Window(spec),
            timeline=PromptTimeline(params.prompts, first_chunk=prefix_chunks),
            prefix_latent=prefix,
            prefix_latent_frames=prefix_frames,
            estimated_bytes=self.session_bytes(params, spec),
            kv_cache=self.runner.new_cache(),
        )
        self.scheduler.add(session)
        return session

    def session_bytes(self, params: SessionParams, spec: WindowSpec) -> int:
        """Most memory a session holds at once: the clean chunks its kv ranges can reach (KV of
        every layer) plus the latents in flight and the one awaiting its clean re-forward."""
        mc, rc = self.model.config.model_config, self.model.config.runtime_config
        h8, w8 = params.height // 8, params.width // 8
        tokens = rc.chunk_width * (h8 // mc.patch_size) * (w8 // mc.patch_size)
        kv_per_chunk = mc.num_layers * tokens * mc.num_query_groups * 2 * mc.kv_channels
        kv_per_chunk *= mc.dtype.itemsize
        latent_per_chunk = LATENT_CHANNELS * rc.chunk_width * h8 * w8 * 4
        return max_cached_chunks(spec) * kv_per_chunk + (spec.window_size + 1) * latent_per_chunk

    def step(self) -> list[ChunkDone]:
        """One engine step: every scheduled chunk moves one step along its time grid."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        if not plan.forwards:
            self.last_step = None
            return []
        t1 = time.perf_counter()
        output: StepOutput = self.runner.execute(plan, self.scheduler.sessions)
        t2 = time.perf_counter()
        done = self.scheduler.update_from_output(plan, output)
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

    def run_until_idle(self) -> list[ChunkDone]:
        """Step until no session has work, consuming outputs as they come (tests, CLI)."""
        done: list[ChunkDone] = []
        while self.scheduler.has_work():
            produced = self.step()
            for item in produced:
                self.scheduler.pop_output(item.session_id)
            done.extend(produced)
        return done


def max_cached_chunks(spec: WindowSpec) -> int:
    """Most clean chunks whose KV is held at once: simulated over the first stages of an
    unbounded window of this shape (the steady state repeats from then on)."""
    window = Window(
        WindowSpec(
            spec.num_steps,
            spec.window_size,
            None,
            spec.prefix_chunks,
            spec.noise2clean_kvrange,
            spec.clean_chunk_kvrange,
        )
    )
    most = spec.prefix_chunks
    for _ in range(spec.steps_per_stage * (spec.window_size + max(spec.noise2clean_kvrange) + 2)):
        plan = window.next_forward()
        written = 1 if plan is not None and plan.clean_chunk is not None else 0
        most = max(most, len(window.reachable_cached_chunks()) + written)
    return most
