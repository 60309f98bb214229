"""Readers for single fields of the API's answers: any JSON value in, a value batchrun can use out.

Each reader takes whatever the server sent (any JSON type, any size, any characters) and returns
a usable value, or None when the field is absent or unreadable and batchrun can do without it.
Fields batchrun cannot do without (a request id, an output URL) are checked by `request_id` and
`output_url`. Text is passed through `servertext.server_text`, so what these return is safe to
store and print. Nothing here raises anything but `MalformedAnswer`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from yarl import URL

from batchrun.errors import MalformedAnswer
from batchrun.servertext import holds_secret, server_text

# A request id is one URL path segment that needs no quoting and cannot be a dot segment: RunComfy's
# are UUIDs. Anything else (`..`, `a/b`, spaces, a kilobyte of text, the token echoed back) is
# refused as malformed rather than sent back to the API or written to the ledger.
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:~-]{0,127}", re.ASCII)
MAX_URL_CHARS = 8192  # presigned storage URLs run to 1-2 KB
MAX_COST_USD = 1000.0  # no single generation costs near this: a larger figure is a unit or parsing error
MAX_JSON_DEPTH = 32  # RunComfy's answers nest 3 levels; the limit keeps every later walk shallow
_DIGITS = re.compile(r"\s*([0-9]{1,18})\s*", re.ASCII)  # ASCII only: "²".isdigit() is True
_COST = re.compile(r"\s*(?:US)?\$?\s*([+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*(?:USD)?\s*", re.ASCII)


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def request_id(value: Any, secrets: Iterable[str] = ()) -> str | None:
    """The request id if `value` is a usable one (see `REQUEST_ID`; numbers are accepted), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**30:
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not REQUEST_ID.fullmatch(value) or holds_secret(value, secrets):
        return None
    return value


def output_url(value: Any, secrets: Iterable[str] = ()) -> str:
    """An output URL as given, if it is an absolute http(s) URL of printable ASCII-safe text that
    carries no credential of ours; raises `MalformedAnswer` otherwise (saying what it was, redacted)."""
    secrets = tuple(secrets)
    text = value.strip() if isinstance(value, str) else ""
    problem = None
    if not text or len(text) > MAX_URL_CHARS or not text.isprintable() or " " in text:
        problem = "is not a URL"
    elif holds_secret(text, secrets):
        problem = "carries the API token"
    else:
        try:
            url = URL(text)
            if url.scheme not in ("http", "https") or not url.host:
                problem = "is not an absolute http(s) URL"
        except (ValueError, TypeError):
            problem = "is not a URL"
    if problem:
        raise MalformedAnswer(f"result: an output URL {problem}: {server_text(repr(value), 100, secrets)}")
    return text


def text(value: Any, limit: int, secrets: Iterable[str] = ()) -> str | None:
    """A scalar as safe text (see `server_text`), or None for null, objects, lists and booleans."""
    if value is None or isinstance(value, (dict, list, bool)):
        return None
    if isinstance(value, int) and abs(value) >= 10**30:
        return None  # str() of a huge int is slow, or refused outright
    return server_text(value, limit, secrets) or None


def json_text(value: Any, limit: int, secrets: Iterable[str] = ()) -> str:
    """Any JSON value as safe text: a string as itself, anything else as compact JSON."""
    if isinstance(value, str):
        return server_text(value, limit, secrets)
    try:
        dumped = json.dumps(value, default=str, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        dumped = f"<unreadable {type(value).__name__}>"
    return server_text(dumped, limit, secrets)


def count(value: Any) -> int | None:
    """A non-negative whole number (e.g. `queue_position`), from a number or ASCII digits; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < 10**18 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and 0 <= value < 1e18 else None
    if isinstance(value, str):
        match = _DIGITS.fullmatch(value)
        return int(match[1]) if match else None
    return None


def error_code(value: Any) -> int | None:
    """RunComfy's numeric `error_code`: None when absent (0 and "" count as absent), -1 when present
    but unreadable (still an error, of unknown kind)."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, (int, float)) and value == 0:
        return None
    number = count(value)
    if number is None or number >= 10**9:
        return -1
    return number or None


def cost(value: Any, secrets: Iterable[str] = ()) -> tuple[float | None, str | None]:
    """(cost in USD, flag): the cost if it is a number in [0, MAX_COST_USD]; otherwise None and a
    flag saying what the API reported, so the figure is recorded but never counted."""
    if value is None:
        return None, None
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        match = _COST.fullmatch(value)
        number = float(match[1]) if match else None
    shown = json_text(value, 40, secrets)
    if number is None:
        return None, f"unreadable cost {shown}"
    if not math.isfinite(number) or not 0 <= number <= MAX_COST_USD:
        return None, f"cost {shown} outside 0-{MAX_COST_USD:g} USD"
    return number, None


def timestamp(value: Any) -> str | None:
    """An ISO 8601 time as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`, or None when unreadable or out of range.

    A time without an offset is taken as UTC, so times with and without one can be compared."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    given = value.strip()
    if given[-1:] in ("Z", "z"):
        given = given[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read "Z"
    try:
        when = datetime.fromisoformat(given)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        when = when.astimezone(timezone.utc)
    except (ValueError, OverflowError, TypeError):
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
