"""What a downloaded video really is, read from the file, checked against what was paid for, and a
poster frame for the galleries.

PyAV (the `av` package: FFmpeg's libraries in a wheel) reads the container and its streams and decodes
the first frame; we write that frame as a JPEG with FFmpeg's own MJPEG encoder, so no imaging library
is needed. Facts are `{"duration_s", "width", "height", "fps", "has_audio"}` (results.jsonl's `media`),
stored in the ledger once per done job. A file PyAV cannot read gets no facts (None) and no poster: it
was already verified as a video by its size, sha256 and signature, so this is a picture for people, not
a gate.

Flags (`flags`): the duration differs from the `duration` asked by more than `DURATION_TOLERANCE_S`, or
the file has no audio track though `generate_audio: true` was paid for.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

from batchrun.crashpoints import crashpoint
from batchrun.settings import TOKEN_ENV

log = logging.getLogger("batchrun.run")

POSTERS = "posters"
POSTER_WIDTH = 480  # pixels; the galleries show takes about this wide
READ_THREADS = 4
READ_CHUNK = 16  # videos a reading thread takes at a time
DURATION_TOLERANCE_S = 0.5  # containers round; a whole second off is what a user would notice


def probe(path: Path) -> dict[str, Any] | None:
    """The media facts of the video at `path`, or None when it cannot be read (or PyAV is missing)."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; an odd install degrades to no facts
        return None
    try:
        with av.open(str(path)) as container:
            video = next((s for s in container.streams if s.type == "video"), None)
            if video is None:
                return None
            duration = None
            if container.duration is not None:
                duration = container.duration / 1_000_000  # microseconds (AV_TIME_BASE)
            elif video.duration is not None and video.time_base:
                duration = float(video.duration * video.time_base)
            rate = video.average_rate or video.guessed_rate
            return {
                "duration_s": round(duration, 3) if duration is not None else None,
                "width": video.codec_context.width or None,
                "height": video.codec_context.height or None,
                "fps": round(float(rate), 3) if isinstance(rate, Fraction) and rate else None,
                "has_audio": any(s.type == "audio" for s in container.streams),
            }
    except Exception as exc:  # noqa: BLE001 - av raises its own FFmpeg error tree, and OSError
        log.info("could not read media facts of %s: %s", path, exc)
        return None


def make_poster(path: Path, poster: Path) -> bool:
    """Write the first frame of the video at `path` as a JPEG at `poster` (POSTER_WIDTH wide); True if done."""
    try:
        import av
    except ImportError:  # pragma: no cover
        return False
    part = poster.with_name(poster.name + ".part")
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
        width = min(POSTER_WIDTH, frame.width) // 2 * 2
        height = max(2, round(frame.height * width / frame.width) // 2 * 2)
        poster.parent.mkdir(exist_ok=True)
        with av.open(str(part), "w", format="image2") as out:
            stream = out.add_stream("mjpeg")
            stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
            image = frame.reformat(width=width, height=height, format="yuvj420p")
            for packet in stream.encode(image):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        part.replace(poster)
        return True
    except Exception as exc:  # noqa: BLE001 - see probe
        log.info("could not make a poster frame of %s: %s", path, exc)
        part.unlink(missing_ok=True)
        return False


def poster_path(job_id: str) -> str:
    """The poster's path relative to the output dir."""
    return f"{POSTERS}/{job_id}.jpg"


def asked(job_input: dict[str, Any]) -> tuple[Any, bool]:
    """What `flags` compares of an input: (its `duration` as written, whether it asked for audio)."""
    return job_input.get("duration"), job_input.get("generate_audio") is True


def flags(media: dict[str, Any] | None, job_input: dict[str, Any]) -> list[str]:
    """What in the file differs from what was asked and paid for (empty when all is as asked or unknown)."""
    return flags_for(media, *asked(job_input))


def flags_for(media: dict[str, Any] | None, duration: Any, audio: bool) -> list[str]:
    """`flags` of an input whose `asked` gave (duration, audio)."""
    if not media:
        return []
    found = []
    got = media.get("duration_s")
    try:
        asked_s = float(duration) if duration is not None else None
    except (TypeError, ValueError):
        asked_s = None
    if asked_s is not None and got is not None and abs(got - asked_s) > DURATION_TOLERANCE_S:
        found.append(f"{'shorter' if got < asked_s else 'longer'} than asked: {got:g} s, asked {asked_s:g} s")
    if audio and media.get("has_audio") is False:
        found.append("no audio track, though audio was asked (and paid) for")
    return found


def describe(media: dict[str, Any] | None, kind: str = "video") -> str:
    """One line for people: "1280×720, 24 fps, 5.04 s, with audio" (an image: only its size)."""
    if not media:
        return "—"
    size = f"{media['width']}×{media['height']}" if media.get("width") and media.get("height") else "size unknown"
    if kind == "image":
        return size
    fps = f"{media['fps']:g} fps" if media.get("fps") else "fps unknown"
    seconds = f"{media['duration_s']:g} s" if media.get("duration_s") is not None else "duration unknown"
    return f"{size}, {fps}, {seconds}, {'with audio' if media.get('has_audio') else 'no audio'}"


def fill(ledger, output_dir: Path, limit: int | None = None) -> int:
    """Read the facts (and make the poster) of every done job that has none yet (at most `limit`); store
    them. Returns how many.

    Safe while a run goes (one short write per job); a job whose file cannot be read is stored with
    `{}` so it is not read again on every refresh. The files are read in a child process (`read_all`)."""
    todo = ledger.without_media()[:limit]
    for job_id, facts in read_all(output_dir, todo):
        ledger.set_media(job_id, facts or {})
    return len(todo)


def read_all(output_dir: Path, todo: list[tuple[str, str]], *,
             timeout: Callable[[int], float] = lambda n: 60 + 2 * n) -> list[tuple[str, dict[str, Any] | None]]:
    """The facts of each `(job id, path relative to output_dir)`, read (and posters made) in a child
    process; a video that crashes or hangs the reader gets None, and the others their facts.

    Why a child: FFmpeg parses files a server sent us, and a decoder that crashes on a hostile file would
    take the run down with it at its very end; in a child, it costs that one file's facts. The child also
    keeps PyAV's libraries (about 20 MB) out of a long run's memory. A child that dies or outlives
    `timeout(len(videos))` seconds is replaced by one reading a video at a time, in order, so the video it
    dies on is known: that one gets None and the next child goes on after it."""
    answers: list[tuple[str, dict[str, Any] | None]] = []
    remaining, threads = list(todo), READ_THREADS
    while remaining:
        got, finished = _read_in_child(output_dir, remaining, threads, timeout(len(remaining)))
        answers += got
        seen = {job_id for job_id, _ in got}
        remaining = [item for item in remaining if item[0] not in seen]
        if finished or not remaining:
            break
        if threads > 1:
            threads = 1
            continue
        job_id, path = remaining.pop(0)
        log.warning("the media reader stopped on %s (%s): it gets no media facts", path, job_id)
        answers.append((job_id, None))
    return answers


def _read_in_child(output_dir: Path, todo: list[tuple[str, str]], threads: int,
                   timeout: float) -> tuple[list[tuple[str, dict[str, Any] | None]], bool]:
    """Run the reader on `todo`; returns the answers it gave and whether it finished."""
    # The child imports batchrun from where this process did (a checkout, a venv); not the token.
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    argv = [sys.executable, "-c", _CHILD, json.dumps(sys.path), str(output_dir), str(threads)]
    try:
        done = subprocess.run(argv, input=json.dumps(todo).encode(), capture_output=True, env=env,
                              timeout=timeout, check=False)
        stdout, stderr, finished = done.stdout, done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, finished = exc.stdout or b"", exc.stderr or b"", False
    except OSError as exc:
        log.warning("could not start the media reader: %s", exc)
        return [], True
    for line in stderr.decode("utf-8", "replace").splitlines():
        log.info("%s", line)
    answers = []
    for line in stdout.splitlines():
        try:
            job_id, facts = json.loads(line)
        except ValueError:  # the last line of a child killed mid-write
            continue
        if isinstance(job_id, str) and (facts is None or isinstance(facts, dict)):
            answers.append((job_id, facts))
    return answers, finished


# sys.path first: the child must import this batchrun, not one from wherever it was started.
_CHILD = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
          "from batchrun.mediafacts import child_main; child_main()")


def child_main() -> None:
    """The reader: `[[job id, path], ...]` as JSON on stdin; one `[job id, facts or null]` JSON line per
    video on stdout, each flushed as soon as known (in order when reading with one thread); its log on
    stderr."""
    output_dir, threads = Path(sys.argv[2]), int(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    todo = json.loads(sys.stdin.buffer.read())

    def read(item: list[str]) -> tuple[str, dict[str, Any] | None]:
        job_id, path = item
        crashpoint("media_read")
        facts = probe(output_dir / path)
        if facts is not None:
            make_poster(output_dir / path, output_dir / poster_path(job_id))
        return job_id, facts

    def answer(job_id: str, facts: dict[str, Any] | None) -> None:
        sys.stdout.write(json.dumps([job_id, facts]) + "\n")
        sys.stdout.flush()

    if threads <= 1:
        for item in todo:
            answer(*read(item))
        return
    # FFmpeg decodes without holding the GIL: a few threads read a long batch's videos several times
    # faster. Each thread takes `READ_CHUNK` videos at a time: one hand-off per video cost more than a
    # short read.
    chunks = [todo[start:start + READ_CHUNK] for start in range(0, len(todo), READ_CHUNK)]
    with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
        for done in pool.map(lambda chunk: [read(item) for item in chunk], chunks):
            for job_id, facts in done:
                answer(job_id, facts)
