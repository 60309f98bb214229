"""Decoding a response body sent with a Content-Encoding although identity was asked for (a storage object
kept with `Content-Encoding: gzip` metadata is served that way whatever the client asks).

gzip (also `x-gzip`, and several gzip members one after another) and deflate (zlib-wrapped, as RFC 9110
says, or raw, as some servers send it) are decoded with the standard library. Other encodings (br, zstd,
compress) are refused with their name: no dependency is added for what no storage host was seen sending.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from .errors import DownloadError

__all__ = ["BodyDecoder", "decoder_for"]

_BLOCK = 1024 * 1024


class BodyDecoder:
    """Decodes one encoded body as it streams. `feed(chunk)` yields decoded blocks of at most 1 MiB each, so
    a small compressed body cannot balloon in memory (the caller applies its size cap as blocks come);
    `finished` is True once the encoded stream's end was read (for gzip, its CRC and length checked), which is
    what says the body is whole.

    Raises DownloadError (naming `where`) for an encoding it does not decode and for bytes that do not decode.
    """

    def __init__(self, encoding: str, where: str):
        if encoding not in ("gzip", "x-gzip", "deflate"):
            shown = "".join(ch if ch.isprintable() else "?" for ch in encoding[:40])
            raise DownloadError(f"{where} sent a body in an encoding batchrun cannot decode: {shown}")
        self.encoding = encoding
        self.where = where
        self._z = None
        self._pending = b""  # the first byte of a deflate body, until the second tells zlib from raw
        self._ended = False

    @property
    def finished(self) -> bool:
        return self._ended

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            yield from self._feed(data)
        except zlib.error as exc:
            raise DownloadError(f"{self.where} sent a {self.encoding} body that does not decode: {exc}") from None

    def _feed(self, data: bytes) -> Iterator[bytes]:
        if self._pending:
            data, self._pending = self._pending + data, b""
        while data:
            if self._z is None or self._z.eof:
                if self._ended and self.encoding == "deflate":
                    return  # bytes after the end of a deflate stream: nothing more to decode
                if self.encoding == "deflate" and len(data) < 2:
                    self._pending = data
                    return
                self._z = zlib.decompressobj(self._wbits(data))
                self._ended = False
            out = self._z.decompress(data, _BLOCK)
            while True:
                yield out
                if not self._z.unconsumed_tail:
                    break
                out = self._z.decompress(self._z.unconsumed_tail, _BLOCK)
            if self._z.eof:
                self._ended = True
                data = self._z.unused_data  # another gzip member may follow
            else:
                data = b""

    def _wbits(self, first: bytes) -> int:
        if self.encoding != "deflate":
            return 16 + zlib.MAX_WBITS
        # A zlib header: compression method 8 and a check value making the first two bytes a multiple of 31.
        if first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0:
            return zlib.MAX_WBITS
        return -zlib.MAX_WBITS


def decoder_for(encoding: str | None, where: str) -> BodyDecoder | None:
    """A decoder for a Content-Encoding (None or identity: no decoder)."""
    return BodyDecoder(encoding, where) if encoding and encoding != "identity" else None
