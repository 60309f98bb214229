"""A manifest file → a validated `Manifest`: settings, model, output dir and jobs with merged input.

Jobs come from the `jobs:` list (a job with a `matrix:` makes one job per combination) and from the rows
of a `jobs_from:` file, in that order; see `batchrun.generators` for both. Image fields may name local
files, sent inline (see `batchrun.localfiles`).

Every problem is collected (not just the first) as a `Problem` located at the file, line and column it
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

from batchrun import echo, generators, localfiles, manifestcache, readlog, schema, takes
from batchrun.errors import ManifestError, Problem
from batchrun.localfiles import LocalImage, LocalImages
from batchrun.models import DEFAULT_MODEL, Model, ModelFileError, Price, UnknownModel, all_models, get_model, user_dir
from batchrun.settings import BY_NAME, Settings
from batchrun.yamlload import Marks, Pos, load_file, node_at, position_of

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TOP_LEVEL_KEYS = ("version", "model", "models_dir", "output", "defaults", "jobs", "jobs_from", "price", "notify",
                  *BY_NAME)
MAX_JOBS = generators.MAX_JOBS
FREEZE_JOBS = 10_000  # from this many jobs, a load's objects are moved out of the cyclic collector's reach
Location = tuple[str, int, int, str]  # file, line, column, where (such as "jobs[3] (id=x).duration")
PRICE_KEYS = ("usd_per_second", "usd_per_second_with_audio", "usd_per_output")


@dataclass(frozen=True, slots=True)
class Job:
    """One job to run. `input` is what the manifest says (local image paths as written); `api_input()` is
    what is sent. `input_sha256` covers the bytes of local images too, so editing one changes the job.

    Slotted: a 100,000-job manifest keeps 100,000 of them (a dict per instance would be 50 MB more)."""

    index: int  # position in Manifest.jobs (matrices expanded; jobs_from rows after the jobs list)
    id: str
    input: dict[str, Any]  # defaults overlaid by the job's own keys (and its matrix values)
    input_sha256: str
    line: int  # where the job is written in `file`
    file: str = ""  # the manifest, or its jobs_from file
    local_files: dict[str, Path] = field(default_factory=dict)  # field path ("start_image_url") -> absolute path
    origin: Origin | None = field(default=None, repr=False, compare=False)
    local_images: tuple[tuple[tuple, LocalImage], ...] = field(default=(), repr=False, compare=False)
    take: int = 1  # which take of its input (see `batchrun.takes`); take 1 keeps the written or derived id
    take_of: str = ""  # the id of take 1 of the same input ("" for take 1 itself)
    model: Model | None = field(default=None, repr=False, compare=False)  # its own `model:`; None: the manifest's

    @property
    def label(self) -> str:
        prefix = self.origin.prefix if self.origin is not None else f"jobs[{self.index}]"
        return f"{prefix} (id={self.id})"

    def api_input(self) -> dict[str, Any]:
        """The input to submit: each local image path replaced by a `data:` URI of the file, read now.

        Raises `localfiles.LocalFileError` (nothing should be sent) if a file changed since the manifest
        was loaded. Without local files this is `input` itself: do not modify it.
        """
        if not self.local_images:
            return self.input
        return localfiles.inline_input(self.input, self.local_images)

    def locate(self, path: tuple = (), *, at_key: bool = False) -> Location:
        """(file, line, column, where) of a field of this job's input, such as ("start_image_url",)."""
        if self.origin is None:
            return self.file, self.line, 1, self.label + _format_path(path)
        return self.origin.locate(path, self.label, at_key)


@dataclass
class Manifest:
    path: Path
    model: Model
    price: Price
    settings: Settings
    output_dir: Path
    jobs: list[Job]
    warnings: list[Problem] = field(default_factory=list)
    # The user named output_dir (`--output` or `output:`), rather than it being the default
    # `output/<stem>` of the current directory (see batchrun.ledger_index).
    output_explicit: bool = False
    notify: list[str] = field(default_factory=list)  # URLs told how each run ended (batchrun/notify.py)

    prices: dict[str, Price] = field(default_factory=dict)  # `price:` given per model id
    models_dir: Path | None = None  # the user folder of model files in use (`models_dir:` or $BATCHRUN_MODELS)
    from_cache: bool = False  # read back from the validated-manifest cache (batchrun.manifestcache), unchanged

    def model_of(self, job: Job) -> Model:
        """The model a job runs on: its own `model:` (per job or a matrix axis), else the manifest's."""
        return job.model or self.model

    def price_of(self, model: Model) -> Price:
        """The price used for `model`: the manifest's `price:` for it, else its data file's."""
        if model.model_id in self.prices:
            return self.prices[model.model_id]
        return self.price if model.model_id == self.model.model_id else model.price

    def estimate_cost(self, job: Job) -> float:
        """USD the job is expected to cost; 0.0 where the model's price is unknown (see `unpriced_jobs`)."""
        return self.estimate_or_none(job) or 0.0

    def estimate_or_none(self, job: Job) -> float | None:
        """USD the job is expected to cost, or None when the model's price (or the job's length) is unknown."""
        model = self.model_of(job)
        return model.estimate_cost(job.input, self.price_of(model))

    def unpriced_jobs(self) -> list[Job]:
        """The jobs whose cost cannot be estimated: a budget cannot be kept for them."""
        return [job for job in self.jobs if self.estimate_or_none(job) is None]

    def budget_problem(self) -> str | None:
        """Why a budget cannot be enforced (some job has no known price), or None."""
        if self.settings.budget_usd is None:
            return None
        unpriced = self.unpriced_jobs()
        if not unpriced:
            return None
        by_model: dict[str, list[Job]] = {}
        for job in unpriced:
            by_model.setdefault(self.model_of(job).model_id, []).append(job)
        parts = []
        for jobs in by_model.values():
            model = self.model_of(jobs[0])
            price = self.price_of(model)
            if price.known:  # the rate is known: the job's length is not (e.g. `duration: "auto"`)
                parts.append(f"{model.model_id}: the length of {len(jobs)} job(s) is not known before the render "
                             f"(first: {jobs[0].id}; set '{price.duration_field}' to a number of seconds)")
                continue
            field = "usd_per_output" if model.price.unit == "output" or price.duration_field is None \
                else "usd_per_second"
            hint = f"{field}: ..." if model is self.model else f"{model.model_id}: {{{field}: ...}}"
            parts.append(f"{model.model_id}: no price known for {len(jobs)} job(s) (first: {jobs[0].id}; "
                         f"add 'price: {{{hint}}}')")
        return ("budget_usd: a budget cannot be kept for jobs whose cost cannot be estimated: "
                + "; ".join(parts) + ". Fix these in the manifest, or run without a budget")


_JOB_FIELDS = ("index", "id", "input", "input_sha256", "line", "file", "local_files", "origin", "local_images", "take",
               "take_of", "model")
if tuple(Job.__dataclass_fields__) != _JOB_FIELDS:
    raise RuntimeError("manifest._new_job is out of step with Job's fields")
_job_slots = tuple(getattr(Job, name).__set__ for name in _JOB_FIELDS)


def _new_job(index, job_id, job_input, digest, line, file, local_files, origin, local_images, take, take_of, model):
    """`Job(...)` with every field given, at half the cost: a frozen dataclass's `__init__` goes through
    `object.__setattr__` once per field, a tenth of a 100,000-job load; this sets the slots directly."""
    job = object.__new__(Job)
    s_index, s_id, s_input, s_digest, s_line, s_file, s_local, s_origin, s_images, s_take, s_take_of, s_model = \
        _job_slots
    s_index(job, index)
    s_id(job, job_id)
    s_input(job, job_input)
    s_digest(job, digest)
    s_line(job, line)
    s_file(job, file)
    s_local(job, local_files)
    s_origin(job, origin)
    s_images(job, local_images)
    s_take(job, take)
    s_take_of(job, take_of)
    s_model(job, model)
    return job


# What json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=False) builds on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _c_canonical():
    """The C encoder that `_CANONICAL.encode` makes afresh on every call (a third of its time), made once;
    None where the interpreter has none or it does not write exactly what `_CANONICAL` writes."""
    try:
        from json.encoder import c_make_encoder, encode_basestring
        # No circular-reference markers: a manifest's values come from YAML, CSV or JSON and hold no cycles.
        encode = c_make_encoder(None, _CANONICAL.default, encode_basestring, None, ":", ",", True, False, True)
        probe = {"model": "m", "input": {"b": [1, 2.5, None, True], "a": "é\"\n\u2028", "c": {"y": {}, "x": []}}}
        if "".join(encode(probe, 0)) == _CANONICAL.encode(probe):
            return encode
    except Exception:  # noqa: BLE001 - an interpreter without it, or another signature: the documented way
        return None
    return None


_C_CANONICAL = _c_canonical()


def input_sha256(model_id: str, job_input: dict[str, Any]) -> str:
    """A digest of what a job asks the API for: same model and input, same digest, on every run."""
    document = {"model": model_id, "input": job_input}
    canonical = "".join(_C_CANONICAL(document, 0)) if _C_CANONICAL is not None else _CANONICAL.encode(document)
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
        self.add_at(self.file, line, column, where, message, severity)

    def add_at(self, file: str, line: int, column: int, where: str, message: str, severity: str = "error") -> None:
        signature = (file, line, column, where, message)
        if signature not in self._seen:
            self._seen.add(signature)
            self.problems.append(Problem(file, line, column, where, message, severity))

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


def _check_notify(doc: dict, out: _Collector) -> list[str]:
    raw = doc.get("notify")
    if raw is None:
        return []
    from batchrun.notify import url_problem  # here: it imports aiohttp, a tenth of a second `validate` need not pay

    if not isinstance(raw, list):
        out.add(("notify",), "notify", "must be a list of URLs (one '- https://...' per line)")
        return []
    for index, value in enumerate(raw):
        problem = url_problem(value)
        if problem:
            out.add(("notify", index), f"notify[{index}]", problem)
    return [value.strip() for value in raw if url_problem(value) is None]


def _check_prices(doc: dict, model: Model, registry: dict[str, Model],
                  out: _Collector) -> tuple[Price, dict[str, Price]]:
    """The manifest model's price, and prices given per model id (``price: {MODEL_ID: {usd_per_...}}``)."""
    raw = doc.get("price")
    if not isinstance(raw, dict):
        return _check_price(raw, ("price",), model, out), {}
    own = {k: v for k, v in raw.items() if "/" not in str(k)}
    price = _check_price(own, ("price",), model, out) if own else model.price
    prices = {}
    for model_id, value in raw.items():
        if "/" not in str(model_id):
            continue
        if model_id not in registry:
            out.add(("price", model_id), f"price.{model_id}", f"unknown model {echo.quoted(model_id)}"
                    f"{_did_you_mean(model_id, registry)}", at_key=True)
            continue
        prices[model_id] = _check_price(value, ("price", model_id), registry[model_id], out)
    return price, prices


def _check_price(raw: Any, at: tuple, model: Model, out: _Collector) -> Price:
    where = ".".join(str(p) for p in at)
    if raw is None:
        return model.price
    if not isinstance(raw, dict):
        keys = PRICE_KEYS[2:] if model.price.unit == "output" else PRICE_KEYS[:2]
        out.add(at, where, f"must be a mapping with {' and '.join(keys)}")
        return model.price
    values = {}
    for key, value in raw.items():
        if key not in PRICE_KEYS:
            out.add(at + (key,), f"{where}.{key}", f"unknown price field{_did_you_mean(key, PRICE_KEYS)}",
                    at_key=True)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            unit = "output" if key == "usd_per_output" else "second"
            out.add(at + (key,), f"{where}.{key}", f"must be a number of USD per {unit}, got {echo.shown(value)}")
        else:
            values[key] = float(value)
    # The rate given says the unit: a per-second model may be priced per output by the user, and back.
    if "usd_per_output" in values and "usd_per_second" not in values:
        values["unit"] = "output"
    elif "usd_per_second" in values and "usd_per_output" not in values:
        values["unit"] = "second"
        if model.price.duration_field is None:
            out.add(at + ("usd_per_second",), f"{where}.usd_per_second",
                    f"{model.model_id} has no field for the length of its output, so a price per second cannot "
                    "be applied; give usd_per_output (USD for each output) instead")
    return Price(**{**model.price.__dict__, **values})


def _id_problem(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return f"id must be text, got {echo.shown(raw)} (put it in quotes)"
    if not ID_PATTERN.fullmatch(raw):
        return (f"id {echo.quoted(raw, 70)} is not allowed: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit")
    return None


def _check_ids(jobs: list[Job], out: _Collector) -> None:
    """Ids name files, so they must differ even on case-insensitive disks and from extra outputs."""

    def first_used(other: Job, job: Job) -> str:
        prefix = other.origin.prefix if other.origin is not None else f"jobs[{other.index}]"
        where = f"line {other.line}" if other.file == job.file else f"line {other.line} of {other.file}"
        return f"first used by {prefix} on {where}"

    def add(job: Job, message: str) -> None:
        file, line, column = job.origin.position() if job.origin is not None else (job.file, job.line, 1)
        out.add_at(file, line, column, job.label, message)

    by_folded: dict[str, Job] = {}
    for job in jobs:
        other = by_folded.get(job.id.lower())
        if other is None:
            by_folded[job.id.lower()] = job
        elif other.id == job.id:
            add(job, f"duplicate id {job.id!r} ({first_used(other, job)})"
                + ("; these two jobs have the same input: give each an id to run both"
                   if other.input_sha256 == job.input_sha256 else ""))
        else:
            add(job, f"id {job.id!r} differs from {other.id!r} ({other.label.split(' (')[0]}) only in case; "
                     "their files would collide on case-insensitive disks")
    for job in jobs:
        base, dash, number = job.id.rpartition("-")
        if dash and number.isdigit() and number[0] != "0" and int(number) >= 2 and base.lower() in by_folded:
            add(job, f"id {job.id!r} would collide with output #{number} of job {base!r} ({base}-{number}.mp4)")


# --- where each job comes from ---------------------------------------------------------------------


class _Context:
    """What every job of one manifest shares for locating its problems.

    The positions of every node (the `Marks` tree) are needed while loading; afterwards they would keep
    about 1 KB per job alive for the rare caller that locates a problem later (preflight), so `release`
    drops them and `marks` reads the file again on demand, unless it changed since it was loaded (then
    problems point at each job's line).
    """

    def __init__(self, path: Path, stamp: tuple | None, marks: Marks | Pos, defaults: dict[str, Any]):
        self.path, self.file, self.stamp, self.defaults = path, str(path), stamp, defaults
        self._marks: Marks | Pos | None = marks
        self._reloaded = False

    def release(self) -> None:
        self._marks = None

    @property
    def marks(self) -> Marks | Pos | None:
        if self._marks is None and not self._reloaded:
            self._reloaded = True
            try:
                if _stamp(self.path) == self.stamp:
                    self._marks = load_file(self.path)[1]
            except ManifestError:
                pass
        return self._marks


def _stamp(path: Path) -> tuple | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size, info.st_mtime_ns, info.st_ino


class Origin:
    """Where a job is written, to point each problem about its input at a file, line and column.

    A field that comes from `defaults` is located there (and reported once for all jobs), one from a
    matrix at the value in the matrix's list, one from a jobs file at its cell.
    """

    __slots__ = ("ctx", "index", "line")
    prefix: str  # such as "jobs[3]", "jobs_from[0]"
    file: str  # the file the job is written in

    def position(self) -> tuple[str, int, int]:
        """The job itself: its list item, or its row (the id cell when there is one)."""
        raise NotImplementedError

    def locate(self, path: tuple, label: str, at_key: bool = False) -> Location:
        raise NotImplementedError

    def _from_defaults(self, path: tuple, at_key: bool) -> Location | None:
        key = path[0] if path else None
        if key is None or key not in self.ctx.defaults or self._own(key):
            return None
        marks = self.ctx.marks
        line, column = position_of(marks, ("defaults",) + path, key=at_key) if marks is not None else (1, 1)
        return self.ctx.file, line, column, "defaults" + _format_path(path)

    def _own(self, key: str) -> bool:
        raise NotImplementedError

    def from_defaults(self, key: str) -> bool:
        """Whether the job's value of `key` is the manifest's `defaults`, not its own."""
        return key in self.ctx.defaults and not self._own(key)


class _Listed(Origin):
    """Item `index` of the manifest's `jobs:` list, written on `line`."""

    __slots__ = ()

    def __init__(self, ctx: _Context, index: int, line: int):
        self.ctx, self.index, self.line = ctx, index, line

    @property
    def prefix(self) -> str:
        return f"jobs[{self.index}]"

    @property
    def file(self) -> str:
        return self.ctx.file

    def _marks(self) -> Marks | Pos | None:
        marks = self.ctx.marks
        return node_at(marks, ("jobs", self.index)) if marks is not None else None

    def _own(self, key: str) -> bool:
        marks = self._marks()
        return isinstance(marks, Marks) and isinstance(marks.children, dict) and key in marks.children

    def _at(self, path: tuple, at_key: bool) -> tuple[int, int]:
        marks = self._marks()
        return position_of(marks, path, key=at_key) if marks is not None else (self.line, 1)

    def position(self) -> tuple[str, int, int]:
        return (self.ctx.file, *self._at((), False))

    def locate(self, path: tuple, label: str, at_key: bool = False) -> Location:
        found = self._from_defaults(path, at_key)
        if found:
            return found
        return (self.ctx.file, *self._at(path, at_key), label + _format_path(path))


class _Combination(_Listed):
    """One combination of the `matrix:` of item `index` of the jobs list."""

    __slots__ = ("keys", "choice")

    def __init__(self, ctx: _Context, index: int, line: int, keys: dict[str, int], choice: tuple[int, ...]):
        super().__init__(ctx, index, line)
        self.keys, self.choice = keys, choice

    def _own(self, key: str) -> bool:
        return key in self.keys or super()._own(key)

    def locate(self, path: tuple, label: str, at_key: bool = False) -> Location:
        key = path[0] if path else None
        if key in self.keys:
            if at_key and len(path) == 1:  # an unknown field named in the matrix
                return (self.ctx.file, *self._at(("matrix", key), True), f"{self.prefix}.matrix.{key}")
            chosen = self.choice[self.keys[key]]
            line, column = self._at(("matrix", key, chosen) + path[1:], at_key)
            return self.ctx.file, line, column, f"{self.prefix}.matrix.{key}[{chosen}]" + _format_path(path[1:])
        found = self._from_defaults(path, at_key)
        if found:
            return found
        # The job's own keys are shared by every combination: one problem, not one per combination.
        return (self.ctx.file, *self._at(path, at_key), self.prefix + _format_path(path))


class _Row(Origin):
    """Row `index` of the `jobs_from:` file, starting on `line`."""

    __slots__ = ("file", "columns", "own")

    def __init__(self, ctx: _Context, file: str, row: generators.Row):
        self.ctx, self.file, self.index, self.line = ctx, file, row.index, row.line
        self.columns, self.own = row.columns, tuple(row.values)  # columns: one dict shared by all rows

    @property
    def prefix(self) -> str:
        return f"jobs_from[{self.index}]"

    def _own(self, key: str) -> bool:
        return key in self.own

    def position(self) -> tuple[str, int, int]:
        return self.file, self.line, self.columns.get("id", 1) if "id" in self.own else 1

    def locate(self, path: tuple, label: str, at_key: bool = False) -> Location:
        found = self._from_defaults(path, at_key)
        if found:
            return found
        column = self.columns.get(path[0], 1) if path and path[0] in self.own else 1
        return self.file, self.line, column, label + _format_path(path)


# --- jobs -----------------------------------------------------------------------------------------


class _JobBuilder:
    """Validates each job's input, checks its local files and makes the `Job`, reporting to `out`."""

    def __init__(self, model: Model, ctx: _Context, images: LocalImages, out: _Collector,
                 registry: dict[str, Model] | None = None):
        self.model, self.ctx, self.images, self.out = model, ctx, images, out
        self.registry = registry or {model.model_id: model}
        self.jobs: list[Job] = []
        self.over = False  # the takes made more than MAX_JOBS jobs (said once)

    def _own_model(self, job_input: dict[str, Any], origin: Origin, shown: Any) -> Model | None:
        """The model a job's `model:` names (taken out of `job_input`), or None with the problem reported."""
        chosen = job_input.pop("model")
        model = self.registry.get(chosen) if isinstance(chosen, str) else None
        if model is None:
            close = difflib.get_close_matches(str(chosen), list(self.registry), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            label = f"{origin.prefix} (id={shown})"
            self.out.add_at(*origin.locate(("model",), label),
                            f"unknown model {echo.shown(chosen)}{hint}; `batchrun models list` shows the "
                            f"{len(self.registry)} known models")
        return model

    def add(self, job_input: dict[str, Any], job_id: str | None, shown_id: str | None, origin: Origin) -> None:
        """`job_id` None means derive it from the input, unless `shown_id` says the written id was refused.

        `job_input` becomes the job's own (callers pass a fresh dict: no copy per job). `takes: N` (not
        model input) makes N jobs of this input, ids as `takes.take_id` gives them."""
        takes_value = job_input.pop(takes.KEY, 1)
        model = self.model
        if "model" in job_input:
            model = self._own_model(job_input, origin, job_id if job_id is not None else shown_id)
            if model is None:
                return
        local_refs: list[tuple[tuple, str]] = []
        findings = schema.check_input(model, job_input, local_refs=local_refs)
        if local_refs:
            refs = tuple((path, self.images.check(value)) for path, value in local_refs)
            digest = input_sha256(model.model_id, localfiles.hashed_input(job_input, refs))
        else:
            refs = ()
            digest = input_sha256(model.model_id, job_input)
        if job_id is None and shown_id is None:
            job_id = derived_id(digest)
        label = self._label(origin, job_id, shown_id) if findings or refs else ""  # made only when said
        for finding in findings:
            message = finding.message
            if finding.depends_on and origin.from_defaults(finding.depends_on):
                message += f" ({finding.depends_on} comes from defaults: give the job its own to differ)"
            self.out.add_at(*origin.locate(finding.path, label, finding.at_key), message, finding.severity)
        if refs and localfiles.inline_size(refs) > localfiles.MAX_REQUEST_BYTES:
            file, line, column = origin.position()
            self.out.add_at(file, line, column, label,
                            f"its local images add up to {localfiles.inline_size(refs) / 2**20:.1f} MiB once encoded; "
                            f"a request is limited to {localfiles.MAX_REQUEST_BYTES // 2**20} MiB: use https:// URLs "
                            "for some of them")
        for path, image in refs:
            for problem in image.problems:
                self.out.add_at(*origin.locate(path, label), problem)
            if not image.problems:
                for problem in schema.image_limit_problems(model, path, image.width, image.height, image.size):
                    self.out.add_at(*origin.locate(path, label), f"{echo.quoted(image.written)} {problem}")
            for warning in image.warnings:
                self.out.add_at(*origin.locate(path, label), warning, "warning")
        count = takes.check_count(takes_value)
        if isinstance(count, str):
            self.out.add_at(*origin.locate((takes.KEY,), self._label(origin, job_id, shown_id)), count)
            return
        if len(self.jobs) + count > MAX_JOBS:
            if not self.over:
                self.over = True
                file, line, column = origin.position()
                self.out.add_at(file, line, column, self._label(origin, job_id, shown_id),
                                f"with their takes the jobs come to more than {MAX_JOBS:,}, "
                                "the most a manifest may hold: split the batch into several manifests")
            return
        if job_id is not None and count > 1 and len(takes.take_id(job_id, count)) > 64:
            file, line, column = origin.position()
            self.out.add_at(file, line, column, self._label(origin, job_id, shown_id),
                            f"id {job_id!r} is too long for {count} takes: "
                            f"{takes.take_id(job_id, count)!r} is over 64 characters")
            return
        if job_id is not None:
            local = {_format_path(path)[1:]: image.path for path, image in refs} if refs else {}
            own_model = None if model is self.model else model
            for take in range(1, count + 1):
                self.jobs.append(_new_job(len(self.jobs), takes.take_id(job_id, take), job_input, digest,
                                          origin.line, origin.file, local, origin, refs, take,
                                          job_id if take > 1 else "", own_model))

    @staticmethod
    def _label(origin: Origin, job_id: str | None, shown_id: str | None) -> str:
        return f"{origin.prefix} (id={job_id if job_id is not None else shown_id})"


def _defaults(doc: dict, out: _Collector) -> dict[str, Any]:
    defaults = doc.get("defaults", {})
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, dict):
        out.add(("defaults",), "defaults", "must be a mapping of model input fields")
        defaults = {}
    for key, message in (("id", "ids belong to jobs, not to defaults"),
                         ("matrix", "a matrix belongs to a job, not to defaults")):
        if key in defaults:
            out.add(("defaults", key), f"defaults.{key}", message, at_key=True)
            defaults = {k: v for k, v in defaults.items() if k != key}
    return defaults


def _listed_jobs(doc: dict, out: _Collector) -> list[tuple[int, dict]] | None:
    """The items of `jobs:` that are jobs, or None when the list is unusable."""
    raw_jobs = doc.get("jobs")
    if raw_jobs is None:
        if "jobs_from" not in doc:
            out.add(("jobs",) if "jobs" in doc else (), "jobs", "the manifest has no jobs: add a 'jobs:' list")
        return None
    if not isinstance(raw_jobs, list):
        out.add(("jobs",), "jobs", "must be a list of jobs (each item starting with '- ')")
        return None
    if not raw_jobs and "jobs_from" not in doc:
        out.add(("jobs",), "jobs", "the jobs list is empty")
    listed = []
    for index, raw in enumerate(raw_jobs):
        if not isinstance(raw, dict):
            out.add(("jobs", index), f"jobs[{index}]",
                    "each job must be a mapping of fields (prompt:, start_image_url:, ...)")
            continue
        if "matrix" in raw:
            found = generators.matrix_problems(raw)
            for path, message, at_key in found:
                out.add(("jobs", index) + path, f"jobs[{index}]" + _format_path(path), message, at_key=at_key)
            if found:
                continue
        listed.append((index, raw))
    return listed


def _count(listed: list[tuple[int, dict]], out: _Collector) -> int | None:
    """How many jobs the list makes, or None (with a problem) when that is over MAX_JOBS: checked
    before building any, so a matrix of a million combinations fails at once."""
    total = size = index = 0
    for i, raw in listed:
        if "matrix" in raw:
            made = generators.matrix_size(raw["matrix"])
            if made > size:
                size, index = made, i
            total += made
        else:
            total += 1
    if total <= MAX_JOBS:
        return total
    if size > MAX_JOBS:
        matrix = next(raw["matrix"] for i, raw in listed if i == index)
        sizes = " x ".join(f"{len(values):,}" for values in matrix.values())
        out.add(("jobs", index, "matrix"), f"jobs[{index}].matrix",
                f"this matrix makes {size:,} jobs ({sizes}); a manifest may hold at most {MAX_JOBS:,}: "
                "split the batch into several manifests")
    else:
        out.add(("jobs",), "jobs", f"the jobs list makes {total:,} jobs; a manifest may hold at most "
                                   f"{MAX_JOBS:,}: split the batch into several manifests")
    return None


def _build_listed(listed: list[tuple[int, dict]], defaults: dict, build: _JobBuilder, out: _Collector) -> None:
    jobs_marks = node_at(out.marks, ("jobs",))
    for index, raw in listed:
        line = jobs_marks.children[index].pos[0]
        shown_id = raw.get("id")
        job_id = None
        if "id" in raw:
            problem = _id_problem(raw["id"])
            if problem:
                out.add(("jobs", index, "id"), f"jobs[{index}].id", problem)
                shown_id = echo.plain(str(raw["id"]), 70)
            else:
                job_id = raw["id"]
        if "matrix" not in raw:
            job_input = {**defaults, **raw}  # the job's keys where defaults has them, then its own, as written
            job_input.pop("id", None)
            build.add(job_input, job_id, shown_id, _Listed(build.ctx, index, line))
            continue
        matrix = raw["matrix"]
        if job_id is not None:
            longest = generators.longest_matrix_id(job_id, matrix)
            if len(longest) > 64:
                out.add(("jobs", index, "id"), f"jobs[{index}].id",
                        f"id {job_id!r} is too long for its matrix: ids would reach {len(longest)} characters "
                        f"({longest!r}); the limit is 64")
                continue
        own = {k: v for k, v in raw.items() if k not in ("id", "matrix")}
        base = {**defaults, **own}
        keys = {key: i for i, key in enumerate(matrix)}
        abbrevs = generators.abbreviations(list(matrix))
        for choice, values in generators.expand_matrix(matrix):
            product_id = generators.matrix_id(job_id, abbrevs, choice) if job_id is not None else None
            build.add({**base, **values}, product_id, shown_id if job_id is None else None,
                      _Combination(build.ctx, index, line, keys, choice))


def _build_from_file(doc: dict, path: Path, defaults: dict, room: int, build: _JobBuilder, out: _Collector) -> None:
    value = doc["jobs_from"]
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        out.add(("jobs_from",), "jobs_from", "must be the path of a .csv or .jsonl file (relative to the manifest)")
        return
    suffix = Path(value).suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        out.add(("jobs_from",), "jobs_from", f"must name a .csv or .jsonl file, not {suffix or 'a file without one'}")
        return
    source = path.parent / value
    shown = str(source)
    try:
        rows, problems = generators.read_rows(source, shown, build.model, limit=room)
    except generators.JobsFileError as exc:
        out.add(("jobs_from",), "jobs_from", str(exc))
        return
    for problem in problems:
        out.add_at(problem.file, problem.line, problem.column, problem.where, problem.message, problem.severity)
    for row in rows:
        own = {k: v for k, v in row.values.items() if k != "id"}
        origin = _Row(build.ctx, shown, row)
        job_id = shown_id = None
        if "id" in row.values:
            problem = _id_problem(row.values["id"])
            if problem:
                out.add_at(*origin.position(), f"{origin.prefix}.id", problem)
                shown_id = echo.plain(str(row.values["id"]), 70)
            else:
                job_id = row.values["id"]
        build.add({**defaults, **own}, job_id, shown_id, origin)


def _check_jobs(doc: dict, path: Path, stamp: tuple | None, model: Model, out: _Collector,
                registry: dict[str, Model] | None = None) -> list[Job]:
    defaults = _defaults(doc, out)
    listed = _listed_jobs(doc, out) or []
    total = _count(listed, out)
    if total is None:
        return []
    ctx = _Context(path, stamp, out.marks, defaults)
    build = _JobBuilder(model, ctx, LocalImages(path.parent), out, registry)
    _build_listed(listed, defaults, build, out)
    if "jobs_from" in doc:
        _build_from_file(doc, path, defaults, MAX_JOBS - total, build, out)
    _check_ids(build.jobs, out)
    ctx.release()
    return build.jobs


def resolve_output_dir(manifest_path: Path, doc_output: Any, override: str | Path | None) -> Path:
    """--output is relative to the current directory; `output:` to the manifest's folder."""
    if override is not None:
        return Path(override).absolute()
    if isinstance(doc_output, str) and doc_output:
        return (manifest_path.parent / doc_output).absolute()
    return (Path("output") / manifest_path.stem).absolute()


def load_manifest(path: str | Path, *, output: str | Path | None = None, cached: bool = True) -> Manifest:
    """Load and validate a manifest; raises ManifestError listing every problem (warnings included).

    With `cached`, a manifest unchanged since it last loaded without errors (it, and every file its
    validation read: see `batchrun.manifestcache`) is read from the validated-manifest cache instead of
    being parsed and validated again; the result is the same, warnings included. Every full load that
    finds no error refreshes the cache (`cached=False` always does a full load: `validate`)."""
    # Loading allocates a few million small objects and no reference cycles; left on, the cyclic
    # garbage collector rescans the growing heap over and over (about 1 s of a 100,000-job load).
    was_enabled = gc.isenabled()
    gc.disable()
    manifest = None
    try:
        path = Path(path)
        manifest = manifestcache.read(path, output) if cached else None
        if manifest is None and not manifestcache.in_use():
            manifest = _load_manifest(path, output)[0]
        elif manifest is None:
            with readlog.recording() as reads:
                manifest, facts = _load_manifest(path, output)
            manifestcache.write(manifest, lambda: _to_plain(manifest, facts), reads, path)
        return manifest
    finally:
        if was_enabled:
            if manifest is not None and len(manifest.jobs) >= FREEZE_JOBS:
                # Once enabled, the collector would scan the new objects (gen 0, then 1, then 2 and again at
                # exit: 0.2-0.3 s at 100,000 jobs) to find no cycle. Frozen, they are never scanned; they
                # are still freed by reference counting when the manifest is dropped.
                gc.freeze()
            gc.enable()


def _load_manifest(path: Path, output: str | Path | None) -> tuple[Manifest, tuple]:
    """The manifest, and what else the cache needs to rebuild it: (`output:` as written or None,
    whether the manifest has `output:`)."""
    stamp = _stamp(path)
    doc, marks = load_file(path)
    out = _Collector(str(path), marks)
    if not isinstance(doc, dict):
        got = ("a list" if isinstance(doc, list) else "null" if doc is None
               else f"{schema._type_name(doc)} {echo.shown(doc, 60)}")
        out.add((), "", f"a manifest must be a mapping with a 'jobs:' list, not {got}")
        raise ManifestError(out.problems)
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            out.add((key,), key, f"unknown setting{_did_you_mean(key, TOP_LEVEL_KEYS)}", at_key=True)
    if doc.get("version", 1) != 1:
        out.add(("version",), "version", f"this batchrun reads manifest version 1, not {echo.shown(doc['version'])}")
    model_id = doc.get("model", DEFAULT_MODEL)
    models_dir = doc.get("models_dir")
    if models_dir is not None:
        if not isinstance(models_dir, str) or not models_dir or "\0" in models_dir:
            out.add(("models_dir",), "models_dir", "must be a folder path (text)")
            raise ManifestError(out.problems)
        models_dir = path.parent / Path(models_dir).expanduser()
    try:
        registry = all_models(models_dir)
        model = get_model(model_id if isinstance(model_id, str) else str(model_id), models_dir)
    except UnknownModel as exc:
        out.add(("model",), "model", str(exc))
        raise ManifestError(out.problems) from None
    except ModelFileError as exc:
        out.add(("models_dir",) if "models_dir" in doc else ("model",),
                "models_dir" if "models_dir" in doc else "model", str(exc))
        raise ManifestError(out.problems) from None
    if "output" in doc and not (isinstance(doc["output"], str) and doc["output"] and "\0" not in doc["output"]):
        out.add(("output",), "output", "must be a folder path (text)")
    settings = _check_settings(doc, out)
    notify = _check_notify(doc, out)
    price, prices = _check_prices(doc, model, registry, out)
    jobs = _check_jobs(doc, path, stamp, model, out, registry)
    # The manifest's problems first, then those of its jobs file.
    out.problems.sort(key=lambda p: (p.file != out.file, p.file, p.line, p.column))
    if out.errors:
        raise ManifestError(out.problems)
    facts = (doc.get("output"), "output" in doc)
    return Manifest(
        path=path,
        model=model,
        price=price,
        settings=settings,
        output_dir=resolve_output_dir(path, doc.get("output"), output),
        jobs=jobs,
        warnings=out.problems,
        output_explicit=output is not None or "output" in doc,
        notify=notify,
        prices=prices,
        models_dir=user_dir(models_dir),
    ), facts


# --- the validated result as plain data (batchrun.manifestcache) ---------------------------------------


def _to_plain(manifest: Manifest, facts: tuple) -> tuple:
    """`manifest` as tuples, dicts, lists and strings that `manifest_from_plain` rebuilds it from (shared
    values, such as the input of a job's takes, stay shared through marshal)."""
    mc = manifestcache
    images: dict[int, int] = {}
    image_list: list[tuple] = []
    models: dict[int, int] = {}  # by object, as loaded: a job's own `model:` may be an equal copy
    model_list: list[dict] = []

    def model_index(model: Model) -> int:
        if id(model) not in models:
            models[id(model)] = len(model_list)
            model_list.append(mc.model_plain(model))
        return models[id(model)]

    own_model = model_index(manifest.model)
    ctx = None
    jobs = []
    for job in manifest.jobs:
        refs = ()
        if job.local_images:
            refs = []
            for path, image in job.local_images:
                if id(image) not in images:
                    images[id(image)] = len(image_list)
                    image_list.append(mc.image_plain(image))
                refs.append((path, images[id(image)]))
            refs = tuple(refs)
        origin = job.origin
        if isinstance(origin, _Combination):
            where = ("c", origin.index, origin.line, origin.keys, origin.choice)
        elif isinstance(origin, _Listed):
            where = ("l", origin.index, origin.line)
        elif isinstance(origin, _Row):
            where = ("r", origin.file, origin.index, origin.line, origin.columns, origin.own)
        else:
            raise ValueError("a job without its origin")
        ctx = origin.ctx
        jobs.append((job.id, job.input, job.input_sha256, job.line, job.file, where, refs, job.take, job.take_of,
                     None if job.model is None else model_index(job.model)))
    return (
        own_model,
        model_list,
        None if manifest.models_dir is None else str(manifest.models_dir),
        facts,
        mc.price_plain(manifest.price),
        {model_id: mc.price_plain(price) for model_id, price in manifest.prices.items()},
        mc.settings_plain(manifest.settings),
        list(manifest.notify),
        [mc.problem_plain(p) for p in manifest.warnings],
        ctx.defaults if ctx is not None else {},
        image_list,
        jobs,
    )


def manifest_from_plain(plain: tuple, path: Path, output: str | Path | None) -> Manifest:
    """The `Manifest` `_to_plain` made `plain` from, loaded from `path` with `--output` `output`.

    Raises (TypeError, ValueError, KeyError, ...) on anything not of that shape."""
    mc = manifestcache
    (own_model, model_list, models_dir, facts, price, prices, settings, notify, warnings, defaults, image_list,
     plain_jobs) = plain
    doc_output, output_in_doc = facts
    if not (isinstance(plain_jobs, list) and isinstance(defaults, dict) and isinstance(notify, list)
            and all(isinstance(url, str) for url in notify) and (models_dir is None or isinstance(models_dir, str))):
        raise ValueError("not a cached manifest")
    models = [mc.model_from_plain(model) for model in model_list]
    model = models[own_model]
    images = [mc.image_from_plain(image) for image in image_list]
    ctx = _Context(path, _stamp(path), None, defaults)
    ctx.release()
    jobs = []
    append = jobs.append
    for index, (job_id, job_input, digest, line, file, where, refs, take, take_of, job_model) in enumerate(plain_jobs):
        if not (type(job_id) is str and type(job_input) is dict and type(digest) is str and type(line) is int
                and type(file) is str and type(take) is int and type(take_of) is str):
            raise ValueError(f"job {index} is not of the cached shape")
        kind = where[0]
        if kind == "l":
            origin = _Listed(ctx, where[1], where[2])
        elif kind == "c":
            origin = _Combination(ctx, where[1], where[2], where[3], where[4])
        elif kind == "r":
            origin = _Row.__new__(_Row)
            origin.ctx, origin.file, origin.index, origin.line, origin.columns, origin.own = (ctx, *where[1:])
        else:
            raise ValueError(f"job {index}: unknown origin")
        local: dict[str, Path] = {}
        if refs:
            refs = tuple((tuple(at), images[image]) for at, image in refs)
            local = {_format_path(at)[1:]: image.path for at, image in refs}
        append(_new_job(index, job_id, job_input, digest, line, file, local, origin, refs, take, take_of,
                        None if job_model is None else models[job_model]))
    return Manifest(
        path=path,
        model=model,
        price=Price(**price),
        settings=Settings(**settings),
        output_dir=resolve_output_dir(path, doc_output, output),
        jobs=jobs,
        warnings=[Problem(*p) for p in warnings],
        output_explicit=output is not None or bool(output_in_doc),
        notify=notify,
        prices={key: Price(**value) for key, value in prices.items()},
        models_dir=None if models_dir is None else Path(models_dir),
        from_cache=True,
    )
