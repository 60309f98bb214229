"""How the bytes of a `jobs_from:` file become text, cells and values, as spreadsheets save them.

Encoding: UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8"), or UTF-16 with one (Excel's
"Unicode Text"). Anything else is refused with one problem that says what the file probably is and how
to save it again: a legacy code page (Excel's plain "CSV" in a Western locale is Windows-1252) cannot be
told apart from its neighbours (Windows-1250, Mac Roman...) by its bytes, and a prompt read in the wrong
one would be paid for with the wrong letters.

Delimiter: the one of ``,`` ``;`` tab ``|`` that splits the header line into the most column names
batchrun knows (ignoring case), then into the most cells (so misspelt columns are still named one by
one), comma when none does better. Excel writes ``;`` where the decimal separator is a comma
(German, French, ...). The header is the one line whose content is known in advance, so this choice is
exact where a statistical guess (`csv.Sniffer`) is not: the Sniffer cannot decide on a one-column file,
and reads commas inside prompts as separators.

Values: where the file is not comma-separated, a number field also takes a decimal comma (``0,5``); a
boolean field also takes Excel's localized TRUE and FALSE (``WAHR``/``FALSCH``, ``VRAI``/``FAUX``...),
each of which means the same in every language listed.

JSON (JSON Lines rows, and list or mapping cells of a CSV) is read with batchrun's own limits: nesting
deeper than `MAX_DEPTH` (Python's parser would raise RecursionError near 1,000), numbers JSON has not
(NaN, Infinity, 1e999) and unpaired UTF-16 surrogate escapes (``"\\ud800"``, which is not text) are
refused.
"""

from __future__ import annotations

import csv
import json
import math
import re
from typing import Any

from batchrun.yamlload import MAX_DEPTH

DELIMITERS = (",", ";", "\t", "|")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "vertical bar"}

# Excel's TRUE and FALSE in its interface languages (de, fr, es, it, pt, nl, sv, da/nb, fi, pl, cs, hu, tr).
LOCALIZED_TRUE = frozenset({"wahr", "vrai", "verdadero", "vero", "verdadeiro", "waar", "sant", "sand", "tosi",
                            "prawda", "pravda", "igaz", "doğru"})
LOCALIZED_FALSE = frozenset({"falsch", "faux", "falso", "onwaar", "falskt", "falsk", "epätosi", "fałsz",
                             "nepravda", "hamis", "yanlış"})
assert not LOCALIZED_TRUE & LOCALIZED_FALSE, "a localized boolean must mean one thing"

_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")
_UNDEFINED_IN_CP1252 = frozenset(b"\x81\x8d\x8f\x90\x9d")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# A JSON string (possibly unterminated) or a bracket: brackets inside strings do not nest.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]')


class Undecodable(ValueError):
    """The bytes are not text batchrun reads: `line` and `column` (1-based, in characters) of the first bad
    byte; `str()` is the message."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(message)
        self.line, self.column = line, column


def _position(text_before: str) -> tuple[int, int]:
    return text_before.count("\n") + 1, len(text_before) - (text_before.rfind("\n") + 1) + 1


def decode(data: bytes, *, spreadsheet: bool) -> str:
    """The text of a jobs file (byte-order mark removed). Raises Undecodable.

    `spreadsheet` (a .csv) words the advice for spreadsheet programs.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            before = data[2: exc.start - exc.start % 2].decode("utf-16-le" if data[0] == 0xFF else "utf-16-be",
                                                               errors="replace")
            raise Undecodable("the file starts like UTF-16 text but is not (damaged?); save it again as UTF-8",
                              *_position(before)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start]
        message = f"the file is not UTF-8 text (byte 0x{bad:02x}"
        if _looks_like_cp1252(data):
            message += f", {bytes([bad]).decode('cp1252')!r} in Windows-1252)"
            if spreadsheet:
                message += (": it looks like a table Excel saved as plain 'CSV' in a Windows code page; save it "
                            "again as 'CSV UTF-8' (in German Excel: 'CSV UTF-8 (durch Trennzeichen getrennt)')")
            else:
                message += ": it looks like text saved in a Windows code page; save it again as UTF-8"
        else:
            message += "); save it again as UTF-8"
        raise Undecodable(message, *_position(data[: exc.start].decode("utf-8", errors="replace"))) from None


def _looks_like_cp1252(data: bytes) -> bool:
    return not any(b in _UNDEFINED_IN_CP1252 for b in set(data[:1 << 20]) if b >= 0x80)


def detect_delimiter(text: str, known: set[str]) -> str:
    """The delimiter of DELIMITERS that splits the header (the first non-blank line) into the most names of
    `known` (ignoring case), then into the most non-empty cells; ',' unless another does strictly better."""
    header = next((line for line in _lines(text) if line.strip()), "")
    folded = {name.lower() for name in known}
    best, best_score = ",", (-1, -1)
    for delimiter in DELIMITERS:
        if delimiter != "," and delimiter not in header:
            continue
        try:
            cells = [cell.strip() for cell in next(csv.reader([header], delimiter=delimiter), [])]
        except csv.Error:
            continue
        score = (sum(cell.lower() in folded for cell in cells), sum(bool(cell) for cell in cells))
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _lines(text: str):
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def localized_boolean(text: str) -> bool | None:
    """True or False for a spreadsheet's localized TRUE/FALSE (any case), else None."""
    folded = text.lower()
    if folded in LOCALIZED_TRUE:
        return True
    if folded in LOCALIZED_FALSE:
        return False
    return None


def decimal_comma(text: str) -> float | None:
    """``0,5`` → 0.5; None for anything else."""
    return float(text.replace(",", ".")) if _DECIMAL_COMMA.fullmatch(text) else None


class TooDeep(ValueError):
    """JSON nested deeper than MAX_DEPTH; `offset` is the index of the bracket that goes one level too far."""

    def __init__(self, offset: int):
        super().__init__(f"nested more than {MAX_DEPTH} levels deep")
        self.offset = offset


def too_deep_at(text: str, limit: int = MAX_DEPTH) -> int | None:
    """The index of the first bracket of `text` (JSON) that opens level `limit` + 1, or None."""
    if text.count("[") + text.count("{") <= limit:  # the common case, counted at C speed
        return None
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return match.start()
        elif token in "]}":
            depth -= 1
    return None


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is out of range for a JSON number")
    return number


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(text: str, *, object_pairs_hook=None) -> Any:
    """Parse JSON text with batchrun's limits. Raises TooDeep, json.JSONDecodeError, or ValueError (NaN,
    out-of-range numbers, integers past Python's digit limit, unpaired surrogates, what the hook refuses)."""
    at = too_deep_at(text)
    if at is not None:
        raise TooDeep(at)
    value = json.loads(text, object_pairs_hook=object_pairs_hook, parse_constant=_refuse_constant,
                       parse_float=_finite_float)
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"\\u{ord(exc.object[exc.start]):04x} is half of a UTF-16 surrogate pair, not "
                             "text") from None
    return value
