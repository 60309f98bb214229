"""Input files (the manifest, its jobs file, local images) are read only from regular files, and nothing
read from one reaches a message unbounded, with control characters, or with the API token in it.

Real files, symlinks, FIFOs, sockets and devices, validated by a real `python -m batchrun` with a token
in its environment: a FIFO that blocked would hit the subprocess timeout.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from batchrun.inputfile import NotARegularFile, read_regular

REPO = Path(__file__).resolve().parent.parent
TOKEN = "rc-test-token-5f0e2c9a71b4"
OTHER_SECRET = "other-env-secret-93c1d7"
IMAGE = "https://example.com/a.png"
LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<rest>.+)$")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc, /sys, FIFOs and sockets")


def validate(*paths: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNCOMFY_API_TOKEN": TOKEN, "BATCHRUN_TEST_OTHER": OTHER_SECRET,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "batchrun", "validate", *map(str, paths)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)
    for secret in (TOKEN, OTHER_SECRET):
        assert secret not in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return done


def problem_lines(out: str, path: Path) -> list[re.Match]:
    lines = [LOCATED.match(line) for line in out.splitlines() if line.startswith(f"{path}:")]
    return [m for m in lines if m]


def make(kind: str, path: Path) -> Path:
    """A non-regular file of `kind` at `path` (a symlink for the pseudo-files and the device)."""
    if kind == "proc-environ":
        path.symlink_to("/proc/self/environ")
    elif kind == "sys-file":
        path.symlink_to("/sys/kernel/mm/transparent_hugepage/enabled" if os.path.exists(
            "/sys/kernel/mm/transparent_hugepage/enabled") else "/sys/devices/system/cpu/online")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:  # pragma: no cover
        raise ValueError(kind)
    return path


KINDS = {
    "proc-environ": "is a kernel pseudo-file (under /proc or /sys), not a regular file",
    "sys-file": "is a kernel pseudo-file (under /proc or /sys), not a regular file",
    "fifo": "is a named pipe (FIFO), not a regular file",
    "socket": "is a socket, not a regular file",
    "device": "is a device, not a regular file",
}


def test_manifest_that_is_not_a_regular_file_is_refused(tmp_path):
    paths = [make(kind, tmp_path / f"{kind}.yaml") for kind in KINDS]
    done = validate(*paths, cwd=tmp_path)
    assert done.returncode == 2
    for path, predicate in zip(paths, KINDS.values(), strict=True):
        assert [m.group(0) for m in problem_lines(done.stdout, path)] == [
            f"{path}:1:1: {predicate}: batchrun reads manifests only from regular files"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_jobs_file_that_is_not_a_regular_file_is_refused_at_the_jobs_from_line(tmp_path, suffix):
    manifests = []
    for kind in KINDS:
        folder = tmp_path / kind
        folder.mkdir()
        make(kind, folder / f"jobs{suffix}")
        manifest = folder / "m.yaml"
        manifest.write_text(f"defaults:\n  start_image_url: {IMAGE}\njobs_from: jobs{suffix}\n")
        manifests.append(manifest)
    done = validate(*manifests, cwd=tmp_path)
    assert done.returncode == 2
    for manifest, (kind, predicate) in zip(manifests, KINDS.items(), strict=True):
        assert [m.group(0) for m in problem_lines(done.stdout, manifest)] == [
            f"{manifest}:3:12: jobs_from: {manifest.parent / f'jobs{suffix}'} {predicate}: batchrun reads jobs "
            "files only from regular files"], kind


def test_local_image_that_is_not_a_regular_file_is_refused_at_its_field(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("jobs:\n" + "".join(
        f"  - id: {kind}\n    prompt: p\n    start_image_url: {kind}.png\n" for kind in KINDS))
    for kind in KINDS:
        make(kind, tmp_path / f"{kind}.png")
    done = validate(manifest, cwd=tmp_path)
    assert done.returncode == 2
    found = problem_lines(done.stdout, manifest)
    assert len(found) == len(KINDS)
    for i, (match, (kind, predicate)) in enumerate(zip(found, KINDS.items(), strict=True)):
        assert (match["line"], match["col"]) == (str(4 + 3 * i), "22")
        assert match["rest"].startswith(f"jobs[{i}] (id={kind}).start_image_url: '{kind}.png' {predicate} (")


def test_regular_files_through_symlinks_still_work(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "jobs.csv").write_text("id,prompt\nj1,waves\n")
    out = io.BytesIO()
    Image.new("RGB", (640, 480)).save(out, "PNG")
    (real / "cliff.png").write_bytes(out.getvalue())
    (real / "m.yaml").write_text("defaults:\n  start_image_url: cliff.png\njobs_from: jobs.csv\n")
    (tmp_path / "jobs.csv").symlink_to(real / "jobs.csv")
    (tmp_path / "cliff.png").symlink_to(real / "cliff.png")
    (tmp_path / "m.yaml").symlink_to(real / "m.yaml")
    done = validate(tmp_path / "m.yaml", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"{tmp_path / 'm.yaml'}: ok, 1 job\n")


def test_token_in_a_regular_jobs_file_is_never_echoed(tmp_path):
    # A .env file named as the jobs file: its first line becomes an "unknown column".
    (tmp_path / "jobs.csv").write_text(f"RUNCOMFY_API_TOKEN={TOKEN}\nBATCHRUN_X=1\n")
    (tmp_path / "m.yaml").write_text(f"defaults:\n  start_image_url: {IMAGE}\njobs_from: jobs.csv\n")
    done = validate(tmp_path / "m.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert f"{tmp_path / 'jobs.csv'}:1:1: jobs_from: unknown column 'RUNCOMFY_API_TOKEN=[RUNCOMFY_API_TOKEN]'" \
        in done.stdout


def test_token_in_manifest_text_is_never_echoed(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"{TOKEN}: 1\njobs:\n  - id: '{TOKEN}'\n    prompt: p\n    start_image_url: {IMAGE}\n"
                        f"  - id: a\n    prompt: p\n    start_image_url: 'x{TOKEN}'\n")
    done = validate(manifest, cwd=tmp_path)
    assert done.returncode == 2
    assert f"{manifest}:1:1: [RUNCOMFY_API_TOKEN]: unknown setting" in done.stdout
    assert "[RUNCOMFY_API_TOKEN]" in done.stdout.splitlines()[1]


def test_echoed_text_is_capped_and_control_characters_are_escaped(tmp_path):
    header = "\x1b]0;owned\x07\x1b[2J" + "k" * 5000 + "\u202e"
    (tmp_path / "jobs.csv").write_text(f"prompt,{header}\nwaves,1\n")
    (tmp_path / "m.yaml").write_text(
        f"defaults:\n  start_image_url: {IMAGE}\njobs_from: jobs.csv\n{'z' * 1000}: 1\n"
        'jobs:\n  - id: "\\e[31mred"\n    prompt: p\n    start_image_url: "x\\u2028y\\e[0m.png"\n')
    done = validate(tmp_path / "m.yaml", cwd=tmp_path)
    assert done.returncode == 2
    for line in done.stdout.splitlines():
        assert line.isprintable(), line
        assert len(line) < 1200
    assert "unknown column '\\x1b]0;owned\\x07\\x1b[2Jkkk" in done.stdout


# --- the reader itself ----------------------------------------------------------------------------


def test_read_regular_returns_at_most_one_byte_over_the_cap_and_the_stated_size(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    assert read_regular(path, 4096) == (b"x" * 1000, 1000)
    data, size = read_regular(path, 100)
    assert (len(data), size) == (101, 1000)
    assert read_regular(tmp_path / "f", 1000) == (b"x" * 1000, 1000)


def test_read_regular_refuses_a_folder_by_name(tmp_path):
    with pytest.raises(NotARegularFile) as info:
        read_regular(tmp_path, 10)
    assert info.value.folder


def test_read_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile, match="FIFO"):
        read_regular(fifo, 10)
