"""Generated jobs: a job's `matrix:` and the rows of a `jobs_from:` CSV or JSON Lines file."""

from __future__ import annotations

import io
import re
import textwrap
import time
import tracemalloc

import pytest
from PIL import Image

from batchrun import generators, manifest
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest

URL = "https://example.com/a.png"


def write(folder, text: str, name: str = "m.yaml", encoding: str = "utf-8"):
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding=encoding, newline="")
    return path


def problems(path) -> list[str]:
    """Every problem as 'FILE:LINE:COL: where: message', FILE shown relative to the manifest's folder."""
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [str(p).removeprefix(f"{path.parent}/") for p in info.value.problems]


def write_image(path, size=(640, 480)):
    out = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(out, "PNG")
    path.write_bytes(out.getvalue())


# --- matrix ---------------------------------------------------------------------------------------


def test_matrix_makes_the_cartesian_product_with_readable_ids(tmp_path):
    m = load_manifest(write(tmp_path, f"""\
        defaults:
          duration: 5
        jobs:
          - id: beach
            negative_prompt: blur
            matrix:
              prompt: [a, b, c]
              start_image_url: [{URL}, https://example.com/b.png]
          - id: other
            prompt: z
            start_image_url: {URL}
        """))
    assert [j.id for j in m.jobs] == ["beach-p1-s1", "beach-p1-s2", "beach-p2-s1", "beach-p2-s2", "beach-p3-s1",
                                      "beach-p3-s2", "other"]
    assert m.jobs[3].input == {"duration": 5, "negative_prompt": "blur", "prompt": "b",
                               "start_image_url": "https://example.com/b.png"}
    assert [j.index for j in m.jobs] == list(range(7))
    assert {j.line for j in m.jobs[:6]} == {4} and m.jobs[6].line == 9
    assert m.jobs[3].label == "jobs[0] (id=beach-p2-s2)" and m.jobs[6].label == "jobs[1] (id=other)"
    assert len({j.input_sha256 for j in m.jobs}) == 7


def test_matrix_ids_are_stable_when_values_are_appended(tmp_path):
    text = "jobs:\n  - id: x\n    start_image_url: {u}\n    matrix:\n      prompt: [{p}]\n"
    before = load_manifest(write(tmp_path, text.format(u=URL, p="a, b")))
    after = load_manifest(write(tmp_path, text.format(u=URL, p="a, b, c")))
    assert [(j.id, j.input_sha256) for j in before.jobs] == [(j.id, j.input_sha256) for j in after.jobs[:2]]
    assert after.jobs[2].id == "x-p3"


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["prompt", "start_image_url"], ["p", "s"]),
        (["shot_type", "start_image_url"], ["sh", "st"]),
        (["prompt", "negative_prompt", "duration"], ["p", "n", "d"]),
        (["prompt", "prompt_extra"], ["prompt", "prompte"]),
        (["duration"], ["d"]),
        (["2x", "_"], ["k2", "k"]),
    ],
)
def test_abbreviations(keys, expected):
    assert generators.abbreviations(keys) == expected


def test_matrix_without_id_derives_each_id_from_the_input(tmp_path):
    m = load_manifest(write(tmp_path, f"jobs:\n  - start_image_url: {URL}\n    matrix:\n      prompt: [a, b]\n"))
    assert [j.id for j in m.jobs] == [f"job-{j.input_sha256[:12]}" for j in m.jobs]
    assert m.jobs[0].id != m.jobs[1].id


def test_matrix_of_list_valued_fields(tmp_path):
    m = load_manifest(write(tmp_path, f"""\
        jobs:
          - id: shots
            prompt: p
            start_image_url: {URL}
            duration: 6
            matrix:
              multi_prompt:
                - [{{prompt: a, duration: 3}}, {{prompt: b, duration: 3}}]
                - [{{prompt: c, duration: 6}}]
        """))
    assert [j.input["multi_prompt"][0]["prompt"] for j in m.jobs] == ["a", "c"]
    assert [j.id for j in m.jobs] == ["shots-m1", "shots-m2"]


def test_problem_in_a_matrix_value_is_reported_once_at_that_value(tmp_path):
    found = problems(write(tmp_path, f"""\
        jobs:
          - id: a
            start_image_url: {URL}
            matrix:
              prompt: [x, y, z]
              duration: [5, 20, 7]
              durration: [1]
        """))
    assert found == [
        "m.yaml:6:21: jobs[0].matrix.duration[1]: must be at most 15, got 20",
        "m.yaml:7:7: jobs[0].matrix.durration: unknown field 'durration' (did you mean 'duration'?)",
    ]


def test_problem_in_the_shared_keys_of_a_matrix_job_is_reported_once(tmp_path):
    found = problems(write(tmp_path, """\
        jobs:
          - id: a
            prompt: 5
            matrix:
              negative_prompt: [x, y, z]
        """))
    assert found == [
        "m.yaml:2:5: jobs[0]: missing required field 'start_image_url'",
        "m.yaml:3:13: jobs[0].prompt: must be text, not integer 5",
    ]


@pytest.mark.parametrize(
    "matrix, expected",
    [
        ("[a, b]", "4:13: jobs[0].matrix: must be a mapping of input fields to lists of values to combine"),
        ("{}", "4:13: jobs[0].matrix: is empty: list at least one field and its values"),
        ("{negative_prompt: x}", "4:31: jobs[0].matrix.negative_prompt: must be a list of values to combine (for a "
                                 "single value, set the field in the job itself)"),
        ("{negative_prompt: []}", "4:31: jobs[0].matrix.negative_prompt: is an empty list: the matrix would make "
                                  "no jobs"),
        ("{prompt: [a, b]}", "4:14: jobs[0].matrix.prompt: 'prompt' is set both in the job and in its matrix; "
                             "keep one"),
        ("{id: [a, b]}", "4:14: jobs[0].matrix.id: ids cannot be listed in a matrix: each job's id is made from "
                         "the job's id and its position in the matrix"),
    ],
    ids=["list", "empty", "scalar", "empty-list", "also-in-job", "id"],
)
def test_bad_matrix(tmp_path, matrix, expected):
    path = write(tmp_path, f"jobs:\n  - prompt: p\n    start_image_url: {URL}\n    matrix: {matrix}\n")
    assert problems(path) == [f"m.yaml:{expected}"]


def test_matrix_in_defaults(tmp_path):
    path = write(tmp_path, f"defaults:\n  matrix: {{prompt: [a]}}\njobs:\n  - prompt: p\n    start_image_url: {URL}\n")
    assert problems(path) == ["m.yaml:2:3: defaults.matrix: a matrix belongs to a job, not to defaults"]


def test_id_too_long_for_its_matrix(tmp_path):
    prompts = ", ".join("p" * 12)
    text = "jobs:\n  - id: {base}\n    start_image_url: " + URL + "\n    matrix:\n      prompt: [" + prompts + "]\n"
    base = "a" * 61
    assert problems(write(tmp_path, text.format(base=base))) == [
        f"m.yaml:2:9: jobs[0].id: id '{base}' is too long for its matrix: ids would reach 65 characters "
        f"('{base}-p12'); the limit is 64"
    ]
    jobs = load_manifest(write(tmp_path, text.format(base="a" * 60))).jobs
    assert len(jobs) == 12 and len(jobs[-1].id) == 64


def test_matrix_id_collisions_follow_the_usual_rules(tmp_path):
    found = problems(write(tmp_path, f"""\
        jobs:
          - id: x
            start_image_url: {URL}
            matrix:
              prompt: [a, b]
          - id: x-p2
            prompt: b
            start_image_url: {URL}
          - id: X-P1-2
            prompt: c
            start_image_url: {URL}
        """))
    assert found == [
        "m.yaml:6:5: jobs[1] (id=x-p2): duplicate id 'x-p2' (first used by jobs[0] on line 2); "
        "these two jobs have the same input: give each an id to run both",
        "m.yaml:9:5: jobs[2] (id=X-P1-2): id 'X-P1-2' would collide with output #2 of job 'X-P1' (X-P1-2.mp4)",
    ]


def test_a_million_job_matrix_is_refused_fast_with_its_size(tmp_path):
    values = ", ".join(f"p{i}" for i in range(1000))
    path = write(tmp_path, f"jobs:\n  - id: big\n    start_image_url: {URL}\n    matrix:\n"
                           f"      prompt: [{values}]\n      negative_prompt: [{values}]\n")
    tracemalloc.start()
    started = time.perf_counter()
    found = problems(path)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert found == ["m.yaml:5:7: jobs[0].matrix: this matrix makes 1,000,000 jobs (1,000 x 1,000); a manifest "
                     "may hold at most 100,000: split the batch into several manifests"]
    assert elapsed < 2, f"took {elapsed:.1f} s"
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_jobs_over_the_limit_in_all_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "MAX_JOBS", 10)
    path = write(tmp_path, f"""\
        defaults:
          start_image_url: {URL}
        jobs:
          - matrix: {{prompt: [a, b, c, d, e, f]}}
          - matrix: {{prompt: [g, h, i, j, k]}}
        """)
    assert problems(path) == ["m.yaml:4:3: jobs: the jobs list makes 11 jobs; a manifest may hold at most 10: "
                              "split the batch into several manifests"]
    monkeypatch.setattr(manifest, "MAX_JOBS", 11)
    assert len(load_manifest(path).jobs) == 11


def test_local_images_in_a_matrix(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "small.png", size=(100, 100))
    path = write(tmp_path, "jobs:\n  - id: x\n    prompt: p\n    matrix:\n      start_image_url: [a.png, small.png]\n"
                           "      negative_prompt: [n1, n2]\n")
    assert problems(path) == [
        "m.yaml:5:32: jobs[0].matrix.start_image_url[1]: 'small.png' is 100x100 px; Kling needs each side to be "
        "at least 300 px"
    ]
    write_image(tmp_path / "small.png")
    jobs = load_manifest(path).jobs
    assert [j.local_files["start_image_url"].name for j in jobs] == ["a.png", "a.png", "small.png", "small.png"]


# --- jobs_from: CSV -------------------------------------------------------------------------------


def csv_manifest(tmp_path, csv_text: str, yaml_extra: str = "", encoding: str = "utf-8"):
    write(tmp_path, csv_text, "jobs.csv", encoding=encoding)
    return write(tmp_path, f"{yaml_extra}jobs_from: jobs.csv\n")


def test_csv_rows_are_jobs_with_converted_cells(tmp_path):
    path = csv_manifest(tmp_path, f"""\
        id,prompt,start_image_url,duration,generate_audio,cfg_scale,multi_prompt
        a,Boats,{URL},10,true,0.25,
        b,Waves,{URL},,FALSE,1,"[{{""prompt"": ""x"", ""duration"": 5}}]"
        """, "defaults:\n  duration: 5\n")
    m = load_manifest(path)
    assert [(j.id, j.input) for j in m.jobs] == [
        ("a", {"duration": 10, "prompt": "Boats", "start_image_url": URL, "generate_audio": True, "cfg_scale": 0.25}),
        ("b", {"duration": 5, "prompt": "Waves", "start_image_url": URL, "generate_audio": False, "cfg_scale": 1,
               "multi_prompt": [{"prompt": "x", "duration": 5}]}),
    ]
    assert [(j.file, j.line, j.label) for j in m.jobs] == [
        (str(tmp_path / "jobs.csv"), 2, "jobs_from[0] (id=a)"), (str(tmp_path / "jobs.csv"), 3, "jobs_from[1] (id=b)")]


def test_csv_with_bom_crlf_and_quoted_newlines_points_at_physical_lines(tmp_path):
    path = csv_manifest(tmp_path, (
        f'id,prompt,start_image_url,duration\r\n'
        f'a,"first line\r\nsecond line",{URL},5\r\n'
        f'\r\n'
        f'b,"one\ntwo\nthree",{URL},five\r\n'
        f'c,ok,{URL},99\r\n'), encoding="utf-8-sig")
    assert (tmp_path / "jobs.csv").read_bytes().startswith(b"\xef\xbb\xbfid,")
    assert problems(path) == [
        "jobs.csv:5:4: jobs_from[1] (id=b).duration: must be a whole number, not text 'five'",
        "jobs.csv:8:4: jobs_from[2] (id=c).duration: must be at most 15, got 99",
    ]
    (tmp_path / "jobs.csv").write_bytes((tmp_path / "jobs.csv").read_bytes().replace(b"five", b"5")
                                        .replace(b"99", b"7"))
    m = load_manifest(path)
    assert m.jobs[0].input["prompt"] == "first line\r\nsecond line"
    assert [j.line for j in m.jobs] == [2, 5, 8]


def test_csv_missing_required_column_is_an_error_at_each_row(tmp_path):
    path = csv_manifest(tmp_path, "id,prompt\na,x\nb,y\n")
    assert problems(path) == [
        "jobs.csv:2:1: jobs_from[0] (id=a): missing required field 'start_image_url'",
        "jobs.csv:3:1: jobs_from[1] (id=b): missing required field 'start_image_url'",
    ]


def test_csv_missing_column_filled_by_defaults(tmp_path):
    path = csv_manifest(tmp_path, "prompt\nx\n", f"defaults:\n  start_image_url: {URL}\n")
    assert load_manifest(path).jobs[0].input == {"start_image_url": URL, "prompt": "x"}


def test_csv_empty_required_cell_is_an_error_at_that_row(tmp_path):
    path = csv_manifest(tmp_path, f"id,prompt,start_image_url\na,x,{URL}\nb,,{URL}\n")
    assert problems(path) == ["jobs.csv:3:1: jobs_from[1] (id=b): missing required field 'prompt'"]


def test_csv_unknown_and_duplicate_columns_point_at_the_header(tmp_path):
    path = csv_manifest(tmp_path, f"id,promt,start_image_url,colour,start_image_url\na,x,{URL},red,{URL}\n")
    assert problems(path) == [
        "jobs.csv:1:2: jobs_from: unknown column 'promt' (did you mean 'prompt'?)",
        "jobs.csv:1:4: jobs_from: unknown column 'colour'",
        "jobs.csv:1:5: jobs_from: column 'start_image_url' appears twice (first as column 3)",
        "jobs.csv:2:1: jobs_from[0] (id=a): missing required field 'prompt'",
    ]


def test_csv_ragged_rows(tmp_path):
    path = csv_manifest(tmp_path, f"id,prompt,start_image_url\na,x,{URL},extra\nb,y,{URL},,\nc,z\n",
                        f"defaults:\n  start_image_url: {URL}\n")
    assert problems(path) == ["jobs.csv:2:4: jobs_from[0]: this row has 4 cells but the header names 3 columns"]


def test_csv_id_problems(tmp_path):
    path = csv_manifest(tmp_path, f"prompt,id,start_image_url\nx,../etc,{URL}\ny,ok,{URL}\nz,ok,{URL}\n")
    assert problems(path) == [
        "jobs.csv:2:2: jobs_from[0].id: id '../etc' is not allowed: use 1-64 letters, digits, '_' or '-', "
        "starting with a letter or digit",
        "jobs.csv:4:2: jobs_from[2] (id=ok): duplicate id 'ok' (first used by jobs_from[1] on line 3)",
    ]


def test_csv_and_jobs_list_together(tmp_path):
    write(tmp_path, f"id,prompt,start_image_url\nfrom-csv,x,{URL}\nlisted,y,{URL}\n", "jobs.csv")
    path = write(tmp_path, f"jobs_from: jobs.csv\njobs:\n  - id: listed\n    prompt: z\n    start_image_url: {URL}\n")
    assert problems(path) == [
        f"jobs.csv:3:1: jobs_from[1] (id=listed): duplicate id 'listed' (first used by jobs[0] on line 3 of "
        f"{path})"
    ]
    (tmp_path / "jobs.csv").write_text(f"id,prompt,start_image_url\nfrom-csv,x,{URL}\n")
    assert [(j.index, j.id) for j in load_manifest(path).jobs] == [(0, "listed"), (1, "from-csv")]


def test_csv_without_ids_gets_derived_ids(tmp_path):
    m = load_manifest(csv_manifest(tmp_path, f"prompt,start_image_url\nx,{URL}\ny,{URL}\n"))
    assert all(re.fullmatch(r"job-[0-9a-f]{12}", j.id) for j in m.jobs)


def test_csv_local_images_are_relative_to_the_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    write_image(tmp_path / "cliff.png")
    write(tmp_path / "data", "id,prompt,start_image_url\na,x,cliff.png\nb,y,data/missing.png\n", "jobs.csv")
    path = write(tmp_path, "jobs_from: data/jobs.csv\n")
    assert problems(path) == [
        f"data/jobs.csv:3:3: jobs_from[1] (id=b).start_image_url: 'data/missing.png' does not exist (looked for "
        f"{tmp_path}/data/missing.png; image paths are relative to the manifest's folder)"
    ]
    write_image(tmp_path / "data" / "missing.png")
    jobs = load_manifest(path).jobs
    assert [j.local_files for j in jobs] == [{"start_image_url": tmp_path / "cliff.png"},
                                             {"start_image_url": tmp_path / "data" / "missing.png"}]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "jobs.csv:1:1: jobs_from: the file is empty: it needs a header row naming the columns (id, prompt, "
              "start_image_url, ...)"),
        (b"\n\n", "jobs.csv:1:1: jobs_from: the file is empty: it needs a header row naming the columns (id, prompt, "
                  "start_image_url, ...)"),
        (b"id,prompt\n", "jobs.csv:1:1: jobs_from: the file has a header but no job rows"),
        (b"id,prompt\n,,\n", "jobs.csv:2:1: jobs_from: the file has a header but no job rows"),
        (b'prompt\n"a"b\n', "jobs.csv:2:1: jobs_from: CSV syntax error: ',' expected after '\"'"),
        (b"prompt\ncaf\xe9\n", "jobs.csv:2:4: jobs_from: the file is not UTF-8 text (byte 0xe9, 'é' in "
                                "Windows-1252): it looks like a table Excel saved as plain 'CSV' in a Windows code "
                                "page; save it again as 'CSV UTF-8' (in German Excel: 'CSV UTF-8 (durch "
                                "Trennzeichen getrennt)')"),
    ],
    ids=["empty", "blank", "header-only", "empty-cells", "syntax", "not-utf8"],
)
def test_bad_csv_files(tmp_path, content, expected):
    (tmp_path / "jobs.csv").write_bytes(content)
    assert problems(write(tmp_path, "jobs_from: jobs.csv\n")) == [expected]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("missing.csv", "1:12: jobs_from: no such file {dir}/missing.csv (the path is relative to the manifest's "
                        "folder)"),
        ("jobs.txt", "1:12: jobs_from: must name a .csv or .jsonl file, not .txt"),
        ("sub.csv", "1:12: jobs_from: {dir}/sub.csv is a folder, not a jobs file"),
        ("[a.csv]", "1:12: jobs_from: must be the path of a .csv or .jsonl file (relative to the manifest)"),
        ("''", "1:12: jobs_from: must be the path of a .csv or .jsonl file (relative to the manifest)"),
    ],
)
def test_bad_jobs_from(tmp_path, value, expected):
    (tmp_path / "sub.csv").mkdir()
    assert problems(write(tmp_path, f"jobs_from: {value}\n")) == [f"m.yaml:{expected.format(dir=tmp_path)}"]


def test_no_jobs_list_and_no_jobs_from(tmp_path):
    assert problems(write(tmp_path, "version: 1\n")) == [
        "m.yaml:1:1: jobs: the manifest has no jobs: add a 'jobs:' list"]


def test_empty_jobs_list_is_fine_beside_jobs_from(tmp_path):
    write(tmp_path, f"prompt,start_image_url\nx,{URL}\n", "jobs.csv")
    assert len(load_manifest(write(tmp_path, "jobs: []\njobs_from: jobs.csv\n")).jobs) == 1


def test_too_many_rows_stop_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "MAX_JOBS", 3)
    monkeypatch.setattr(generators, "MAX_JOBS", 3)
    rows = "".join(f"p{i},{URL}\n" for i in range(10))
    write(tmp_path, "prompt,start_image_url\n" + rows, "jobs.csv")
    path = write(tmp_path, f"jobs_from: jobs.csv\njobs:\n  - prompt: listed\n    start_image_url: {URL}\n")
    assert problems(path) == ["jobs.csv:4:1: jobs_from: too many jobs: with this row the manifest would hold more "
                              "than 3 (2 rows fit after the jobs list); split the batch into several manifests"]


# --- jobs_from: JSON Lines ------------------------------------------------------------------------


def test_jsonl_rows(tmp_path):
    write(tmp_path, f'{{"id": "a", "prompt": "x", "start_image_url": "{URL}", "duration": 10}}\n\n'
                    f'{{"prompt": "y", "start_image_url": "{URL}", "elements": [{{"frontal_image_url": "{URL}"}}]}}\n',
          "jobs.jsonl")
    m = load_manifest(write(tmp_path, "defaults:\n  duration: 5\njobs_from: jobs.jsonl\n"))
    assert [(j.id[:4], j.line, j.input["duration"]) for j in m.jobs] == [("a", 1, 10), ("job-", 3, 5)]


def test_jsonl_problems_point_at_lines(tmp_path):
    write(tmp_path, (f'{{"id": "a", "prompt": 5, "start_image_url": "{URL}"}}\n'
                     '{"id": "b", "prompt": "x",, }\n'
                     '["not", "an", "object"]\n'
                     '{"id": "c", "id": "d"}\n'
                     f'{{"id": "e", "prompt": "p", "start_image_url": "{URL}", "duration": NaN}}\n'
                     f'{{"id": "f", "promt": "p", "start_image_url": "{URL}"}}\n'), "jobs.jsonl")
    assert problems(write(tmp_path, "jobs_from: jobs.jsonl\n")) == [
        "jobs.jsonl:1:1: jobs_from[0] (id=a).prompt: must be text, not integer 5",
        "jobs.jsonl:2:27: jobs_from: invalid JSON: Expecting property name enclosed in double quotes",
        "jobs.jsonl:3:1: jobs_from: each line must be a JSON object of fields ({\"prompt\": ..., ...})",
        "jobs.jsonl:4:1: jobs_from: invalid job: duplicate key 'id'",
        "jobs.jsonl:5:1: jobs_from: invalid job: NaN is not a number JSON allows",
        "jobs.jsonl:6:1: jobs_from[1] (id=f): missing required field 'prompt'",
        "jobs.jsonl:6:1: jobs_from[1] (id=f).promt: unknown field 'promt' (did you mean 'prompt'?)",
    ]
