"""The arena (`elasticmoe arena`): a real server on loopback, a real browser (headless Chromium,
installed by `make browser`), votes that survive kill -9, escaping, limits, ratings and the report."""

from __future__ import annotations

import http.cookiejar
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ENV

from elasticmoe.arena.contestants import PromptError
from elasticmoe.arena.ratings import choose_pair, leaderboard, pair_weights
from elasticmoe.arena.store import Store, VoteError
from elasticmoe.evaluate import bradley_terry

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


# -- servers and clients ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def arena_run(micro_run):
    """The micro run with one extracted child: two real models to compare."""
    from elasticmoe.phases import extract_child

    extract_child(micro_run, None, "L2 E4 k1 W32", micro_run / "children" / "c0")
    return micro_run


class Server:
    """`elasticmoe arena RUN --port 0` in a subprocess; `url` once it serves."""

    def __init__(self, run: Path, *args: str):
        cmd = [sys.executable, "-m", "elasticmoe", "arena", str(run), "--port", "0", "--max-new-tokens", "8", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines = []
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving on " in line:
                self.url = line.split("serving on ", 1)[1].strip()
                return
        raise AssertionError("the arena did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(arena_run, tmp_path_factory):
    s = Server(arena_run, "--db", str(tmp_path_factory.mktemp("arena") / "votes.sqlite"))
    yield s
    s.stop()


class Client:
    """One voter: its own cookies, JSON in and out; `call` returns (status, body)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        self.url = url.split("?")[0]
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.headers = headers or {}

    def call(
        self,
        path: str,
        data=None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        as_text: bool = False,
    ):
        body = raw if raw is not None else (json.dumps(data).encode() if data is not None else None)
        h = {**self.headers, **({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        req = urllib.request.Request(self.url + path.lstrip("/"), data=body, headers=h)
        try:
            with self.opener.open(req, timeout=60) as r:
                body_text, status = r.read().decode(), r.status
        except urllib.error.HTTPError as e:
            body_text, status = e.read().decode(), e.code
        if as_text:
            return status, body_text
        try:
            return status, json.loads(body_text)
        except ValueError:
            return status, body_text

    def battle_and_vote(self, verdict: str = "a") -> tuple[str, float]:
        """Draw a prompt, get a battle, vote; returns (battle id, vote latency in s)."""
        _, drawn = self.call("/api/prompt")
        status, battle = self.call("/api/battle", {"prompt": drawn["prompt"]})
        assert status == 200, battle
        t = time.perf_counter()
        status, out = self.call("/api/vote", {"battle": battle["battle"], "verdict": verdict})
        assert status == 200, out
        return battle["battle"], time.perf_counter() - t


class StubModels:
    """Contestants with fixed answers (hostile HTML), for what the micro models never write."""

    names = ["<i>m1</i>", "m2"]
    prompts = [("held-out:stub", "2+2=")]

    def __init__(self, answer: str):
        self.text = answer

    def check_prompt(self, prompt: str) -> None:
        if not prompt.strip() or len(prompt) > 2000:
            raise PromptError("bad prompt")

    def draw(self, rng):
        return self.prompts[0]

    def settings(self, prompt: str) -> dict:
        return {"decoding": "stub"}

    def answer(self, name: str, prompt: str) -> str:
        return f"{self.text} ({name})"


@pytest.fixture
def stub_server(tmp_path):
    """The arena app over `StubModels` in this process (uvicorn in a thread): `stub_server(answer,
    token=None)` returns (url, store)."""
    import uvicorn

    from elasticmoe.arena.app import bind, create_app

    started = []

    def start(answer: str = "fine", token: str | None = None):
        store = Store(tmp_path / f"votes{len(started)}.sqlite")
        sock = bind("127.0.0.1", 0)
        config = uvicorn.Config(create_app(StubModels(answer), store, token, n_boot=20), log_level="warning")
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not srv.started:
            time.sleep(0.02)
        started.append((srv, thread, store))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/", store

    yield start
    for srv, thread, store in started:
        srv.should_exit = True
        thread.join(10)
        store.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium and Debian's chromedriver; in CI its absence fails."""
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: `make browser` installs them")
        pytest.skip("chromium / chromedriver not installed (make browser)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(None, timeout, poll_frequency=0.05).until(lambda _: condition())


def ask_and_vote(driver, url: str, prompt: str | None, verdict: str = "a") -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    if prompt is None:
        driver.find_element(By.ID, "draw").click()
        wait_for(lambda: driver.find_element(By.ID, "prompt").get_attribute("value"))
    else:
        driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "ask").click()
    wait_for(lambda: driver.find_element(By.ID, f"vote-{verdict}").is_enabled())
    driver.find_element(By.ID, f"vote-{verdict}").click()
    wait_for(lambda: "A was" in driver.find_element(By.ID, "result").text)


def table(driver) -> dict[str, list[str]]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    return {
        r.find_element(By.CLASS_NAME, "model").text: [c.text for c in r.find_elements(By.TAG_NAME, "td")] for r in rows
    }


# -- in a real browser ----------------------------------------------------------------------------
def test_browser_votes_and_the_leaderboard_changes(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "leaderboard")
    before = browser.find_element(By.ID, "total-votes").text
    assert set(table(browser)) == {"parent", "c0"}
    assert all(row[4] == "0" for row in table(browser).values())  # votes column
    ask_and_vote(browser, server.url, prompt=None, verdict="a")
    winner = browser.find_element(By.ID, "name-a").text
    loser = browser.find_element(By.ID, "name-b").text
    assert {winner, loser} == {"parent", "c0"}
    assert browser.find_element(By.ID, "answer-a").text is not None
    browser.find_element(By.ID, "nav-leaderboard").click()
    wait_for(lambda: browser.find_element(By.ID, "total-votes").text != before)
    rows = table(browser)
    assert browser.find_element(By.ID, "total-votes").text == "1 vote"
    assert rows[winner][4:6] == ["1", "1"] and rows[loser][4:7] == ["1", "0", "1"]  # votes, wins, losses
    assert int(rows[winner][2]) > int(rows[loser][2])  # rating
    assert rows[winner][0] == "1"  # ranked first


def test_script_in_an_answer_is_shown_as_text(browser, stub_server):
    from selenium.webdriver.common.by import By

    hostile = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"><b>bold</b>'
    url, store = stub_server(hostile)
    ask_and_vote(browser, url, prompt="<script>window.pwned = 3</script>", verdict="b")
    for side in ("a", "b"):
        pre = browser.find_element(By.ID, f"answer-{side}")
        assert pre.text.startswith(hostile)
        assert pre.find_elements(By.CSS_SELECTOR, "*") == []  # no element was created from the text
    assert "<i>m1</i>" in (browser.find_element(By.ID, "name-a").text + browser.find_element(By.ID, "name-b").text)
    browser.get(url + "leaderboard")
    assert "<i>m1</i>" in table(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "#leaderboard i") == []
    assert browser.execute_script("return window.pwned") is None
    exported = [json.loads(line) for line in Client(url).call("/api/votes.jsonl", as_text=True)[1].splitlines()]
    assert exported[0]["answer_a"].startswith(hostile) and exported[0]["prompt"].startswith("<script>")


# -- durability and load --------------------------------------------------------------------------
def test_kill_9_loses_no_acknowledged_vote(arena_run, tmp_path):
    db = tmp_path / "votes.sqlite"
    srv = Server(arena_run, "--db", str(db))
    acked, stop = [], threading.Event()

    def voter():
        client = Client(srv.url)
        while not stop.is_set():
            try:
                acked.append(client.battle_and_vote()[0])  # appended only once the response arrived
            except (OSError, AssertionError):
                return

    threads = [threading.Thread(target=voter) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acked) < 40 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(srv.proc.pid, signal.SIGKILL)  # mid-stream: other votes are in flight
    srv.proc.wait()
    stop.set()
    for t in threads:
        t.join(60)
    srv.stop()
    assert len(acked) >= 40
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {r[0] for r in conn.execute("SELECT battle FROM votes")}
    conn.close()
    assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged votes lost"
    again = Server(arena_run, "--db", str(db))  # and the arena starts again on the same database
    try:
        assert Client(again.url).call("/api/leaderboard")[1]["n_votes"] == len(stored)
    finally:
        again.stop()


def test_concurrent_voters_every_vote_stored(server):
    """The bench's load test, smaller (bench/bench_arena.py: 50 voters x 20 votes)."""
    _, before = Client(server.url).call("/api/leaderboard")
    latencies, errors = [], []

    def voter():
        client = Client(server.url)
        try:
            for _ in range(5):
                latencies.append(client.battle_and_vote("tie")[1])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=voter) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    _, after = Client(server.url).call("/api/leaderboard")
    assert after["n_votes"] - before["n_votes"] == 50 == len(latencies)
    print(f"p95 vote latency {np.quantile(latencies, 0.95) * 1000:.1f} ms over 50 votes by 10 voters")


# -- refusals -------------------------------------------------------------------------------------
def test_limits_and_one_vote_per_battle(server):
    voter, other = Client(server.url), Client(server.url)
    assert voter.call("/api/battle", raw=b"x" * 20000)[0] == 413
    assert voter.call("/api/battle", {"prompt": "x" * 2001})[0] == 422
    status, out = voter.call("/api/battle", {"prompt": "kv: a=1 " * 40})
    assert status == 422 and "tokens" in out["error"]
    assert voter.call("/api/battle", {"prompt": "   "})[0] == 422
    assert voter.call("/api/battle", {"prompt": 3})[0] == 400
    assert voter.call("/api/battle", raw=b"prompt=hi", headers={"Content-Type": "text/plain"})[0] == 415
    assert voter.call("/api/battle", {"prompt": "hi"}, headers={"Origin": "http://evil.example"})[0] == 403
    status, battle = voter.call("/api/battle", {"prompt": "hello"})
    assert status == 200
    assert voter.call("/api/vote", {"battle": battle["battle"], "verdict": "maybe"})[0] == 422
    assert other.call("/api/vote", {"battle": battle["battle"], "verdict": "a"})[0] == 404  # not shown to them
    assert voter.call("/api/vote", {"battle": "0" * 32, "verdict": "a"})[0] == 404
    assert voter.call("/api/vote", {"battle": battle["battle"], "verdict": "a"})[0] == 200
    assert voter.call("/api/vote", {"battle": battle["battle"], "verdict": "b"})[0] == 409


def test_token(stub_server):
    url, _ = stub_server(token="s3cret")
    assert Client(url).call("/api/prompt")[0] == 403
    assert Client(url).call("/api/prompt", headers={"X-Arena-Token": "wrong"})[0] == 403
    assert Client(url).call("/api/prompt", headers={"X-Arena-Token": "s3cret"})[0] == 200
    browser_like = Client(url)
    assert browser_like.call("/?token=s3cret")[0] == 200  # redirected to the page, cookie set
    assert browser_like.call("/api/prompt")[0] == 200


def test_cli_refusals(cli, one_line_error, arena_run):
    one_line_error(cli("arena", arena_run, "--host", "0.0.0.0", ok=False), "--token")
    one_line_error(cli("arena", arena_run, "--models", "parent", ok=False), "at least two")
    one_line_error(cli("arena", arena_run, "--models", "nope", "parent", ok=False), "nope")
    one_line_error(cli("arena", arena_run, "--prompts", arena_run / "missing.txt", ok=False), "missing.txt")


def test_prompts_from_a_file_and_cached_answers(arena_run, tmp_path):
    from elasticmoe.arena.contestants import Contestants, choose_models

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: 3 1 2 -> "}) + "\n" + json.dumps({"prompt": "x " * 200}) + "\n")
    models = choose_models(arena_run, ["parent", str(arena_run / "children" / "c0")])
    assert list(models) == ["parent", "c0"]
    c = Contestants(arena_run, models, prompts, max_new_tokens=6)
    assert c.prompts == [("file", "sort: 3 1 2 -> ")]  # the one longer than the context is left out
    with pytest.raises(PromptError, match="tokens"):
        c.check_prompt("x " * 200)
    first = c.answer("c0", "sort: 3 1 2 -> ")
    assert c.cached("c0", "sort: 3 1 2 -> ") == first == c.answer("c0", "sort: 3 1 2 -> ")
    assert c.settings("sort: 3 1 2 -> ")["max_new_tokens"] == 6


# -- ratings, storage, report -------------------------------------------------------------------
def test_ratings_reuse_bradley_terry_with_ties():
    votes = ([("x", "y", "a")] * 3 + [("y", "x", "a")] + [("x", "y", "tie"), ("z", "x", "both_bad")]) * 2
    assert leaderboard(votes[:6], n_boot=50)["ratings"]["x"]["ci"] is None  # too few votes for an interval
    board = leaderboard(votes, n_boot=50)
    names = ["x", "y", "z"]
    wins = 2 * np.array([[0, 3.5, 0.5], [1.5, 0, 0], [0.5, 0, 0]])  # row beat column; ties half each
    elo = 1000 + 400 * np.log10(bradley_terry(wins))
    for i, n in enumerate(names):
        r = board["ratings"][n]
        assert r["rating"] == pytest.approx(elo[i])
        assert r["ci"][0] <= r["rating"] + 1e-6 and r["ci"][1] >= r["rating"] - 1e-6
    assert board["names"][0] == "x" and board["n_votes"] == 12
    assert board["ratings"]["x"] | {"rating": 0, "ci": 0} == {
        "rating": 0,
        "ci": 0,
        "votes": 12,
        "wins": 6,
        "losses": 2,
        "ties": 2,
        "both_bad": 2,
    }


def test_next_pair_is_the_least_certain():
    rng = np.random.default_rng(0)
    votes = [("x", "y", "a"), ("y", "x", "b")] * 20 + [("x", "z", "a")]
    board = leaderboard(votes, n_boot=50)
    assert {frozenset(choose_pair(board, ["x", "y", "z"], rng)) for _ in range(20)} == {frozenset("yz")}  # unseen
    w = pair_weights(board, ["x", "y", "z"])
    assert w[("x", "z")] > w[("x", "y")]  # 1 vote vs 40: one more vote narrows x-z far more
    assert choose_pair(None, ["p", "q"], rng) in {("p", "q"), ("q", "p")}


def test_store_is_durable_and_refuses_a_second_vote(tmp_path):
    store = Store(tmp_path / "v.sqlite")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.add_battle("b1", "v1", "p", "typed", ("x", "y"), ("1", "2"), {"decoding": "greedy"})
    assert store.vote("b1", "v1", "tie") == ("x", "y")
    with pytest.raises(VoteError) as e:
        store.vote("b1", "v1", "a")
    assert e.value.status == 409
    with pytest.raises(VoteError):
        store.vote("b1", "v2", "a")
    (rec,) = list(store.records())
    assert rec["verdict"] == "tie" and rec["settings"] == {"decoding": "greedy"} and rec["voter"] == "v1"


def test_report_carries_human_ratings_and_export(arena_run, cli, tmp_path):
    from elasticmoe.arena import votes_path
    from elasticmoe.report import report_run

    store = Store(votes_path(arena_run))
    for i, verdict in enumerate(["a", "a", "tie", "both_bad", "b"]):
        store.add_battle(f"r{i}", "v", "p", "typed", ("c0", "parent"), ("x", "y"), {})
        store.vote(f"r{i}", "v", verdict)
    store.close()
    md = (report_run(arena_run), (arena_run / "report.md").read_text())[1]
    assert "People's blind votes (`elasticmoe arena`): 5 votes (intervals from 10 votes on)" in md
    assert "| c0 |" in md.split("People's blind votes")[1]
    out = tmp_path / "votes.jsonl"
    assert "wrote 5 votes" in cli("arena", arena_run, "--export", out).stdout
    assert [json.loads(line)["verdict"] for line in out.read_text().splitlines()] == ["a", "a", "tie", "both_bad", "b"]
