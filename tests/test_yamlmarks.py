"""Positions kept in the marks tree (packed into ints inside it) come back exactly, wherever they are."""

from __future__ import annotations

import pytest

from batchrun.errors import ManifestError
from batchrun.yamlload import Marks, load_text, node_at, position_of


def test_far_lines_and_long_lines_keep_their_exact_positions():
    long_prompt = "w" * 70_000  # lines and columns past 16 bits
    last = f"  - {{prompt: {long_prompt}, duration: 5}}"
    text = "jobs:\n" + "  - prompt: a\n" * 69_998 + last + "\n"
    value, marks = load_text(text, "m")
    assert len(value["jobs"]) == 69_999
    assert position_of(marks, ("jobs", 69_998)) == (70_000, 5)
    assert position_of(marks, ("jobs", 69_998, "prompt"), key=True) == (70_000, 6)
    assert position_of(marks, ("jobs", 69_998, "prompt")) == (70_000, 14)
    column = last.index("duration") + 1
    assert column > 70_000
    assert position_of(marks, ("jobs", 69_998, "duration"), key=True) == (70_000, column)
    assert position_of(marks, ("jobs", 69_998, "duration")) == (70_000, column + len("duration: "))


def test_keys_and_values_on_different_lines():
    text = "defaults:\n  prompt:\n    text on the next line\n  elements:\n    - frontal_image_url:\n        a.png\n"
    _, marks = load_text(text, "m")
    assert position_of(marks, ("defaults", "prompt"), key=True) == (2, 3)
    assert position_of(marks, ("defaults", "prompt")) == (3, 5)
    assert position_of(marks, ("defaults", "elements"), key=True) == (4, 3)
    assert position_of(marks, ("defaults", "elements")) == (5, 5)
    assert position_of(marks, ("defaults", "elements", 0, "frontal_image_url")) == (6, 9)
    assert node_at(marks, ("defaults", "prompt")) == (3, 5)
    assert isinstance(node_at(marks, ("defaults", "elements")), Marks)
    # a path past a scalar stops at the scalar
    assert position_of(marks, ("defaults", "prompt", "deeper"), key=True) == (3, 5)


def test_a_document_that_is_one_value_has_its_position():
    value, marks = load_text("\n\n   just text\n", "m")
    assert value == "just text" and marks == (3, 4)
    assert position_of(marks, ("jobs",)) == (3, 4)


def test_aliased_and_merged_values_point_where_they_are_written():
    text = "base: &b\n  duration: 5\n  prompt: &p shared\njobs:\n  - <<: *b\n    id: x\n  - prompt: *p\n"
    value, marks = load_text(text, "m")
    assert value["jobs"][0] == {"id": "x", "duration": 5, "prompt": "shared"}
    assert position_of(marks, ("jobs", 0, "duration")) == (2, 13)
    assert position_of(marks, ("jobs", 0, "duration"), key=True) == (2, 3)
    assert position_of(marks, ("jobs", 0, "id")) == (6, 9)
    assert position_of(marks, ("jobs", 1, "prompt")) == (3, 11)


def test_a_duplicate_of_a_key_holding_a_scalar_or_a_list_names_the_first_line():
    for text, first in (("a: 1\nb: 2\na: 3\n", 1), ("x: 0\na:\n  - 1\na: 3\n", 2)):
        with pytest.raises(ManifestError) as info:
            load_text(text, "m")
        assert f"duplicate key 'a' (first defined on line {first})" in str(info.value.problems[0])
