"""Media facts read from the downloaded files with PyAV, checked against what was asked and paid for,
and poster frames: on the sandbox's real sample video and on a video made here with sound."""

from __future__ import annotations

import io
from fractions import Fraction

import pytest
from helpers import cli, job, mux_silence, results, run, write_manifest

from batchrun.sandbox import Sandbox

av = pytest.importorskip("av", reason="PyAV is a dependency of batchrun: pip install av")


def made_video(seconds: int = 5, fps: int = 24, audio: bool = True) -> bytes:
    """An mp4 of `seconds` of grey frames (MPEG-4 part 2) and, if asked, silence (AAC)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 320, 180, "yuv420p"
        sound = out.add_stream("aac", rate=44100) if audio else None
        for i in range(seconds * fps):
            frame = av.VideoFrame(320, 180, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([128]) * plane.buffer_size)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            mux_silence(out, sound, seconds)
    return buffer.getvalue()


async def test_the_sandbox_sample_is_flagged_short_and_silent(tmp_path):
    manifest = write_manifest(tmp_path, [job("loud", generate_audio=True), job("quiet")])
    out = tmp_path / "out"
    async with Sandbox() as sandbox:  # its sample: 2 s, 160x90, 10 fps, no audio track
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    rows = results(out)
    assert rows["loud"]["media"] == {"duration_s": 2.0, "width": 160, "height": 90, "fps": 10.0, "has_audio": False}
    assert rows["loud"]["media_flags"] == ["shorter than asked: 2 s, asked 5 s",
                                           "no audio track, though audio was asked (and paid) for"]
    assert rows["quiet"]["media_flags"] == ["shorter than asked: 2 s, asked 5 s"]
    poster = (out / "posters" / "loud.jpg").read_bytes()
    assert poster.startswith(b"\xff\xd8\xff") and len(poster) > 500
    code, said, _ = await cli(["status", str(out)])
    assert code == 0 and "videos that differ from what was paid for (2):" in said
    assert "loud  shorter than asked: 2 s, asked 5 s; no audio track" in said
    report = (out / "report.html").read_text(encoding="utf-8")
    assert 'poster="posters/loud.jpg"' in report and "no audio track, though audio was asked" in report


async def test_a_video_as_asked_has_no_flags(tmp_path):
    manifest = write_manifest(tmp_path, [job("as-asked", generate_audio=True)])
    async with Sandbox(video_bytes=made_video(5, audio=True)) as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    row = results(tmp_path / "out")["as-asked"]
    media = row["media"]
    assert abs(media["duration_s"] - 5) < 0.2 and media["has_audio"] is True
    assert (media["width"], media["height"], media["fps"]) == (320, 180, 24.0)
    assert row["media_flags"] == []
    code, said, _ = await cli(["status", str(tmp_path / "out")])
    assert "differ from what was paid" not in said


async def test_an_unreadable_video_gets_no_facts_and_no_poster(tmp_path):
    # Passes the download's checks (an mp4 signature) but holds no playable stream.
    broken = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40
    manifest = write_manifest(tmp_path, [job("broken")])
    async with Sandbox(video_bytes=broken) as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    row = results(tmp_path / "out")["broken"]
    assert row["state"] == "done" and row["media"] is None and row["media_flags"] == []
    assert not (tmp_path / "out" / "posters" / "broken.jpg").exists()


async def test_every_video_of_a_batch_longer_than_a_reading_chunk_gets_its_facts_and_poster(tmp_path):
    from batchrun.mediafacts import READ_CHUNK, READ_THREADS

    ids = [f"clip-{i}" for i in range(READ_CHUNK * READ_THREADS + 3)]  # more chunks than threads, one short
    manifest = write_manifest(tmp_path, [job(i) for i in ids])
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    rows = results(tmp_path / "out")
    assert {i: rows[i]["media"]["duration_s"] for i in ids} == {i: 2.0 for i in ids}
    assert all((tmp_path / "out" / "posters" / f"{i}.jpg").stat().st_size > 500 for i in ids)


async def test_a_media_reader_that_dies_costs_only_the_facts_of_the_video_it_died_on(tmp_path, monkeypatch):
    # The reader is a child process: kill it (SIGKILL, as a crashing decoder would end) at its 2nd video.
    # The run's outcome does not change; each video but the ones a reader died on gets its facts.
    monkeypatch.setenv("BATCHRUN_CRASH_AT", "media_read:2")
    ids = [f"clip-{i}" for i in range(5)]
    manifest = write_manifest(tmp_path, [job(i) for i in ids])
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    rows = results(tmp_path / "out")
    assert all(rows[i]["state"] == "done" for i in ids)
    with_facts = [i for i in ids if rows[i]["media"]]
    # one at a time after the first death: each child reads one video, dies on its second
    assert 2 <= len(with_facts) < len(ids)
    assert all(rows[i]["media"]["duration_s"] == 2.0 for i in with_facts)
    log = (tmp_path / "out" / "run.log").read_text()
    assert "the media reader stopped on" in log
    # A later run does not read them again (they are stored as unreadable) and says nothing new.
    monkeypatch.delenv("BATCHRUN_CRASH_AT")
    async with Sandbox() as sandbox:
        again, _ = await run(manifest, sandbox)
    assert again.exit_code == 0 and results(tmp_path / "out") == rows


def test_the_media_reader_keeps_pyav_out_of_the_runs_own_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    # Its libraries (about 20 MB) stay out of a long run's memory.
    probe = ("import asyncio, sys\n"
             "from pathlib import Path\n"
             "from batchrun import mediafacts\n"
             "out = Path(sys.argv[1]); (out / 'a.mp4').write_bytes(Path(sys.argv[2]).read_bytes())\n"
             "got = mediafacts.read_all(out, [('a', 'a.mp4')])\n"
             "print(got[0][1]['duration_s'], 'av' in sys.modules)\n")
    from batchrun.sandbox import server
    sample = Path(server.__file__).with_name("sample.mp4")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), str(sample)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["2.0", "False"]


def test_a_video_that_hangs_the_reader_costs_its_facts_and_about_two_stalls(tmp_path):
    # A FIFO with no writer where a video should be: FFmpeg's open never returns. The reader is given up
    # on after `stall_seconds` without a word, twice (all threads, then one at a time), not once per video.
    import os
    import time
    from pathlib import Path

    from batchrun import mediafacts
    from batchrun.sandbox import server

    sample = Path(server.__file__).with_name("sample.mp4").read_bytes()
    todo = []
    for i in range(6):
        (tmp_path / f"v{i}.mp4").write_bytes(sample)
        todo.append((f"v{i}", f"v{i}.mp4"))
    os.unlink(tmp_path / "v2.mp4")
    os.mkfifo(tmp_path / "v2.mp4")
    started = time.monotonic()
    got = dict(mediafacts.read_all(tmp_path, todo, stall_seconds=1.5))
    took = time.monotonic() - started
    assert got["v2"] is None
    assert {k: v["duration_s"] for k, v in got.items() if k != "v2"} == {f"v{i}": 2.0 for i in range(6) if i != 2}
    assert took < 3 * 1.5 + 10, took
    assert (tmp_path / "posters" / "v5.jpg").is_file()


def test_a_planted_module_in_the_current_directory_does_not_run_in_the_reader(tmp_path, monkeypatch):
    # The reader is started with `python -I`: the current directory is not on its import path, so a
    # json.py (or av.py) left there by someone else never runs, and the facts are read as usual.
    from pathlib import Path

    from batchrun import mediafacts
    from batchrun.sandbox import server

    planted = tmp_path / "cwd"
    planted.mkdir()
    marker = tmp_path / "ran"
    for name in ("json", "av", "re"):
        (planted / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.mp4").write_bytes(Path(server.__file__).with_name("sample.mp4").read_bytes())
    monkeypatch.chdir(planted)
    got = mediafacts.read_all(out, [("a", "a.mp4")])
    assert got[0][1]["duration_s"] == 2.0
    assert not marker.exists()


def _sample_videos(directory, count: int) -> list[tuple[str, str]]:
    from pathlib import Path

    from batchrun.sandbox import server

    sample = Path(server.__file__).with_name("sample.mp4").read_bytes()
    todo = []
    for i in range(count):
        (directory / f"v{i}.mp4").write_bytes(sample)
        todo.append((f"v{i}", f"v{i}.mp4"))
    return todo


def test_a_reader_reading_in_threads_gives_every_video_its_facts_and_poster(tmp_path):
    # parallel_after_s=0: the reader goes on in threads after its sample, whatever the videos cost.
    from batchrun import mediafacts

    todo = _sample_videos(tmp_path, mediafacts.PARALLEL_SAMPLE + mediafacts.READ_CHUNK * 2 + 5)
    got = mediafacts.read_all(tmp_path, todo, parallel_after_s=0.0)
    assert sorted(job_id for job_id, _ in got) == sorted(job_id for job_id, _ in todo)
    assert {facts["duration_s"] for _, facts in got} == {2.0}
    assert all((tmp_path / "posters" / f"{job_id}.jpg").stat().st_size > 500 for job_id, _ in todo)


@pytest.mark.parametrize("parallel_after_s", [0.0, 3600.0])  # read in threads / in order after the sample
def test_a_reader_that_dies_with_answers_not_yet_sent_costs_their_reading_again_not_their_facts(
        tmp_path, monkeypatch, parallel_after_s):
    # A reader reading a batch sends its answers a few at a time: killed, those it had not sent are read
    # again by readers reading one video at a time, each of which dies on its 6th video here (the kill
    # counts per process), so exactly those get no facts.
    from batchrun import mediafacts

    if mediafacts.reading_threads() < 2:
        pytest.skip("one CPU: the reader reads one video at a time from the start")
    monkeypatch.setenv("BATCHRUN_CRASH_AT", "media_read:6")
    todo = _sample_videos(tmp_path, 40)
    got = dict(mediafacts.read_all(tmp_path, todo, parallel_after_s=parallel_after_s))
    assert sorted(got) == sorted(job_id for job_id, _ in todo)
    lost = [job_id for job_id, facts in got.items() if facts is None]
    assert {facts["duration_s"] for facts in got.values() if facts is not None} == {2.0}
    # The first reader died on its 6th video with at most 5 answers sent; the one-at-a-time readers then
    # lose one video in each 6 of the 35 to 40 left: 5 or 6, and every other video has its facts.
    assert 5 <= len(lost) <= 6, lost


@pytest.mark.parametrize("planted", ["folder", "part"])
async def test_posters_are_never_written_through_a_link_planted_in_the_output_dir(tmp_path, planted):
    # FFmpeg opened the poster's file by name, following a link at it or at its folder out of the output dir.
    manifest = write_manifest(tmp_path, [job("cliff")])
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.txt"
    victim.write_bytes(b"precious")
    out.mkdir()
    if planted == "folder":
        (out / "posters").symlink_to(elsewhere, target_is_directory=True)
    else:
        (out / "posters").mkdir()
        (out / "posters" / "cliff.jpg.part").symlink_to(victim)
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0
    assert victim.read_bytes() == b"precious" and sorted(p.name for p in elsewhere.iterdir()) == ["victim.txt"]
    assert results(out)["cliff"]["media"]["width"] == 160  # the facts do not depend on the poster
    if planted == "folder":
        assert (out / "posters").is_symlink()  # left as found; no poster
    else:
        assert (out / "posters" / "cliff.jpg").read_bytes().startswith(b"\xff\xd8\xff")


async def test_start_images_are_never_copied_through_a_linked_folder(tmp_path):
    from test_preflight import image

    (tmp_path / "harbor.png").write_bytes(image((640, 480)))
    manifest = write_manifest(tmp_path, [job("harbor", start_image_url="harbor.png")])
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "start-images").symlink_to(elsewhere, target_is_directory=True)
    async with Sandbox() as sandbox:
        outcome, _ = await run(manifest, sandbox)
    assert outcome.exit_code == 0 and results(out)["harbor"]["state"] == "done"
    assert list(elsewhere.iterdir()) == []
    assert "could not copy start image" in (out / "run.log").read_text()
