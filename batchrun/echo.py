"""Text from an input file, made safe to show in a message.

A manifest, a jobs file or a path written in one may hold anything: pages of text, terminal escape
sequences, or the API token itself (a `.env` file named as `jobs_from:`). Whatever of it reaches a
message goes through here: the token is replaced first (so cutting the text cannot leave part of it),
characters that are not printable (control, formatting and line-separator characters) are escaped, so a
message never moves the cursor or splits into lines, and the length is capped.
"""

from __future__ import annotations

import re

from batchrun import settings

MAX_QUOTED = 80  # characters of an echoed value: enough to recognise it, never a page of a file
REDACTED = "[RUNCOMFY_API_TOKEN]"
_MIN_SECRET = 6  # a shorter "token" is a test value or a typo; replacing it would garble every message


def redact(text: str) -> str:
    """`text` with the API token (from the environment) replaced by a marker."""
    token = settings.api_token()
    if len(token) >= _MIN_SECRET:
        text = re.sub(re.escape(token), REDACTED, text, flags=re.IGNORECASE)  # in any case, as servertext does
    return text


def cut(text: str, limit: int) -> str:
    """At most `limit` characters, the last three "..." when something was cut."""
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` as a Python-style quoted literal ('...'): redacted, cut, non-printable characters escaped."""
    return repr(cut(redact(text), limit))


def shown(value, limit: int = MAX_QUOTED) -> str:
    """Any value as its Python repr, redacted and cut (a long list or mapping is shown by its start)."""
    return cut(redact(repr(value)), limit)


def plain(text: str, limit: int) -> str:
    """`text` unquoted: redacted, non-printable characters escaped (``\\x1b``, ``\\u202e``), cut to `limit`."""
    text = redact(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit * 2])
    return cut(text, limit)
