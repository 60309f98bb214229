"""`status` reads the integrity check, the counts and the identity mismatches on a second connection
while it stats the files (batchrun.sidereads). What a user must not notice: a damaged ledger is refused
before anything is shown, exactly as before; a run that commits between the two connections' snapshots
does not mix two moments of the ledger. Real runs against the sandbox on loopback, real SQLite files."""

from __future__ import annotations

import json
import sqlite3

from helpers import cli, finished_run

from batchrun.ledger import LEDGER_NAME, Ledger
from batchrun.sidereads import SideReads


def _edit_ledger(out, sql: str) -> None:
    conn = sqlite3.connect(out / LEDGER_NAME)
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()


def _page_of(out, table: str) -> int:
    conn = sqlite3.connect(out / LEDGER_NAME)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    finally:
        conn.close()


async def test_status_of_a_ledger_with_a_damaged_page_says_so_and_shows_nothing_read(tmp_path):
    manifest, out = await finished_run(tmp_path, 40)
    # A page status does not read when every job is done and intact (the request history): only the
    # integrity check can find it.
    page = _page_of(out, "requests")
    path = out / LEDGER_NAME
    data = bytearray(path.read_bytes())
    start = (page - 1) * 4096
    data[start:start + 12] = b"\xff" * 12  # its b-tree page header
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    for argv in (["status", str(manifest)], ["status", str(out)], ["status", str(manifest), "--json"]):
        code, stdout, stderr = await cli(argv)
        assert code == 2, (argv, stderr)
        assert "is not a usable batchrun ledger" in stderr and "Traceback" not in stderr
        assert stdout == ""
    assert path.read_bytes() == before  # left untouched


async def test_a_commit_between_the_two_snapshots_is_read_again_in_the_main_one(tmp_path):
    manifest, out = await finished_run(tmp_path, 4)
    ledger = Ledger.open(out, create=False, readonly=True, check=False)
    try:
        side = SideReads(out).result()  # its snapshot: four done jobs, nothing edited
        assert side.mismatches == [] and [row[1:4] for row in side.tally] == [("done", None, 4)]
        with ledger.snapshot():
            same = ledger.change_count()
            assert side.mismatches_at(ledger, same) is side.mismatches and side.tally_at(ledger, same) is side.tally
        # A commit after the side's snapshot and before the main one's (as a run or a hand edit makes).
        _edit_ledger(out, "UPDATE jobs SET request_id = 'edited', state = 'failed' WHERE id = 'clip-02'")
        _edit_ledger(out, "UPDATE jobs SET request_id = 'edited' WHERE id = 'clip-03'")
        with ledger.snapshot():
            changes = ledger.change_count()
            assert changes != side.changes
            assert [job_id for job_id, _ in side.mismatches_at(ledger, changes)] == ["clip-03"]
            now = sorted(row[1:4] for row in side.tally_at(ledger, changes))
            assert now == [("done", None, 3), ("failed", None, 1)]
    finally:
        ledger.close()
    code, stdout, stderr = await cli(["status", str(manifest), "--json"])
    report = json.loads(stdout)
    assert report["counts"] == {"done": 3, "failed": 1}
    assert report["damaged"] == [{"id": "clip-03", "path": "clip-03.json", "problem": "damaged"}]


async def test_status_of_a_ledger_whose_first_read_fails_says_so(tmp_path):
    # Its header damaged (the schema's own bytes), or the change count's table gone: the very first read,
    # before the integrity check has started, is the one that fails.
    for damage in ("header", "table"):
        (tmp_path / damage).mkdir()
        manifest, out = await finished_run(tmp_path / damage, 3)
        if damage == "table":
            _edit_ledger(out, "DROP TABLE ledger_changes")
        else:
            _page_of(out, "jobs")  # folds the WAL into the file
            path = out / LEDGER_NAME
            data = bytearray(path.read_bytes())
            data[100:116] = bytes(b ^ 0x5A for b in data[100:116])
            path.write_bytes(bytes(data))
        for argv in (["status", str(manifest)], ["status", str(out), "--json"]):
            code, stdout, stderr = await cli(argv)
            assert code == 2, (damage, argv, stderr)
            assert "is not a usable batchrun ledger" in stderr and "Traceback" not in stderr
            assert stdout == ""
