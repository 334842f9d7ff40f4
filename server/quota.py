"""Per-principal limits: how many sessions one caller may have open, and how many of its
requests may wait for one of those to end.

A request over its principal's session limit waits here, before its inputs are decoded, in its
principal's own FIFO; past the queue limit it is refused (RESOURCE_EXHAUSTED). So one busy
caller cannot fill the engine's admission queue for everyone. 0 = no limit of our own (the
server-wide --max-sessions / --queue-size still apply).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

from server.errors import ServerFull


class Slot:
    """One open session's claim on its principal's limit; released exactly once."""

    def __init__(self, quota: PrincipalQuota | None, principal: str) -> None:
        self._quota, self.principal = quota, principal

    def release(self) -> None:
        quota, self._quota = self._quota, None
        if quota is not None:
            quota._release(self.principal)


class PrincipalQuota:
    def __init__(self, max_sessions: int, max_queued: int, retry_after_ms: int = 1000) -> None:
        self.max_sessions, self.max_queued = max_sessions, max_queued
        self.retry_after_ms = retry_after_ms
        self.held: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, deque[asyncio.Future]] = defaultdict(deque)

    async def acquire(self, principal: str) -> Slot:
        """A slot now, or after this principal's earlier requests got theirs."""
        if not self.max_sessions:
            return Slot(None, principal)
        if self.held[principal] < self.max_sessions and not self.waiting[principal]:
            self.held[principal] += 1
            return Slot(self, principal)
        if len(self.waiting[principal]) >= self.max_queued:
            raise ServerFull(
                f"principal {principal!r} has {self.held[principal]} sessions open and "
                f"{len(self.waiting[principal])} requests waiting, its limit "
                f"(--principal-max-sessions {self.max_sessions}, --principal-max-queued "
                f"{self.max_queued}); wait for one to end",
                self.retry_after_ms,
            )
        ticket = asyncio.get_running_loop().create_future()
        self.waiting[principal].append(ticket)
        try:
            await ticket  # resolved by _release, which hands its slot over
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._release(principal)  # handed over as we left: pass it on
            else:
                self.waiting[principal].remove(ticket)
            raise
        return Slot(self, principal)

    def _release(self, principal: str) -> None:
        waiting = self.waiting[principal]
        while waiting:
            ticket = waiting.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the slot passes to the next request
                return
        self.held[principal] -= 1
        if not self.held[principal]:
            del self.held[principal], self.waiting[principal]
