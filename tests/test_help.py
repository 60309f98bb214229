"""`--help` answers a newcomer: every command says what it does and how it exits, every flag what it takes."""

import argparse
import io
import re
import shlex
import subprocess
import sys

import pytest
from proc_helpers import env, wait_for

from batchrun.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


def test_every_command_is_covered():
    assert {"validate", "run", "plan", "status", "cancel", "export", "report", "review", "reroll", "copy",
            "adopt", "sandbox", "models"} <= {path[0] for path in COMMANDS}
    assert ("models", "pull") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_each_command_help_has_a_description_exit_codes_and_a_line_per_option(path, capsys):
    parser = dict(_commands(build_parser()))[path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help.strip(), f"{' '.join(path)}: {action.option_strings or action.dest}"
    assert main([*path, "--help"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # what `batchrun ... --help` prints
    assert parser.description and "\n" not in parser.description.strip()
    assert parser.description.strip() in help_text
    assert parser.epilog and re.search(r"exit: [^.]*\b(0|2)\b", help_text), help_text


@pytest.mark.parametrize("flag, says", [
    (("run", "--concurrency"), "default"), (("run", "--budget"), "dollars"), (("run", "--max-wait"), "seconds"),
    (("export", "--format"), "csv"), (("sandbox", "--host"), "address"), (("sandbox", "--port"), "0-65535"),
    (("sandbox", "--render-seconds"), "seconds"), (("cancel", "--wait"), "default 30"),
])
def test_flags_say_what_they_take_and_their_default(flag, says):
    command, option = flag
    parser = dict(_commands(build_parser()))[(command,)]
    action = next(a for a in parser._actions if option in a.option_strings)
    assert says in action.help.lower()


def test_manifest_argument_says_what_it_takes():
    parser = dict(_commands(build_parser()))[("run",)]
    assert "YAML" in parser.format_help()


def test_the_sandbox_banner_can_be_pasted_into_a_shell(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "batchrun", "sandbox", "--port", "0"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        wait_for(lambda: lines.append(proc.stdout.readline()) or any("try:" in line for line in lines), 20,
                 "the sandbox's banner")
    finally:
        proc.terminate()
        proc.wait(5)
    line = next(line for line in lines if "try:" in line).split("try:", 1)[1]
    command = line.split("(", 1)[0]
    words = shlex.split(command)
    assert "<" not in command and ">" not in command, line
    assert words[0].startswith("RUNCOMFY_BASE_URL=http://127.0.0.1:") and "RUNCOMFY_API_TOKEN=sandbox" in words
    assert words[-3:] == ["batchrun", "run", "MANIFEST"]
