"""A model's input JSON Schema compiled once into plain Python checks that answer "valid", or "ask jsonschema".

jsonschema walks the schema afresh for every instance (a validator object and an error generator per
keyword and property): about 25 µs for a valid Kling job, most of a 100,000-job validate. The checks
compiled here cost about 2 µs and say only whether an input is certainly valid; when they say no, the
caller asks jsonschema, so every message about a bad input is still jsonschema's own, word for word.

The checks are conservative: they may send a valid input to jsonschema (an enum value written as 5.0
for 5, a value of a type YAML and JSON cannot make), never pass an invalid one. Compiled natively:
`type`, `enum`, `const`, `minimum`, `maximum`, `minLength`, `maxLength`, `minItems`, `maxItems`, `items`
(one schema for every item), `properties`, `required` and `additionalProperties`, with the integer rule
`schema.validator_for` gives (5.0 is not an integer). A property whose schema uses any other keyword
jsonschema knows (`pattern`, `anyOf`...) is checked by jsonschema's `is_valid` for that property alone;
a root schema with such a keyword, or any reference (`$ref`...) anywhere, or a draft before 6, is not
compiled at all (`compile_schema` gives None). Keywords jsonschema does not know (`title`, `_note`...)
are ignored, as jsonschema ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Check = Callable[[Any], bool]  # True: the value is valid for the schema; False: ask jsonschema

# Drafts whose keywords below mean what the checks assume (draft 4's boolean exclusiveMinimum, draft 3's
# `required` inside properties differ).
_DRAFTS = ("Draft6Validator", "Draft7Validator", "Draft201909Validator", "Draft202012Validator")
_REFERENCES = {"$ref", "$dynamicRef", "$recursiveRef"}
_COMPILED = {"type", "enum", "const", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
             "items", "properties", "required", "additionalProperties"}
_PLAIN = (str, int, float, bool, type(None))  # the scalar types a manifest's YAML, CSV or JSON gives


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, float)


_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def _uses_references(schema: Any) -> bool:
    if isinstance(schema, dict):
        return any(key in _REFERENCES or _uses_references(value) for key, value in schema.items())
    if isinstance(schema, list):
        return any(_uses_references(item) for item in schema)
    return False


def compile_schema(schema: Any, validator_class: type, base_class: type) -> Check | None:
    """The check of `schema` for `validator_class` (built on jsonschema's `base_class`), or None when it
    cannot be compiled (see the module's docstring): then every input goes to jsonschema."""
    import jsonschema  # here: only a command that validates needs it (60 ms)

    if base_class not in {getattr(jsonschema, name) for name in _DRAFTS} or _uses_references(schema):
        return None
    return _compile(schema, validator_class)


def _compile(schema: Any, cls: type) -> Check | None:
    """A check for `schema`, or None when it uses a keyword jsonschema knows and this module does not."""
    if schema is True:
        return lambda value: True
    if not isinstance(schema, dict) or any(key in cls.VALIDATORS and key not in _COMPILED for key in schema):
        return None
    checks: list[Check] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not all(isinstance(name, str) and name in _TYPES for name in names):
            return None
        kinds = [_TYPES[name] for name in names]
        checks.append(kinds[0] if len(kinds) == 1 else lambda v: any(kind(v) for kind in kinds))
    for keyword in ("enum", "const"):
        if keyword in schema:
            allowed = schema["enum"] if keyword == "enum" else [schema["const"]]
            if not isinstance(allowed, list):
                return None
            # Matched by type and value: `True` is not 1 in JSON Schema, and 5.0 for 5 is left to jsonschema.
            choices = {(type(v), v) for v in allowed if isinstance(v, _PLAIN)}
            checks.append(lambda v, choices=choices: isinstance(v, _PLAIN) and (type(v), v) in choices)
    bounds = [schema.get("minimum"), schema.get("maximum")]
    if bounds != [None, None]:
        if not all(b is None or (_is_number(b) and math.isfinite(b)) for b in bounds):
            return None
        low = -math.inf if bounds[0] is None else bounds[0]
        high = math.inf if bounds[1] is None else bounds[1]
        # jsonschema compares numbers only; anything else passes these keywords (the type says the rest).
        checks.append(lambda v, low=low, high=high: (low <= v <= high) if _is_number(v)
                      else isinstance(v, _PLAIN + (list, dict)))
    for low_key, high_key, kind in (("minLength", "maxLength", str), ("minItems", "maxItems", list)):
        if low_key in schema or high_key in schema:
            low, high = schema.get(low_key, 0), schema.get(high_key, math.inf)
            if not (_is_number(low) and _is_number(high)):
                return None
            checks.append(lambda v, low=low, high=high, kind=kind: not isinstance(v, kind) or low <= len(v) <= high)
    if "items" in schema:
        item = _compile_part(schema["items"], cls) if isinstance(schema["items"], dict) else None
        if item is None:
            return None
        checks.append(lambda v: not isinstance(v, list) or all(item(i) for i in v))
    object_check = _compile_object(schema, cls)
    if object_check is False:
        return None
    if object_check is not None:
        checks.append(object_check)
    return _all(checks)


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda value: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda value: first(value) and second(value)
    return lambda value: all(check(value) for check in checks)


def _compile_part(schema: Any, cls: type) -> Check | None:
    """A subschema's check: compiled natively where possible, else jsonschema's verdict on it alone
    (the root has no references, so a subschema means the same on its own)."""
    compiled = _compile(schema, cls)
    if compiled is not None:
        return compiled
    if schema is False:
        return lambda value: False
    try:
        return cls(schema).is_valid
    except Exception:  # noqa: BLE001 - a subschema jsonschema cannot take alone: leave the whole to it
        return None


def _compile_object(schema: dict, cls: type) -> Check | None | bool:
    """The check of `properties`, `required` and `additionalProperties` together (None: none given;
    False: cannot be compiled)."""
    if not any(key in schema for key in ("properties", "required", "additionalProperties")):
        return None
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    extra = schema.get("additionalProperties", True)
    if not isinstance(properties, dict) or not isinstance(required, list) or not isinstance(extra, (bool, dict)):
        return False
    parts = {}
    for name, subschema in properties.items():
        part = _compile_part(subschema, cls)
        if part is None:
            return False
        parts[name] = part
    extra_check = _compile_part(extra, cls) if isinstance(extra, dict) else None
    if isinstance(extra, dict) and extra_check is None:
        return False

    def check(value: Any) -> bool:
        if not isinstance(value, dict):
            return True  # these keywords apply to mappings only
        for name in required:
            if name not in value:
                return False
        for name, item in value.items():
            part = parts.get(name)
            if part is not None:
                if not part(item):
                    return False
            elif extra is False or (extra_check is not None and not extra_check(item)):
                return False
        return True

    return check
