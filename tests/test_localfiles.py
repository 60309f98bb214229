"""Local image files and data: URIs in image fields: checked at load, hashed into the input digest,
sent inline by `Job.api_input()`; the image rules shared with preflight (`batchrun.imageinfo`)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import textwrap

import pytest
from PIL import Image

from batchrun import imageinfo, localfiles
from batchrun.errors import ManifestError
from batchrun.localfiles import LocalFileError
from batchrun.manifest import load_manifest

J = "jobs[0] (id=a)"


def image_bytes(size=(640, 480), fmt="PNG", color=(200, 120, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, fmt)
    return out.getvalue()


def write_image(path, size=(640, 480), fmt="PNG", color=(200, 120, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(size, fmt, color))
    return path


def write(tmp_path, text: str, name: str = "m.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def one_job(image: str) -> str:
    return f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: {image}\n"


def problems(path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [str(p).removeprefix(f"{path}:") for p in info.value.problems]


# --- a good local file ----------------------------------------------------------------------------


def test_local_image_is_kept_as_written_and_sent_inline(tmp_path):
    image = write_image(tmp_path / "images" / "cliff.png")
    job = load_manifest(write(tmp_path, one_job("images/cliff.png"))).jobs[0]
    assert job.input["start_image_url"] == "images/cliff.png"
    assert job.local_files == {"start_image_url": image.resolve()}
    sent = job.api_input()
    assert sent["start_image_url"] == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    assert job.input["start_image_url"] == "images/cliff.png"  # api_input does not touch the input
    assert {k: v for k, v in sent.items() if k != "start_image_url"} == {"prompt": "p"}


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("BMP", "image/bmp"),
                                       ("WEBP", "image/webp")])
def test_each_accepted_format_and_its_mime_type(tmp_path, fmt, mime):
    write_image(tmp_path / "x.img", fmt=fmt)  # the extension does not matter: the bytes do
    job = load_manifest(write(tmp_path, one_job("x.img"))).jobs[0]
    assert job.api_input()["start_image_url"].startswith(f"data:{mime};base64,")


def test_path_outside_the_manifest_folder_through_dotdot_is_allowed(tmp_path):
    image = write_image(tmp_path / "shared" / "a.jpg", fmt="JPEG")
    (tmp_path / "batches").mkdir()
    job = load_manifest(write(tmp_path / "batches", one_job("../shared/a.jpg"))).jobs[0]
    assert job.local_files == {"start_image_url": image.resolve()}
    assert job.local_files["start_image_url"].is_absolute()
    assert ".." not in job.local_files["start_image_url"].parts


def test_absolute_path(tmp_path):
    image = write_image(tmp_path / "abs.png")
    job = load_manifest(write(tmp_path, one_job(str(image)))).jobs[0]
    assert job.local_files == {"start_image_url": image.resolve()}


def test_paths_in_elements(tmp_path):
    write_image(tmp_path / "f.png")
    write_image(tmp_path / "r.webp", fmt="WEBP")
    job = load_manifest(write(tmp_path, """\
        jobs:
          - id: a
            prompt: p
            start_image_url: https://example.com/a.png
            elements:
              - frontal_image_url: f.png
                reference_image_urls: [https://example.com/r.png, r.webp]
        """)).jobs[0]
    assert job.local_files == {"elements[0].frontal_image_url": (tmp_path / "f.png").resolve(),
                               "elements[0].reference_image_urls[1]": (tmp_path / "r.webp").resolve()}
    sent = job.api_input()
    assert sent["start_image_url"] == "https://example.com/a.png"
    assert sent["elements"][0]["frontal_image_url"].startswith("data:image/png;base64,")
    assert sent["elements"][0]["reference_image_urls"][0] == "https://example.com/r.png"
    assert sent["elements"][0]["reference_image_urls"][1].startswith("data:image/webp;base64,")
    assert job.input["elements"][0]["reference_image_urls"] == ["https://example.com/r.png", "r.webp"]


# --- the input digest covers the file's bytes -----------------------------------------------------


def test_editing_the_image_changes_the_digest_and_derived_id(tmp_path):
    image = write_image(tmp_path / "a.png")
    path = write(tmp_path, "jobs:\n  - prompt: p\n    start_image_url: a.png\n")
    first = load_manifest(path).jobs[0]
    again = load_manifest(path).jobs[0]
    assert (again.id, again.input_sha256) == (first.id, first.input_sha256)
    write_image(image, color=(0, 0, 255))
    edited = load_manifest(path).jobs[0]
    assert edited.input == first.input
    assert edited.input_sha256 != first.input_sha256
    assert edited.id != first.id


def test_digest_is_over_the_path_as_written_and_the_file_digest(tmp_path):
    from batchrun.manifest import input_sha256

    image = write_image(tmp_path / "a.png")
    job = load_manifest(write(tmp_path, one_job("a.png"))).jobs[0]
    file_digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert job.input_sha256 == input_sha256(
        "kling/kling-3.0/standard/image-to-video",
        {"prompt": "p", "start_image_url": {"file": "a.png", "sha256": file_digest}})


def test_jobs_without_local_files_keep_their_digest(tmp_path):
    """Ledgers written before local files existed stay valid: URL-only inputs are digested as before."""
    from batchrun.manifest import input_sha256

    job = load_manifest(write(tmp_path, one_job("https://example.com/a.png"))).jobs[0]
    assert job.input_sha256 == input_sha256("kling/kling-3.0/standard/image-to-video", job.input)
    assert job.local_files == {} and job.api_input() is job.input


def test_file_changed_after_loading_is_refused_at_send_time(tmp_path):
    image = write_image(tmp_path / "a.png")
    job = load_manifest(write(tmp_path, one_job("a.png"))).jobs[0]
    write_image(image, color=(1, 2, 3))
    with pytest.raises(LocalFileError, match="changed since the manifest was loaded"):
        job.api_input()
    image.unlink()
    with pytest.raises(LocalFileError, match="cannot read"):
        job.api_input()


def test_each_file_is_read_once_per_load(tmp_path, monkeypatch):
    write_image(tmp_path / "a.png")
    calls = []
    real = localfiles._read
    monkeypatch.setattr(localfiles, "_read", lambda path: calls.append(path) or real(path))
    jobs = "".join(f"  - id: j{i}\n    prompt: p{i}\n    start_image_url: {'./' if i % 2 else ''}a.png\n"
                   for i in range(200))
    manifest = load_manifest(write(tmp_path, "jobs:\n" + jobs))
    assert len(manifest.jobs) == 200
    assert calls == [(tmp_path / "a.png").resolve()]
    assert len({j.input_sha256 for j in manifest.jobs}) == 200


# --- bad local files ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert problems(write(tmp_path, one_job("images/nope.png"))) == [
        f"4:22: {J}.start_image_url: 'images/nope.png' does not exist (looked for {tmp_path}/images/nope.png; "
        "image paths are relative to the manifest's folder)"
    ]


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("just some text, renamed to .png")
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html><body>hi</body></html>")
    (tmp_path / "empty.png").write_bytes(b"")
    write_image(tmp_path / "anim.gif", fmt="GIF")
    path = write(tmp_path, """\
        jobs:
          - {id: a, prompt: p, start_image_url: notes.png}
          - {id: b, prompt: p, start_image_url: page.jpg}
          - {id: c, prompt: p, start_image_url: empty.png}
          - {id: d, prompt: p, start_image_url: anim.gif}
        """)
    assert problems(path) == [
        "2:41: jobs[0] (id=a).start_image_url: 'notes.png' is not an image (jpg, png, bmp or webp)",
        "3:41: jobs[1] (id=b).start_image_url: 'page.jpg' is a web page (HTML), not an image",
        "4:41: jobs[2] (id=c).start_image_url: 'empty.png' is not an image (jpg, png, bmp or webp)",
        "5:41: jobs[3] (id=d).start_image_url: 'anim.gif' is a GIF image; Kling accepts jpg, png, bmp or webp",
    ]


def test_too_big(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes() + b"\0" * (6 * 2**20))
    assert problems(write(tmp_path, one_job("big.png"))) == [
        f"4:22: {J}.start_image_url: 'big.png' is 6.0 MiB; an image sent inline is limited to 6 MiB: "
        "make it smaller or give an https:// URL instead"
    ]


def test_exactly_six_mib_is_fine(tmp_path):
    data = image_bytes()
    (tmp_path / "six.png").write_bytes(data + b"\0" * (6 * 2**20 - len(data)))
    assert load_manifest(write(tmp_path, one_job("six.png"))).jobs[0].local_files


def test_local_images_of_one_job_must_fit_in_one_request(tmp_path):
    data = image_bytes()
    for name in "abcdefghij":
        (tmp_path / f"{name}.png").write_bytes(data + b"\0" * (5 * 2**20))
    refs = ", ".join(f"{name}.png" for name in "bcdefghij")
    path = write(tmp_path, f"jobs:\n  - id: a\n    prompt: p\n    start_image_url: a.png\n    elements:\n"
                           f"      - reference_image_urls: [{refs}]\n")
    found = problems(path)
    assert len(found) == 1 and re.fullmatch(
        rf"2:5: {re.escape(J)}: its local images add up to 66\.\d MiB once encoded; a request is limited to 64 MiB: "
        r"use https:// URLs for some of them", found[0])
    path.write_text(path.read_text().replace(", j.png", ""))
    assert load_manifest(path).jobs[0].local_files


def test_folder_fifo_and_empty_path(tmp_path):
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "pipe")
    path = write(tmp_path, """\
        jobs:
          - {id: a, prompt: p, start_image_url: dir}
          - {id: b, prompt: p, start_image_url: pipe}
          - {id: c, prompt: p, start_image_url: ''}
        """)
    assert problems(path) == [
        f"2:41: jobs[0] (id=a).start_image_url: 'dir' is a folder, not an image file ({tmp_path}/dir)",
        f"3:41: jobs[1] (id=b).start_image_url: 'pipe' is a named pipe (FIFO), not a regular file ({tmp_path}/pipe)",
        "4:41: jobs[2] (id=c).start_image_url: is empty: give an https:// URL or an image file's path",
    ]


@pytest.mark.parametrize(
    "size, message",
    [
        ((200, 200), "'x.png' is 200x200 px; Kling needs each side to be at least 300 px"),
        ((299, 600), "'x.png' is 299x600 px; Kling needs each side to be at least 300 px"),
        ((3000, 400), "'x.png' is 3000x400 px, an aspect ratio of 7.50:1; Kling accepts from 1:2.5 to 2.5:1"),
        ((400, 1001), "'x.png' is 400x1001 px, an aspect ratio of 1:2.50; Kling accepts from 1:2.5 to 2.5:1"),
    ],
    ids=["small", "narrow", "wide", "tall"],
)
def test_kling_size_limits(tmp_path, size, message):
    write_image(tmp_path / "x.png", size=size)
    assert problems(write(tmp_path, one_job("x.png"))) == [f"4:22: {J}.start_image_url: {message}"]


@pytest.mark.parametrize("size", [(300, 300), (750, 300), (300, 750), (1920, 1080)])
def test_sizes_at_the_limits_are_fine(tmp_path, size):
    write_image(tmp_path / "x.png", size=size)
    assert load_manifest(write(tmp_path, one_job("x.png"))).warnings == []


def test_damaged_header_is_a_warning(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(image_bytes(fmt="JPEG")[:40])
    manifest = load_manifest(write(tmp_path, one_job("cut.jpg")))
    assert [str(w).removeprefix(f"{tmp_path / 'm.yaml'}:") for w in manifest.warnings] == [
        f"4:22: {J}.start_image_url: warning: 'cut.jpg' looks like a JPEG file but its header cannot be read "
        "(damaged?); its size could not be checked against Kling's limits"
    ]


def test_problem_of_an_image_in_defaults_is_reported_once(tmp_path):
    jobs = "".join(f"  - id: j{i}\n    prompt: p\n" for i in range(50))
    assert problems(write(tmp_path, f"defaults:\n  start_image_url: missing.png\njobs:\n{jobs}")) == [
        f"2:20: defaults.start_image_url: 'missing.png' does not exist (looked for {tmp_path}/missing.png; "
        "image paths are relative to the manifest's folder)"
    ]


def test_same_file_written_two_ways_is_named_as_written(tmp_path):
    path = write(tmp_path, """\
        jobs:
          - {id: a, prompt: p, start_image_url: gone.png}
          - {id: b, prompt: p, start_image_url: ./gone.png}
        """)
    found = problems(path)
    assert [p.split(": ", 2)[2].split(" does")[0] for p in found] == ["'gone.png'", "'./gone.png'"]


# --- data: URIs written in the manifest -----------------------------------------------------------


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_uri_is_sent_as_written(tmp_path):
    uri = data_uri(image_bytes((320, 320)))
    job = load_manifest(write(tmp_path, one_job(uri))).jobs[0]
    assert job.local_files == {}
    assert job.api_input()["start_image_url"] == uri


@pytest.mark.parametrize(
    "uri, message",
    [
        ("data:image/png,abc", "the data: URI must be base64-encoded (data:image/png;base64,...)"),
        ("data:image/png;base64", "is not a valid data: URI (expected data:image/png;base64,...)"),
        ("data:image/png;base64,@@@@", "the data: URI's base64 text is not valid"),
        (data_uri(b"hello there"), "the data: URI's content is not an image (jpg, png, bmp or webp)"),
        (data_uri(image_bytes((100, 100))),
         "the data: URI's content is 100x100 px; Kling needs each side to be at least 300 px"),
        (data_uri(b"\x89PNG\r\n\x1a\n" + b"\0" * (6 * 2**20)),
         "the data: URI holds 6.0 MiB; an image sent inline is limited to 6 MiB"),
    ],
    ids=["not-base64", "no-comma", "bad-base64", "not-image", "small", "too-big"],
)
def test_bad_data_uris(tmp_path, uri, message):
    assert problems(write(tmp_path, one_job(f"'{uri}'"))) == [f"4:22: {J}.start_image_url: {message}"]


# --- the shared image rules -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP"])
def test_inspect_reads_the_size_from_the_first_bytes_only(fmt):
    big = Image.frombytes("RGB", (1200, 800), os.urandom(1200 * 800 * 3))  # noise: large files
    out = io.BytesIO()
    big.save(out, fmt)
    assert len(out.getvalue()) > imageinfo.HEADER_BYTES
    facts = imageinfo.inspect(out.getvalue()[: imageinfo.HEADER_BYTES])
    assert (facts.format, facts.width, facts.height, facts.accepted) == (fmt, 1200, 800, True)


def test_size_rules():
    assert imageinfo.size_problems(300, 750) == []
    assert imageinfo.size_problems(300, 751) == [
        "is 300x751 px, an aspect ratio of 1:2.50; Kling accepts from 1:2.5 to 2.5:1"]
    assert len(imageinfo.size_problems(100, 1000)) == 2
