"""The validated-manifest cache: a manifest that is unchanged since it last loaded without errors is not
parsed and validated again (4 s at 100,000 jobs); its validated result is read back instead.

The result is used only when everything it was made from is unchanged:

- the *key* (the cache file's name) covers batchrun's version and code (every source and shipped model
  file, by path, size and times: an edit changes its ctime), the interpreter, the installed packages'
  versions (the YAML parser, jsonschema), the current directory, the manifest path as given and as
  resolved (relative paths in it resolve against its folder; messages show it as given), and the
  environment the load reads (``BATCHRUN_MODELS``, ``HOME`` for ``~`` in ``models_dir``);
- the *stamp* in the file lists every file the load read (`batchrun.readlog`): the manifest, its
  ``jobs_from:`` file and the user folder's model files must still have the same identity, size, mtime
  and ctime *and* the same SHA-256 of their bytes; each local image the same identity, size, mtime and
  ctime (and its SHA-256 too if it had changed less than 2 s before it was read; in any case it is hashed
  again when its job is submitted, and a changed one is refused then), with its path still resolving to
  the same file; the models folder the same list of files.

Anything else is a full load, which writes the cache again. `--output` and the default output dir (which
depends on the current directory) are applied afresh on every load. Warnings are part of the result, so
a hit shows the same ones; a manifest with errors is never written.

The file: a format line, the length of a header, the header (key, stamp, SHA-256 and length of the body)
and the body (the manifest as plain tuples, dicts and strings), both in `marshal` format, which holds
only plain data and, unlike pickle, never runs code when read. The body's digest is checked before it is
read; any doubt (wrong format, key or shape, truncated, planted) means a full load. The cache lives in
``$XDG_CACHE_HOME/batchrun/manifests`` (else ``~/.cache/...``), mode 0700, the most recent `KEEP` files;
it is written atomically without fsync (a torn file fails its digest), and a failure to write it is only
logged.
``BATCHRUN_MANIFEST_CACHE=off`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import marshal
import os
import stat
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from batchrun import __version__, readlog
from batchrun.errors import Problem
from batchrun.fsutil import atomic_write
from batchrun.localfiles import LocalImage
from batchrun.models import ENV_VAR as MODELS_ENV_VAR
from batchrun.models import Model, Price
from batchrun.settings import Settings

log = logging.getLogger("batchrun")

ENV_VAR = "BATCHRUN_MANIFEST_CACHE"
OFF_VALUES = ("off", "0", "no", "false")
FORMAT = b"batchrun validated manifest 1\n"
SUFFIX = ".manifest"
KEEP = 8  # cache files kept; a 100,000-job manifest's is about 25 MB
MAX_HEADER_BYTES = 64 * 1024 * 1024
RACY_NS = 2_000_000_000  # a file changed less than this before it was read is hashed on every hit too
STALE_TEMP_SECONDS = 3600.0  # a temporary file older than this was left by a killed write


def enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_VAR, "").strip().lower() not in OFF_VALUES


def in_use(environ: Mapping[str, str] | None = None) -> bool:
    """Whether loads read and write the cache: it is not turned off and there is a folder for it."""
    environ = os.environ if environ is None else environ
    return enabled(environ) and cache_dir(environ) is not None


def cache_dir(environ: Mapping[str, str]) -> Path | None:
    """``$XDG_CACHE_HOME/batchrun/manifests``, else ``$HOME/.cache/batchrun/manifests``; None without a home.
    A relative `XDG_CACHE_HOME` is ignored, as the XDG spec says."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "batchrun" / "manifests"
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        return None
    return Path(home) / ".cache" / "batchrun" / "manifests"


# --- the key -------------------------------------------------------------------------------------


@functools.cache
def _code_stamp() -> str:
    """Changes when any of batchrun's files (source, shipped model files) or the installed packages do."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".json")):
                where = os.path.join(folder, name)
                info = os.stat(where)
                digest.update(f"{where}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\n".encode())
    # The dist-info folders next to the YAML parser and jsonschema name every installed version. Found, not
    # imported: a command that reads a cached manifest never runs jsonschema (a 60 ms import).
    for name in ("yaml", "jsonschema"):
        spec = importlib.util.find_spec(name)
        origin = (spec.origin if spec is not None else None) or name
        site = os.path.dirname(os.path.dirname(os.path.abspath(origin)))
        try:
            names = sorted(n for n in os.listdir(site) if n.endswith(".dist-info"))
        except OSError:
            names = [origin]
        digest.update(("\n".join(names) + "\n").encode())
    return digest.hexdigest()


def cache_key(path: Path, environ: Mapping[str, str]) -> str:
    """The cache file's key for loading `path` (as given) here and now; OSError if the current
    directory is gone."""
    parts = (FORMAT, __version__, sys.version, marshal.version, _code_stamp(), os.getcwd(), str(path),
             os.path.realpath(path), environ.get(MODELS_ENV_VAR, ""), environ.get("HOME", ""))
    return hashlib.sha256(marshal.dumps(parts)).hexdigest()


# --- reading -------------------------------------------------------------------------------------


class _Miss(Exception):
    """Why the cache cannot be used (said in the debug log)."""


def read(path: Path, output: str | Path | None, environ: Mapping[str, str] | None = None):
    """The cached `Manifest` for loading `path` with `--output` `output`, or None (do a full load)."""
    environ = os.environ if environ is None else environ
    if not enabled(environ):
        return None
    folder = cache_dir(environ)
    if folder is None:
        return None
    try:
        _check_private(folder)
        file = folder / (cache_key(path, environ) + SUFFIX)
        manifest = _read(file, path, output)
    except FileNotFoundError:
        log.debug("manifest %s: not in the validated-manifest cache", path)
        return None
    except Exception as exc:  # noqa: BLE001 - any doubt about the cache means a full load, never a failure
        log.debug("manifest %s: validated-manifest cache not used: %s", path, exc)
        return None
    log.debug("manifest %s: unchanged, read from the validated-manifest cache %s", path, file)
    return manifest


def _read(file: Path, path: Path, output: str | Path | None):
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise _Miss("not a regular file of this user")
        if handle.read(len(FORMAT)) != FORMAT:
            raise _Miss("not a cache file of this format")
        size = int.from_bytes(handle.read(8), "big")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise _Miss("bad header length")
        raw = handle.read(size)
        if len(raw) != size:
            raise _Miss("truncated")
        header = marshal.loads(raw)
        if not (isinstance(header, tuple) and len(header) == 4 and header[0] == file.name[: -len(SUFFIX)]):
            raise _Miss("not the header of this key")
        _, deps, body_sha, body_size = header
        _check_deps(deps)
        if not isinstance(body_size, int) or not 0 < body_size <= info.st_size:
            raise _Miss("bad body length")
        body = handle.read(body_size + 1)
    if len(body) != body_size or hashlib.sha256(body).hexdigest() != body_sha:
        raise _Miss("the body does not match its digest (truncated or damaged)")
    from batchrun.manifest import manifest_from_plain  # here: manifest imports this module

    return manifest_from_plain(marshal.loads(body), path, output)


def _check_deps(deps: Any) -> None:
    """Raise _Miss unless every file, folder and path the load read is as it was then."""
    if not (isinstance(deps, tuple) and len(deps) == 3):
        raise _Miss("bad stamp")
    reads, folders, resolved = deps
    for entry in reads:
        where, stamp, sha = entry
        try:
            if sha is None:  # a local image not changed just before its load: its stamp (and it is hashed
                # again when its job is submitted)
                if readlog.stamp_of(os.stat(where)) != stamp:
                    raise _Miss(f"{where} changed")
            elif _sha256_of(where, stamp) != sha:
                raise _Miss(f"{where} changed (same size and times, other bytes)")
        except OSError as exc:
            raise _Miss(f"{where}: {exc.strerror or exc}") from None
    for where, names in folders:
        if _json_names(where) != names:
            raise _Miss(f"the files in {where} changed")
    for joined, real in resolved:
        if str(Path(joined).resolve()) != real:
            raise _Miss(f"{joined} now leads to another file")


def _sha256_of(where: str, stamp: tuple) -> str:
    """The SHA-256 of the file at `where`, read from the descriptor whose fstat is `stamp` (the same
    regular file as when it was loaded); _Miss when it is not. Stat first: a device is never opened (as in
    `batchrun.inputfile`); O_NONBLOCK: a FIFO swapped in after the stat never hangs."""
    if readlog.stamp_of(os.stat(where)) != tuple(stamp):
        raise _Miss(f"{where} changed")
    fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if readlog.stamp_of(os.fstat(fd)) != tuple(stamp):
            raise _Miss(f"{where} changed")
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _json_names(folder: str) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in Path(folder).glob("*.json")))


# --- writing -------------------------------------------------------------------------------------


def write(manifest, plain: Callable[[], tuple], reads: list[readlog.Read], path: Path,
          environ: Mapping[str, str] | None = None) -> None:
    """Keep `manifest` (loaded from `path` without errors; `plain()` gives it as plain data) with the stamp
    of `reads`, the files its load read. Never raises: a cache that cannot be written is only logged."""
    environ = os.environ if environ is None else environ
    if not enabled(environ):
        return
    folder = cache_dir(environ)
    if folder is None:
        return
    try:
        deps = _deps(manifest, reads)
        if deps is None:
            return
        body = marshal.dumps(plain())
        key = cache_key(path, environ)
        header = marshal.dumps((key, deps, hashlib.sha256(body).hexdigest(), len(body)))
        _private_dir(folder)
        file = folder / (key + SUFFIX)
        # In parts, not joined: the body of a 100,000-job manifest is 20 MB. No fsync: a file torn by a crash
        # fails its digest and is ignored.
        atomic_write(file, (FORMAT, len(header).to_bytes(8, "big"), header, body), 0o600, durable=False)
        _prune(folder, file.name)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: the command goes on without it
        log.debug("manifest %s: the validated-manifest cache was not written: %s", path, exc)


def _deps(manifest, reads: list[readlog.Read]) -> tuple | None:
    """The stamp to store, or None when a file changed while it was being loaded (nothing is cached)."""
    images: dict[str, str] = {}  # resolved path -> joined path as the load resolved it
    resolved = {}
    base = manifest.path.parent
    for job in manifest.jobs:
        for _, image in job.local_images:
            if image.written not in resolved:
                resolved[image.written] = (str(base / image.written), str(image.path))
                images[str(image.path)] = image.written
    by_path: dict[str, tuple] = {}
    for entry in reads:
        known = by_path.get(entry.path)
        # A local image is checked by its stamp alone, unless it changed shortly before it was read: a
        # change in the same tick of the file system's clock could keep its ctime (git's "racy" files).
        racy = entry.read_at_ns - entry.stamp[4] < RACY_NS
        kept = (entry.path, entry.stamp, None if entry.path in images and not racy else entry.sha256)
        if known is not None and known != kept:
            log.debug("manifest %s: %s read twice with different contents: not cached", manifest.path, entry.path)
            return None
        by_path[entry.path] = kept
    for where, stamp, _ in by_path.values():
        if readlog.stamp_of(os.stat(where)) != stamp:
            log.debug("manifest %s: %s changed while it was loaded: not cached", manifest.path, where)
            return None
    folders = ()
    if manifest.models_dir is not None:
        folders = ((str(manifest.models_dir), _json_names(str(manifest.models_dir))),)
    return tuple(by_path.values()), folders, tuple(resolved.values())


def _private_dir(folder: Path) -> None:
    """Create the cache folder (0700) and refuse one another user could write to (planted files)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder)


def _check_private(folder: Path) -> None:
    """_Miss unless `folder` is a folder (not a symlink) of this user that no one else can write to."""
    info = os.stat(folder, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise _Miss(f"{folder} is not a private folder of this user")


def _prune(folder: Path, keep: str) -> None:
    """Keep the `KEEP` most recently written cache files; remove temporary files a killed write left."""
    found = []
    now = time.time()
    for entry in os.scandir(folder):
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if entry.name.endswith(SUFFIX):
            found.append((entry.name == keep, info.st_mtime, entry.path))
        elif entry.name.endswith(".tmp") and now - info.st_mtime > STALE_TEMP_SECONDS:
            found.append((False, 0.0, entry.path))
    found.sort(reverse=True)
    for _, _, where in found[KEEP:]:
        try:
            os.unlink(where)
        except OSError:
            pass


# --- plain data <-> objects (the manifest-independent parts) -----------------------------------------


def price_plain(price: Price) -> dict:
    return dict(price.__dict__)


def settings_plain(settings: Settings) -> dict:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def problem_plain(problem: Problem) -> tuple:
    return problem.file, problem.line, problem.column, problem.where, problem.message, problem.severity


def image_plain(image: LocalImage) -> tuple:
    return (image.written, str(image.path), image.sha256, image.mime, image.size, image.width, image.height,
            image.problems, image.warnings)


def image_from_plain(plain: tuple) -> LocalImage:
    written, path, sha, mime, size, width, height, problems, warnings = plain
    if not (isinstance(written, str) and isinstance(path, str) and isinstance(problems, tuple)):
        raise _Miss("bad image")
    return LocalImage(written, Path(path), sha, mime, size, width, height, problems, warnings)


def model_plain(model: Model) -> dict:
    fields = {name: getattr(model, name) for name in model.__dataclass_fields__}
    fields["price"] = price_plain(model.price)
    return fields


def model_from_plain(fields: dict) -> Model:
    """The model as the load read it (its data file is part of the stamp, or of the code's for a shipped one)."""
    return Model(**{**fields, "price": Price(**fields["price"])})
