"""The sandbox's render farm: a small discrete-event simulation advanced lazily from a clock.

No background task moves jobs along. Every HTTP call first calls ``SimQueue.advance(now)``, which
replays every event (a render ending, the next queued job starting) up to ``now`` at its exact
simulated time. Each event costs O(log n), so a batch of 10,000 zero-latency jobs stays cheap.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IN_QUEUE = "in_queue"
IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass(eq=False)
class Job:
    """One request the sandbox accepted. Times are on the sandbox clock.

    ``error`` is decided at submission (fail marker or random failure) and only shows once the
    render ends; ``lost_answer`` records that the submit answer was dropped on purpose.
    """

    request_id: str
    model_id: str
    input: Any
    input_sha256: str
    render_seconds: float
    created_at: float
    status: str = IN_QUEUE
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    lost_answer: bool = False
    urls_minted: int = 0
    ticket: int = field(default=-1, repr=False)


class SimQueue:
    """``capacity`` render slots in front of a FIFO queue.

    Running jobs sit in a heap keyed by end time; waiting jobs in a deque. A cancelled job stays in
    the deque (removing from the middle would be O(n)) and is skipped when it reaches the front;
    queue positions subtract those tombstones with a bisect over their sorted tickets.
    """

    def __init__(self, capacity: int, on_finish: Callable[[Job], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.on_finish = on_finish  # called once per job whose render ends (completed or failed)
        self.peak_in_flight = 0
        self._running: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._waiting: deque[Job] = deque()
        self._waiting_live = 0
        self._next_ticket = 0
        self._cancelled_tickets: list[int] = []

    @property
    def in_flight(self) -> int:
        return len(self._running) + self._waiting_live

    def add(self, job: Job, now: float) -> None:
        self.advance(now)
        if len(self._running) < self.capacity:
            self._start(job, now)
        else:
            job.status = IN_QUEUE
            job.ticket = self._next_ticket
            self._next_ticket += 1
            self._waiting.append(job)
            self._waiting_live += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def advance(self, now: float) -> None:
        while self._running and self._running[0][0] <= now:
            end, _, job = heapq.heappop(self._running)
            job.status = FAILED if job.error else COMPLETED
            job.finished_at = end
            if self.on_finish is not None:
                self.on_finish(job)
            nxt = self._pop_waiting()
            if nxt is not None:
                # The freed slot is taken at the exact moment it freed, not when someone polls.
                self._start(nxt, end)

    def cancel(self, job: Job, now: float) -> bool:
        """Cancel a queued job; False (and no change) if it already started or finished."""
        self.advance(now)
        if job.status != IN_QUEUE:
            return False
        job.status = CANCELLED
        job.finished_at = now
        insort(self._cancelled_tickets, job.ticket)
        self._waiting_live -= 1
        return True

    def position(self, job: Job) -> int | None:
        """1-based place of a queued job among the live waiting jobs (1 = starts next)."""
        if job.status != IN_QUEUE:
            return None
        head = self._waiting[0].ticket
        tombstones = bisect_left(self._cancelled_tickets, job.ticket) - bisect_left(
            self._cancelled_tickets, head
        )
        return job.ticket - head - tombstones + 1

    def _start(self, job: Job, at: float) -> None:
        job.status = IN_PROGRESS
        job.started_at = at
        heapq.heappush(self._running, (at + job.render_seconds, next(self._seq), job))

    def _pop_waiting(self) -> Job | None:
        while self._waiting:
            job = self._waiting.popleft()
            if job.status == IN_QUEUE:
                self._waiting_live -= 1
                return job
        return None


def ideal_makespan(render_times: list[float], slots: int) -> float:
    """The makespan of these renders, in seconds, if every job were submitted at time 0 and each slot took
    the next job the moment it freed: list scheduling in submit order on `slots` slots (what `SimQueue`
    does with every job queued at once). A bench's floor for first submit to last finish."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    ends = [0.0] * min(slots, max(1, len(render_times)))
    for seconds in render_times:
        heapq.heapreplace(ends, ends[0] + seconds)
    return max(ends)
