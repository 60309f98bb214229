"""Bad flags and arguments: one readable line naming the flag, exit 2, nothing sent, no traceback."""

import io
from pathlib import Path

import pytest

from batchrun.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[1] / "manifests" / "example.yaml")


@pytest.mark.parametrize("argv, message", [
    (["run", EXAMPLE, "--sandbox", "--budget", "-1"], "--budget must be at least 0, got -1.0"),
    (["run", EXAMPLE, "--sandbox", "--concurrency", "0"], "--concurrency must be at least 1, got 0"),
    (["run", EXAMPLE, "--sandbox", "--concurrency", "abc"], "argument --concurrency: invalid int value: 'abc'"),
    (["run", EXAMPLE, "--sandbox", "--max-wait", "nan"], "--max-wait must be a finite number"),
    (["run", "no-such.yaml", "--sandbox"], "no-such.yaml:1:1: no such file"),
    (["status"], "the following arguments are required: MANIFEST_OR_OUTPUT_DIR"),
    (["export", EXAMPLE, "--format", "xml"], "argument --format: invalid choice: 'xml'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_flags_give_one_readable_line(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a failed run must leave nothing behind
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, stdout=out, stderr=err) == 2
    text = out.getvalue() + err.getvalue()
    assert message in text, text
    assert "Traceback" not in text
    assert list(tmp_path.iterdir()) == []


def test_run_without_a_token_says_how_to_get_going(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNCOMFY_API_TOKEN", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert main(["run", EXAMPLE, "--output", str(tmp_path / "o")], stdout=out, stderr=err) == 2
    assert "set RUNCOMFY_API_TOKEN" in err.getvalue() and "--sandbox" in err.getvalue()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["run", "cancel", "plan"])
@pytest.mark.parametrize(("where", "url", "message"), [
    ("env", "http://[::1", "RUNCOMFY_BASE_URL: 'http://[::1' is not a usable URL"),
    ("env", "http://a..b/", "RUNCOMFY_BASE_URL: 'a..b' is not a usable host name"),
    ("flag", "http://xn--/", "--base-url: 'http://xn--/' is not a usable URL"),
    ("flag", "http://" + "x" * 64 + ".example", "is not a usable host name"),
    ("env", "http://host:99999", "RUNCOMFY_BASE_URL: 'http://host:99999' is not a usable URL"),
    ("flag", "ftp://host", "--base-url: must look like https://host[:port][/path], not 'ftp://host'"),
    ("flag", "https://user:sk-SECRET-1@host", "--base-url: must not carry a user name or password"),
    ("env", "https://host/\x1b]0;x\x07", "RUNCOMFY_BASE_URL: must look like"),
])
def test_a_bad_base_url_is_a_usage_error_wherever_it_is_read(command, where, url, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "sk-test-token-1")
    monkeypatch.setenv("RUNCOMFY_BASE_URL", url if where == "env" else "https://model-api.runcomfy.net")
    argv = [command, EXAMPLE, "--output", str(tmp_path / "o")] + (["--base-url", url] if where == "flag" else [])
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, stdout=out, stderr=err) == 2
    text = out.getvalue() + err.getvalue()
    assert message in text and "Traceback" not in text, text
    assert "sk-SECRET-1" not in text and "\x1b" not in text and "\x07" not in text
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing sent


def test_a_sandbox_on_a_taken_port_says_so_in_one_line(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "batchrun", "sandbox", "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr


@pytest.mark.parametrize("argv", [["sandbox", "--port", "99999"], ["sandbox", "--port", "abc"],
                                  ["review", ".", "--port", "70000"]])
def test_a_port_that_is_not_one_is_a_usage_error(argv):
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, stdout=out, stderr=err) == 2
    assert "is not a port number" in err.getvalue() and "Traceback" not in err.getvalue()
