"""What a run's lines look like where no person watches: one UTC timestamp format for stdout, stderr
and run.log, and every line labelled with its manifest, so several cron entries appending to one
log file can be told apart.

`Labelled` wraps a text stream that is not a terminal: each complete line written to it goes out as
`2026-05-04T03:00:07Z [manifests/spring.yaml] <line>`. On a terminal lines are left as they are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC, to the second: the same in stdout, stderr and run.log


def stamp(now: float | None = None) -> str:
    """`now` (seconds since the epoch; default: the current time) in `TIME_FORMAT`."""
    return time.strftime(TIME_FORMAT, time.gmtime(time.time() if now is None else now))


def utc_formatter(fmt: str) -> logging.Formatter:
    """A logging formatter whose `%(asctime)s` is `TIME_FORMAT`."""
    formatter = logging.Formatter(fmt, TIME_FORMAT)
    formatter.converter = time.gmtime
    return formatter


class Labelled:
    """A text stream that prefixes every complete line with a timestamp and `[label]`.

    A partial line waits for its newline (or `flush`/`close`), so lines written in pieces stay whole.
    `labels_lines` tells writers that already stamp their own lines (progress) to leave it to this."""

    labels_lines = True

    def __init__(self, stream: TextIO, label: str, clock: Callable[[], float] = time.time):
        self._stream = stream
        self._label = label
        self._clock = clock
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        if lines:
            prefix = f"{stamp(self._clock())} [{self._label}] "
            self._stream.write("".join(f"{prefix}{line}\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")
        self._stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):  # encoding, fileno... as the wrapped stream has them
        return getattr(self._stream, name)


class Discard:
    """A text stream that drops what is written (`run --quiet`)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def for_unattended(stream: TextIO, label: str) -> TextIO:
    """`stream` labelled when it is not a terminal; unchanged on a terminal."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return stream if tty else Labelled(stream, label)
