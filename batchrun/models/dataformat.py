"""Reading one model data file: checked field by field, RunComfy's schema quirks normalised.

A data file is JSON with:
- ``model_id`` (text), ``title``, ``source`` (where its facts come from), ``expected_seconds``;
- ``output_kind`` ("video", "image" or "audio") and ``max_outputs`` (how many outputs a job may return);
- ``price``: the fields of `batchrun.models.pricing.Price` (null rates are unknown);
- ``input_schema``: the model's input as RunComfy publishes it; on load, ``"type": "float"`` becomes
  ``"number"``, RunComfy's own media formats (``image_uri``, ``image_uris``, ``video_uri(s)``,
  ``audio_uri(s)``) are taken out of the schema and become media fields, and a field's ``validations``
  list (Seedream) becomes ``rules.validations``;
- ``url_fields``: extra media fields by kind (nested ones such as ``elements[].frontal_image_url``);
- ``image_extensions``; ``rules`` (see ``RULE_KINDS``); ``prose_rules`` (text, shown by ``models show``).

A file that breaks any of this is a `ModelFileError` naming the file and the field.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from batchrun import readlog
from batchrun.errors import BatchrunError
from batchrun.models.pricing import UNITS, Price

OUTPUT_KINDS = ("video", "image", "audio")
# RunComfy's format name -> (media kind, whether the field is a list of them)
MEDIA_FORMATS = {
    "image_uri": ("image", False), "image_uris": ("image", True),
    "video_uri": ("video", False), "video_uris": ("video", True),
    "audio_uri": ("audio", False), "audio_uris": ("audio", True),
}
RULE_KINDS = ("sum_equals", "warn_max_chars", "warn_max_items", "mutually_exclusive", "at_least_one_of",
              "max_items_when", "validations", "image_limits")
TOP_KEYS = ("model_id", "title", "source", "page_url", "example_input", "expected_seconds", "output_kind",
            "max_outputs", "price",
            "input_schema", "url_fields", "image_extensions", "rules", "prose_rules", "schema_provenance")


class ModelFileError(BatchrunError):
    """A model data file that cannot be used; the message names the file and the field."""


def _fail(where: str, field: str, problem: str) -> ModelFileError:
    return ModelFileError(f"model file {where}: {field}: {problem}")


def normalise_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, list]]:
    """(the schema as valid JSON Schema, media fields by kind, validations by field) for a published schema.

    Quirks handled: ``"type": "float"`` (also inside a list of types) is ``"number"``; RunComfy's media
    formats are removed from the schema and listed as media fields (``images[]`` for a list field);
    ``validations`` on a field is moved out. Other unknown keys are kept.
    """
    schema = copy.deepcopy(schema)
    media: dict[str, list[str]] = {}
    validations: dict[str, list] = {}

    def fix_types(node: Any) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "float":
                node["type"] = "number"
            elif isinstance(kind, list):
                node["type"] = ["number" if k == "float" else k for k in kind]
            for value in node.values():
                fix_types(value)
        elif isinstance(node, list):
            for value in node:
                fix_types(value)

    fix_types(schema)
    for name, spec in (schema.get("properties") or {}).items():
        if not isinstance(spec, dict):
            continue
        for node, spec_path in ((spec, name), (spec.get("items"), f"{name}[]")):
            if not isinstance(node, dict):
                continue
            fmt = node.get("format")
            if fmt in MEDIA_FORMATS:
                kind, many = MEDIA_FORMATS[fmt]
                del node["format"]
                path = f"{name}[]" if many or spec_path.endswith("[]") else name
                if path not in media.setdefault(kind, []):
                    media[kind].append(path)
        if "validations" in spec:
            validations[name] = spec.pop("validations")
    return schema, media, validations


def _number(where: str, field: str, value: Any, *, nullable: bool) -> float | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _fail(where, field, f"must be a number of USD{' or null (unknown)' if nullable else ''}, "
                                  f"got {json.dumps(value)}")
    return float(value)


def read_price(where: str, raw: Any) -> Price:
    """The `Price` in a data file's ``price`` mapping (`ModelFileError` naming the bad field)."""
    if not isinstance(raw, dict):
        raise _fail(where, "price", "must be a mapping")
    known = Price.__dataclass_fields__
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = f"price.{key}"
        if key not in known:
            if key.startswith("note"):
                continue  # notes_facts and the like: for people
            raise _fail(where, field, f"unknown price field; known: {', '.join(known)}")
        if key.startswith("usd"):
            values[key] = _number(where, field, value, nullable=True)
        elif key in ("duration_field", "audio_field"):
            if value is not None and not isinstance(value, str):
                raise _fail(where, field, "must be a field name or null")
            values[key] = value
        elif key == "unit":
            if value not in UNITS:
                raise _fail(where, field, f"must be one of {', '.join(UNITS)}, got {json.dumps(value)}")
            values[key] = value
        elif key == "duration_unit":
            if value not in ("s", "ms"):
                raise _fail(where, field, f"must be \"s\" or \"ms\", got {json.dumps(value)}")
            values[key] = value
        elif key == "audio_inverted":
            if not isinstance(value, bool):
                raise _fail(where, field, "must be true or false")
            values[key] = value
        elif key == "multipliers":
            if not isinstance(value, dict) or not all(
                isinstance(t, dict) and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                            for f in t.values()) for t in value.values()):
                raise _fail(where, field, "must map a field to {value: factor}")
            values[key] = {k: {v: float(f) for v, f in t.items()} for k, t in value.items()}
    return Price(**values)


def _check_rules(where: str, rules: Any, properties: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(rules, dict):
        raise _fail(where, "rules", "must be a mapping")
    for kind, value in rules.items():
        field = f"rules.{kind}"
        if kind not in RULE_KINDS:
            raise _fail(where, field, f"unknown rule; known: {', '.join(RULE_KINDS)}")
        if kind in ("mutually_exclusive", "at_least_one_of"):
            if not isinstance(value, list) or not all(isinstance(g, list) and len(g) >= 2 for g in value):
                raise _fail(where, field, "must be a list of lists of two or more field names")
            for group in value:
                for name in group:
                    if name not in properties:
                        raise _fail(where, field, f"names {json.dumps(name)}, which is not an input field")
        if kind == "image_limits":
            if not isinstance(value, dict) or not set(value) <= {"min_side", "max_aspect", "who"} or any(
                    not isinstance(value.get(k, 1), (int, float)) or isinstance(value.get(k), bool)
                    for k in ("min_side", "max_aspect")):
                raise _fail(where, field, "must be {min_side: pixels, max_aspect: ratio, who: name}")
        if kind == "max_items_when":
            if not isinstance(value, list):
                raise _fail(where, field, "must be a list of {field, max, when_present}")
            for index, rule in enumerate(value):
                if not isinstance(rule, dict) or set(rule) != {"field", "max", "when_present"} \
                        or not isinstance(rule["max"], int):
                    raise _fail(where, f"{field}[{index}]", "must be {field, max (a whole number), when_present}")
                for key in ("field", "when_present"):
                    if rule[key] not in properties:
                        raise _fail(where, f"{field}[{index}].{key}",
                                    f"{json.dumps(rule[key])} is not an input field")
    return rules


def read_model_data(data: Any, where: str) -> dict[str, Any]:
    """The checked, normalised fields of one data file's JSON `data`; `where` names it in errors."""
    if not isinstance(data, dict):
        raise _fail(where, "(top)", "must be a JSON object")
    for key in data:
        if key not in TOP_KEYS and not key.startswith("note"):
            raise _fail(where, key, f"unknown field; known: {', '.join(TOP_KEYS)}")
    model_id = data.get("model_id")
    if not isinstance(model_id, str) or not model_id.strip() or model_id != model_id.strip():
        raise _fail(where, "model_id", "must be the model's id as text, such as \"kling/kling-3.0/pro/text-to-video\"")
    raw_schema = data.get("input_schema")
    if not isinstance(raw_schema, dict) or not isinstance(raw_schema.get("properties"), dict):
        raise _fail(where, "input_schema", "must be a JSON Schema object with properties")
    schema, media, validations = normalise_schema(raw_schema)
    import jsonschema  # here: a command that reads a cached manifest never validates, and this import is 60 ms

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.absolute_path)
        raise _fail(where, f"input_schema{'/' + at if at else ''}", exc.message) from None
    output_kind = data.get("output_kind", "video")
    if output_kind not in OUTPUT_KINDS:
        raise _fail(where, "output_kind", f"must be one of {', '.join(OUTPUT_KINDS)}, got {json.dumps(output_kind)}")
    max_outputs = data.get("max_outputs", 1)
    if isinstance(max_outputs, bool) or not isinstance(max_outputs, int) or max_outputs < 1:
        raise _fail(where, "max_outputs", f"must be a whole number of at least 1, got {json.dumps(max_outputs)}")
    expected = data.get("expected_seconds", 90)
    if isinstance(expected, bool) or not isinstance(expected, (int, float)) or expected <= 0:
        raise _fail(where, "expected_seconds", "must be a positive number of seconds")
    url_fields = copy.deepcopy(data.get("url_fields", {}))
    if not isinstance(url_fields, dict) or any(k not in OUTPUT_KINDS or not isinstance(v, list)
                                               for k, v in url_fields.items()):
        raise _fail(where, "url_fields", "must map image, video or audio to a list of field paths")
    for kind, paths in media.items():
        merged = url_fields.setdefault(kind, [])
        merged.extend(p for p in paths if p not in merged)
    rules = dict(_check_rules(where, data.get("rules", {}), schema["properties"]))
    if validations:
        rules["validations"] = {**rules.get("validations", {}), **validations}
    price = read_price(where, data.get("price", {"usd_per_second": None}))
    for key in ("duration_field", "audio_field"):
        name = getattr(price, key)
        if name is not None and name not in schema["properties"]:
            raise _fail(where, f"price.{key}", f"{json.dumps(name)} is not an input field (null if the model has none)")
    extensions = data.get("image_extensions", [])
    if not isinstance(extensions, list) or not all(isinstance(e, str) for e in extensions):
        raise _fail(where, "image_extensions", "must be a list of file endings")
    return {
        "model_id": model_id,
        "title": str(data.get("title") or model_id),
        "source": str(data.get("source") or ""),
        "input_schema": schema,
        "price": price,
        "url_fields": url_fields,
        "image_extensions": tuple(extensions),
        "rules": rules,
        "prose_rules": tuple(str(p) for p in data.get("prose_rules", [])),
        "expected_seconds": float(expected),
        "output_kind": output_kind,
        "max_outputs": max_outputs,
    }


def read_model_file(path: Path | Any, where: str | None = None) -> dict[str, Any]:
    """`read_model_data` of a file (a Path or an importlib resource); unreadable JSON is a ModelFileError."""
    where = where or str(path)
    try:
        if isinstance(path, Path):  # a user folder's file: recorded for the validated-manifest cache
            data = json.loads(readlog.read_bytes(path).decode("utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"model file {where}: cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"model file {where}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    return read_model_data(data, where)
