"""The arena's web app (Starlette, served by uvicorn): a page to vote on, a leaderboard, an export.

Routes: `GET /` the voting page; `GET /leaderboard`; `GET /api/prompt` a prompt drawn from the
prompt file or the run's held-out tasks; `POST /api/battle` {"prompt"} -> two anonymous answers;
`POST /api/vote` {"battle", "verdict"} -> the names, once the vote is committed; `GET
/api/leaderboard` (JSON); `GET /api/votes.jsonl` (every vote, JSON lines).

Safety: prompts, answers and model names are untrusted text. Pages are rendered by Jinja2 with
autoescaping, the page's script only ever sets `textContent`, and the Content-Security-Policy
allows no inline script, so text that looks like HTML stays text. Request bodies are capped
(`MAX_BODY` bytes, by Content-Length and while reading), prompts by characters and tokens
(`contestants.PromptError`). POSTs must be JSON from this origin (no form can forge one
cross-site). A vote is accepted once per battle, from the anonymous voter (a random cookie) it was
shown to (`store.Store.vote`). With a token, every request needs it (cookie or X-Arena-Token).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import random
import re
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import numpy as np
from jinja2 import Environment, FileSystemLoader
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .contestants import PromptError
from .ratings import MIN_VOTES_FOR_CI, choose_pair, leaderboard
from .store import VoteError, export_jsonl

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_BODY = 16 * 1024  # bytes of a request body (a prompt is at most 2,000 characters)
VOTER_COOKIE, TOKEN_COOKIE = "arena_voter", "arena_token"
VOTER_ID = re.compile(r"[0-9a-f]{32}")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class Guard:
    """ASGI middleware: the shared token (when set), the body size cap by Content-Length, and the
    security headers on every response."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        headers = Headers(scope=scope)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return await PlainTextResponse("request too large", 413)(scope, receive, send_secured)
        if self.token:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if scope["path"] == "/" and query and hmac.compare_digest(query, self.token):
                response = RedirectResponse("/", 303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                return await response(scope, receive, send_secured)
            given = headers.get("x-arena-token") or Request(scope).cookies.get(TOKEN_COOKIE, "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                message = "this arena needs its token: open the address the server printed"
                return await PlainTextResponse(message, 403)(scope, receive, send_secured)
        await self.app(scope, receive, send_secured)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object of a same-origin POST, read up to MAX_BODY bytes."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise BadRequest(415, "send application/json")
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise BadRequest(403, "cross-origin request refused")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(413, "request too large")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the body is not a JSON object")
    return data


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise BadRequest(400, f"{key!r} must be a string")
    return value


class Board:
    """The leaderboard, recomputed when votes changed: at once for the leaderboard page, in the
    background for choosing pairs (which uses the last one meanwhile)."""

    def __init__(self, store, names: list[str], n_boot: int = 200):
        self.store, self.names, self.n_boot = store, names, n_boot
        self.board: dict[str, Any] | None = None
        self.compute = threading.Lock()
        self.refreshing = threading.Event()

    def _refresh(self) -> dict[str, Any]:
        with self.compute:
            outcomes = self.store.outcomes()
            if self.board is None or self.board["n_votes"] != len(outcomes):
                self.board = leaderboard(outcomes, self.names, n_boot=self.n_boot)
            return self.board

    def fresh(self) -> dict[str, Any]:
        board = self.board
        return board if board is not None and board["n_votes"] == self.store.count() else self._refresh()

    def latest(self) -> dict[str, Any] | None:
        """The last leaderboard computed, starting a background refresh when it is out of date."""
        board = self.board
        if (board is None or board["n_votes"] != self.store.count()) and not self.refreshing.is_set():
            self.refreshing.set()

            def run():
                try:
                    self._refresh()
                finally:
                    self.refreshing.clear()

            threading.Thread(target=run, daemon=True).start()
        return board


def public(board: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in board.items() if k != "boot"}


def voter_of(request: Request) -> str | None:
    """The anonymous voter id of the request's cookie (None when absent or malformed)."""
    v = request.cookies.get(VOTER_COOKIE, "")
    return v if VOTER_ID.fullmatch(v) else None


async def in_thread(limiter: anyio.CapacityLimiter, fn, *args):
    return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=limiter)


class Arena:
    """The endpoints over `contestants` (an `arena.contestants.Contestants`, or anything with
    `names`, `check_prompt`, `draw`, `settings`, `answer`) and `store` (an `arena.store.Store`)."""

    def __init__(self, contestants, store, n_boot: int = 200):
        self.contestants, self.store = contestants, store
        self.board = Board(store, contestants.names, n_boot)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
        self.sources = {p: s for s, p in getattr(contestants, "prompts", [])}
        self.cached = getattr(contestants, "cached", lambda name, prompt: None)
        self.draws = random.Random()
        # separate worker threads for generation (one at a time: it is CPU-bound), votes and other
        # database work, so that a vote never queues behind battles waiting for the models
        self.generation, self.database, self.votes = (anyio.CapacityLimiter(n) for n in (1, 8, 8))

    def routes(self) -> list:
        return [
            Route("/", self.index),
            Route("/leaderboard", self.leaderboard_page),
            Route("/api/prompt", self.api_prompt),
            Route("/api/battle", self.api_battle, methods=["POST"]),
            Route("/api/vote", self.api_vote, methods=["POST"]),
            Route("/api/leaderboard", self.api_leaderboard),
            Route("/api/votes.jsonl", self.api_export),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    def page(self, name: str, **context) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(name).render(**context))

    async def new_battle(self, voter: str, prompt: str) -> dict[str, Any]:
        """Two models (the least certain pair), their answers, stored as a battle for `voter`."""
        c = self.contestants
        c.check_prompt(prompt)
        rng = np.random.default_rng()
        pair = await in_thread(self.database, lambda: choose_pair(self.board.latest(), c.names, rng))
        answers = []
        for name in pair:  # a cached answer does not wait for the models
            text = self.cached(name, prompt)
            answers.append(text if text is not None else await in_thread(self.generation, c.answer, name, prompt))
        battle = secrets.token_hex(16)
        source, settings = self.sources.get(prompt, "typed"), c.settings(prompt)
        await in_thread(
            self.database, self.store.add_battle, battle, voter, prompt, source, pair, tuple(answers), settings
        )
        return {"battle": battle, "prompt": prompt, "a": answers[0], "b": answers[1]}

    async def index(self, request: Request):
        return self.page("index.html", models=len(self.contestants.names))

    async def leaderboard_page(self, request: Request):
        board = await in_thread(self.database, self.board.fresh)
        return self.page("leaderboard.html", board=board, min_votes=MIN_VOTES_FOR_CI)

    async def api_prompt(self, request: Request):
        source, prompt = self.contestants.draw(self.draws)
        return JSONResponse({"prompt": prompt, "source": source})

    async def api_battle(self, request: Request):
        try:
            data = await read_json(request)
            voter = voter_of(request) or secrets.token_hex(16)
            out = await self.new_battle(voter, _text(data, "prompt"))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        except PromptError as exc:
            return JSONResponse({"error": str(exc)}, 422)
        response = JSONResponse(out)
        if voter != voter_of(request):
            response.set_cookie(VOTER_COOKIE, voter, max_age=365 * 86400, httponly=True, samesite="strict")
        return response

    async def api_vote(self, request: Request):
        try:
            data = await read_json(request)
            battle, verdict = _text(data, "battle"), _text(data, "verdict")
            voter = voter_of(request)
            if voter is None:
                raise BadRequest(404, "no such battle was shown to you")
            a, b = await in_thread(self.votes, self.store.vote, battle, voter, verdict)
        except (BadRequest, VoteError) as exc:
            return JSONResponse({"error": str(exc)}, exc.status)
        return JSONResponse({"a": a, "b": b, "verdict": verdict})

    async def api_leaderboard(self, request: Request):
        return JSONResponse(public(await in_thread(self.database, self.board.fresh)))

    async def api_export(self, request: Request):
        lines = await in_thread(self.database, lambda: list(export_jsonl(self.store)))
        headers = {"content-disposition": 'attachment; filename="votes.jsonl"'}
        return StreamingResponse(iter(lines), media_type="application/x-ndjson", headers=headers)


def create_app(contestants, store, token: str | None = None, n_boot: int = 200) -> Any:
    """The ASGI app: the arena's routes behind the `Guard` (token, size cap, security headers)."""
    return Guard(Starlette(routes=Arena(contestants, store, n_boot).routes()), token)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int):
    """A listening socket on (host, port); port 0 picks a free one."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve(app, sock, ready=None) -> None:
    """Serve `app` on the bound socket `sock` with uvicorn until interrupted."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        lifespan="off",
        limit_concurrency=512,  # connections and requests at once; beyond it uvicorn answers 503
    )
    server = uvicorn.Server(config)
    if ready is not None:
        ready()
    asyncio.run(server.serve(sockets=[sock]))
