"""The README is part of the contract: its settings table and quick start must match the code."""

import re
from pathlib import Path

from batchrun.settings import reference_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_settings_table_matches_the_code():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- settings-table:.*?-->\n(.*?)\n<!-- /settings-table -->", text, re.S)
    assert block, "the README lost its settings table markers"
    assert block.group(1) == reference_table()


def test_quick_start_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && "
        "batchrun run manifests/example.yaml --sandbox",
        "pip install '.[test]' && pytest"]


def test_readme_names_only_files_the_repository_has():
    """The README once cited a SPEC file the repository does not ship; it must stand on its own."""
    text = README.read_text(encoding="utf-8")
    assert "SPEC" not in text
    assert "<any" not in text and "TOKEN=any" not in text, "a placeholder a shell reads as a redirect"


def test_readme_answers_the_newcomer_situations():
    text = README.read_text(encoding="utf-8")
    for heading in ("## Install", "## Before real money", "## Common situations", "### Running from cron"):
        assert heading in text
    situations = text.split("## Common situations", 1)[1].split("\n## ", 1)[0]
    for case in ("edited a prompt", "deleted a video", "out of budget", "Ctrl-C", "`unknown`",
                 "another take", "another folder", "`[fail]`"):
        assert case in situations, case
