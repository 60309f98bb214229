"""Messages a newcomer can act on: the usual YAML and type slips say how to fix them, conflicting flags are
refused, counts read as English."""

from __future__ import annotations

import io

import pytest
from helpers import job, manifest_problems, write_manifest

from batchrun.cli import main


def _validate(path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["validate", str(path)], stdout=out, stderr=err)
    return code, out.getvalue() + err.getvalue()


@pytest.mark.parametrize("text, where, like", [
    ("jobs:\n  - {prompt: a, start_image_url: https://example.com/a.png, duration: 5.0}\n", "duration",
     "like 5, not 5.0"),
    ("defaults: {duration: 10.0}\njobs:\n  - {prompt: a, start_image_url: https://example.com/a.png}\n",
     "duration", "like 10, not 10.0"),
    ("jobs:\n  - prompt: a\n    start_image_url: https://example.com/a.png\n    duration: 10\n    multi_prompt:\n"
     "      - {prompt: b, duration: 4.0}\n      - {prompt: c, duration: 6}\n", "multi_prompt[0].duration",
     "like 4, not 4.0"),
])
def test_a_whole_number_written_with_a_decimal_point_says_which_number(tmp_path, text, where, like):
    problems = manifest_problems(tmp_path, text)
    assert any(f"{where}: must be a whole number {like}" in p for p in problems), problems


@pytest.mark.parametrize("text, line, key", [
    ("jobs:\n  - id: x\n    prompt: A cat: the sequel\n    start_image_url: https://example.com/a.png\n", 3, "prompt"),
    ("jobs:\n  - prompt: Scene 2: she turns\n    start_image_url: https://example.com/a.png\n", 2, "prompt"),
    ("defaults:\n  negative_prompt: blur: heavy, noise\njobs: []\n", 2, "negative_prompt"),
])
def test_an_unquoted_colon_in_text_gets_a_quote_hint(tmp_path, text, line, key):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    code, said = _validate(path)
    assert code == 2 and "Traceback" not in said
    assert f"{path}:{line}:" in said and f'put the text in quotes, like {key}: "..."' in said, said


def test_other_syntax_errors_get_no_quote_hint(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text('jobs:\n  - prompt: "a cat: quoted\n    start_image_url: [https://example.com/a.png\n',
                    encoding="utf-8")
    code, said = _validate(path)
    assert code == 2 and "YAML syntax error" in said and "put the text in quotes" not in said, said


def test_sandbox_with_base_url_is_refused_and_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, [job("a")])
    out, err = io.StringIO(), io.StringIO()
    code = main(["run", str(manifest), "--sandbox", "--base-url", "http://127.0.0.1:9", "--no-progress"],
                stdout=out, stderr=err)
    assert code == 2
    assert "--sandbox and --base-url cannot be used together" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not (tmp_path / "out").exists()


def test_one_job_is_one_job_in_the_closing_lines_and_status(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, [job("only", "a lone cat [fail]")])
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", str(manifest), "--sandbox", "--no-progress"], stdout=out, stderr=err) == 1
    said = out.getvalue() + err.getvalue()
    assert "1 job: failed=1" in said and "1 jobs" not in said, said
    out = io.StringIO()
    assert main(["status", str(manifest)], stdout=out, stderr=io.StringIO()) == 0
    assert "1 job in the ledger" in out.getvalue(), out.getvalue()
    out = io.StringIO()
    assert main(["reroll", str(manifest), "only"], stdout=out, stderr=io.StringIO()) == 0
    assert "asked for 1 more take: only-t2" in out.getvalue() and "submits it" in out.getvalue()
