"""When to try a call again. Both faces use one Retrier; they differ only in how they sleep."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import grpc

from client.options import RetryPolicy
from client.requests import RETRYABLE

logger = logging.getLogger(__name__)

NO_RETRY = RetryPolicy(max_attempts=1)


class Retrier:
    """Attempts of one call, up to its first response: says how long to wait before the next
    try, or None to give up. After the first response the caller stops asking (a stream that
    already streamed is never restarted, only resumed from a snapshot)."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout_s: float | None,
        what: str,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        retry_for_s: float | None = None,
    ) -> None:
        """`retry_for_s`: retry for this long, whatever `policy.max_attempts` says (a resume
        waits out a rolling restart); `timeout_s` still bounds each attempt's call."""
        self._delays = policy.delays_s(rand, unbounded=retry_for_s is not None)
        self._clock = clock
        # one deadline for every attempt together, so retries never stretch the caller's
        # deadline
        self._deadline = None if timeout_s is None else clock() + timeout_s
        self._give_up = None if retry_for_s is None else clock() + retry_for_s
        self._what = what
        self.attempts = 0

    def timeout_s(self) -> float | None:
        """The deadline left for the next attempt (counted as made)."""
        self.attempts += 1
        if self._deadline is None:
            return None
        return max(self._deadline - self._clock(), 0.0)

    def delay_s(self, error: grpc.RpcError) -> float | None:
        code = error.code() if hasattr(error, "code") else None
        if code not in RETRYABLE:
            return None
        delay = next(self._delays, None)
        if delay is None:
            return None
        for limit in (self._deadline, self._give_up):
            if limit is not None and self._clock() + delay >= limit:
                return None
        details = error.details() if hasattr(error, "details") else ""
        logger.info(
            "%s: %s (%s); try %d in %.2f s",
            self._what,
            code.name,
            details,
            self.attempts + 1,
            delay,
        )
        return delay
