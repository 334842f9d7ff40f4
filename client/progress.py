"""The CLI's progress display: a redrawn bar on a terminal, one plain line per chunk otherwise.

Built in rather than a progress-bar library: it is a few lines, it needs fields a generic bar
does not have (time to first chunk, the prompt that steered each chunk), and the client then
depends on grpcio, protobuf and av only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from client.events import ChunkEvent

BAR_CELLS = 24


@dataclass
class Progress:
    out: TextIO  # where progress goes (the CLI uses stderr)
    tty: bool  # True: redraw one bar line in place; False: one plain line per chunk
    total_chunks: int = 0  # 0 = unbounded (no bar fill, no ETA)
    clock: Callable[[], float] = time.monotonic
    start_s: float = field(default=0.0)  # when the request was sent (clock seconds)
    chunks: int = 0  # chunks done
    frames: int = 0  # frames done
    first_chunk_s: float | None = None  # clock time of the first chunk
    last_chunk_s: float | None = None  # clock time of the latest chunk
    _drawn: bool = False

    def __post_init__(self) -> None:
        self.start_s = self.start_s or self.clock()

    def chunk(self, chunk: ChunkEvent) -> None:
        now = self.clock()
        self.chunks += 1
        self.frames += chunk.frame_count
        self.first_chunk_s = self.first_chunk_s or now
        self.last_chunk_s = now
        if self.tty:
            self._draw(self.bar())
        else:
            self.out.write(self.line(chunk) + "\n")
            self.out.flush()

    def note(self, text: str, to: TextIO | None = None) -> None:
        """A line of its own (on `to`, default this display's stream), above the bar."""
        if self._drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
        target = to or self.out
        target.write(text + "\n")
        target.flush()
        if self._drawn:
            self._draw(self.bar())

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False

    # ---- numbers --------------------------------------------------------------------------

    def fps(self) -> float:
        """Frames per second since the request was sent (queueing and start-up included)."""
        return self.frames / max(self.clock() - self.start_s, 1e-9)

    def ttfc_s(self) -> float | None:
        return None if self.first_chunk_s is None else self.first_chunk_s - self.start_s

    def eta_s(self) -> float | None:
        if not self.total_chunks or not self.chunks:
            return None
        # chunks stream at a steady pace once the window is full; before a second chunk the
        # only pace known is the first chunk's
        if self.chunks >= 2:
            per_chunk = (self.last_chunk_s - self.first_chunk_s) / (self.chunks - 1)
        else:
            per_chunk = self.ttfc_s()
        return max(self.total_chunks - self.chunks, 0) * per_chunk

    # ---- text -----------------------------------------------------------------------------

    def line(self, chunk: ChunkEvent) -> str:
        total = self.total_chunks or "?"
        return (
            f"chunk {chunk.index} done ({self.chunks}/{total}): {self.frames} frames, "
            f"{self.fps():.1f} fps, first chunk {_seconds(self.ttfc_s())}, "
            f"eta {_seconds(self.eta_s())}, prompt v{chunk.prompt_version} "
            f"{chunk.prompt_text!r}"
        )

    def bar(self) -> str:
        if self.total_chunks:
            filled = BAR_CELLS * min(self.chunks, self.total_chunks) // self.total_chunks
            cells = "#" * filled + "." * (BAR_CELLS - filled)
            count = f"{self.chunks}/{self.total_chunks} chunks"
        else:
            cells, count = "", f"{self.chunks} chunks"
        return (
            f"[{cells}] {count} | {self.frames} frames | {self.fps():.1f} fps | "
            f"first chunk {_seconds(self.ttfc_s())} | ETA {_seconds(self.eta_s())}"
        )

    def _draw(self, text: str) -> None:
        self.out.write("\r\x1b[K" + text)
        self.out.flush()
        self._drawn = True


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    minutes, seconds = divmod(int(value), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
