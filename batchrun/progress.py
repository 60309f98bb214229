"""What a person (or cron's mail) sees while a run goes: a tqdm bar on a terminal, else a plain
timestamped line every few seconds. Both read the ledger's in-memory counts, never the database."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TextIO

from batchrun import console

# Whether this process has drawn a tqdm bar: tqdm is imported only then (about 900 system calls and
# 10 ms at start-up, for a run that shows none: cron, --no-progress, a pipe).
_bar_drawn = False


def write_line(text: str, stream: TextIO) -> None:
    """One line to the terminal that does not tear a progress bar drawn on it."""
    if _bar_drawn:
        from tqdm import tqdm

        tqdm.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)


ORDER = ("done", "downloading", "running", "queued", "submitting", "pending", "unknown", "failed", "cancelled")


def describe(counts: dict[str, int]) -> str:
    return " ".join(f"{state}={counts[state]}" for state in ORDER if counts.get(state))


class Progress:
    """Call `refresh()` whenever convenient; `run_periodically()` keeps it fresh in the background."""

    def __init__(
        self,
        total: int,
        counts: Callable[[], dict[str, int]],
        spent: Callable[[], float],
        *,
        stream: TextIO,
        bar: bool,
        interval: float | None = None,
        simulated: bool = False,
        budget_usd: float | None = None,
    ):
        """`spent` gives the money committed in the output dir (done plus in flight, USD), shown as
        `committed=`, beside `budget_usd` when there is one. The bar starts at the jobs already done, so its
        rate and ETA count only this run's progress."""
        self.total = total
        self._counts = counts
        self._spent = spent
        self._money = " simulated (sandbox)" if simulated else ""  # a sandbox run's money is never real
        if budget_usd is not None:
            self._money += f" of the ${budget_usd:.2f} budget"
        self._stream = stream
        self._bar = None
        if bar:
            global _bar_drawn
            from tqdm import tqdm

            _bar_drawn = True
            self._bar = tqdm(total=total, initial=counts().get("done", 0), unit="job", file=stream,
                             dynamic_ncols=True, leave=True)
        self.interval = interval if interval is not None else (0.5 if bar else 5.0)
        self._last_line = ""

    def refresh(self) -> None:
        counts = self._counts()
        text = f"{describe(counts)} committed=${self._spent():.2f}{self._money}"
        if self._bar is not None:
            # update(), not assigning n: tqdm's rate and ETA follow only what update() reports.
            self._bar.update(max(0, counts.get("done", 0) - self._bar.n))
            self._bar.set_postfix_str(text, refresh=True)
        elif text != self._last_line:
            # A labelled stream (cron) stamps every line itself.
            stamp = "" if getattr(self._stream, "labels_lines", False) else console.stamp() + " "
            print(f"{stamp}{counts.get('done', 0)}/{self.total} done; {text}", file=self._stream, flush=True)
            self._last_line = text

    async def run_periodically(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(self.interval)

    def close(self) -> None:
        self.refresh()
        if self._bar is not None:
            self._bar.close()
