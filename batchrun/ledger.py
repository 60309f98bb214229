"""The ledger: one SQLite file per output directory, the source of truth for every job.

Invariants a run relies on:
- a job's intent (`submitting`, `submissions` + 1) is durable on disk before its POST is sent,
  and its `request_id` is committed right after the answer arrives (see `mark_submitted`);
- a job is `done` only once every output file is in place under its final name and recorded with
  its size and sha256 (and the mtime and inode stat saw then, which later checks compare first:
  batchrun.filecheck);
- nothing else ever deletes a `request_id`: a paid job can always be collected again.

WAL mode keeps `status` readable while a run writes. The commit that guards money (the intent)
runs with `synchronous=FULL`; the others with NORMAL, which in WAL mode is still crash-consistent
and is made durable by the next FULL commit. Schema changes are ordered migrations recorded in
`PRAGMA user_version`.

Group commit (`Ledger.group_commits`, used by a run): the run's per-job writes are not committed one
by one. They are queued in order and ride the next commit.
- What settles a POST's outcome (the request id the API gave, or "certainly not created") asks for the
  commit at the end of the current turn of the event loop: the outcomes of one turn share it (it was a
  commit of its own, one per job: the largest share of a run's system calls). Losing a request id is
  the one loss that costs a person work, so it waits no longer than that. The crash soak (200
  SIGKILLs, seed 13) left 19 `unknown` jobs of 2,100 so, against 14 and 16 with each committed at
  once: within its noise. Spacing those commits at least 2 ms apart left 21 of 1,800: not kept.
- An intent (`mark_submitting_soon`) rides the next commit, at most `within` seconds later (a run
  gives a fifth of its shortest poll interval, at most `RIDE_SECONDS`, 20 ms); that commit is then
  FULL, and each job's POST waits until it has returned. Intents share an fsync with each other and
  with the request ids answered meanwhile, which it also makes durable against power loss. A POST
  leaves up to 20 ms later than it could (nothing beside a render of minutes); in exchange a 500-job
  run at full speed makes about half the commits (bench/README). Waiting
  costs no safety: nothing is sent before its intent is on disk, and the intent of a job that stops
  waiting is withdrawn (`withdraw_intent`), so a stopped run leaves no intent without its POST.
- Other writes (poll answers, `downloading`, outputs and `done`, errors, media facts) wait at most
  `RIDE_SECONDS` for one of those commits, then get one of their own.
Reads through this object commit what is queued first, so a run always reads what it wrote.

What a crash can lose, and why that is safe:
- SQLite commits are atomic and applied in order, and every commit holds all writes queued before it,
  so the ledger on disk is always a prefix of the run's history: never a later state without the
  earlier ones (e.g. never `done` without the request id that led to it).
- SIGKILL can lose only the writes still queued, those of the last `RIDE_SECONDS` (a request id is
  committed at the end of the turn its answer arrived in; an intent still queued has sent nothing);
  a power loss can also lose NORMAL
  commits made since the last FULL one. Both only ever lose a suffix:
  - a lost intent is impossible: the POST is sent only after its FULL commit has returned;
  - a lost request id leaves the job `submitting`, which the next run holds as `unknown` and never
    submits again without `--resubmit-unknown` (a result to look up by hand, never a second payment);
  - a lost poll answer or `downloading` leaves the job `queued`/`running`: the next run asks again;
  - a lost `done` (and its outputs) leaves the job `downloading`: the next run asks for the result
    again and downloads the file again (no submit, no payment); files are renamed into place only
    once durable, and `done` is queued only after that, so a `done` on disk always has its files;
  - a lost error or `pending` after a refused POST leaves the job `submitting`/`unknown`: the safe side.
- A commit that fails (disk full, I/O error) is rolled back whole: the in-memory states are reloaded
  from disk, the request ids it carried are named in the log (jobs the API accepted: paid), and the
  caller (an intent's) or else the run (`on_write_error`) is told, so that it stops.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import sqlite3
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, unquote

from batchrun import gcpause
from batchrun.errors import LedgerError
from batchrun.spend import Spend, add_up_groups

if TYPE_CHECKING:
    import asyncio

LEDGER_NAME = "ledger.sqlite"
# Longest a run's queued writes wait for a commit to ride when no intent comes (see group commit above).
RIDE_SECONDS = 0.02
log = logging.getLogger("batchrun.ledger")

STATES = ("pending", "submitting", "unknown", "queued", "running", "downloading", "done", "failed", "cancelled")
IN_FLIGHT = ("queued", "running")  # accepted remotely, not finished

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        model TEXT NOT NULL,
        input_json TEXT NOT NULL,
        input_sha256 TEXT NOT NULL,
        request_id TEXT,
        submissions INTEGER NOT NULL DEFAULT 0,
        remote_status TEXT,
        estimated_cost_usd REAL,
        cost_usd REAL,
        error_kind TEXT,
        error_message TEXT,
        output_urls TEXT,
        first_seen_at TEXT NOT NULL,
        submitted_at TEXT,
        started_at TEXT,
        finished_at TEXT,
        downloaded_at TEXT,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE outputs (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        idx INTEGER NOT NULL,
        path TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (job_id, idx)
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        pid INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        exit_code INTEGER,
        summary TEXT
    );
    """,
    # 2: preflight results of image URLs, so that a re-run does not fetch them again
    """
    CREATE TABLE preflight (
        url TEXT PRIMARY KEY,
        ok INTEGER NOT NULL,
        problem TEXT,
        content_type TEXT,
        bytes INTEGER,
        width INTEGER,
        height INTEGER,
        checked_at TEXT NOT NULL
    );
    """,
    # 3: why the manifest's job was not run as written (its input changed after it was submitted)
    """
    ALTER TABLE jobs ADD COLUMN refusal TEXT;
    """,
    # 4: every request id a job ever had (a resubmitted job keeps its earlier ones: they may have been
    # paid for), and whether the job's money is simulated (sent to the built-in sandbox)
    """
    CREATE TABLE requests (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        request_id TEXT NOT NULL,
        submitted_at TEXT,
        PRIMARY KEY (job_id, request_id)
    );
    INSERT OR IGNORE INTO requests (job_id, request_id, submitted_at)
        SELECT id, request_id, submitted_at FROM jobs WHERE request_id IS NOT NULL;
    ALTER TABLE jobs ADD COLUMN simulated INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: a cost the API reported that is not a usable figure (e.g. "1e308"): kept, never counted
    """
    ALTER TABLE jobs ADD COLUMN cost_flag TEXT;
    """,
    # 6 (review): which take of its input a job is, the reviewer's decision on it, the facts read from
    # its video (batchrun.mediafacts), and the takes asked for with `batchrun reroll` (see batchrun.takes)
    """
    ALTER TABLE jobs ADD COLUMN take INTEGER;
    ALTER TABLE jobs ADD COLUMN take_of TEXT;
    ALTER TABLE jobs ADD COLUMN decision TEXT;
    ALTER TABLE jobs ADD COLUMN rating INTEGER;
    ALTER TABLE jobs ADD COLUMN note TEXT;
    ALTER TABLE jobs ADD COLUMN decided_at TEXT;
    ALTER TABLE jobs ADD COLUMN media_json TEXT;
    CREATE TABLE rerolls (
        id TEXT PRIMARY KEY,
        take_of TEXT NOT NULL,
        take INTEGER NOT NULL,
        requested_at TEXT NOT NULL
    );
    """,
    # 7: each output file's mtime (ns) and inode as stat saw them once it was in place, so a re-run checks
    # a done file by size, mtime and inode instead of hashing it (batchrun.filecheck); NULL until recorded.
    # Likewise each `<id>.json` found intact, with the ledger fields it names (`results.provenance_identity`)
    """
    ALTER TABLE outputs ADD COLUMN mtime_ns INTEGER;
    ALTER TABLE outputs ADD COLUMN inode INTEGER;
    CREATE TABLE provenance_files (
        job_id TEXT PRIMARY KEY REFERENCES jobs(id),
        identity TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL
    );
    """,
    # 8: a count of the changes to what results.jsonl shows (jobs, outputs' names, sizes and digests, request
    # ids), bumped by triggers in the transaction that makes each change, whoever makes it (this process,
    # another batchrun, the sqlite3 shell); and the count and stat of results.jsonl when it last held the
    # ledger exactly, so a re-run knows it is current from one query and one lstat (`results.results_current`).
    # Written to run again harmlessly over a ledger that has some of it (a table rebuilt by hand).
    """
    CREATE TABLE IF NOT EXISTS ledger_changes (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
    INSERT OR IGNORE INTO ledger_changes (id, n) VALUES (1, 0);
    CREATE TRIGGER IF NOT EXISTS jobs_insert_counted AFTER INSERT ON jobs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS jobs_update_counted AFTER UPDATE ON jobs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS jobs_delete_counted AFTER DELETE ON jobs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS outputs_insert_counted AFTER INSERT ON outputs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS outputs_update_counted AFTER UPDATE OF job_id, idx, path, bytes, sha256 ON outputs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS outputs_delete_counted AFTER DELETE ON outputs
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS requests_insert_counted AFTER INSERT ON requests
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS requests_update_counted AFTER UPDATE ON requests
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TRIGGER IF NOT EXISTS requests_delete_counted AFTER DELETE ON requests
        BEGIN UPDATE ledger_changes SET n = n + 1; END;
    CREATE TABLE IF NOT EXISTS results_stamp (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        changes INTEGER NOT NULL,
        format TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL
    );
    """,
    # 9: no index of jobs by state. No query asks for one state (a run keeps the states in memory; status
    # and the end of a run scan), and every change of state rewrote one or two of its pages: 1.8 of the
    # 10 pages a job wrote to the WAL (39.5 -> 32.4 KB per job, 7 fewer pwrite calls per job).
    "DROP INDEX IF EXISTS jobs_state;",
]
DECISIONS = ("picked", "rejected")
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration, one by one (a trigger's body holds `;` of its own)."""
    statement = ""
    for piece in script.split(";"):
        statement += piece + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                yield statement
            statement = ""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Output:
    idx: int
    path: str  # relative to the output dir
    bytes: int
    sha256: str
    # As `os.stat` saw the file under its final name (see batchrun.filecheck); None: not recorded (a
    # ledger older than schema 7, until a run has hashed the file once).
    mtime_ns: int | None = None
    inode: int | None = None


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    model: str
    input: dict[str, Any]
    input_sha256: str
    request_id: str | None
    submissions: int
    remote_status: str | None
    estimated_cost_usd: float | None
    cost_usd: float | None
    error_kind: str | None
    error_message: str | None
    output_urls: list[str]
    first_seen_at: str
    submitted_at: str | None
    started_at: str | None
    finished_at: str | None
    downloaded_at: str | None
    outputs: tuple[Output, ...] = ()
    refusal: str | None = None  # why the manifest's job of this id was not run as written, at the last run
    simulated: bool = False  # sent to the built-in sandbox: its money is simulated
    request_ids: tuple[str, ...] = ()  # every request id the job ever had, oldest first

    @property
    def earlier_request_ids(self) -> tuple[str, ...]:
        """Request ids of earlier submissions, not the current one."""
        return tuple(r for r in self.request_ids if r != self.request_id)
    cost_flag: str | None = None  # what the API reported as the cost when it was not a usable figure
    take: int | None = None  # which take of its input (None: take 1)
    take_of: str | None = None  # id of take 1 of the same input (None: this is take 1)
    decision: str | None = None  # the reviewer's: "picked", "rejected" or None (not decided)
    rating: int | None = None  # the reviewer's, 1-5
    note: str | None = None  # the reviewer's
    decided_at: str | None = None
    media: dict[str, Any] | None = None  # read from the first output file: see batchrun.mediafacts

    @property
    def error(self) -> dict[str, str] | None:
        return {"kind": self.error_kind, "message": self.error_message or ""} if self.error_kind else None

    def __getattr__(self, name: str) -> Any:
        """A JSON field a bulk read left encoded (see `_bulk_rows`), decoded on first use and kept: most
        done rows of a re-run or `status` are settled by id, state, digest and outputs alone."""
        lazy = _LAZY_FIELDS.get(name)
        # `get`, not `pop`: two threads reading the field at once both find the text and decode it.
        raw = self.__dict__.get(lazy[0], _ABSENT) if lazy else _ABSENT
        if raw is _ABSENT:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = lazy[1](raw, self.__dict__.get("id"))
        return value


def _job_input(text: Any, job_id: Any) -> dict[str, Any]:
    """A ledger's `input_json`: the JSON object batchrun wrote. Raises LedgerError for anything else (a
    value changed outside batchrun): the input is what was paid for, never guessed."""
    value = _json_column(text, job_id, "input_json")
    if not isinstance(value, dict):
        raise _changed(job_id, "input_json", "a JSON object")
    return value


def _output_urls(text: Any, job_id: Any) -> list[str]:
    """A ledger's `output_urls`: a JSON list of URLs, or NULL for none. Raises LedgerError for anything else."""
    value = _json_column(text or "[]", job_id, "output_urls")
    if not isinstance(value, list) or not all(isinstance(url, str) for url in value):
        raise _changed(job_id, "output_urls", "a JSON list of URLs")
    return value


def media_facts(text: Any) -> dict[str, Any] | None:
    """A ledger's `media_json`: the facts read from a job's video, or None when none are (not read yet,
    nothing readable, or a value changed outside batchrun: facts are read from the file, so an unusable
    record only leaves them unknown)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) and value else None


def _json_column(text: Any, job_id: Any, column: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise _changed(job_id, column, "valid JSON", f" ({exc})" if isinstance(exc, ValueError) else "") from None


def _changed(job_id: Any, column: str, what: str, detail: str = "") -> LedgerError:
    return LedgerError(f"the ledger's {column} of job {job_id!r} is not {what}{detail}: it was changed outside "
                       f"batchrun. Put back what batchrun wrote there (with the sqlite3 shell, or from a "
                       f"backup of {LEDGER_NAME}), then run the command again")


_ABSENT = object()
# field -> (where `_bulk_rows` leaves its column's text, how to decode it given the job's id), as `_row` does
_LAZY_FIELDS: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "input": ("_input_json", _job_input),
    "output_urls": ("_output_urls_json", _output_urls),
}  # not `media`: a field with a default is a class attribute, which __getattr__ never sees


def _row(record: sqlite3.Row, outputs: tuple[Output, ...], request_ids: tuple[str, ...]) -> JobRow:
    data = dict(record)
    data["input"] = _job_input(data.pop("input_json"), data.get("id"))
    data["output_urls"] = _output_urls(data["output_urls"], data.get("id"))
    data["simulated"] = bool(data.get("simulated"))
    data["media"] = media_facts(data.pop("media_json", None))
    data.pop("updated_at")
    return JobRow(**data, outputs=outputs, request_ids=request_ids)


_JOB_FIELDS = {f.name: f for f in fields(JobRow)}
_JOB_DEFAULTS = {name: f.default for name, f in _JOB_FIELDS.items() if f.default is not MISSING}
_JSON_COLUMNS = {"input_json": "input", "media_json": "media"}


def _bulk_rows(cursor: sqlite3.Cursor, outputs: dict[str, list[Output]] | InJobOrder,
               requests: dict[str, list[str]] | InJobOrder) -> Iterator[JobRow]:
    """JobRows of `SELECT * FROM jobs` as `_row` builds them, several times faster: the column names are
    checked once per query instead of by the dataclass's __init__ once per row (a frozen dataclass sets
    each of its 30 fields through object.__setattr__, most of the cost of reading 100,000 jobs), and the
    JSON columns of input and output URLs are decoded only when a caller reads them
    (`JobRow.__getattr__`)."""
    names = [_JSON_COLUMNS.get(d[0], d[0]) for d in cursor.description]
    unknown = set(names) - set(_JOB_FIELDS) - {"updated_at"}
    if unknown:  # a column JobRow does not know: let its __init__ say so
        for record in cursor:
            yield _row(dict(zip([d[0] for d in cursor.description], record, strict=True)), (), ())
        return
    missing = {name: value for name, value in _JOB_DEFAULTS.items() if name not in names}  # an older ledger's
    names = [_LAZY_FIELDS[name][0] if name in _LAZY_FIELDS else name for name in names]
    new = object.__new__
    for record in cursor:
        row = new(JobRow)
        data = row.__dict__  # filled in place: no dict per row to copy from
        data.update(zip(names, record, strict=True))
        del data["updated_at"]
        if missing:
            data.update(missing)
        job_id, request_id = data["id"], data["request_id"]
        data["simulated"] = bool(data.get("simulated"))
        media = data.get("media")
        data["media"] = media_facts(media) if media else None
        data["outputs"] = tuple(outputs.pop(job_id, ()))
        data["request_ids"] = tuple(requests.pop(job_id, None) or ([request_id] if request_id else []))
        yield row


_OUTPUT_NAMES = [f.name for f in fields(Output)]
_OUTPUT_DEFAULTS = {"mtime_ns": None, "inode": None}


def _bulk_output(r: tuple) -> Output:
    """An Output of (job id, idx, path, bytes, sha256[, mtime_ns, inode]) as Output(*r[1:]) would be, without
    a frozen dataclass's per-field setattr (as `_bulk_rows`); no mtime_ns, inode before schema 7."""
    made = object.__new__(Output)
    made.__dict__.update(_OUTPUT_DEFAULTS)
    made.__dict__.update(zip(_OUTPUT_NAMES, r[1:], strict=False))
    return made


class InJobOrder:
    """The rows of a cursor ordered as the jobs are read (first column: the job id), handed out job by
    job: `pop(job_id, default)` as on a dict of lists, for jobs asked in that same order."""

    def __init__(self, cursor: sqlite3.Cursor, build: Callable[[tuple], Any], *, single: bool = False):
        self._cursor, self._build, self._single = cursor, build, single  # single: one row per job at most
        self._next = next(cursor, None)

    def pop(self, job_id: str, default: Any = None) -> Any:
        upcoming = self._next
        if upcoming is None or upcoming[0] != job_id:  # most calls: nothing for this job, or ...
            return default
        build, cursor = self._build, self._cursor
        found = build(upcoming)
        upcoming = self._next = next(cursor, None)
        if self._single:
            return found
        found = [found]
        while upcoming is not None and upcoming[0] == job_id:  # ... one row, seldom more
            found.append(build(upcoming))
            upcoming = self._next = next(cursor, None)
        return found


_ACCESS_ERRORS = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_BUSY", "SQLITE_LOCKED")
_ACCESS_TEXTS = ("unable to open database file", "attempt to write a readonly database", "access permission denied",
                 "authorization denied", "database is locked", "database table is locked")  # sqlite3_errstr's


def misplaced_location(path: Path) -> Path | None:
    """Where batchrun 0.1 kept the ledger `path` when the output dir's path holds `?`, `#` or `%`: it gave
    SQLite the path unencoded, which SQLite cut at `?` or `#` and decoded `%XX` in. None when that is
    `path` itself."""
    text = str(path)
    cut = re.split(r"[?#]", text, maxsplit=1)[0]
    old = unquote(cut)  # as UTF-8, as SQLite reads the bytes it decodes
    return Path(old) if old != text else None


def _refuse_misplaced(path: Path) -> None:
    """Raise LedgerError when `path` is missing or empty while batchrun 0.1's misplaced ledger of this
    output dir (`misplaced_location`) holds data: a run would otherwise start over and pay again for every
    job that ledger records."""
    old = misplaced_location(path)
    if old is None or not _missing_or_empty(path):
        return
    file = _regular_file(old)
    if file is None:
        return
    with file:
        try:
            if file.read(16) != b"SQLite format 3\0":
                return
        except OSError:
            return
    raise LedgerError(
        f"the ledger of {path.parent} may be {old}: batchrun 0.1 put a ledger there when the output directory's "
        f"path held '?', '#' or '%', and starting over here would pay again for every job it records. If it "
        f"is this directory's (it holds the jobs of every directory whose path starts the same way), move it "
        f"here with its -wal file: mv '{old}' '{path}'; if it is not, rename it. Then run again")


def _missing_or_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True
    except OSError:
        return False  # the open says what is wrong with it


def _regular_file(path: Path) -> BinaryIO | None:
    """`path` open for reading when it is a regular file, else None: a FIFO planted there never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.fdopen(fd, "rb")
    except OSError:
        pass
    os.close(fd)
    return None


def _refuse_orphaned_results(path: Path) -> None:
    """Raise LedgerError when the ledger `path` is missing or empty while its folder's results.jsonl names
    jobs the API accepted (a request id): the ledger was deleted or emptied, and starting over would pay
    again for each of them."""
    if not _missing_or_empty(path):
        return
    file = _regular_file(path.parent / "results.jsonl")
    if file is None:
        return
    paid = 0
    try:
        with file:
            for line in file:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                paid += isinstance(row, dict) and bool(row.get("request_id"))
    except OSError:
        return
    if paid:
        raise LedgerError(
            f"{path.parent} has no ledger ({path} is missing or empty), but its results.jsonl names {paid} "
            f"job{'s' if paid != 1 else ''} the API accepted: the ledger was deleted or emptied, and starting "
            f"over would pay again for each. Put the ledger back (from a backup); or, to start over here and "
            f"pay again, move results.jsonl aside")


def unusable(path: Path, exc: Exception) -> LedgerError:
    """What a person is told of a ledger SQLite cannot read (`exc`: what SQLite said).

    A damaged file (SQLite's CORRUPT or NOTADB, a failed integrity check, a table gone) may be moved aside.
    A file SQLite could not open or write (CANTOPEN, READONLY, PERM, AUTH, a lock) is most likely fine, and
    moving it aside would start a new ledger that pays again for every job it records: the message says to
    fix the access instead."""
    name = getattr(exc, "sqlite_errorname", None)  # Python 3.11+; before, SQLite's own text for the code
    if name.startswith(_ACCESS_ERRORS) if name else any(text in str(exc) for text in _ACCESS_TEXTS):
        return LedgerError(f"cannot use the ledger {path} here ({exc}); it was left untouched. Check that you may "
                           "read and write it and its folder (SQLite writes a -shm file beside it even to read). "
                           "Do not move it aside: it is the record of the jobs already paid for")
    return LedgerError(f"{path} is not a usable batchrun ledger ({exc}); it was left untouched. "
                       "Move it aside to start over, or restore it from a backup")


# A done job's identity as `results.provenance_identity` writes it, in SQL over `jobs j` and its output `o`
# (idx 0); and whether the job has another output.
_IDENTITY = ("j.request_id || '|' || j.model || '|' || j.input_sha256 || '|' || o.path || ':' || o.bytes || ':'"
             " || o.sha256")
_MORE_OUTPUTS = "SELECT 1 FROM outputs c WHERE c.job_id = j.id AND c.idx <> 0"


class LedgerWriteError(LedgerError):
    """A ledger write failed (disk full, I/O error, locked, or a constraint broken by a change made outside
    batchrun): the run cannot record what happens, so it stops."""


class Ledger:
    """Open with `Ledger.open(output_dir)`; every method commits before it returns."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        # States mirrored in memory so progress displays never query a 100,000-row table.
        self._states: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._states_unread = False  # a read-only ledger reads them when first asked (status never does)
        # False only for an older ledger opened read-only (not migrated): no request history there.
        self._history = True
        self._file_stats = True  # likewise: outputs' mtime_ns and inode (schema 7)
        # Group commit (see the module docstring): statements queued in order, and the futures of the
        # intents waiting for their FULL commit.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued: list[tuple[str, Any, bool]] = []  # (sql, parameters, executemany)
        self._durable_waiters: list[asyncio.Future] = []
        self._queued_requests: list[tuple[str, str]] = []  # (job id, request id) of queued request ids
        # Intents not yet committed, by job: their two queued statements and the job's state before them.
        self._queued_intents: dict[str, tuple[list[tuple[str, Any, bool]], str | None]] = {}
        # For an intent of a job that was not `pending` (resubmitted `unknown`, retried `failed`): its row's
        # columns the intent overwrites, as they were (`_UNDONE`, state first), for `withdraw_intent` and
        # `mark_not_sent` to give back.
        self._undo_intents: dict[str, tuple[Any, ...]] = {}
        self._commit_handle: asyncio.Handle | None = None
        self._commit_at = 0.0  # the loop time the scheduled commit comes at
        self.ride_seconds = RIDE_SECONDS
        self.on_write_error: Callable[[LedgerWriteError], None] | None = None
        self.commits = 0  # write transactions committed through this object (a benchmark figure)
        self._counted = True  # likewise: the change count and results.jsonl's stamp (schema 8)

    def _moved(self, job_id: str, state: str) -> None:
        self._read_states()
        old = self._states.get(job_id)
        if old is not None:
            self._counts[old] -= 1
        self._states[job_id] = state
        self._counts[state] += 1

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, output_dir: Path, *, create: bool = True, readonly: bool = False, check: bool = True) -> Ledger:
        """The ledger of `output_dir`. Raises LedgerError: no ledger (and not `create`), not a regular file, a
        linked companion file, a newer schema, or a file that fails SQLite's integrity check. `check=False`
        (read-only only): the caller runs that check itself (`integrity`) before it shows anything read."""
        path = output_dir / LEDGER_NAME
        _refuse_misplaced(path)
        if not readonly:
            _refuse_orphaned_results(path)
        if not path.exists():
            if not create:
                raise LedgerError(f"no ledger at {path}: nothing has run with this output directory yet")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            os.close(fd)
        elif path.is_symlink() or not path.is_file():
            raise LedgerError(f"{path} is not a regular file; refusing to use it")
        for companion in (f"{LEDGER_NAME}-wal", f"{LEDGER_NAME}-shm", f"{LEDGER_NAME}-journal"):
            # SQLite opens these by name, following a link: a planted one would have it write elsewhere.
            if (output_dir / companion).is_symlink():
                raise LedgerError(f"{output_dir / companion} is a symbolic link; batchrun never writes through "
                                  "a link in the output directory. Remove the link and run again")
        # The path percent-encoded: SQLite reads a URI's `?` and `#` as the start of its query and fragment,
        # and decodes `%XX`, so an output dir named `shots #2` would open a ledger elsewhere (`shots `).
        uri = f"file:{quote(str(path), safe='/')}" + ("?mode=ro" if readonly else "")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            ledger = cls(conn, path)
            ledger._prepare(readonly, check or not readonly)
        except sqlite3.DatabaseError as exc:
            raise unusable(path, exc) from None
        return ledger

    def integrity(self) -> None:
        """SQLite's quick integrity check of the whole file (O(size): 0.14 s for 100,000 jobs). Raises
        sqlite3.DatabaseError when it fails."""
        check = self.conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")

    def _prepare(self, readonly: bool, check: bool) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"{self.path} was written by a newer batchrun (ledger schema {version}, this "
                              f"batchrun knows up to {SCHEMA_VERSION}); upgrade batchrun to use it")
        if check:
            self.integrity()
        if readonly and version == 0:  # an empty file (or one no batchrun made): nothing to read, and no tables
            raise LedgerError(f"{self.path} holds no ledger yet (an empty file): nothing has run with this output "
                              "directory, or its ledger was emptied")
        if readonly:
            self._history = version >= 4  # migration 4 added the requests table and `simulated`
            self._file_stats = version >= 7
            self._counted = version >= 8
            self._states_unread = True
            return
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        for number in range(version, SCHEMA_VERSION):
            with self._transaction(durable=True):
                for statement in _statements(MIGRATIONS[number]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={number + 1}")
        self._load_states()

    def _read_states(self) -> None:
        if self._states_unread:
            self._states_unread = False
            self._load_states()

    def _load_states(self) -> None:
        """Every job's state into memory, replacing what was there (ids are unique: no job counted twice)."""
        cursor = self.conn.cursor()
        cursor.row_factory = None  # plain tuples: a sqlite3.Row per job costs more than the query
        with gcpause.paused():  # 100,000 new strings beside a loaded manifest: a full GC pass costs more
            self._states = dict(cursor.execute("SELECT id, state FROM jobs"))
            self._counts = Counter(self._states.values())

    def close(self) -> None:
        try:
            self.flush()
        except LedgerWriteError as exc:
            log.error("%s", exc)
        finally:
            self.conn.close()

    # -- group commit (see the module docstring) ----------------------------------------------------
    @contextmanager
    def group_commits(self) -> Iterator[None]:
        """Within this block (inside a running event loop), hot-path writes are queued and committed
        together at the end of each turn of the loop; on leaving it, whatever is queued is committed. A
        commit that fails is handed to `on_write_error` (logged without one), never raised from here."""
        import asyncio  # here: the commands that only read a ledger never need it (40 ms)

        self._loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            self._commit_turn()
            self._loop = None

    def flush(self) -> None:
        """Commit the queued writes now (nothing to do when none are queued). Raises LedgerWriteError."""
        if self._queued or self._durable_waiters:
            with self._transaction(carry=True):
                pass

    def _queue(self, statements: list[tuple[str, Any, bool]], *, soon: bool = False) -> None:
        """Run `statements` in one transaction now, or, when commits are grouped, queue them to ride the
        next commit: within `ride_seconds`, or with `soon` the one at the end of this turn of the loop."""
        if self._loop is None:
            with self._transaction() as conn:
                for sql, params, many in statements:
                    (conn.executemany if many else conn.execute)(sql, params)
            return
        self._queued.extend(statements)
        self._schedule(0.0 if soon else self.ride_seconds)

    def _schedule(self, within: float) -> None:
        """Make sure a commit will come within `within` seconds (0: at the end of this turn of the loop);
        writes queued meanwhile, and any sooner commit before then, carry them."""
        if self._loop is None:
            return
        when = self._loop.time() + within
        if self._commit_handle is not None:
            if self._commit_at <= when:
                return
            self._commit_handle.cancel()
        self._commit_at = when
        self._commit_handle = (self._loop.call_soon(self._commit_turn) if within <= 0
                               else self._loop.call_at(when, self._commit_turn))

    def _commit_turn(self) -> None:
        if self._commit_handle is not None:
            self._commit_handle.cancel()  # a no-op when it is the handle running now
            self._commit_handle = None
        try:
            self.flush()
        except LedgerWriteError as exc:
            if self.on_write_error is not None:
                self.on_write_error(exc)
            else:
                log.error("%s", exc)

    def _lost(self, waiters: list[asyncio.Future], requests: list[tuple[str, str]], exc: LedgerWriteError) -> None:
        """A commit carrying queued writes failed: name the request ids it carried (jobs the API accepted,
        paid for: a person can still collect them), hand the error to the intents waiting for it, and make
        the in-memory states the ledger's again."""
        for job_id, request_id in requests:
            log.error("%s: accepted as request %s, but the ledger could not record it", job_id, request_id)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)
        try:
            self._load_states()
        except sqlite3.Error:
            return

    @contextmanager
    def _transaction(self, *, durable: bool = False, carry: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. A write SQLite cannot make (disk full, I/O error) is rolled back and
        raised as `LedgerWriteError`: the ledger keeps its last committed state.

        With `carry`, the queued writes (group commit) go first in this same transaction, and it is
        FULL if an intent is among them; otherwise they are committed on their own first."""
        if not carry and (self._queued or self._durable_waiters):
            self.flush()
        statements, waiters, requests = self._queued, self._durable_waiters, self._queued_requests
        if carry:
            self._queued, self._durable_waiters, self._queued_requests = [], [], []
            self._queued_intents = {}
            durable = durable or bool(waiters)
        try:
            if durable:
                self.conn.execute("PRAGMA synchronous=FULL")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    if carry:
                        for sql, params, many in statements:
                            (self.conn.executemany if many else self.conn.execute)(sql, params)
                    yield self.conn
                except BaseException:
                    self._rollback()
                    raise
                try:
                    self.conn.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback()
                    raise
                self.commits += 1
            finally:
                if durable:
                    self.conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:  # disk full, locked, I/O; or a row changed outside batchrun (a constraint)
            error = LedgerWriteError(f"cannot write the ledger {self.path}: {exc}")
            if carry and (statements or waiters):
                self._lost(waiters, requests, error)
            raise error from None
        except BaseException as exc:
            if carry and (statements or waiters):
                self._lost(waiters, requests, LedgerWriteError(f"cannot write the ledger {self.path}: {exc}"))
            raise
        for waiter in waiters if carry else ():
            if not waiter.done():
                waiter.set_result(None)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite already rolled it back

    # -- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRow | None:
        self.flush()
        record = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if record is None:
            return None
        ids = tuple(r[0] for r in self.conn.execute("SELECT request_id FROM requests WHERE job_id=? ORDER BY rowid",
                                                    (job_id,))) if self._history else ()
        return _row(record, self._outputs(job_id), ids or ((record["request_id"],) if record["request_id"] else ()))

    def _output_columns(self) -> str:
        return "idx, path, bytes, sha256" + (", mtime_ns, inode" if self._file_stats else "")

    def _outputs(self, job_id: str) -> tuple[Output, ...]:
        rows = self.conn.execute(f"SELECT {self._output_columns()} FROM outputs WHERE job_id=? ORDER BY idx",
                                 (job_id,))
        return tuple(Output(*r) for r in rows)

    def get_many(self, job_ids: Iterable[str]) -> list[JobRow]:
        """The rows of these jobs (an unknown id is left out), read a few hundred at a time rather than
        with three queries per job."""
        self.flush()
        ids = list(job_ids)
        found: list[JobRow] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            outputs: dict[str, list[Output]] = {}
            for r in self.conn.execute(f"SELECT job_id, {self._output_columns()} FROM outputs WHERE job_id IN"
                                       f" ({marks}) ORDER BY job_id, idx", chunk):
                outputs.setdefault(r[0], []).append(Output(*r[1:]))
            requests: dict[str, list[str]] = {}
            if self._history:
                for job_id, request_id in self.conn.execute(f"SELECT job_id, request_id FROM requests WHERE job_id"
                                                            f" IN ({marks}) ORDER BY rowid", chunk):
                    requests.setdefault(job_id, []).append(request_id)
            for r in self.conn.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", chunk):
                found.append(_row(r, tuple(outputs.get(r["id"], ())),
                                  tuple(requests.get(r["id"]) or ([r["request_id"]] if r["request_id"] else []))))
        return found

    def all(self) -> list[JobRow]:
        """Every job, oldest first (see `rows`)."""
        # Hundreds of thousands of new objects and no reference cycles: left on, the cyclic collector
        # rescans the growing heap again and again (a third of reading 100,000 jobs), as in load_manifest.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return list(self.rows())
        finally:
            if was_enabled:
                gc.enable()

    def rows(self) -> Iterator[JobRow]:
        """Every job, oldest first, built one at a time: three queries in all whatever the ledger's size,
        read side by side in the jobs' order (outputs and request ids joined to their job's order), so a
        caller that streams them (results.jsonl, plan, status) holds one job's rows at a time, not every
        output of the ledger at once (100 MB at 100,000 jobs before). Keep the iterator short-lived: it
        holds a read transaction (one snapshot for the three statements)."""
        self.flush()
        order = "j.first_seen_at, j.rowid"
        columns = ", ".join(f"o.{name}" for name in self._output_columns().split(", "))
        outputs = self.conn.cursor()
        outputs.row_factory = None
        outputs.execute(f"SELECT o.job_id, {columns} FROM outputs o JOIN jobs j ON j.id = o.job_id"
                        f" ORDER BY {order}, o.idx")
        requests = None
        if self._history:
            requests = self.conn.cursor()
            requests.row_factory = None
            requests.execute(f"SELECT r.job_id, r.request_id FROM requests r JOIN jobs j ON j.id = r.job_id"
                             f" ORDER BY {order}, r.rowid")
        cursor = self.conn.cursor()
        cursor.row_factory = None  # plain tuples: `_bulk_rows` names the columns once
        cursor.execute(f"SELECT * FROM jobs j ORDER BY {order}")
        yield from _bulk_rows(cursor, InJobOrder(outputs, _bulk_output),
                              InJobOrder(requests, lambda r: r[1]) if requests is not None else {})

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction for the block: every query in it sees the ledger as of its first read, so
        reads made one after the other (a brief sweep, then the full rows of the jobs it picked) agree
        while a run writes. Queued writes are committed first; nothing may be written inside."""
        self.flush()
        if self.conn.in_transaction:  # already inside one: it is the snapshot
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    def briefs(self, *, media: bool = False, asked: bool = False, identity: bool = True) -> sqlite3.Cursor | None:
        """Every job as a short tuple, in one query: enough to tell a done job whose files are as recorded
        from one that needs its full row (batchrun.settled). Each tuple is

            (id, quick, input_sha256, refused, path, bytes, mtime_ns, inode,
             provenance_bytes, provenance_mtime_ns, provenance_inode, first_seen_at, rowid
             [, media_json[, duration, audio]])

        in no particular order: (first_seen_at, rowid) is the job's place in the ledger's order, for the
        few jobs whose order matters (sorting 100,000 such wide rows in SQLite costs more than the rest).

        `quick` is 1 for a done job with exactly one output (idx 0) whose `<id>.json` was last found intact
        with the ledger's identifying fields as they are now (`results.provenance_identity`, compared in
        SQL), else 0 or None; `refused` 1 when the last run recorded a refusal; `path`, `bytes`, `mtime_ns`,
        `inode` are that output's; `provenance_*` the recorded stat of its `<id>.json`. With `media`, the
        jobs table's `media_json`; with `asked` too, the input's `duration` and whether it asks for audio, as
        `mediafacts.asked` reads them (both None when the input is not valid JSON). None for a ledger older
        than schema 7 opened read-only (no recorded stats: every job needs its full row).

        `identity=False`: `quick` leaves out the comparison of identities and the count of outputs (a third
        of the query's time), and is 1 for every done job with an output idx 0 and a recorded `<id>.json`;
        the caller takes `identity_mismatches` from it (batchrun.sidereads reads them beside this query)."""
        self.flush()
        if not self._file_stats:
            return None
        cursor = self.conn.cursor()
        cursor.row_factory = None
        more = ", j.media_json" if media else ""
        if media and asked:
            more += (", CASE WHEN json_valid(j.input_json) THEN json_extract(j.input_json, '$.duration') END,"
                     " CASE WHEN json_valid(j.input_json) THEN json_type(j.input_json, '$.generate_audio') IS 'true'"
                     " END")
        # An identity that does not match here (a NULL request id, a number SQL writes otherwise) only sends
        # the job to the full check, which compares it as Python writes it.
        quick = (f"p.identity = {_IDENTITY} AND NOT EXISTS ({_MORE_OUTPUTS})" if identity
                 else "o.job_id IS NOT NULL AND p.job_id IS NOT NULL")
        cursor.execute(
            f"SELECT j.id, j.state = 'done' AND {quick},"
            " j.input_sha256, j.refusal IS NOT NULL, o.path, o.bytes, o.mtime_ns, o.inode, p.bytes, p.mtime_ns,"
            f" p.inode, j.first_seen_at, j.rowid{more} FROM jobs j LEFT JOIN outputs o ON o.job_id = j.id"
            " AND o.idx = 0 LEFT JOIN provenance_files p ON p.job_id = j.id")
        return cursor

    def identity_mismatches(self) -> list[tuple[str, tuple[str, int]]]:
        """(id, place in the ledger's order) of each done job with a recorded `<id>.json` and an output idx 0
        whose recorded identity differs from the ledger's fields now, or that has another output: the done
        jobs `briefs(identity=False)` calls quick that `briefs()` would not. One step of SQLite (rows only for
        such jobs: none in a ledger nobody edited)."""
        self.flush()
        return [(r[0], (r[1], r[2])) for r in self.conn.execute(
            "SELECT j.id, j.first_seen_at, j.rowid FROM jobs j JOIN outputs o ON o.job_id = j.id AND o.idx = 0"
            " JOIN provenance_files p ON p.job_id = j.id WHERE j.state = 'done'"
            f" AND (p.identity IS NOT {_IDENTITY} OR EXISTS ({_MORE_OUTPUTS}))")]

    def ids(self) -> list[str]:
        """Every job's id, oldest first."""
        self.flush()
        return [r[0] for r in self.conn.execute("SELECT id FROM jobs ORDER BY first_seen_at, rowid")]

    def rows_of(self, job_ids: list[str]) -> Iterator[tuple[JobRow, tuple[str, int, int, int] | None]]:
        """(row, recorded `<id>.json` stat as `provenance_stats` gives it, or None) of these jobs (ids in the
        ledger's order), in that order, rows built as `rows` builds them; an id the ledger lacks is left
        out. Nothing is held for more than a few hundred jobs at a time. Use inside `snapshot` when the ids
        came from an earlier read."""
        self.flush()
        order = "j.first_seen_at, j.rowid"
        if len(job_ids) * 4 > self.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]:
            # Most of the ledger (a batch in flight, a dir of deleted videos): one streamed read of every
            # row costs less than hundreds of lookups by id; the stats are read beside it in the same order.
            wanted = set(job_ids)
            stats: dict | InJobOrder = {}
            if self._file_stats:
                cursor = self.conn.cursor()
                cursor.row_factory = None
                cursor.execute("SELECT p.job_id, p.identity, p.bytes, p.mtime_ns, p.inode FROM provenance_files p"
                               f" JOIN jobs j ON j.id = p.job_id ORDER BY {order}")
                stats = InJobOrder(cursor, lambda r: r[1:], single=True)
            for row in self.rows():
                known = stats.pop(row.id, None)  # for every row, in order: see InJobOrder
                if row.id in wanted:
                    yield row, known
            return
        columns = ", ".join(f"o.{name}" for name in self._output_columns().split(", "))
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            outputs = self.conn.cursor()
            outputs.row_factory = None
            outputs.execute(f"SELECT o.job_id, {columns} FROM outputs o JOIN jobs j ON j.id = o.job_id"
                            f" WHERE o.job_id IN ({marks}) ORDER BY {order}, o.idx", chunk)
            requests = None
            if self._history:
                requests = self.conn.cursor()
                requests.row_factory = None
                requests.execute(f"SELECT r.job_id, r.request_id FROM requests r JOIN jobs j ON j.id = r.job_id"
                                 f" WHERE r.job_id IN ({marks}) ORDER BY {order}, r.rowid", chunk)
            known = {} if not self._file_stats else {r[0]: tuple(r[1:]) for r in self.conn.execute(
                f"SELECT job_id, identity, bytes, mtime_ns, inode FROM provenance_files WHERE job_id IN ({marks})",
                chunk)}
            cursor = self.conn.cursor()
            cursor.row_factory = None
            cursor.execute(f"SELECT * FROM jobs j WHERE j.id IN ({marks}) ORDER BY {order}", chunk)
            for row in _bulk_rows(cursor, InJobOrder(outputs, _bulk_output),
                                  InJobOrder(requests, lambda r: r[1]) if requests is not None else {}):
                yield row, known.get(row.id)

    def owner_ids(self) -> Iterator[str]:
        """Ids of the jobs that own their file names (`owners.owns_files`: sent, or with files), oldest first."""
        self.flush()
        for (job_id,) in self.conn.execute(
                "SELECT j.id FROM jobs j WHERE j.submissions > 0 OR j.request_id IS NOT NULL"
                " OR EXISTS (SELECT 1 FROM outputs o WHERE o.job_id = j.id) ORDER BY j.first_seen_at, j.rowid"):
            yield job_id

    def tally(self) -> list[tuple[str, str, str | None, int, int, int, bool, float]]:
        """The jobs counted by SQLite in one scan, for `status`: (model, state, decision, jobs, sent, has_cost,
        simulated, money) per combination, where `sent` is submissions > 0, `has_cost` whether the API gave
        a cost, and `money` the sum of cost, else estimate, else 0 (what `spend.add_up_groups` counts);
        models in the order they first appear (oldest job first)."""
        self.flush()
        decision = "decision" if self._has_column("jobs", "decision") else "NULL"
        simulated = "simulated" if self._history else "0"  # an older ledger's: no sandbox then
        group_simulated = ", simulated" if self._history else ""  # (a number in GROUP BY names a column)
        return [tuple(r) for r in self.conn.execute(
            f"SELECT model, state, {decision}, COUNT(*), submissions > 0, cost_usd IS NOT NULL, {simulated},"
            " TOTAL(COALESCE(cost_usd, estimated_cost_usd, 0.0)) FROM jobs"
            f" GROUP BY model, state, {decision}, submissions > 0, cost_usd IS NOT NULL{group_simulated}"
            " ORDER BY MIN(first_seen_at), MIN(rowid)")]

    def _has_column(self, table: str, column: str) -> bool:
        return any(r[1] == column for r in self.conn.execute(f"PRAGMA table_info({table})"))

    def change_count(self) -> int | None:
        """How many changes to what results.jsonl shows the ledger has ever committed, by anyone (schema 8's
        triggers count them); None for an older ledger opened read-only. Equal counts: nothing changed."""
        self.flush()
        if not self._counted:
            return None
        return self.conn.execute("SELECT n FROM ledger_changes").fetchone()[0]

    def results_stamp(self) -> tuple[int, tuple[int, str, int, int, int] | None] | None:
        """(change count now, (change count, format, bytes, mtime_ns, inode) recorded by
        `record_results_stamp`, or None), read in one statement, so from one snapshot; None for an older
        ledger opened read-only."""
        self.flush()
        if not self._counted:
            return None
        row = self.conn.execute("SELECT c.n, s.changes, s.format, s.bytes, s.mtime_ns, s.inode FROM ledger_changes c"
                                " LEFT JOIN results_stamp s ON s.id = 1").fetchone()
        return row[0], (None if row[1] is None else tuple(row[1:]))

    def record_results_stamp(self, changes: int, format: str, size: int, mtime_ns: int, inode: int) -> bool:
        """Record that results.jsonl, with this stat, held exactly the ledger at change count `changes` (in
        `format`); not recorded (False) when the ledger has changed since, in the same transaction."""
        with self._transaction() as conn:
            cursor = conn.execute("INSERT OR REPLACE INTO results_stamp (id, changes, format, bytes, mtime_ns, inode)"
                                  " SELECT 1, ?, ?, ?, ?, ? WHERE (SELECT n FROM ledger_changes) = ?",
                                  (changes, format, size, mtime_ns, inode, changes))
            return cursor.rowcount == 1

    def states(self) -> dict[str, str]:
        """Every job's state, by id, from memory (this process's view): a copy."""
        self._read_states()
        return dict(self._states)

    def ids_with_take(self) -> set[str]:
        """Ids of the jobs whose take is recorded (see `record_takes`)."""
        self.flush()
        return {r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE take IS NOT NULL")}

    def state_of(self, job_id: str) -> str | None:
        if self._states_unread:  # inline, not a call: asked once per job by a run's closing lines
            self._read_states()
        return self._states.get(job_id)

    def counts(self) -> dict[str, int]:
        """Jobs by state, from memory (this process's view)."""
        self._read_states()
        return {state: n for state, n in self._counts.items() if n}

    def spend(self) -> Spend:
        """Money committed in this output dir, by `spend.job_cost`'s rule (results.jsonl's `cost_usd`)."""
        self.flush()
        simulated = "simulated" if self._history else "0"  # an older ledger's: no sandbox then
        group_simulated = ", simulated" if self._history else ""  # (a number in GROUP BY names a column)
        # Summed by SQLite per kind of job, each kind counted or not by the one rule (`spend.job_cost`).
        return add_up_groups(self.conn.execute(
            f"SELECT state, submissions > 0, cost_usd IS NOT NULL, {simulated},"
            " TOTAL(COALESCE(cost_usd, estimated_cost_usd, 0.0)) FROM jobs"
            " WHERE submissions > 0 OR cost_usd IS NOT NULL"
            f" GROUP BY state, submissions > 0, cost_usd IS NOT NULL{group_simulated}"))

    def sent_to_sandbox(self) -> set[bool]:
        """For the jobs ever sent from this output dir: whether they went to the built-in sandbox (True),
        to an API (False), or both. Empty when nothing was sent."""
        self.flush()
        if not self._history:
            sent = self.conn.execute("SELECT 1 FROM jobs WHERE submissions > 0 LIMIT 1").fetchone()
            return {False} if sent else set()
        return {bool(r[0]) for r in self.conn.execute("SELECT DISTINCT simulated FROM jobs WHERE submissions > 0")}

    def spent_usd(self) -> float:
        """`spend()` in one figure, simulated money included: what a budget counts against."""
        return self.spend().total_usd

    # -- writing -------------------------------------------------------------------------------
    def add_pending(self, jobs: Iterable[tuple[str, str, dict, str, float]]) -> None:
        """Record jobs first seen in a manifest as `pending`: (id, model, input, input_sha256, estimate).

        A pending job whose input changed since is updated; a job that was ever sent is not touched.
        """
        now = utc_now()
        with self._transaction() as conn:
            for job_id, model, job_input, digest, estimate in jobs:
                conn.execute(
                    "INSERT INTO jobs (id, state, model, input_json, input_sha256, estimated_cost_usd, first_seen_at,"
                    " updated_at) VALUES (?, 'pending', ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                    " model=excluded.model, input_json=excluded.input_json, input_sha256=excluded.input_sha256,"
                    " estimated_cost_usd=excluded.estimated_cost_usd, updated_at=excluded.updated_at"
                    " WHERE jobs.state='pending' AND jobs.submissions=0 AND jobs.input_sha256 != excluded.input_sha256",
                    (job_id, model, json.dumps(job_input, sort_keys=True), digest, estimate, now, now),
                )
                if job_id not in self._states:
                    self._moved(job_id, "pending")

    def explain_pending(self, job_ids: Iterable[str], kind: str, message: str) -> None:
        """Say why jobs still `pending` were not submitted (the run stopped submitting for `kind`). A reason
        of their own (a preflight hold, a refused POST) is kept; one left by an earlier stop is replaced.
        Cleared by their next intent, like every error."""
        with self._transaction() as conn:
            conn.executemany("UPDATE jobs SET error_kind=?, error_message=?, updated_at=? WHERE id=? AND"
                             " state='pending' AND (error_kind IS NULL OR error_kind IN"
                             " ('budget', 'deadline', 'cancel', 'auth', 'unanswered'))",
                             [(kind, message, utc_now(), job_id) for job_id in job_ids])

    def set_refusals(self, refusals: dict[str, str]) -> None:
        """Record, for this run, which jobs the manifest asks for with an input they were not made with
        (id -> why); every other job's refusal is cleared."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET refusal=NULL WHERE refusal IS NOT NULL")
            conn.executemany("UPDATE jobs SET refusal=? WHERE id=?",
                             [(why, job_id) for job_id, why in refusals.items()])

    def update_input(self, job_id: str, job_input: dict, digest: str, estimate: float) -> None:
        """A job that never created anything remotely now asks for something else."""
        with self._transaction() as conn:
            conn.execute("UPDATE jobs SET input_json=?, input_sha256=?, estimated_cost_usd=?, updated_at=? WHERE id=?",
                         (json.dumps(job_input, sort_keys=True), digest, estimate, utc_now(), job_id))

    _SUBMITTING = (
        "UPDATE jobs SET state='submitting', submissions=submissions+1, submitted_at=?, request_id=NULL,"
        " error_kind=NULL, error_message=NULL, cost_usd=NULL, remote_status=NULL, started_at=NULL,"
        " finished_at=NULL, downloaded_at=NULL, output_urls=NULL, simulated=?, cost_flag=NULL, updated_at=?"
        " WHERE id=?")

    def mark_submitting(self, job_ids: list[str], *, simulated: bool = False) -> None:
        """The intent: durable before any of these POSTs is sent. An earlier request id stays in the
        job's request history (`JobRow.request_ids`). Commits (FULL) before returning, carrying any
        queued writes."""
        now = utc_now()
        with self._transaction(durable=True, carry=True) as conn:
            conn.executemany(self._SUBMITTING, [(now, int(simulated), now, job_id) for job_id in job_ids])
            conn.executemany("DELETE FROM outputs WHERE job_id=?", [(job_id,) for job_id in job_ids])
        for job_id in job_ids:
            self._moved(job_id, "submitting")

    def mark_submitting_soon(self, job_id: str, *, simulated: bool = False,
                             within: float = RIDE_SECONDS) -> asyncio.Future:
        """The intent of one job, queued to ride the next commit (at most `within` seconds away), which
        is then FULL: the returned future is done once it is on disk (or fails with LedgerWriteError).
        Send the POST only after awaiting it; if the job stops waiting first, call `withdraw_intent`.
        Needs `group_commits`."""
        assert self._loop is not None, "mark_submitting_soon needs group_commits()"
        before = self.state_of(job_id)
        if before in (None, "pending"):
            self._undo_intents.pop(job_id, None)  # one left by an earlier attempt of this run is not this one's
        else:
            self.flush()
            self._undo_intents[job_id] = tuple(self.conn.execute(
                f"SELECT state, {', '.join(self._UNDONE)} FROM jobs WHERE id=?", (job_id,)).fetchone())
        now = utc_now()
        statements = [(self._SUBMITTING, (now, int(simulated), now, job_id), False),
                      ("DELETE FROM outputs WHERE job_id=?", (job_id,), False)]
        self._queued.extend(statements)
        self._queued_intents[job_id] = (statements, before)
        waiter = self._loop.create_future()
        self._durable_waiters.append(waiter)
        self._moved(job_id, "submitting")
        self._schedule(within)
        return waiter

    # The columns the intent (`_SUBMITTING`) overwrites, besides `state` and `submissions`.
    _UNDONE = ("submitted_at", "request_id", "error_kind", "error_message", "cost_usd", "remote_status",
               "started_at", "finished_at", "downloaded_at", "output_urls", "simulated", "cost_flag")

    def _give_back(self, job_id: str, uncount: int) -> bool:
        """Queue (to commit at the end of this turn) the row the job had before its intent, if it was not
        `pending`, with `uncount` (0 or 1) taken off its submissions; False if there is none to give back."""
        row = self._undo_intents.pop(job_id, None)
        if row is None:
            return False
        assignments = ", ".join(f"{column}=?" for column in self._UNDONE)
        self._queue([(f"UPDATE jobs SET state=?, submissions=submissions-?, {assignments}, updated_at=? WHERE id=?"
                      " AND state='submitting'", (row[0], uncount, *row[1:], utc_now(), job_id), False)], soon=True)
        self._moved(job_id, row[0])
        return True

    def withdraw_intent(self, job_id: str, waiter: asyncio.Future | None) -> None:
        """The job will not send the POST its intent (`mark_submitting_soon`) was for. Still queued, the
        intent is dropped as if never made; already committed, the job gets back the state it had (a new
        job `pending`, a resubmitted one `unknown` with its error...) with the attempt uncounted, at the
        end of this turn: nothing was sent, so nothing is held back, and nothing is forgotten."""
        queued = self._queued_intents.pop(job_id, None)
        if queued is not None:
            self._undo_intents.pop(job_id, None)
            statements, before = queued
            self._queued = [s for s in self._queued if all(s is not mine for mine in statements)]
            self._durable_waiters = [w for w in self._durable_waiters if w is not waiter]
            if before is None:
                self._states.pop(job_id, None)
                self._counts["submitting"] -= 1
            else:
                self._moved(job_id, before)
            return
        self.mark_not_sent(job_id, None, None, reached_server=False)

    def mark_submitted(self, job_id: str, request_id: str) -> None:
        """Record the request id the API gave. Committed at once, or, while commits are grouped, by the
        commit at the end of this turn of the loop (see group commit above; if that commit fails, the log
        names this request id). Made durable against power loss by the next FULL commit: the next intent
        or the end of the run. Losing it leaves the job `submitting`, which the next run holds as
        `unknown`: it can cost a result to look up by hand, never a second payment. Forcing it to disk
        here would double the fsyncs of every job."""
        now = utc_now()
        self._undo_intents.pop(job_id, None)
        if self._loop is not None:
            self._queued_requests.append((job_id, request_id))
        self._queue([
            ("UPDATE jobs SET state='queued', request_id=?, remote_status='in_queue', updated_at=? WHERE id=?",
             (request_id, now, job_id), False),
            ("INSERT OR IGNORE INTO requests (job_id, request_id, submitted_at) SELECT id, request_id,"
             " submitted_at FROM jobs WHERE id=?", (job_id,), False),
        ], soon=True)
        self._moved(job_id, "queued")

    def adopt_request(self, job_id: str, request_id: str) -> None:
        """Attach a request found by `batchrun adopt`: the job becomes `queued` as if its POST's answer had
        arrived, and the request joins its history (a later intent clears `request_id`, never the history),
        in one durable transaction."""
        now = utc_now()
        with self._transaction(durable=True) as conn:
            conn.execute("UPDATE jobs SET state='queued', request_id=?, remote_status=NULL, error_kind=NULL,"
                         " error_message=NULL, updated_at=? WHERE id=?", (request_id, now, job_id))
            if self._history:
                conn.execute("INSERT OR IGNORE INTO requests (job_id, request_id, submitted_at) VALUES (?, ?, ?)",
                             (job_id, request_id, now))
        self._moved(job_id, "queued")

    def mark_not_sent(self, job_id: str, kind: str | None, message: str | None, *, reached_server: bool) -> None:
        """The POST certainly created no job: the job is back to what it was before this attempt (the
        attempt counts only if it was sent). A new job goes `pending` with this error (None: none); one
        resubmitted or retried on request gets its row back as it was, `unknown` or `failed`, so that no
        later run takes it for a job never sent: an earlier POST of it may have created a job (the error
        is in the log). Committed as `mark_submitted` is."""
        if self._give_back(job_id, 0 if reached_server else 1):
            return
        self._queue([(
            "UPDATE jobs SET state='pending', submissions=submissions-?, error_kind=?, error_message=?,"
            " updated_at=? WHERE id=?", (0 if reached_server else 1, kind, message, utc_now(), job_id), False)],
            soon=True)
        self._moved(job_id, "pending")

    def set_state(self, job_id: str, state: str, *, error: tuple[str, str] | None = None,
                  clear_error: bool = False, **fields: Any) -> None:
        """Move a job to `state`, optionally recording an error and other columns."""
        assert state in STATES, state
        columns = {"state": state, "updated_at": utc_now(), **fields}
        if error is not None:
            columns["error_kind"], columns["error_message"] = error
        elif clear_error:
            columns["error_kind"] = columns["error_message"] = None
        if "output_urls" in columns:
            columns["output_urls"] = json.dumps(columns["output_urls"])
        assignments = ", ".join(f"{name}=?" for name in columns)
        self._queue([(f"UPDATE jobs SET {assignments} WHERE id=?", (*columns.values(), job_id), False)])
        self._moved(job_id, state)

    def set_error(self, job_id: str, kind: str, message: str) -> None:
        """Record why a job is stuck, leaving its state as it is."""
        self._queue([("UPDATE jobs SET error_kind=?, error_message=?, updated_at=? WHERE id=?",
                      (kind, message, utc_now(), job_id), False)])

    def record_remote(self, job_id: str, remote_status: str, state: str, *, started: bool) -> None:
        """A poll answer: keep the raw status, and the first time the job was seen running."""
        now = utc_now()
        self._queue([(
            "UPDATE jobs SET remote_status=?, state=?, started_at=CASE WHEN ? AND started_at IS NULL THEN ?"
            " ELSE started_at END, updated_at=? WHERE id=?", (remote_status, state, started, now, now, job_id), False)])
        self._moved(job_id, state)

    def mark_done(self, job_id: str, outputs: list[Output]) -> None:
        """Every output is in place, verified and durable: record them and the job as `done`, together."""
        now = utc_now()
        self._queue([
            ("DELETE FROM outputs WHERE job_id=?", (job_id,), False),
            ("INSERT INTO outputs (job_id, idx, path, bytes, sha256, mtime_ns, inode) VALUES (?, ?, ?, ?, ?, ?, ?)",
             [(job_id, o.idx, o.path, o.bytes, o.sha256, o.mtime_ns, o.inode) for o in outputs], True),
            ("UPDATE jobs SET state='done', downloaded_at=?, error_kind=NULL, error_message=NULL,"
             " updated_at=? WHERE id=?", (now, now, job_id), False),
        ])
        self._moved(job_id, "done")

    def record_file_stats(self, stats: Iterable[tuple[str, int, int, int]]) -> None:
        """Record (job id, output idx, mtime_ns, inode) of done files found intact by a full hash, so the
        next check of each is a stat (batchrun.filecheck). The file's size and sha256 stay as recorded."""
        stats = list(stats)
        if not stats:
            return
        with self._transaction() as conn:
            conn.executemany("UPDATE outputs SET mtime_ns=?, inode=? WHERE job_id=? AND idx=?",
                             [(mtime_ns, inode, job_id, idx) for job_id, idx, mtime_ns, inode in stats])

    def provenance_stats(self) -> dict[str, tuple[str, int, int, int]]:
        """job id -> (identity, bytes, mtime_ns, inode) of its `<id>.json` when it was last found intact
        (see `results.provenance_check`); empty for a ledger older than schema 7. One query."""
        self.flush()
        if not self._file_stats:
            return {}
        return {r[0]: tuple(r[1:]) for r in self.conn.execute(
            "SELECT job_id, identity, bytes, mtime_ns, inode FROM provenance_files")}

    def record_provenance_stats(self, stats: Iterable[tuple[str, str, int, int, int]]) -> None:
        """Record (job id, identity, bytes, mtime_ns, inode) of `<id>.json` files found intact."""
        stats = list(stats)
        if not stats:
            return
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO provenance_files (job_id, identity, bytes, mtime_ns, inode)"
                             " VALUES (?, ?, ?, ?, ?)", stats)

    def cost_of(self, job_id: str) -> float | None:
        """The cost the API reported for this job, if it did."""
        self.flush()
        row = self.conn.execute("SELECT cost_usd FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else row[0]

    # -- takes and review ------------------------------------------------------------------------
    def record_takes(self, takes: dict[str, tuple[int, str]]) -> None:
        """Record which take of which input each job is: {id: (take, take_of)}, for takes 2 and up."""
        with self._transaction() as conn:
            conn.executemany("UPDATE jobs SET take=?, take_of=? WHERE id=? AND take IS NULL",
                             [(take, take_of, job_id) for job_id, (take, take_of) in takes.items()])

    def rerolls(self) -> list[tuple[str, str, int]]:
        """Takes asked for with `batchrun reroll`: (id, take_of, take), oldest first."""
        self.flush()
        if not self._has_table("rerolls"):
            return []
        return [tuple(r) for r in self.conn.execute("SELECT id, take_of, take FROM rerolls ORDER BY rowid")]

    def add_rerolls(self, choose: Callable[[set[str]], list[tuple[str, str, int]]]) -> list[tuple[str, str, int]]:
        """Record re-rolled takes, (id, take_of, take) as `choose(taken ids)` picks them, in one write
        transaction: the ids already taken (jobs and earlier re-rolls) are read inside it, so re-rolls asked
        at the same time by several processes never pick the same take and are never lost."""
        now = utc_now()
        with self._transaction(durable=True) as conn:
            taken = {r[0] for r in conn.execute("SELECT id FROM jobs")}
            if self._has_table("rerolls"):
                taken |= {r[0] for r in conn.execute("SELECT id FROM rerolls")}
            made = choose(taken)
            conn.executemany("INSERT INTO rerolls (id, take_of, take, requested_at) VALUES (?, ?, ?, ?)",
                             [(*r, now) for r in made])
        return made

    def set_decision(self, job_id: str, **changes: object) -> JobRow:
        """Set any of `decision` (DECISIONS or None), `rating` (1-5 or None), `note` (text or None) of a
        job, committed before returning; returns the job. Raises LedgerError for an unknown job or value."""
        allowed = {"decision", "rating", "note"}
        if not changes or set(changes) - allowed:
            raise LedgerError(f"a decision sets {', '.join(sorted(allowed))}, not {sorted(set(changes) - allowed)}")
        decision, rating, note = changes.get("decision"), changes.get("rating"), changes.get("note")
        if "decision" in changes and decision is not None and decision not in DECISIONS:
            raise LedgerError(f"decision must be one of {', '.join(DECISIONS)} or null, not {decision!r}")
        if "rating" in changes and rating is not None and (
                isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            raise LedgerError(f"rating must be 1 to 5 or null, not {rating!r}")
        if "note" in changes and note is not None and (not isinstance(note, str) or len(note) > 10_000):
            raise LedgerError("note must be text of at most 10,000 characters")
        with self._transaction() as conn:
            sets = ", ".join(f"{k}=?" for k in changes)
            cursor = conn.execute(f"UPDATE jobs SET {sets}, decided_at=? WHERE id=?",
                                  (*changes.values(), utc_now(), job_id))
            if cursor.rowcount != 1:
                raise LedgerError(f"no job {job_id!r} in this ledger")
        row = self.get(job_id)
        assert row is not None
        return row

    def without_media(self) -> list[tuple[str, str]]:
        """(id, path of its first output) of the done jobs whose media facts were never read."""
        self.flush()
        return [tuple(r) for r in self.conn.execute(
            "SELECT j.id, o.path FROM jobs j JOIN outputs o ON o.job_id = j.id "
            "AND o.idx = (SELECT MIN(idx) FROM outputs WHERE job_id = j.id) "
            "WHERE j.state = 'done' AND j.media_json IS NULL ORDER BY j.rowid")]

    def set_media(self, job_id: str, facts: dict[str, Any]) -> None:
        """Record the facts read from a job's video (queued while commits are grouped)."""
        self._queue([("UPDATE jobs SET media_json=? WHERE id=?", (json.dumps(facts), job_id), False)])

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() \
            is not None

    # -- preflight cache -------------------------------------------------------------------------
    PREFLIGHT_FIELDS = ("url", "ok", "problem", "content_type", "bytes", "width", "height")

    def preflight_cache(self) -> list[dict[str, Any]]:
        """Image URLs that passed preflight before (failures are checked again: the host may be fixed)."""
        self.flush()
        columns = ", ".join(self.PREFLIGHT_FIELDS)
        rows = self.conn.execute(f"SELECT {columns} FROM preflight WHERE ok=1")
        return [dict(zip(self.PREFLIGHT_FIELDS, row, strict=True)) for row in rows]

    def save_preflight(self, checks: Iterable[dict[str, Any]]) -> None:
        now = utc_now()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO preflight (url, ok, problem, content_type, bytes, width, height, checked_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*(c[f] for f in self.PREFLIGHT_FIELDS), now) for c in checks],
            )

    # -- runs ----------------------------------------------------------------------------------
    def start_run(self) -> int:
        with self._transaction() as conn:
            cursor = conn.execute("INSERT INTO runs (pid, started_at) VALUES (?, ?)", (os.getpid(), utc_now()))
            return int(cursor.lastrowid)

    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        with self._transaction(durable=True) as conn:
            conn.execute("UPDATE runs SET finished_at=?, exit_code=?, summary=? WHERE id=?",
                         (utc_now(), exit_code, json.dumps(summary), run_id))

    def runs(self) -> list[dict[str, Any]]:
        self.flush()
        return [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY id")]

