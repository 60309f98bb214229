"""The fast paths of validation say exactly what the slow ones say.

- A schema compiled by `batchrun.schemacompile` never passes an input jsonschema refuses (every shipped
  model's schema and hand-made ones with every keyword, compiled or not), and passes the usual valid ones.
- A user model whose schema uses keywords that are not compiled still has every bad input refused, located.
- The URL fast path reads a URL as `urlsplit` does; the input digest is json.dumps's, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from datetime import timedelta
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchrun import schema, schemacompile
from batchrun.cli import main
from batchrun.manifest import input_sha256
from batchrun.models import all_models, get_model

# Bounded: a few seconds in all on a shared core (22 models, 14 hand-made schemas).
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=25)
SHIPPED = sorted(all_models())
URL = "https://example.com/a.png"

SCALARS = [None, True, False, 0, 1, -1, 3, 5, 5.0, 10, 15, 16, 0.5, 1.5, -0.5, 2**70, float("nan"), "", "x", "5",
           "true", URL, "customize", "a" * 3000, "Möwen"]


def jsons():
    """JSON-like values one level deep (deeper ones cost hypothesis more to draw than the checks to run)."""
    scalars = st.sampled_from(SCALARS) | st.integers() | st.floats() | st.text(max_size=5)
    keys = st.sampled_from(["prompt", "duration", "a", "b", "frontal_image_url"]) | st.text(max_size=3)
    return scalars | st.lists(scalars, max_size=4) | st.dictionaries(keys, scalars, max_size=4)


def values_for(spec) -> st.SearchStrategy:
    """Values that reach each keyword of a property's schema: its enum, its bounds and around them, lists
    of near-valid items, mappings of near-valid properties, and other JSON."""
    near = [*SCALARS]
    if isinstance(spec, dict):
        near += spec.get("enum", [])
        for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
            if key in spec:
                bound = spec[key]
                near += [bound, bound - 1, bound + 1, float(bound), bound + 0.5]
        if isinstance(spec.get("items"), dict):
            count = spec.get("maxItems", 3) + 1
            return st.sampled_from(near) | st.lists(values_for(spec["items"]), max_size=count) | jsons()
        if isinstance(spec.get("properties"), dict):
            optional = {name: values_for(sub) for name, sub in spec["properties"].items()}
            return st.sampled_from(near) | st.fixed_dictionaries({}, optional=optional) | jsons()
    return st.sampled_from(near) | jsons()


def valid_for(spec) -> st.SearchStrategy:
    """Values a property's schema accepts (for the schemas of the shipped models)."""
    if not isinstance(spec, dict):
        return st.just("x")
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    kind = spec.get("type")
    low, high = spec.get("minimum"), spec.get("maximum")
    if kind == "integer":
        return st.integers(low, high)
    if kind == "number":
        return st.floats(low, high, allow_nan=False, allow_infinity=False) | st.integers(
            None if low is None else math.ceil(low), None if high is None else math.floor(high))
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(valid_for(spec.get("items", {})), min_size=spec.get("minItems", 0),
                        max_size=spec.get("maxItems", 3))
    if kind == "object":
        props, required = spec.get("properties", {}), spec.get("required", [])
        return st.fixed_dictionaries({name: valid_for(props[name]) for name in required},
                                     optional={n: valid_for(sub) for n, sub in props.items() if n not in required})
    return st.sampled_from(["x", URL, "Möwen", ""])


@st.composite
def inputs_for(draw, model_schema: dict) -> dict:
    """A valid input with up to two fields changed (removed, or given a value near a limit, or any)."""
    props, required = model_schema.get("properties", {}), model_schema.get("required", [])
    job_input = draw(st.fixed_dictionaries(
        {name: valid_for(props[name]) for name in required},
        optional={name: valid_for(spec) for name, spec in props.items() if name not in required}))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*props, "durration"]))
        if name in job_input and draw(st.booleans()):
            del job_input[name]
        else:
            job_input[name] = draw(values_for(props.get(name, {})))
    return job_input


def full_errors(model, job_input) -> list:
    return list(schema.validator_for(model).iter_errors(job_input))


@pytest.mark.parametrize("model_id", SHIPPED)
def test_every_shipped_schema_compiles(model_id):
    assert schema.quick_check(get_model(model_id)) is not None


@pytest.mark.parametrize("model_id", SHIPPED)
@FEW
@given(data=st.data())
def test_a_compiled_schema_never_passes_what_jsonschema_refuses(model_id, data):
    model = get_model(model_id)
    job_input = data.draw(inputs_for(model.input_schema))
    if schema.quick_check(model)(job_input):
        assert full_errors(model, job_input) == []
    # Either way the findings are jsonschema's own.
    found = [(f.path, f.message) for f in schema.check_input(model, job_input) if f.severity == "error"]
    expected = [(f.path, f.message) for e in full_errors(model, job_input) for f in schema._schema_findings(e)]
    assert set(expected) <= set(found)


def test_usual_inputs_pass_the_compiled_check_and_bad_ones_do_not():
    model = get_model("kling/kling-3.0/standard/image-to-video")
    check = schema.quick_check(model)
    good = {"prompt": "p", "start_image_url": URL, "duration": 5, "generate_audio": False, "cfg_scale": 0.5,
            "shot_type": "customize", "multi_prompt": [{"prompt": "a", "duration": 3}, {"prompt": "b"}],
            "elements": [{"frontal_image_url": URL, "reference_image_urls": [URL]}]}
    assert check(good) and full_errors(model, good) == []
    for bad in ({"duration": 5.0}, {"duration": True}, {"duration": 2}, {"cfg_scale": 1.5}, {"shot_type": "x"},
                {"prompt": None}, {"extra": 1}, {"multi_prompt": [{"duration": 5}]}, {"elements": [{}, {}, {}, {}]},
                {"elements": [{"reference_image_urls": [5]}]}):
        changed = {**good, **bad}
        assert not check(changed) and full_errors(model, changed), bad
    missing = {k: v for k, v in good.items() if k != "start_image_url"}
    assert not check(missing) and full_errors(model, missing)


HAND_MADE = [
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a+$", "minLength": 2}}},
    {"type": "object", "properties": {"a": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}}},
    {"type": "object", "properties": {"a": {"type": ["integer", "null"], "minimum": 1}, "b": {"const": "x"}}},
    {"type": "object", "properties": {"a": {"enum": [1, "a", None, True, 2.5]}}, "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}, "maxItems": 2,
                                            "minItems": 1}}},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "required": ["b"],
                                                                         "properties": {"b": {"type": "boolean"}},
                                                                         "additionalProperties": False}}}},
    {"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}},
    {"type": "object", "properties": {"a": {"type": "string", "format": "email"}, "b": {"not": {"type": "null"}}}},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {"type": "integer"}}},
    {"type": "object", "properties": {"a": {"type": "array", "prefixItems": [{"type": "string"}],
                                            "items": False}}},
    {"type": "object", "properties": {"a": True, "b": False}, "dependentRequired": {"a": ["c"]}},
    {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
     "properties": {"a": {"type": "number", "minimum": 0, "exclusiveMinimum": True}}},
    {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
     "properties": {"a": {"type": "array", "items": [{"type": "string"}], "additionalItems": False}}},
]


def compiled(raw: dict):
    base = jsonschema.validators.validator_for(raw)
    strict = base.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    cls = jsonschema.validators.extend(base, type_checker=strict)
    return schemacompile.compile_schema(raw, cls, base), cls(raw)


@pytest.mark.parametrize("raw", HAND_MADE, ids=range(len(HAND_MADE)))
@FEW
@given(data=st.data())
def test_a_compiled_hand_made_schema_never_passes_what_jsonschema_refuses(raw, data):
    check, validator = compiled(raw)
    value = data.draw(st.fixed_dictionaries({}, optional={k: values_for(raw.get("properties", {}).get(k, {}))
                                                          for k in ("a", "b", "c")}) | jsons())
    if check is not None and check(value):
        assert validator.is_valid(value), value


def test_what_is_not_compiled_is_left_to_jsonschema():
    assert compiled(HAND_MADE[9])[0] is None  # a reference
    assert compiled(HAND_MADE[11])[0] is None  # a root keyword it does not know
    assert compiled(HAND_MADE[12])[0] is None  # draft 4
    check, _ = compiled(HAND_MADE[0])  # `pattern`: jsonschema checks that property alone
    assert check({"a": "aa"}) and not check({"a": "ab"}) and not check({"a": "a"})
    check, _ = compiled(HAND_MADE[4])
    assert check({"a": 1}) and check({"a": True}) and not check({"a": 1.0}) and not check({"a": 2})


def user_model(tmp_path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    data = {"model_id": "acme/codes/text-to-video", "output_kind": "video",
            "price": {"usd_per_output": 0.5, "duration_field": None, "audio_field": None},
            "input_schema": {"type": "object", "required": ["prompt"], "additionalProperties": False,
                             "properties": {"prompt": {"type": "string"},
                                            "code": {"type": "string", "pattern": "^[a-z]+$"},
                                            "level": {"anyOf": [{"type": "integer", "minimum": 1},
                                                                {"type": "null"}]},
                                            "ratio": {"type": "number", "exclusiveMaximum": 1}}}}
    (folder / "codes.json").write_text(json.dumps(data), encoding="utf-8")


def test_a_user_model_with_keywords_not_compiled_still_refuses_bad_input(tmp_path):
    user_model(tmp_path)
    jobs = [{"id": "good", "prompt": "p", "code": "abc", "level": None, "ratio": 0.5},
            {"id": "good2", "prompt": "p", "level": 3},
            {"id": "badcode", "prompt": "p", "code": "ABC"},
            {"id": "badlevel", "prompt": "p", "level": 0},
            {"id": "badratio", "prompt": "p", "ratio": 1}]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"model": "acme/codes/text-to-video", "models_dir": "models", "jobs": jobs},
                                   sort_keys=False), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate", str(path)], stdout=out, stderr=err) == 2
    lines = out.getvalue().splitlines()
    written = path.read_text(encoding="utf-8").splitlines()
    for index, field, text in ((2, "code", "code: ABC"), (3, "level", "level: 0"), (4, "ratio", "ratio: 1")):
        line = next(n for n, row in enumerate(written, 1) if row.strip() == text)
        column = written[line - 1].index(text) + len(field) + 3
        assert any(row.startswith(f"{path}:{line}:{column}: jobs[{index}] (id={jobs[index]['id']}).{field}: ")
                   for row in lines), lines
    assert lines[-1] == f"{path}: invalid: 3 errors"


URL_PARTS = ["https://", "http://", "HTTPS://", "ftp://", "//", "images.example.com", "e.com", "a-b.c", "", ":",
             ":443", ":99999", ":x", "@", "user@", "[", "]", "[::1]", "/", "/a.png", "/b.JPG", ".png", "?", "?q=1",
             "#", "#f", "\t", "\n", " ", "\u00a0", "é", "%20", "..", "/x/", "data:", "ｅ.com", "\x00"]


@FUZZ
@given(st.lists(st.sampled_from(URL_PARTS) | st.text(max_size=3), max_size=7).map("".join))
@example("https://images.example.com/batch/000001.png")
@example("https://e.com/a.png?sig=1/x.mp4#frag")
@example("https://e.com?q=a.png")
@example("https://e.com:443/a.png")
@example("https://e.com/a b.png")
def test_the_url_fast_path_reads_a_url_as_urlsplit_does(value):
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
        expected = (parts.scheme, parts.netloc, parts.path)
    except ValueError:
        with pytest.raises(ValueError):
            schema._url_parts(value)
        return
    assert schema._url_parts(value) == expected


@FUZZ
@given(st.dictionaries(st.text(max_size=6), jsons(), max_size=6), st.text(max_size=10))
def test_the_input_digest_is_json_dumps_byte_for_byte(job_input, model_id):
    canonical = json.dumps({"model": model_id, "input": job_input}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    assert input_sha256(model_id, job_input) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
