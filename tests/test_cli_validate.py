"""`batchrun validate`: exit codes, output format, the problem cap, and no traceback for any input."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchrun.cli import main

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "manifests" / "example.yaml"
URL = "https://example.com/a.png"
PROBLEM_LINE = re.compile(r"^.+:\d+:\d+: .+$")

BILLION_LAUGHS = "".join(
    f"{name}: &{name} [" + ",".join([f"*{prev}" if prev else '"lol"'] * 9) + "]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
) + "jobs: *i\n"

# name -> (file content, the problem line expected after 'FILE:')
NASTY: dict[str, tuple[str | bytes, str]] = {
    "python-apply": ("jobs:\n  - prompt: !!python/object/apply:os.system ['echo pwned']\n",
                     "2:13: the tag !!python/object/apply:os.system is not allowed (only plain YAML data)"),
    "python-name": ("jobs: !!python/name:os.system ''\n",
                    "1:7: the tag !!python/name:os.system is not allowed (only plain YAML data)"),
    "python-object": ("jobs:\n  - !!python/object:object {}\n",
                      "2:5: the tag !!python/object:object is not allowed (only plain YAML data)"),
    "custom-tag": ("jobs: !include other.yaml\n", "1:7: the tag !include is not allowed (only plain YAML data)"),
    "alias-bomb": (BILLION_LAUGHS, "7:29: aliases expand past 5,000,000 nodes (an alias bomb?)"),
    "unknown-alias": ("jobs: *nothing\n", "1:7: unknown alias *nothing"),
    "duplicate-key": (f"jobs:\n  - prompt: a\n    start_image_url: {URL}\n    prompt: b\n",
                      "4:5: duplicate key 'prompt' (first defined on line 2)"),
    "tab": ("jobs:\n\t- prompt: a\n",
            "2:1: YAML syntax error: found character that cannot start any token (while scanning for the next "
            "token); use spaces, not tabs, to indent"),
    "not-utf8": (b"jobs:\n  - prompt: caf\xe9\n", "2:16: the file is not UTF-8 text (byte 0xe9)"),
    "nul": ("jobs: \x00\n", "1:7: the character U+0000 is not allowed in YAML (control characters are not allowed)"),
    "empty": ("", "1:1: the manifest is empty"),
    "comment-only": ("# nothing here\n", "1:1: the manifest is empty"),
    "top-level-list": ("- prompt: a\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not a list"),
    "top-level-scalar": ("just text\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not text 'just text'"),
    "top-level-null": ("~\n", "1:1: a manifest must be a mapping with a 'jobs:' list, not null"),
    "two-documents": ("jobs: []\n---\njobs: []\n", "2:1: only one YAML document is allowed per manifest"),
    "unclosed-flow": ("jobs: [\n", "2:1: YAML syntax error: did not find expected node content (while parsing a "
                                   "flow node)"),
    "deep-nesting": ("jobs: " + "[" * 10000 + "]" * 10000 + "\n", "1:106: nested more than 100 levels deep"),
    "nan": ("budget_usd: .nan\njobs: []\n", "1:13: '.nan' is not a finite number (manifest values must be JSON)"),
    "huge-int": ("concurrency: 9" + "9" * 5000 + "\n",
                 "1:14: '9999999999999999999999999999999999999...' is not a valid int"),
    "complex-key": ("? [a]\n: b\n", "1:3: mapping keys must be plain text"),
    "bad-merge": ("a: &a 1\njobs:\n  - <<: *a\n", "3:5: '<<' must merge a mapping or a list of mappings"),
    "jobs-not-list": ("jobs: 5\n", "1:7: jobs: must be a list of jobs (each item starting with '- ')"),
    "job-not-mapping": ("jobs:\n  - 5\n",
                        "2:5: jobs[0]: each job must be a mapping of fields (prompt:, start_image_url:, ...)"),
    "id-path": (f"jobs:\n  - id: ../../etc/passwd\n    prompt: a\n    start_image_url: {URL}\n",
                "2:9: jobs[0].id: id '../../etc/passwd' is not allowed: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit"),
    "id-number": (f"jobs:\n  - id: 42\n    prompt: a\n    start_image_url: {URL}\n",
                  "2:9: jobs[0].id: id must be text, got 42 (put it in quotes)"),
    "id-mapping": (f"jobs:\n  - id: {{a: 1}}\n    prompt: a\n    start_image_url: {URL}\n",
                   "2:9: jobs[0].id: id must be text, got {'a': 1} (put it in quotes)"),
    "bad-ipv6-url": ("jobs:\n  - id: a\n    prompt: a\n    start_image_url: 'https://[::1'\n",
                     "4:22: jobs[0] (id=a).start_image_url: is not a valid URL: 'https://[::1'"),
    "url-is-a-list": ("jobs:\n  - id: a\n    prompt: a\n    start_image_url: [1]\n",
                      "4:22: jobs[0] (id=a).start_image_url: must be text, not list [1]"),
    "multi-prompt-scalars": (f"jobs:\n  - id: a\n    prompt: a\n    start_image_url: {URL}\n    multi_prompt: [1]\n",
                             "5:20: jobs[0] (id=a).multi_prompt[0]: must be a mapping, not integer 1"),
    "elements-scalars": (f"jobs:\n  - id: a\n    prompt: a\n    start_image_url: {URL}\n    elements: [[1]]\n",
                         "5:16: jobs[0] (id=a).elements[0]: must be a mapping, not list [1]"),
    "defaults-scalar": (f"defaults: 5\njobs:\n  - prompt: a\n    start_image_url: {URL}\n",
                        "1:11: defaults: must be a mapping of model input fields"),
    "model-list": ("model: [x]\njobs: []\n",
                   "1:8: model: unknown model \"['x']\"; `batchrun models list` shows the 22 known models"),
    "price-nested": ("price: {usd_per_second: {a: 1}}\njobs: []\n",
                     "1:25: price.usd_per_second: must be a number of USD per second, got {'a': 1}"),
    "output-nul": (f"output: \"a\\0b\"\njobs:\n  - prompt: a\n    start_image_url: {URL}\n",
                   "1:9: output: must be a folder path (text)"),
    "float-tag": ("budget_usd: !!float abc\njobs: []\n", "1:13: 'abc' is not a valid float"),
    "int-tag": ("concurrency: !!int 1.5\njobs: []\n", "1:14: '1.5' is not a valid int"),
    "bool-tag": ("resubmit_unknown: !!bool maybe\njobs: []\n", "1:19: 'maybe' is not a valid bool"),
    "empty-bool-tag": ("x: !!bool\njobs: []\n", "1:4: '' is not a valid bool"),
    "null-tag": ("jobs:\n  - prompt: !!null text\n", "2:13: 'text' is not a valid null"),
    "tag-on-mapping": ("jobs: !!int {a: 1}\n", "1:7: the tag !!int cannot be put on a mapping"),
    "text-alias-bomb": (f's: &s "{"x" * 100_000}"\nl: &l [{", ".join(["*s"] * 300)}]\n'
                        f"jobs:\n  - prompt: a\n    elements: [{', '.join(['*l'] * 300)}]\n",
                        "5:20: aliases expand past 64 MiB of text (an alias bomb?)"),
}

# name -> (jobs file name, its content, the first problem line expected after the jobs file's path)
NASTY_JOBS_FILES: dict[str, tuple[str, str, str]] = {
    "csv-deep-cell": ("jobs.csv", f'prompt,multi_prompt\na,"{"[" * 1000 + "]" * 1000}"\n',
                      ":2:2: jobs_from[0].multi_prompt: nested more than 100 levels deep"),
    "csv-deep-object-cell": ("jobs.csv", 'prompt,elements\na,"' + '[{""x"": ' * 500 + '"\n',
                             ":2:2: jobs_from[0].elements: nested more than 100 levels deep"),
    "jsonl-deep-row": ("jobs.jsonl", '{"prompt": "a", "elements": ' + "[" * 1000 + "]" * 1000 + "}\n",
                       ":1:128: jobs_from: nested more than 100 levels deep"),
    "jsonl-deep-objects": ("jobs.jsonl", '{"a": ' * 1000 + "1" + "}" * 1000 + "\n",
                           ":1:601: jobs_from: nested more than 100 levels deep"),
}


def run_validate(*paths) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["validate", *map(str, paths)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_example_is_valid():
    code, out, err = run_validate(EXAMPLE)
    assert code == 0
    assert out == f"{EXAMPLE}: ok, 4 jobs\n"
    assert err == ""


def test_invalid_manifest_exits_2_with_located_problems(tmp_path):
    path = write(tmp_path, "bad.yaml", f"concurency: 2\njobs:\n  - id: a\n    prompt: 5\n    start_image_url: {URL}\n")
    code, out, _ = run_validate(path)
    assert code == 2
    assert out.splitlines() == [
        f"{path}:1:1: concurency: unknown setting (did you mean 'concurrency'?)",
        f"{path}:4:13: jobs[0] (id=a).prompt: must be text, not integer 5",
        f"{path}: invalid: 2 errors",
    ]


def test_warnings_do_not_fail(tmp_path):
    path = write(tmp_path, "warn.yaml", "jobs:\n  - id: a\n    prompt: p\n    start_image_url: https://e.com/img\n")
    code, out, _ = run_validate(path)
    assert code == 0
    assert out.splitlines() == [
        f"{path}:4:22: jobs[0] (id=a).start_image_url: warning: the URL does not end in a known image type "
        "(jpg, jpeg, png, bmp, webp); fine if the host serves an image anyway",
        f"{path}: ok, 1 job, 1 warning",
    ]


def test_several_manifests(tmp_path):
    bad = write(tmp_path, "bad.yaml", "jobs: []\n")
    missing = tmp_path / "missing.yaml"
    code, out, _ = run_validate(EXAMPLE, bad, missing, EXAMPLE)
    assert code == 2
    assert out.splitlines() == [
        f"{EXAMPLE}: ok, 4 jobs",
        f"{bad}:1:7: jobs: the jobs list is empty",
        f"{bad}: invalid: 1 error",
        f"{missing}:1:1: no such file",
        f"{missing}: invalid: 1 error",
        f"{EXAMPLE}: ok, 4 jobs",
    ]
    assert run_validate(EXAMPLE, EXAMPLE)[0] == 0


def test_directory_argument(tmp_path):
    code, out, _ = run_validate(tmp_path)
    assert code == 2
    assert out.splitlines()[0] == f"{tmp_path}:1:1: is a directory, not a manifest file"


def test_no_manifest_given_is_a_usage_error():
    out, err = io.StringIO(), io.StringIO()
    assert main(["validate"], stdout=out, stderr=err) == 2
    assert "Traceback" not in out.getvalue() + err.getvalue()


def test_ten_thousand_broken_jobs_print_at_most_50_problems(tmp_path):
    jobs = "".join(f"  - id: j{i}\n    prompt: 5\n    start_image_url: http://e.com/{i}.png\n    durration: 5\n"
                   for i in range(10_000))
    path = write(tmp_path, "broken.yaml", "jobs:\n" + jobs)
    started = time.perf_counter()
    code, out, err = run_validate(path)
    elapsed = time.perf_counter() - started
    lines = out.splitlines()
    assert code == 2
    assert len(lines) == 51
    assert all(PROBLEM_LINE.match(line) for line in lines[:50])
    assert lines[0] == f"{path}:3:13: jobs[0] (id=j0).prompt: must be text, not integer 5"
    assert lines[-1] == f"{path}: invalid: 30000 errors (first 50 shown)"
    assert err == ""
    assert elapsed < 30, f"validate took {elapsed:.1f} s"


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_input_is_a_located_problem_not_a_traceback(tmp_path, name):
    content, expected = NASTY[name]
    path = write(tmp_path, f"{name}.yaml", content)
    code, out, err = run_validate(path)
    assert code == 2
    assert "Traceback" not in out + err
    assert out.splitlines()[0] == f"{path}:{expected}"
    assert out.splitlines()[-1].startswith(f"{path}: invalid: ")


@pytest.mark.parametrize("name", list(NASTY_JOBS_FILES))
def test_nasty_jobs_file_is_a_located_problem_not_a_traceback(tmp_path, name):
    file_name, content, expected = NASTY_JOBS_FILES[name]
    write(tmp_path, file_name, content)
    path = write(tmp_path, "m.yaml", f"defaults:\n  start_image_url: {URL}\njobs_from: {file_name}\n")
    code, out, err = run_validate(path)
    assert (code, err) == (2, "")
    assert out.splitlines()[0] == f"{tmp_path / file_name}{expected}"
    assert out.splitlines()[-1].startswith(f"{path}: invalid: ")


def test_all_nasty_inputs_at_once(tmp_path):
    paths = [write(tmp_path, f"{name}.yaml", content) for name, (content, _) in NASTY.items()]
    started = time.perf_counter()
    code, out, err = run_validate(*paths, EXAMPLE)
    assert time.perf_counter() - started < 10
    assert code == 2
    assert "Traceback" not in out + err
    for path, (_, expected) in zip(paths, NASTY.values(), strict=True):
        assert f"{path}:{expected}\n" in out
        assert re.search(rf"^{re.escape(str(path))}: invalid: \d+ errors?$", out, re.M)
    assert out.endswith(f"{EXAMPLE}: ok, 4 jobs\n")


def test_oversized_file(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:
        f.write(b"# big\n")
        f.truncate(33 * 2**20)
    code, out, _ = run_validate(path)
    assert code == 2
    assert out.splitlines() == [
        f"{path}:1:1: the file is 33.0 MiB; manifests are limited to 32 MiB (split the batch into several manifests)",
        f"{path}: invalid: 1 error",
    ]


def test_real_subprocess(tmp_path):
    bad = write(tmp_path, "bad.yaml", NASTY["python-apply"][0])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "batchrun", "validate", str(EXAMPLE), str(bad)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{EXAMPLE}: ok, 4 jobs",
        f"{bad}:{NASTY['python-apply'][1]}",
        f"{bad}: invalid: 1 error",
    ]
    ok = subprocess.run([sys.executable, "-m", "batchrun", "validate", str(EXAMPLE)],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ok.returncode == 0 and ok.stdout == f"{EXAMPLE}: ok, 4 jobs\n"


def _broken_jobs(count: int) -> str:
    jobs = "".join(f"  - id: j{i}\n    prompt: 5\n    start_image_url: https://e.com/a.png\n" for i in range(count))
    return "version: 1\njobs:\n" + jobs


def test_every_manifest_says_what_was_not_shown(tmp_path):
    first = write(tmp_path, "first.yaml", _broken_jobs(60))
    second = write(tmp_path, "second.yaml", _broken_jobs(3))
    code, out, _ = run_validate(first, second)
    assert code == 2
    lines = out.splitlines()
    assert len(lines) == 52
    assert lines[-2] == f"{first}: invalid: 60 errors (first 50 shown)"
    assert lines[-1] == f"{second}: invalid: 3 errors (not shown: only the first 50 problems of a call are printed)"


def test_many_warnings_on_a_valid_manifest_say_they_were_cut(tmp_path):
    jobs = "".join(f"  - id: w{i}\n    prompt: hi\n    start_image_url: https://e.com/noext\n" for i in range(55))
    path = write(tmp_path, "warn.yaml", "version: 1\njobs:\n" + jobs)
    code, out, _ = run_validate(path)
    assert code == 0
    assert out.splitlines()[-1] == f"{path}: ok, 55 jobs, 55 warnings (first 50 shown)"


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    """`batchrun validate ... | head -1`: no BrokenPipeError traceback, whatever the command prints."""
    # Over a pipe buffer (64 KiB) of "ok" lines on stdout, so the reader is gone before the last write.
    reader = subprocess.Popen(["head", "-c", "10"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = subprocess.run([sys.executable, "-m", "batchrun", "validate", *[str(EXAMPLE)] * 3000],
                          stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    reader.stdin.close()
    reader.wait(timeout=10)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141  # as a shell reports for `cat`
