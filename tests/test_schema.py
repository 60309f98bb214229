"""Model input validation: the vendored JSON Schema, the prose rules, and the registry.

Job-level cases go through `load_manifest` so the exact `LINE:COL: where: message` is pinned.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from helpers import manifest_problems as problems
from helpers import write_yaml as write

from batchrun import schema
from batchrun.manifest import load_manifest
from batchrun.models import DEFAULT_MODEL, UnknownModel, all_models, get_model

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
URL = "https://example.com/a.png"
J = "jobs[0] (id=a)"




def warnings(tmp_path, text: str) -> list[str]:
    path = write(tmp_path, text)
    return [str(p).removeprefix(f"{path}:") for p in load_manifest(path).warnings]


def job(*lines: str) -> str:
    """A one-job manifest (id a, prompt, start image) plus extra lines of that job, indented 4."""
    extra = "".join(f"    {line}\n" for line in lines)
    return f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: {URL}\n{extra}"


# --- the published schema and the vendored one ----------------------------------------------------


@pytest.fixture(scope="module")
def published() -> dict:
    return json.loads((DATA / "published_kling_schema.json").read_text(encoding="utf-8"))


def test_published_schema_is_not_valid_json_schema(published):
    instance = {"prompt": "p", "start_image_url": URL, "cfg_scale": 0.5}
    validator = jsonschema.validators.validator_for(published)(published)
    with pytest.raises(jsonschema.exceptions.UnknownType, match="Unknown type 'float'"):
        validator.validate(instance)
    with pytest.raises(jsonschema.exceptions.SchemaError):
        jsonschema.validators.validator_for(published).check_schema(published)
    # It only breaks when cfg_scale is present, and it lets unknown keys through.
    validator.validate({"prompt": "p", "start_image_url": URL, "promt": "typo"})


def test_vendored_schema_is_valid_and_accepts_the_examples():
    model = get_model(DEFAULT_MODEL)
    cls = jsonschema.validators.validator_for(model.input_schema)
    cls.check_schema(model.input_schema)
    validator = cls(model.input_schema)
    api_page_example = {
        "prompt": "Bring this still photograph to life with cinematic motion.",
        "start_image_url": "https://playgrounds-storage-public.runcomfy.net/tools/7349/media-files/input.png",
    }
    validator.validate(api_page_example)
    validator.validate({**api_page_example, "cfg_scale": 0.5, "duration": 10, "generate_audio": True,
                        "shot_type": "customize", "negative_prompt": "blur",
                        "multi_prompt": [{"prompt": "a", "duration": 5}, {"prompt": "b"}],
                        "elements": [{"frontal_image_url": URL, "reference_image_urls": [URL], "video_url": URL}]})
    manifest = load_manifest(REPO / "manifests" / "example.yaml")
    assert manifest.jobs
    for each in manifest.jobs:
        validator.validate(each.input)


def test_vendored_schema_keeps_the_published_constraints(published):
    """Only the documented repairs differ: float→number, RunComfy 'format's dropped, strictness added."""
    vendored = get_model(DEFAULT_MODEL).input_schema
    assert vendored["required"] == published["required"]
    assert set(vendored["properties"]) == set(published["properties"])
    for name, spec in published["properties"].items():
        mine = vendored["properties"][name]
        assert mine["type"] == {"float": "number"}.get(spec["type"], spec["type"]), name
        for keyword in ("minimum", "maximum", "default", "enum", "minItems", "maxItems"):
            if name == "prompt" and keyword == "default" or name == "start_image_url" and keyword == "default":
                continue  # the page's example values are not defaults a job should silently get
            assert mine.get(keyword) == spec.get(keyword), (name, keyword)
    published_segment = published["properties"]["multi_prompt"]["items"]["properties"]["duration"]
    vendored_segment = vendored["properties"]["multi_prompt"]["items"]["properties"]["duration"]
    assert {k: v for k, v in published_segment.items() if k != "format"} == vendored_segment


def test_validator_is_built_once():
    model = get_model(DEFAULT_MODEL)
    assert schema.validator_for(model) is schema.validator_for(model)


# --- registry -------------------------------------------------------------------------------------


def test_unknown_model():
    with pytest.raises(UnknownModel, match=r"unknown model 'nope'; `batchrun models list` shows the \d+ known"):
        get_model("nope")
    assert DEFAULT_MODEL in all_models()


def test_price_estimate():
    model = get_model(DEFAULT_MODEL)
    assert model.estimate_cost({"duration": 5, "generate_audio": False}) == 0.42
    assert model.estimate_cost({"duration": 5}) == 0.63  # generate_audio defaults to true
    assert model.estimate_cost({}) == 1.26  # duration defaults to 10


# --- unknown keys and types -----------------------------------------------------------------------


def test_unknown_keys_with_did_you_mean(tmp_path):
    assert problems(tmp_path, job("durration: 5", "negativ_prompt: x", "foo: 1",
                                  "multi_prompt:", "  - prompt: x", "    duraton: 10", "  - prompt: y")) == [
        f"5:5: {J}.durration: unknown field 'durration' (did you mean 'duration'?)",
        f"6:5: {J}.negativ_prompt: unknown field 'negativ_prompt' (did you mean 'negative_prompt'?)",
        f"7:5: {J}.foo: unknown field 'foo'",
        f"10:9: {J}.multi_prompt[0].duraton: unknown field 'duraton' (did you mean 'duration'?)",
    ]


def test_unknown_key_in_an_element(tmp_path):
    assert problems(tmp_path, job("elements:", f"  - frontal_image: {URL}")) == [
        f"6:9: {J}.elements[0].frontal_image: unknown field 'frontal_image' (did you mean 'frontal_image_url'?)"
    ]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("duration: '5'", f"5:15: {J}.duration: must be a whole number, not text '5'"),
        ("duration: 5.0", f"5:15: {J}.duration: must be a whole number like 5, not 5.0"),
        ("duration: 2", f"5:15: {J}.duration: must be at least 3, got 2"),
        ("duration: 16", f"5:15: {J}.duration: must be at most 15, got 16"),
        ("generate_audio: 'yes'", f"5:21: {J}.generate_audio: must be true or false, not text 'yes'"),
        ("generate_audio: 1", f"5:21: {J}.generate_audio: must be true or false, not integer 1"),
        ("cfg_scale: 2", f"5:16: {J}.cfg_scale: must be at most 1, got 2"),
        ("cfg_scale: -0.1", f"5:16: {J}.cfg_scale: must be at least 0, got -0.1"),
        ("cfg_scale: '0.5'", f"5:16: {J}.cfg_scale: must be a number, not text '0.5'"),
        ("shot_type: other", f"5:16: {J}.shot_type: must be one of 'customize', got 'other'"),
        ("shot_type: " + "x" * 200, f"5:16: {J}.shot_type: must be one of 'customize', got '{'x' * 76}..."),
        ("negative_prompt: [a]", f"5:22: {J}.negative_prompt: must be text, not list ['a']"),
        ("multi_prompt: {prompt: a}", f"5:19: {J}.multi_prompt: must be a list, not mapping {{'prompt': 'a'}}"),
        ("elements: a", f"5:15: {J}.elements: must be a list, not text 'a'"),
    ],
)
def test_wrong_types_and_ranges(tmp_path, line, expected):
    assert problems(tmp_path, job(line)) == [expected]


def test_prompt_must_be_text(tmp_path):
    assert problems(tmp_path, f"jobs:\n  - id: a\n    prompt: 5\n    start_image_url: {URL}\n") == [
        f"3:13: {J}.prompt: must be text, not integer 5"
    ]


def test_required_fields(tmp_path):
    assert problems(tmp_path, "jobs:\n  - id: a\n    duration: 5\n") == [
        f"2:5: {J}: missing required field 'prompt'",
        f"2:5: {J}: missing required field 'start_image_url'",
    ]


def test_elements_at_most_three(tmp_path):
    lines = ["elements:"] + [f"  - frontal_image_url: https://example.com/{i}.png" for i in range(4)]
    assert problems(tmp_path, job(*lines)) == [f"6:7: {J}.elements: must have at most 3 items, has 4"]


def test_elements_item_types(tmp_path):
    assert problems(tmp_path, job("elements:", "  - 1", "  - reference_image_urls: " + URL)) == [
        f"6:9: {J}.elements[0]: must be a mapping, not integer 1",
        f"7:31: {J}.elements[1].reference_image_urls: must be a list, not text '{URL}'",
    ]


# --- multi_prompt ---------------------------------------------------------------------------------


def test_multi_prompt_durations_must_add_up(tmp_path):
    assert problems(tmp_path, job("duration: 10", "multi_prompt:", "  - prompt: a", "    duration: 4",
                                  "  - prompt: b", "    duration: 5")) == [
        f"7:7: {J}.multi_prompt: segment durations add up to 4 + 5 = 9, but duration is 10; they must be equal"
    ]


def test_multi_prompt_uses_the_default_duration_of_10_and_segment_default_of_5(tmp_path):
    two = load_manifest(write(tmp_path, job("multi_prompt:", "  - prompt: a", "  - prompt: b")))
    assert two.jobs[0].input["multi_prompt"] == [{"prompt": "a"}, {"prompt": "b"}]
    assert problems(tmp_path, job("multi_prompt:", "  - prompt: a", "  - prompt: b", "  - prompt: c")) == [
        f"6:7: {J}.multi_prompt: segment durations add up to 5 + 5 + 5 = 15, but duration is 10 (the model's "
        "default); they must be equal"
    ]
    assert problems(tmp_path, job("multi_prompt:", "  - prompt: a", "    duration: 7", "  - prompt: b")) == [
        f"6:7: {J}.multi_prompt: segment durations add up to 7 + 5 = 12, but duration is 10 (the model's default); "
        "they must be equal"
    ]


def test_multi_prompt_total_from_defaults(tmp_path):
    manifest = load_manifest(write(tmp_path, "defaults:\n  duration: 8\n" + job(
        "multi_prompt:", "  - prompt: a", "    duration: 3", "  - prompt: b")))
    assert manifest.jobs[0].input["duration"] == 8


def test_multi_prompt_segment_rules(tmp_path):
    assert problems(tmp_path, job("duration: 5", "multi_prompt:", "  - duration: 3", "  - prompt: b",
                                  "    duration: 2")) == [
        f"7:9: {J}.multi_prompt[0]: missing required field 'prompt'",
        f"9:19: {J}.multi_prompt[1].duration: must be at least 3, got 2",
    ]


def test_multi_prompt_empty_list_is_fine(tmp_path):
    assert load_manifest(write(tmp_path, job("multi_prompt: []"))).jobs[0].input["multi_prompt"] == []


# --- image and video URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("http://example.com/a.png", "must be an https:// URL (RunComfy fetches inputs over HTTPS only)"),
        ("'http:example.com/a.png'", "must be an https:// URL (RunComfy fetches inputs over HTTPS only)"),
        ("'https:example.com/a.png'", "must be an https:// URL, got 'https:example.com/a.png'"),
        ("ftp://example.com/a.png", "must be an https:// URL, got 'ftp://example.com/a.png'"),
        ("'https:///a.png'", "must be an https:// URL, got 'https:///a.png'"),
        ("'https://[::1/a.png'", "is not a valid URL: 'https://[::1/a.png'"),
        ("'https://example.com:99999/a.png'", "is not a valid URL: 'https://example.com:99999/a.png'"),
    ],
    ids=["http", "http-no-slashes", "https-no-slashes", "ftp", "no-host", "bad-ipv6", "bad-port"],
)
def test_bad_image_urls_are_errors(tmp_path, value, message):
    assert problems(tmp_path, f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: {value}\n") == [
        f"4:22: {J}.start_image_url: {message}"
    ]


@pytest.mark.parametrize(
    "value, hint",
    [("example.com/a.png", "; for a web address write https://example.com/a.png"), ("a photo of a cliff", "")],
    ids=["no-scheme", "prose"],
)
def test_text_that_is_not_a_url_is_a_local_file_path(tmp_path, value, hint):
    """Anything in an image field without a scheme is a path relative to the manifest (tests/test_localfiles.py)."""
    assert problems(tmp_path, f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: {value}\n") == [
        f"4:22: {J}.start_image_url: {value!r} does not exist (looked for {tmp_path / value}; image paths are "
        f"relative to the manifest's folder){hint}"
    ]


@pytest.mark.parametrize(
    "value, kind",
    [("https://e.com/a.png", "url"), ("HTTP://e.com/a.png", "url"), ("s3://bucket/a.png", "url"),
     ("https:e.com/a.png", "url"), ("data:image/png;base64,AAAA", "data"), ("DATA:image/png;base64,AA", "data"),
     ("images/a.png", "file"), ("../a.png", "file"), ("/abs/a.png", "file"), ("C:\\pics\\a.png", "file"),
     ("a photo", "file"), ("", "file")],
)
def test_image_ref_kind(value, kind):
    assert schema.image_ref_kind(value) == kind


def test_check_input_collects_local_paths_for_the_caller():
    model = get_model(DEFAULT_MODEL)
    refs: list = []
    job_input = {"prompt": "p", "start_image_url": "a.png",
                 "elements": [{"frontal_image_url": URL, "reference_image_urls": ["b.png", "data:x"]}]}
    findings = schema.check_input(model, job_input, local_refs=refs)
    assert refs == [(("start_image_url",), "a.png"), (("elements", 0, "reference_image_urls", 0), "b.png")]
    assert [(f.path, f.message) for f in findings] == [
        (("elements", 0, "reference_image_urls", 1), "is not a valid data: URI (expected data:image/png;base64,...)")
    ]
    assert schema.check_input(model, {"prompt": "p", "start_image_url": "a.png"}) == []


def test_urls_inside_elements(tmp_path):
    assert problems(tmp_path, job("elements:", "  - frontal_image_url: http://example.com/f.png",
                                  "    reference_image_urls: [https://example.com/r.png, 'ftp://x/y.png']",
                                  "    video_url: http://example.com/v.mp4")) == [
        f"6:28: {J}.elements[0].frontal_image_url: must be an https:// URL (RunComfy fetches inputs over HTTPS only)",
        f"7:59: {J}.elements[0].reference_image_urls[1]: must be an https:// URL, got 'ftp://x/y.png'",
        f"8:20: {J}.elements[0].video_url: must be an https:// URL (RunComfy fetches inputs over HTTPS only)",
    ]


def test_url_without_image_extension_is_a_warning_not_an_error(tmp_path):
    assert warnings(tmp_path, "jobs:\n  - id: a\n    prompt: p\n    start_image_url: https://example.com/img?id=3\n"
                    ) == [
        f"4:22: {J}.start_image_url: warning: the URL does not end in a known image type "
        "(jpg, jpeg, png, bmp, webp); fine if the host serves an image anyway"
    ]


@pytest.mark.parametrize("url", ["https://e.com/a.PNG", "https://e.com/a.jpeg?sig=1#x", "https://e.com/d.v1/a.webp",
                                 "https://e.com/a.bmp", "https://e.com/a.jpg"])
def test_image_urls_that_are_fine(tmp_path, url):
    assert warnings(tmp_path, f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: {url}\n") == []


def test_video_url_needs_no_image_extension(tmp_path):
    assert warnings(tmp_path, job("elements:", "  - video_url: https://example.com/clip.mp4")) == []


# --- length warnings ------------------------------------------------------------------------------


def test_long_prompts_warn(tmp_path):
    text = (f"jobs:\n  - id: a\n    prompt: {'p' * 2501}\n    negative_prompt: {'n' * 2501}\n"
            f"    start_image_url: {URL}\n    duration: 6\n    multi_prompt:\n"
            f"      - prompt: {'s' * 513}\n        duration: 3\n      - prompt: {'s' * 512}\n        duration: 3\n")
    assert warnings(tmp_path, text) == [
        f"3:13: {J}.prompt: warning: is 2501 characters; Kling accepts at most 2500",
        f"4:22: {J}.negative_prompt: warning: is 2501 characters; Kling accepts at most 2500",
        f"8:17: {J}.multi_prompt[0].prompt: warning: is 513 characters; Kling accepts at most 512",
    ]


def test_prompts_at_the_limit_do_not_warn(tmp_path):
    assert warnings(tmp_path, f"jobs:\n  - id: a\n    prompt: {'p' * 2500}\n    negative_prompt: {'n' * 2500}\n"
                              f"    start_image_url: {URL}\n") == []


def test_more_than_six_shots_warn(tmp_path):
    segments = [line for _ in range(7) for line in ("  - prompt: s", "    duration: 3")]
    found = problems(tmp_path, job("duration: 15", "multi_prompt:", *segments))
    assert f"7:7: {J}.multi_prompt: warning: has 7 items; Kling accepts at most 6" in found
    six = [line for _ in range(6) for line in ("  - prompt: s", "    duration: 3")]
    assert problems(tmp_path, job("duration: 15", "multi_prompt:", *six)) == [
        f"7:7: {J}.multi_prompt: segment durations add up to 3 + 3 + 3 + 3 + 3 + 3 = 18, but duration is 15; "
        "they must be equal"
    ]


# --- check_input directly -------------------------------------------------------------------------


def test_check_input_paths_and_order():
    model = get_model(DEFAULT_MODEL)
    findings = schema.check_input(model, {"prompt": 5, "start_image_url": "http://e.com/a.png", "cfg_scale": 3,
                                          "extra": 1})
    assert [(f.path, f.severity, f.at_key) for f in findings] == [
        (("cfg_scale",), "error", False),
        (("extra",), "error", True),
        (("prompt",), "error", False),
        (("start_image_url",), "error", False),
    ]
    assert schema.check_input(model, {"prompt": "p", "start_image_url": URL}) == []


@pytest.mark.parametrize(
    "job_input",
    [
        {"prompt": "p", "start_image_url": URL},
        {"prompt": "p", "start_image_url": URL, "generate_audio": False, "negative_prompt": "n", "duration": 3},
        {"prompt": 5, "start_image_url": URL},
        {"prompt": "p", "start_image_url": None, "generate_audio": "yes"},
        {"prompt": "p", "start_image_url": URL, "generate_audio": 1, "duration": 99},
        {"prompt": "p", "start_image_url": URL, "durration": 5, "cfg_scale": 7},
        {"start_image_url": URL, "multi_prompt": [{"duration": 1}, 5], "elements": [{}, {}, {}, {}]},
        {"prompt": True},
        {},
    ],
)
def test_fast_path_finds_exactly_what_the_full_schema_finds(job_input):
    model = get_model(DEFAULT_MODEL)
    fast = [f for e in schema._schema_errors(model, job_input) for f in schema._schema_findings(e)]
    full = [f for e in schema.validator_for(model).iter_errors(job_input) for f in schema._schema_findings(e)]
    key = lambda f: (str(f.path), f.message)  # noqa: E731
    assert sorted(fast, key=key) == sorted(full, key=key)
