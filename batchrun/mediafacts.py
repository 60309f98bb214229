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

import io
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

from batchrun.crashpoints import crashpoint
from batchrun.fsutil import atomic_write, own_folder
from batchrun.settings import TOKEN_ENV

log = logging.getLogger("batchrun.run")

POSTERS = "posters"
POSTER_WIDTH = 480  # pixels; the galleries show takes about this wide
READ_THREADS = 4  # at most; never more than the CPUs this process may run on (`reading_threads`)
READ_CHUNK = 16  # videos a reading thread takes at a time
# Threads pay only when FFmpeg decodes (a 720p poster frame: ~50 ms, without the interpreter lock). A
# video that fails to open in well under a millisecond gains nothing from them, and several threads
# then spend their time handing the lock to each other (about 20 futex calls per video with 4 threads
# on 2 CPUs, none with one). So the reader reads `PARALLEL_SAMPLE` videos in order first, and only if
# even the fastest of them took `PARALLEL_AFTER_S` does it read the rest in threads.
PARALLEL_SAMPLE = 3
PARALLEL_AFTER_S = 0.002
ANSWER_EVERY_S = 0.5  # how often a reader allowed threads sends the answers it has (see `_Answers`)
STALL_SECONDS = 60.0  # a reader that says nothing for this long is taken to hang (a video takes < 1 s)
DURATION_TOLERANCE_S = 0.5  # containers round; a whole second off is what a user would notice


def read_video(path: Path, poster: Path | None = None) -> dict[str, Any] | None:
    """The media facts of the video at `path`, or None when it cannot be read (or PyAV is missing); with
    `poster`, its first frame is also written there as a JPEG (POSTER_WIDTH wide), from the same opening
    of the file: opening an mp4 parses its index and decodes a few frames to learn its streams, which
    was a third of a 720p video's reading time when the poster opened it again. A poster that cannot be
    made is logged and leaves the facts as read."""
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency; an odd install degrades to no facts
        return None
    try:
        with av.open(str(path)) as container:
            facts = _facts(container)
            if facts is not None and poster is not None:
                _write_poster(container, path, poster)
            return facts
    except Exception as exc:  # noqa: BLE001 - av raises its own FFmpeg error tree, and OSError
        log.info("could not read media facts of %s: %s", path, exc)
        return None


def _facts(container) -> dict[str, Any] | None:
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


def _write_poster(container, path: Path, poster: Path) -> bool:
    import av

    try:
        frame = next(container.decode(video=0))
        width = min(POSTER_WIDTH, frame.width) // 2 * 2
        height = max(2, round(frame.height * width / frame.width) // 2 * 2)
        # Encoded in memory, then written by atomic_write into a folder that is no link: FFmpeg opens a
        # file by name, following a link planted at it or at its folder, out of the output dir.
        jpeg = io.BytesIO()
        with av.open(jpeg, "w", format="mjpeg") as out:
            stream = out.add_stream("mjpeg")
            stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
            image = frame.reformat(width=width, height=height, format="yuvj420p")
            for packet in stream.encode(image):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        atomic_write(own_folder(poster.parent) / poster.name, jpeg.getvalue(), durable=False)
        return True
    except Exception as exc:  # noqa: BLE001 - see read_video
        log.info("could not make a poster frame of %s: %s", path, exc)
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


def reading_threads() -> int:
    """How many threads the reader may read with: READ_THREADS, or fewer CPUs (2 CPUs shared by 4 threads
    read 200 720p videos no faster than 2 threads, and with more lock hand-offs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(READ_THREADS, cpus))


def read_all(output_dir: Path, todo: list[tuple[str, str]], *, stall_seconds: float = STALL_SECONDS,
             parallel_after_s: float = PARALLEL_AFTER_S) -> list[tuple[str, dict[str, Any] | None]]:
    """The facts of each `(job id, path relative to output_dir)`, read (and posters made) in a child
    process; a video that crashes or hangs the reader gets None, and the others their facts. Videos left
    out of the answer (the reader could not start at all) are simply not in it: the next run reads them.

    Why a child: FFmpeg parses files a server sent us, and a decoder that crashes or hangs on a hostile
    file would take the run down with it at its very end; in a child, it costs that one file's facts. The
    child also keeps PyAV's libraries (about 20 MB) out of a long run's memory. A child that dies, or says
    nothing for `stall_seconds`, is replaced by one reading a video at a time, in order, so the video it
    dies or hangs on is known: that one gets None and the next child goes on after it.

    `parallel_after_s`: the time a video must take to read before the reader reads in threads
    (PARALLEL_AFTER_S; 0 always does when it may, for tests)."""
    answers: list[tuple[str, dict[str, Any] | None]] = []
    remaining, threads = list(todo), reading_threads()
    while remaining:
        got, finished, started = _read_in_child(output_dir, remaining, threads, stall_seconds, parallel_after_s)
        answers += got
        seen = {job_id for job_id, _ in got}
        remaining = [item for item in remaining if item[0] not in seen]
        if finished or not remaining:
            break
        if not started:
            log.warning("the media reader could not start; %d videos get their media facts on a later run",
                        len(remaining))
            break
        if threads > 1:
            threads = 1
            continue
        job_id, path = remaining.pop(0)
        log.warning("the media reader stopped on %s (%s): it gets no media facts", path, job_id)
        answers.append((job_id, None))
    return answers


def _read_in_child(output_dir: Path, todo: list[tuple[str, str]], threads: int, stall_seconds: float,
                   parallel_after_s: float) -> tuple[list[tuple[str, dict[str, Any] | None]], bool, bool]:
    """Run the reader on `todo`; returns the answers it gave, whether it finished, and whether it started."""
    # -I: nothing from the current directory or PYTHON* variables runs in it (a planted json.py would,
    # before the path below is set); it imports batchrun from where this process did (a checkout, a venv,
    # an editable install, whose import hook is not on the path: hence batchrun's own folder first).
    # -S: no `site` (a thousand system calls of .pth files and site folders): the path below is this
    # process's, which site already made. Not given the token.
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    path = [str(Path(__file__).resolve().parent.parent), *sys.path]
    argv = [sys.executable, "-I", "-S", "-c", _CHILD, str(output_dir), str(threads), repr(parallel_after_s), *path]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env=env)
    except OSError as exc:
        log.warning("could not start the media reader: %s", exc)
        return [], False, False
    feeder = threading.Thread(target=_feed, args=(proc.stdin, json.dumps(todo).encode()), daemon=True)
    feeder.start()
    answers, started, stalled, pending = [], False, False, b""
    with proc, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not selector.select(timeout=stall_seconds):
                stalled = True
                proc.kill()
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message == ["ready"]:
                    started = True
                elif isinstance(message, list) and len(message) == 3 and message[0] == "answer" \
                        and isinstance(message[1], str) and (message[2] is None or isinstance(message[2], dict)):
                    answers.append((message[1], message[2]))
                elif isinstance(message, list) and len(message) == 2 and message[0] == "log":
                    log.info("%s", message[1])
        proc.wait()
    return answers, proc.returncode == 0 and not stalled, started


def _feed(pipe, data: bytes) -> None:
    try:
        with pipe:
            pipe.write(data)
    except (OSError, ValueError):  # the reader died (or was killed) before reading it all: its exit says why
        pass


# Runs with -I: only built-in modules before the path is set.
_CHILD = "import sys; sys.path[:] = sys.argv[4:]; from batchrun.mediafacts import child_main; child_main()"


class _ToParent(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _say(["log", self.format(record)])


class _Answers:
    """The reader's stdout. `eager`: each message written as it is said (a reader reading one video at a
    time, whose parent learns from the last answer which video it died on). Otherwise messages are
    gathered and written at most every ANSWER_EVERY_S, and at the end: one write for many videos, where
    a crash or a hang costs only their reading again (the parent then reads the unanswered ones one at
    a time) and the parent, which gives up on a reader silent for 60 s, still hears from it often."""

    def __init__(self) -> None:
        self.eager = True
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._sent = time.monotonic()

    def say(self, message: list) -> None:
        with self._lock:
            self._lines.append(json.dumps(message) + "\n")
            if self.eager or time.monotonic() - self._sent >= ANSWER_EVERY_S:
                self._flush()

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._lines:
            sys.stdout.write("".join(self._lines))
            sys.stdout.flush()
            self._lines.clear()
        self._sent = time.monotonic()


_answers = _Answers()
_say = _answers.say


def child_main() -> None:
    """The reader: `[[job id, path], ...]` as JSON on stdin; JSON lines on stdout: `["ready"]` once started,
    then `["answer", job id, facts or null]` per video and `["log", text]` for its log lines.

    Given one thread (argv), each answer is written as soon as its video is read, in order. Given more,
    it reads `PARALLEL_SAMPLE` videos in order, then the rest in threads if even the fastest of those took
    `parallel_after_s` (argv), else on in order; either way its answers are written a few at a time
    (`_Answers`)."""
    output_dir, threads, parallel_after_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    logging.logProcesses = False  # a getpid() per record (per unreadable video) for a field never shown
    handler = _ToParent()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    _say(["ready"])
    todo = json.loads(sys.stdin.buffer.read())

    def read(item: list[str]) -> float:
        job_id, path = item
        crashpoint("media_read")
        started = time.perf_counter()
        facts = read_video(output_dir / path, output_dir / poster_path(job_id))
        took = time.perf_counter() - started
        _say(["answer", job_id, facts])
        return took

    if threads <= 1:
        for item in todo:
            read(item)
        return
    _answers.eager = False
    try:
        sample = [read(item) for item in todo[:PARALLEL_SAMPLE]]
        rest = todo[PARALLEL_SAMPLE:]
        if rest and min(sample) < parallel_after_s:
            for item in rest:
                read(item)
        elif rest:
            # FFmpeg decodes without holding the GIL: a few threads read a long batch's videos several
            # times faster. Each thread takes `READ_CHUNK` videos at a time: one hand-off per video cost
            # more than a short read.
            chunks = [rest[start:start + READ_CHUNK] for start in range(0, len(rest), READ_CHUNK)]
            with ThreadPoolExecutor(max_workers=min(threads, len(chunks))) as pool:
                for _ in pool.map(lambda chunk: [read(item) for item in chunk], chunks):
                    pass
    finally:
        _answers.flush()
