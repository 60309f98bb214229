"""Tests for batchrun.contentcoding: bodies a storage host encoded although identity was asked for."""

from __future__ import annotations

import gzip
import random
import zlib

import pytest

from batchrun.contentcoding import BodyDecoder, decoder_for
from batchrun.errors import DownloadError

DATA = random.Random(3).randbytes(8_000) + bytes(8_000)
ENCODED = {
    "gzip": gzip.compress(DATA),
    "x-gzip": gzip.compress(DATA),
    "deflate": zlib.compress(DATA),
    "raw deflate": zlib.compress(DATA)[2:-4],
    "two gzip members": gzip.compress(DATA[:7]) + gzip.compress(DATA[7:]),
}


def decode(encoding: str, body: bytes, step: int) -> tuple[bytes, bool]:
    decoder = decoder_for(encoding, "https://cdn.example/v.mp4")
    out = b"".join(block for i in range(0, len(body), step) for block in decoder.feed(body[i : i + step]))
    return out, decoder.finished


@pytest.mark.parametrize("how", ENCODED)
@pytest.mark.parametrize("step", [1, 7, 65_536])
def test_decodes_whatever_the_chunking(how, step):
    encoding = how.split()[-1].replace("members", "gzip")
    assert decode(encoding, ENCODED[how], step) == (DATA, True)


@pytest.mark.parametrize("how", ["gzip", "deflate"])
def test_a_stream_cut_short_is_not_finished(how):
    out, finished = decode(how, ENCODED[how][:-30], 4096)
    assert not finished and DATA.startswith(out)


def test_a_small_body_cannot_balloon_in_memory():
    bomb = zlib.compress(bytes(16 * 1024 * 1024), 9)  # 16 MiB of zeros in ~16 KiB
    decoder = BodyDecoder("deflate", "https://cdn.example/v.mp4")
    sizes = [len(block) for block in decoder.feed(bomb)]
    assert max(sizes) <= 1024 * 1024 and sum(sizes) == 16 * 1024 * 1024


def test_bytes_that_do_not_decode_are_a_download_error():
    with pytest.raises(DownloadError, match="v.mp4 sent a gzip body that does not decode"):
        decode("gzip", b"\x1f\x8b\x08\x00garbage-garbage-garbage", 4096)


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, gzip", "x\x1b[2J"])
def test_other_encodings_are_refused_by_name(encoding):
    with pytest.raises(DownloadError, match="cannot decode: ") as caught:
        BodyDecoder(encoding, "https://cdn.example/v.mp4")
    assert "\x1b" not in str(caught.value)


def test_identity_needs_no_decoder():
    assert decoder_for(None, "u") is None and decoder_for("identity", "u") is None
