"""The arena: people vote blind between members of a run's family (`elasticmoe arena RUN`).

A local web app shows a prompt (typed, or drawn from a prompt file or the run's held-out tasks)
and two anonymous models' answers side by side; the voter picks A, B, a tie or "both bad", then
sees the names. Votes are stored durably in SQLite (`store`), rated with the automatic arena's
Bradley-Terry code with bootstrap intervals (`ratings`), and the next pair is the one whose
rating difference is least certain. `report` adds the human table when votes exist.

Modules: `store` (SQLite), `ratings` (leaderboard, next pair; numpy only), `contestants` (models,
answers, prompts), `app` (Starlette app, uvicorn). Only `app` needs the web packages.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from ..config import ConfigError

DB_NAME = "arena/votes.sqlite"  # inside the run folder


def votes_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / DB_NAME


def run_arena(
    run_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8765,
    models: list[str] | None = None,
    token: str | None = None,
    prompts: Path | str | None = None,
    db: Path | str | None = None,
    max_new_tokens: int = 48,
    device: str = "cpu",
) -> None:
    """Load the run's models and serve the arena until interrupted."""
    try:
        from .app import bind, create_app, is_loopback, serve
    except ImportError as exc:
        raise ConfigError(f"the arena needs starlette, uvicorn and jinja2 ({exc}): pip install -e .[arena]") from None
    from .contestants import Contestants, choose_models
    from .store import Store

    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host} is reachable from other machines: give a shared --token")
    contestants = Contestants(run_dir, choose_models(run_dir, models), prompts, max_new_tokens, device)
    store = Store(db or votes_path(run_dir))
    sock = bind(host, port)
    where = sock.getsockname()
    shown = f"[{where[0]}]" if ":" in where[0] else where[0]
    url = f"http://{shown}:{where[1]}/" + (f"?token={quote(token, safe='')}" if token else "")

    def ready():
        print(f"arena: {len(contestants.names)} models ({', '.join(contestants.names)}); votes in {store.path}")
        print(f"arena: serving on {url}", flush=True)

    try:
        serve(create_app(contestants, store, token), sock, ready)
    finally:
        store.close()
