"""`batchrun review`: the gallery served on 127.0.0.1, to pick, reject, rate, note and re-roll takes.

The page shows the media first, one row per input with its takes side by side. Every decision is
written to the output dir's ledger the moment it is made (`Ledger.set_decision`), so it survives a
restart and shows in `status`, `export`, results.jsonl and report.html. The ledger is SQLite in WAL
mode: the app reads and writes it while a run goes, and the page asks for the jobs again every few
seconds, so new takes appear as they arrive. A re-roll records more takes (`takes.request_more`); the
next `batchrun run` submits them.

Who may use it: the server listens on 127.0.0.1 only, and every request (page, data, media, writes)
must carry the session's random token (`?token=`), printed in the URL at start; another local user's
browser tab cannot guess it. Requests whose Host is not this loopback address are refused (DNS
rebinding), and writes must be JSON posted from this origin. The page loads nothing from elsewhere:
its script and style are served here, and a Content-Security-Policy allows only this origin.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import webbrowser
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from aiohttp import web

from batchrun import mediafacts, startimages, takes
from batchrun.errors import LedgerError, UsageError
from batchrun.ledger import JobRow, Ledger
from batchrun.manifest import Manifest

HOST = "127.0.0.1"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REFRESH_SECONDS = 4.0  # how often the page asks for the jobs again (new takes of a run going)
FACTS_PER_REFRESH = 20  # videos read for media facts and posters per refresh, so no answer waits long


def _asset(name: str) -> str:
    return resources.files("batchrun").joinpath("review_assets", name).read_text(encoding="utf-8")


def _prompt(row: JobRow) -> str:
    prompt = row.input.get("prompt")
    if isinstance(prompt, str):
        return prompt
    shots = row.input.get("multi_prompt")
    if isinstance(shots, list):
        return " / ".join(str(s.get("prompt", "")) for s in shots if isinstance(s, dict))
    return ""


def _safe_relative(path: str) -> bool:
    pure = PurePosixPath(path)
    return bool(path) and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path


class ReviewApp:
    """The app's state: one output dir, its ledger (opened for writing), the manifest if given, the token."""

    def __init__(self, output_dir: Path, manifest: Manifest | None, token: str | None = None,
                 refresh_seconds: float = REFRESH_SECONDS):
        self.output_dir = Path(output_dir)
        self.refresh_seconds = refresh_seconds
        self.manifest = manifest
        self.token = token or secrets.token_urlsafe(24)
        self.ledger = Ledger.open(self.output_dir, create=False)  # LedgerError when nothing has run
        self.port = 0
        if manifest is not None:
            takes.with_rerolls(manifest, self.ledger.rerolls())

    def close(self) -> None:
        self.ledger.close()

    # -- what the page shows -----------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"{quote(path)}?token={self.token}"

    def _image(self, row: JobRow) -> tuple[str | None, str]:
        value = row.input.get(startimages.FIELD)
        if not isinstance(value, str) or not value:
            return None, "no start image"
        scheme = urlsplit(value).scheme.lower()
        if scheme in ("http", "https"):
            return None, value  # not fetched: the app loads nothing from elsewhere
        if scheme == "data" and value[5:11].lower() == "image/" and len(value) < 2_000_000:
            return value, ""
        if (self.output_dir / startimages.copy_name(value)).is_file():
            return self._url("/start/" + row.id), ""
        return None, f"local image {value} (not copied yet)"

    def jobs(self) -> dict[str, Any]:
        """The page's data: inputs in ledger order, each with its takes (and takes asked for, not run yet)."""
        mediafacts.fill(self.ledger, self.output_dir, limit=FACTS_PER_REFRESH)
        rows = self.ledger.all()
        listed = {job.id for job in self.manifest.jobs} if self.manifest is not None else None
        groups: dict[str, dict[str, Any]] = {}
        for row in rows:
            key = row.take_of or row.id
            image, image_note = self._image(row)
            group = groups.setdefault(key, {"id": key, "prompt": _prompt(row), "model": row.model, "image": image,
                                            "image_note": image_note, "takes": []})
            group["takes"].append({
                "id": row.id, "take": row.take or 1, "state": row.state, "decision": row.decision,
                "rating": row.rating, "note": row.note or "", "model": row.model,
                "error": row.error_message if row.error_kind else None,
                "gone": listed is not None and row.id not in listed,
                "videos": [self._url("/media/" + o.path) for o in row.outputs if _safe_relative(o.path)],
                "poster": (self._url("/poster/" + row.id)
                           if (self.output_dir / mediafacts.poster_path(row.id)).is_file() else None),
                "media": mediafacts.describe(row.media) if row.media else None,
                "flags": mediafacts.flags(row.media, row.input),
            })
        known = {row.id for row in rows}
        for job_id, take_of, take in self.ledger.rerolls():
            if job_id not in known and take_of in groups:
                groups[take_of]["takes"].append({"id": job_id, "take": take, "state": "asked", "decision": None,
                                                 "rating": None, "note": "", "videos": [], "error": None,
                                                 "poster": None, "media": None, "flags": [],
                                                 "gone": False, "model": groups[take_of]["model"]})
        for group in groups.values():
            group["takes"].sort(key=lambda t: t["take"])
        # Media first: inputs with something to watch, then those still waiting (ledger order within each).
        ordered = sorted(groups.values(), key=lambda g: not any(t["videos"] for t in g["takes"]))
        return {"groups": ordered, "can_reroll": self.manifest is not None,
                "refresh_seconds": self.refresh_seconds}

    # -- HTTP ----------------------------------------------------------------------------------------
    @web.middleware
    async def guard(self, request: web.Request, handler):
        allowed_hosts = {f"{HOST}:{self.port}", f"localhost:{self.port}"}
        if request.host not in allowed_hosts:
            return web.Response(status=421, text="this review app answers only on its loopback address\n")
        given = request.query.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return web.Response(status=403, text="missing or wrong session token: open the URL batchrun printed\n")
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin is not None and origin not in {f"http://{h}" for h in allowed_hosts}:
                return web.Response(status=403, text="writes come only from the review page\n")
            if request.content_type != "application/json":
                return web.Response(status=415, text="send JSON\n")
        response = await handler(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def page(self, request: web.Request) -> web.Response:
        title = f"batchrun review: {self.output_dir.resolve().name}"
        body = (_asset("review.html").replace("{{title}}", _esc(title))
                .replace("{{token}}", _esc(self.token)))
        return web.Response(text=body, content_type="text/html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = {"review.js": "text/javascript", "review.css": "text/css"}.get(name)
        if kind is None:
            raise web.HTTPNotFound()
        return web.Response(text=_asset(name), content_type=kind)

    async def data(self, request: web.Request) -> web.Response:
        return web.json_response(self.jobs())

    async def media(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        allowed = {o.path for row in self.ledger.all() for o in row.outputs if _safe_relative(o.path)}
        if path not in allowed or not (self.output_dir / path).is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(self.output_dir / path)

    async def start_image(self, request: web.Request) -> web.StreamResponse:
        row = self.ledger.get(request.match_info["job"])
        value = row.input.get(startimages.FIELD) if row is not None else None
        if not isinstance(value, str) or not (self.output_dir / startimages.copy_name(value)).is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(self.output_dir / startimages.copy_name(value))

    async def poster(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job"]
        path = self.output_dir / mediafacts.poster_path(job_id)
        if self.ledger.get(job_id) is None or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def decide(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        job_id = body.pop("id", None)
        if not isinstance(job_id, str):
            return _problem(400, "name the job: {\"id\": ...}")
        try:
            row = self.ledger.set_decision(job_id, **body)
        except LedgerError as exc:
            return _problem(404 if "no job" in str(exc) else 400, str(exc))
        return web.json_response({"id": row.id, "decision": row.decision, "rating": row.rating, "note": row.note})

    async def reroll(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if self.manifest is None:
            return _problem(409, "re-rolling needs the manifest: start 'batchrun review MANIFEST'")
        job_id, count = body.get("id"), body.get("takes", 1)
        if not isinstance(job_id, str) or isinstance(count, bool) or not isinstance(count, int) \
                or not 1 <= count <= takes.MAX_TAKES:
            return _problem(400, f"send {{\"id\": JOB, \"takes\": 1..{takes.MAX_TAKES}}}")
        try:
            made = takes.request_more(self.manifest, self.ledger, [job_id], count)
        except KeyError:
            return _problem(404, f"no job {job_id!r} in the manifest")
        except (ValueError, LedgerError) as exc:
            return _problem(400, str(exc))
        return web.json_response({"asked": made})

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.page)
        app.router.add_get("/assets/{name}", self.asset)
        app.router.add_get("/api/jobs", self.data)
        app.router.add_get("/media/{path:.+}", self.media)
        app.router.add_get("/start/{job}", self.start_image)
        app.router.add_get("/poster/{job}", self.poster)
        app.router.add_post("/api/decide", self.decide)
        app.router.add_post("/api/reroll", self.reroll)
        return app


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="not JSON\n") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="send a JSON object\n")
    return body


class ReviewServer:
    """`async with ReviewServer(output_dir, manifest, port=0) as server:` serves until the block ends; `url`
    is what to open (it carries the token)."""

    def __init__(self, output_dir: Path, manifest: Manifest | None, *, port: int = 0, token: str | None = None,
                 refresh_seconds: float = REFRESH_SECONDS):
        self.app = ReviewApp(output_dir, manifest, token, refresh_seconds)
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.app.port}/?token={self.app.token}"

    async def __aenter__(self) -> ReviewServer:
        self._runner = web.AppRunner(self.app.application(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self.app.close()
            raise UsageError(f"cannot listen on {HOST}:{self.port}: {exc.strerror}") from None
        self.app.port = self._runner.addresses[0][1]  # the real port when 0 was asked
        return self

    async def __aexit__(self, *exc) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self.app.close()


def serve(output_dir: Path, manifest: Manifest | None, *, port: int, out: TextIO, open_browser: bool = False) -> int:
    """Serve until interrupted (Ctrl-C); exit code 0. Raises LedgerError (exit 2) when there is no ledger."""
    async def main() -> None:
        async with ReviewServer(output_dir, manifest, port=port) as server:
            print(f"review app for {output_dir}: {server.url}", file=out)
            print("keys: arrows move, p pick, x reject, u undecide, 1-5 rate, 0 clear rating, n note, "
                  "r re-roll; Ctrl-C stops the app", file=out)
            out.flush()
            if open_browser:
                webbrowser.open(server.url)
            await asyncio.Event().wait()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        print("review app stopped; every decision is in the ledger", file=out)
    return 0
