"""Jobs a manifest generates rather than lists: a job's `matrix:` and the rows of a `jobs_from:` file.

A matrix
--------
``{id: beach, prompt: ..., matrix: {prompt: [a, b, c], start_image_url: [x.png, y.png]}}`` makes one job
per combination of the listed values (the cartesian product, 3 x 2 = 6 jobs here), in the order of
``itertools.product``: the first key varies slowest. The job's other keys and `defaults` apply to every
combination. Ids are the job's id followed, for each matrix key in the order written, by ``-`` + the
key's abbreviation + the value's 1-based position in its list::

    beach-p1-s1, beach-p1-s2, beach-p2-s1, ..., beach-p3-s2

A key's abbreviation is the shortest start of its name (lower-case letters and digits) that starts no
other key of the same matrix: `prompt` and `start_image_url` give ``p`` and ``s``; `shot_type` and
`start_image_url` give ``sh`` and ``st``. Ids stay the same when values are appended to a list, so add
new values at the end: inserting one renumbers those after it (and a job whose input changed under the
same id is refused once submitted). A matrix job without an id gives each combination an id derived
from its input, like any job without an id.

A jobs file
-----------
``jobs_from: jobs.csv`` (or ``.jsonl``) reads one job per row, besides the `jobs:` list. A CSV's header
names the columns: ``id`` and ``model`` (both optional; ``model`` is the row's own model) and input fields;
unknown columns are errors pointing at the header cell. Cells are converted by the field's type in the
manifest model's schema (``duration`` "5" → 5, ``generate_audio`` "true"/"false", lists and mappings as
JSON); an empty cell means "not set", so `defaults` apply. Quoted cells may hold newlines. Encodings, the
delimiter and spreadsheets' localized values are `batchrun.tablefile`'s. A JSON Lines file holds one JSON
object per line. Problems point at the file's physical line (a quoted newline shifts later rows) and the
cell's 1-based column.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun import echo, tablefile
from batchrun.errors import Problem
from batchrun.inputfile import NotARegularFile, read_regular
from batchrun.models import Model

MAX_JOBS = 100_000  # per manifest, after expansion
MAX_JOBS_FILE_BYTES = 32 * 1024 * 1024

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


class JobsFileError(Exception):
    """The jobs file as a whole cannot be read; the message is for the manifest's `jobs_from:` line."""


# --- matrix ---------------------------------------------------------------------------------------


def matrix_problems(job: dict[str, Any]) -> list[tuple[tuple, str, bool]]:
    """What stops a job's `matrix:` from expanding, as (path under the job, message, at_key)."""
    matrix = job["matrix"]
    if not isinstance(matrix, dict):
        return [(("matrix",), "must be a mapping of input fields to lists of values to combine", False)]
    if not matrix:
        return [(("matrix",), "is empty: list at least one field and its values", False)]
    found = []
    for key, values in matrix.items():
        if key == "id":
            found.append((("matrix", key), "ids cannot be listed in a matrix: each job's id is made from the "
                                            "job's id and its position in the matrix", True))
        elif key in job:
            found.append((("matrix", key), f"{echo.quoted(key)} is set both in the job and in its matrix; keep one",
                          True))
        elif not isinstance(values, list):
            found.append((("matrix", key), "must be a list of values to combine (for a single value, set the "
                                            "field in the job itself)", False))
        elif not values:
            found.append((("matrix", key), "is an empty list: the matrix would make no jobs", False))
    return found


def matrix_size(matrix: dict[str, list]) -> int:
    """How many jobs a (valid) matrix makes, computed without building them."""
    return math.prod(len(values) for values in matrix.values())


def abbreviations(keys: list[str]) -> list[str]:
    """Each key's shortest prefix (lower-case letters and digits) that is no prefix of another key's name."""
    names = [re.sub(r"[^a-z0-9]", "", key.lower()) or "k" for key in keys]
    names = [f"k{name}" if name[0].isdigit() else name for name in names]  # "-p1" style, never "-21"
    short = []
    for i, name in enumerate(names):
        others = [other for j, other in enumerate(names) if j != i]
        for end in range(1, len(name) + 1):
            if not any(other.startswith(name[:end]) for other in others):
                short.append(name[:end])
                break
        else:
            short.append(name)
    return short


def matrix_id(base: str, abbrevs: list[str], choice: tuple[int, ...]) -> str:
    return base + "".join(f"-{a}{c + 1}" for a, c in zip(abbrevs, choice, strict=True))


def longest_matrix_id(base: str, matrix: dict[str, list]) -> str:
    """The longest id a matrix gives (each key at its last value), to check the 64-character limit."""
    return matrix_id(base, abbreviations(list(matrix)), tuple(len(v) - 1 for v in matrix.values()))


def expand_matrix(matrix: dict[str, list]) -> Iterator[tuple[tuple[int, ...], dict[str, Any]]]:
    """Yield (position of each key's value, {key: value}) for every combination, lazily."""
    keys = list(matrix)
    for choice in itertools.product(*(range(len(matrix[k])) for k in keys)):
        yield choice, {k: matrix[k][c] for k, c in zip(keys, choice, strict=True)}


# --- jobs files -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One job of a jobs file: `values` holds the cells that are set (``id`` included), converted."""

    index: int  # 0-based among the file's jobs
    line: int  # physical line where the row starts, 1-based
    values: dict[str, Any]
    columns: dict[str, int] = field(default_factory=dict)  # field -> 1-based column (CSV only)


def _converter(spec: Any, delimiter: str):
    """Text of a CSV cell → the value the field's schema type wants; text it cannot convert stays text,
    so the schema reports it ("must be a whole number, not text 'five'"). A list or mapping cell nested
    too deep raises tablefile.TooDeep, for the caller to locate."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    decimal_comma = delimiter != ","  # in a comma-separated file, "1,500" may mean fifteen hundred

    def convert(text: str) -> Any:
        try:
            if kind == "integer" and _INT.fullmatch(text):
                return int(text)
            if kind in ("integer", "number") and _FLOAT.fullmatch(text):
                if kind == "number" and _INT.fullmatch(text):
                    return int(text)
                number = float(text)
                if math.isfinite(number):  # "1e999" stays text: JSON has no infinity
                    return number
            if kind == "number" and decimal_comma:
                number = tablefile.decimal_comma(text)
                if number is not None:
                    return number
            if kind == "boolean":
                if text.lower() in _TRUE | _FALSE:
                    return text.lower() in _TRUE
                localized = tablefile.localized_boolean(text)
                if localized is not None:
                    return localized
            if kind in ("array", "object") and text[:1] in "[{":
                return tablefile.load_json(text)
        except tablefile.TooDeep:
            raise
        except ValueError:  # an integer past Python's digit limit, bad JSON
            pass
        return text

    return convert


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _decode(data: bytes, shown: str, spreadsheet: bool) -> tuple[str, list[Problem]]:
    try:
        return tablefile.decode(data, spreadsheet=spreadsheet), []
    except tablefile.Undecodable as exc:
        return "", [Problem(shown, exc.line, exc.column, "jobs_from", str(exc))]


def read_rows(path: Path, shown: str, model: Model, *, limit: int) -> tuple[list[Row], list[Problem]]:
    """Read a .csv or .jsonl jobs file: its rows, and the problems of the file itself (header, syntax,
    ragged rows, more than `limit` rows), located in it as `shown`.

    Raises JobsFileError when the file cannot be read at all (missing, a folder, too large).
    """
    try:
        data, _ = read_regular(path, MAX_JOBS_FILE_BYTES)
    except NotARegularFile as exc:
        if exc.folder:
            raise JobsFileError(f"{path} is a folder, not a jobs file") from None
        raise JobsFileError(f"{path} {exc}: batchrun reads jobs files only from regular files") from None
    except FileNotFoundError:
        raise JobsFileError(f"no such file {path} (the path is relative to the manifest's folder)") from None
    except OSError as exc:
        raise JobsFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_JOBS_FILE_BYTES:
        raise JobsFileError(f"{path} is over {MAX_JOBS_FILE_BYTES // 2**20} MiB; split the batch into several "
                            "manifests")
    spreadsheet = path.suffix.lower() == ".csv"
    text, problems = _decode(data, shown, spreadsheet)
    if problems:
        return [], problems
    if spreadsheet:
        return _csv_rows(text, shown, model, limit)
    return _jsonl_rows(text, shown, limit)


def _too_many(shown: str, line: int, limit: int) -> Problem:
    return Problem(shown, line, 1, "jobs_from",
                   f"too many jobs: with this row the manifest would hold more than {MAX_JOBS:,} "
                   f"({limit:,} rows fit after the jobs list); split the batch into several manifests")


def _csv_rows(text: str, shown: str, model: Model, limit: int) -> tuple[list[Row], list[Problem]]:
    # `takes` (batchrun.takes) is a job key, not model input, allowed as a column like `id`.
    properties = {**model.input_schema.get("properties", {}), "takes": {"type": "integer"}}
    delimiter = tablefile.detect_delimiter(text, {"id", *properties})
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[Row] = []
    problems: list[Problem] = []
    header: list[tuple[int, str]] | None = None  # (column index, field) of the columns read
    columns: dict[str, int] = {}
    converters: dict[str, Any] = {}
    width = 0
    end = 0  # the physical line the previous record ended on
    try:
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in cells):
                continue  # blank lines, and rows of empty cells that spreadsheets leave at the end
            if header is None:
                header, width = [], len(cells)
                for i, raw_name in enumerate(cells):
                    name = raw_name.strip()
                    if not name:
                        continue
                    if name in columns:
                        problems.append(Problem(shown, start, i + 1, "jobs_from",
                                                f"column {echo.quoted(name)} appears twice (first as column "
                                                f"{columns[name]})"))
                    elif name not in ("id", "model") and name not in properties:
                        # Say how the header was split, once, when it was not at commas.
                        split = f" (columns read as separated by {tablefile.DELIMITER_NAMES[delimiter]}s)" \
                            if delimiter != "," and not any("unknown column" in p.message for p in problems) else ""
                        problems.append(Problem(shown, start, i + 1, "jobs_from",
                                                f"unknown column {echo.quoted(name)}"
                                                f"{_did_you_mean(name, ['id', *properties])}{split}"))
                    else:
                        columns[name] = i + 1
                        header.append((i, name))
                        converters[name] = (str.strip if name in ("id", "model")  # model: the row's own model
                                            else _converter(properties[name], delimiter))
                continue
            if len(rows) >= limit:
                problems.append(_too_many(shown, start, limit))
                break
            extra = next((i for i in range(width, len(cells)) if cells[i].strip()), None)
            if extra is not None:
                problems.append(Problem(shown, start, extra + 1, f"jobs_from[{len(rows)}]",
                                        f"this row has {len(cells)} cells but the header names {width} columns"))
            values = {}
            for i, name in header:
                if i < len(cells):
                    text_value = cells[i].strip()
                    if text_value:  # an empty cell means "not set"
                        try:
                            values[name] = converters[name](text_value)
                        except tablefile.TooDeep as exc:
                            problems.append(Problem(shown, start, i + 1, f"jobs_from[{len(rows)}].{name}", str(exc)))
            rows.append(Row(len(rows), start, values, columns))
    except csv.Error as exc:
        problems.append(Problem(shown, reader.line_num or 1, 1, "jobs_from", f"CSV syntax error: {exc}"))
    if header is None and not problems:
        problems.append(Problem(shown, 1, 1, "jobs_from", "the file is empty: it needs a header row naming "
                                                          "the columns (id, prompt, start_image_url, ...)"))
    elif not rows and not problems:
        problems.append(Problem(shown, end or 1, 1, "jobs_from", "the file has a header but no job rows"))
    return rows, problems


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {echo.quoted(key)}")
        result[key] = value
    return result


def _jsonl_rows(text: str, shown: str, limit: int) -> tuple[list[Row], list[Problem]]:
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.split("\n"), 1):  # JSON text holds no raw newline
        if not line.strip():
            continue
        if len(rows) >= limit:
            problems.append(_too_many(shown, number, limit))
            break
        try:
            value = tablefile.load_json(line, object_pairs_hook=_no_duplicates)
        except tablefile.TooDeep as exc:
            problems.append(Problem(shown, number, exc.offset + 1, "jobs_from", str(exc)))
            continue
        except json.JSONDecodeError as exc:
            problems.append(Problem(shown, number, exc.colno, "jobs_from", f"invalid JSON: {exc.msg}"))
            continue
        except ValueError as exc:  # a duplicate key, NaN, 1e999, an unpaired surrogate
            problems.append(Problem(shown, number, 1, "jobs_from", f"invalid job: {exc}"))
            continue
        if not isinstance(value, dict):
            problems.append(Problem(shown, number, 1, "jobs_from",
                                    "each line must be a JSON object of fields ({\"prompt\": ..., ...})"))
            continue
        rows.append(Row(len(rows), number, value))
    if not rows and not problems:
        problems.append(Problem(shown, 1, 1, "jobs_from", "the file holds no jobs"))
    return rows, problems
