"""Pacing submits under an account-wide limit: one refusal pauses every submit.

A submit refused with 429 (or any refusal carrying Retry-After) says the account's limit was hit, not
that this job has a problem. So every submit waits until the pause is over, each then after its own
jitter (up to `jitter` times the pause), and for one more pause length after it submits go one at a
time, each waiting for the answer to the one before: a limit that was just hit lets a few through,
and the whole batch coming back at the same instant would trip it again together.

The clock, the random source and the wait itself are parameters: the scheduler's wait ends early at
`max_wait` or Ctrl-C, and tests run without waiting for real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger("batchrun.run")


class SubmitPacer:
    """Shared by every submit of a run: `async with pacer.turn(): POST`, and `refused(seconds)` when the
    POST was refused with a wait."""

    def __init__(self, clock: Callable[[], float], rand: Callable[[], float],
                 wait: Callable[[float], Awaitable[Any]], *, jitter: float = 0.5):
        self._clock = clock
        self._rand = rand
        self._wait = wait
        self._jitter = jitter
        self._paused_until = float("-inf")
        self._span = 0.0  # jitter span of the current pause, seconds
        self._serial_until = float("-inf")
        self._one_at_a_time = asyncio.Lock()

    def refused(self, seconds: float) -> None:
        """A submit was refused and the server (or the backoff) says to wait `seconds`: pause them all."""
        until = self._clock() + seconds
        self._serial_until = max(self._serial_until, until + seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._span = self._jitter * seconds
            log.info("submits paused for %.1fs: the API asked to wait", seconds)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait until this submit may be sent; the POST and its answer happen inside the block."""
        lock = self._one_at_a_time if self._clock() < self._serial_until else None
        if lock is not None:
            await lock.acquire()
        try:
            while (wait := self._paused_until - self._clock()) > 0:
                await self._wait(wait + self._rand() * self._span)
            yield
        finally:
            if lock is not None:
                lock.release()
