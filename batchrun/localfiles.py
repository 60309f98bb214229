"""Local image files named in a manifest: checked when it is loaded, hashed into the job's input digest,
and sent inline as `data:` URIs when the job is submitted.

An image field whose value is neither a URL nor a `data:` URI is a path relative to the manifest's folder
(`..` may lead out of it; absolute paths work too). RunComfy has no upload call; its own clients send
images inline as `data:<mime>;base64,...`, at most 6 MiB each, which is the cap applied here.

A job's `input` keeps the path as written (the ledger stores it, not megabytes of base64), while its
input digest covers the file's bytes: `hashed_input` puts ``{"file": <path as written>, "sha256": ...}``
in place of each path, so editing an image counts as changing the job. `inline_input` builds what is
sent, reading each file again and refusing one that changed since the manifest was loaded.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchrun import echo, imageinfo
from batchrun.errors import BatchrunError
from batchrun.inputfile import NotARegularFile, read_regular

MAX_INLINE_BYTES = 6 * 1024 * 1024
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # RunComfy's own clients cap a whole request at 64 MiB
_LOOKS_LIKE_HOST = re.compile(r"(?:www\.)?[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}/")


class LocalFileError(BatchrunError):
    """A local image cannot be sent as loaded: it vanished, changed or grew since the manifest was loaded.

    Nothing was sent for the job; loading the manifest again gives the job its new input digest.
    """


@dataclass(frozen=True)
class LocalImage:
    """One local image file as checked at load time. `problems` is empty when it can be sent."""

    written: str  # the path as written in the manifest
    path: Path  # absolute, symlinks resolved
    sha256: str | None = None
    mime: str | None = None
    size: int | None = None
    width: int | None = None
    height: int | None = None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


class LocalImages:
    """Checks image paths relative to one folder, reading each distinct file once per load."""

    def __init__(self, base: Path):
        self.base = base
        self._by_written: dict[str, LocalImage] = {}
        # Per file, its facts with problems and warnings phrased to follow the file's name.
        self._by_path: dict[Path, tuple[LocalImage, tuple[str, ...], tuple[str, ...]]] = {}

    def check(self, written: str) -> LocalImage:
        """The facts about the file `written` names; problems are phrased "'<as written>' is ..."."""
        found = self._by_written.get(written)
        if found is None:
            found = self._by_written[written] = self._check(written)
        return found

    def _check(self, written: str) -> LocalImage:
        if not written.strip():
            return LocalImage(written, self.base, problems=("is empty: give an https:// URL or an image file's path",))
        shown = echo.quoted(written)
        if "\0" in written:
            return LocalImage(written, self.base, problems=(f"{shown} is not a valid file path",))
        try:
            path = (self.base / written).resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            return LocalImage(written, self.base / written, problems=(f"{shown} cannot be read: {exc}",))
        if path not in self._by_path:
            self._by_path[path] = _read(path)
        facts, problems, warnings = self._by_path[path]
        if facts.size is None and problems[0].startswith("does not exist") and _LOOKS_LIKE_HOST.match(written):
            problems = (problems[0] + f"; for a web address write https://{written}",)
        return dataclasses.replace(facts, written=written, problems=tuple(f"{shown} {p}" for p in problems),
                                   warnings=tuple(f"{shown} {w}" for w in warnings))


def _read(path: Path) -> tuple[LocalImage, tuple[str, ...], tuple[str, ...]]:
    """What one file is, with problems and warnings as predicates ("is a folder, ...")."""
    bare = LocalImage("", path)
    try:
        data, stated = read_regular(path, MAX_INLINE_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return bare, (f"does not exist (looked for {path}; image paths are relative to the manifest's folder)",), ()
    except NotARegularFile as exc:
        if exc.folder:
            return bare, (f"is a folder, not an image file ({path})",), ()
        return bare, (f"{exc} ({path})",), ()
    except OSError as exc:
        return bare, (f"cannot be read: {exc.strerror or exc} ({path})",), ()
    problems, warnings = [], []
    if len(data) > MAX_INLINE_BYTES:
        size = max(stated, len(data))
        problems.append(f"is {_mib(size)}; an image sent inline is limited to {MAX_INLINE_BYTES // 2**20} MiB: "
                        "make it smaller or give an https:// URL instead")
        facts = imageinfo.inspect(data[: imageinfo.HEADER_BYTES])
        digest = None
    else:
        size = len(data)
        facts = imageinfo.inspect(data)
        digest = hashlib.sha256(data).hexdigest()
    problems.extend(imageinfo.format_problems(facts))  # size limits are the model's: batchrun.schema
    if facts.accepted and facts.width is None:
        warnings.append(f"looks like a {facts.format} file but its header cannot be read (damaged?); "
                        "its size could not be checked against Kling's limits")
    image = LocalImage("", path, digest, facts.mime, size, facts.width, facts.height)
    return image, tuple(problems), tuple(warnings)


def inline_size(refs: tuple[tuple[tuple, LocalImage], ...]) -> int:
    """How many bytes the job's local images take in the request, as base64 `data:` URIs."""
    return sum(len(f"data:{image.mime};base64,") + (image.size or 0) * 4 // 3 + 4 for _, image in refs)


def replace_at(value: Any, path: tuple, new: Any) -> Any:
    """A copy of `value` with the item at `path` replaced; containers off the path are shared, not copied."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = replace_at(value[head], rest, new)
    return copy


def hashed_input(job_input: dict[str, Any], refs: tuple[tuple[tuple, LocalImage], ...]) -> dict[str, Any]:
    """The input as digested: each local path replaced by ``{"file": <as written>, "sha256": <of its bytes>}``."""
    for path, image in refs:
        job_input = replace_at(job_input, path, {"file": image.written, "sha256": image.sha256})
    return job_input


def data_uri(image: LocalImage) -> str:
    """The file as a `data:` URI, read now; LocalFileError if it is no longer the file that was loaded."""
    try:
        data, _ = read_regular(image.path, MAX_INLINE_BYTES)
    except NotARegularFile as exc:
        raise LocalFileError(f"{image.path} {exc}; nothing was sent for this job") from None
    except OSError as exc:
        raise LocalFileError(f"cannot read {image.path}: {exc.strerror or exc}") from None
    if len(data) > MAX_INLINE_BYTES or hashlib.sha256(data).hexdigest() != image.sha256:
        raise LocalFileError(f"{image.path} changed since the manifest was loaded; nothing was sent for this "
                             "job: run again to submit it with the new image")
    return f"data:{image.mime};base64,{base64.b64encode(data).decode('ascii')}"


def inline_input(job_input: dict[str, Any], refs: tuple[tuple[tuple, LocalImage], ...]) -> dict[str, Any]:
    """The input to send: each local path replaced by its file's `data:` URI."""
    for path, image in refs:
        job_input = replace_at(job_input, path, data_uri(image))
    return job_input
