"""The report's timeline: an inline SVG Gantt chart of every job's queued, rendering and downloading phases.

Rows share one time axis so throughput, idle slots and stragglers show at a glance; a band on top counts
the jobs in flight remotely, which is what `concurrency` limits. Rows shrink to about a pixel for big
batches, and the SVG has a viewBox so the browser scales it to the page width.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 1000  # viewBox units; the page scales the SVG to its width
MAX_ROWS_HEIGHT = 720  # rows area height (viewBox units) that a big batch is squeezed into
BAND_HEIGHT = 44  # the "in flight" band
AXIS_HEIGHT = 18
LABEL_MIN_ROW = 9  # rows thinner than this get no id label (the tooltip still has it)
NICE_STEPS = (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
              172800, 604800)


def esc(value: object) -> str:
    """The report's one escaping function, for text and attribute values alike (quotes included)."""
    return html.escape(str(value), quote=True)


@dataclass(frozen=True)
class JobTimes:
    """What the timeline needs of one job; times are seconds since the epoch, None when unknown."""

    id: str
    state: str
    submitted: float | None
    started: float | None
    finished: float | None
    downloaded: float | None


@dataclass(frozen=True)
class Segment:
    phase: str  # also its CSS class: the colours live in the stylesheet, next to the legend
    start: float
    end: float
    open: bool = False  # still going at the last moment the ledger recorded


def segments(job: JobTimes, until: float) -> list[Segment]:
    """The phases of one job that its timestamps support; a phase still in progress runs up to `until`."""
    s, st, f, d = job.submitted, job.started, job.finished, job.downloaded
    out: list[Segment] = []
    if s is not None and st is not None:
        out.append(Segment("queued", s, st))
    elif s is not None and f is not None:
        # Finished before any poll saw it running: the split between waiting and rendering is unknown.
        out.append(Segment("remote", s, f))
    elif s is not None and job.state == "queued":
        out.append(Segment("queued", s, until, open=True))
    if st is not None and f is not None:
        out.append(Segment("rendering", st, f))
    elif st is not None and job.state == "running":
        out.append(Segment("rendering", st, until, open=True))
    if f is not None and d is not None:
        out.append(Segment("downloading", f, d))
    elif f is not None and job.state == "downloading":
        out.append(Segment("downloading", f, until, open=True))
    return [seg for seg in out if seg.end >= seg.start]


def span(jobs: Sequence[JobTimes], until: float) -> tuple[float, float] | None:
    """The axis range: every known timestamp, plus `until` while jobs are still in flight."""
    times = [t for j in jobs for t in (j.submitted, j.started, j.finished, j.downloaded) if t is not None]
    if not times:
        return None
    if any(j.state in ("queued", "running", "downloading") for j in jobs):
        times.append(until)
    start, end = min(times), max(times)
    return start, max(end, start + 1.0)


def tick_step(seconds: float, max_ticks: int = 10) -> float:
    for step in NICE_STEPS:
        if seconds / step <= max_ticks:
            return step
    return NICE_STEPS[-1] * max(1, round(seconds / NICE_STEPS[-1] / max_ticks))


def tick_label(offset: float) -> str:
    """`+0s`, `+45s`, `+2m30s`, `+1h05m`, `+2d3h`: compact, so ten of them fit on one axis."""
    if offset < 60:
        return f"+{offset:g}s"
    whole = int(round(offset))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"+{days}d{hours}h" if hours else f"+{days}d"
    if hours:
        return f"+{hours}h{minutes:02d}m" if minutes else f"+{hours}h"
    return f"+{minutes}m{secs:02d}s" if secs else f"+{minutes}m"


def in_flight_steps(jobs: Sequence[JobTimes], until: float) -> list[tuple[float, int, int]]:
    """(time, queued, rendering) after each change: a sweep over the phase boundaries."""
    events: list[tuple[float, int, int]] = []
    for job in jobs:
        for seg in segments(job, until):
            if seg.phase == "downloading":
                continue  # local work: does not hold a remote slot
            dq, dr = (1, 0) if seg.phase == "queued" else (0, 1)
            events.append((seg.start, dq, dr))
            events.append((seg.end, -dq, -dr))
    events.sort(key=lambda e: (e[0], e[1] + e[2]))  # ends before starts at the same instant
    steps: list[tuple[float, int, int]] = []
    queued = rendering = 0
    for t, dq, dr in events:
        queued += dq
        rendering += dr
        if steps and steps[-1][0] == t:
            steps[-1] = (t, queued, rendering)
        else:
            steps.append((t, queued, rendering))
    return steps


class _Axis:
    def __init__(self, start: float, end: float, left: float, right: float):
        self.start, self.end, self.left, self.right = start, end, left, right

    def x(self, t: float) -> float:
        return self.left + (t - self.start) / (self.end - self.start) * (self.right - self.left)


def _band(jobs: Sequence[JobTimes], axis: _Axis, until: float, top: float) -> list[str]:
    """Stacked step areas: rendering at the bottom, queued on top; the gaps are idle slots."""
    steps = in_flight_steps(jobs, until)
    peak = max((q + r for _, q, r in steps), default=0)
    out = [f'<text class="band-label" x="{axis.left - 6:.1f}" y="{top + 10:.1f}" text-anchor="end">'
           f'in flight</text>',
           f'<text class="band-label" x="{axis.left - 6:.1f}" y="{top + 23:.1f}" text-anchor="end">'
           f'(peak {peak})</text>',
           f'<line class="baseline" x1="{axis.left}" x2="{axis.right}" y1="{top + BAND_HEIGHT}" '
           f'y2="{top + BAND_HEIGHT}"/>']
    if not peak:
        return out
    scale = (BAND_HEIGHT - 4) / peak
    bottom = top + BAND_HEIGHT
    for phase, height in (("rendering", lambda q, r: r), ("queued", lambda q, r: q + r)):
        points = [f"{axis.left:.1f},{bottom:.1f}"]
        level = bottom
        for t, q, r in steps:
            x = axis.x(t)
            points.append(f"{x:.1f},{level:.1f}")
            level = bottom - height(q, r) * scale
            points.append(f"{x:.1f},{level:.1f}")
        points.append(f"{axis.right:.1f},{level:.1f}")
        points.append(f"{axis.right:.1f},{bottom:.1f}")
        # Queued is drawn first so rendering paints over its lower part.
        out.insert(3, f'<polygon class="seg {phase}" points="{" ".join(points)}"/>')
    return out


def _ticks(axis: _Axis, top: float, bottom: float) -> list[str]:
    step = tick_step(axis.end - axis.start)
    out: list[str] = []
    offset = 0.0
    while offset <= axis.end - axis.start + 1e-9:
        x = axis.x(axis.start + offset)
        label = esc(tick_label(offset))
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{bottom:.1f}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{top - 5:.1f}" text-anchor="middle">{label}</text>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 13:.1f}" text-anchor="middle">{label}</text>')
        offset += step
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else tick_label(seconds).lstrip("+")


def _row(job: JobTimes, index: int, axis: _Axis, top: float, row_h: float, until: float) -> str:
    y = top + index * row_h
    bar_h = row_h * 0.72 if row_h >= 4 else row_h
    bar_y = y + (row_h - bar_h) / 2
    segs = segments(job, until)
    tip = [f"{job.id} ({job.state})"]
    parts: list[str] = []
    if index % 2 == 1 and row_h >= 4:
        parts.append(f'<rect class="stripe" x="0" y="{y:.2f}" width="{WIDTH}" height="{row_h:.2f}"/>')
    for seg in segs:
        x0, x1 = axis.x(seg.start), axis.x(seg.end)
        cls = f"seg {seg.phase}" + (" open" if seg.open else "")
        parts.append(f'<rect class="{cls}" x="{x0:.2f}" y="{bar_y:.2f}" width="{max(x1 - x0, 0.6):.2f}" '
                     f'height="{bar_h:.2f}"/>')
        tip.append(f"{seg.phase}: {_duration(seg.end - seg.start)}" + (" so far" if seg.open else ""))
    if job.state in ("failed", "cancelled"):
        end = max((seg.end for seg in segs), default=None)
        if end is not None:
            # On hair-thin rows the end mark overlaps its neighbours a little, or nobody would see it.
            mark_h = max(row_h, 3.0)
            parts.append(f'<rect class="mark {job.state}" x="{axis.x(end) - 2:.2f}" '
                         f'y="{y + (row_h - mark_h) / 2:.2f}" width="4" height="{mark_h:.2f}"/>')
    if not segs:
        tip.append("no timestamps yet")
    if row_h >= LABEL_MIN_ROW:
        size = min(row_h - 2, 11)
        parts.append(f'<text class="label" x="{axis.left - 6:.1f}" y="{y + row_h / 2:.2f}" font-size="{size:.1f}" '
                     f'text-anchor="end" dominant-baseline="central">{esc(_clip(job.id, 26))}</text>')
    title = esc("\n".join(tip))
    return (f'<a href="#card-{esc(job.id)}" class="row" data-id="{esc(job.id)}" data-state="{esc(job.state)}">'
            f"<title>{title}</title>{''.join(parts)}</a>")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def timeline_svg(jobs: Sequence[JobTimes], run_starts: Sequence[float], until: float) -> str:
    """The whole chart; `jobs` in the order their rows should appear, `until` where open bars end."""
    n = len(jobs)
    rng = span(jobs, until)
    if rng is None:
        return '<p class="empty">No job has been submitted yet, so there is no timeline.</p>'
    row_h = max(0.7, min(16.0, MAX_ROWS_HEIGHT / max(n, 1)))
    left = 170.0 if row_h >= LABEL_MIN_ROW else 70.0
    axis = _Axis(rng[0], rng[1], left, WIDTH - 12)
    band_top = 4.0
    rows_top = band_top + BAND_HEIGHT + AXIS_HEIGHT + 6
    rows_bottom = rows_top + n * row_h
    height = rows_bottom + AXIS_HEIGHT + 4
    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.1f}" '
             f'aria-label="Timeline of {n} jobs" shape-rendering="{"crispEdges" if row_h < 4 else "auto"}">']
    parts += _band(jobs, axis, until, band_top)
    parts += _ticks(axis, rows_top, rows_bottom)
    for number, start in enumerate(run_starts, 1):
        if number > 1 and rng[0] <= start <= rng[1]:
            x = axis.x(start)
            parts.append(f'<line class="run-start" x1="{x:.1f}" x2="{x:.1f}" y1="{band_top:.1f}" '
                         f'y2="{rows_bottom:.1f}"><title>run {number} started</title></line>')
    parts.append('<g class="rows">')
    parts += [_row(job, i, axis, rows_top, row_h, until) for i, job in enumerate(jobs)]
    parts.append("</g></svg>")
    return "\n".join(parts)

