"""The account balance before paying: where to ask, asking, and what the answer covers.

RunComfy's account API answers `GET /prod/v2/balance` (header `Authorization: Bearer <token>`) with
`{"balance_usd": 5.0, "balance_microdollars": 5000000, "currency": "USD"}`; seen in RunComfy's own
CLI, MCP server and integrations, which use it to check a token without paying. The balance can be
zero or negative, and like the Model API it may answer HTTP 200 with an `error_code` body.

The token goes only to an https URL or to loopback: a balance URL that is neither is not asked,
which counts as a failed balance call (see the README for what a run does then).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from yarl import URL

from batchrun.errors import UsageError
from batchrun.servertext import redact

if TYPE_CHECKING:  # imported where the balance is asked: `plan --no-balance-check` and `status` never do
    import aiohttp

DEFAULT_BALANCE_URL = "https://api.runcomfy.net/prod/v2/balance"
RUNCOMFY_MODEL_API = "https://model-api.runcomfy.net"
BALANCE_PATH = "/prod/v2/balance"
TIMEOUT_SECONDS = 10.0
_TOKEN_REFUSED = frozenset({400004, 401001, 403001})


@dataclass(frozen=True)
class Balance:
    """One answer to the balance call: `usd` (may be negative), or None with `error` saying why."""

    usd: float | None
    error: str | None = None

    @property
    def known(self) -> bool:
        return self.usd is not None


def balance_url(base_url: str | None, env: Mapping[str, str], default_base_url: str = RUNCOMFY_MODEL_API) -> str:
    """Where to ask: `RUNCOMFY_BALANCE_URL`; else RunComfy's account API when the Model API is RunComfy's
    own; else `<base URL>/prod/v2/balance` (the sandbox, or whatever stands in for RunComfy).
    Raises UsageError for a value that is not an http(s) URL."""
    given = (env.get("RUNCOMFY_BALANCE_URL") or "").strip()
    if given:
        url = URL(given)
        if url.scheme not in ("http", "https") or not url.host:
            raise UsageError(f"RUNCOMFY_BALANCE_URL must be an http(s) URL, not {given!r}")
        return given
    if base_url is None or base_url.rstrip("/") == default_base_url.rstrip("/"):
        return DEFAULT_BALANCE_URL
    return base_url.rstrip("/") + BALANCE_PATH


def may_carry_token(url: str) -> bool:
    """True for https URLs and for loopback hosts (the sandbox): the only places the token may go."""
    parsed = URL(url)
    if parsed.scheme == "https":
        return True
    host = (parsed.host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _where(url: str) -> str:
    """The URL without its query, for messages (a query could hold anything)."""
    parsed = URL(url)
    return str(parsed.with_query(None).with_fragment(None))


async def fetch_balance(url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                        timeout: float = TIMEOUT_SECONDS) -> Balance:
    """Ask the balance once. Never raises for a failed call: the failure is `Balance(None, error)`,
    and the error never contains the token."""
    import aiohttp

    if not may_carry_token(url):
        return Balance(None, f"{_where(url)} is neither https nor loopback; the API token is not sent there")
    owned = session is None
    session = session or aiohttp.ClientSession()
    try:
        async with session.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                               timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False) as resp:
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        what = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
        return Balance(None, _redact(f"could not reach {_where(url)}: {what}", token))
    finally:
        if owned:
            await session.close()
    return _parse(status, body, url, token)


def _parse(status: int, body: bytes, url: str, token: str) -> Balance:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    code = data.get("error_code") if isinstance(data, dict) else None
    if status in (401, 403) or code in _TOKEN_REFUSED:
        shown = f"HTTP {status}" + (f", code {code}" if code else "")
        return Balance(None, f"the balance call refused the API token ({shown})")
    if not 200 <= status < 300 or code not in (None, 0, ""):
        message = ""
        if isinstance(data, dict):
            message = str(data.get("error_message") or data.get("message") or "")[:200]
        detail = f"HTTP {status}" + (f", code {code}" if code not in (None, 0, "") else "") + (
            f": {message}" if message else "")
        return Balance(None, _redact(f"the balance call failed ({detail})", token))
    usd = _usd(data)
    if usd is None:
        return Balance(None, f"the balance call answered without a readable balance_usd ({_where(url)})")
    return Balance(usd)


def _usd(data: object) -> float | None:
    if not isinstance(data, dict):
        return None
    value = data.get("balance_usd")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    micro = data.get("balance_microdollars")
    if isinstance(micro, int) and not isinstance(micro, bool):
        return micro / 1_000_000
    return None


def _redact(text: str, token: str) -> str:
    return redact(text, (token,)) if token else text


def jobs_covered(room_usd: float, estimates: Iterable[float]) -> int:
    """How many of the jobs, taken in order, fit into `room_usd` at their estimated costs."""
    covered, spent = 0, 0.0
    for estimate in estimates:
        if spent + estimate > room_usd + 1e-9:
            break
        spent += estimate
        covered += 1
    return covered


@dataclass(frozen=True)
class Verdict:
    """What a run makes of the balance before it submits anything.

    `limit_room_usd`: how much this run may commit to new jobs (None: no balance cap); `refuse`: the
    balance does not cover the first job, so nothing is submitted; `line`: what to tell the user."""

    limit_room_usd: float | None
    refuse: bool
    line: str
    failed: bool = False
    covered: int | None = None  # jobs to submit that the balance covers, None when unknown


def judge(balance: Balance, estimates: list[float], in_flight_usd: float, budget_usd: float | None) -> Verdict:
    """The balance against the jobs a run is about to submit (`estimates`, in submit order).

    Jobs in flight from earlier runs (`in_flight_usd`, at their estimates) are taken off the balance:
    whether they are charged yet is not known. A failed balance call never blocks a run: with a
    budget the budget still caps the spend; without one, the API's 402 stops submitting at once."""
    if not balance.known:
        going_on = (f"going on: the budget (${budget_usd:.2f}) still caps the spend" if budget_usd is not None
                    else "going on without a balance cap: if the balance runs out, the API's refusal (402) "
                         "stops submitting")
        return Verdict(None, False, f"balance: not checked: {balance.error}; {going_on}", failed=True)
    room = balance.usd - in_flight_usd
    covered = jobs_covered(room, estimates)
    held = f", after ${in_flight_usd:.2f} for jobs in flight" if in_flight_usd else ""
    jobs = f"job{'s' * (len(estimates) != 1)}"
    line = (f"balance: ${balance.usd:.2f}{held}; covers {covered} of {len(estimates)} {jobs} to submit "
            "at their estimates")
    if estimates and covered == 0:
        return Verdict(room, True, line + f"; the first costs ${estimates[0]:.2f}: nothing submitted", covered=0)
    return Verdict(room, False, line, covered=covered)
