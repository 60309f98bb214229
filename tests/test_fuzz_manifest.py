"""Fuzzing the manifest loader and validator: YAML text, and CSV and JSON Lines jobs files.

Whatever the bytes, `load_manifest` either returns a Manifest or raises ManifestError whose problems are
all located (file, line >= 1, column >= 1) and print as one line of printable text. Any other exception
fails the test. Inputs are built from fragments that reach the parser's and the validator's corners
(tags, anchors, merge keys, flow collections, escapes, deep brackets, localized cells, bad bytes), mixed
with arbitrary bytes. Bounded: a fixed number of examples per test, each with a deadline (about 10 s in
all on a shared CI core).
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.errors import ManifestError
from batchrun.manifest import Manifest, load_manifest

URL = "https://example.com/a.png"
FUZZ = settings(max_examples=200, deadline=timedelta(seconds=2), database=None,
                suppress_health_check=[HealthCheck.too_slow])

YAML_FRAGMENTS = [
    "jobs:", "jobs: ", "\n", "\n  ", "\n    ", "  ", "- ", "id: ", "prompt: ", "start_image_url: ", "duration: ",
    "generate_audio: ", "cfg_scale: ", "multi_prompt: ", "elements: ", "defaults:", "matrix:", "version: ",
    "model: ", "output: ", "price: ", "concurrency: ", "budget_usd: ", "jobs_from: ", "jobs.csv", "jobs.jsonl",
    URL, "cliff.png", "/proc/self/environ", "/dev/zero", "/", "..", "data:image/png;base64,iVBORw0KGgo=",
    "&a ", "&b ", "*a", "*b", "<<: ", "<<: *a", "!!float ", "!!int ", "!!bool ", "!!null ", "!!str ",
    "!!timestamp ", "!!map ", "!!seq ", "!!binary ", "!!set ", "!!python/name:os.system ", "!x ", "! ",
    "!<tag:yaml.org,2002:int> ", "%TAG !e! tag:yaml.org,2002:\n", "!e!bool ", "---\n", "...\n", "? ", ": ",
    "[", "]", "{", "}", ",", "'", '"', "\\u", "\\ud800", "\\e", "\\x00", "\\", "~", "null", "true", "yes", "maybe",
    "5", "-3", "0.5", "1e999", ".nan", ".inf", "0x1F", "0b_", "1:30", "09", "2024-01-02", "=", "#", "\t",
    "a" * 70, "Möwen", "\u202e", "|\n  ", ">\n  ", "[[[[[[[[[[[[[[[[[[[[", "]]]]]]]]]]]]]]]]]]]]",
]
CSV_CELLS = [
    "id", "prompt", "start_image_url", "duration", "generate_audio", "cfg_scale", "multi_prompt", "elements",
    "negative_prompt", "shot_type", "promt", "", " ", "a", "j1", "j1", URL, "cliff.png", "5", "10", "0,5", "0.5",
    "1e999", "WAHR", "FALSCH", "vrai", "true", "yes", "maybe", '[{"prompt": "a", "duration": 5}]', "[", "{",
    "[" * 150 + "]" * 150, "[" * 1200 + "]" * 1200, '[{"prompt": ' * 600,
    '{"a": [1, 2]}', '"', '""', "a\nb", "\r", "Möwen", "\x1b[2J", "\ud800",
    "x" * 90,
]
DELIMITERS = [",", ";", "\t", "|", " "]


SCALARS = [None, True, False, 0, -1, 5, 10, 16, 0.5, 1.5, 1e300, 10**30, "", "a", "5", URL, "cliff.png",
           "customize", "WAHR", "Möwen", "\x1b[2J", "a" * 100, "data:image/png;base64,AAAA"]
KEYS = CSV_CELLS[:12]


def json_values():
    """JSON-like values two levels deep (hypothesis's recursive strategies cost more to draw than to test)."""
    scalars = st.sampled_from(SCALARS) | st.integers() | st.text(max_size=6)
    flat = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3)
    return flat | st.lists(flat, max_size=3) | st.dictionaries(st.sampled_from(KEYS), flat, max_size=3)


def fragments_text(fragments: list[str], max_size: int) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(fragments) | st.text(max_size=4), max_size=max_size).map("".join)


def encoded(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Text as UTF-8 (surrogates kept as invalid bytes), sometimes with a BOM, CRLF, or in another encoding."""
    def encode(args) -> bytes:
        value, how = args
        if how == "crlf":
            value = value.replace("\n", "\r\n")
        if how == "utf-16":
            return value.encode("utf-16", "surrogatepass")
        if how == "cp1252":
            return value.encode("cp1252", "replace")
        data = value.encode("utf-8", "surrogatepass")
        return b"\xef\xbb\xbf" + data if how == "bom" else data
    return st.tuples(text, st.sampled_from(["utf-8", "utf-8", "crlf", "bom", "utf-16", "cp1252"])).map(encode)


yaml_documents = st.fixed_dictionaries(
    {"jobs": st.lists(st.dictionaries(st.sampled_from(CSV_CELLS[:10]), json_values(), max_size=6), max_size=4)},
    optional={"defaults": st.dictionaries(st.sampled_from(CSV_CELLS[:10]), json_values(), max_size=4),
              "concurrency": json_values(), "version": json_values(), "model": json_values(),
              "price": json_values(), "jobs_from": st.sampled_from(["jobs.csv", "jobs.jsonl", "x.txt", ""])},
).map(lambda doc: yaml.safe_dump(doc, allow_unicode=True))


CORE_TAGS = ["!!float ", "!!int ", "!!bool ", "!!null ", "!!str ", "!!timestamp ", "!!map ", "!!seq ", "!!binary ",
             "!<tag:yaml.org,2002:bool> "]
TAGGED = ["", "maybe", "abc", "1.5", "0b_", "x", "[1]", "{a: 1}", "5", "yes", "~", ".inf"]
VALUES = ["maybe", "1.5", "~", "null", "yes", "5", "16", "-2", "0.5", "1e999", ".nan", "0x1F", "1:30", "2024-01-02",
          "=", "<<", "[1]", "{a: 1}", "[a, [b, {c: d}]]", "&a 5", "&b [1, 2]", "&a {x: 1}", "*a", "*b", "*nowhere",
          "!!python/name:os.system x", "!x y", '"\\ud800"', '"\\e[2J"', '"\\x00"', "'it''s'", URL, "cliff.png",
          "jobs.csv", "/proc/self/environ", "/", "[" * 99 + "]" * 99, "[" * 1000 + "]" * 1000,
          "{a: " * 150 + "1" + "}" * 150, "x" * 300, "|\n  text", "[*a, *a, *a, *a]", "{<<: *a, x: 1}"]
TOP_KEYS = ["version", "model", "output", "price", "concurrency", "budget_usd", "poll_min_interval", "max_wait",
            "jobs_from", "unknown", "<<"]


def yaml_structured():
    """Manifests shaped like real ones whose values are tagged, aliased, nested or odd."""
    value = st.sampled_from(VALUES) | st.tuples(st.sampled_from(CORE_TAGS), st.sampled_from(TAGGED)).map("".join)
    entry = st.tuples(st.sampled_from(KEYS + ["matrix", "id", "<<"]), value)
    job = st.lists(entry, min_size=1, max_size=4).map(
        lambda kvs: "  - " + "\n    ".join(f"{k}: {v}" for k, v in kvs))
    top = st.lists(st.tuples(st.sampled_from(TOP_KEYS), value), max_size=3).map(
        lambda kvs: "".join(f"{k}: {v}\n" for k, v in kvs))
    defaults = st.lists(entry, max_size=3).map(
        lambda kvs: "defaults:\n" + "".join(f"  {k}: {v}\n" for k, v in kvs) if kvs else "")
    jobs = st.lists(job, max_size=4).map(lambda items: "jobs:\n" + "".join(item + "\n" for item in items))
    return st.tuples(top, defaults, jobs).map("".join)


def yaml_bytes():
    mutated = st.tuples(yaml_documents, fragments_text(YAML_FRAGMENTS, 12), st.integers(0, 400)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2]:])
    return st.one_of(encoded(yaml_structured()), encoded(fragments_text(YAML_FRAGMENTS, 60)), encoded(yaml_documents),
                     encoded(mutated), st.binary(max_size=200))


def csv_bytes():
    def table(args) -> str:
        delimiter, rows = args
        return "\n".join(delimiter.join(row) for row in rows)
    quoted = st.sampled_from(CSV_CELLS).map(lambda c: '"' + c.replace('"', '""') + '"')
    cells = st.lists(st.sampled_from(CSV_CELLS) | quoted | st.text(max_size=6), max_size=7)
    return st.one_of(encoded(st.tuples(st.sampled_from(DELIMITERS), st.lists(cells, max_size=6)).map(table)),
                     st.binary(max_size=200))


NASTY_JSON = ["[" * 1000 + "]" * 1000, '{"a": ' * 600 + "1" + "}" * 600, "[" * 99 + "]" * 99, "[" * 100 + "]" * 100,
              "1e999", "-1e400", "NaN", "Infinity", '"\\ud800"', '"\\udc00x"', '"\\ud83c\\udf0a"', "9" * 5000,
              '"\\u0000\\u001b[2J"', "[1, 2", "{}", "[]", "null", '"a"', "5", "0.5", "true", "[[[[[[[[[["]


def jsonl_bytes():
    field = st.tuples(st.sampled_from(KEYS), st.sampled_from(NASTY_JSON))
    nasty = st.lists(field, min_size=1, max_size=3).map(
        lambda kvs: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in [("prompt", '"a"'), *kvs]) + "}")
    rows = st.one_of(
        nasty,
        json_values().map(json.dumps),
        st.dictionaries(st.sampled_from(CSV_CELLS[:12]), json_values(), max_size=6).map(json.dumps),
        fragments_text(['{"', '": ', '"prompt"', '"id"', "[", "]", "{", "}", ",", "1e999", "NaN", "-Infinity",
                        '"\\ud800"', '"\\ud83c\\udf0a"', "9" * 5000, "[" * 120, "}" * 3, "[" * 1000,
                        '{"a": ' * 600, "[" * 99], 10),
    )
    return st.one_of(encoded(st.lists(rows, max_size=5).map("\n".join)), st.binary(max_size=200))


def check(folder: Path, manifest: bytes, jobs: dict[str, bytes] | None = None) -> None:
    for name in ("m.yaml", "jobs.csv", "jobs.jsonl"):
        (folder / name).unlink(missing_ok=True)
    (folder / "m.yaml").write_bytes(manifest)
    for name, data in (jobs or {}).items():
        (folder / name).write_bytes(data)
    try:
        loaded = load_manifest(folder / "m.yaml", output=folder / "out")
    except ManifestError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.file and problem.message, problem
            assert problem.line >= 1 and problem.column >= 1, problem
            assert str(problem).isprintable(), problem
    else:
        assert isinstance(loaded, Manifest)


def test_fuzz_yaml_manifests():
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "cliff.png").write_bytes(b"\x89PNG\r\n\x1a\n")

        @FUZZ
        @given(yaml_bytes())
        def run(data: bytes) -> None:
            check(Path(folder), data)

        run()


def test_fuzz_csv_jobs_files():
    with tempfile.TemporaryDirectory() as folder:
        @FUZZ
        @given(csv_bytes(), st.sampled_from(["", f"defaults:\n  start_image_url: {URL}\n  duration: 5\n"]))
        def run(data: bytes, defaults: str) -> None:
            check(Path(folder), f"{defaults}jobs_from: jobs.csv\n".encode(), {"jobs.csv": data})

        run()


def test_fuzz_jsonl_jobs_files():
    with tempfile.TemporaryDirectory() as folder:
        @FUZZ
        @given(jsonl_bytes())
        def run(data: bytes) -> None:
            check(Path(folder), f"defaults:\n  start_image_url: {URL}\njobs_from: jobs.jsonl\n".encode(),
                  {"jobs.jsonl": data})

        run()

