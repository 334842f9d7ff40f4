"""One generation session as the scheduler sees it: its request, prompt timeline and state.

Bookkeeping only, and no torch: the tensors of a session (latents, prefix latents, KV cache,
frames) are owned by the engine's runner, keyed by session id. Every rule about what runs when
lives in the window; how it is computed lives in the engine.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from scheduler.window import Window, WindowSpec

MODES = ("t2v", "i2v", "v2v")


@dataclass(frozen=True)
class PromptEntry:
    """One entry of a session's prompt timeline."""

    from_chunk: int  # first generated chunk (global index) this text steers
    text: str  # the prompt as the client sent it
    version: int  # 1 for the request's first prompt, then +1 per entry


@dataclass(frozen=True)
class SessionParams:
    """The request record: built once by validation at the edge, completed by the server (id,
    seed, decoded inputs) and opened by the engine as it is, over the Pipe too. A new request
    field is added here, in the proto, in validation and where it is used."""

    session_id: str  # "" until the server assigns one (a request may name its own)
    prompts: tuple[tuple[int, str], ...]  # (from_chunk, text); the first must start at chunk 0
    num_chunks: int | None  # generated chunks (prefix excluded); None = until cancelled
    height: int  # pixels, multiple of 16
    width: int  # pixels, multiple of 16
    seed: int | None = 0  # chunk c's noise comes from (seed, c); None until the server picks
    mode: str = "t2v"  # t2v / i2v / v2v
    # i2v: the image as validated (encoded bytes), then decoded by the server: uint8 (H, W, 3)
    # scaled to height x width. None in the server's retained copy (nothing held past need).
    image: np.ndarray | bytes | None = None
    # v2v: likewise the prefix video: encoded, then uint8 (T, H, W, 3) at the model fps, scaled
    video: np.ndarray | bytes | None = None
    num_steps: int | None = None  # override of runtime_config.num_steps
    shortcut_mode: str | None = None  # override of engine_config.shortcut_mode (12 steps)
    text_scales: tuple[float, ...] | None = None  # override of runtime_config.text_scales
    prev_chunk_scales: tuple[float, ...] | None = None  # override of prev_chunk_scales
    output_encoding: int = 0  # the payload the client asked for (proto OutputEncoding); the
    #                           edge's alone: the engine ignores it
    # A fork: the session continues `fork.session_id` from its chunk `fork.at_chunk`. The server
    # fills every other field from the source (a fork keeps its size, seed, mode, sampling and
    # length); `prompts` are the fork's own entries from at_chunk on, empty = the source's.
    fork: ForkSource | None = None
    # A resume: a snapshot file (engine/snapshot.py) to continue; the server fills the other
    # fields from its header. Bytes, so the engine's ranks each read it onto their device.
    resume: bytes | None = None

    def __post_init__(self) -> None:
        if self.fork is not None and self.prompts and self.prompts[0][0] < self.fork.at_chunk:
            raise ValueError(
                f"a fork's timeline starts at its fork chunk {self.fork.at_chunk} or later"
            )
        if (
            self.fork is None
            and self.resume is None
            and (not self.prompts or self.prompts[0][0] != 0)
        ):
            raise ValueError("the prompt timeline must start with an entry for chunk 0")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_chunks is not None and self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1 or None, got {self.num_chunks}")
        if self.image is not None and self.mode != "i2v":
            raise ValueError("an image is given only when mode is i2v")
        if self.video is not None and self.mode != "v2v":
            raise ValueError("a prefix video is given only when mode is v2v")

    def check_openable(self) -> None:
        """What the engine needs before it opens the request: an id, a seed, decoded inputs."""
        if not self.session_id or self.seed is None:
            raise ValueError("a session is opened with its id and seed set")
        given = {"i2v": self.image, "v2v": self.video}
        decoded = given.get(self.mode) is not None and not isinstance(given[self.mode], bytes)
        if self.fork is None and self.resume is None and self.mode in given and not decoded:
            raise ValueError(f"{self.mode} needs its input decoded to uint8 frames")


@dataclass(frozen=True)
class ForkSource:
    """Where a fork starts: chunk `at_chunk` (an output index, as clients count) of a session."""

    session_id: str
    at_chunk: int


@dataclass(frozen=True)
class ForkMark:
    """A session's scheduler state at the moment chunk `chunk` (global index) was about to
    enter its window: all a fork from that chunk needs besides the engine's tensors (which the
    runner marks at the same moment). Chunks in flight then keep their prompts; the chunk and
    those after it take the fork's timeline."""

    chunk: int
    window: WindowSpec  # the window's spec then (an unbounded one may have been ended since)
    steps_done: int  # denoising forwards planned before it
    bound_prompts: tuple[tuple[int, PromptEntry], ...]  # the chunks in flight then
    frames_out: int  # frames handed up before it


@dataclass(frozen=True)
class SessionSpec:
    """What every engine step of a session needs besides its forward, fixed when it opens and
    resolved against the model's defaults. Small and tensor-free: it travels in every plan."""

    session_id: str
    seed: int  # noise key: chunk c's noise comes from (seed, c)
    mode: str  # t2v / i2v / v2v
    height: int  # pixels
    width: int  # pixels
    num_steps: int  # Euler steps per chunk
    shortcut_mode: str  # the 12-step shortcut grid's layout
    text_scales: tuple[float, ...] | None  # None = the model's CFG text scales
    prev_chunk_scales: tuple[float, ...] | None  # None = the model's
    generated_total: int | None  # generated chunks (prefix excluded), None = unbounded
    prefix_latent_frames: int  # latent frames of the i2v image / v2v prefix (official prefix_len)
    prefix_chunks: int  # v2v clean prefix chunks, whose KV is extracted before denoising
    output_from: int = 0  # first chunk (global) handed up: a fork's fork chunk; 0 = all


class PromptTimeline:
    """`(from_chunk, text)` entries with versions; a chunk's prompt is the last entry at or
    before it. Entries are only appended for chunks that have not entered the window, so what
    drove a chunk never changes afterwards."""

    def __init__(self, prompts: tuple[tuple[int, str], ...], first_chunk: int) -> None:
        self.entries: list[PromptEntry] = []  # sorted by from_chunk
        self.version = 0  # version of the newest entry
        for from_chunk, text in prompts:
            self.add(first_chunk + from_chunk, text)

    @classmethod
    def of(cls, entries: list[PromptEntry]) -> PromptTimeline:
        """A timeline with these entries and their versions (a fork's)."""
        timeline = cls((), 0)
        timeline.entries = sorted(entries, key=lambda e: e.from_chunk)
        timeline.version = max((e.version for e in entries), default=0)
        return timeline

    def add(self, from_chunk: int, text: str, replace_later: bool = False) -> PromptEntry:
        """An entry at a chunk that already has one replaces it; `replace_later` also drops the
        entries scheduled after it."""
        self.version += 1
        entry = PromptEntry(from_chunk, text, self.version)
        keep = [
            e
            for e in self.entries
            if e.from_chunk < from_chunk or (e.from_chunk > from_chunk and not replace_later)
        ]
        self.entries = sorted([*keep, entry], key=lambda e: e.from_chunk)
        return entry

    def at(self, chunk_index: int) -> PromptEntry:
        return [e for e in self.entries if e.from_chunk <= chunk_index][-1]


class SessionState(enum.Enum):
    """A session's lifecycle, the one spelling used by the scheduler, the engine process, the
    Pipe and the server (the proto enum is mapped from it in server/convert.py)."""

    QUEUED = "queued"  # waiting for memory
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (SessionState.FINISHED, SessionState.CANCELLED, SessionState.FAILED)


@dataclass(frozen=True)
class ChunkOut:
    """The scheduler's record of one finished chunk (the engine adds its frames)."""

    session_id: str
    chunk_index: int  # global chunk index (v2v prefix chunks count)
    output_index: int  # 0-based among the chunks this session outputs
    first_frame: int  # index of the first frame in the session's output video
    frame_count: int
    prompt: PromptEntry  # the prompt that drove this chunk
    queue_s: float  # waiting before it entered: admission for the first chunk, pauses after
    denoise_s: float  # wall time from the chunk entering the window to its last step
    decode_s: float  # VAE decode time


@dataclass
class Session:
    """Mutable scheduler-side state of one session: window, timeline and counters."""

    spec: SessionSpec
    window: Window
    timeline: PromptTimeline
    estimated_bytes: int  # what admission reserved for this session (its fork history too)
    history_bytes: int = 0  # of that, the most its fork history holds (kept after its end)
    state: SessionState = SessionState.QUEUED
    bound_prompts: dict[int, PromptEntry] = field(default_factory=dict)  # chunk -> its prompt
    entered_at: dict[int, float] = field(default_factory=dict)  # chunk -> time it entered
    unconsumed: int = 0  # chunks handed up that the consumer has not taken yet
    forwards_served: int = 0  # fairness: forwards this session has had
    chunks_out: int = 0  # chunks handed up so far
    frames_out: int = 0  # frames handed up so far
    created_at: float = field(default_factory=time.monotonic)
    error: str | None = None
    waited_s: float = 0.0  # time not served since the last chunk entered (admission, pauses)
    queue_s: dict[int, float] = field(default_factory=dict)  # chunk -> its wait, until output
    wait_checked_at: float = field(default_factory=time.monotonic)  # waits accounted up to here
    served_at_check: int = 0  # forwards_served then
    # fork points of the last `fork_history` chunks to enter, oldest first; kept after the end
    fork_marks: list[ForkMark] = field(default_factory=list)
    ended_at: float | None = None  # monotonic time it ended

    @property
    def session_id(self) -> str:
        return self.spec.session_id

    @property
    def prefix_chunks(self) -> int:
        return self.window.spec.prefix_chunks

    @property
    def finished(self) -> bool:
        return self.state.ended

    @property
    def in_flight(self) -> set[int]:
        """Chunks in the window, not yet output: those with an entry time."""
        return set(self.entered_at)

    # Chunk numbering: the scheduler counts a v2v prefix's chunks (global indices, as the
    # official window does); clients never see them (output indices). These two are the only
    # translation between the two.
    def to_output(self, chunk_index: int) -> int:
        return chunk_index - self.prefix_chunks

    def to_global(self, output_index: int) -> int:
        return output_index + self.prefix_chunks
