"""Jobs files as spreadsheets save them (real bytes of each variant), and JSON in them read with
batchrun's own limits: every file either loads or gives located problems."""

from __future__ import annotations

import json

import pytest

from batchrun import tablefile
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest

URL = "https://example.com/a.png"
MANIFEST = f"defaults:\n  start_image_url: {URL}\n  duration: 5\njobs_from: jobs.{{ext}}\n"

# German Excel, "CSV UTF-8 (durch Trennzeichen getrennt)": BOM, CRLF, semicolons, WAHR/FALSCH, decimal commas.
TABLE = (
    "id{d}prompt{d}generate_audio{d}cfg_scale{d}duration\r\n"
    "welle{d}Wellen, Klippe und Möwen{d}WAHR{d}0,5{d}10\r\n"
    'nebel{d}"Nebel; dann Sonne | {d} Meer"{d}FALSCH{d}1{d}\r\n'
    "{d}{d}{d}{d}\r\n"
)
GERMAN_EXCEL_UTF8 = TABLE.format(d=";").encode("utf-8-sig")
EXPECTED = [
    ("welle", {"prompt": "Wellen, Klippe und Möwen", "generate_audio": True, "cfg_scale": 0.5, "duration": 10}),
    ("nebel", {"prompt": "Nebel; dann Sonne | {d} Meer", "generate_audio": False, "cfg_scale": 1, "duration": 5}),
]


def load(tmp_path, data: bytes, ext: str = "csv"):
    (tmp_path / f"jobs.{ext}").write_bytes(data)
    path = tmp_path / "m.yaml"
    path.write_text(MANIFEST.format(ext=ext))
    return load_manifest(path)


def problems(tmp_path, data: bytes, ext: str = "csv") -> list[str]:
    with pytest.raises(ManifestError) as info:
        load(tmp_path, data, ext)
    return [str(p).removeprefix(f"{tmp_path}/") for p in info.value.problems]


def inputs(manifest) -> list[tuple[str, dict]]:
    return [(job.id, {k: v for k, v in job.input.items() if k != "start_image_url"}) for job in manifest.jobs]


@pytest.mark.parametrize(
    "data, delimiter",
    [
        (GERMAN_EXCEL_UTF8, ";"),
        (TABLE.format(d=";").replace("\r\n", "\n").encode(), ";"),
        (TABLE.format(d="\t").encode("utf-16"), "\t"),  # Excel's "Unicode Text": UTF-16 with a BOM, tabs
        (TABLE.format(d="|").encode(), "|"),
        (TABLE.format(d=";").replace("WAHR", "VRAI").replace("FALSCH", "faux").encode("utf-8-sig"), ";"),
    ],
    ids=["german-excel-utf8", "no-bom-lf", "utf16-tabs", "pipes", "french-booleans"],
)
def test_spreadsheet_variants_are_read(tmp_path, data, delimiter):
    expected = [(i, {**fields, "prompt": fields["prompt"].format(d=delimiter)}) for i, fields in EXPECTED]
    assert inputs(load(tmp_path, data)) == expected


def test_german_excel_in_windows_1252_is_one_problem_saying_how_to_save_it_again(tmp_path):
    data = GERMAN_EXCEL_UTF8.removeprefix(b"\xef\xbb\xbf").decode("utf-8").encode("cp1252")
    assert problems(tmp_path, data) == [
        "jobs.csv:2:27: jobs_from: the file is not UTF-8 text (byte 0xf6, 'ö' in Windows-1252): it looks like a "
        "table Excel saved as plain 'CSV' in a Windows code page; save it again as 'CSV UTF-8' (in German Excel: "
        "'CSV UTF-8 (durch Trennzeichen getrennt)')"]


def test_other_bytes_are_one_problem_too(tmp_path):
    assert problems(tmp_path, b'{"prompt": "\x81x"}\n', "jsonl") == [
        "jobs.jsonl:1:13: jobs_from: the file is not UTF-8 text (byte 0x81); save it again as UTF-8"]
    assert problems(tmp_path, b"\xff\xfep\x00\n\x00q\x00\x00\xd8", "csv") == [
        "jobs.csv:2:2: jobs_from: the file starts like UTF-16 text but is not (damaged?); save it again as UTF-8"]


def test_localized_values_apply_only_where_the_field_and_file_say_so(tmp_path):
    # In a comma-separated file "0,5" could be a thousands separator: it stays text, so the schema says so;
    # WAHR in a text field stays WAHR.
    data = b'prompt,generate_audio,cfg_scale\nWAHR,FALSCH,"0,5"\n'
    assert problems(tmp_path, data) == [
        "jobs.csv:2:3: jobs_from[0] (id=" + load_id(tmp_path, data) + ").cfg_scale: must be a number, not text '0,5'"]
    data = b"prompt;generate_audio\nWAHR;FALSCH\n"
    assert inputs(load(tmp_path, data))[0][1] == {"prompt": "WAHR", "generate_audio": False, "duration": 5}


def load_id(tmp_path, data: bytes) -> str:
    with pytest.raises(ManifestError) as info:
        load(tmp_path, data)
    return info.value.problems[0].where.split("(id=")[1].split(")")[0]


def test_delimiter_is_the_one_that_names_the_most_known_columns():
    known = {"id", "prompt", "duration"}
    assert tablefile.detect_delimiter("\n\nid;prompt;duration\n", known) == ";"
    assert tablefile.detect_delimiter("id,prompt;x\n", known) == ","
    assert tablefile.detect_delimiter("id|prompt\n", known) == "|"
    assert tablefile.detect_delimiter("prompt\n", known) == ","
    assert tablefile.detect_delimiter("a;b;c\n", known) == ";"  # no name known: the most cells
    assert tablefile.detect_delimiter("Prompt;Duration\n", known) == ";"
    assert tablefile.detect_delimiter("a b\n", known) == ","


def test_misspelt_columns_of_a_semicolon_file_are_named_one_by_one(tmp_path):
    assert problems(tmp_path, "Prompt;Länge;generate_audio\r\nWellen;5;WAHR\r\n".encode("utf-8-sig"))[:2] == [
        "jobs.csv:1:1: jobs_from: unknown column 'Prompt' (did you mean 'prompt'?) (columns read as separated by "
        "semicolons)",
        "jobs.csv:1:2: jobs_from: unknown column 'Länge'",
    ]


def test_every_localized_boolean_means_one_thing():
    assert not tablefile.LOCALIZED_TRUE & tablefile.LOCALIZED_FALSE
    assert tablefile.localized_boolean("WAHR") is True
    assert tablefile.localized_boolean("Falsch") is False
    assert tablefile.localized_boolean("vielleicht") is None


# --- JSON with batchrun's own limits --------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [1000, 101, 100_000])
def test_deep_jsonl_row_is_a_located_problem(tmp_path, depth):
    data = f'{{"prompt": "a", "x": "[[[[", "elements": {nested(depth)}}}\n'.encode()
    assert problems(tmp_path, data, "jsonl") == [
        "jobs.jsonl:1:" + str(len('{"prompt": "a", "x": "[[[[", "elements": ') + 100) +
        ": jobs_from: nested more than 100 levels deep"]


def test_jsonl_row_at_the_depth_limit_loads(tmp_path):
    data = f'{{"prompt": "a", "multi_prompt": {nested(99)}}}\n'.encode()  # the row is level 1
    found = problems(tmp_path, data, "jsonl")
    assert "nested" not in " ".join(found)
    assert found[0].startswith("jobs.jsonl:1:1: jobs_from[0]")


@pytest.mark.parametrize("field", ["multi_prompt", "elements"])
def test_deep_csv_cell_is_a_located_problem(tmp_path, field):
    data = f'id,prompt,{field}\nj1,a,"{nested(1000)}"\n'.encode()
    assert problems(tmp_path, data) == [
        f"jobs.csv:2:3: jobs_from[0].{field}: nested more than 100 levels deep"]


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "a", "cfg_scale": 1e999}', "invalid job: 1e999 is out of range for a JSON number"),
        ('{"prompt": "a", "cfg_scale": -Infinity}', "invalid job: -Infinity is not a number JSON allows"),
        ('{"prompt": "\\ud800 a"}', "invalid job: \\ud800 is half of a UTF-16 surrogate pair, not text"),
    ],
    ids=["overflow", "infinity", "lone-surrogate"],
)
def test_jsonl_values_that_are_not_json_data(tmp_path, row, message):
    assert problems(tmp_path, (row + "\n").encode(), "jsonl") == [f"jobs.jsonl:1:1: jobs_from: {message}"]


def test_jsonl_surrogate_pairs_are_text(tmp_path):
    row = json.dumps({"id": "e", "prompt": "waves \U0001f30a"}, ensure_ascii=True)
    assert "\\ud83c" in row
    assert inputs(load(tmp_path, (row + "\n").encode(), "jsonl"))[0][1]["prompt"] == "waves \U0001f30a"
