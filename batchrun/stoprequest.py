"""How `batchrun cancel` tells a live run of the same output dir to stop submitting.

The request is a file, `cancel.request`, beside `run.lock`: `cancel` creates it only while a run holds
the lock; the run looks for it every `POLL_SECONDS`, stops submitting (as a first Ctrl-C does, but it
says why and exits 1, not 130), waits until every POST it already started has been answered and
recorded, and then deletes the file. That deletion is the answer `cancel` waits for: from then on the
ledger holds every request the run made, so none of its queued jobs escapes the cancel.

A file rather than a signal to the PID in `run.lock`: a PID can name another process (reused, or a
run on another host sharing the directory over NFS) and signalling it would do harm, while the file
reaches exactly the run that holds this directory's lock, needs no permission on that process, and
lets the run acknowledge once it has really stopped.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchrun.lock import LOCK_NAME, live_pid

REQUEST_NAME = "cancel.request"
POLL_SECONDS = 0.2

log = logging.getLogger("batchrun.run")


@dataclass(frozen=True)
class StopAnswer:
    """What asking a live run to stop came to. `pid` is the run's, when one held the output dir."""

    live: bool  # a run held the output dir when asked
    stopped: bool  # it has stopped submitting (or has ended)
    pid: int | None = None


def lock_holder(output_dir: Path) -> tuple[bool, int | None]:
    """(whether a run holds the output dir's lock now, the PID it wrote). Takes no lock for long: a
    probe with LOCK_NB, released at once."""
    try:
        fd = os.open(output_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False, None
            return True, live_pid(os.pread(fd, 64, 0).decode("ascii", "replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)


def ask_to_stop(output_dir: Path, *, wait: float = 30.0, step: float = 0.05,
                clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> StopAnswer:
    """Ask the run holding `output_dir`, if any, to stop submitting, and wait up to `wait` seconds for it
    to say it has. A request it has not answered yet stays in place: it stops as soon as it sees it."""
    live, pid = lock_holder(output_dir)
    if not live:
        return StopAnswer(live=False, stopped=True)
    path = output_dir / REQUEST_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        os.close(fd)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc.strerror)
        return StopAnswer(live=True, stopped=False, pid=pid)
    deadline = clock() + wait
    while True:
        if not path.exists():
            return StopAnswer(live=True, stopped=True, pid=pid)
        if not lock_holder(output_dir)[0]:  # the run ended before it saw the request
            clear(output_dir)
            return StopAnswer(live=True, stopped=True, pid=pid)
        if clock() >= deadline:
            return StopAnswer(live=True, stopped=False, pid=pid)
        sleep(step)


def clear(output_dir: Path) -> None:
    """Remove a request (a run clears one left from before it took the lock)."""
    try:
        os.unlink(output_dir / REQUEST_NAME)
    except FileNotFoundError:
        pass


async def watch(output_dir: Path, stop_submitting: Callable[[], None], posts_in_flight: Callable[[], int],
                interval: float = POLL_SECONDS) -> None:
    """The run's side: poll for a request; on one, stop submitting, wait for the POSTs already started,
    then acknowledge by removing the request. Runs until cancelled."""
    path = output_dir / REQUEST_NAME
    while True:
        if not os.path.lexists(path):
            await asyncio.sleep(interval)
            continue
        log.warning("'batchrun cancel' asked this run to stop submitting; jobs already accepted are collected")
        stop_submitting()
        while posts_in_flight():
            await asyncio.sleep(interval / 4)
        clear(output_dir)
        await asyncio.sleep(interval)
