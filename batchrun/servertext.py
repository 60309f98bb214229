"""The gate through which text chosen by a server enters batchrun.

Everything an API or storage server says (error messages, status words, request ids, URLs,
headers) is passed through `server_text` before batchrun stores or prints it. What comes out is one
line of at most `limit` characters that cannot steer a terminal, a log reader or an HTML page:

- every credential in `secrets` is replaced by ``***`` (a server may echo the token back); one
  shorter than `MIN_SECRET_CHARS` is no credential (it would blank out parts of ordinary words,
  such as a status of "completed" for a token "t") and is left alone;
- control characters (C0, DEL, C1: ANSI and OSC escapes start with them), format characters
  (bidi overrides, zero-width joiners), surrogates, private-use and unassigned code points become
  U+FFFD; line and paragraph breaks and other spaces become one plain space;
- the result is capped at `limit` characters, ending in "…" when something was cut.

Redaction runs on the whole text first, and characters are replaced, never deleted, so cutting or
neutralising can never assemble a credential out of pieces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MAX_TEXT = 300  # characters of one field of an answer, e.g. an error message
MIN_SECRET_CHARS = 8
REPLACEMENT = "\ufffd"
_SPACES = re.compile(r"\s+")


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every string of `secrets` (of `MIN_SECRET_CHARS` or more) replaced by ``***``, in any
    letter case: a URL library lowercases a host name, so an echoed token may come back lowercased."""
    # Most text holds no secret: for an ASCII secret in ASCII text (no "ſ" or Kelvin sign that IGNORECASE
    # would also match), a lowercase containment test decides exactly and costs far less than the search.
    folded = text.lower() if text.isascii() else None
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS:
            if folded is not None and secret.isascii() and secret.lower() not in folded:
                continue
            text = re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)
            folded = text.lower() if text.isascii() else None
    return text


def holds_secret(text: str, secrets: Iterable[str]) -> bool:
    """Whether `text` contains one of `secrets` that `redact` would blank out."""
    folded = text.casefold()
    return any(len(secret) >= MIN_SECRET_CHARS and secret.casefold() in folded for secret in secrets)


def server_text(value: object, limit: int = MAX_TEXT, secrets: Iterable[str] = ()) -> str:
    """`value` (text or bytes from a server) as batchrun may store and print it. See the module doc.

    Bytes are decoded as UTF-8 with replacement; anything else is turned into text with `str`.
    `limit` is at least 1 character.
    """
    secrets = tuple(secrets)
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", errors="replace")
    else:
        text = value if isinstance(value, str) else str(value)
    # Redacted whole before anything is cut: a cut must never leave the start of a secret behind.
    text = redact(text, secrets)[: limit * 4 + 1024]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else " " if ch.isspace() else REPLACEMENT for ch in text)
    text = _SPACES.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: max(0, limit - 1)] + "…"
    return redact(text, secrets)
