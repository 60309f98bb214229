"""Run settings: every top-level manifest setting, its type, safe default and meaning, in one table.

The README's manifest reference is generated from `SETTINGS` (see `reference_table`), so the two
cannot drift apart. Command-line flags override the manifest; `Settings.with_overrides` applies them.
The API base URL (flag, then environment, then default) is resolved and checked once, by `base_url`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_BASE_URL = "https://model-api.runcomfy.net"
BASE_URL_ENV = "RUNCOMFY_BASE_URL"


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    optional: bool = False  # None (absent) is a meaningful value

    def check(self, value: Any) -> str | None:
        """A message saying what is wrong with `value`, or None when it is acceptable."""
        if value is None and self.optional:
            return None
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.kind)
        from batchrun import echo  # echo reads the token through this module

        shown = echo.shown(value)
        if not ok:
            names = {bool: "true or false", float: "a number", int: "a whole number", str: "text"}
            return f"must be {names.get(self.kind, self.kind.__name__)}, got {shown}"
        if self.kind is float and not math.isfinite(value):  # nan would defeat every comparison, budget included
            return f"must be a finite number, got {shown}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}, got {shown}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}, got {shown}"
        return None


SETTINGS: tuple[Setting, ...] = (
    Setting("concurrency", int, 4, "jobs in flight remotely at once (submitted, not yet finished), besides "
            "those `queue_ahead` adds", 1, 1000),
    Setting("queue_ahead", int, 0, "jobs submitted beyond `concurrency` to wait in the provider's queue, so "
            "a render slot does not idle while the run notices a finish (0 = off). They are paid for once "
            "submitted: a budget counts them as committed, and a cancel of the batch may find them already "
            "started", 0, 1000),
    Setting("budget_usd", float, None, "hard cap on spend for this output dir; no job is submitted that "
            "would take done + in-flight + its estimate over it", 0, optional=True),
    Setting("requests_per_second", float, 5.0, "rate limit over all API calls of one run (0 = no limit)", 0,
            100000),
    Setting("poll_min_interval", float, 1.0, "shortest wait between two polls of one job, seconds",
            0.0, 3600),
    Setting("poll_max_interval", float, 30.0, "longest wait between two polls of a job that may have "
            "finished, seconds (the first wait, until the early edge of recent render times, and the checks of a "
            "job queued behind others can be longer)", 0.0, 3600),
    Setting("job_timeout", float, 1800.0, "seconds after submission before a job is given up on: cancelled "
            "if still queued, otherwise left for a later run to collect", 1, 7 * 86400),
    Setting("not_found_grace", float, 300.0, "seconds after a job's submission (or its completion) during "
            "which the API saying it does not know the request, or that it completed without outputs, is not "
            "believed: the request is asked again with backoff and its money stays counted", 0, 86400),
    Setting("max_attempts", int, 8, "tries per status, result or download call before the job is left "
            "for a later run", 1, 100),
    Setting("resubmit_unknown", bool, False, "resubmit jobs whose POST may or may not have reached the "
            "server (for unattended runs; risks paying twice for those jobs)"),
    Setting("max_wait", float, None, "seconds after which a run stops submitting and leaves, leaving "
            "jobs in flight for the next run", 1, optional=True),
    Setting("max_video_mb", float, 2048.0, "refuse a download larger than this, MiB", 1, 1 << 20),
)
BY_NAME = {s.name: s for s in SETTINGS}
TOKEN_ENV = "RUNCOMFY_API_TOKEN"
FLAGS = {"budget_usd": "--budget"}  # command-line flags whose name differs from the setting's


@dataclass(frozen=True)
class Settings:
    concurrency: int = 4
    queue_ahead: int = 0
    budget_usd: float | None = None
    requests_per_second: float = 5.0
    poll_min_interval: float = 1.0
    poll_max_interval: float = 30.0
    job_timeout: float = 1800.0
    not_found_grace: float = 300.0
    max_attempts: int = 8
    resubmit_unknown: bool = False
    max_wait: float | None = None
    max_video_mb: float = 2048.0

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with every override that is not None applied (flags left unset keep the manifest's)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        for name, value in given.items():
            problem = BY_NAME[name].check(value)
            if problem:
                from batchrun.errors import UsageError

                raise UsageError(f"{FLAGS.get(name, '--' + name.replace('_', '-'))} {problem}")
        return dataclasses.replace(self, **given)


assert {f.name for f in dataclasses.fields(Settings)} == set(BY_NAME), "SETTINGS and Settings differ"
assert all(getattr(Settings(), s.name) == s.default for s in SETTINGS), "defaults differ"


def reference_table() -> str:
    """The settings as a Markdown table, for the README."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = "none" if s.default is None else str(s.default).lower()
        rows.append(f"| `{s.name}` | {default} | {s.doc} |")
    return "\n".join(rows)


def api_token() -> str:
    """The API token from the environment (`RUNCOMFY_API_TOKEN`), read when asked, never at import; "" if unset."""
    return os.environ.get(TOKEN_ENV, "").strip()


def base_url(flag: str | None, environ: Mapping[str, str]) -> str:
    """The API base URL: `--base-url`, else `RUNCOMFY_BASE_URL` from `environ`, else the default.

    Checked here, once, for every command that talks to the API; raises `UsageError` naming where
    the bad value came from."""
    if flag:
        return check_base_url(flag, "--base-url")
    if environ.get(BASE_URL_ENV, "").strip():
        return check_base_url(environ[BASE_URL_ENV], BASE_URL_ENV)
    return DEFAULT_BASE_URL


def check_base_url(value: str, source: str = "the API base URL") -> str:
    """`value` as a usable API base URL (`http(s)://host[:port][/path]`, no trailing slash), or
    `UsageError` saying what is wrong. A URL carrying a user name or password is refused unshown."""
    from yarl import URL

    from batchrun.errors import UsageError
    from batchrun.servertext import server_text

    text = value.strip().rstrip("/") if isinstance(value, str) else ""
    shown = server_text(repr(value), 120)
    try:
        url = URL(text)
        host, port = url.host, url.port  # yarl checks the port only when asked for it
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{source}: {shown} is not a usable URL ({server_text(exc, 80)})") from None
    if url.user is not None or url.password is not None:
        raise UsageError(f"{source}: must not carry a user name or password")
    if (url.scheme not in ("http", "https") or not host or port is None or url.query_string or url.fragment
            or not text.isprintable() or " " in text):
        raise UsageError(f"{source}: must look like https://host[:port][/path], not {shown}")
    if not _usable_host(host):
        # Caught here, not when a POST fails to encode the name (which would read as "sent, outcome unknown").
        raise UsageError(f"{source}: {server_text(host, 80)!r} is not a usable host name ({shown})")
    return str(url)


def _usable_host(host: str) -> bool:
    """An IP address, or a DNS name whose labels are 1-63 characters and that encodes as IDNA."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    name = host.rstrip(".")
    try:
        encoded = name.encode("idna")
    except UnicodeError:
        return False
    return 0 < len(encoded) <= 253 and all(0 < len(label) <= 63 for label in encoded.split(b"."))
