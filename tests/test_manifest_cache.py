"""The validated-manifest cache: a command given an unchanged manifest does not parse and validate it
again, and a manifest that changed in any way the validation could see gets a full load."""

from __future__ import annotations

import io
import json
import logging
import marshal
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from helpers import job, run, write_manifest, write_yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun import manifestcache
from batchrun.cli import main
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.sandbox import Sandbox

HIT = "read from the validated-manifest cache"
URL = "https://example.com/a.png"


def png(width: int, height: int, fill: int = 0x80) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + bytes([fill]) * (3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))  # stored: same size for any fill


def plan(manifest: Path, *more: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["plan", str(manifest), "--no-balance-check", *more], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def plan_jobs(manifest: Path) -> dict[str, dict]:
    code, text, err = plan(manifest, "--jobs", "--json")
    assert code == 0, err
    return {row["id"]: row for row in json.loads(text)["job_list"]}


def truth(manifest: Path) -> list[str]:
    """The job ids a full load gives now (ids derived from the input change with any edit of it)."""
    return [job.id for job in load_manifest(manifest, cached=False).jobs]


def hits(caplog) -> int:
    return sum(HIT in record.getMessage() for record in caplog.records)


def same_stat_edit(path: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (same length) in place and put the mtime back: a stat-only check misses it."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    info = path.stat()
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns


def cache_files() -> list[Path]:
    folder = manifestcache.cache_dir(os.environ)
    return sorted(folder.glob("*" + manifestcache.SUFFIX)) if folder.exists() else []


@pytest.fixture(autouse=True)
def debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger="batchrun")


def test_an_unchanged_manifest_is_read_from_the_cache_with_its_warnings_and_the_same_output(tmp_path, monkeypatch,
                                                                                            caplog):
    monkeypatch.chdir(tmp_path)
    manifest = write_yaml(tmp_path, f"""\
        output: out
        defaults:
          start_image_url: https://example.com/image
        jobs:
          - id: a
            prompt: one
            takes: 2
          - matrix: {{prompt: [x, y], duration: [5, 10]}}
            start_image_url: {URL}
        """)
    first = plan(manifest, "--jobs")
    assert first[0] == 0 and hits(caplog) == 0
    assert "warning: the URL does not end in a known image type" in first[2]
    second = plan(manifest, "--jobs")
    assert hits(caplog) == 1
    assert second == first  # the same exit code, plan and warnings, word for word
    third = plan(manifest, "--jobs", "--json")
    assert hits(caplog) == 2 and third[0] == 0 and len(json.loads(third[1])["job_list"]) == 6


def test_validate_always_checks_in_full_and_refreshes_the_cache(tmp_path, caplog):
    manifest = write_yaml(tmp_path, f"jobs:\n  - prompt: a\n    start_image_url: {URL}\n")
    for _ in range(2):
        code = main(["validate", str(manifest)], stdout=io.StringIO(), stderr=io.StringIO())
        assert code == 0
    assert hits(caplog) == 0 and len(cache_files()) == 1
    load_manifest(manifest)
    assert hits(caplog) == 1


def test_an_edit_with_the_same_size_and_mtime_is_seen(tmp_path, caplog):
    manifest = write_yaml(tmp_path, f"output: out\njobs:\n  - prompt: calm sea\n    start_image_url: {URL}\n")
    first = list(plan_jobs(manifest))
    same_stat_edit(manifest, b"calm sea", b"wild sea")
    second = list(plan_jobs(manifest))
    assert second != first and second == truth(manifest)
    assert list(plan_jobs(manifest)) == second
    assert hits(caplog) == 1  # the third load only
    # And an edit that makes it invalid is an error, not the cached result.
    same_stat_edit(manifest, b"wild sea", b"[wild, s")
    code, _, err = plan(manifest)
    assert code == 2 and "m.yaml:4:20: YAML syntax error" in err


def test_an_edited_jobs_from_file_is_seen(tmp_path, caplog):
    (tmp_path / "jobs.csv").write_text("prompt\ncalm sea\n", encoding="utf-8")
    manifest = write_yaml(tmp_path, f"output: out\njobs_from: jobs.csv\ndefaults:\n  start_image_url: {URL}\n")
    first = list(plan_jobs(manifest))
    same_stat_edit(tmp_path / "jobs.csv", b"calm sea", b"wild sea")
    second = list(plan_jobs(manifest))
    assert second != first and second == truth(manifest)
    (tmp_path / "jobs.csv").write_text("id,prompt\nharbor,wild sea\nquay,fog\n", encoding="utf-8")
    assert list(plan_jobs(manifest)) == ["harbor", "quay"]
    assert hits(caplog) == 0
    assert list(plan_jobs(manifest)) == ["harbor", "quay"] and hits(caplog) == 1


def _user_model(folder: Path, name: str = "mine.json", model_id: str = "acme/test/text-to-video",
                rate: float = 0.25) -> None:
    folder.mkdir(exist_ok=True)
    data = {"model_id": model_id, "title": "Test", "source": "test", "expected_seconds": 10,
            "price": {"usd_per_second": rate, "duration_field": "duration", "audio_field": None},
            "input_schema": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string"}, "duration": {"type": "integer", "default": 5}}}}
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


def test_an_edited_or_added_model_file_is_seen(tmp_path, caplog):
    _user_model(tmp_path / "models", rate=0.25)
    manifest = write_yaml(tmp_path, "output: out\nmodels_dir: models\nmodel: acme/test/text-to-video\n"
                                    "jobs:\n  - id: a\n    prompt: hi\n")
    assert plan_jobs(manifest)["a"]["estimated_cost_usd"] == 1.25
    same_stat_edit(tmp_path / "models" / "mine.json", b"0.25", b"0.75")
    assert plan_jobs(manifest)["a"]["estimated_cost_usd"] == 3.75
    # A new file in the folder that overrides the same model id wins (files are read in name order).
    _user_model(tmp_path / "models", name="zz.json", rate=1.0)
    assert plan_jobs(manifest)["a"]["estimated_cost_usd"] == 5.0
    assert hits(caplog) == 0
    # A broken file is the manifest's error again, not the last good result.
    (tmp_path / "models" / "zz.json").write_text("{", encoding="utf-8")
    code, _, err = plan(manifest)
    assert code == 2 and "zz.json" in err and "not valid JSON" in err


def test_the_models_folder_of_the_environment_is_part_of_the_key(tmp_path, monkeypatch, caplog):
    _user_model(tmp_path / "cheap", model_id="kling/kling-3.0/standard/image-to-video", rate=0.01)
    manifest = write_yaml(tmp_path, f"output: out\njobs:\n  - id: a\n    prompt: hi\n    start_image_url: {URL}\n")
    shipped = plan_jobs(manifest)["a"]["estimated_cost_usd"]
    monkeypatch.setenv("BATCHRUN_MODELS", str(tmp_path / "cheap"))
    assert plan_jobs(manifest)["a"]["estimated_cost_usd"] == 0.05 != shipped
    assert hits(caplog) == 0


@pytest.mark.parametrize("racy_ns", [manifestcache.RACY_NS, 0], ids=["just-written images hashed", "stamp only"])
def test_a_changed_deleted_or_retargeted_local_image_is_seen(tmp_path, caplog, monkeypatch, racy_ns):
    # The test's images are written just before; with no racy window they are checked by stamp alone,
    # as images written long before a load are.
    monkeypatch.setattr(manifestcache, "RACY_NS", racy_ns)
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.png").write_bytes(png(640, 480, 0x80))
    (images / "two.png").write_bytes(png(640, 480, 0x40))
    (tmp_path / "start.png").symlink_to(images / "one.png")
    manifest = write_yaml(tmp_path, "output: out\njobs:\n  - prompt: hi\n    start_image_url: start.png\n")
    first = list(plan_jobs(manifest))  # the id is derived from the input, the image's bytes included
    assert list(plan_jobs(manifest)) == first and hits(caplog) == 1
    # The same size and mtime, other pixels.
    old, new = png(640, 480, 0x80), png(640, 480, 0x81)
    assert len(old) == len(new)
    info = (images / "one.png").stat()
    (images / "one.png").write_bytes(new)
    os.utime(images / "one.png", ns=(info.st_atime_ns, info.st_mtime_ns))
    second = list(plan_jobs(manifest))
    assert second != first and second == truth(manifest) and hits(caplog) == 1
    # The symlink now leads to another file (both files unchanged).
    (tmp_path / "start.png").unlink()
    (tmp_path / "start.png").symlink_to(images / "two.png")
    third = list(plan_jobs(manifest))
    assert third not in (first, second) and third == truth(manifest) and hits(caplog) == 1
    (images / "two.png").unlink()
    code, _, err = plan(manifest)
    assert code == 2 and "'start.png' does not exist" in err and hits(caplog) == 1


def test_a_manifest_moved_to_another_folder_resolves_its_paths_there(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for name, fill in (("a", 0x10), ("b", 0x20)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "start.png").write_bytes(png(640, 480, fill))
    write_yaml(tmp_path / "a", "output: out\njobs:\n  - prompt: hi\n    start_image_url: start.png\n")
    in_a = plan_jobs(Path("a/m.yaml"))
    shutil.move(tmp_path / "a" / "m.yaml", tmp_path / "b" / "m.yaml")
    in_b = plan_jobs(Path("b/m.yaml"))
    assert list(in_a) != list(in_b) and hits(caplog) == 0
    (tmp_path / "b" / "start.png").unlink()
    code, _, err = plan(Path("b/m.yaml"))
    assert code == 2 and "'start.png' does not exist" in err


def test_output_dir_follows_the_flag_and_the_current_directory_on_a_hit(tmp_path, monkeypatch, caplog):
    manifest = write_yaml(tmp_path, f"jobs:\n  - prompt: hi\n    start_image_url: {URL}\n")
    monkeypatch.chdir(tmp_path)
    assert load_manifest(manifest).output_dir == tmp_path / "output" / "m"
    assert load_manifest(manifest, output="elsewhere").output_dir == tmp_path / "elsewhere"
    assert load_manifest(manifest, output="elsewhere").output_explicit
    assert hits(caplog) == 2
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert load_manifest(manifest).output_dir == tmp_path / "sub" / "output" / "m"


def test_a_manifest_with_errors_is_never_cached(tmp_path):
    manifest = write_yaml(tmp_path, "jobs:\n  - prompt: hi\n    duration: 7\n")
    for _ in range(2):
        with pytest.raises(ManifestError):
            load_manifest(manifest)
    assert cache_files() == []


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BATCHRUN_MANIFEST_CACHE", "off")
    manifest = write_yaml(tmp_path, f"jobs:\n  - prompt: hi\n    start_image_url: {URL}\n")
    load_manifest(manifest)
    load_manifest(manifest)
    assert cache_files() == [] and hits(caplog) == 0


def _cached_manifest(tmp_path) -> tuple[Path, Path, list]:
    manifest = write_yaml(tmp_path, f"output: out\njobs:\n  - id: a\n    prompt: hi\n    start_image_url: {URL}\n")
    full = plan_jobs(manifest)
    [file] = cache_files()
    return manifest, file, full


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "flipped", "empty", "other key", "shape",
                                    "symlink"])
def test_a_damaged_or_planted_cache_file_is_ignored(tmp_path, damage, caplog):
    manifest, file, full = _cached_manifest(tmp_path)
    data = file.read_bytes()
    header_end = len(manifestcache.FORMAT) + 8 + int.from_bytes(data[len(manifestcache.FORMAT):][:8], "big")
    header = marshal.loads(data[len(manifestcache.FORMAT) + 8:header_end])
    if damage == "truncated":
        file.write_bytes(data[: len(data) - 40])
    elif damage == "garbage":
        file.write_bytes(os.urandom(len(data)))
    elif damage == "pickle":  # a planted pickle would run code if it were unpickled
        file.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    elif damage == "flipped":  # one byte of the body changed: its digest no longer matches
        spot = header_end + (len(data) - header_end) // 2
        file.write_bytes(data[:spot] + bytes([data[spot] ^ 0x01]) + data[spot + 1:])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "other key":  # the header of another manifest's cache file
        other = marshal.dumps(("0" * 64,) + header[1:])
        file.write_bytes(manifestcache.FORMAT + len(other).to_bytes(8, "big") + other + data[header_end:])
    elif damage == "shape":  # digests that match a body of another shape (a planted file)
        body = marshal.dumps(("kling/kling-3.0/standard/image-to-video", (None, False, None), {}, {}, {}, [], [],
                              {}, [], [("a", {"prompt": "planted"}, 7, "x", 1, ("l", 0, 1), (), 1, "", None)]))
        import hashlib
        planted = marshal.dumps((header[0], header[1], hashlib.sha256(body).hexdigest(), len(body)))
        file.write_bytes(manifestcache.FORMAT + len(planted).to_bytes(8, "big") + planted + body)
    elif damage == "symlink":
        target = tmp_path / "elsewhere"
        target.write_bytes(data)
        file.unlink()
        file.symlink_to(target)
    assert plan_jobs(manifest) == full
    assert hits(caplog) == 0 and not (tmp_path / "pwned").exists()
    assert plan_jobs(manifest) == full and hits(caplog) == 1  # rewritten by the full load


def test_a_cache_folder_that_cannot_be_written_does_not_fail_the_command(tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))
    manifest = write_yaml(tmp_path, f"output: out\njobs:\n  - id: a\n    prompt: hi\n    start_image_url: {URL}\n")
    assert list(plan_jobs(manifest)) == ["a"]
    assert list(plan_jobs(manifest)) == ["a"] and hits(caplog) == 0


def test_a_cache_folder_others_can_write_to_is_not_used(tmp_path, monkeypatch, caplog):
    manifest = write_yaml(tmp_path, f"output: out\njobs:\n  - id: a\n    prompt: hi\n    start_image_url: {URL}\n")
    folder = manifestcache.cache_dir(os.environ)
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    load_manifest(manifest)
    load_manifest(manifest)
    assert hits(caplog) == 0 and cache_files() == []
    # Nor one whose files were written while it was private.
    folder.chmod(0o700)
    load_manifest(manifest)
    assert len(cache_files()) == 1
    folder.chmod(0o777)
    load_manifest(manifest)
    assert hits(caplog) == 0


def test_the_cache_keeps_only_the_most_recent_files(tmp_path, caplog):
    for index in range(manifestcache.KEEP + 3):
        load_manifest(write_yaml(tmp_path, f"jobs:\n  - prompt: p{index}\n    start_image_url: {URL}\n",
                                 name=f"m{index}.yaml"))
    assert len(cache_files()) == manifestcache.KEEP


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0), spot=st.integers(min_value=0), value=st.integers(0, 255),
       tail=st.binary(max_size=64))
def test_fuzzed_cache_files_never_change_the_result(tmp_path_factory, cut, spot, value, tail):
    folder = tmp_path_factory.mktemp("fuzz")
    manifest = folder / "m.yaml"
    manifest.write_text(yaml.safe_dump({"output": "out", "defaults": {"start_image_url": "https://x.org/i"},
                                        "jobs": [{"id": "a", "prompt": "hi", "takes": 2}]}), encoding="utf-8")
    full = load_manifest(manifest)
    [file] = [f for f in cache_files() if manifestcache.cache_key(manifest, os.environ) in f.name]
    data = bytearray(file.read_bytes())
    data[spot % len(data)] = value
    file.write_bytes(bytes(data[: len(data) - cut % len(data)]) + tail)
    again = load_manifest(manifest)
    assert [(j.id, j.input, j.input_sha256) for j in again.jobs] == [(j.id, j.input, j.input_sha256)
                                                                      for j in full.jobs]
    assert [str(w) for w in again.warnings] == [str(w) for w in full.warnings]


def _everything(manifest) -> tuple:
    """All a caller can see of a loaded manifest, problems' locations of each job included."""
    jobs = [(job.index, job.id, job.input, job.input_sha256, job.line, job.file, job.local_files, job.take,
             job.take_of, job.label, job.api_input(), manifest.model_of(job).model_id,
             manifest.estimate_or_none(job), [(at, image) for at, image in job.local_images],
             job.origin.position(), job.origin.from_defaults("duration"),
             [job.locate((key,)) for key in ("prompt", "duration", "start_image_url", "nonexistent")])
            for job in manifest.jobs]
    return (jobs, [str(w) for w in manifest.warnings], manifest.settings, manifest.price, manifest.prices,
            manifest.output_dir, manifest.output_explicit, manifest.notify, manifest.models_dir, manifest.model,
            manifest.path, manifest.budget_problem())


def test_a_hit_gives_exactly_what_a_full_load_gives(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "one.png").write_bytes(png(640, 480, 0x30))
    (tmp_path / "rows.csv").write_text("id,prompt,duration\nrow-a,from a row,10\n,derived row,\n", encoding="utf-8")
    _user_model(tmp_path / "models", model_id="acme/test/text-to-video", rate=0.5)
    manifest = write_yaml(tmp_path, f"""\
        version: 1
        models_dir: models
        budget_usd: 100
        concurrency: 3
        notify: [https://hooks.example.com/done]
        price: {{usd_per_second: 0.1}}
        defaults:
          duration: 5
          start_image_url: https://example.com/image
        jobs:
          - id: local
            prompt: a local start image
            start_image_url: images/one.png
            takes: 2
          - id: grid
            matrix: {{prompt: [dawn, dusk], duration: [5, 10]}}
          - prompt: no id
            generate_audio: true
          - id: other-model
            model: acme/test/text-to-video
            prompt: on the user model
            start_image_url: {URL}
        jobs_from: rows.csv
        """)
    full = load_manifest(manifest, cached=False)  # a full load (as `validate` does), which writes the cache
    assert full.warnings and len(full.jobs) == 10
    hit = load_manifest(manifest)
    assert hits(caplog) == 1
    assert _everything(hit) == _everything(full)


async def test_run_log_says_when_the_manifest_came_from_the_cache(tmp_path):
    manifest = write_manifest(tmp_path, [job("a"), job("b")])
    async with Sandbox() as sandbox:
        first, _ = await run(manifest, sandbox)
        second, _ = await run(manifest, sandbox)
        assert first.exit_code == second.exit_code == 0 and sandbox.posts_total == 2
    lines = [line for line in (tmp_path / "out" / "run.log").read_text("utf-8").splitlines() if " of " in line
             and "(2 jobs) into" in line]
    assert len(lines) == 2
    assert "read from the cache" not in lines[0] and "read from the cache" in lines[1]
