"""Hear how a run ended: one JSON summary POSTed to each notify URL (`notify:` / `run --notify URL`).

The summary (`summary`) holds the manifest, output dir, exit code and its meaning, counts by state,
spend this run and in total, the failed and `unknown` jobs with their reasons (at most
`MAX_JOBS_LISTED`, `capped` says when more were left out), the report path, and a `text` line that a
Slack-style incoming webhook shows as the message.

Sending (`send`) never raises and never changes the run's exit code: each URL is tried up to
`attempts` times with doubling waits (a connection failure, 408, 429 or 5xx is tried again; any other
answer is final), each try bounded by `timeout` seconds. Notify URLs get no Authorization header and
no cookies, and the token is blanked out of the body should any message ever have carried it.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yarl import URL

from batchrun.ledger import LEDGER_NAME, Ledger
from batchrun.servertext import holds_secret, redact

if TYPE_CHECKING:  # imported where a notification is sent: a manifest's `notify:` check needs only yarl
    import aiohttp

MAX_JOBS_LISTED = 50
MEANINGS = {
    0: "every job is done",
    1: "the run ended with jobs not done",
    2: "usage error or invalid input; nothing was sent",
    3: "stopped by an auth or balance error",
    75: "another run holds this output directory",
    130: "interrupted",
}
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def url_problem(value: Any) -> str | None:
    """Why `value` cannot be a notify URL, or None when it can (http or https, with a host)."""
    if not isinstance(value, str) or not value.strip():
        return f"must be an http(s) URL (text), got {value!r}"[:120]
    try:
        url = URL(value.strip())
    except ValueError:
        return "is not a URL"
    if url.scheme not in ("http", "https"):
        return f"must start with https:// or http://, not {value.strip()[:40]!r}"
    if not url.host:
        return "has no host"
    if url.user or url.password:
        return "must not carry a user name or password"
    return None


def shown(url: str) -> str:
    """A notify URL as it may appear in output and logs: scheme and host only (webhook paths are secrets)."""
    parsed = URL(url)
    return f"{parsed.scheme}://{parsed.host}" + (f":{parsed.explicit_port}" if parsed.explicit_port else "")


def summary(*, manifest: str, output_dir: Path | None, exit_code: int, job_ids: Iterable[str] | None = None,
            run_spent_usd: float | None = None, lines: list[str] | None = None, error: str | None = None,
            token: str | None = None) -> dict[str, Any]:
    """The end-of-run summary, read from the output dir's ledger (when there is one).

    `job_ids` limits the counts to the manifest's jobs; `lines` are the run's closing lines; `error`
    says why a run stopped before it could run (exit 2 after reading the manifest, for instance)."""
    counts: Counter[str] = Counter()
    listed: list[dict[str, Any]] = []
    more = 0
    total_spent = None
    total = None
    if output_dir is not None and (output_dir / LEDGER_NAME).exists():
        try:
            ledger = Ledger.open(output_dir, create=False, readonly=True)
        except Exception:  # noqa: BLE001 - a notification must go out even when the ledger cannot be read
            ledger = None
        if ledger is not None:
            try:
                wanted = set(job_ids) if job_ids is not None else None
                for row in ledger.all():
                    if wanted is not None and row.id not in wanted:
                        continue
                    counts[row.state] += 1
                    if row.state in ("failed", "unknown", "cancelled"):
                        if len(listed) < MAX_JOBS_LISTED:
                            listed.append({"id": row.id, "state": row.state, "request_id": row.request_id,
                                           "reason": row.error["message"] if row.error else None})
                        else:
                            more += 1
                total = ledger.spend()
                total_spent = round(total.total_usd, 4)
            finally:
                ledger.close()
    report = output_dir / "report.html" if output_dir is not None else None
    meaning = MEANINGS.get(exit_code, "unexpected exit code")
    name = Path(manifest).name
    state_text = " ".join(f"{state}={n}" for state, n in sorted(counts.items())) or "no jobs recorded"
    simulated = total is not None and total.simulated_usd > 0
    if exit_code == 2 and run_spent_usd is None:
        spend = "nothing was sent"  # exit 2 means nothing was sent, whatever else happened
    elif run_spent_usd is None:
        spend = "spend this run unknown"
    else:
        spend = f"${run_spent_usd:.2f}{' simulated (sandbox)' if simulated else ''} this run"
    text = f"batchrun {name}: exit {exit_code} ({meaning}); {state_text}; {spend}"
    if total is not None:
        text += f", {total.describe()} in total"
    if listed:
        text += f"; needing attention: {', '.join(j['id'] for j in listed[:5])}" + (
            " ..." if len(listed) + more > 5 else "")
    if error:
        text += f"; {error}"
    body = {
        "manifest": manifest,
        "output_dir": str(output_dir) if output_dir is not None else None,
        "exit_code": exit_code,
        "meaning": meaning,
        "counts": dict(sorted(counts.items())),
        "spent_this_run_usd": None if run_spent_usd is None else round(run_spent_usd, 4),
        "spent_total_usd": total_spent,
        "simulated_usd": None if total is None else round(total.simulated_usd, 4),  # sandbox money, not real
        "jobs": listed,
        "capped": more > 0,
        "jobs_not_listed": more,
        "report": str(report) if report is not None and report.exists() else None,
        "error": error,
        "closing_lines": lines or [],
        "text": text,
    }
    return _scrub(body, token)


def _scrub(body: dict[str, Any], token: str | None) -> dict[str, Any]:
    if not token:
        return body
    text = json.dumps(body)
    if not holds_secret(text, (token,)):
        return body
    return json.loads(redact(text, (json.dumps(token)[1:-1],)))


@dataclass(frozen=True)
class Delivery:
    url: str
    ok: bool
    attempts: int
    detail: str  # the answer's status, or why it failed


async def send(urls: Iterable[str], body: dict[str, Any], *, attempts: int = 4, first_wait: float = 1.0,
               timeout: float = 10.0, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> list[Delivery]:
    """POST `body` to every URL at once; returns how each went. Never raises. The worst case takes about
    `attempts * timeout + first_wait * (2 ** (attempts - 1) - 1)` seconds."""
    import aiohttp

    data = json.dumps(body).encode("utf-8")
    # A session of its own: no default headers, no cookie jar shared with the API's session.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        return list(await asyncio.gather(*(
            _deliver(session, url, data, attempts, first_wait, timeout, sleep) for url in dict.fromkeys(urls))))


async def _deliver(session: aiohttp.ClientSession, url: str, data: bytes, attempts: int, first_wait: float,
                   timeout: float, sleep) -> Delivery:
    import aiohttp

    wait, detail = first_wait, ""
    for attempt in range(1, attempts + 1):
        try:
            async with session.post(url, data=data, headers={"Content-Type": "application/json"},
                                    timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            detail = type(exc).__name__
        else:
            if 200 <= status < 300:
                return Delivery(url, True, attempt, f"HTTP {status}")
            detail = f"HTTP {status}"
            if status not in RETRY_STATUSES:
                return Delivery(url, False, attempt, detail)
        if attempt < attempts:
            await sleep(wait)
            wait *= 2
    return Delivery(url, False, attempts, detail)


def report_lines(deliveries: list[Delivery]) -> list[str]:
    """One line per URL, naming only its scheme and host."""
    lines = []
    for d in deliveries:
        tries = f"after {d.attempts} tries" if d.attempts > 1 else "at the first try"
        lines.append(f"notify: {shown(d.url)}: {'sent' if d.ok else 'not delivered'} ({d.detail}, {tries})")
    return lines
