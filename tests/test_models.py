"""The model catalogue: data files checked on load, RunComfy's schema quirks normalised, the price formula,
prose rules as data, the user folder, and every shipped model validated and run in the sandbox."""

from __future__ import annotations

import csv
import io
import json
import re
from importlib import resources

import pytest
import yaml
from helpers import cli, results

from batchrun import media
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.models import DEFAULT_MODEL, ModelFileError, Price, all_models, get_model
from batchrun.models.dataformat import read_model_data
from batchrun.models.pricing import estimate
from batchrun.sandbox import Sandbox
from batchrun.schema import check_input

SHIPPED = sorted(json.loads(entry.read_text("utf-8"))["model_id"]
                 for entry in resources.files("batchrun.models").iterdir() if entry.name.endswith(".json"))
TOKEN = "models-test-token"


def minimal(**extra) -> dict:
    """The smallest valid data file, with `extra` keys merged in."""
    data = {"model_id": "acme/test/text-to-video", "output_kind": "video",
            "price": {"usd_per_second": 0.1, "usd_per_second_with_audio": None},
            "input_schema": {"type": "object", "required": ["prompt"], "additionalProperties": False,
                             "properties": {"prompt": {"type": "string"},
                                            "duration": {"type": "integer", "minimum": 1, "default": 5},
                                            "generate_audio": {"type": "boolean", "default": True}}}}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def schema_with(**props) -> dict:
    return {"type": "object", "properties": {"prompt": {"type": "string"}, "duration": {"type": "integer"},
                                             "generate_audio": {"type": "boolean"}, **props}}


# --- quirks of RunComfy's published schemas, one test each ------------------------------------------


def test_quirk_float_type_is_number():
    fields = read_model_data(minimal(input_schema=schema_with(cfg_scale={"type": "float", "minimum": 0},
                                                              both={"type": ["float", "null"]})), "t.json")
    props = fields["input_schema"]["properties"]
    assert props["cfg_scale"]["type"] == "number" and props["both"]["type"] == ["number", "null"]
    model = get_model_from(fields)
    assert not check_input(model, {"prompt": "x", "cfg_scale": 0.5})


def test_quirk_single_media_format_becomes_a_media_field():
    fields = read_model_data(minimal(input_schema=schema_with(image={"type": "string", "format": "image_uri"},
                                                              clip={"type": "string", "format": "video_uri"})),
                             "t.json")
    assert fields["url_fields"] == {"image": ["image"], "video": ["clip"]}
    assert "format" not in fields["input_schema"]["properties"]["image"]


def test_quirk_array_media_format_becomes_a_list_media_field():
    fields = read_model_data(minimal(input_schema=schema_with(
        images={"type": "array", "format": "image_uris", "maxItems": 9},
        audio_urls={"type": "array", "format": "audio_uris", "items": {"type": "string", "format": "audio_uri"}})),
        "t.json")
    assert fields["url_fields"] == {"image": ["images[]"], "audio": ["audio_urls[]"]}
    assert fields["input_schema"]["properties"]["audio_urls"]["items"] == {"type": "string"}


def test_quirk_validations_become_rules():
    rule = {"validation_rule": "width_pixels>", "validation_value": 14, "validation_error": "too small"}
    fields = read_model_data(minimal(input_schema=schema_with(
        image={"type": "array", "format": "image_uris", "validations": [rule]})), "t.json")
    assert fields["rules"]["validations"] == {"image": [rule]}
    assert "validations" not in fields["input_schema"]["properties"]["image"]


def test_quirk_unknown_schema_keys_are_kept():
    fields = read_model_data(minimal(input_schema=schema_with(seed={"type": "integer", "x-ui": "slider"})), "t.json")
    assert fields["input_schema"]["properties"]["seed"]["x-ui"] == "slider"


def get_model_from(fields):
    from batchrun.models import Model

    return Model(**fields)


# --- a broken data file names its file and field ------------------------------------------------------


@pytest.mark.parametrize("extra, field", [
    ({"output_kind": "hologram"}, "output_kind"),
    ({"price": {"usd_per_secnd": 1}}, "price.usd_per_secnd"),
    ({"price": {"usd_per_second": -1}}, "price.usd_per_second"),
    ({"price": {"unit": "minute"}}, "price.unit"),
    ({"price": {"audio_field": "sound"}}, "price.audio_field"),
    ({"max_outputs": 0}, "max_outputs"),
    ({"rules": {"mutually_exclusive": [["prompt", "nope"]]}}, "rules.mutually_exclusive"),
    ({"rules": {"sometimes": []}}, "rules.sometimes"),
    ({"input_schema": {"type": "object", "properties": {"prompt": {"type": "strin"}}}},
     "input_schema/properties/prompt/type"),
    ({"colour": "red"}, "colour"),
    ({"model_id": ""}, "model_id"),
])
def test_a_broken_data_file_names_file_and_field(extra, field):
    with pytest.raises(ModelFileError) as info:
        read_model_data(minimal(**extra), "user/acme.json")
    assert str(info.value).startswith(f"model file user/acme.json: {field}: "), str(info.value)


# --- the price formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize("price, job_input, defaults, expected", [
    # duration shapes: integer, integer enum, numeric text, "auto", milliseconds, none
    (Price(0.1, 0.2), {"duration": 5, "generate_audio": False}, {}, 0.5),
    (Price(0.1, 0.2), {}, {"duration": 10, "generate_audio": True}, 2.0),
    (Price(0.1), {"duration": "8"}, {"generate_audio": True}, 0.8),
    (Price(0.1), {"duration": "auto"}, {}, None),
    (Price(0.01, duration_field="music_length_ms", duration_unit="ms", audio_field=None),
     {"music_length_ms": 30000}, {}, 0.3),
    (Price(0.1, duration_field=None), {}, {}, None),
    # the audio switch whatever its name or sense
    (Price(0.1, 0.3, audio_field="sound"), {"sound": True, "duration": 2}, {}, 0.6),
    (Price(0.1, 0.3, audio_field="enable_audio"), {"duration": 2}, {"enable_audio": False}, 0.2),
    (Price(0.1, 0.3, audio_field="force_instrumental", audio_inverted=True),
     {"force_instrumental": True, "duration": 2}, {}, 0.2),
    (Price(0.1, 0.3, audio_field="force_instrumental", audio_inverted=True),
     {"force_instrumental": False, "duration": 2}, {}, 0.6),
    # multipliers keyed by field values
    (Price(0.1, audio_field="sound", multipliers={"sound": {"true": 1.25}}), {"sound": True, "duration": 4}, {}, 0.5),
    (Price(unit="output", usd_per_output=0.04, multipliers={"resolution": {"2K": 2.0}}),
     {"resolution": "2K"}, {}, 0.08),
    (Price(unit="output", usd_per_output=0.04, multipliers={"resolution": {"2K": 2.0}}),
     {}, {"resolution": "1K"}, 0.04),
    # unknown rates
    (Price(None), {"duration": 5}, {}, None),
    (Price(unit="output"), {}, {}, None),
])
def test_price_formula(price, job_input, defaults, expected):
    assert estimate(price, job_input, defaults) == expected


def test_shipped_prices_follow_the_reference():
    assert get_model("kling/kling-3.0/pro/text-to-video").estimate_cost({"prompt": "x"}) == 0.84  # 5 s, sound on
    assert get_model("kling/kling-3.0/4k/image-to-video").estimate_cost({"generate_audio": False}) == 4.2
    assert get_model("elevenlabs/elevenlabs/music-generation").estimate_cost({"music_length_ms": 60000}) == 0.498
    assert get_model("google/nano-banana-2-lite/text-to-image").estimate_cost({"prompt": "x"}) is None
    assert get_model("blackforestlabs/flux-3/text-to-video").price.known is False


# --- prose rules as data ---------------------------------------------------------------------------------


def test_reference_images_limit_depends_on_a_reference_video():
    model = get_model("kling/kling-video-o3/standard/reference-to-video")
    images = [f"https://example.com/{i}.png" for i in range(5)]
    assert not [f for f in check_input(model, {"prompt": "x", "images": images}) if f.severity == "error"]
    found = check_input(model, {"prompt": "x", "images": images, "video": "https://example.com/v.mp4"})
    assert [(f.path, f.message) for f in found] == [
        (("images",), "has 5 items; at most 4 are allowed when 'video' is given")]


def test_mutually_exclusive_fields():
    model = get_model("bytedance/seed-audio-1.0/text-to-audio")
    found = check_input(model, {"prompt": "x", "image_url": "https://example.com/a.png",
                                "audio_urls": ["https://example.com/a.wav"]})
    assert [(f.path, f.message) for f in found] == [
        (("audio_urls",), "cannot be combined with 'image_url'; give only one of 'image_url', 'audio_urls'")]


def test_at_least_one_of(tmp_path):
    data = minimal(input_schema=schema_with(a={"type": "string"}, b={"type": "string"}),
                   rules={"at_least_one_of": [["a", "b"]]})
    data["price"] = {"usd_per_second": 0.1, "duration_field": None, "audio_field": None}
    model = get_model_from(read_model_data(data, "t.json"))
    assert [f.message for f in check_input(model, {"prompt": "x"})] == ["give at least one of 'a', 'b'"]
    assert check_input(model, {"prompt": "x", "b": "y"}) == []


# --- the user folder -------------------------------------------------------------------------------------


def write_user_model(folder, **extra):
    folder.mkdir(exist_ok=True)
    data = minimal(**extra)
    (folder / "mine.json").write_text(json.dumps(data), encoding="utf-8")
    return data


def manifest_text(model_id: str, job: dict, **top) -> str:
    return yaml.safe_dump({"version": 1, "model": model_id, **top, "output": "out", "concurrency": 2,
                           "poll_min_interval": 0, "poll_max_interval": 1, "requests_per_second": 1000,
                           "jobs": [{"id": "ex", **job}]}, sort_keys=False)


def test_user_folder_by_manifest_key_adds_a_model(tmp_path):
    write_user_model(tmp_path / "models")
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text("acme/test/text-to-video", {"prompt": "hi"}, models_dir="models"), "utf-8")
    manifest = load_manifest(path)
    assert manifest.model.model_id == "acme/test/text-to-video"
    assert manifest.model.origin == str(tmp_path / "models" / "mine.json")


def test_user_folder_by_env_overrides_a_shipped_model(tmp_path, monkeypatch):
    data = get_model(DEFAULT_MODEL)
    write_user_model(tmp_path / "models", model_id=DEFAULT_MODEL, price={"usd_per_second": 1.0})
    monkeypatch.setenv("BATCHRUN_MODELS", str(tmp_path / "models"))
    model = get_model(DEFAULT_MODEL)
    assert model.price.usd_per_second == 1.0 and model is not data
    assert model.estimate_cost({"prompt": "x", "duration": 3}) == 3.0


def test_a_broken_user_file_is_a_located_manifest_error(tmp_path):
    write_user_model(tmp_path / "models", output_kind="hologram")
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(DEFAULT_MODEL, {"prompt": "hi"}, models_dir="models"), "utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    text = str(info.value)
    assert "models_dir" in text and "mine.json: output_kind: must be one of video, image, audio" in text


# --- unknown prices in plan and budgets -------------------------------------------------------------------


async def test_unknown_price_shows_as_unknown_and_a_budget_refuses_without_price(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    model_id = "google/nano-banana-2-lite/text-to-image"
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(model_id, {"prompt": "a lighthouse"}), "utf-8")
    code, out, err = await cli(["plan", str(path), "--no-balance-check"])
    assert code == 0, err
    assert "unknown: no price known for 1 job(s) (unknown per output; give 'price:' in the manifest)" in out, out
    code, out, err = await cli(["plan", str(path), "--json", "--no-balance-check"])
    assert json.loads(out)["estimated_cost_usd"] is None
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress", "--budget", "5"])
        assert code == 2 and "google/nano-banana-2-lite/text-to-image: no price known" in err
        assert sandbox.posts_total == 0
        path.write_text(manifest_text(model_id, {"prompt": "a lighthouse"}, price={"usd_per_output": 0.04}), "utf-8")
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress", "--budget", "5"])
        assert code == 0, err
        assert sandbox.posts_total == 1


# --- every shipped model ----------------------------------------------------------------------------------


def test_shipped_models_are_the_catalogue_with_known_schemas():
    assert len(SHIPPED) == 22
    assert not [m for m in SHIPPED if m.startswith("google-deepmind/veo")]
    assert set(SHIPPED) == set(all_models())


def example_of(model_id: str) -> dict:
    for entry in resources.files("batchrun.models").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text("utf-8"))
            if data["model_id"] == model_id:
                return data.get("example_input") or {"prompt": "waves", "start_image_url": "https://example.com/a.png"}
    raise AssertionError(model_id)


@pytest.mark.parametrize("model_id", SHIPPED)
def test_example_input_validates(model_id):
    model = get_model(model_id)
    assert [f for f in check_input(model, example_of(model_id)) if f.severity == "error"] == []


@pytest.mark.parametrize("model_id", SHIPPED)
def test_bad_input_is_refused_with_its_location(tmp_path, model_id):
    job = {**example_of(model_id), "promt": "typo"}
    job.pop("prompt", None)
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(model_id, job), "utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    shown = [str(p).removeprefix(f"{path}:") for p in info.value.problems]
    assert any(": jobs[0] (id=ex).promt: unknown field 'promt' (did you mean 'prompt'?)" in s for s in shown), shown
    assert any("missing required field 'prompt'" in s for s in shown), shown
    assert all(s.split(":")[0].isdigit() for s in shown), shown  # every one has its line


@pytest.mark.parametrize("model_id", SHIPPED)
async def test_sandbox_run_gives_an_output_of_the_model_kind(tmp_path, monkeypatch, model_id):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(model_id, example_of(model_id)), "utf-8")
    kind = get_model(model_id).output_kind
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress"])
        assert code == 0, out + err
        assert sandbox.posts_total == 1
    row = results(tmp_path / "out")["ex"]
    assert row["state"] == "done"
    [output] = row["outputs"]
    data = (tmp_path / "out" / output["path"]).read_bytes()
    assert media.accepts(kind, data[: media.HEAD_BYTES])
    assert output["path"].endswith({"video": ".mp4", "image": ".png", "audio": ".wav"}[kind])


# --- model: per job and as a matrix axis (a bake-off) ------------------------------------------------------

BAKE_OFF = ["kling/kling-3.0/standard/text-to-video", "bytedance/seedance-2.5/text-to-video/1080p",
            "minimax/minimax-h3/text-to-video", "google/nano-banana-2-lite/text-to-image"]


def bake_off_manifest(tmp_path, **top):
    path = tmp_path / "bake.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "model": BAKE_OFF[0], **top, "output": "out", "concurrency": 4, "poll_min_interval": 0,
        "poll_max_interval": 1, "requests_per_second": 1000,
        "jobs": [{"id": "beach", "matrix": {"prompt": ["waves at dawn", "a gull", "storm clouds"],
                                            "model": BAKE_OFF}}]}, sort_keys=False), "utf-8")
    return path


async def test_a_bake_off_of_three_prompts_by_four_models_plans_and_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    path = bake_off_manifest(tmp_path)
    manifest = load_manifest(path)
    assert [j.id for j in manifest.jobs][:5] == ["beach-p1-m1", "beach-p1-m2", "beach-p1-m3", "beach-p1-m4",
                                                 "beach-p2-m1"]
    assert all("model" not in j.input for j in manifest.jobs)
    code, out, err = await cli(["plan", str(path), "--json", "--no-balance-check"])
    info = json.loads(out)
    assert code == 0 and info["submit"] == 12 and info["estimated_cost_usd"] is None
    per_model = info["models"]
    assert list(per_model) == BAKE_OFF
    assert per_model[BAKE_OFF[0]] == {"jobs": 3, "submit": 3, "estimated_cost_usd": 1.89, "unpriced_jobs": 0,
                                      "price": "0.084 USD/s (0.126 with audio via sound)", "output_kind": "video"}
    assert per_model[BAKE_OFF[3]]["estimated_cost_usd"] is None and per_model[BAKE_OFF[3]]["unpriced_jobs"] == 3
    code, out, err = await cli(["plan", str(path), "--no-balance-check"])
    assert f"  {BAKE_OFF[3]}" in out and "3 jobs, 3 to submit, unknown" in out
    assert out.startswith(f"plan for {path} (4 models) into ")
    assert "unknown: 9 job(s) cannot be estimated (see the models below)" in out  # not the default model's price
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress"])
        assert code == 0, out + err
        assert sandbox.posts_total == 12
        assert sorted(job.model_id for job in sandbox.jobs.values()) == sorted(BAKE_OFF * 3)
    rows = results(tmp_path / "out")
    assert (rows["beach-p2-m4"]["model"], rows["beach-p2-m4"]["outputs"][0]["path"]) == (BAKE_OFF[3], "beach-p2-m4.png")
    assert (rows["beach-p2-m1"]["model"], rows["beach-p2-m1"]["outputs"][0]["path"]) == (BAKE_OFF[0], "beach-p2-m1.mp4")
    code, out, err = await cli(["status", str(path), "--json"])
    assert code == 0 and json.loads(out)["by_model"] == {m: {"done": 3} for m in BAKE_OFF}
    code, out, err = await cli(["status", str(path)])
    assert f"  {BAKE_OFF[3]}: 3 done" in out
    code, out, err = await cli(["export", str(path), "--format", "csv"])
    exported = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and sorted(row["model"] for row in exported) == sorted(BAKE_OFF * 3)
    async with Sandbox(token=TOKEN) as sandbox:  # a second run pays for nothing
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress"])
        assert code == 0 and sandbox.posts_total == 0


def test_each_job_is_validated_against_its_own_model(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "jobs": [
        {"id": "a", "model": "google/nano-banana-2-lite/text-to-image", "prompt": "x", "duration": 5},
        {"id": "b", "model": "kling/kling-3.0/pro/text-to-vidoe", "prompt": "x"},
        {"id": "c", "model": "minimax/minimax-h3/text-to-video", "prompt": "x", "duration": 5}]}, sort_keys=False),
        "utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    shown = [str(p).removeprefix(f"{path}:") for p in info.value.problems]
    assert shown == [
        "6:3: jobs[0] (id=a).duration: unknown field 'duration'",
        "8:10: jobs[1] (id=b).model: unknown model 'kling/kling-3.0/pro/text-to-vidoe' (did you mean "
        f"'kling/kling-3.0/pro/text-to-video'?); `batchrun models list` shows the {len(all_models())} known models",
    ], shown


async def test_a_budget_with_a_model_of_unknown_price_needs_price_for_that_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    path = bake_off_manifest(tmp_path, budget_usd=100)
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress"])
        assert code == 2 and sandbox.posts_total == 0
        code, out, plan_err = await cli(["plan", str(path), "--no-balance-check"])
        assert code == 0 and "warning: budget_usd: a budget cannot be kept" in plan_err
        # Every model without a price is named at once, each with what to add.
        for model_id, field in [(BAKE_OFF[1], "usd_per_second"), (BAKE_OFF[2], "usd_per_second"),
                                (BAKE_OFF[3], "usd_per_output")]:
            assert f"{model_id}: no price known for 3 job(s)" in err, err
            assert f"add 'price: {{{model_id}: {{{field}: ...}}}}'" in err, err
        prices = {model_id: {"usd_per_second": 0.1} for model_id in BAKE_OFF[1:3]}
        prices[BAKE_OFF[3]] = {"usd_per_output": 0.04}
        path = bake_off_manifest(tmp_path, budget_usd=100, price=prices)
        code, out, err = await cli(["plan", str(path), "--json", "--no-balance-check"])
        assert json.loads(out)["estimated_cost_usd"] == round(1.89 + 3 * 0.5 * 2 + 3 * 0.04, 4)
        code, out, err = await cli(["run", "--no-preflight", str(path), "--base-url", sandbox.base_url,
                                    "--no-progress"])
        assert code == 0, err
        assert sandbox.posts_total == 12


# --- batchrun models list | show ---------------------------------------------------------------------------


async def test_models_list_shows_every_model_with_kind_source_and_price(tmp_path, monkeypatch):
    write_user_model(tmp_path / "models")
    monkeypatch.setenv("BATCHRUN_MODELS", str(tmp_path / "models"))
    code, out, err = await cli(["models", "list", "--json"])
    assert code == 0, err
    listed = {m["model_id"]: m for m in json.loads(out)}
    assert set(listed) == set(SHIPPED) | {"acme/test/text-to-video"}
    assert listed["acme/test/text-to-video"]["source"] == "user"
    assert listed[DEFAULT_MODEL] | {"file": None} == {
        "model_id": DEFAULT_MODEL, "output_kind": "video", "source": "shipped", "price_known": True, "file": None,
        "price": "0.084 USD/s (0.126 with audio via generate_audio)"}
    assert listed["google/nano-banana-2-lite/edit"]["price"] == "unknown per output"
    code, out, err = await cli(["models", "list"])
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("elevenlabs/elevenlabs/music-generation "))
    assert line.split() == ["elevenlabs/elevenlabs/music-generation", "audio", "shipped", "0.0083", "USD/s"]


async def test_models_show_prints_fields_media_duration_audio_price_rules():
    code, out, err = await cli(["models", "show", "kling/kling-video-o3/standard/reference-to-video"])
    assert code == 0, err
    assert "  duration field: duration (seconds)" in out
    assert "  audio switch: sound" in out
    assert "  image inputs: images[]" in out and "  video inputs: video" in out
    assert '  rule max_items_when: [{"field": "images", "max": 4, "when_present": "video"}]' in out
    assert "    prompt (required): " in out
    code, out, err = await cli(["models", "show", "elevenlabs/elevenlabs/music-generation", "--json"])
    info = json.loads(out)
    assert (info["duration_field"], info["duration_unit"], info["audio_field"], info["audio_inverted"]) == (
        "music_length_ms", "ms", "force_instrumental", True)
    code, out, err = await cli(["models", "show", "kling/kling-9"])
    assert code == 2 and "unknown model 'kling/kling-9'" in err and out == ""


async def test_models_list_with_a_broken_user_file_names_it(tmp_path, monkeypatch):
    write_user_model(tmp_path / "models", price={"usd_per_second": "cheap"})
    monkeypatch.setenv("BATCHRUN_MODELS", str(tmp_path / "models"))
    code, out, err = await cli(["models", "list"])
    assert code == 2
    assert "mine.json: price.usd_per_second: must be a number of USD or null (unknown), got \"cheap\"" in err
    assert "Traceback" not in err


# --- batchrun models pull | check against the sandbox's catalogue -------------------------------------------


async def test_models_pull_writes_a_user_file_that_validates_a_job(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    folder = tmp_path / "models"
    monkeypatch.setenv("BATCHRUN_MODELS", str(folder))
    reference = "kling/kling-video-o3/standard/reference-to-video"
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["models", "pull", reference, "kling/kling-3.0/standard/image-to-video",
                                    "--base-url", sandbox.base_url])
        assert code == 0, err
        code, out2, err = await cli(["models", "pull", "acme/nothing", "--base-url", sandbox.base_url])
        assert code == 1 and "acme/nothing: not pulled: " in err and "400001" in err
    written = json.loads((folder / "kling__kling-video-o3__standard__reference-to-video.json").read_text("utf-8"))
    assert f"{reference}: wrote {folder}" in out
    assert written["price"]["usd_per_second"] == 0.1 and written["price"]["audio_field"] == "sound"
    assert written["rules"] == {"max_items_when": [{"field": "images", "max": 4, "when_present": "video"}]}
    assert written["input_schema"]["properties"]["images"]["format"] == "image_uris"  # kept as published
    kling = json.loads((folder / "kling__kling-3.0__standard__image-to-video.json").read_text("utf-8"))
    assert kling["input_schema"]["properties"]["cfg_scale"]["type"] == "float"  # published so, read as number
    assert kling["price"]["usd_per_second_with_audio"] == 0.126 and kling["rules"]["sum_equals"]
    model = get_model(reference)
    assert model.origin == str(folder / "kling__kling-video-o3__standard__reference-to-video.json")
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(reference, {"prompt": "x", "duration": 4, "images": ["https://example.com/a.png"]}),
                    "utf-8")
    manifest = load_manifest(path)
    assert manifest.estimate_cost(manifest.jobs[0]) == 0.4
    assert get_model(DEFAULT_MODEL).estimate_cost({"cfg_scale": 0.5, "duration": 5}) == 0.63


async def test_models_check_reports_where_the_api_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", TOKEN)
    folder = tmp_path / "models"
    monkeypatch.setenv("BATCHRUN_MODELS", str(folder))
    kling = "kling/kling-3.0/pro/text-to-video"
    flux = "blackforestlabs/flux-3/text-to-video"
    folder.mkdir()
    async with Sandbox(token=TOKEN) as sandbox:
        code, out, err = await cli(["models", "check", kling, "--base-url", sandbox.base_url])
        assert (code, out) == (0, f"{kling}: same\n"), err
        code, out, err = await cli(["models", "check", kling, flux, "--base-url", sandbox.base_url])
        assert code == 1
        assert out == f"{kling}: same\n{flux}: differs\n  price: local unknown, API 0.1 USD per second\n"
        # A user file that drifted from the API: a field it lacks, one it has that the API does not.
        data = json.loads(next(e for e in resources.files("batchrun.models").iterdir()
                               if e.name == "kling__kling-3.0__pro__text-to-video.json").read_text("utf-8"))
        del data["input_schema"]["properties"]["negative_prompt"]
        data["input_schema"]["properties"]["seed"] = {"type": "integer"}
        (folder / "pro.json").write_text(json.dumps(data), "utf-8")
        code, out, err = await cli(["models", "check", kling, "--base-url", sandbox.base_url])
        assert code == 1
        assert out.splitlines() == [f"{kling}: differs", "  field 'negative_prompt': only in the API's schema",
                                    "  field 'seed': only in the local file"]


def test_a_jobs_file_may_name_each_rows_model(tmp_path):
    (tmp_path / "jobs.csv").write_text("id,prompt,model\na,waves,kling/kling-3.0/pro/text-to-video\n"
                                       "b,gulls,\nc,rain,kling/kling-3.0/pro/text-to-vidoe\n", "utf-8")
    path = tmp_path / "m.yaml"
    path.write_text("model: kling/kling-3.0/standard/text-to-video\njobs_from: jobs.csv\n", "utf-8")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    [problem] = info.value.problems
    assert str(problem).startswith(f"{tmp_path / 'jobs.csv'}:4:") and "unknown model" in str(problem), str(problem)
    (tmp_path / "jobs.csv").write_text("id,prompt,model\na,waves,kling/kling-3.0/pro/text-to-video\nb,gulls,\n",
                                       "utf-8")
    manifest = load_manifest(path)
    assert [manifest.model_of(j).model_id for j in manifest.jobs] == ["kling/kling-3.0/pro/text-to-video",
                                                                     "kling/kling-3.0/standard/text-to-video"]
    assert [manifest.estimate_cost(j) for j in manifest.jobs] == [0.84, 0.63]


# --- image limits are the model's: Kling's pixel rules, Seedream's published validations ---------------------


def png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("model_id, field, many, size, expected", [
    ("kling/kling-3.0/pro/image-to-video", "start_image_url", False, (16, 16),
     "'in.png' is 16x16 px; Kling needs each side to be at least 300 px"),
    ("google/nano-banana-2-lite/edit", "image_urls", True, (16, 16), None),
    ("bytedance/seedream-5.0-pro/image-to-image", "image", True, (16, 16), None),
    ("bytedance/seedream-5.0-pro/image-to-image", "image", True, (10, 20),
     "'in.png' is 10x20 px; each side must exceed 14 px (width_pixels must be > 14)"),
    ("bytedance/seedream-5.0-pro/image-to-image", "image", True, (340, 20),
     "'in.png' is 340x20 px; aspect ratio must lie within 1:16..16:1 (width/height must be < 16)"),
])
def test_a_local_image_meets_its_own_models_limits(tmp_path, model_id, field, many, size, expected):
    (tmp_path / "in.png").write_bytes(png(*size))
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text(model_id, {"prompt": "x", field: ["in.png"] if many else "in.png"}), "utf-8")
    if expected is None:
        manifest = load_manifest(path)
        assert manifest.jobs[0].api_input()[field][0].startswith("data:image/png;base64,")
        return
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    shown = [str(p).removeprefix(f"{path}:") for p in info.value.problems]
    where = f"{field}[0]" if many else field
    assert [s.split(": ", 1)[1] for s in shown] == [f"jobs[0] (id=ex).{where}: {expected}"], shown


def test_a_data_uri_meets_its_own_models_limits():
    import base64

    uri = "data:image/png;base64," + base64.b64encode(png(10, 30)).decode()
    seedream = get_model("bytedance/seedream-5.0-pro/image-to-image")
    found = check_input(seedream, {"prompt": "x", "image": [uri]})
    assert [(f.path, f.message) for f in found] == [
        (("image", 0), "the data: URI's content is 10x30 px; each side must exceed 14 px (width_pixels must be > 14)")]
    assert check_input(get_model("google/nano-banana-2-lite/edit"), {"prompt": "x", "image_urls": [uri]}) == []


async def test_a_user_model_runs_in_the_built_in_sandbox(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    data = minimal()
    data["input_schema"]["properties"]["cfg_scale"] = {"type": "float", "minimum": 0, "maximum": 1}
    folder.mkdir()
    (folder / "acme.json").write_text(json.dumps(data), "utf-8")
    path = tmp_path / "m.yaml"
    path.write_text(manifest_text("acme/test/text-to-video", {"prompt": "hi", "cfg_scale": 0.5, "duration": 2},
                                  models_dir="models"), "utf-8")
    code, out, err = await cli(["run", "--sandbox", "--no-progress", str(path)])
    assert code == 0, out + err
    row = results(tmp_path / "out")["ex"]
    assert row["state"] == "done" and row["model"] == "acme/test/text-to-video"
    assert row["cost_usd"] == 0.2  # the user file's 0.1 USD/s, as the sandbox bills it


async def test_a_bake_off_gallery_shows_each_input_across_models_side_by_side_as_what_they_are(tmp_path):
    """Video, image and audio models on the same prompts: the report shows images as images, plays
    audio, names each card's model and puts the same input's cards next to each other."""
    models = ["kling/kling-3.0/standard/text-to-video", "google/nano-banana-2-lite/text-to-image",
              "elevenlabs/elevenlabs/music-generation"]
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "output": "out", "jobs": [
        {"id": "idea", "matrix": {"prompt": ["a fox at dawn", "a boat at dusk"], "model": models}}]}, sort_keys=False))
    code, out, err = await cli(["run", str(path), "--sandbox", "--no-progress"])
    assert code == 0, out + err
    page = (tmp_path / "out" / "report.html").read_text()
    cards = re.findall(r'<article class="card[^"]*" id="card-([^"]+)".*?</article>', page, re.S)
    assert cards == ["idea-p1-m1", "idea-p1-m2", "idea-p1-m3", "idea-p2-m1", "idea-p2-m2", "idea-p2-m3"]
    for card_id, body in re.findall(r'<article class="card[^"]*" id="card-([^"]+)"(.*?)</article>', page, re.S):
        media = re.search(r'<div class="media">(<\w+)', body).group(1)
        assert media == {"1": "<video", "2": "<img", "3": "<audio"}[card_id[-1]], (card_id, media)
        assert f"<dd>{models[int(card_id[-1]) - 1]}</dd>" in body  # the card names its model
    image_card = re.search(r'id="card-idea-p1-m2"(.*?)</article>', page, re.S).group(1)
    assert "<dt>duration</dt>" not in image_card and "fps" not in image_card  # an image has no duration


@pytest.mark.parametrize(("model_id", "price", "extra", "expected"), [
    # No duration field: only a price per output can be applied, and a per-second one is refused by name.
    ("bytedance/seed-audio-1.0/text-to-audio", {"usd_per_output": 0.2}, {}, 0.2),
    ("blackforestlabs/flux-3/text-to-video", {"usd_per_second": 0.2}, {"duration": "10"}, 2.0),
])
async def test_a_price_the_manifest_gives_is_applied_whatever_the_models_unit(tmp_path, model_id, price, extra,
                                                                              expected):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": model_id, "budget_usd": 10, "price": price,
                                    "jobs": [{"id": "a", "prompt": "a fox", **extra}]}, sort_keys=False))
    code, out, err = await cli(["plan", str(path), "--json", "--no-balance-check"])
    assert code == 0, err
    assert json.loads(out)["estimated_cost_usd"] == pytest.approx(expected)


async def test_a_per_second_price_for_a_model_without_a_length_field_is_a_located_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": "bytedance/seed-audio-1.0/text-to-audio", "budget_usd": 5,
                                    "price": {"usd_per_second": 0.1}, "jobs": [{"id": "a", "prompt": "rain"}]},
                                   sort_keys=False))
    code, out, err = await cli(["validate", str(path)])
    assert code == 2 and "price.usd_per_second: bytedance/seed-audio-1.0/text-to-audio has no field for the length" \
        in out + err


async def test_an_auto_duration_under_a_budget_says_to_set_the_length(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "model": "blackforestlabs/flux-3/text-to-video", "budget_usd": 5,
                                    "price": {"usd_per_second": 0.2}, "jobs": [{"id": "a", "prompt": "rain"}]},
                                   sort_keys=False))
    code, out, err = await cli(["run", str(path), "--sandbox", "--no-progress"])
    assert code == 2 and "the length of 1 job(s) is not known before the render" in err and "'duration'" in err
