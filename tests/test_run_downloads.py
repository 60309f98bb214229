"""Whole runs against the sandbox whose storage host misbehaves: what the user sees (exit code, ledger, files,
the closing lines) when an output URL answers with something that is not the video, encodes it, changes it
between parts, ends it early, or points at a private address."""

from __future__ import annotations

import ipaddress
import json

import pytest
from helpers import FakeClock, assert_done, job, ledger_rows, mp4, results, run, sha256, write_manifest

from batchrun.ledger import Ledger, Output
from batchrun.outputhosts import HostPolicy
from batchrun.plan import RunOptions
from batchrun.sandbox import Faults, Sandbox

VIDEO = mp4(bytes(range(256)) * 40, b"mp42")
NEWER = mp4(bytes(range(255, -1, -1)) * 40, b"mp42")  # re-rendered: same size, other bytes
PAGE = b"<html><body><h1>This link has expired</h1></body></html>"


def left_behind(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("shot-1.mp4"))


async def test_an_expired_link_page_is_refreshed_until_the_video_comes(tmp_path):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    faults = Faults(not_media_downloads=2, not_media_body=PAGE)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=(clock := FakeClock())) as sandbox:
        outcome, _ = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 0
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert sandbox.faults_served["not_media"] == 2
        assert sandbox.calls["download"] == 3
        assert sandbox.posts_total == 1  # refreshed through the result call, never resubmitted


@pytest.mark.parametrize(
    ("body", "content_type", "received"),
    [
        (PAGE, "text/html", f"an HTML page ({len(PAGE)} bytes, Content-Type text/html)"),
        (b'{"error_code": 403001, "message": "expired"}', "application/json", "JSON (44 bytes"),
        (b"", "video/mp4", "an empty body (0 bytes, Content-Type video/mp4)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), "video/mp4", "a PNG file (48 bytes, Content-Type video/mp4)"),
    ],
)
async def test_a_body_that_is_never_the_video_leaves_the_job_downloading(tmp_path, body, content_type, received):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    faults = Faults(not_media_downloads=1000, not_media_body=body, not_media_type=content_type)
    async with Sandbox(video_bytes=VIDEO, faults=faults, clock=(clock := FakeClock())) as sandbox:
        outcome, said = await run(manifest, sandbox, clock=clock)
        assert outcome.exit_code == 1
        row = ledger_rows(out)["shot-1"]
        assert row["state"] == "downloading"
        assert row["error_kind"] == "not_media"
        assert received in row["error_message"] and "instead of a video" in row["error_message"]
        assert received in "\n".join(outcome.lines)  # the closing lines name what was received
        assert left_behind(out) == []  # nothing published as shot-1.mp4, no .part kept
        assert results(out)["shot-1"]["outputs"] == []
        assert sandbox.calls["download"] == 4  # the first URL and three refreshed ones

        sandbox.faults.not_media_downloads = 0  # the host is fixed: the next run collects the paid video
        again, _ = await run(manifest, sandbox, clock=clock)
        assert again.exit_code == 0
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert sandbox.posts_total == 1


async def test_an_error_page_accepted_by_an_older_batchrun_is_fetched_again(tmp_path):
    manifest = write_manifest(tmp_path, [job("shot-1"), job("shot-2")])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO) as sandbox:
        first, _ = await run(manifest, sandbox)
        assert first.exit_code == 0
        # What batchrun 0.1 recorded for a 56-byte "link expired" page: done, size and sha256 of the page.
        (out / "shot-1.mp4").write_bytes(PAGE)
        ledger = Ledger.open(out)
        ledger.mark_done("shot-1", [Output(0, "shot-1.mp4", len(PAGE), sha256(PAGE))])
        ledger.close()

        again, said = await run(manifest, sandbox)
        assert "1 to download" in said and "1 already done" in said  # not "already done"
        assert again.exit_code == 0
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert sandbox.posts_total == 2


async def test_a_gzip_encoded_video_is_decoded_and_kept(tmp_path):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(download_encoding="gzip")) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert_done(out, results(out)["shot-1"], VIDEO)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_cut_encoded_download_starts_over_and_completes(tmp_path, encoding):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    faults = Faults(download_encoding=encoding, cut_downloads=1, cut_after_bytes=200)
    async with Sandbox(video_bytes=VIDEO, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert sandbox.faults_served["cut"] == 1


@pytest.mark.parametrize("ignore_if_range", [False, True])
async def test_a_video_replaced_between_parts_is_not_stitched(tmp_path, ignore_if_range):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    faults = Faults(cut_downloads=1, cut_after_bytes=4096, replace_video_after=1, replacement_video=NEWER,
                    ignore_if_range=ignore_if_range)
    async with Sandbox(video_bytes=VIDEO, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert_done(out, results(out)["shot-1"], NEWER)  # the whole new file, not 4 KiB of the old one + the rest


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_download_that_ends_early_is_resumed_not_accepted(tmp_path, framing):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    faults = Faults(cut_downloads=1, cut_after_bytes=4096, cut_framing=framing)
    async with Sandbox(video_bytes=VIDEO, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert sandbox.calls["download"] == 2


def only_127_0_0_1(address) -> bool:
    """The sandbox on 127.0.0.1 plays a public API and storage host; every other address is what it is."""
    return address == ipaddress.ip_address("127.0.0.1")


@pytest.mark.parametrize(
    ("faults", "policy", "refused", "fetched"),
    [
        (Faults(), HostPolicy, "127.0.0.1, a loopback address", 0),
        (Faults(output_host="[::1]"), HostPolicy, "::1, a loopback address", 0),
        (Faults(output_host="localhost"), HostPolicy, "localhost resolves to", 0),
        (Faults(output_host="10.0.0.7"), HostPolicy, "10.0.0.7, a private address", 0),
        (Faults(redirect_downloads_to="http://127.0.0.2:9"), lambda: HostPolicy(allowed=only_127_0_0_1),
         "redirected to http://127.0.0.2:9/files/", 1),
        (Faults(redirect_downloads_to="http://169.254.169.254"), lambda: HostPolicy(allowed=only_127_0_0_1),
         "169.254.169.254, a link-local address", 1),
    ],
)
async def test_output_urls_on_private_addresses_are_refused_when_the_api_is_public(tmp_path, faults, policy,
                                                                                     refused, fetched):
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=faults) as sandbox:
        outcome, said = await run(manifest, sandbox, options=RunOptions(output_hosts=policy()))
        assert outcome.exit_code == 1
        row = ledger_rows(out)["shot-1"]
        assert row["state"] == "downloading"
        assert row["error_kind"] == "url_refused"
        assert refused in row["error_message"]
        assert "refused because the API is not on a private network" in row["error_message"]
        assert sandbox.calls["download"] == fetched  # nothing fetched from the refused address
        assert left_behind(out) == []
        assert sandbox.posts_total == 1


async def test_the_sandbox_on_loopback_may_serve_its_outputs_there(tmp_path):
    """No policy given: the API base is itself loopback, so outputs on loopback are expected."""
    manifest = write_manifest(tmp_path, [job("shot-1")])
    out = tmp_path / "out"
    async with Sandbox(video_bytes=VIDEO, faults=Faults(output_host="localhost")) as sandbox:
        outcome, said = await run(manifest, sandbox)
        assert outcome.exit_code == 0, said
        assert_done(out, results(out)["shot-1"], VIDEO)
        assert json.loads((out / "shot-1.json").read_text())["outputs"][0]["bytes"] == len(VIDEO)
