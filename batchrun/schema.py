"""Validation of one job's model input: the vendored JSON Schema plus the rules stated only in prose.

Every finding is a `Finding` with a path inside the input (such as ``("multi_prompt", 1, "duration")``);
the manifest turns paths into file positions. Nothing here stops at the first problem.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchrun import echo, imageinfo, schemacompile
from batchrun.models import Model

if TYPE_CHECKING:
    import jsonschema


@dataclass(frozen=True)
class Finding:
    path: tuple
    message: str
    severity: str = "error"
    at_key: bool = False  # point at the key itself (unknown keys), not its value
    # A field of the input the finding's verdict rests on though it is not at `path` (the total of a
    # `sum_equals` rule): the manifest says where its value came from (the job, `defaults`).
    depends_on: str | None = None


_validators: dict[str, tuple[dict, Any]] = {}  # per model id: (its schema, its validator)
# Per model id: (its schema, (validator of the schema with type-only properties set to `true`,
# {property: Python type})).
_fast_paths: dict[str, tuple[dict, tuple[Any, dict[str, type]]]] = {}
# Per model id: (its schema, its compiled check or None).
_quick_checks: dict[str, tuple[dict, schemacompile.Check | None]] = {}
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}


def validator_for(model: Model):
    """A compiled validator per model, built once: schema checking dominates a 100,000-job validate."""
    cached = _validators.get(model.model_id)
    # Keyed by id, checked by schema object: a user file may replace a model of the same id.
    validator = cached[1] if cached is not None and cached[0] is model.input_schema else None
    if validator is None:
        import jsonschema  # here: a command that reads a cached manifest never validates (60 ms)

        cls = jsonschema.validators.validator_for(model.input_schema)
        cls.check_schema(model.input_schema)
        # JSON Schema counts 5.0 as an integer; the API wants 5, and the prose rules add up ints.
        strict_int = cls.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
        cls = jsonschema.validators.extend(cls, type_checker=strict_int)
        validator = cls(model.input_schema)
        _validators[model.model_id] = (model.input_schema, validator)
    return validator


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "text", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    return echo.shown(value)


def _schema_findings(error: jsonschema.ValidationError) -> list[Finding]:
    path = tuple(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        return [
            Finding(path + (key,), f"unknown field {echo.quoted(key)}{_did_you_mean(key, allowed)}", at_key=True)
            for key in error.instance
            if key not in allowed
        ]
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [Finding(path, f"missing required field {missing!r}")]
    if kind == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        expected = {"string": "text", "object": "a mapping", "array": "a list", "integer": "a whole number",
                    "number": "a number", "boolean": "true or false"}.get(expected, expected)
        instance = error.instance
        if expected == "a whole number" and isinstance(instance, float) and math.isfinite(instance):
            # YAML reads `5.0` as a float; say which whole number was likely meant, without a decimal point.
            like = int(instance) if instance.is_integer() else math.floor(instance)
            return [Finding(path, f"must be a whole number like {like}, not {instance!r}")]
        return [Finding(path, f"must be {expected}, not {_type_name(instance)} {_show(instance)}")]
    if kind in ("minimum", "maximum"):
        word = "at least" if kind == "minimum" else "at most"
        return [Finding(path, f"must be {word} {error.validator_value}, got {_show(error.instance)}")]
    if kind == "enum":
        options = ", ".join(repr(v) for v in error.validator_value)
        return [Finding(path, f"must be one of {options}, got {_show(error.instance)}")]
    if kind in ("maxItems", "minItems"):
        word = "at most" if kind == "maxItems" else "at least"
        return [Finding(path, f"must have {word} {error.validator_value} items, has {len(error.instance)}")]
    return [Finding(path, echo.cut(echo.redact(error.message), 300))]


@functools.lru_cache(maxsize=1024)
def _steps(spec: str) -> tuple[tuple[str, bool], ...]:
    """A field spec such as ``elements[].reference_image_urls[]`` as ((name, is a list), ...)."""
    steps = []
    while spec:
        head, _, spec = spec.partition(".")
        steps.append((head[:-2], True) if head.endswith("[]") else (head, False))
    return tuple(steps)


def _values_at(value: Any, spec: str, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) for a field spec such as ``elements[].reference_image_urls[]``, in order."""
    steps = _steps(spec)
    if len(steps) == 1 and not steps[0][1]:  # a top-level field, the usual case: no walk
        name = steps[0][0]
        return [(path + (name,), value[name])] if isinstance(value, dict) and name in value else []
    found: list[tuple[tuple, Any]] = []
    _walk(value, steps, 0, path, found)
    return found


def _walk(value: Any, steps: tuple[tuple[str, bool], ...], at: int, path: tuple, found: list) -> None:
    if at == len(steps):
        found.append((path, value))
        return
    name, many = steps[at]
    if not isinstance(value, dict) or name not in value:
        return
    child = value[name]
    if many:
        if isinstance(child, list):
            for i, item in enumerate(child):
                _walk(item, steps, at + 1, path + (name, i), found)
    else:
        _walk(child, steps, at + 1, path + (name,), found)


# A value that starts like a URL is checked as one; anything else in an image field is a local file's path.
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|(?:https?|ftp|file|s3|gs):", re.IGNORECASE)
_DATA_URI = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
MAX_DATA_URI_BYTES = 6 * 1024 * 1024  # RunComfy's own clients cap each inline image at 6 MiB


def image_ref_kind(value: str) -> str:
    """How an image field's text is sent: "data" (a data: URI), "url", or "file" (a local path to inline).

    A value with a scheme followed by ``://`` (or a well-known scheme such as ``https:``) is a URL; anything
    else is a path relative to the manifest's folder.
    """
    if value[:5].lower() == "data:":
        return "data"
    if _URL_LIKE.match(value):
        return "url"
    return "file"


def image_values(model: Model, job_input: dict[str, Any]):
    """Yield (path, value) for every text value of the model's image fields, in field order."""
    for spec in model.url_fields.get("image", []):
        for path, value in _values_at(job_input, spec):
            if isinstance(value, str):
                yield path, value


_VALIDATION_READINGS = {  # a `validations` rule's quantity, from (width, height, bytes)
    "width_pixels": lambda w, h, n: w, "height_pixels": lambda w, h, n: h,
    "width/height": lambda w, h, n: w / h if h else None, "file_size_mb": lambda w, h, n: n / 2**20,
}


def image_limit_problems(model: Model, path: tuple, width: int | None, height: int | None,
                         size: int | None) -> list[str]:
    """Why `model` refuses an image of these facts in its field at `path` (each a predicate: "is 10x10
    px; ..."): its ``rules.image_limits`` (``min_side``, ``max_aspect``: Kling's pixel rules) and the
    ``rules.validations`` published for that field (Seedream: ``width_pixels>``, ``file_size_mb<``...)."""
    problems: list[str] = []
    known = width is not None and height is not None
    limits = model.rules.get("image_limits")
    if limits and known:
        problems.extend(imageinfo.size_problems(width, height, limits.get("min_side"), limits.get("max_aspect"),
                                                limits.get("who", model.title)))
    field = next((p for p in path if isinstance(p, str)), None)
    for rule in model.rules.get("validations", {}).get(field, []):
        text = str(rule.get("validation_rule", ""))
        reading = _VALIDATION_READINGS.get(text[:-1])
        if reading is None or text[-1:] not in "<>" or (not known and text[:-1] != "file_size_mb") \
                or (size is None and text[:-1] == "file_size_mb"):
            continue  # a rule batchrun cannot evaluate, or facts it does not have
        got, limit = reading(width or 0, height or 0, size or 0), rule.get("validation_value")
        if got is None or not isinstance(limit, (int, float)):
            continue
        if not (got < limit if text[-1] == "<" else got > limit):
            said = str(rule.get("validation_error") or f"needs {text} {limit}").removeprefix("[paraphrased] ")
            facts = f"{width}x{height} px" if known else f"{(size or 0) / 2**20:.1f} MiB"
            problems.append(f"is {facts}; {said} ({text[:-1]} must be {text[-1]} {limit:g})")
    return problems


def _check_data_uri(path: tuple, value: str, model: Model | None = None) -> list[Finding]:
    """A data: URI written in the manifest: base64, an image type, at most 6 MiB, within Kling's limits."""
    match = _DATA_URI.match(value)
    if not match:
        return [Finding(path, "is not a valid data: URI (expected data:image/png;base64,...)")]
    mime, params = match.group(1).strip().lower(), match.group(2).lower().split(";")
    if "base64" not in (p.strip() for p in params):
        return [Finding(path, "the data: URI must be base64-encoded (data:image/png;base64,...)")]
    payload = value[match.end():]
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > MAX_DATA_URI_BYTES:
        return [Finding(path, f"the data: URI holds {size / 2**20:.1f} MiB; an image sent inline is limited to "
                              f"{MAX_DATA_URI_BYTES // 2**20} MiB")]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return [Finding(path, "the data: URI's base64 text is not valid")]
    facts = imageinfo.inspect(data)
    problems = imageinfo.format_problems(facts)
    if model is not None and not problems:
        problems = image_limit_problems(model, path, facts.width, facts.height, len(data))
    elif model is None:
        problems = imageinfo.image_problems(facts)
    findings = [Finding(path, f"the data: URI's content {problem}") for problem in problems]
    if facts.accepted and mime and not mime.startswith("image/"):
        findings.append(Finding(path, f"the data: URI declares {mime!r}; use {facts.mime}", "warning"))
    return findings


# An https URL whose host is plain ASCII letters, digits, dots and dashes, without user, port or whitespace:
# `urlsplit` would give scheme "https", this host and the path up to '?' or '#', so the slow parse (and
# its port check) is skipped for the usual image URL.
_PLAIN_HTTPS = re.compile(r"https://([A-Za-z0-9.-]+)(/[^?#\s]*)?(?:\?[^#\s]*)?(?:#\S*)?")


def _url_parts(value: str) -> tuple[str, str, str]:
    """(scheme, netloc, path) of `value` as `urlsplit` reads them; ValueError as `urlsplit` or its port
    check raise it."""
    plain = _PLAIN_HTTPS.fullmatch(value)
    if plain:
        return "https", plain.group(1), plain.group(2) or ""
    parts = urlsplit(value)
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    return parts.scheme, parts.netloc, parts.path


def _check_url(path: tuple, value: Any, extensions: tuple[str, ...]) -> list[Finding]:
    if not isinstance(value, str):
        return []  # the schema reports the type
    global _last_url
    last_value, last_extensions, verdict = _last_url
    if value != last_value or extensions != last_extensions:
        verdict = _url_verdict(value, extensions)
        _last_url = (value, extensions, verdict)
    if not verdict:
        return []
    if verdict == "invalid":
        return [Finding(path, f"is not a valid URL: {echo.quoted(value)}")]
    if verdict == "http":
        return [Finding(path, "must be an https:// URL (RunComfy fetches inputs over HTTPS only)")]
    if verdict == "not https":
        return [Finding(path, f"must be an https:// URL, got {echo.quoted(value)}")]
    allowed = ", ".join(extensions)
    return [Finding(path, f"the URL does not end in a known image type ({allowed}); "
                          "fine if the host serves an image anyway", "warning")]


# The last image URL checked and its verdict: jobs that share one (a `defaults` URL) have it parsed once
# per load, not once per job, and a manifest of distinct URLs pays one comparison each.
_last_url: tuple[str | None, tuple[str, ...], str] = (None, (), "")


def _url_verdict(value: str, extensions: tuple[str, ...]) -> str:
    """What is wrong with an image URL ("" when nothing). The messages are made by the caller: they
    quote the URL through `echo`, which redacts the token of the moment."""
    try:
        scheme, netloc, url_path = _url_parts(value)
    except ValueError:
        return "invalid"
    if scheme != "https" or not netloc:
        return "http" if scheme == "http" else "not https"
    ending = url_path.rsplit(".", 1)[-1].lower() if "." in url_path.rsplit("/", 1)[-1] else ""
    if extensions and ending not in extensions:
        return "extension"
    return ""


Finder = Callable[[Any], Sequence[tuple[tuple, Any]]]  # a field spec's (path, value) pairs in an input


def _finder(spec: str) -> Finder:
    """`_values_at` for one spec, with a top-level field (most of them) looked up without a walk."""
    steps = _steps(spec)
    if len(steps) == 1 and not steps[0][1]:
        name = steps[0][0]
        path = (name,)
        return lambda value: ((path, value[name]),) if isinstance(value, dict) and name in value else ()
    return lambda value: _values_at(value, spec)


# Per model id: (the model, the finders of its rules' fields), made once per model, not once per job.
_finders: dict[str, tuple[Model, tuple]] = {}


def _rule_fields(model: Model) -> tuple[tuple[tuple[Finder, int], ...], tuple[tuple[Finder, int], ...],
                                        tuple[Finder, ...], tuple[Finder, ...]]:
    """The finders of `warn_max_chars`, `warn_max_items` (each with its limit), the image fields, and the
    video and audio fields, in the order of the model's data file."""
    cached = _finders.get(model.model_id)
    if cached is None or cached[0] is not model:
        rules, urls = model.rules, model.url_fields
        cached = (model, (
            tuple((_finder(spec), limit) for spec, limit in rules.get("warn_max_chars", {}).items()),
            tuple((_finder(spec), limit) for spec, limit in rules.get("warn_max_items", {}).items()),
            tuple(_finder(spec) for spec in urls.get("image", [])),
            tuple(_finder(spec) for kind in ("video", "audio") for spec in urls.get(kind, [])),
        ))
        _finders[model.model_id] = cached
    return cached[1]


def _prose_rules(model: Model, job_input: dict[str, Any], local_refs: list | None) -> list[Finding]:
    findings: list[Finding] = []
    rules = model.rules
    for rule in rules.get("sum_equals", []):
        items = job_input.get(rule["items"])
        if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
            continue  # the schema reports the types
        item_field = rule["item_field"]
        item_default = (
            model.input_schema["properties"][rule["items"]].get("items", {})
            .get("properties", {}).get(item_field, {}).get("default", 0)
        )
        parts = [item.get(item_field, item_default) for item in items]
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
            continue  # the schema reports the types
        total = job_input.get(rule["total"], model.default(rule["total"]))
        if isinstance(total, int) and sum(parts) != total:
            shown = " + ".join(str(p) for p in parts)
            whence = "" if rule["total"] in job_input else " (the model's default)"
            findings.append(Finding((rule["items"],),
                                    f"segment {item_field}s add up to {shown} = {sum(parts)}, "
                                    f"but {rule['total']} is {total}{whence}; they must be equal",
                                    depends_on=rule["total"]))
    max_chars, max_items, image_fields, media_fields = _rule_fields(model)
    for find, limit in max_chars:
        for path, value in find(job_input):
            if isinstance(value, str) and len(value) > limit:
                findings.append(Finding(path, f"is {len(value)} characters; Kling accepts at most {limit}",
                                        "warning"))
    for find, limit in max_items:
        for path, value in find(job_input):
            if isinstance(value, list) and len(value) > limit:
                findings.append(Finding(path, f"has {len(value)} items; Kling accepts at most {limit}",
                                        "warning"))
    for find in image_fields:
        for path, value in find(job_input):
            if not isinstance(value, str):
                continue  # the schema reports the type
            kind = image_ref_kind(value)
            if kind == "url":
                findings.extend(_check_url(path, value, model.image_extensions))
            elif kind == "data":
                findings.extend(_check_data_uri(path, value, model))
            elif local_refs is not None:
                local_refs.append((path, value))  # checked by the caller, which knows the manifest's folder
    for find in media_fields:  # video and audio: sent as https:// URLs only (no local files yet for these kinds)
        for path, value in find(job_input):
            findings.extend(f for f in _check_url(path, value, ()) if f.severity == "error")
    findings.extend(_field_rules(rules, job_input))
    return findings


def _present(job_input: dict[str, Any], name: str) -> bool:
    value = job_input.get(name)
    return value not in (None, "", [], {})


def _field_rules(rules: dict[str, Any], job_input: dict[str, Any]) -> list[Finding]:
    """The rules between fields that a model's page states in prose (batchrun.models.dataformat.RULE_KINDS)."""
    findings = []
    for group in rules.get("mutually_exclusive", []):
        given = [name for name in group if _present(job_input, name)]
        if len(given) > 1:
            findings.append(Finding((given[1],), f"cannot be combined with {given[0]!r}; give only one of "
                                                  + ", ".join(repr(n) for n in group)))
    for group in rules.get("at_least_one_of", []):
        if not any(_present(job_input, name) for name in group):
            findings.append(Finding((), "give at least one of " + ", ".join(repr(n) for n in group)))
    for rule in rules.get("max_items_when", []):
        items = job_input.get(rule["field"])
        if isinstance(items, list) and len(items) > rule["max"] and _present(job_input, rule["when_present"]):
            findings.append(Finding((rule["field"],), f"has {len(items)} items; at most {rule['max']} are allowed "
                                                      f"when {rule['when_present']!r} is given"))
    return findings


def _fast_path(model: Model) -> tuple[Any, dict[str, type]]:
    """Descending into a property costs jsonschema more than everything else a job needs; for properties
    whose schema is only `type: string` or `type: boolean` (plus annotations), an isinstance check says the
    same. Inputs that pass those checks are validated against the schema with those properties set to
    `true`, which gives the same errors; any other input goes through the full schema."""
    cached = _fast_paths.get(model.model_id)
    fast = cached[1] if cached is not None and cached[0] is model.input_schema else None
    if fast is None:
        full = validator_for(model)
        properties = model.input_schema.get("properties", {})
        kinds = {
            name: {"string": str, "boolean": bool}[spec["type"]]
            for name, spec in properties.items()
            if isinstance(spec, dict) and spec.get("type") in ("string", "boolean")
            and set(spec) <= _ANNOTATIONS | {"type"}
        }
        residual = {**model.input_schema, "properties": {k: True if k in kinds else v for k, v in properties.items()}}
        fast = (type(full)(residual), kinds)
        _fast_paths[model.model_id] = (model.input_schema, fast)
    return fast


def quick_check(model: Model) -> schemacompile.Check | None:
    """The model's schema compiled to plain checks (see `batchrun.schemacompile`), built once per model;
    None when the schema cannot be compiled."""
    cached = _quick_checks.get(model.model_id)
    if cached is None or cached[0] is not model.input_schema:
        validator = validator_for(model)
        import jsonschema

        base = jsonschema.validators.validator_for(model.input_schema)
        cached = (model.input_schema, schemacompile.compile_schema(model.input_schema, type(validator), base))
        _quick_checks[model.model_id] = cached
    return cached[1]


def _schema_errors(model: Model, job_input: Any):
    quick = quick_check(model)
    if quick is not None and quick(job_input):
        return ()  # certainly valid: jsonschema would find nothing
    residual, kinds = _fast_path(model)
    if isinstance(job_input, dict) and all(
        isinstance(value, kinds[key]) for key, value in job_input.items() if key in kinds
    ):
        return residual.iter_errors(job_input)
    return validator_for(model).iter_errors(job_input)


def check_input(model: Model, job_input: dict[str, Any], *, local_refs: list | None = None) -> list[Finding]:
    """Every problem with one job's full input, errors and warnings, in a stable order.

    Image fields may hold an https:// URL, a `data:` URI or a local file's path; paths are not checked
    here (they are relative to the manifest's folder): when `local_refs` is a list, each image field
    holding one is appended to it as (path in the input, value).
    """
    findings: list[Finding] = []
    for error in _schema_errors(model, job_input):
        findings.extend(_schema_findings(error))
    findings.extend(_prose_rules(model, job_input, local_refs))
    if len(findings) < 2:  # the usual valid job: nothing to order
        return findings
    return sorted(findings, key=lambda f: [str(p) for p in f.path])
