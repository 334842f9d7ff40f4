"""Bounded thread pools: input decoding and output encoding each get their own.

Decoding a client's image or prefix video can take seconds; encoding a chunk must never wait
behind it, or every other session's stream stalls. So the two kinds of work never share a
thread, and a pool with too much waiting work refuses more (RESOURCE_EXHAUSTED) instead of
letting a queue grow without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.errors import ServerFull

T = TypeVar("T")


class BoundedPool:
    """`threads` workers; at most `max_pending` jobs running or waiting, more are refused."""

    def __init__(self, name: str, threads: int, max_pending: int) -> None:
        if threads < 1 or max_pending < threads:
            raise ValueError(f"{name} pool: threads >= 1 and max_pending >= threads")
        self.name = name
        self.max_pending = max_pending
        self.pending = 0  # touched on the event loop only
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.pending >= self.max_pending:
            raise ServerFull(f"the {self.name} pool has {self.pending} jobs waiting", 1000)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
