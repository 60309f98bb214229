"""A manifest file → a validated `Manifest`: settings, model, output dir and jobs with merged input.

Every problem is collected (not just the first) as a `Problem` located at the line and column it
comes from; `load_manifest` raises `ManifestError` when any of them is an error.
"""

from __future__ import annotations

import difflib
import gc
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchrun import schema
from batchrun.errors import ManifestError, Problem
from batchrun.models import DEFAULT_MODEL, Model, Price, UnknownModel, get_model
from batchrun.settings import BY_NAME, Settings
from batchrun.yamlload import Marks, Pos, load_file, position_of

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TOP_LEVEL_KEYS = ("version", "model", "output", "defaults", "jobs", "price", *BY_NAME)
PRICE_KEYS = ("usd_per_second", "usd_per_second_with_audio")


@dataclass(frozen=True)
class Job:
    index: int  # position in the manifest's jobs list
    id: str
    input: dict[str, Any]  # defaults overlaid by the job's own keys
    input_sha256: str
    line: int

    @property
    def label(self) -> str:
        return f"jobs[{self.index}] (id={self.id})"


@dataclass
class Manifest:
    path: Path
    model: Model
    price: Price
    settings: Settings
    output_dir: Path
    jobs: list[Job]
    warnings: list[Problem] = field(default_factory=list)

    def estimate_cost(self, job: Job) -> float:
        return self.model.estimate_cost(job.input, self.price)


def input_sha256(model_id: str, job_input: dict[str, Any]) -> str:
    """A digest of what a job asks the API for: same model and input, same digest, on every run."""
    canonical = json.dumps({"model": model_id, "input": job_input}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def derived_id(digest: str) -> str:
    return f"job-{digest[:12]}"


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Collector:
    """Gathers problems, de-duplicating those a shared `defaults` entry causes in every job."""

    def __init__(self, file: str, marks: Marks | Pos):
        self.file = file
        self.marks = marks
        self.problems: list[Problem] = []
        self._seen: set[tuple] = set()

    def add(self, path: tuple, where: str, message: str, severity: str = "error", at_key: bool = False) -> None:
        line, column = position_of(self.marks, path, key=at_key)
        signature = (line, column, where, message)
        if signature not in self._seen:
            self._seen.add(signature)
            self.problems.append(Problem(self.file, line, column, where, message, severity))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def _format_path(path: tuple) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text


def _check_settings(doc: dict, out: _Collector) -> Settings:
    values = {}
    for name, setting in BY_NAME.items():
        if name in doc:
            problem = setting.check(doc[name])
            if problem:
                out.add((name,), name, problem)
            else:
                values[name] = float(doc[name]) if setting.kind is float and doc[name] is not None else doc[name]
    settings = Settings(**values)
    if settings.poll_min_interval > settings.poll_max_interval:
        out.add(("poll_min_interval",), "poll_min_interval", "must not be larger than poll_max_interval")
    return settings


def _check_price(doc: dict, model: Model, out: _Collector) -> Price:
    raw = doc.get("price")
    if raw is None:
        return model.price
    if not isinstance(raw, dict):
        out.add(("price",), "price", f"must be a mapping with {' and '.join(PRICE_KEYS)}")
        return model.price
    values = {}
    for key, value in raw.items():
        if key not in PRICE_KEYS:
            out.add(("price", key), f"price.{key}", f"unknown price field{_did_you_mean(key, PRICE_KEYS)}",
                    at_key=True)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            out.add(("price", key), f"price.{key}", f"must be a number of USD per second, got {value!r}")
        else:
            values[key] = float(value)
    return Price(**{**model.price.__dict__, **values})


def _check_id(raw: Any, path: tuple, label: str, out: _Collector) -> str | None:
    if not isinstance(raw, str):
        out.add(path, label, f"id must be text, got {raw!r} (put it in quotes)")
        return None
    if not ID_PATTERN.fullmatch(raw):
        shown = raw if len(raw) <= 70 else raw[:67] + "..."
        out.add(path, label, f"id {shown!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                             "starting with a letter or digit")
        return None
    return raw


def _check_ids(jobs: list[Job], out: _Collector) -> None:
    """Ids name files, so they must differ even on case-insensitive disks and from extra outputs."""
    by_folded: dict[str, Job] = {}
    for job in jobs:
        other = by_folded.get(job.id.lower())
        if other is None:
            by_folded[job.id.lower()] = job
        elif other.id == job.id:
            out.add(("jobs", job.index), job.label,
                    f"duplicate id {job.id!r} (first used by jobs[{other.index}] on line {other.line})"
                    + ("; these two jobs have the same input: give each an id to run both"
                       if other.input_sha256 == job.input_sha256 else ""))
        else:
            out.add(("jobs", job.index), job.label,
                    f"id {job.id!r} differs from {other.id!r} (jobs[{other.index}]) only in case; "
                    "their files would collide on case-insensitive disks")
    for job in jobs:
        base, dash, number = job.id.rpartition("-")
        if dash and number.isdigit() and number[0] != "0" and int(number) >= 2 and base.lower() in by_folded:
            out.add(("jobs", job.index), job.label,
                    f"id {job.id!r} would collide with output #{number} of job {base!r} ({base}-{number}.mp4)")


def _check_jobs(doc: dict, model: Model, out: _Collector) -> list[Job]:
    defaults = doc.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        out.add(("defaults",), "defaults", "must be a mapping of model input fields")
        defaults = {}
    if "id" in defaults:
        out.add(("defaults", "id"), "defaults.id", "ids belong to jobs, not to defaults", at_key=True)
        defaults = {k: v for k, v in defaults.items() if k != "id"}
    raw_jobs = doc.get("jobs")
    if raw_jobs is None:
        out.add(("jobs",) if "jobs" in doc else (), "jobs", "the manifest has no jobs: add a 'jobs:' list")
        return []
    if not isinstance(raw_jobs, list):
        out.add(("jobs",), "jobs", "must be a list of jobs (each item starting with '- ')")
        return []
    if not raw_jobs:
        out.add(("jobs",), "jobs", "the jobs list is empty")
    jobs: list[Job] = []
    for index, raw in enumerate(raw_jobs):
        path = ("jobs", index)
        if not isinstance(raw, dict):
            out.add(path, f"jobs[{index}]", "each job must be a mapping of fields (prompt:, start_image_url:, ...)")
            continue
        own = {k: v for k, v in raw.items() if k != "id"}
        job_input = {**defaults, **own}
        digest = input_sha256(model.model_id, job_input)
        job_id = _check_id(raw["id"], path + ("id",), f"jobs[{index}].id", out) if "id" in raw else derived_id(digest)
        label = f"jobs[{index}] (id={job_id or str(raw.get('id'))[:70]})"
        for finding in schema.check_input(model, job_input):
            key = finding.path[0] if finding.path else None
            if key is not None and key not in own and key in defaults:
                node, where = ("defaults",) + finding.path, "defaults" + _format_path(finding.path)
            else:
                node, where = path + finding.path, label + _format_path(finding.path)
            out.add(node, where, finding.message, finding.severity, finding.at_key)
        if job_id is not None:
            line = position_of(out.marks, path)[0]
            jobs.append(Job(index, job_id, job_input, digest, line))
    _check_ids(jobs, out)
    return jobs


def resolve_output_dir(manifest_path: Path, doc_output: Any, override: str | Path | None) -> Path:
    """--output is relative to the current directory; `output:` to the manifest's folder."""
    if override is not None:
        return Path(override).absolute()
    if isinstance(doc_output, str) and doc_output:
        return (manifest_path.parent / doc_output).absolute()
    return (Path("output") / manifest_path.stem).absolute()


def load_manifest(path: str | Path, *, output: str | Path | None = None) -> Manifest:
    """Load and validate a manifest; raises ManifestError listing every problem (warnings included)."""
    # Loading allocates a few million small objects and no reference cycles; left on, the cyclic
    # garbage collector rescans the growing heap over and over (about 1 s of a 100,000-job load).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_manifest(Path(path), output)
    finally:
        if was_enabled:
            gc.enable()


def _load_manifest(path: Path, output: str | Path | None) -> Manifest:
    doc, marks = load_file(path)
    out = _Collector(str(path), marks)
    if not isinstance(doc, dict):
        got = "a list" if isinstance(doc, list) else "null" if doc is None else f"{schema._type_name(doc)} {doc!r}"[:60]
        out.add((), "", f"a manifest must be a mapping with a 'jobs:' list, not {got}")
        raise ManifestError(out.problems)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            out.add((key,), key, f"unknown setting{_did_you_mean(key, TOP_LEVEL_KEYS)}", at_key=True)
    if doc.get("version", 1) != 1:
        out.add(("version",), "version", f"this batchrun reads manifest version 1, not {doc['version']!r}")
    model_id = doc.get("model", DEFAULT_MODEL)
    try:
        model = get_model(model_id) if isinstance(model_id, str) else get_model(str(model_id))
    except UnknownModel as exc:
        out.add(("model",), "model", str(exc))
        raise ManifestError(out.problems) from None
    if "output" in doc and not (isinstance(doc["output"], str) and doc["output"] and "\0" not in doc["output"]):
        out.add(("output",), "output", "must be a folder path (text)")
    settings = _check_settings(doc, out)
    price = _check_price(doc, model, out)
    jobs = _check_jobs(doc, model, out)
    out.problems.sort(key=lambda p: (p.line, p.column))
    if out.errors:
        raise ManifestError(out.problems)
    return Manifest(
        path=path,
        model=model,
        price=price,
        settings=settings,
        output_dir=resolve_output_dir(path, doc.get("output"), output),
        jobs=jobs,
        warnings=out.problems,
    )
