"""Where each manifest's ledgers are, whatever the current directory: a small per-user index.

The default output dir, `output/<manifest stem>`, is relative to the current directory (SPEC), so the
same manifest run from another directory would start a second ledger and pay for every job again.
Each run records `manifest's real path -> output dir` in
`$XDG_STATE_HOME/batchrun/ledgers.json` (default `~/.local/state/batchrun/ledgers.json`):

    {"version": 1, "manifests": {"/home/u/proj/campaign.yaml": [{"output": "/home/u/proj/output/campaign",
                                                                  "recorded_at": "2026-11-29T12:00:00.000Z"}]}}

`run` refuses to start a new ledger for a manifest that has one elsewhere (`check_new_ledger`), and
`status`, `plan`, `export`, `report` and `cancel` read the existing one (`locate`). The index is a
safety net, never the record: entries whose ledger is gone are ignored and pruned, an unreadable
index is set aside and started again, and a run whose index cannot be written still runs (with a
warning). Writers hold `ledgers.lock` (flock) and replace the file atomically.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from batchrun.errors import UsageError
from batchrun.fsutil import atomic_write
from batchrun.ledger import LEDGER_NAME, utc_now
from batchrun.manifest import Manifest

log = logging.getLogger("batchrun")

INDEX_NAME = "ledgers.json"
LOCK_NAME = "ledgers.lock"
MAX_INDEX_BYTES = 16 * 1024 * 1024  # far past any real index; a bigger file is not ours


def state_dir(environ: Mapping[str, str]) -> Path | None:
    """batchrun's folder under the XDG state dir; None when there is no home to put it in.

    A relative `XDG_STATE_HOME` is ignored, as the XDG spec says."""
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "batchrun"
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        try:
            home = str(Path.home())
        except (KeyError, RuntimeError):
            return None
    return Path(home) / ".local" / "state" / "batchrun"


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _has_ledger(output_dir: str | Path) -> bool:
    return os.path.isfile(os.path.join(output_dir, LEDGER_NAME))


def _last_used(output_dir: str) -> float:
    """When the ledger was last written (WAL mode writes the -wal file first)."""
    times = []
    for name in (LEDGER_NAME, f"{LEDGER_NAME}-wal"):
        try:
            times.append(os.stat(os.path.join(output_dir, name)).st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


class LedgerIndex:
    """The index file in `directory` (None: no index, nothing is found or recorded)."""

    def __init__(self, directory: Path | None):
        self.directory = directory

    @classmethod
    def for_user(cls, environ: Mapping[str, str] | None = None) -> LedgerIndex:
        return cls(state_dir(os.environ if environ is None else environ))

    @property
    def path(self) -> Path | None:
        return self.directory / INDEX_NAME if self.directory else None

    def _read(self) -> dict[str, list[dict]] | None:
        """The manifests' entries; {} when there is no index, None when it is unreadable."""
        path = self.path
        if path is None:
            return {}
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                data = json.loads(handle.read(MAX_INDEX_BYTES + 1).decode("utf-8"))
        except (OSError, ValueError):
            return None
        manifests = data.get("manifests") if isinstance(data, dict) else None
        if not isinstance(manifests, dict):
            return None
        return {key: [e for e in entries if isinstance(e, dict) and isinstance(e.get("output"), str)]
                for key, entries in manifests.items() if isinstance(entries, list)}

    def ledgers_of(self, manifest_path: Path) -> list[Path]:
        """Output dirs holding a ledger of this manifest, most recently used first.

        Besides the index, `<manifest's folder>/output/<stem>` counts: where a run from the manifest's
        own folder puts it, so ledgers made before the index existed are found too."""
        entries = (self._read() or {}).get(_real(manifest_path), [])
        found = [entry["output"] for entry in entries]
        found.append(_real(manifest_path.parent / "output" / manifest_path.stem))
        unique = [d for d in dict.fromkeys(found) if _has_ledger(d)]
        return [Path(d) for d in sorted(unique, key=_last_used, reverse=True)]

    def record(self, manifest_path: Path, output_dir: Path) -> None:
        """Note that `output_dir` holds a ledger of this manifest. Never raises: it warns instead."""
        if self.directory is None:
            log.warning("no home directory: the ledger of %s is not indexed, so a run of it from another "
                        "directory will not find it", manifest_path)
            return
        key, output = _real(manifest_path), _real(output_dir)
        known = self._read()
        if known is not None and any(e["output"] == output for e in known.get(key, [])):
            return
        try:
            self._update(key, output)
        except OSError as exc:
            log.warning("could not record this ledger in %s (%s): a run of %s from another directory will not "
                        "find it", self.path, exc.strerror or exc, manifest_path)

    def _update(self, key: str, output: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # other runs hold it for a few milliseconds at most
            manifests = self._read()
            if manifests is None:
                aside = self.path.with_name(INDEX_NAME + ".unreadable")
                log.warning("%s was unreadable; set aside as %s and started again", self.path, aside.name)
                os.replace(self.path, aside)
                manifests = {}
            entries = [e for e in manifests.get(key, []) if e["output"] != output]
            manifests[key] = entries + [{"output": output, "recorded_at": utc_now()}]
            # Prune what no longer points at a ledger (a deleted output dir, a test's temporary folder).
            manifests = {k: live for k, v in manifests.items() if (live := [e for e in v if _has_ledger(e["output"])])}
            data = json.dumps({"version": 1, "manifests": manifests}, indent=1, sort_keys=True).encode("utf-8")
            atomic_write(self.path, data, 0o600)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Located:
    output_dir: Path  # where the ledger to read is
    note: str | None  # what to tell the user when that is not the manifest's own output dir


def _elsewhere(manifest: Manifest, index: LedgerIndex) -> list[Path]:
    here = _real(manifest.output_dir)
    return [d for d in index.ledgers_of(manifest.path) if _real(d) != here]


def locate(manifest: Manifest, index: LedgerIndex) -> Located:
    """The output dir whose ledger `status`, `plan`, `export`, `report` and `cancel` read for a manifest:
    its own, unless it has no ledger there and the manifest's default dir (not one the user named)
    holds none while another does."""
    if manifest.output_explicit or _has_ledger(manifest.output_dir):
        return Located(manifest.output_dir, None)
    found = _elsewhere(manifest, index)
    if not found:
        return Located(manifest.output_dir, None)
    note = (f"reading the ledger in {found[0]}, where {manifest.path.name} last ran (from this directory its "
            f"default output dir would be {manifest.output_dir}, which holds none)")
    if len(found) > 1:
        note += "; it also has ledgers in " + ", ".join(map(str, found[1:])) + " (name one with --output)"
    return Located(found[0], note)


def check_new_ledger(manifest: Manifest, index: LedgerIndex, *, new_output: bool = False) -> None:
    """Refuse (UsageError: exit 2, nothing sent, nothing created) a run that would start a new ledger in the
    default output dir for a manifest whose ledger is elsewhere, unless the user named the dir
    (`--output`, `output:`) or asked for a new ledger (`--new-output`)."""
    if manifest.output_explicit or new_output or _has_ledger(manifest.output_dir):
        return
    found = _elsewhere(manifest, index)
    if not found:
        return
    others = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    default_from = found[0].parent.parent if found[0].parts[-2:] == ("output", manifest.path.stem) else None
    there = f" (or run from {default_from})" if default_from else ""
    raise UsageError(
        f"{manifest.path} already has a ledger in {found[0]}{others}, but from this directory its default output "
        f"dir is {manifest.output_dir}: a run here would start a new ledger and pay for its jobs again. "
        f"Nothing was sent. To resume: add --output {found[0]}{there}; "
        "to start a separate ledger here anyway: add --new-output")
