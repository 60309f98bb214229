"""Wall time of the media reader (batchrun.mediafacts) on a batch of real videos, by reading threads.

    python bench/bench_media.py [--videos 200] [--runs 3] [--kind 720p sample unreadable] [--threads 1 2 4]

Each kind is one file copied `--videos` times into a fresh folder: `720p` is made here with PyAV (5 s,
1280x720 H.264 at 24 fps with AAC sound, about 0.5 MB: a Kling render's shape), `sample` is the
sandbox's own (2 s, 160x90, MPEG-4 part 2), `unreadable` the syscall bench's 64 KB that start as an MP4
and hold no stream. For each thread count, the reader child is run on the whole batch with that many
threads from its first video (`parallel_after_s=0`), then as a run starts it (`product`: as many threads as
CPUs, in threads only when the first videos show decoding to share). Facts and a poster are made for
every video, as at the end of a run; the figure is the median wall time of `--runs` runs, start-up of
the child included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This checkout's batchrun, whatever else is installed; the sibling script and the tests' helpers.
sys.path[:0] = [str(HERE.parent), str(HERE), str(HERE.parent / "tests")]

from bench_run import bench_video  # noqa: E402 - a sibling script, not a package
from helpers import mux_silence  # noqa: E402 - the tests' video maker, shared

from batchrun import mediafacts  # noqa: E402


def made_720p(path: Path, seconds: int = 5, fps: int = 24) -> None:
    """A 1280x720 H.264 video with AAC silence: a gradient with noise, shifted each frame (so not all
    frames are alike), about 0.5 MB."""
    import av

    width, height = 1280, 720
    row = bytes(x * 255 // width for x in range(width))
    base = bytearray(row * height)
    noise = os.urandom(width * height // 8)
    base[::8] = noise[: len(base[::8])]
    base = bytes(base)
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=44100)
        for i in range(seconds * fps):
            frame = av.VideoFrame(width, height, "yuv420p")
            shift = i * 4 * width + i
            frame.planes[0].update(base[shift:] + base[:shift])
            frame.planes[1].update(bytes([128]) * frame.planes[1].buffer_size)
            frame.planes[2].update(bytes([100]) * frame.planes[2].buffer_size)
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        mux_silence(out, sound, seconds)


def video_of(kind: str, workdir: Path) -> bytes:
    if kind == "720p":
        made_720p(workdir / "720p.mp4")
        return (workdir / "720p.mp4").read_bytes()
    if kind == "sample":
        from batchrun.sandbox import server

        return Path(server.__file__).with_name("sample.mp4").read_bytes()
    return bench_video()


def read_once(folder: Path, todo: list[tuple[str, str]], threads: int | None) -> tuple[float, int]:
    """Seconds to read the batch (None: as a run does), and how many videos got facts."""
    shutil.rmtree(folder / "posters", ignore_errors=True)
    started = time.perf_counter()
    if threads is None:
        got = mediafacts.read_all(folder, todo)
    else:
        got, _, _ = mediafacts._read_in_child(folder, todo, threads, mediafacts.STALL_SECONDS, 0.0)
    return time.perf_counter() - started, sum(1 for _, facts in got if facts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kind", nargs="+", choices=["720p", "sample", "unreadable"],
                        default=["720p", "sample", "unreadable"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; the reader may use {mediafacts.reading_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-media-") as tmp:
        for kind in args.kind:
            folder = Path(tmp) / kind
            folder.mkdir()
            data = video_of(kind, Path(tmp))
            todo = []
            for i in range(args.videos):
                (folder / f"v{i}.mp4").write_bytes(data)
                todo.append((f"v{i}", f"v{i}.mp4"))
            line = []
            for threads in [*args.threads, None]:
                times, facts = [], 0
                for _ in range(args.runs):
                    took, facts = read_once(folder, todo, threads)
                    times.append(took)
                name = "product" if threads is None else f"{threads} thread{'s' * (threads > 1)}"
                line.append(f"{name} {statistics.median(times):.2f} s")
            print(f"{kind} ({len(data) // 1024} KB) x {args.videos}, {facts} with facts: {', '.join(line)}",
                  flush=True)


if __name__ == "__main__":
    main()
