"""The exceptions batchrun raises, and what each one means for a run.

    BatchrunError                   anything batchrun reports to the user as one readable message
    ├── UsageError                  bad flag or argument (exit 2)
    ├── ManifestError               the manifest is invalid; carries every Problem found (exit 2)
    ├── LedgerError                 the ledger is corrupt, truncated or from a newer batchrun
    ├── OutputDirLocked             another run holds this output directory (exit 75)
    ├── ApiError                    the API answered with an error, or could not be reached
    │   ├── TransientApiError       worth retrying: connection failure, timeout, 408, 429, 5xx
    │   │   └── MalformedAnswer     an answer batchrun cannot read (bad JSON, unusable fields)
    │   ├── AuthError               token or balance problem: stop submitting (exit 3)
    │   ├── InvalidRequestError     the API rejected the input (400/422): retrying cannot help
    │   └── RequestNotFound         the request id is unknown or expired (404)
    ├── SubmitOutcomeUnknown        a POST was sent and may or may not have created a job
    └── DownloadError               a video could not be fetched or stored
        ├── DownloadInterrupted     the transfer stopped part-way: retry later, the .part is resumed
        ├── OutputUrlExpired        the storage host refused the URL (403/404): refresh it from the result
        │   └── OutputNotMedia      it sent something that is not the model's media (an error page): the same
        ├── OutputUrlRefused        the URL (or a redirect) points at a loopback/private address: not fetched
        ├── DownloadTooLarge        over the size cap
        └── DiskFull                no space left: stop the run, mark nothing done

Messages never contain the API token: the client never puts request headers into an error, and a
`Problem` passes its text through `batchrun.echo` (token redacted, control characters escaped, capped).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchrun import echo


class BatchrunError(Exception):
    """Base of every error batchrun reports as a message rather than a traceback."""


class UsageError(BatchrunError):
    """A flag, argument or path given on the command line is wrong."""


MAX_FILE_SHOWN, MAX_WHERE_SHOWN, MAX_MESSAGE_SHOWN = 400, 200, 600  # characters


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as we can.

    `where` is the job-relative path such as ``jobs[3] (id=harbor).duration``; `line` and `column`
    are 1-based. `severity` is "error" or "warning".
    """

    file: str
    line: int
    column: int
    where: str
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        # Each part may carry text from an input file (a key, a cell, a path written in the manifest): the
        # last line of defence whatever the message's author quoted, and why these caps exist.
        for name, limit in (("file", MAX_FILE_SHOWN), ("where", MAX_WHERE_SHOWN), ("message", MAX_MESSAGE_SHOWN)):
            object.__setattr__(self, name, echo.plain(getattr(self, name), limit))

    def __str__(self) -> str:
        prefix = "warning: " if self.severity == "warning" else ""
        where = f" {self.where}:" if self.where else ""
        return f"{self.file}:{self.line}:{self.column}:{where} {prefix}{self.message}"


class ManifestError(BatchrunError):
    """The manifest cannot be used. `problems` lists every error found, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems[:1]) or "invalid manifest")


class LedgerError(BatchrunError):
    """The ledger cannot be opened safely; it is left untouched."""


class OutputDirLocked(BatchrunError):
    """Another batchrun process holds the output directory's lock."""

    def __init__(self, path: str, pid: int | None):
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is in use by {holder}; wait for that run to finish")


class ApiError(BatchrunError):
    """An error answer from the API, or no answer at all.

    `status` is the HTTP status (None when no answer arrived), `code` RunComfy's numeric
    `error_code` when the body had one, `retry_after` seconds the server asked us to wait.
    """

    kind = "api"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        retry_after: float | None = None,
    ):
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.message = message
        super().__init__(message)


class TransientApiError(ApiError):
    """Retrying later may succeed: connection failure, timeout, 408, 429, 5xx."""

    kind = "transient"

    def __init__(self, message: str, *, connected: bool = True, refused: bool | None = None, **kwargs):
        # connected=False means the request never reached the server, so a POST could not
        # have created a job and may be retried safely. refused=True means the server answered
        # that it did not take the request on: by default any 4xx answer (408, 429...).
        self.connected = connected
        super().__init__(message, **kwargs)
        status = self.status
        self.refused = refused if refused is not None else status is not None and 400 <= status < 500


class MalformedAnswer(TransientApiError):
    """The API answered something batchrun cannot read: not JSON, nested too deep, too large, or a
    field that cannot be used (a request id that is not one, an output URL that is not a URL).

    Retried like a transient failure, then recorded on the job; never raised for a submit, whose
    unreadable answer may have created a job (`SubmitOutcomeUnknown`)."""

    kind = "malformed"


class AuthError(ApiError):
    """The token is missing, invalid or revoked, or the balance is exhausted."""

    kind = "auth"


class InvalidRequestError(ApiError):
    """The API refused the request's content (validation, unknown model)."""

    kind = "invalid"


class RequestNotFound(ApiError):
    """The API does not know this request id (nonexistent, deleted or expired)."""

    kind = "not_found"


class SubmitOutcomeUnknown(BatchrunError):
    """A POST was sent but its answer was lost or unusable: a job may exist remotely."""

    kind = "unknown"


class DownloadError(BatchrunError):
    """A video could not be downloaded or stored."""

    kind = "download"


class DownloadInterrupted(DownloadError):
    """The transfer stopped part-way (connection lost, timeout, short body, 408/429/5xx).

    Retrying later may succeed; the partial file is kept and the next attempt resumes it.
    `retry_after` is the seconds the server asked us to wait, if it said.
    """

    kind = "interrupted"

    def __init__(self, message: str, *, retry_after: float | None = None):
        self.retry_after = retry_after
        super().__init__(message)


class OutputUrlExpired(DownloadError):
    """The storage host refused the output URL; the result call gives a fresh one."""

    kind = "url_expired"


class OutputNotMedia(OutputUrlExpired):
    """The storage host answered with bytes that are not the media the model makes (a "link expired" page,
    JSON, an empty body), whatever its status and Content-Type said. Nothing is kept; refreshed like an
    expired URL."""

    kind = "not_media"


class OutputUrlRefused(DownloadError):
    """An output URL, or a redirect from it, points at a loopback, private, link-local or unspecified address
    while the API is public, or is not http(s): it is not fetched."""

    kind = "url_refused"


class DownloadTooLarge(DownloadError):
    kind = "too_large"


class DiskFull(DownloadError):
    """No space left on the output device."""

    kind = "disk_full"
