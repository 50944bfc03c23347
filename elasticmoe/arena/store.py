"""The arena's votes in SQLite: every battle shown (prompt, both models, both answers, generation
settings, time, the anonymous voter it was shown to) and at most one verdict for it.

Durability: the database runs in WAL mode with `synchronous=FULL`, so a committed transaction is
on disk (the WAL fsynced) before `commit()` returns (SQLite, "PRAGMA synchronous"). The server
answers a vote only after its commit, so a vote whose response reached the browser survives a
kill -9 of the server (and a power cut). A battle shown is committed with `synchronous=NORMAL`
(written to the WAL, not fsynced: one fsync per vote, not two); a kill -9 keeps it (the OS has
it), a power cut may lose it with no vote acknowledged on it, and the next vote's commit fsyncs
it. One connection, used under a lock: writes are serialised by SQLite anyway, and a vote is one
small transaction.

One vote per battle, by the voter it was shown to: `votes.battle` is the primary key (a second
vote is refused by the database, not only by the code) and the vote's voter must be the battle's.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

VERDICTS = ("a", "b", "tie", "both_bad")
SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    voter TEXT NOT NULL,
    shown REAL NOT NULL,
    prompt TEXT NOT NULL,
    source TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    settings TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    battle TEXT PRIMARY KEY REFERENCES battles(id),
    voter TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('a', 'b', 'tie', 'both_bad')),
    voted REAL NOT NULL
);
"""


class VoteError(Exception):
    """A vote the store refuses; `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def connect(path: Path | str) -> sqlite3.Connection:
    """A connection with the arena's schema and durability settings (WAL, synchronous=FULL)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
    conn.commit()
    return conn


class Store:
    """The votes database of one arena (RUN_DIR/arena/votes.sqlite by default)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.conn = connect(self.path)
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    def add_battle(
        self,
        battle: str,
        voter: str,
        prompt: str,
        source: str,
        models: tuple[str, str],
        answers: tuple[str, str],
        settings: dict[str, Any],
    ) -> None:
        row = (battle, voter, time.time(), prompt, source, *models, *answers, json.dumps(settings, sort_keys=True))
        with self.lock:  # not fsynced (see the module's docstring); the next vote's commit syncs it
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            self.conn.commit()
            self.conn.execute("PRAGMA synchronous=FULL")

    def vote(self, battle: str, voter: str, verdict: str) -> tuple[str, str]:
        """Record `verdict` on `battle` for `voter` (committed before returning); returns the
        battle's (model_a, model_b). Raises VoteError when refused."""
        if verdict not in VERDICTS:
            raise VoteError(422, f"verdict {verdict!r}; allowed {', '.join(VERDICTS)}")
        with self.lock:
            row = self.conn.execute("SELECT voter, model_a, model_b FROM battles WHERE id = ?", (battle,)).fetchone()
            if row is None or row[0] != voter:
                raise VoteError(404, "no such battle was shown to you")
            try:
                self.conn.execute("INSERT INTO votes VALUES (?, ?, ?, ?)", (battle, voter, verdict, time.time()))
                self.conn.commit()
            except sqlite3.IntegrityError:
                self.conn.rollback()
                raise VoteError(409, "this battle already has your vote") from None
        return row[1], row[2]

    def count(self) -> int:
        with self.lock:
            return self.conn.execute("SELECT COUNT(*) FROM votes").fetchone()[0]

    def outcomes(self) -> list[tuple[str, str, str]]:
        """(model_a, model_b, verdict) of every vote, in voting order."""
        with self.lock:
            return self.conn.execute(
                "SELECT b.model_a, b.model_b, v.verdict FROM votes v JOIN battles b ON b.id = v.battle "
                "ORDER BY v.voted, v.rowid"
            ).fetchall()

    def records(self) -> Iterator[dict[str, Any]]:
        """Every vote with its battle, as the JSONL export writes it."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT v.battle, v.voted, v.voter, v.verdict, b.shown, b.prompt, b.source, b.model_a, b.model_b, "
                "b.answer_a, b.answer_b, b.settings FROM votes v JOIN battles b ON b.id = v.battle "
                "ORDER BY v.voted, v.rowid"
            ).fetchall()
        keys = ("battle", "voted", "voter", "verdict", "shown", "prompt", "source", "model_a", "model_b")
        for r in rows:
            rec = dict(zip(keys, r[:9]))
            rec.update(answer_a=r[9], answer_b=r[10], settings=json.loads(r[11]))
            yield rec


def read_outcomes(path: Path | str) -> list[tuple[str, str, str]]:
    """(model_a, model_b, verdict) of every vote in the database at `path` ([] when absent)."""
    if not Path(path).is_file():
        return []
    store = Store(path)
    try:
        return store.outcomes()
    finally:
        store.close()


def export_jsonl(store: Store) -> Iterator[str]:
    """The votes as JSON lines (one vote and its battle per line)."""
    for rec in store.records():
        yield json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n"
