"""Load test of the arena on loopback: N concurrent voters casting M votes each.

Each voter is a thread with its own cookie: it draws a held-out prompt, asks for a battle, and
votes; the vote's latency is the time from sending it to its response (the vote committed to
SQLite with synchronous=FULL before the server answers). At the end, every vote that got a 200
must be in the database, and the database must hold no other vote.

    python bench/bench_arena.py                      # trains a micro run in a temporary folder
    python bench/bench_arena.py --run runs/a --voters 50 --votes 20

The server is `elasticmoe arena` in its own process; the voters run in this one. Results in
bench/ARENA.md.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np


def micro_run(folder: Path) -> Path:
    """A micro run of 30 elastic steps with one extracted child (two models to compare)."""
    from elasticmoe.phases import extract_child
    from elasticmoe.recipe import load_recipe
    from elasticmoe.train import train

    run = folder / "run"
    train(load_recipe("micro", ["train.steps=30", "train.eval_every=30", "train.ckpt_every=30"]), run, progress=False)
    extract_child(run, None, "L2 E4 k1 W32", run / "children" / "c0")
    return run


def start_server(run: Path, db: Path, max_new_tokens: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "elasticmoe", "arena", str(run), "--port", "0", "--db", str(db)]
    cmd += ["--max-new-tokens", str(max_new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "serving on " in line:
            return proc, line.split("serving on ", 1)[1].strip()
    raise SystemExit("the arena did not start:\n" + "".join(lines[-20:]))


def voter(url: str, votes: int, out: dict[str, list]) -> None:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def call(path: str, data=None):
        body = json.dumps(data).encode() if data is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with opener.open(urllib.request.Request(url + path, data=body, headers=headers), timeout=120) as r:
            return json.loads(r.read())

    rng = np.random.default_rng()
    for _ in range(votes):
        try:
            prompt = call("api/prompt")["prompt"]
            t = time.perf_counter()
            battle = call("api/battle", {"prompt": prompt})["battle"]
            out["battle_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            call("api/vote", {"battle": battle, "verdict": str(rng.choice(["a", "b", "tie", "both_bad"]))})
            out["vote_s"].append(time.perf_counter() - t)
            out["acked"].append(battle)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            out["errors"].append(repr(exc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run folder with at least two models (default: train a micro run)")
    ap.add_argument("--voters", type=int, default=50)
    ap.add_argument("--votes", type=int, default=20, help="votes per voter")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else micro_run(Path(tmp))
        db = Path(tmp) / "votes.sqlite"
        proc, url = start_server(run, db, args.max_new_tokens)
        out: dict[str, list] = {"battle_s": [], "vote_s": [], "acked": [], "errors": []}
        try:
            threads = [threading.Thread(target=voter, args=(url, args.votes, out)) for _ in range(args.voters)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        conn = sqlite3.connect(db)
        stored = {r[0] for r in conn.execute("SELECT battle FROM votes")}
        conn.close()
    acked = set(out["acked"])
    vote_ms, battle_ms = np.array(out["vote_s"]) * 1000, np.array(out["battle_s"]) * 1000
    print(f"{args.voters} voters x {args.votes} votes: {len(acked)} acknowledged, {len(stored)} in the database, ")
    print(f"  acknowledged but missing: {len(acked - stored)}; stored but never acknowledged: {len(stored - acked)}")
    print(f"  errors: {len(out['errors'])} {out['errors'][:3]}")
    print(f"  wall {wall:.1f} s, {len(acked) / wall:.1f} votes/s (battle + vote)")
    for name, ms in (("vote", vote_ms), ("battle", battle_ms)):
        if len(ms):
            p50, p95, p99 = np.quantile(ms, [0.5, 0.95, 0.99])
            print(f"  {name} latency ms: p50 {p50:.1f} | p95 {p95:.1f} | p99 {p99:.1f} | max {ms.max():.1f}")
    if acked - stored or len(acked) != args.voters * args.votes:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
