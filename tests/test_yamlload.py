"""Safe YAML loading: refused constructs, each located, and what plain YAML turns into.

Every case is a small YAML text written to tmp_path; the tests pin the exact `LINE:COL: message`.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import pytest

from batchrun import yamlload
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.yamlload import Marks, load_file, load_text, position_of

URL = "https://example.com/a.png"


def refusal(text: str) -> str:
    """The single problem `load_text` reports for `text`, as 'LINE:COL: message'."""
    with pytest.raises(ManifestError) as info:
        load_text(textwrap.dedent(text), "m.yaml")
    assert len(info.value.problems) == 1
    problem = str(info.value.problems[0])
    assert problem.startswith("m.yaml:")
    return problem.removeprefix("m.yaml:")


def file_refusal(path: Path, **kwargs) -> str:
    with pytest.raises(ManifestError) as info:
        load_file(path, **kwargs)
    assert len(info.value.problems) == 1
    return str(info.value.problems[0]).removeprefix(f"{path}:")


# --- tags -----------------------------------------------------------------------------------------


def test_python_object_apply_is_refused_and_never_run(tmp_path):
    canary = tmp_path / "pwned"
    path = tmp_path / "m.yaml"
    path.write_text(
        "version: 1\n"
        "jobs:\n"
        f"  - prompt: !!python/object/apply:os.system ['touch {canary}']\n"
        f"    start_image_url: {URL}\n"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert [str(p) for p in info.value.problems] == [
        f"{path}:3:13: the tag !!python/object/apply:os.system is not allowed (only plain YAML data)"
    ]
    assert not canary.exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("jobs: !!python/name:os.system ''\n",
         "1:7: the tag !!python/name:os.system is not allowed (only plain YAML data)"),
        ("jobs:\n  - !!python/object:object {}\n",
         "2:5: the tag !!python/object:object is not allowed (only plain YAML data)"),
        ("jobs:\n  - !!python/object/new:os.system [ls]\n",
         "2:5: the tag !!python/object/new:os.system is not allowed (only plain YAML data)"),
        ("jobs: !!python/tuple [1, 2]\n", "1:7: the tag !!python/tuple is not allowed (only plain YAML data)"),
        ("jobs: !!python/module:os\n", "1:7: the tag !!python/module:os is not allowed (only plain YAML data)"),
        ("jobs:\n  - prompt: !custom hello\n", "2:13: the tag !custom is not allowed (only plain YAML data)"),
        ("jobs: !!binary aGVsbG8=\n", "1:7: the tag !!binary is not allowed (only plain YAML data)"),
        ("jobs: !!set {a, b}\n", "1:7: the tag !!set is not allowed (only plain YAML data)"),
        ("jobs: !!omap [a: 1]\n", "1:7: the tag !!omap is not allowed (only plain YAML data)"),
        ("%TAG !e! tag:example.com,2000:\n---\njobs: !e!thing x\n",
         "3:7: the tag tag:example.com,2000:thing is not allowed (only plain YAML data)"),
        ("jobs: []\n!!python/name:os.system : 1\n",
         "2:1: the tag !!python/name:os.system is not allowed (only plain YAML data)"),
    ],
    ids=["name", "object", "object-new", "tuple", "module", "custom", "binary", "set", "omap", "tag-directive",
         "tagged-key"],
)
def test_tags_outside_the_core_schema_are_refused(text, expected):
    assert refusal(text) == expected


def test_core_tags_are_allowed():
    value, _ = load_text("a: !!str 5\nb: !!int '7'\nc: !!float 1\nd: !!bool true\ne: !!null ''\nf: ! 12\n", "m")
    assert value == {"a": "5", "b": 7, "c": 1.0, "d": True, "e": None, "f": "12"}


# --- aliases --------------------------------------------------------------------------------------

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
jobs: *i
"""


def test_billion_laughs_is_refused_quickly():
    started = time.perf_counter()
    assert refusal(BILLION_LAUGHS) == "7:29: aliases expand past 5,000,000 nodes (an alias bomb?)"
    assert time.perf_counter() - started < 2


def test_alias_bomb_through_merge_keys_is_refused():
    text = "a: &a {" + ", ".join(f"k{i}: [1,2,3,4,5,6,7,8,9,10]" for i in range(10)) + "}\n"
    for level in range(1, 7):
        text += f"l{level}: &l{level} [" + ", ".join([f"*{'a' if level == 1 else f'l{level - 1}'}"] * 12) + "]\n"
    text += "jobs:\n  - <<: *a\n    x: *l6\n"
    assert refusal(text).endswith(": aliases expand past 5,000,000 nodes (an alias bomb?)")


def test_aliases_of_long_text_are_refused_by_their_expanded_bytes():
    # 102 KB of file, 9 GB of text once expanded: few nodes (90,000), so only the byte budget stops it.
    text = (f's: &s "{"x" * 100_000}"\n'
            f"l: &l [{', '.join(['*s'] * 300)}]\n"
            f"jobs:\n  - prompt: a\n    elements: [{', '.join(['*l'] * 300)}]\n")
    started = time.perf_counter()
    problem = refusal(text)
    # `l` itself is 30 MB of text, the first alias of it 30 MB more: the second one passes 64 MiB.
    assert problem == "5:20: aliases expand past 64 MiB of text (an alias bomb?)"
    assert time.perf_counter() - started < 2


def test_byte_budget_counts_keys_and_merged_mappings():
    shared = "shared: &s {" + ", ".join(f"k{i}_{'k' * 1000}: v" for i in range(100)) + "}\n"
    jobs = "jobs:\n" + "".join(f"  - <<: *s\n    id: j{i}\n" for i in range(700))
    assert refusal(shared + jobs).endswith("aliases expand past 64 MiB of text (an alias bomb?)")
    value, _ = load_text(shared + "jobs:\n" + "".join(f"  - <<: *s\n    id: j{i}\n" for i in range(300)), "m")
    assert len(value["jobs"]) == 300 and len(value["jobs"][0]) == 101


def test_text_aliased_within_the_budget_loads():
    value, _ = load_text(f'p: &p "{"w" * 10_000}"\njobs:\n' + "  - prompt: *p\n" * 1000, "m")
    assert value["jobs"][999]["prompt"] == "w" * 10_000


def test_ordinary_aliases_are_shared_values():
    value, _ = load_text("x: &u https://e.com/a.png\njobs:\n  - start_image_url: *u\n  - start_image_url: *u\n", "m")
    assert [job["start_image_url"] for job in value["jobs"]] == ["https://e.com/a.png"] * 2


def test_unknown_alias():
    assert refusal("jobs:\n  - prompt: *nowhere\n") == "2:13: unknown alias *nowhere"


# --- structure ------------------------------------------------------------------------------------


def test_duplicate_key_in_a_job():
    assert refusal(f"""\
        jobs:
          - prompt: first
            start_image_url: {URL}
            prompt: second
        """) == "4:5: duplicate key 'prompt' (first defined on line 2)"


def test_duplicate_top_level_key():
    assert refusal("jobs: []\nconcurrency: 2\njobs: []\n") == "3:1: duplicate key 'jobs' (first defined on line 1)"


def test_same_key_in_different_mappings_is_fine():
    value, _ = load_text("jobs:\n  - prompt: a\n  - prompt: b\n", "m")
    assert value == {"jobs": [{"prompt": "a"}, {"prompt": "b"}]}


def test_tab_indentation():
    assert refusal("jobs:\n\t- prompt: a\n") == (
        "2:1: YAML syntax error: found character that cannot start any token (while scanning for the next token); "
        "use spaces, not tabs, to indent"
    )


def test_tab_inside_a_block():
    assert refusal("jobs:\n  - prompt: a\n\tstart_image_url: b\n") == (
        "3:1: YAML syntax error: found a tab character that violates indentation (while scanning a plain scalar); "
        "use spaces, not tabs, to indent"
    )


def test_syntax_error_without_tabs_gets_no_tab_hint():
    assert refusal("jobs: [\n") == (
        "2:1: YAML syntax error: did not find expected node content (while parsing a flow node)"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("jobs: \x00\n", "1:7: the character U+0000 is not allowed in YAML (control characters are not allowed)"),
        # After multi-byte characters: the column counts characters, not UTF-8 bytes.
        ("jobs:\n  - prompt: \u00e9t\u00e9\x07\n",
         "2:16: the character U+0007 is not allowed in YAML (control characters are not allowed)"),
    ],
    ids=["nul", "bell-after-accents"],
)
def test_control_characters(text, expected):
    assert refusal(text) == expected


def test_multiple_documents():
    assert refusal("jobs: []\n---\njobs: []\n") == "2:1: only one YAML document is allowed per manifest"


def test_explicit_single_document_is_fine():
    value, _ = load_text("%YAML 1.1\n---\njobs: []\n...\n", "m")
    assert value == {"jobs": []}


@pytest.mark.parametrize(
    "text", ["", "   \n\n", "# only a comment\n", "\ufeff"], ids=["empty", "blank", "comment", "bom-only"]
)
def test_empty_text(text):
    assert refusal(text) == "1:1: the manifest is empty"


def test_empty_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"")
    assert file_refusal(path) == "1:1: the manifest is empty"


def test_deep_nesting_is_refused_not_a_recursion_error():
    assert refusal("jobs: " + "[" * 5000 + "]" * 5000 + "\n") == "1:106: nested more than 100 levels deep"
    assert refusal("jobs: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n") == "1:403: nested more than 100 levels deep"


def _block(depth: int) -> str:
    return "".join("  " * i + "a:\n" for i in range(depth)) + "  " * depth + "x: 1\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # One line, so the parser's look-ahead runs far past batchrun's limit before the builder sees it:
        # libyaml builds with a nesting limit of their own (PyYAML 6.0.4's wheels: 1,000) must not win.
        ("[" * 999 + "]" * 999, "1:101: nested more than 100 levels deep"),
        ("[" * 1001 + "]" * 1001, "1:101: nested more than 100 levels deep"),
        ("x: " + "[" * 20000, "1:103: nested more than 100 levels deep"),
        ("- " * 1500 + "1\n", "1:201: nested more than 100 levels deep"),
        (_block(1200), "101:201: nested more than 100 levels deep"),
        ("\n".join(["["] * 1500), "101:1: nested more than 100 levels deep"),
    ],
    ids=["flow-999", "flow-1001", "flow-unclosed", "block-seq-one-line", "block-maps", "flow-many-lines"],
)
def test_batchrun_s_own_depth_limit_fires_first_whatever_the_parser_s_limit(text, expected):
    assert refusal(text) == expected


def test_a_syntax_error_after_shallow_nesting_is_still_the_parser_s_located_error():
    problem = refusal("a: [1, 2\nb: ]]\n")
    assert problem.startswith("2:") and "YAML syntax error" in problem


@pytest.mark.parametrize(
    "text",
    ["? [a, b]\n: c\n", "{a: 1}: 2\n", "a: &k key\n*k : 1\n"],
    ids=["complex-key", "flow-mapping-key", "alias-key"],
)
def test_keys_must_be_plain_text(text):
    assert refusal(text).endswith(": mapping keys must be plain text")


# --- scalars --------------------------------------------------------------------------------------


def test_timestamps_stay_strings():
    value, _ = load_text(
        "a: 2024-01-02\nb: 2001-12-14t21:59:43.10-05:00\nc: 2002-12-14 21:59:43.10 -5\nd: !!timestamp 2024-03-04\n",
        "m",
    )
    assert value == {"a": "2024-01-02", "b": "2001-12-14t21:59:43.10-05:00", "c": "2002-12-14 21:59:43.10 -5",
                     "d": "2024-03-04"}


def test_plain_scalars_resolve_like_yaml_1_1():
    value, _ = load_text("a: 5\nb: 0.5\nc: yes\nd: 'yes'\ne: ~\nf: \"5\"\ng: 1_000\nh: null\n", "m")
    assert value == {"a": 5, "b": 0.5, "c": True, "d": "yes", "e": None, "f": "5", "g": 1000, "h": None}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("budget_usd: .nan\n", "1:13: '.nan' is not a finite number (manifest values must be JSON)"),
        ("budget_usd: .inf\n", "1:13: '.inf' is not a finite number (manifest values must be JSON)"),
        ("jobs:\n  - cfg_scale: -.Inf\n", "2:16: '-.Inf' is not a finite number (manifest values must be JSON)"),
        ("x: !!float 1e999\n", "1:4: '1e999' is not a finite number (manifest values must be JSON)"),
    ],
    ids=["nan", "inf", "negative-inf", "overflow"],
)
def test_non_finite_numbers_are_refused(text, expected):
    assert refusal(text) == expected


def test_invalid_explicit_int():
    assert refusal("concurrency: !!int abc\n") == "1:14: 'abc' is not a valid int"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x: !!float abc\n", "1:4: 'abc' is not a valid float"),
        ("x: !!float\n", "1:4: '' is not a valid float"),
        ("x: !!float ._\n", "1:4: '._' is not a valid float"),
        ("x: !!float 1:30\n", "1:4: '1:30' is not a valid float"),
        ("x: !!int 1.5\n", "1:4: '1.5' is not a valid int"),
        ("x: !!int\n", "1:4: '' is not a valid int"),
        ("x: !!int 0b_\n", "1:4: '0b_' is not a valid int"),
        ("x: !!int 09\n", "1:4: '09' is not a valid int"),
        ('x: !!int "-"\n', "1:4: '-' is not a valid int"),
        ("x: !!bool maybe\n", "1:4: 'maybe' is not a valid bool"),
        ("x: !!bool\n", "1:4: '' is not a valid bool"),
        ("x: !!bool ''\n", "1:4: '' is not a valid bool"),
        ("x: !!bool 1\n", "1:4: '1' is not a valid bool"),
        ("x: !!null x\n", "1:4: 'x' is not a valid null"),
        ("x: !!timestamp soon\n", "1:4: 'soon' is not a valid timestamp"),
        ("x: !<tag:yaml.org,2002:bool> perhaps\n", "1:4: 'perhaps' is not a valid bool"),
        ("%TAG !e! tag:yaml.org,2002:\n---\nx: !e!int 2.5\n", "3:4: '2.5' is not a valid int"),
        ("x: [1, !!bool nope]\n", "1:8: 'nope' is not a valid bool"),
        ("!!bool maybe: 1\n", "1:1: 'maybe' is not a valid bool"),
        ("x: !!float [1]\n", "1:4: the tag !!float cannot be put on a list"),
        ("x: !!bool {a: 1}\n", "1:4: the tag !!bool cannot be put on a mapping"),
        ("x: !!str [1]\n", "1:4: the tag !!str cannot be put on a list"),
        ("x: !!seq {a: 1}\n", "1:4: the tag !!seq cannot be put on a mapping"),
        ("x: !!map [1]\n", "1:4: the tag !!map cannot be put on a list"),
        ("x: !!map abc\n", "1:4: the tag !!map cannot be put on a single value"),
        ("x: !!binary aGk=\n", "1:4: the tag !!binary is not allowed (only plain YAML data)"),
        ("x: !!set {a}\n", "1:4: the tag !!set is not allowed (only plain YAML data)"),
    ],
)
def test_core_tags_on_values_they_do_not_fit_are_located_problems(text, expected):
    assert refusal(text) == expected


def test_core_tags_on_values_they_fit():
    value, _ = load_text("a: !!float 1\nb: !!int 0x1F\nc: !!bool Yes\nd: !!null ~\ne: !!timestamp 2024-01-02\n"
                         "f: !!str 5\ng: !!int 1_000\nh: !!float 1e5\ni: !!null\n!!int 7: seven\n", "m")
    assert value == {"a": 1.0, "b": 31, "c": True, "d": None, "e": "2024-01-02", "f": "5", "g": 1000,
                     "h": 100000.0, "i": None, "7": "seven"}


def test_plain_equals_and_merge_signs_are_text():
    value, _ = load_text("a: =\nb: [<<, =]\n", "m")
    assert value == {"a": "=", "b": ["<<", "="]}


def test_huge_int_is_refused_with_a_short_message():
    assert refusal("concurrency: 1" + "0" * 5000 + "\n") == (
        "1:14: '1000000000000000000000000000000000000...' is not a valid int"
    )


# --- merge keys -----------------------------------------------------------------------------------


def test_merge_keys_explicit_keys_win():
    value, marks = load_text(textwrap.dedent("""\
        base: &base
          duration: 5
          prompt: from base
        more: &more
          generate_audio: true
          duration: 7
        jobs:
          - <<: *base
            prompt: own
          - <<: [*base, *more]
            id: b
        """), "m")
    assert value["jobs"][0] == {"prompt": "own", "duration": 5}
    assert value["jobs"][1] == {"id": "b", "duration": 5, "prompt": "from base", "generate_audio": True}
    # A merged value keeps the position where it was written (under the anchor).
    assert position_of(marks, ("jobs", 1, "duration")) == (2, 13)
    assert position_of(marks, ("jobs", 1, "generate_audio")) == (5, 19)


def test_merge_of_a_scalar_is_refused():
    assert refusal("a: &a 1\nb:\n  <<: *a\n") == "3:3: '<<' must merge a mapping or a list of mappings"


def test_quoted_merge_key_is_an_ordinary_key():
    value, _ = load_text("a: &a {x: 1}\nb: {'<<': *a}\n", "m")
    assert value["b"] == {"<<": {"x": 1}}


# --- marks ----------------------------------------------------------------------------------------


def test_marks_locate_keys_and_values():
    value, marks = load_text("jobs:\n  - id: a\n    multi_prompt:\n      - prompt: x\n        duration: 3\n", "m")
    assert isinstance(marks, Marks)
    assert position_of(marks, ("jobs",)) == (2, 3)
    assert position_of(marks, ("jobs", 0)) == (2, 5)
    assert position_of(marks, ("jobs", 0, "id")) == (2, 9)
    assert position_of(marks, ("jobs", 0, "id"), key=True) == (2, 5)
    assert position_of(marks, ("jobs", 0, "multi_prompt", 0, "duration")) == (5, 19)
    # A path that goes further than the file: the deepest node that exists.
    assert position_of(marks, ("jobs", 0, "multi_prompt", 7, "duration")) == (4, 7)
    assert position_of(marks, ("jobs", 0, "missing")) == (2, 5)


# --- files ----------------------------------------------------------------------------------------


def test_not_utf8_points_at_the_bad_byte(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"jobs:\n  - prompt: caf\xe9\n")
    assert file_refusal(path) == "2:16: the file is not UTF-8 text (byte 0xe9)"


def test_not_utf8_column_counts_characters(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes("jobs:\n  - prompt: \u00e9t\u00e9 ".encode() + b"\xff\n")
    assert file_refusal(path) == "2:17: the file is not UTF-8 text (byte 0xff)"


def test_utf16_is_not_utf8(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes("jobs: []\n".encode("utf-16"))
    assert file_refusal(path) == "1:1: the file is not UTF-8 text (byte 0xff)"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xef\xbb\xbfjobs: []\n")
    assert load_file(path)[0] == {"jobs": []}


def test_file_over_32_mib_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "big.yaml"
    with path.open("wb") as f:  # sparse: a comment, then a hole up to 33 MiB
        f.write(b"# generated\n")
        f.seek(33 * 2**20 - 1)
        f.write(b"\n")
    assert path.stat().st_size == 33 * 2**20

    def no_reading(*args, **kwargs):
        raise AssertionError("the oversized file was opened")

    monkeypatch.setattr(Path, "open", no_reading)
    monkeypatch.setattr(Path, "read_bytes", no_reading)
    started = time.perf_counter()
    assert file_refusal(path) == (
        "1:1: the file is 33.0 MiB; manifests are limited to 32 MiB (split the batch into several manifests)"
    )
    assert time.perf_counter() - started < 1


def test_file_of_exactly_32_mib_is_read(tmp_path):
    path = tmp_path / "m.yaml"
    with path.open("wb") as f:
        f.write(b"jobs: []\n#")
        f.write(b" " * (yamlload.MAX_FILE_BYTES - 11))
        f.write(b"\n")
    assert path.stat().st_size == yamlload.MAX_FILE_BYTES
    assert load_file(path)[0] == {"jobs": []}


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_is_refused_without_reading():
    assert file_refusal(Path("/dev/zero"), max_bytes=2**20) == (
        "1:1: is a device, not a regular file: batchrun reads manifests only from regular files"
    )


def test_missing_file(tmp_path):
    assert file_refusal(tmp_path / "nope.yaml") == "1:1: no such file"


def test_directory(tmp_path):
    assert file_refusal(tmp_path) == "1:1: is a directory, not a manifest file"
