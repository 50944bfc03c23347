"""Structured skill by difficulty: exact match per level, drawn and tabled, and the retention verdict.

The seed's claim about an extracted model is per task: it keeps "search and structured reasoning"
and loses on high-entropy text. `retention_verdict` tests it for one child against its parent, on
the same test examples (`evaluate` keeps every example's outcome in order):

* structured retention, exact match = sum over examples of the child's correct answers / the
  parent's, over the examples of every (task, level) where the parent is right at least half the
  time (`MIN_PARENT_LEVEL`): below that, a ratio of near-zero counts measures nothing;
* structured retention, answer loss = sum of the parent's answer nats / the child's, over every
  structured example (teacher-forced, so defined at every level);
* text retention = the parent's bits / the child's over the same test documents (= bits-per-byte
  ratio, the bytes being the same).

1.0 is as good as the parent, < 1 worse. Each has a 95% percentile bootstrap interval resampling
its examples jointly for parent and child (paired). The verdict compares structured retention
(exact match where a level qualifies, else answer loss) with text retention: the interval of their
difference (structured and text examples resampled independently, being different examples);
above 0 "better", below 0 "worse", else "level".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import STRUCTURED_TASKS
from .evaluate import ANSWER_LOSS_SUFFIX, default_pairs

MIN_PARENT_LEVEL = 0.5  # a level counts for exact-match retention where the parent scores at least this
LEVEL_MEANING = {"kv": "key-value pairs", "arith": "operand digits", "sort": "numbers to sort", "find": "records"}


def _tasks(result: dict[str, Any]) -> dict[str, Any]:
    return result.get("tasks", result)


def _boot_ratios(num: np.ndarray, den: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """sum(num) / sum(den) over `n_boot` resamples of the items (rows resampled jointly)."""
    idx = rng.integers(0, len(num), (n_boot, len(num)))
    d = den[idx].sum(1)
    return np.where(d > 0, num[idx].sum(1) / np.where(d > 0, d, 1.0), np.nan)


def _measure(num: Sequence[float], den: Sequence[float], n_boot: int, rng) -> dict[str, Any] | None:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num) == 0 or den.sum() <= 0:
        return None
    boot = _boot_ratios(num, den, n_boot, rng)
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    return {"retention": float(num.sum() / den.sum()), "ci": [float(lo), float(hi)], "n": len(num), "_boot": boot}


def _paired(parent: dict, child: dict, key: str) -> bool:
    """Both results hold per-example outcomes of the same examples (same levels, same order)."""
    return (
        key in parent
        and key in child
        and len(parent[key]) == len(child[key])
        and parent.get("example_levels") == child.get("example_levels")
    )


def retention_verdict(parent: dict, child: dict, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The child's structured retention against its text retention (see the module docstring).

    `parent`, `child`: `evaluate` results (or their "tasks") on the same test examples. Returns
    {"exact_match", "answer_loss", "text": {retention, ci, n} or None, "levels": {task: [levels
    counted]}, "structured": which measure the verdict uses, "difference": {value, ci}, "verdict":
    "better" / "worse" / "level" / None (nothing to compare)}."""
    pt, ct = _tasks(parent), _tasks(child)
    rng = np.random.default_rng(seed)
    right_p, right_c, loss_p, loss_c, levels = [], [], [], [], {}
    for task in STRUCTURED_TASKS:
        p, c = pt.get(task), ct.get(task)
        if p and c and _paired(p, c, "per_example"):
            ok = sorted(int(lv) for lv, v in p.get("levels", {}).items() if v["exact_match"] >= MIN_PARENT_LEVEL)
            if ok:
                levels[task] = ok
            for a, b, lv in zip(p["per_example"], c["per_example"], p["example_levels"]):
                if lv in ok:
                    right_p.append(a)
                    right_c.append(b)
        p, c = pt.get(task + ANSWER_LOSS_SUFFIX), ct.get(task + ANSWER_LOSS_SUFFIX)
        if p and c and _paired(p, c, "per_example"):
            loss_p += p["per_example"]
            loss_c += c["per_example"]
    out: dict[str, Any] = {
        "exact_match": _measure(right_c, right_p, n_boot, rng),
        "answer_loss": _measure(loss_p, loss_c, n_boot, rng),
        "text": None,
        "levels": levels,
    }
    p, c = pt.get("text"), ct.get("text")
    if p and c and len(p.get("doc_bits", [])) == len(c.get("doc_bits", [])):
        out["text"] = _measure(p["doc_bits"], c["doc_bits"], n_boot, rng)
    which = "exact_match" if out["exact_match"] else "answer_loss"
    out["structured"] = which if out[which] else None
    out["difference"], out["verdict"] = None, None
    if out["structured"] and out["text"]:
        s, t = out[which], out["text"]
        diff = s["_boot"] - t["_boot"]
        lo, hi = np.nanquantile(diff, [0.025, 0.975])
        out["difference"] = {"value": s["retention"] - t["retention"], "ci": [float(lo), float(hi)]}
        out["verdict"] = "better" if lo > 0 else "worse" if hi < 0 else "level"
    for m in ("exact_match", "answer_loss", "text"):
        if out[m]:
            del out[m]["_boot"]
    return out


def verdicts(results: dict[str, dict], parent: str = "parent") -> list[dict[str, Any]]:
    """One verdict per child and state ("zero-shot" X, "fine-tuned" X-ft) of an eval's models."""
    if parent not in results:
        return []
    rows = []
    for label, (before, after) in default_pairs(list(results), parent).items():
        for state, name in (("zero-shot", before), ("fine-tuned", after)):
            if name is not None:
                rows.append(
                    {"child": label, "state": state, "model": name, **retention_verdict(results[parent], results[name])}
                )
    return rows


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """mean(a) - mean(b) over the same examples, with a percentile bootstrap 95% interval
    resampling the examples jointly."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    return {"value": float(d.mean()), "ci": [float(lo), float(hi)], "n": len(d)}


def targeted_comparison(results: dict[str, dict], child: str, like: str, objective: dict[str, float]) -> list[dict]:
    """A search-targeted child against the general child of the same constraints (`like`), zero-shot
    and fine-tuned, on each structured task its objective weighs: exact match and answer loss,
    paired over the same test examples. "better" when the exact-match interval is above 0."""
    rows = []
    for state, suffix in (("zero-shot", ""), ("fine-tuned", "-ft")):
        a, b = results.get(child + suffix), results.get(like + suffix)
        if a is None or b is None:
            continue
        for task in [t for t, w in objective.items() if w > 0 and t in STRUCTURED_TASKS]:
            ta, tb = _tasks(a).get(task), _tasks(b).get(task)
            if not (ta and tb and _paired(ta, tb, "per_example")):
                continue
            em = paired_difference(ta["per_example"], tb["per_example"])
            la, lb = _tasks(a).get(task + ANSWER_LOSS_SUFFIX), _tasks(b).get(task + ANSWER_LOSS_SUFFIX)
            loss = paired_difference(la["per_example"], lb["per_example"]) if la and lb else None
            verdict = "better" if em["ci"][0] > 0 else "worse" if em["ci"][1] < 0 else "level"
            rows.append({"child": child, "like": like, "state": state, "task": task, "exact_match": em,
                         "answer_loss": loss, "verdict": verdict})  # fmt: skip
    return rows


def targeted_line(r: dict[str, Any]) -> str:
    em, loss = r["exact_match"], r["answer_loss"]
    text = (
        f"- {r['child']} vs {r['like']} ({r['state']}) on {r['task']}: **{r['verdict']}**; exact match "
        f"{em['value']:+.3f} [{em['ci'][0]:+.3f}, {em['ci'][1]:+.3f}] (n={em['n']})"
    )
    if loss:
        text += f", answer loss {loss['value']:+.3f} [{loss['ci'][0]:+.3f}, {loss['ci'][1]:+.3f}] nats/token"
    return text + " (targeted minus general, paired 95% interval)"


def _targeted_children(run_dir: Path) -> dict[str, dict]:
    """{child: {"like", "objective"}} of the search-targeted children a pipeline run chose."""
    import json

    state = Path(run_dir) / "pipeline.json"
    if not state.is_file():
        return {}
    chosen = json.loads(state.read_text()).get("phases", {}).get("search", {}).get("outputs", {}).get("children", {})
    return {name: ch for name, ch in chosen.items() if ch.get("like") and ch.get("objective")}


def _ci(m: dict | None) -> str:
    return "n/a" if m is None else f"{m['retention']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"


def verdict_line(v: dict[str, Any]) -> str:
    """One report line: the child's structured retention against its text retention."""
    head = f"- {v['child']} ({v['state']}): "
    if v["verdict"] is None:
        return head + "no verdict (the parent's and the child's evaluations do not share examples of both kinds)"
    counted = "; ".join(f"{t} {', '.join(map(str, lv))}" for t, lv in v["levels"].items())
    em = (
        f"exact match {_ci(v['exact_match'])} (levels where the parent >= {MIN_PARENT_LEVEL:.0%}: {counted}; "
        f"n={v['exact_match']['n']})"
        if v["exact_match"]
        else f"exact match n/a (no level where the parent reaches {MIN_PARENT_LEVEL:.0%})"
    )
    d = v["difference"]
    basis = "exact match" if v["structured"] == "exact_match" else "answer loss"
    return (
        head
        + f"structured retained **{v['verdict']}** than text"
        + (" (level with it)" if v["verdict"] == "level" else "")
        + f": {basis} retention minus text retention {d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]; "
        + f"{em}; answer loss {_ci(v['answer_loss'])}; text bits/byte {_ci(v['text'])}"
    ).replace("**level** than text (level with it)", "**level** with text")


def level_table(results: dict[str, dict], task: str) -> list[str]:
    """Markdown rows: one per model holding `task`'s levels, exact match [Wilson 95%] per level."""
    having = {name: _tasks(r)[task]["levels"] for name, r in results.items() if "levels" in _tasks(r).get(task, {})}
    if not having:
        return []
    levels = sorted({int(lv) for lv_map in having.values() for lv in lv_map})
    lines = ["| model | " + " | ".join(f"{task} {lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
    for name, lv_map in having.items():
        cells = []
        for lv in levels:
            v = lv_map.get(str(lv))
            cells.append(f"{v['exact_match']:.2f} [{v['lo']:.2f}, {v['hi']:.2f}] (n={v['n']})" if v else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_levels(results: dict[str, dict], task: str, out_png: Path | str, parent: str = "parent") -> Path | None:
    """Exact match against level for `task`: the parent (black) and every child as lines, zero-shot
    dashed and fine-tuned solid in one colour per child, with Wilson 95% intervals as error bars."""
    having = {name: _tasks(r)[task]["levels"] for name, r in results.items() if "levels" in _tasks(r).get(task, {})}
    if not having:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({int(lv) for lv_map in having.values() for lv in lv_map})
    pairs = default_pairs([n for n in having if n != parent], parent)
    colours = {label: plt.get_cmap("tab10")(i % 10) for i, label in enumerate(pairs)}
    style = {parent: ("black", "-", 2.2)}
    for label, (before, after) in pairs.items():
        style.update({before: (colours[label], "--", 1.3), after: (colours[label], "-", 1.6)})
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for k, (name, lv_map) in enumerate(having.items()):
        colour, line, width = style.get(name, ("grey", ":", 1.0))
        xs = [lv for lv in levels if str(lv) in lv_map]
        ys = np.array([lv_map[str(lv)]["exact_match"] for lv in xs])
        err = np.array([[y - lv_map[str(lv)]["lo"], lv_map[str(lv)]["hi"] - y] for lv, y in zip(xs, ys)]).T
        shift = (k - (len(having) - 1) / 2) * 0.03  # side by side, so the error bars stay readable
        pos = [levels.index(lv) + shift for lv in xs]
        ax.errorbar(
            pos, ys, yerr=err, color=colour, linestyle=line, linewidth=width, marker="o", ms=3, capsize=2, label=name
        )
    ax.set_xticks(range(len(levels)), [str(lv) for lv in levels])
    ax.set_xlabel(f"level ({LEVEL_MEANING.get(task, 'difficulty')})")
    ax.set_ylabel("exact match (Wilson 95%)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{task}: exact match by level (dashed: zero-shot, solid: fine-tuned)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def skills_section(run_dir: Path, results: dict[str, dict], parent: str = "parent") -> tuple[str, dict[str, Any]]:
    """The report's section on structured skill: per task, the table and plot (levels_<task>.png in
    RUN_DIR) of exact match by level, then one retention verdict line per child and state."""
    if parent not in results:
        return "", {}
    lines = ["", "## Structured skill by level (exact match, Wilson 95%)", ""]
    plots = {}
    for task in STRUCTURED_TASKS:
        rows = level_table(results, task)
        if not rows:
            continue
        png = plot_levels(results, task, Path(run_dir) / f"levels_{task}.png", parent)
        plots[task] = str(png)
        lines += rows + ["", f"![{task} by level]({png.name})", ""]
    found = verdicts(results, parent)
    if found:
        lines += [
            "### Structured skill vs text: retention = child / parent (1.0 = as good), paired 95% intervals",
            "",
        ]
        lines += [verdict_line(v) for v in found]
    compared = []
    for name, ch in _targeted_children(run_dir).items():
        compared += targeted_comparison(results, name, ch["like"], ch["objective"])
    if compared:
        lines += ["", "### Search-targeted child against the general child of the same constraints", ""]
        lines += [targeted_line(r) for r in compared]
    return "\n".join(lines) + "\n", {"plots": plots, "verdicts": found, "targeted": compared}
