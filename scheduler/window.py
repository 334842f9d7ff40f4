"""One session's MAGI-1 pipelined window (magi1-reference.md §4.3-§4.5, §4.9).

Up to `window_size` chunks are in flight, each at its own stage of the time grid; every forward
moves all of them one Euler step, a new chunk enters at pure noise at the start of each stage,
and the chunk that finished at the end of a stage is re-forwarded once, clean, at sub-step 0 of
the next stage so its KV lands in the cache. The window decides; the runner computes.

A session is either finite (`num_chunks` known) or unbounded (`num_chunks` None: chunks keep
entering until `stop_admitting()` / `set_last_chunk()` turns it into the finite drain). The
unbounded window uses the same formulas with chunk_num = infinity, so both agree forward for
forward up to the point where the last chunk is fixed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler.timegrid import kv_chunk_range, kv_lookback


class RuntimeLike(Protocol):
    """The fields of a model's `runtime_config` that fix a window (model.config.RuntimeConfig
    has them; the scheduler does not import the model)."""

    num_steps: int
    window_size: int
    noise2clean_kvrange: Sequence[int]
    clean_chunk_kvrange: int


@dataclass(frozen=True)
class WindowSpec:
    """What fixes a session's schedule; everything else is derived from it."""

    num_steps: int  # Euler steps per chunk; divisible by window_size and the kv-range quartiles
    window_size: int  # chunks in flight at once (4 shipped; 1 and 2 trade speed for memory)
    num_chunks: int | None  # total chunks incl. prefix chunks; None = unbounded session
    prefix_chunks: int = 0  # v2v clean prefix chunks (chunk_offset); their KV is extracted first
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)  # look-back per step quartile, self incl.
    clean_chunk_kvrange: int = 1  # look-back of a clean chunk's KV forward (1 = self only)

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.window_size < 1:
            raise ValueError(
                f"num_steps and window_size must be positive, got {self.num_steps}, "
                f"{self.window_size}"
            )
        if self.num_steps % self.window_size:
            # The official code floors num_steps / window_size silently; a port must not.
            raise ValueError(
                f"num_steps ({self.num_steps}) must be divisible by window_size "
                f"({self.window_size})"
            )
        if not self.noise2clean_kvrange or self.num_steps % len(self.noise2clean_kvrange):
            raise ValueError(
                f"num_steps ({self.num_steps}) must be divisible by len(noise2clean_kvrange) "
                f"({len(self.noise2clean_kvrange)}), which must not be empty"
            )
        if self.prefix_chunks < 0:
            raise ValueError(f"prefix_chunks must be >= 0, got {self.prefix_chunks}")
        if self.num_chunks is not None and self.num_chunks < self.prefix_chunks:
            raise ValueError(
                f"num_chunks ({self.num_chunks}) counts the prefix chunks and must be >= "
                f"prefix_chunks ({self.prefix_chunks})"
            )

    @classmethod
    def from_runtime(
        cls, runtime: RuntimeLike, num_chunks: int | None, prefix_chunks: int = 0
    ) -> WindowSpec:
        """The spec a `runtime_config` implies for one session."""
        return cls(
            num_steps=runtime.num_steps,
            window_size=runtime.window_size,
            num_chunks=num_chunks,
            prefix_chunks=prefix_chunks,
            noise2clean_kvrange=tuple(runtime.noise2clean_kvrange),
            clean_chunk_kvrange=runtime.clean_chunk_kvrange,
        )

    @property
    def steps_per_stage(self) -> int:
        """dps: forwards per stage, i.e. Euler steps a chunk spends at each window level."""
        return self.num_steps // self.window_size


@dataclass(frozen=True)
class PlannedChunk:
    """One chunk inside one forward."""

    chunk_index: int  # global chunk index (prefix chunks included)
    grid_index: int  # k: t index before this step (the step goes t[k] -> t[k+1]); N if clean
    denoise_step: int  # Euler steps already taken (== k); num_steps marks a clean chunk
    stage_level: int  # window level 0..W-1 (W-1 = nearly clean); W marks a clean chunk
    kv_first_chunk: int  # first chunk this chunk attends to (its limited look-back)
    kv_end_chunk: int  # one past the last chunk it attends to (= chunk_index + 1)


@dataclass(frozen=True)
class ForwardPlan:
    """Everything the runner needs to assemble and integrate one forward of one session."""

    step: int  # denoising-forward index, 0-based (the official cur_denoise_step)
    stage: int  # §4.3 stage index i (starts at prefix_chunks); chunk i enters in stage i
    sub_step: int  # j in 0..dps-1: position inside the stage; picks the shortcut interval
    chunks: tuple[PlannedChunk, ...]  # noisy chunks, oldest first (= furthest along)
    clean_chunk: int | None  # just-finished chunk, re-forwarded before `chunks` for its KV
    clean_kv_first_chunk: int | None  # its look-back start (== clean_chunk when kv range is 1)
    finished: tuple[int, ...]  # chunks whose last Euler step is this forward: decode after it
    entered: int | None  # chunk entering at pure noise now: bind its prompt at this moment
    prefix_extraction: bool = False  # v2v: `chunks` are clean prefix chunks, only KV is kept

    @property
    def slice_point(self) -> int:
        """First chunk in the forward; cached KV below it is prepended (official slice_point)."""
        return self.clean_chunk if self.clean_chunk is not None else self.chunks[0].chunk_index

    @property
    def chunk_indices(self) -> tuple[int, ...]:
        """The noisy (or prefix) chunks this forward computes, in forward order."""
        return tuple(c.chunk_index for c in self.chunks)


def forward_count(num_chunks: int, window_size: int, num_steps: int, prefix_chunks: int = 0) -> int:
    """Denoising forwards of a finite session: dps * (chunk_num + W - 1 - chunk_offset).

    The v2v prefix-extraction forward is not counted (as officially). With nothing to generate
    (num_chunks == prefix_chunks) this is 0: the official loop would run empty forwards.
    """
    if num_chunks <= prefix_chunks:
        return 0
    return num_steps // window_size * (num_chunks + window_size - 1 - prefix_chunks)


def stage_bounds(
    stage: int, num_chunks: int | None, window_size: int, prefix_chunks: int
) -> tuple[int, int, int, int]:
    """(chunk_start, chunk_end, t_start, t_end) of stage i, §4.3; num_chunks None = infinity.

    Chunks [chunk_start, chunk_end) are in flight; chunk chunk_start + m sits at window level
    t_end - 1 - m, so the oldest chunk is furthest along.
    """
    chunk_start = max(prefix_chunks, stage - window_size + 1)
    chunk_end = stage + 1 if num_chunks is None else min(num_chunks, stage + 1)
    t_start = 0 if num_chunks is None else max(0, stage - num_chunks + 1)
    t_end = min(window_size, stage - prefix_chunks + 1)
    return chunk_start, chunk_end, t_start, t_end


def _kv_first(spec: WindowSpec, chunk_index: int, denoise_step: int) -> int:
    lookback = kv_lookback(
        denoise_step, spec.num_steps, spec.noise2clean_kvrange, spec.clean_chunk_kvrange
    )
    return kv_chunk_range(chunk_index, lookback)[0]


def _planned(spec: WindowSpec, chunk_index: int, level: int, sub_step: int) -> PlannedChunk:
    k = level * spec.steps_per_stage + sub_step
    return PlannedChunk(chunk_index, k, k, level, _kv_first(spec, chunk_index, k), chunk_index + 1)


def _clean(spec: WindowSpec, chunk_index: int) -> PlannedChunk:
    n = spec.num_steps
    first = _kv_first(spec, chunk_index, n)
    return PlannedChunk(chunk_index, n, n, spec.window_size, first, chunk_index + 1)


def plan_forward(spec: WindowSpec, step: int) -> ForwardPlan:
    """Denoising forward number `step` of a session, straight from the §4.3 formulas."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if spec.num_chunks is not None:
        total = forward_count(spec.num_chunks, spec.window_size, spec.num_steps, spec.prefix_chunks)
        if step >= total:
            raise ValueError(f"step {step} is past the session's {total} forwards")
    dps = spec.steps_per_stage
    stage, sub_step = spec.prefix_chunks + step // dps, step % dps
    chunk_start, chunk_end, _, t_end = stage_bounds(
        stage, spec.num_chunks, spec.window_size, spec.prefix_chunks
    )
    chunks = tuple(
        _planned(spec, chunk_start + m, t_end - 1 - m, sub_step)
        for m in range(chunk_end - chunk_start)
    )
    # The chunk that finished at the end of the previous stage (never a prefix chunk: those
    # had their KV extracted up front).
    clean = chunk_start - 1 if chunk_start > spec.prefix_chunks and sub_step == 0 else None
    return ForwardPlan(
        step=step,
        stage=stage,
        sub_step=sub_step,
        chunks=chunks,
        clean_chunk=clean,
        clean_kv_first_chunk=None if clean is None else _kv_first(spec, clean, spec.num_steps),
        finished=tuple(c.chunk_index for c in chunks if c.grid_index == spec.num_steps - 1),
        entered=next((c.chunk_index for c in chunks if c.grid_index == 0), None),
    )


def plan_prefix_extraction(spec: WindowSpec) -> ForwardPlan:
    """The v2v forward that computes the prefix chunks' KV before denoising starts (§4.9).

    Each prefix chunk runs at clean_t with the null caption and its clean look-back (self only
    when clean_chunk_kvrange is 1, not causal); the whole prefix is written to the cache and
    the velocities are discarded. The shortcut interval is that of sub-step 0.
    """
    if spec.prefix_chunks < 1:
        raise ValueError("only a session with prefix chunks has a prefix-extraction forward")
    return ForwardPlan(
        step=0,
        stage=spec.prefix_chunks,
        sub_step=0,
        chunks=tuple(_clean(spec, c) for c in range(spec.prefix_chunks)),
        clean_chunk=None,
        clean_kv_first_chunk=None,
        finished=(),
        entered=None,
        prefix_extraction=True,
    )


class Window:
    """The pipelined window of one session, as a state machine the scheduler steps."""

    def __init__(self, spec: WindowSpec) -> None:
        self._spec = spec  # num_chunks is replaced once the last chunk is fixed
        self._step = 0  # next denoising forward
        self._prefix_pending = spec.prefix_chunks > 0  # v2v extraction not yet planned
        self._cached_end = 0  # chunks [0, cached_end) have had their clean KV computed

    @classmethod
    def replayed(cls, spec: WindowSpec, steps_done: int) -> Window:
        """The window of `spec` after `steps_done` denoising forwards (and the v2v prefix
        extraction) were planned: where a fork picks its source's window up."""
        window = cls(spec)
        while window._prefix_pending or window._step < steps_done:
            window.next_forward()
        return window

    @property
    def spec(self) -> WindowSpec:
        return self._spec

    @property
    def num_chunks(self) -> int | None:
        """Total chunks of the session, None while it is unbounded."""
        return self._spec.num_chunks

    @property
    def steps_done(self) -> int:
        """Denoising forwards planned so far."""
        return self._step

    @property
    def done(self) -> bool:
        n = self._spec.num_chunks
        if n is None:
            return False
        s = self._spec
        return self._step >= forward_count(n, s.window_size, s.num_steps, s.prefix_chunks)

    def next_forward(self) -> ForwardPlan | None:
        """Plan the session's next forward and advance past it; None once the window drained.

        Invariant: each forward moves every scheduled chunk one step along the time grid (the
        clean re-forward and the prefix extraction move nothing; they only produce KV).
        """
        if self.done:
            return None
        if self._prefix_pending:
            self._prefix_pending = False
            self._cached_end = self._spec.prefix_chunks
            return plan_prefix_extraction(self._spec)
        plan = plan_forward(self._spec, self._step)
        self._step += 1
        if plan.clean_chunk is not None:
            self._cached_end = plan.clean_chunk + 1
        return plan

    def _entry_slots_passed(self) -> int:
        """Chunk indices whose entry forward (sub-step 0 of their stage) is already planned."""
        return self._spec.prefix_chunks + math.ceil(self._step / self._spec.steps_per_stage)

    def next_entering_chunk(self) -> int | None:
        """The first chunk that has not yet entered the window; None if none will.

        A prompt pushed now applies from this chunk on: a chunk's prompt is fixed when it
        enters, since its text conditions it from its first step.
        """
        slot = self._entry_slots_passed()
        n = self._spec.num_chunks
        return slot if n is None or slot < n else None

    def set_last_chunk(self, chunk_index: int) -> None:
        """Fix the session's last chunk: no chunk after it enters; the window then drains.

        It may not drop a chunk that has already entered, and once a finite window has let an
        entry slot pass unused it can no longer grow (the formulas would need the skipped chunk).
        """
        slot = self._entry_slots_passed()
        n = self._spec.num_chunks
        if n is not None and n < slot and chunk_index + 1 != n:
            raise ValueError(
                f"the window is already draining; its last chunk is {n - 1}, not {chunk_index}"
            )
        entered_end = slot if n is None else min(slot, n)
        if chunk_index + 1 < entered_end:
            raise ValueError(
                f"chunk {entered_end - 1} has already entered the window; the last chunk "
                f"cannot be {chunk_index}"
            )
        self._spec = dataclasses.replace(self._spec, num_chunks=chunk_index + 1)

    def stop_admitting(self) -> None:
        """Let no further chunk enter: the chunks in flight finish and the window drains."""
        n = self._spec.num_chunks
        slot = self._entry_slots_passed()
        if n is None or n > slot:
            self.set_last_chunk(slot - 1)

    def oldest_needed_chunk(self) -> int:
        """Smallest chunk index any later forward may attend to; older KV may be dropped.

        Derived from the kv ranges still to come: each in-flight chunk over its remaining
        steps, every chunk yet to enter over all its steps, and the next clean re-forward.
        With window 4 in steady state that is the most recently finished chunk.
        """
        if self.done:
            return self._cached_end
        s = self._spec
        plan = plan_forward(s, self._step)
        quartile = s.num_steps // len(s.noise2clean_kvrange)
        clean = kv_lookback(s.num_steps, s.num_steps, s.noise2clean_kvrange, s.clean_chunk_kvrange)

        def first_reached(chunk: int, noisy_lookbacks: tuple[int, ...]) -> int:
            # every chunk but a finite session's last is re-forwarded clean once it finishes,
            # and that forward may look back further than its noisy steps did
            re_forwarded = s.num_chunks is None or chunk < s.num_chunks - 1
            return chunk + 1 - max(*noisy_lookbacks, clean if re_forwarded else 0)

        firsts = [
            first_reached(c.chunk_index, s.noise2clean_kvrange[c.denoise_step // quartile :])
            for c in plan.chunks
        ]
        if plan.clean_kv_first_chunk is not None:
            firsts.append(plan.clean_kv_first_chunk)
        newest_future = plan.chunks[-1].chunk_index + 1
        if s.num_chunks is None or newest_future < s.num_chunks:
            firsts.append(first_reached(newest_future, s.noise2clean_kvrange))
        return max(0, min(firsts))

    def reachable_cached_chunks(self) -> range:
        """Chunks whose clean KV is cached and may still be read; all others can be evicted.

        A just-finished chunk is not listed until its clean re-forward has been planned (at
        sub-step 0 of the next stage its KV is computed inside that forward). So with window 4
        the set is the last clean chunk during sub-steps 1.. of a stage and empty just before
        a stage's sub-step 0, whose forward no longer reads the older chunk.
        """
        return range(self.oldest_needed_chunk(), self._cached_end)


def max_cached_chunks(spec: WindowSpec) -> int:
    """Most clean chunks whose KV is held at once: simulated over the first stages of an
    unbounded window of this shape (the steady state repeats from then on)."""
    window = Window(dataclasses.replace(spec, num_chunks=None))
    most = spec.prefix_chunks
    for _ in range(spec.steps_per_stage * (spec.window_size + max(spec.noise2clean_kvrange) + 2)):
        plan = window.next_forward()
        written = 1 if plan is not None and plan.clean_chunk is not None else 0
        most = max(most, len(window.reachable_cached_chunks()) + written)
    return most


def max_cached_at_entry(spec: WindowSpec) -> int:
    """Most clean chunks whose KV is cached just before a chunk enters: what a fork point holds
    besides latents (none with window 4: that forward re-forwards the only clean chunk it
    reads). Simulated like `max_cached_chunks`."""
    window = Window(dataclasses.replace(spec, num_chunks=None))
    most = 0
    for _ in range(spec.steps_per_stage * (spec.window_size + max(spec.noise2clean_kvrange) + 2)):
        cached = len(window.reachable_cached_chunks())
        plan = window.next_forward()
        if plan is not None and plan.entered is not None:
            most = max(most, cached)
    return most
