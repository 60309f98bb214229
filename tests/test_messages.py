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


def test_read_only_commands_of_a_manifest_invalid_now_read_its_ledger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = write_manifest(tmp_path, [job("one"), job("two")], output=None)  # the default dir: output/batch
    assert main(["run", str(manifest), "--sandbox", "--no-progress"], stdout=io.StringIO(),
                stderr=io.StringIO()) == 0
    text = manifest.read_text(encoding="utf-8")
    assert "- id: two\n  prompt:" in text
    manifest.write_text(text.replace("- id: two\n  prompt:", "- id: two\n  promt:"), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for folder in (tmp_path, elsewhere):  # its default dir here, then through the ledger index
        monkeypatch.chdir(folder)
        out, err = io.StringIO(), io.StringIO()
        assert main(["status", str(manifest)], stdout=out, stderr=err) == 0, err.getvalue()
        assert "2 jobs in the ledger" in out.getvalue()
        warned = err.getvalue()
        assert "promt" in warned and "is invalid now" in warned and str(tmp_path / "output" / "batch") in warned
        assert "nothing was sent" not in warned
    out, err = io.StringIO(), io.StringIO()
    assert main(["export", str(manifest)], stdout=out, stderr=err) == 0
    assert [line.count('"id"') for line in out.getvalue().splitlines()] == [1, 1]
    assert main(["report", str(manifest)], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert (tmp_path / "output" / "batch" / "report.html").is_file()
    # `run` still refuses it.
    err = io.StringIO()
    assert main(["run", str(manifest), "--sandbox", "--no-progress"], stdout=io.StringIO(), stderr=err) == 2
    assert "nothing was sent" in err.getvalue()


def test_a_read_only_command_of_an_invalid_manifest_without_a_ledger_is_refused_plainly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "m.yaml"
    path.write_text("jobs:\n  - {promt: a}\n", encoding="utf-8")
    err = io.StringIO()
    assert main(["status", str(path)], stdout=io.StringIO(), stderr=err) == 2
    assert "invalid manifest" in err.getvalue() and "nothing was sent" not in err.getvalue()


@pytest.mark.parametrize("head, whence", [
    ("defaults: {duration: 10}\n", "duration comes from defaults"),
    ("", "duration is 10 (the model's default)"),
])
def test_a_multi_prompt_sum_error_says_where_the_duration_came_from(tmp_path, head, whence):
    problems = manifest_problems(tmp_path, head + "jobs:\n  - prompt: a\n"
                                 "    start_image_url: https://example.com/a.png\n    multi_prompt:\n"
                                 "      - {prompt: b, duration: 4}\n      - {prompt: c, duration: 4}\n")
    assert any("add up to 4 + 4 = 8" in p and whence in p for p in problems), problems


def test_a_multi_prompt_sum_error_of_the_jobs_own_duration_names_no_other_source(tmp_path):
    problems = manifest_problems(tmp_path, "defaults: {duration: 10}\njobs:\n  - prompt: a\n"
                                 "    start_image_url: https://example.com/a.png\n    duration: 9\n"
                                 "    multi_prompt:\n      - {prompt: b, duration: 4}\n"
                                 "      - {prompt: c, duration: 4}\n")
    assert any("but duration is 9; they must be equal" in p and "defaults" not in p for p in problems), problems


@pytest.mark.parametrize("text, line, column, quote", [
    ('jobs:\n  - prompt: "a cat\n    start_image_url: https://example.com/a.png\n  - prompt: b\n', 2, 13, '"'),
    ("jobs:\n  - id: a\n    negative_prompt: 'blur\n    prompt: b\n", 3, 22, "'"),
])
def test_an_unclosed_quote_is_reported_where_it_opened(tmp_path, text, line, column, quote):
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    code, said = _validate(path)
    assert code == 2, said
    assert f"{path}:{line}:{column}: YAML syntax error: the {quote} opened here is not closed" in said, said


def test_progress_lines_say_the_money_is_committed_and_show_the_budget(tmp_path):
    import asyncio

    from batchrun.manifest import load_manifest
    from batchrun.plan import RunOptions
    from batchrun.run import run_manifest

    manifest = write_manifest(tmp_path, [job("one"), job("two")], budget_usd=5, poll_min_interval=0.5)
    stream = io.StringIO()
    outcome = asyncio.run(run_manifest(load_manifest(manifest), base_url=None, token=None, sandbox=True,
                                       options=RunOptions(preflight=False), stream=stream, handle_signals=False))
    assert outcome.exit_code == 0, outcome.lines
    lines = [line for line in stream.getvalue().splitlines() if " done; " in line]
    assert lines and all("committed=$" in line and "of the $5.00 budget" in line for line in lines), lines
    assert "spent=" not in stream.getvalue()


def test_the_bar_of_a_rerun_starts_at_the_jobs_already_done():
    from batchrun.progress import Progress

    stream = io.StringIO()
    bar = Progress(4, lambda: {"done": 3, "queued": 1}, lambda: 1.26, stream=stream, bar=True)
    bar.close()
    shown = stream.getvalue()
    assert "3/4" in shown and "committed=$1.26" in shown


def test_a_warning_while_a_bar_is_drawn_is_one_whole_line_and_the_bar_comes_back():
    from batchrun.progress import Progress, write_line

    stream = io.StringIO()
    bar = Progress(4, lambda: {"done": 1, "queued": 3}, lambda: 1.68, stream=stream, bar=True)
    write_line("batchrun: clip-02: slow storage", stream)
    bar.close()
    shown = stream.getvalue()
    at = shown.index("batchrun: clip-02: slow storage\n")
    assert shown[at - 1] in "\r\n"  # the bar's line was cleared first: not glued to the end of the bar
    assert shown.rindex("1/4") > at  # drawn again after the line
