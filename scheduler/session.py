"""One generation session as the scheduler sees it: its request, prompt timeline and state.

No DiT here: a session holds tensors (latents, its KV cache object) but every rule about them
lives in the window (what runs when) and the runner (how it is computed).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from scheduler.window import Window

MODES = ("t2v", "i2v", "v2v")
LATENT_CHANNELS = 16  # VAE latent channels (the DiT's 24B input path duplicates them itself)


@dataclass(frozen=True)
class PromptEntry:
    """One entry of a session's prompt timeline."""

    from_chunk: int  # first generated chunk (global index) this text steers
    text: str  # the prompt as the client sent it
    version: int  # 1 for the request's first prompt, then +1 per entry


@dataclass(frozen=True)
class SessionParams:
    """A validated request. The server checks every field before this is built."""

    session_id: str
    prompts: tuple[tuple[int, str], ...]  # (from_chunk, text); the first must start at chunk 0
    num_chunks: int | None  # generated chunks (prefix excluded); None = until cancelled
    height: int  # pixels, multiple of 16
    width: int  # pixels, multiple of 16
    seed: int = 0  # the noise of chunk c comes from a generator keyed by (seed, c)
    mode: str = "t2v"  # t2v / i2v / v2v
    image: Tensor | None = None  # i2v: uint8 (H, W, 3), already scaled to height x width
    video: Tensor | None = None  # v2v: uint8 (T, H, W, 3) at 24 fps, scaled; its last frames
    num_steps: int | None = None  # override of runtime_config.num_steps
    shortcut_mode: str | None = None  # override of engine_config.shortcut_mode (12 steps)
    text_scales: tuple[float, ...] | None = None  # override of runtime_config.text_scales
    prev_chunk_scales: tuple[float, ...] | None = None  # override of prev_chunk_scales

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.prompts or self.prompts[0][0] != 0:
            raise ValueError("the prompt timeline must start with an entry for chunk 0")
        if self.num_chunks is not None and self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1 or None, got {self.num_chunks}")
        if (self.mode == "i2v") != (self.image is not None):
            raise ValueError("an image is given exactly when mode is i2v")
        if (self.mode == "v2v") != (self.video is not None):
            raise ValueError("a prefix video is given exactly when mode is v2v")


class PromptTimeline:
    """`(from_chunk, text)` entries with versions; a chunk's prompt is the last entry at or
    before it. Entries are only appended for chunks that have not entered the window, so what
    drove a chunk never changes afterwards."""

    def __init__(self, prompts: tuple[tuple[int, str], ...], first_chunk: int) -> None:
        self.entries: list[PromptEntry] = []  # sorted by from_chunk
        self.version = 0  # version of the newest entry
        for from_chunk, text in prompts:
            self.add(first_chunk + from_chunk, text)

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
    QUEUED = "queued"  # waiting for memory
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class ChunkDone:
    """One finished, decoded chunk handed up to the consumer."""

    session_id: str
    chunk_index: int  # global chunk index (v2v prefix chunks count)
    output_index: int  # 0-based among the chunks this session outputs
    first_frame: int  # index of the first frame in the session's output video
    frames: Tensor  # uint8 (T, H, W, 3)
    latent: Tensor  # (16, 6, h, w) fp32: the clean latent the frames were decoded from
    prompt: PromptEntry  # the prompt that drove this chunk
    denoise_s: float  # wall time from the chunk entering the window to its last step
    decode_s: float  # VAE decode time


@dataclass
class Session:
    """Mutable scheduler-side state of one session."""

    params: SessionParams
    window: Window
    timeline: PromptTimeline
    prefix_latent: Tensor | None  # (16, n, h, w) fp32: the i2v image / v2v prefix latents
    prefix_latent_frames: int  # official prefix_len
    estimated_bytes: int  # what admission reserved for this session
    state: SessionState = SessionState.QUEUED
    latents: dict[int, Tensor] = field(default_factory=dict)  # chunk -> (16, 6, h, w) fp32
    bound_prompts: dict[int, PromptEntry] = field(default_factory=dict)  # chunk -> its prompt
    entered_at: dict[int, float] = field(default_factory=dict)  # chunk -> time it entered
    kv_cache: object | None = None  # model.kv_cache.KVCache, created by the runner
    outputs: deque[ChunkDone] = field(default_factory=deque)  # decoded, not yet consumed
    forwards_served: int = 0  # fairness: forwards this session has had
    chunks_out: int = 0  # chunks handed up so far
    frames_out: int = 0  # frames handed up so far
    created_at: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def session_id(self) -> str:
        return self.params.session_id

    @property
    def prefix_chunks(self) -> int:
        return self.window.spec.prefix_chunks

    @property
    def finished(self) -> bool:
        return self.state in (SessionState.FINISHED, SessionState.CANCELLED, SessionState.FAILED)

    def latent_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latents.values())


def chunk_noise(seed: int, chunk_index: int, shape: tuple[int, ...]) -> Tensor:
    """Noise of one chunk from a generator keyed by (seed, chunk index), so a chunk's noise
    depends neither on the other sessions nor on how long this one runs. (The official code
    draws the whole video's noise in one call; a streaming session cannot.)"""
    key = (seed * 0x9E3779B97F4A7C15 + chunk_index * 0xBF58476D1CE4E5B9) % (1 << 63)
    gen = torch.Generator().manual_seed(key)
    return torch.randn(shape, generator=gen, dtype=torch.float32)
