"""Tests for batchrun.media: which first bytes are which media, and how the rest is described."""

from __future__ import annotations

import gzip
import io
import struct
import zlib

import pytest
from PIL import Image

from batchrun import media


def ftyp(brand: bytes, size: int = 24) -> bytes:
    return struct.pack(">I", size) + b"ftyp" + brand + b"\x00\x00\x02\x00" + b"isom" * ((size - 16) // 4)


def pillow(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, fmt)
    return out.getvalue()


def wav() -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8) + b"data\x00\x00\x00\x00"
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize(
    ("head", "name", "kinds"),
    [
        (ftyp(b"isom"), "mp4", {"video", "audio"}),
        (ftyp(b"mp42", 32), "mp4", {"video", "audio"}),
        (ftyp(b"qt  ", 20), "mov", {"video"}),
        (b"\x00\x00\x00\x08wide\x00\x10\x00\x00mdat", "mov", {"video"}),  # QuickTime without ftyp
        (b"\x00\x00\x03\xe8moov\x00\x00\x00\x6cmvhd", "mov", {"video"}),
        (ftyp(b"M4A "), "m4a", {"audio"}),
        (ftyp(b"avif"), "avif", {"image"}),
        (ftyp(b"heic"), "heif", {"image"}),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "webm", {"video", "audio"}),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "matroska", {"video", "audio"}),
        (pillow("PNG"), "png", {"image"}),
        (pillow("JPEG"), "jpeg", {"image"}),
        (pillow("GIF"), "gif", {"image", "video"}),
        (pillow("WEBP"), "webp", {"image"}),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "mp3", {"audio"}),
        (b"\xff\xfb\x90\x64\x00", "mp3", {"audio"}),
        (b"\xff\xf1\x50\x80\x00", "aac", {"audio"}),
        (wav(), "wav", {"audio"}),
        (b"OggS\x00\x02" + bytes(22), "ogg", {"audio", "video"}),
        (b"fLaC\x00\x00\x00\x22", "flac", {"audio"}),
    ],
)
def test_known_signatures(head, name, kinds):
    found = media.sniff(head[: media.HEAD_BYTES])
    assert found is not None and found.name == name and found.kinds == kinds
    for kind in media.KINDS:
        assert media.accepts(kind, head) == (kind in kinds)
    assert media.accepts(None, head)


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"<html><body><h1>This link has expired</h1></body></html>",
        b'{"error": "expired"}',
        b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>",
        b"\x00\x00\x00\x18ftyp",  # cut inside the first box
        b"\x00\x00\x00\x18ftyp\x00\x01\x02\x03",  # a brand that is not text
        b"\x00\x00\x00\x07ftypisom",  # a box size no ftyp can have
        b"\x00\x00\x00\x04moov",  # a box size no box can have
        b"\x89PNG",  # cut inside the signature
        b"\xff\xd8",
        b"RIFF\x00\x00\x00\x00JUNK",
        gzip.compress(ftyp(b"isom")),  # still encoded: not the video itself
        zlib.compress(ftyp(b"isom")),
        b"\xff\xff\xff\xff\xff",
        bytes(64),
    ],
)
def test_anything_else_is_not_media(head):
    assert media.sniff(head) is None
    assert not any(media.accepts(kind, head) for kind in (*media.KINDS, None))


@pytest.mark.parametrize(
    ("head", "content_type", "expected"),
    [
        (b"", None, "an empty body (0 bytes)"),
        (b"<!DOCTYPE html><html>expired</html>", "text/html", "an HTML page (35 bytes, Content-Type text/html): "),
        (b'{"error_code": 403}', "application/json", "JSON (19 bytes, Content-Type application/json): "),
        (b"<?xml version='1.0'?><Error/>", None, "an XML document (29 bytes): "),
        (b"\x00\x00\x00\x18ftyp", None, "a truncated or malformed container header (8 bytes): starts 00 00 00 18"),
        (pillow("PNG"), "video/mp4", "a PNG file ("),
    ],
)
def test_describe_says_what_was_received(head, content_type, expected):
    assert media.describe(head, len(head), content_type).startswith(expected)


def test_describe_is_capped_and_shows_no_control_characters():
    page = b"<html>\x1b[31mred\x07\r\n" + b"x" * 500 + b"</html>"
    text = media.describe(page[: media.HEAD_BYTES], len(page), "text/html\x1b[2J" + "y" * 300)
    assert len(text) < 200
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in text)
    assert "\\x1b" not in text and "?[31mred" in text


def _ends(data: bytes) -> int | None:
    return media.declared_end(lambda offset, n: data[offset : offset + n], len(data))


def test_an_mp4s_boxes_say_where_it_ends():
    ftyp = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
    moov = (8 + 100).to_bytes(4, "big") + b"moov" + bytes(100)
    mdat = (8 + 1000).to_bytes(4, "big") + b"mdat" + bytes(1000)
    whole = ftyp + moov + mdat
    assert _ends(whole) == len(whole)
    assert _ends(whole[:-1]) == len(whole)  # cut by one byte: the boxes still say the whole size
    assert _ends(whole[: len(ftyp) + 4]) == len(ftyp) + 8  # cut inside a box header
    large = (1).to_bytes(4, "big") + b"mdat" + (16 + 50).to_bytes(8, "big") + bytes(50)
    assert _ends(ftyp + large) == len(ftyp) + 66  # a 64-bit box size
    assert _ends(ftyp + large[:-10]) == len(ftyp) + 66
    to_end = (0).to_bytes(4, "big") + b"mdat" + bytes(77)
    assert _ends(ftyp + to_end) == len(ftyp) + 85  # size 0: the last box runs to the end, whatever it is


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n" + bytes(100), b"\x1a\x45\xdf\xa3" + bytes(100), b"",
                                  b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00\x00\x00\x04free"])
def test_files_whose_end_cannot_be_read_from_their_boxes_say_nothing(data):
    assert _ends(data) is None
