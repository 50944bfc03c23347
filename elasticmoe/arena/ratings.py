"""Ratings from people's votes, with the automatic arena's code, and the pair to show next.

Ratings: each vote is one game between the two models shown; "a" or "b" is a win for that side,
"tie" and "both bad" are half a win each (as Chatbot Arena counts both; Chiang et al. 2024).
The win matrix goes to `evaluate.bradley_terry` (the automatic arena's Bradley-Terry fit, 0.5
virtual wins per ordered pair) and is shown on the same Elo scale (1000 + 400 log10 strength).
95% intervals: percentile bootstrap over votes (votes resampled with replacement, seeded), given
from `MIN_VOTES_FOR_CI` votes on (a resample of one or two votes is the same votes again: a
zero-width interval that would claim a certainty nobody has).

Next pair: where one more vote shrinks the uncertainty most (Chatbot Arena's active sampling,
Chiang et al. 2024, section 5): pair (i, j) is drawn with probability proportional to
sqrt(V_ij / n_ij) - sqrt(V_ij / (n_ij + 1)), with V_ij the bootstrap variance of the rating
difference and n_ij the votes on the pair; pairs with no vote yet come first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..evaluate import bradley_terry

WIN_SHARE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # share of the game won by side A
MIN_VOTES_FOR_CI = 10


def _elo(wins: np.ndarray) -> np.ndarray:
    return 1000 + 400 * np.log10(bradley_terry(wins))


def _wins(a: np.ndarray, b: np.ndarray, share: np.ndarray, k: int) -> np.ndarray:
    wins = np.zeros((k, k))
    np.add.at(wins, (a, b), share)
    np.add.at(wins, (b, a), 1.0 - share)
    return wins


def leaderboard(
    outcomes: Sequence[tuple[str, str, str]], names: Sequence[str] = (), n_boot: int = 200, seed: int = 0
) -> dict[str, Any]:
    """Bradley-Terry ratings of every model in `names` or in `outcomes` ((model_a, model_b,
    verdict) per vote). Returns {"ratings": {name: {rating, ci, votes, wins, losses, ties,
    both_bad}}, "n_votes", "pair_votes": {"i|j": n}, "boot": array (n_boot x models) or None,
    "names"}; names sorted by rating."""
    names = sorted(set(names) | {m for a, b, _ in outcomes for m in (a, b)})
    index = {n: i for i, n in enumerate(names)}
    k, n = len(names), len(outcomes)
    a = np.array([index[o[0]] for o in outcomes], dtype=np.int64)
    b = np.array([index[o[1]] for o in outcomes], dtype=np.int64)
    share = np.array([WIN_SHARE[o[2]] for o in outcomes], dtype=np.float64)
    elo = _elo(_wins(a, b, share, k)) if k else np.zeros(0)
    boot = None
    if n >= MIN_VOTES_FOR_CI and k > 1:
        rng = np.random.default_rng(seed)
        rows = [rng.integers(0, n, n) for _ in range(n_boot)]
        boot = np.stack([_elo(_wins(a[r], b[r], share[r], k)) for r in rows])
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0) if boot is not None else (elo, elo)
    ratings = {}
    for i, name in enumerate(names):
        as_a, as_b = a == i, b == i
        verdicts = [o[2] for o in outcomes if index[o[0]] == i or index[o[1]] == i]
        ratings[name] = {
            "rating": float(elo[i]),
            "ci": [float(lo[i]), float(hi[i])] if boot is not None else None,
            "votes": int(as_a.sum() + as_b.sum()),
            "wins": int((as_a & (share == 1)).sum() + (as_b & (share == 0)).sum()),
            "losses": int((as_a & (share == 0)).sum() + (as_b & (share == 1)).sum()),
            "ties": verdicts.count("tie"),
            "both_bad": verdicts.count("both_bad"),
        }
    pairs: dict[str, int] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        key = "|".join(sorted((names[x], names[y])))
        pairs[key] = pairs.get(key, 0) + 1
    order = sorted(names, key=lambda m: -ratings[m]["rating"])
    return {"names": order, "ratings": {m: ratings[m] for m in order}, "n_votes": n, "pair_votes": pairs, "boot": boot}


def pair_weights(board: dict[str, Any], models: Sequence[str]) -> dict[tuple[str, str], float]:
    """Sampling weight of each unordered pair of `models`: the expected shrink of the standard
    error of their rating difference from one more vote; pairs never voted on get weight inf."""
    names = sorted(board["ratings"]) if board else []
    col = {n: i for i, n in enumerate(names)}
    boot = board.get("boot") if board else None
    out = {}
    for i, x in enumerate(models):
        for y in models[i + 1 :]:
            n = (board or {}).get("pair_votes", {}).get("|".join(sorted((x, y))), 0)
            if n == 0 or boot is None or x not in col or y not in col:
                out[(x, y)] = float("inf")
                continue
            var = float(np.var(boot[:, col[x]] - boot[:, col[y]]))
            out[(x, y)] = np.sqrt(var / n) - np.sqrt(var / (n + 1))
    return out


def choose_pair(board: dict[str, Any] | None, models: Sequence[str], rng: np.random.Generator) -> tuple[str, str]:
    """Two different models of `models` to show next, in random left/right order."""
    if len(models) < 2:
        raise ValueError("the arena needs at least two models")
    weights = pair_weights(board or {}, list(models))
    pairs = list(weights)
    unseen = [p for p in pairs if weights[p] == float("inf")]
    if unseen:
        pair = unseen[rng.integers(len(unseen))]
    else:
        w = np.array([weights[p] for p in pairs])
        w = w + 1e-12 if w.sum() <= 0 else w
        pair = pairs[rng.choice(len(pairs), p=w / w.sum())]
    return pair if rng.random() < 0.5 else (pair[1], pair[0])


def markdown_table(board: dict[str, Any], title: str) -> list[str]:
    """The leaderboard as a Markdown table (for the report)."""
    lines = [
        f"{title}: {board['n_votes']} vote{'' if board['n_votes'] == 1 else 's'}"
        + (f" (intervals from {MIN_VOTES_FOR_CI} votes on)" if board["n_votes"] < MIN_VOTES_FOR_CI else ""),
        "",
        "| model | rating | 95% CI | votes | wins | losses | ties | both bad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in board["ratings"].items():
        ci = f"[{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]" if r["ci"] else "-"
        lines.append(
            f"| {name} | {r['rating']:.0f} | {ci} | {r['votes']} | {r['wins']} | {r['losses']} | {r['ties']} | "
            f"{r['both_bad']} |"
        )
    return lines


def report_section(outcomes: Sequence[tuple[str, str, str]], automatic: dict[str, Any] | None) -> list[str]:
    """The report's arena section: people's ratings, and the automatic arena's (`eval`) beside them."""
    lines = ["## Arena ratings (Bradley-Terry, Elo scale, 95% bootstrap intervals)", ""]
    lines += markdown_table(leaderboard(outcomes), "People's blind votes (`elasticmoe arena`)")
    if automatic:
        lines += [
            "",
            f"Automatic arena (`eval`: the lower loss on the reference answer wins): {automatic['n_prompts']} prompts",
            "",
            "| model | rating | 95% CI | wins | losses | ties |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in sorted(automatic["ratings"].items(), key=lambda kv: -kv[1]["rating"]):
            lines.append(
                f"| {name} | {r['rating']:.0f} | [{r['ci'][0]:.0f}, {r['ci'][1]:.0f}] | {r['wins']} | {r['losses']} | "
                f"{r.get('ties', 0)} |"
            )
    return lines
