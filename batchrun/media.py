"""What a downloaded output holds, told from its first bytes (its container signature), whatever the
storage host's Content-Type claims.

A small table of magic numbers rather than a library such as `filetype` or `puremagic`: batchrun needs a
strict yes or no per output kind (video, image, audio), where the ISO-BMFF brand decides between a video
(mp4, mov), an audio file (m4a) and an image (HEIF, AVIF); the whole table is below, is tested byte for
byte, and cannot change under us with another library's release. Sources: ISO/IEC 14496-12 (ftyp box),
the EBML/Matroska spec, the PNG, JPEG, GIF, RIFF (WebP, WAV, AVI), Ogg, FLAC and MPEG audio frame headers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HEAD_BYTES", "KINDS", "Container", "accepts", "declared_end", "describe", "printable", "sniff"]

HEAD_BYTES = 64  # every signature below is decided within the first 64 bytes
KINDS = ("video", "image", "audio")

_QUICKTIME_BOXES = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


@dataclass(frozen=True)
class Container:
    """A recognised file format: its short `name` ("mp4", "png"...) and the output kinds it can hold."""

    name: str
    kinds: frozenset[str]


def _c(name: str, *kinds: str) -> Container:
    return Container(name, frozenset(kinds))


def sniff(head: bytes) -> Container | None:
    """The container whose signature `head` (the file's first bytes, ideally HEAD_BYTES of them) starts
    with, or None when it is none of them (a web page, JSON, an empty or truncated file...)."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return _iso_bmff(head)
    if len(head) >= 8 and head[4:8] in _QUICKTIME_BOXES and struct.unpack(">I", head[:4])[0] not in range(2, 8):
        return _c("mov", "video")  # a QuickTime file from before ftyp opens with one of these boxes
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML
        return _c("webm" if b"webm" in head[:HEAD_BYTES] else "matroska", "video", "audio")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _c("png", "image")
    if head.startswith(b"\xff\xd8\xff"):
        return _c("jpeg", "image")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _c("gif", "image", "video")  # an animated GIF is a video output of some models
    if len(head) >= 12 and head.startswith(b"RIFF"):
        return {b"WEBP": _c("webp", "image"), b"WAVE": _c("wav", "audio"), b"AVI ": _c("avi", "video")}.get(head[8:12])
    if head.startswith(b"OggS\x00"):
        return _c("ogg", "audio", "video")
    if head.startswith(b"fLaC"):
        return _c("flac", "audio")
    if head.startswith(b"ID3") and len(head) >= 10 and head[3] < 0xFF:
        return _c("mp3", "audio")
    if len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        if layer:  # MPEG audio frame sync (mp3 is layer III)
            return _c("mp3", "audio") if (head[2] >> 4) != 0xF else None
        if head[1] & 0x16 == 0x10:  # ADTS (AAC): layer bits 00
            return _c("aac", "audio")
    return None


def _iso_bmff(head: bytes) -> Container | None:
    """An ftyp box: 32-bit size (16 bytes or more, a multiple of 4), 'ftyp', a printable major brand."""
    size = struct.unpack(">I", head[:4])[0]
    brand = head[8:12]
    if size < 16 or size % 4 or size > 4096 or not all(0x20 <= b <= 0x7E for b in brand):
        return None
    if brand in _AUDIO_BRANDS:
        return _c("m4a", "audio")
    if brand in _IMAGE_BRANDS:
        return _c("heif" if brand.startswith((b"he", b"mif", b"msf")) else "avif", "image")
    if brand == b"qt  ":
        return _c("mov", "video")
    return _c("mp4", "video", "audio")


def declared_end(read_at: Callable[[int, int], bytes], size: int, max_boxes: int = 100_000) -> int | None:
    """Where an ISO-BMFF file (mp4, mov, m4a) says it ends, from its top-level box sizes: each box starts
    with a 32-bit size (1: a 64-bit size follows; 0: to the end of the file) and a 4-byte type.

    `read_at(offset, n)` reads the file's bytes; `size` is how many it has. Returns the end the boxes
    declare (more than `size` for a file cut short), or None when the file is not ISO-BMFF or its boxes
    cannot be walked (then nothing is known). Used for a body that came without a length, whose end is
    otherwise only where the connection closed (ISO/IEC 14496-12, 4.2)."""
    head = read_at(0, 16)
    if len(head) < 16 or head[4:8] != b"ftyp" or _iso_bmff(head) is None:
        return None
    offset = 0
    for _ in range(max_boxes):
        if offset >= size:
            return offset
        header = read_at(offset, 16)
        if len(header) < 8:
            return offset + 8  # a box header cut short
        box = struct.unpack(">I", header[:4])[0]
        if box == 0:
            return size  # the last box runs to the end of the file, whatever that is
        if box == 1:
            if len(header) < 16:
                return offset + 16
            box = struct.unpack(">Q", header[8:16])[0]
            if box < 16:
                return None
        elif box < 8:
            return None
        offset += box
    return None


def accepts(kind: str | None, head: bytes) -> bool:
    """True when `head` starts a file of output kind `kind` ("video", "image", "audio"), or, with None,
    of any of them."""
    container = sniff(head)
    return container is not None and (kind is None or kind in container.kinds)


def describe(head: bytes, size: int, content_type: str | None = None) -> str:
    """What a file that failed `accepts` is, for an error message: e.g. ``an HTML page (56 bytes,
    Content-Type text/html): '<html>...'``. Capped in length, with control characters shown as '?'."""
    container = sniff(head)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if size == 0:
        what = "an empty body"
    elif container is not None:
        what = f"{'an' if container.name in _AN else 'a'} {container.name.upper()} file"
    elif text.startswith(b"<?xml") or text.startswith(b"<error"):
        what = "an XML document"
    elif text.startswith(b"<"):
        what = "an HTML page"
    elif text.startswith((b"{", b"[")):
        what = "JSON"
    elif head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "text"
    elif _truncated_signature(head):
        what = "a truncated or malformed container header"
    else:
        what = "unrecognised data"
    details = f"{size} bytes"
    if content_type:
        details += f", Content-Type {printable(content_type, 60)}"
    if not head or container is not None:
        preview = ""
    elif what in ("an HTML page", "an XML document", "JSON", "text"):
        preview = f": {printable(head.decode('utf-8', 'replace'), 60)!r}"
    else:
        preview = f": starts {head[:16].hex(' ')}"
    return f"{what} ({details}){preview}"


_AN = {"mp4", "mp3", "m4a", "avi", "aac", "ogg", "avif"}  # "an MP4 file", as read aloud
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"OggS", b"fLaC", b"\x1a\x45\xdf\xa3", b"ID3")


def _truncated_signature(head: bytes) -> bool:
    """A file cut inside a signature, or an ftyp box whose fields do not hold up."""
    if head[4:8] == b"ftyp" or (4 < len(head) < 8 and b"ftyp".startswith(head[4:])):
        return True
    return any(len(head) < len(sig) and sig.startswith(head) for sig in _SIGNATURES)


def printable(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (ending "..." when cut), each non-printable one shown as '?'."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
