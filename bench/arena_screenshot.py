"""The README's screenshots of the arena: a real run's models, served by `elasticmoe arena`, in
headless Chromium (Debian's chromium + chromedriver, `make browser`).

The votes are cast by a scripted judge, not by people: on held-out `sort` prompts it prefers the
answer whose first len(answer) characters match the correct sorted list in more positions (a tie
when equal, "both bad" when neither matches anywhere).

    python bench/arena_screenshot.py RUN_DIR --votes 12 --out bench/arena
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_arena import Server, wait_for  # noqa: E402 - the tests' server and browser helpers


def judge(prompt: str, a: str, b: str) -> str:
    digits = prompt.split(":", 1)[1].split("->")[0].split()
    truth = " ".join(sorted(digits))
    score = [sum(x == y for x, y in zip(answer.strip(), truth)) for answer in (a, b)]
    if score[0] == score[1]:
        return "both_bad" if score[0] == 0 else "tie"
    return "a" if score[0] > score[1] else "b"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--out", default="bench/arena")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(args.run_dir), "--db", str(Path(tmp) / "votes.sqlite"), "--max-new-tokens", "24")
        try:
            driver.get(server.url)
            cast = 0
            while cast < args.votes:
                driver.find_element(By.ID, "draw").click()
                wait_for(lambda: driver.find_element(By.ID, "status").text.startswith("drawn"))
                prompt = driver.find_element(By.ID, "prompt").get_attribute("value")
                if not prompt.startswith("sort:"):
                    driver.find_element(By.ID, "prompt").clear()
                    continue
                driver.find_element(By.ID, "ask").click()
                wait_for(lambda: driver.find_element(By.ID, "vote-a").is_enabled())
                a, b = (driver.find_element(By.ID, f"answer-{s}").text for s in "ab")
                driver.find_element(By.ID, f"vote-{judge(prompt, a, b)}").click()
                wait_for(lambda: "A was" in driver.find_element(By.ID, "result").text)
                cast += 1
                if cast == args.votes:
                    driver.save_screenshot(str(out / "page.png"))
                else:
                    driver.find_element(By.ID, "prompt").clear()
            driver.get(server.url + "leaderboard")
            driver.save_screenshot(str(out / "leaderboard.png"))
        finally:
            server.stop()
            driver.quit()
    print(f"wrote {out / 'page.png'} and {out / 'leaderboard.png'}")


if __name__ == "__main__":
    main()
