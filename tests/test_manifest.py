"""Manifest structure: settings, defaults merge, job ids, model and output; every problem located."""

from __future__ import annotations

import re

import pytest
from helpers import manifest_problems as problems
from helpers import write_yaml as write

from batchrun.manifest import load_manifest
from batchrun.models import DEFAULT_MODEL, all_models
from batchrun.settings import Settings

URL = "https://example.com/a.png"




def jobs_text(*ids: str) -> str:
    return "jobs:\n" + "".join(f"  - id: {i}\n    prompt: p\n    start_image_url: {URL}\n" for i in ids)


# --- a valid manifest -----------------------------------------------------------------------------


def test_valid_manifest(tmp_path):
    path = write(tmp_path, f"""\
        version: 1
        model: {DEFAULT_MODEL}
        concurrency: 8
        budget_usd: 25
        defaults:
          duration: 5
          generate_audio: false
        jobs:
          - id: cliff
            prompt: The woman smiles.
            start_image_url: {URL}
          - id: harbor
            prompt: Boats rock.
            start_image_url: {URL}
            duration: 10
        """)
    manifest = load_manifest(path)
    assert manifest.model.model_id == DEFAULT_MODEL
    assert manifest.settings == Settings(concurrency=8, budget_usd=25.0)
    assert isinstance(manifest.settings.budget_usd, float)
    assert manifest.warnings == []
    assert [(j.index, j.id, j.line) for j in manifest.jobs] == [(0, "cliff", 9), (1, "harbor", 12)]
    assert manifest.jobs[1].input == {"duration": 10, "generate_audio": False, "prompt": "Boats rock.",
                                      "start_image_url": URL}
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.jobs[0].input_sha256)
    assert manifest.jobs[0].input_sha256 != manifest.jobs[1].input_sha256


# --- defaults -------------------------------------------------------------------------------------


def test_defaults_merge_under_each_job_and_job_keys_win(tmp_path):
    manifest = load_manifest(write(tmp_path, f"""\
        defaults:
          duration: 5
          generate_audio: false
          start_image_url: {URL}
        jobs:
          - prompt: a
          - prompt: b
            generate_audio: true
            start_image_url: https://example.com/b.png
        """))
    assert [j.input for j in manifest.jobs] == [
        {"duration": 5, "generate_audio": False, "start_image_url": URL, "prompt": "a"},
        {"duration": 5, "generate_audio": True, "start_image_url": "https://example.com/b.png", "prompt": "b"},
    ]


def test_error_from_defaults_is_reported_once_at_the_defaults_line(tmp_path):
    assert problems(tmp_path, f"""\
        defaults:
          duration: '5'
          promt: x
          start_image_url: http://example.com/a.png
        jobs:
          - prompt: a
          - prompt: b
          - prompt: c
          - prompt: d
            duration: 5
            start_image_url: {URL}
        """) == [
        "2:13: defaults.duration: must be a whole number, not text '5'",
        "3:3: defaults.promt: unknown field 'promt' (did you mean 'prompt'?)",
        "4:20: defaults.start_image_url: must be an https:// URL (RunComfy fetches inputs over HTTPS only)",
    ]


def test_warning_from_defaults_is_reported_once(tmp_path):
    manifest = load_manifest(write(tmp_path, """\
        defaults:
          start_image_url: https://example.com/image
        jobs:
          - prompt: a
          - prompt: b
        """))
    assert [str(w).removeprefix(f"{tmp_path / 'm.yaml'}:") for w in manifest.warnings] == [
        "2:20: defaults.start_image_url: warning: the URL does not end in a known image type "
        "(jpg, jpeg, png, bmp, webp); fine if the host serves an image anyway"
    ]


def test_job_own_error_is_reported_per_job(tmp_path):
    assert problems(tmp_path, f"""\
        defaults:
          start_image_url: {URL}
        jobs:
          - id: a
            prompt: 1
          - id: b
            prompt: 2
        """) == [
        "5:13: jobs[0] (id=a).prompt: must be text, not integer 1",
        "7:13: jobs[1] (id=b).prompt: must be text, not integer 2",
    ]


def test_id_in_defaults(tmp_path):
    assert problems(tmp_path, f"defaults:\n  id: x\n{jobs_text('a')}") == [
        "2:3: defaults.id: ids belong to jobs, not to defaults"
    ]


def test_defaults_must_be_a_mapping(tmp_path):
    assert problems(tmp_path, f"defaults: [duration]\n{jobs_text('a')}") == [
        "1:11: defaults: must be a mapping of model input fields"
    ]


def test_empty_defaults_is_fine(tmp_path):
    assert len(load_manifest(write(tmp_path, f"defaults:\n{jobs_text('a')}")).jobs) == 1


# --- job ids --------------------------------------------------------------------------------------

NOT_ALLOWED = "is not allowed: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"


@pytest.mark.parametrize(
    "raw_id, expected",
    [
        ("../x", f"2:9: jobs[0].id: id '../x' {NOT_ALLOWED}"),
        ("a/b", f"2:9: jobs[0].id: id 'a/b' {NOT_ALLOWED}"),
        ("'a\\b'", f"2:9: jobs[0].id: id 'a\\\\b' {NOT_ALLOWED}"),
        (".hidden", f"2:9: jobs[0].id: id '.hidden' {NOT_ALLOWED}"),
        ("-dash", f"2:9: jobs[0].id: id '-dash' {NOT_ALLOWED}"),
        ("_under", f"2:9: jobs[0].id: id '_under' {NOT_ALLOWED}"),
        ("a b", f"2:9: jobs[0].id: id 'a b' {NOT_ALLOWED}"),
        ("caf\u00e9", f"2:9: jobs[0].id: id 'caf\u00e9' {NOT_ALLOWED}"),
        ("a" * 200, f"2:9: jobs[0].id: id '{'a' * 67}...' {NOT_ALLOWED}"),
        ("a" * 65, f"2:9: jobs[0].id: id '{'a' * 65}' {NOT_ALLOWED}"),
        ("''", f"2:9: jobs[0].id: id '' {NOT_ALLOWED}"),
        ("42", "2:9: jobs[0].id: id must be text, got 42 (put it in quotes)"),
        ("4.5", "2:9: jobs[0].id: id must be text, got 4.5 (put it in quotes)"),
        ("yes", "2:9: jobs[0].id: id must be text, got True (put it in quotes)"),
        ("[a]", "2:9: jobs[0].id: id must be text, got ['a'] (put it in quotes)"),
        ("", "2:8: jobs[0].id: id must be text, got None (put it in quotes)"),
    ],
    ids=["dotdot", "slash", "backslash", "hidden", "dash", "underscore", "space", "accent", "200-chars",
         "65-chars", "empty", "number", "float", "bool", "list", "null"],
)
def test_bad_ids(tmp_path, raw_id, expected):
    assert problems(tmp_path, f"jobs:\n  - id: {raw_id}\n    prompt: p\n    start_image_url: {URL}\n") == [expected]


@pytest.mark.parametrize("good", ["a", "A", "0a", "'0'", "a" * 64, "clip_01-final", "'42'", "2024-01-02"])
def test_good_ids(tmp_path, good):
    manifest = load_manifest(write(tmp_path, jobs_text(good)))
    assert manifest.jobs[0].id == good.strip("'")


def test_duplicate_ids(tmp_path):
    assert problems(tmp_path, jobs_text("a", "b", "a")) == [
        "8:5: jobs[2] (id=a): duplicate id 'a' (first used by jobs[0] on line 2); "
        "these two jobs have the same input: give each an id to run both"
    ]


def test_duplicate_ids_with_different_input(tmp_path):
    assert problems(tmp_path, f"""\
        jobs:
          - id: a
            prompt: one
            start_image_url: {URL}
          - id: a
            prompt: two
            start_image_url: {URL}
        """) == ["5:5: jobs[1] (id=a): duplicate id 'a' (first used by jobs[0] on line 2)"]


def test_ids_differing_only_in_case(tmp_path):
    assert problems(tmp_path, jobs_text("Harbor", "harbor")) == [
        "5:5: jobs[1] (id=harbor): id 'harbor' differs from 'Harbor' (jobs[0]) only in case; "
        "their files would collide on case-insensitive disks"
    ]


@pytest.mark.parametrize("order", [("x", "x-2"), ("x-2", "x")])
def test_id_colliding_with_an_extra_output_file(tmp_path, order):
    index = order.index("x-2")
    assert problems(tmp_path, jobs_text(*order)) == [
        f"{2 + 3 * index}:5: jobs[{index}] (id=x-2): id 'x-2' would collide with output #2 of job 'x' (x-2.mp4)"
    ]


def test_id_collision_ignores_case(tmp_path):
    assert problems(tmp_path, jobs_text("X", "x-12")) == [
        "5:5: jobs[1] (id=x-12): id 'x-12' would collide with output #12 of job 'x' (x-12.mp4)"
    ]


@pytest.mark.parametrize("other", ["x-1", "x-0", "x-02", "x-b", "y-2"])
def test_ids_that_do_not_collide(tmp_path, other):
    assert len(load_manifest(write(tmp_path, jobs_text("x", other))).jobs) == 2


def test_derived_id_is_stable_and_follows_the_input(tmp_path):
    text = f"defaults:\n  duration: 5\njobs:\n  - prompt: a\n    start_image_url: {URL}\n"
    first = load_manifest(write(tmp_path, text)).jobs[0]
    again = load_manifest(write(tmp_path, text)).jobs[0]
    assert re.fullmatch(r"job-[0-9a-f]{12}", first.id)
    assert again.id == first.id and again.input_sha256 == first.input_sha256
    assert first.id == "job-" + first.input_sha256[:12]
    # Key order and where a value comes from (defaults or the job) do not matter, only the input.
    reordered = f"jobs:\n  - start_image_url: {URL}\n    duration: 5\n    prompt: a\n"
    assert load_manifest(write(tmp_path, reordered)).jobs[0].id == first.id
    # Any change of input changes it, including one that comes through defaults.
    assert load_manifest(write(tmp_path, text.replace("prompt: a", "prompt: b"))).jobs[0].id != first.id
    assert load_manifest(write(tmp_path, text.replace("duration: 5", "duration: 6"))).jobs[0].id != first.id


def test_derived_ids_of_identical_jobs_collide(tmp_path):
    found = problems(tmp_path, f"jobs:\n  - prompt: a\n    start_image_url: {URL}\n"
                               f"  - prompt: a\n    start_image_url: {URL}\n")
    assert len(found) == 1
    assert re.fullmatch(
        r"4:5: jobs\[1\] \(id=(job-[0-9a-f]{12})\): duplicate id '\1' \(first used by jobs\[0\] on line 2\); "
        r"these two jobs have the same input: give each an id to run both", found[0])


def test_id_is_not_model_input(tmp_path):
    manifest = load_manifest(write(tmp_path, jobs_text("a")))
    assert "id" not in manifest.jobs[0].input


# --- jobs list ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("version: 1\n", "1:1: jobs: the manifest has no jobs: add a 'jobs:' list"),
        ("jobs:\n", "1:6: jobs: the manifest has no jobs: add a 'jobs:' list"),
        ("jobs: []\n", "1:7: jobs: the jobs list is empty"),
        ("jobs:\n  a: 1\n", "2:3: jobs: must be a list of jobs (each item starting with '- ')"),
        ("jobs:\n  - hello\n", "2:5: jobs[0]: each job must be a mapping of fields (prompt:, start_image_url:, ...)"),
    ],
    ids=["absent", "null", "empty", "mapping", "scalar-item"],
)
def test_jobs_list_shape(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("- a\n- b\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not a list"),
        ("hello\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not text 'hello'"),
        ("42\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not integer 42"),
        ("~\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not null"),
    ],
    ids=["list", "text", "number", "null"],
)
def test_top_level_must_be_a_mapping(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


# --- settings -------------------------------------------------------------------------------------


def test_unknown_setting_with_did_you_mean(tmp_path):
    assert problems(tmp_path, "concurency: 2\nbudget: 5\nflavour: mint\n" + jobs_text("a")) == [
        "1:1: concurency: unknown setting (did you mean 'concurrency'?)",
        "2:1: budget: unknown setting (did you mean 'budget_usd'?)",
        "3:1: flavour: unknown setting",
    ]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("concurrency: 0", "1:14: concurrency: must be at least 1, got 0"),
        ("concurrency: 1001", "1:14: concurrency: must be at most 1000, got 1001"),
        ("concurrency: 2.5", "1:14: concurrency: must be a whole number, got 2.5"),
        ("concurrency: '4'", "1:14: concurrency: must be a whole number, got '4'"),
        ("concurrency: true", "1:14: concurrency: must be a whole number, got True"),
        ("concurrency: 1" + "0" * 100, f"1:14: concurrency: must be at most 1000, got 1{'0' * 76}..."),
        ("budget_usd: -1", "1:13: budget_usd: must be at least 0, got -1"),
        ("budget_usd: ten", "1:13: budget_usd: must be a number, got 'ten'"),
        ("budget_usd: [5]", "1:13: budget_usd: must be a number, got [5]"),
        ("requests_per_second: -1", "1:22: requests_per_second: must be at least 0, got -1"),
        ("poll_max_interval: -1", "1:20: poll_max_interval: must be at least 0, got -1"),
        ("job_timeout: 0.5", "1:14: job_timeout: must be at least 1, got 0.5"),
        ("max_attempts: 0", "1:15: max_attempts: must be at least 1, got 0"),
        ("resubmit_unknown: 'yes'", "1:19: resubmit_unknown: must be true or false, got 'yes'"),
        ("resubmit_unknown: 1", "1:19: resubmit_unknown: must be true or false, got 1"),
        ("max_wait: 0", "1:11: max_wait: must be at least 1, got 0"),
        ("max_video_mb: 0", "1:15: max_video_mb: must be at least 1, got 0"),
        ("poll_min_interval: 40", "1:20: poll_min_interval: must not be larger than poll_max_interval"),
    ],
)
def test_bad_settings(tmp_path, line, expected):
    assert problems(tmp_path, line + "\n" + jobs_text("a")) == [expected]


def test_settings_defaults_and_nulls(tmp_path):
    manifest = load_manifest(write(tmp_path, "budget_usd: null\nmax_wait: ~\n" + jobs_text("a")))
    assert manifest.settings == Settings()


def test_settings_values(tmp_path):
    manifest = load_manifest(write(tmp_path, "requests_per_second: 2\nresubmit_unknown: true\nmax_wait: 60\n"
                                   + jobs_text("a")))
    assert manifest.settings.requests_per_second == 2.0
    assert manifest.settings.resubmit_unknown is True
    assert manifest.settings.max_wait == 60.0


def test_version(tmp_path):
    assert problems(tmp_path, "version: 2\n" + jobs_text("a")) == [
        "1:10: version: this batchrun reads manifest version 1, not 2"
    ]


def test_price_override(tmp_path):
    manifest = load_manifest(write(tmp_path, "price:\n  usd_per_second: 0.1\n" + jobs_text("a")))
    assert manifest.price.usd_per_second == 0.1
    assert manifest.price.usd_per_second_with_audio == 0.126
    assert problems(tmp_path, "price:\n  usd_per_secnd: 1\n  usd_per_second_with_audio: -1\n" + jobs_text("a")) == [
        "2:3: price.usd_per_secnd: unknown price field (did you mean 'usd_per_second'?)",
        "3:30: price.usd_per_second_with_audio: must be a number of USD per second, got -1",
    ]
    assert problems(tmp_path, "price: 5\n" + jobs_text("a")) == [
        "1:8: price: must be a mapping with usd_per_second and usd_per_second_with_audio"
    ]


# --- model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, shown",
    [("kling/kling-3.0/standard/image-to-vidoe", "'kling/kling-3.0/standard/image-to-vidoe' (did you mean "
                                                 "'kling/kling-3.0/standard/image-to-video'?)"),
     ("5", "'5'"), ("[a]", "\"['a']\"")],
)
def test_unknown_model_points_to_the_known_ones(tmp_path, value, shown):
    count = len(all_models())
    assert problems(tmp_path, f"model: {value}\n" + jobs_text("a")) == [
        f"1:8: model: unknown model {shown}; `batchrun models list` shows the {count} known models"
    ]


# --- output ---------------------------------------------------------------------------------------


def test_output_dir_is_relative_to_the_manifest(tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(sub, "output: ../out/spring\n" + jobs_text("a"))
    assert load_manifest(path).output_dir.resolve() == (tmp_path / "out" / "spring").resolve()
    assert load_manifest(path, output="flag").output_dir == tmp_path / "flag"
    plain = write(sub, jobs_text("a"), name="batch.yaml")
    assert load_manifest(plain).output_dir == tmp_path / "output" / "batch"


@pytest.mark.parametrize("value", ["''", "5", "[a]", '"a\\0b"'])
def test_bad_output(tmp_path, value):
    assert problems(tmp_path, f"output: {value}\n" + jobs_text("a")) == ["1:9: output: must be a folder path (text)"]


def test_problems_are_sorted_by_position(tmp_path):
    found = problems(tmp_path, f"""\
        jobs:
          - id: b
            prompt: 1
            start_image_url: {URL}
        concurrency: 0
        defaults: 3
        """)
    assert [p.split(": ")[0] for p in found] == ["3:13", "5:14", "6:11"]


def test_defaults_error_is_reported_once_for_many_jobs(tmp_path):
    jobs = "".join(f"  - id: j{i}\n    prompt: p\n" for i in range(1000))
    assert problems(tmp_path, f"defaults:\n  duration: '5'\n  start_image_url: {URL}\njobs:\n{jobs}") == [
        "2:13: defaults.duration: must be a whole number, not text '5'"
    ]


@pytest.mark.parametrize("name", ["budget_usd", "max_wait", "requests_per_second"])
def test_flag_overrides_refuse_non_finite_numbers(name):
    from batchrun.errors import UsageError

    flag = {"budget_usd": "--budget"}.get(name, "--" + name.replace("_", "-"))  # the flag the user typed
    with pytest.raises(UsageError, match=f"^{flag} must be a finite number, got nan$"):
        Settings().with_overrides(**{name: float("nan")})
    with pytest.raises(UsageError, match=f"^{flag} must be a finite number, got inf$"):
        Settings().with_overrides(**{name: float("inf")})
