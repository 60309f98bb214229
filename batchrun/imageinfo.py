"""What an image is and whether Kling accepts its size, from its first bytes.

Used for local files, `data:` URIs and the preflight of image URLs alike, so all three apply the same
rules. The format comes from the magic bytes; the dimensions from the header alone, read by the
`imagesize` package: it is pure Python, reads only the header (no pixel decoding, no pixel buffer, so no
decompression bombs), and works on a partial download, which Pillow does not for WebP.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

# The formats Kling accepts as start images, and the MIME type each is sent with.
ACCEPTED = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "WEBP": "image/webp"}
ACCEPTED_TEXT = "jpg, png, bmp or webp"
# Kling's limits on an input image, as relayed by other providers of its API.
MIN_SIDE = 300
MAX_ASPECT = 2.5
# How much of a file the header checks need: JPEG headers can sit behind large EXIF blocks.
HEADER_BYTES = 64 * 1024

_BMP_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


@dataclass(frozen=True)
class ImageFacts:
    """`format` is a name such as "PNG" (ACCEPTED), another recognised kind ("GIF", "HTML"), or None."""

    format: str | None
    width: int | None = None
    height: int | None = None

    @property
    def accepted(self) -> bool:
        return self.format in ACCEPTED

    @property
    def mime(self) -> str | None:
        return ACCEPTED.get(self.format or "")


def sniff(data: bytes) -> str | None:
    """The kind of file `data` starts with, from its magic bytes."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM") and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIC"
        return "MP4"
    if data.startswith(b"%PDF"):
        return "PDF"
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if text.startswith(b"<svg") or text.startswith(b"<?xml") and b"<svg" in text:
        return "SVG"
    return None


def inspect(data: bytes) -> ImageFacts:
    """Format and, where the header is in `data`, dimensions. `data` may be the start of a file."""
    kind = sniff(data)
    if kind not in ACCEPTED:
        return ImageFacts(kind)
    import imagesize  # imported on first use: most manifests hold only URLs

    # Stored dimensions (no EXIF rotation): Kling's rules do not depend on orientation.
    width, height = imagesize.get(io.BytesIO(data), exif_rotation=False)
    if width < 0 or height < 0:  # imagesize's "unknown"
        return ImageFacts(kind)
    if kind == "WEBP" and data[12:16] == b"VP8 ":  # lossy WebP: the top 2 bits of each are a scale
        width, height = width & 0x3FFF, height & 0x3FFF
    return ImageFacts(kind, width, height)


def describe_other(kind: str | None) -> str:
    """What to say about a file that is not an image Kling accepts, to follow its subject ("'a.gif' ...")."""
    if kind is None:
        return f"is not an image ({ACCEPTED_TEXT})"
    if kind == "HTML":
        return "is a web page (HTML), not an image"
    if kind == "MP4":
        return f"is a video or other media file, not an image ({ACCEPTED_TEXT})"
    return f"is a {kind} image; Kling accepts {ACCEPTED_TEXT}"


def size_problems(width: int, height: int, min_side: int | None = MIN_SIDE, max_aspect: float | None = MAX_ASPECT,
                  who: str = "Kling") -> list[str]:
    """A model's limits on an image's size (Kling's by default: each side at least 300 px, aspect ratio
    within 1:2.5 and 2.5:1; None: no such limit); `who` names the model in the messages.

    Each message follows its subject, such as "'cliff.png' is 200x200 px; ...".
    """
    problems = []
    if min_side is not None and min(width, height) < min_side:
        problems.append(f"is {width}x{height} px; {who} needs each side to be at least {min_side} px")
    long, short = max(width, height), min(width, height)
    if max_aspect is not None and short > 0 and long > short * max_aspect:
        ratio = f"{width / height:.2f}:1" if width >= height else f"1:{height / width:.2f}"
        problems.append(f"is {width}x{height} px, an aspect ratio of {ratio}; {who} accepts "
                        f"from 1:{max_aspect:g} to {max_aspect:g}:1")
    return problems


def format_problems(facts: ImageFacts) -> list[str]:
    """Why an image with these facts is not one batchrun can send at all (its format), whatever the model."""
    return [] if facts.accepted else [describe_other(facts.format)]


def image_problems(facts: ImageFacts) -> list[str]:
    """Every reason Kling would refuse an image with these facts (its size only when known), each a
    predicate to follow its subject: "is a GIF image; ...", "is 200x200 px; ..."."""
    if not facts.accepted:
        return [describe_other(facts.format)]
    if facts.width is None or facts.height is None:
        return []
    return size_problems(facts.width, facts.height)
