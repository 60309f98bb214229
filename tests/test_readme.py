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
    assert commands == ["pip install . && batchrun run manifests/example.yaml --sandbox",
                        "pip install '.[test]' && pytest"]
