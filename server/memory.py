"""Hand freed memory back to the OS, so the server shrinks once a request's bytes are gone.

glibc keeps what a process frees, for reuse. Two of its habits kept a burst of large requests
resident long after they ended (issue 18: 20 cancelled 15 MiB image requests left the server
~1 GB larger):
- Its mmap threshold moves. A block of 128 KiB or more starts as its own mapping, but once such
  a block is freed glibc raises the threshold to its size, so the next request's bytes come
  from a heap, which shrinks only at its top. `configure()` fixes the threshold: every block of
  MMAP_THRESHOLD_BYTES or more is a mapping, returned the moment it is freed.
- The small buffers gRPC reads a request into are freed into its threads' arenas, which keep
  their pages. `Reclaimer` hands those back (malloc_trim) once enough have piled up.
Before it trims, the Reclaimer runs a full garbage collection: a cancelled call can leave its
frames (and a request's bytes among their locals) in reference cycles, and the collector's
thresholds count objects, not bytes, so a few such cycles holding hundreds of MB wait for a
full collection that may not come for a long time (measured: 20 cancelled 15 MiB requests, 5
of them refused by a full decode pool, left +102 MB without it, +11 to +44 MB with it).
Other C libraries (musl, macOS) need neither: both are no-ops there.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import platform
import time
from dataclasses import dataclass, field

from engine.logs import event

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt() parameter, from glibc's malloc.h
# Blocks this large or larger are mapped on their own: a request's bytes, decoded frames, big
# protobuf messages. Smaller blocks (most of Python's) stay on the heaps, where reuse is cheap.
MMAP_THRESHOLD_BYTES = 1 << 20
# Free heap memory the process may keep before the Reclaimer trims; a trim walks every free
# block, so it is not worth running for less.
TRIM_THRESHOLD_BYTES = 32 << 20
CHECK_INTERVAL_S = 1.0  # how often the Reclaimer looks at the heaps
# While RSS stays high without growing, trims are retried after this long, doubling up to the
# maximum while they give little back (a collection plus a trim: ~10-30 ms on the loop).
MIN_RETRY_S = 2.0
MAX_RETRY_S = 60.0


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (2.33+): every field a size_t."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",  # free bytes the heaps hold (not returned to the OS)
            "keepcost",
        )
    ]


def _load_glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc with mallopt, malloc_trim and mallinfo2; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
    except (OSError, AttributeError):  # not found, or a glibc older than 2.33
        return None
    return libc


_GLIBC = _load_glibc()


def supported() -> bool:
    """Whether this process's allocator is glibc's (the only one these calls change)."""
    return _GLIBC is not None


def configure(mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (and so stop it moving); whether it was set. Call it once,
    early in the process, before large requests arrive."""
    if _GLIBC is None:
        return False
    return _GLIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1


def free_heap_bytes() -> int | None:
    """Bytes the heaps hold free (freed by the process, kept by the allocator); None off glibc."""
    return None if _GLIBC is None else _GLIBC.mallinfo2().fordblks


def trim() -> bool:
    """Return the heaps' free pages to the OS now (it can take 100+ ms on a fragmented heap:
    call it off the event loop); whether any were returned."""
    return _GLIBC is not None and _GLIBC.malloc_trim(0) == 1


def resident_bytes() -> int | None:
    """This process's resident set size (VmRSS), None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


@dataclass
class Reclaimer:
    """Trims the heaps once enough freed memory may be resident again; `poll()` it from a
    periodic task. The trim runs in a thread, never on the loop.

    Three signs, since none sees everything at a once-a-second look: the heaps' free bytes
    grew by `threshold_bytes` (memory was freed since the last look); RSS grew by it since the
    last trim (free pages that a trim had returned were used again, maybe freed again); or RSS
    stays that far above the lowest a trim reached (garbage in reference cycles is neither free
    nor growing: only the collection a trim starts with frees it). The last is retried with a
    backoff that doubles, up to MAX_RETRY_S, while trims give little back (a server that is
    simply busy holds more), and resets when one gives back much."""

    threshold_bytes: int = TRIM_THRESHOLD_BYTES
    interval_s: float = CHECK_INTERVAL_S
    trims: int = 0  # trims done
    # the heaps' free bytes after the last trim, lowered as they are reused
    _free_floor: int = 0
    _rss_after_trim: int = 0
    _rss_floor: int = 1 << 62  # the lowest RSS a trim left (none yet: no floor)
    _retry_s: float = MIN_RETRY_S
    _retry_at: float = float("-inf")
    _checked_at: float = float("-inf")
    _trimming: asyncio.Task | None = field(default=None, repr=False)

    def poll(self) -> None:
        """Start a trim if one is due (otherwise cheap: one mallinfo2 and one /proc read)."""
        now = time.monotonic()
        if _GLIBC is None or now - self._checked_at < self.interval_s:
            return
        if self._trimming is not None and not self._trimming.done():
            return
        self._checked_at = now
        free, rss = _GLIBC.mallinfo2().fordblks, resident_bytes() or 0
        freed = free - self._free_floor >= self.threshold_bytes
        grew = rss - self._rss_after_trim >= self.threshold_bytes
        high = rss - self._rss_floor >= self.threshold_bytes and now >= self._retry_at
        if not (freed or grew or high):
            self._free_floor = min(self._free_floor, free)
            return
        self._trimming = asyncio.get_running_loop().create_task(self._trim())

    async def _trim(self) -> None:
        before, t0 = resident_bytes(), time.perf_counter()
        collected = gc.collect()  # on the loop: it holds the GIL wherever it runs
        await asyncio.to_thread(trim)
        took_s, after = time.perf_counter() - t0, resident_bytes()
        self._free_floor, self._rss_after_trim = _GLIBC.mallinfo2().fordblks, after or 0
        self._rss_floor = min(self._rss_floor, after or 0)
        released = (before or 0) - (after or 0)
        if released >= self.threshold_bytes // 2:
            self._retry_s = MIN_RETRY_S
        else:
            self._retry_s = min(2 * self._retry_s, MAX_RETRY_S)
        self._retry_at = time.monotonic() + self._retry_s
        self.trims += 1
        event(
            logger,
            "memory.trimmed",
            level=logging.DEBUG,
            released_mb=None if before is None or after is None else (before - after) / 2**20,
            collected=collected,
            took_ms=took_s * 1e3,
        )
