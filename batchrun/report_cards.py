"""What the report knows of one job, and its card: video, start image, prompt, facts, error.

Every piece of job text comes from a manifest or from the API, so all of it goes through `esc` (the
standard library's `html.escape`), attribute values included; URLs are checked for their scheme first.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from batchrun import mediafacts, startimages
from batchrun.ledger import JobRow
from batchrun.report_timeline import JobTimes, esc
from batchrun.spend import job_cost

DEFAULT_DURATION = 10  # the model's default when a job's input has no `duration`
PROMPT_PREVIEW = 160  # characters of a prompt shown before "more"
INLINE_IMAGE_BUDGET = 16_000_000  # characters of data: URIs embedded in one report, all cards together


@functools.cache
def known_models() -> dict[str, Any]:
    """The registry (shipped and user models), read once per process; empty if a user file is broken, so a
    report is still written (durations then come from the input)."""
    from batchrun.models import all_models

    try:
        return all_models(missing_ok=True)
    except Exception:  # noqa: BLE001 - a broken model file must not stop a report of paid results
        return {}


# The element a browser shows an output file with, by the extension batchrun saved it under.
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif", ".heic", ".heif"}
_AUDIO_SUFFIXES = {".wav", ".mp3", ".m4a", ".aac", ".ogg", ".oga", ".flac"}


def media_element(path: str, poster_attr: str = "") -> str:
    """`<img>`, `<audio>` or `<video>` for an output file (a relative path, quoted and escaped here)."""
    src = esc(quote(path))
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return f'<img loading="lazy" alt="{esc(path)}" src="{src}">'
    if suffix in _AUDIO_SUFFIXES:
        return f'<audio controls preload="none" src="{src}"></audio>'
    return f'<video controls preload="none" playsinline{poster_attr} src="{src}"></video>'


# -- reading the ledger ---------------------------------------------------------------------------
_FRACTION = re.compile(r"\.(\d+)")


def parse_time(text: str | None) -> datetime | None:
    """ISO 8601 as the ledger writes it (`Z` or `+00:00`, 3 or 6 decimals); None if absent or unreadable.

    Python 3.10's `fromisoformat` takes neither `Z` nor other decimal counts, hence the normalising."""
    if not text:
        return None
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


@dataclass(frozen=True)
class Job:
    """A ledger row with the derived figures the page shows."""

    row: JobRow
    order: int
    submitted: datetime | None
    started: datetime | None
    finished: datetime | None
    downloaded: datetime | None

    @classmethod
    def of(cls, row: JobRow, order: int) -> Job:
        return cls(row, order, parse_time(row.submitted_at), parse_time(row.started_at),
                   parse_time(row.finished_at), parse_time(row.downloaded_at))

    @property
    def queue_wait(self) -> float | None:
        return seconds_between(self.submitted, self.started)

    @property
    def render_time(self) -> float | None:
        return seconds_between(self.started, self.finished)

    @property
    def video_seconds(self) -> float:
        """Seconds of output asked for, by the job's own model's duration field (0 when it has none, or
        "auto"); the input's `duration` for a model batchrun does not know."""
        model = known_models().get(self.row.model)
        if model is not None:
            return model.video_seconds(self.row.input)
        try:
            return float(self.row.input.get("duration", DEFAULT_DURATION))
        except (TypeError, ValueError):
            return float(DEFAULT_DURATION)

    @property
    def output_kind(self) -> str:
        model = known_models().get(self.row.model)
        return model.output_kind if model is not None else "video"

    @property
    def cost(self) -> tuple[float | None, str | None]:
        """(usd, "api" | "estimate"): the same rule as results.jsonl — the API's figure when it gave one,
        else the estimate for jobs that were charged (sent and not failed), else unknown."""
        row = self.row
        return job_cost(row.state, row.submissions, row.cost_usd, row.estimated_cost_usd)

    def times(self) -> JobTimes:
        def epoch(moment: datetime | None) -> float | None:
            return moment.timestamp() if moment else None

        return JobTimes(self.row.id, self.row.state, epoch(self.submitted), epoch(self.started),
                        epoch(self.finished), epoch(self.downloaded))


# -- formatting -----------------------------------------------------------------------------------
def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 100:
        return f"{value:.1f} s"
    minutes, secs = divmod(int(round(value)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def fmt_usd(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


# -- cards ----------------------------------------------------------------------------------------
class ImageBudget:
    """Inline (data:) start images are embedded until this report has used its share of bytes."""

    def __init__(self, chars: int = INLINE_IMAGE_BUDGET):
        self.left = chars

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True


class Files:
    """Which regular files (or links to one, as `Path.is_file` counts them) the output dir `root` holds:
    each folder is listed once, when first asked about. A page asks about each job's video and poster, a
    stat each, two system calls per job; a listing reads a folder's names a few hundred per call."""

    def __init__(self, root: Path):
        self.root = root
        self._listed: dict[str, set[str] | None] = {}

    def has(self, relative: str) -> bool:
        """Whether the file `relative` (a relative POSIX path under `root`) is there."""
        path = PurePosixPath(relative)
        folder = str(path.parent)
        if folder not in self._listed:
            self._listed[folder] = self._list(self.root / folder)
        names = self._listed[folder]
        if names is None:  # a folder that cannot be listed: ask about the file itself
            try:
                return (self.root / relative).is_file()
            except OSError:  # not even that (a folder without search permission): not shown
                return False
        return path.name in names

    @staticmethod
    def _list(folder: Path) -> set[str] | None:
        try:
            with os.scandir(folder) as entries:
                return {entry.name for entry in entries if _is_file(entry)}
        except FileNotFoundError:
            return set()
        except OSError:
            return None


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()  # no system call for a regular file (the listing's type); a link is followed
    except OSError:
        return False


def image_src(value: Any, budget: ImageBudget, files: Files | None = None) -> tuple[str | None, str]:
    """A URL the page can show a start image from, or None and what to say instead.

    A local path as written in a manifest is relative to the manifest's folder, not to the output dir
    where the page lives: the run's copy of it (`startimages`) is shown when the output dir (`files`)
    holds one."""
    if not isinstance(value, str) or not value.strip():
        return None, "no start image"
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("http", "https", "file"):
        return value, ""
    if scheme == "data":
        if value[5:11].lower() != "image/":
            return None, "inline data that is not an image"
        return (value, "") if budget.take(len(value)) else (None, "inline image left out to keep the page small")
    if len(scheme) > 1:  # javascript: and friends; a single letter is a Windows drive
        return None, f"{scheme}: URL not shown"
    if files is not None and files.has(startimages.copy_name(value)):
        return quote(startimages.copy_name(value)), ""
    path = Path(value)
    if files is not None and not path.is_absolute():
        return None, f"local image {value} (not copied into this folder: run 'batchrun report MANIFEST')"
    return (path.as_uri() if path.is_absolute() else quote(value)), ""


def _start_image(job: Job, budget: ImageBudget, files: Files) -> str:
    src, why = image_src(job.row.input.get("start_image_url"), budget, files)
    if src is not None:
        return f'<img loading="lazy" decoding="async" src="{esc(src)}" alt="start image of {esc(job.row.id)}">'
    return f'<div class="ph">{esc(why)}</div>'


def _relative(path: str) -> bool:
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and ":" not in pure.parts[0]


def _media(job: Job, files: Files) -> str:
    row = job.row
    present = [o for o in row.outputs if _relative(o.path) and files.has(o.path)]
    missing = [o.path for o in row.outputs if o not in present]
    if not present:
        if missing:
            text = f"file missing: {', '.join(missing)} (the next run downloads it again)"
        elif row.state == "done":
            text = "no video file recorded"
        else:
            text = f"no video ({row.state})"
        return f'<div class="media"><div class="none">{esc(text)}</div></div>'
    first, *others = present
    poster = mediafacts.poster_path(row.id)
    poster_attr = f' poster="{esc(quote(poster))}"' if files.has(poster) else ""
    html = [f'<div class="media">{media_element(first.path, poster_attr)}</div>']
    if others or missing:
        links = " ".join(f'<a href="{esc(quote(o.path))}">{esc(o.path)}</a>' for o in others)
        gone = f" missing: {esc(', '.join(missing))}" if missing else ""
        html.append(f'<div class="extra">also: {links}{gone}</div>')
    return "".join(html)


def _prompt(job: Job) -> str:
    text = str(job.row.input.get("prompt") or "")
    shots = job.row.input.get("multi_prompt") or []
    parts = []
    if len(text) <= PROMPT_PREVIEW:
        parts.append(f'<p class="prompt">{esc(text)}</p>')
    else:
        short = text[:PROMPT_PREVIEW].rsplit(" ", 1)[0] + "…"
        parts.append(f'<details class="prompt"><summary><span class="short">{esc(short)}</span> '
                     f'<span class="more">(full prompt)</span></summary><p class="prompt">{esc(text)}</p></details>')
    if isinstance(shots, list) and shots:
        items = "".join(f"<li>{esc(s.get('prompt', ''))} <span class='mono'>{esc(s.get('duration', ''))} s</span></li>"
                        if isinstance(s, dict) else f"<li>{esc(s)}</li>" for s in shots)
        parts.append(f'<details class="prompt"><summary>{len(shots)} shots</summary><ol class="shots">{items}</ol>'
                     "</details>")
    return "".join(parts)


def _facts(job: Job) -> str:
    row = job.row
    usd, source = job.cost
    cost = fmt_usd(usd) + (" (estimate)" if source == "estimate" else "") + (" simulated" if row.simulated else "")
    audio = row.input.get("generate_audio")
    facts = [("model", row.model)]
    if job.output_kind != "image":
        seconds = job.video_seconds
        facts.append(("duration", (f"{seconds:g} s" if seconds else "set by the model")
                      + (", with audio" if audio else "")))
    facts += [("cost", cost), ("queue wait", fmt_seconds(job.queue_wait)), ("render", fmt_seconds(job.render_time))]
    if row.media:
        facts.append(("file", mediafacts.describe(row.media, job.output_kind)))
    if row.submissions > 1:
        facts.append(("submissions", str(row.submissions)))
    facts.append(("request id", row.request_id or "—"))
    if row.earlier_request_ids:
        facts.append(("earlier requests", ", ".join(row.earlier_request_ids)))
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>"


def _review(row: JobRow, gone: bool) -> str:
    """The reviewer's decision, rating and note (read-only here; made in `batchrun review`)."""
    badges = ""
    if row.take and row.take > 1:
        badges += f'<span class="badge take">take {row.take}</span>'
    if row.decision:
        badges += f'<span class="badge {esc(row.decision)}">{esc(row.decision)}</span>'
    if row.rating:
        badges += f'<span class="badge rating" title="rating {row.rating} of 5">{"★" * row.rating}</span>'
    if gone:
        badges += '<span class="badge gone" title="this job is no longer in the manifest">not in the manifest</span>'
    return badges


def card_html(job: Job, files: Files, budget: ImageBudget, gone: bool = False) -> str:
    row = job.row
    usd, _ = job.cost
    render = job.render_time
    error = (f'<p class="error"><b>{esc(row.error_kind)}</b>: {esc(row.error_message or "")}</p>'
             if row.error_kind else "")
    if job.output_kind == "video":  # asked duration and audio track: what a video was paid for
        error += "".join(f'<p class="error flag">{esc(flag)}</p>' for flag in mediafacts.flags(row.media, row.input))
    return (f'<article class="card {esc(row.state)}" id="card-{esc(row.id)}" data-state="{esc(row.state)}" '
            f'data-order="{job.order}" data-id="{esc(row.id)}" data-decision="{esc(row.decision or "")}" '
            f'data-gone="{str(gone).lower()}" data-cost="{"" if usd is None else f"{usd:.6f}"}" '
            f'data-render="{"" if render is None else f"{render:.3f}"}">'
            f"{_media(job, files)}"
            f'<div class="body"><div class="head"><h3>{esc(row.id)}</h3>'
            f'<span class="badge {esc(row.state)}">{esc(row.state)}</span>{_review(row, gone)}</div>'
            f'<div class="start">{_start_image(job, budget, files)}<div>{_prompt(job)}</div></div>'
            + (f'<p class="note">{esc(row.note)}</p>' if row.note else "")
            + f"{error}{_facts(job)}</div></article>")

