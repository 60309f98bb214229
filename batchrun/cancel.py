"""`batchrun cancel`: ask the API to cancel every job of an output dir that is queued remotely.

RunComfy cancels queued jobs only; one already rendering answers "not cancellable" and is reported,
left as it is, and collected by the next run. A run still going in the output dir is first asked to
stop submitting (`stoprequest`), so that it cannot go on paying for new jobs behind the cancel.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from batchrun.api import Client, make_limiter
from batchrun.errors import ApiError, AuthError, RequestNotFound
from batchrun.ledger import IN_FLIGHT, Ledger
from batchrun.retry import RetryPolicy, with_retries
from batchrun.stoprequest import StopAnswer, ask_to_stop


@dataclass
class CancelReport:
    cancelled: list[str] = field(default_factory=list)
    not_cancellable: list[tuple[str, str]] = field(default_factory=list)  # (id, what the API said)
    errors: list[tuple[str, str]] = field(default_factory=list)
    run: StopAnswer = StopAnswer(live=False, stopped=True)  # the run that was going, if one was


async def cancel_queued(output_dir: Path, *, base_url: str, token: str, requests_per_second: float = 5.0,
                        policy: RetryPolicy = RetryPolicy(max_attempts=4), stop_wait: float = 30.0) -> CancelReport:
    """Stop a live run's submitting (waiting up to `stop_wait` seconds for it to say so), then cancel
    every queued job the ledger holds a request id for."""
    ledger = Ledger.open(output_dir, create=False)
    report = CancelReport()
    try:
        report.run = await asyncio.to_thread(ask_to_stop, output_dir, wait=stop_wait)
        targets = [row for row in ledger.all() if row.state in IN_FLIGHT and row.request_id]
        async with aiohttp.ClientSession() as session:
            client = Client(session, base_url, token, limiter=make_limiter(requests_per_second))

            async def one(job_id: str, request_id: str) -> None:
                try:
                    outcome = await with_retries(lambda: client.cancel(request_id), policy=policy)
                except AuthError:
                    raise
                except RequestNotFound as exc:
                    report.errors.append((job_id, f"the API no longer knows request {request_id}: {exc}"))
                    return
                except ApiError as exc:
                    report.errors.append((job_id, str(exc)))
                    return
                if outcome.cancelled:
                    ledger.set_state(job_id, "cancelled", error=("cancelled", "cancelled with 'batchrun cancel'"))
                    report.cancelled.append(job_id)
                else:
                    report.not_cancellable.append((job_id, outcome.detail or "already in progress"))

            await asyncio.gather(*(one(row.id, row.request_id) for row in targets))
    finally:
        ledger.close()
    return report
