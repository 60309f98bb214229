"""`report.html`: a self-contained page to review a batch — summary, timeline, one card per job.

The page must work from `file://`, offline, and after the output folder is zipped and sent on, so
everything is inline and videos are linked by relative paths. Job text (prompts, errors, ids, URLs)
comes from manifests and from the API: every piece of it is escaped with `html.escape` (see
report_cards), and none of it is ever placed inside a `<script>`. A Content-Security-Policy pinned
to the hashes of our own style and script backs that up should anything slip through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batchrun.crashpoints import crashpoint
from batchrun.fsutil import atomic_write
from batchrun.ledger import STATES, JobRow, Ledger
from batchrun.report_assets import CSS, JS
from batchrun.report_cards import Files, ImageBudget, Job, card_html, fmt_seconds, fmt_usd, parse_time, seconds_between
from batchrun.report_timeline import JobTimes, esc, timeline_svg
from batchrun.spend import add_up

REPORT_NAME = "report.html"


def write_report(output_dir: Path, listed: set[str] | None = None) -> Path:
    """Write `<output_dir>/report.html` from the ledger (read-only, safe during a run); return its path.

    `listed`: the ids of the manifest's jobs, when known; ledger jobs not among them are marked."""
    output_dir = Path(output_dir)
    ledger = Ledger.open(output_dir, create=False, readonly=True)
    try:
        rows, runs = ledger.all(), ledger.runs()
    finally:
        ledger.close()
    page = render(output_dir, rows, runs, datetime.now(timezone.utc), listed)
    path = output_dir / REPORT_NAME
    # Not fsynced: the report can always be rebuilt from the ledger.
    atomic_write(path, page.encode("utf-8"), durable=False, before_rename=lambda: crashpoint("report_rewrite"))
    return path


def _median(values: list[float | None]) -> tuple[float | None, int]:
    known = [v for v in values if v is not None]
    return (statistics.median(known) if known else None), len(known)


def _tile(key: str, value: str, note: str = "") -> str:
    return (f'<div class="tile"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
            f'<div class="n">{esc(note)}</div></div>')


def fmt_video(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 100 else fmt_seconds(seconds)


# -- summary --------------------------------------------------------------------------------------
def summary_html(jobs: list[Job], runs: list[dict[str, Any]]) -> str:
    counts = {s: sum(1 for j in jobs if j.row.state == s) for s in STATES}
    # Cancelled jobs were stopped by a person, not failed by the service: not in the success rate.
    done, settled = counts["done"], counts["done"] + counts["failed"]
    rate = f"{done / settled:.0%}" if settled else "—"
    spend = add_up((j.row.state, j.row.submissions, j.row.cost_usd, j.row.estimated_cost_usd, j.row.simulated)
                   for j in jobs)
    actual = [j.cost[0] for j in jobs if j.cost[1] == "api"]
    estimated = [j.cost[0] or 0.0 for j in jobs if j.cost[1] == "estimate"]
    delivered = sum(j.video_seconds for j in jobs if j.row.state == "done")
    requested = sum(j.video_seconds for j in jobs)
    firsts = [j.submitted for j in jobs if j.submitted]
    lasts = [j.downloaded for j in jobs if j.downloaded]
    wall = seconds_between(min(firsts), max(lasts)) if firsts and lasts else None
    # Runs still going (or killed before they could record their end) have no duration to add.
    run_times = [seconds_between(parse_time(r.get("started_at")), parse_time(r.get("finished_at"))) for r in runs]
    run_total = sum(t for t in run_times if t is not None)
    queue, n_queue = _median([j.queue_wait for j in jobs])
    render, n_render = _median([j.render_time for j in jobs])
    tiles = [
        _tile("Jobs", str(len(jobs)), f"{done} done · {counts['failed']} failed · {counts['cancelled']} cancelled"),
        _tile("Success rate", rate, (f"{done} of {settled} done or failed jobs done" if settled else
                                     "no job finished yet") + (" (cancelled jobs not counted)"
                                                                if counts["cancelled"] else "")),
        _tile("Video delivered", fmt_video(delivered), f"of {fmt_video(requested)} in the batch"),
        _tile("Spend", spend.describe(), _spend_note(actual, estimated)),
        _tile("Wall time", fmt_seconds(wall), "first submit → last download"),
        _tile("Time in runs", fmt_seconds(run_total if runs else None),
              f"{len(runs)} run{'s' if len(runs) != 1 else ''} of batchrun"),
        _tile("Median queue wait", fmt_seconds(queue), f"submitted → started, {n_queue} job{'s' * (n_queue != 1)}"),
        _tile("Median render time", fmt_seconds(render), f"started → finished, {n_render} job{'s' * (n_render != 1)}"),
    ]
    chips = "".join(f'<span class="badge {esc(s)}">{esc(s)}: {n}</span>' for s, n in counts.items() if n)
    return f'<div class="tiles">{"".join(tiles)}</div><div class="states">{chips}</div>{_runs_table(runs)}'


def _spend_note(actual: list[float], estimated: list[float]) -> str:
    """Say which part of the spend is the API's word and which is our list-price estimate."""
    if not estimated:
        if not actual:
            return "nothing charged yet"
        return f"reported by the API for {len(actual)} job{'s' * (len(actual) != 1)}"
    if not actual:
        return f"estimated at list price for {len(estimated)} job{'s' * (len(estimated) != 1)}"
    return f"{fmt_usd(sum(actual))} reported by the API + {fmt_usd(sum(estimated))} estimated"


def _runs_table(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return ""
    lines = []
    for run in runs:
        started, finished = parse_time(run.get("started_at")), parse_time(run.get("finished_at"))
        try:
            stop = (json.loads(run.get("summary") or "{}") or {}).get("stop_reason") or ""
        except (ValueError, AttributeError):
            stop = ""
        exit_code = run.get("exit_code")
        lines.append(f"<tr><td>{esc(run.get('id'))}</td><td>{esc(run.get('started_at') or '')}</td>"
                     f"<td>{esc(fmt_seconds(seconds_between(started, finished)))}</td>"
                     f"<td>{esc('still running or interrupted' if exit_code is None else exit_code)}</td>"
                     f"<td>{esc(stop)}</td></tr>")
    return ('<details class="runs"><summary>Runs</summary><table><thead><tr><th>run</th><th>started</th>'
            f'<th>took</th><th>exit code</th><th>stopped because</th></tr></thead><tbody>{"".join(lines)}'
            "</tbody></table></details>")


# -- the page -------------------------------------------------------------------------------------
def _csp() -> str:
    """Only our own inline style and script may run, whatever a prompt smuggles past the escaping."""
    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"

    return (f"default-src 'none'; style-src {digest(CSS)}; script-src {digest(JS)}; "
            "img-src * data: file: blob:; media-src * file: blob:")


def _last_recorded(times: list[JobTimes], runs: list[dict[str, Any]]) -> float:
    """Where bars of jobs still in flight end: the last job event, or the end of the run that recorded it.

    Not the clock, and not later runs that touched no job: a report written days after an interrupted
    run would otherwise squash the whole batch against the left edge of the chart."""
    last = max((t for j in times for t in (j.submitted, j.started, j.finished, j.downloaded) if t is not None),
               default=0.0)
    for run in runs:
        started, finished = parse_time(run.get("started_at")), parse_time(run.get("finished_at"))
        if started and finished and started.timestamp() <= last:
            last = max(last, finished.timestamp())
    return last


def _timeline_section(jobs: list[Job], runs: list[dict[str, Any]], now: datetime) -> str:
    # Only jobs that were sent have times to draw: 280 pending rows would be a tall empty block.
    unsent = sum(1 for j in jobs if j.submitted is None)
    ordered = sorted((j for j in jobs if j.submitted is not None), key=lambda j: (j.submitted, j.order))
    times = [j.times() for j in ordered]
    run_starts = [t.timestamp() for t in (parse_time(r.get("started_at")) for r in runs) if t]
    svg = timeline_svg(times, run_starts, _last_recorded(times, runs))
    origin = min((j.submitted for j in jobs if j.submitted), default=None)
    where = f"+0s is {origin:%Y-%m-%d %H:%M:%S} UTC, the first submission. " if origin else ""
    if unsent and ordered:
        where += f"Not drawn: {unsent} job{'s' if unsent != 1 else ''} not submitted yet. "
    legend = "".join(f'<span><i class="{c}"></i>{esc(t)}</span>' for c, t in (
        ("queued", "queued (submitted → started)"), ("rendering", "rendering (started → finished)"),
        ("downloading", "downloading (finished → downloaded)"), ("remote", "queued or rendering (not polled)"),
        ("failed", "failed"), ("cancelled", "cancelled")))
    return (f'<div class="panel"><div class="legend">{legend}</div>{svg}<p class="sub">{esc(where)}'
            "One row per job, in order of submission; faded bars were still going at the last moment the "
            "ledger recorded; dashed lines mark where a later run started. Hover a row for its times, click it for "
            "its card.</p></div>")


def _toolbar(jobs: list[Job]) -> str:
    states = [s for s in STATES if any(j.row.state == s for j in jobs)]
    buttons = [f'<button type="button" data-filter="all" aria-pressed="true">all ({len(jobs)})</button>']
    buttons += [f'<button type="button" data-filter="{esc(s)}" aria-pressed="false">{esc(s)} '
                f"({sum(1 for j in jobs if j.row.state == s)})</button>" for s in states]
    options = (("order", "ledger order"), ("id", "id"), ("cost-desc", "cost, highest first"),
               ("cost-asc", "cost, lowest first"),
               ("render-desc", "render time, longest first"), ("render-asc", "render time, shortest first"))
    select = "".join(f'<option value="{v}">{esc(t)}</option>' for v, t in options)
    return (f'<div class="toolbar">{"".join(buttons)}<span class="spacer"></span>'
            f'<span class="count" id="shown"></span><label for="sort">sort</label>'
            f'<select id="sort">{select}</select></div>')


def side_by_side(rows: list[JobRow]) -> list[JobRow]:
    """A bake-off's jobs with the same input next to each other (inputs in the order they first appear,
    each input's jobs in ledger order), so the grid shows each input across models side by side."""
    first_seen: dict[str, int] = {}
    keyed = []
    for i, row in enumerate(rows):
        key = json.dumps(row.input, sort_keys=True, default=str)
        keyed.append((first_seen.setdefault(key, i), i, row))
    return [row for *_, row in sorted(keyed, key=lambda k: k[:2])]


def render(output_dir: Path, rows: list[JobRow], runs: list[dict[str, Any]], now: datetime,
           listed: set[str] | None = None) -> str:
    """The whole page as text: the videos first, then the summary and the timeline."""
    models = sorted({row.model for row in rows})
    if len(models) > 1:
        rows = side_by_side(rows)
    jobs = [Job.of(row, i) for i, row in enumerate(rows)]
    budget = ImageBudget()
    title = f"batchrun report: {output_dir.resolve().name}"
    files = Files(output_dir)
    cards = "\n".join(card_html(j, files, budget, gone=listed is not None and j.row.id not in listed)
                      for j in jobs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(_csp())}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><main>
<h1>{esc(title)}</h1>
<p class="sub">{esc(", ".join(models) or "no jobs yet")} · written {now:%Y-%m-%d %H:%M:%S} UTC from the ledger</p>
<h2>Jobs</h2>{_toolbar(jobs)}
<div class="cards" id="cards">
{cards or '<p class="empty">No jobs in this ledger.</p>'}
</div>
<h2>Summary</h2>{summary_html(jobs, runs)}
<h2>Timeline</h2>{_timeline_section(jobs, runs, now)}
<footer>Videos are linked by relative paths: keep report.html next to them (zip the whole folder to share).
</footer></main><script>{JS}</script></body></html>
"""
