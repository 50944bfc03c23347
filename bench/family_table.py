"""The family table across seeds: every child, every method, quality and cost (issue 14).

Reads the `methods` section of each run's report.json (written by `elasticmoe run --baselines all`)
and prints markdown: per child and method the text bits/byte and each structured task's answer
loss (nats/token; exact match where any model gets one right), as the mean over the runs with the
spread (half the range: with 2 seeds, mean +- spread covers both), and the marginal / all-in /
amortized FLOPs as multiples of the named baseline: that child's architecture trained from scratch.

    python bench/family_table.py runs/family-s0 runs/family-s1 > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

COSTS = ("marginal", "all-in", "amortized")


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    m = mean(values)
    half = (max(values) - min(values)) / 2
    return f"{m:.3f} ± {half:.3f}" if len(values) > 1 else f"{m:.3f}"


def _task_scores(ev: dict | None) -> dict[str, float]:
    if not ev:
        return {}
    tasks = ev.get("tasks", {})
    out = {name: t["score"] for name, t in tasks.items() if isinstance(t, dict) and "score" in t}
    return out


def collect(runs: list[Path]) -> tuple[dict, dict, list[str]]:
    """({child: {method: {metric: [values], cost: {kind: [x of scratch]}}}}, parent rows, metrics)."""
    table: dict[str, dict[str, dict]] = {}
    parent: dict[str, dict[str, list[float]]] = {}
    metrics: list[str] = []
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        methods = report.get("methods") or {}
        for name, entry in (methods.get("parent") or {}).items():
            if isinstance(entry, dict) and entry.get("eval"):
                slot = parent.setdefault(name, {})
                for metric, score in _task_scores(entry["eval"]).items():
                    slot.setdefault(metric, []).append(score)
                slot.setdefault("flops", []).append(entry.get("flops", 0.0))
        k = len(report.get("children") or []) or 1  # the family size the run amortized over
        for child, info in (methods.get("children") or {}).items():
            scratch = info.get("scratch_flops")
            for row in info.get("rows", []):
                slot = table.setdefault(child, {}).setdefault(row["method"], {"cost": {}})
                for metric, score in _task_scores(row.get("eval")).items():
                    if metric not in metrics:
                        metrics.append(metric)
                    slot.setdefault(metric, []).append(score)
                for kind in COSTS:
                    value = (row.get("cost") or {}).get(kind)
                    if value is not None and scratch:
                        slot["cost"].setdefault(kind, []).append(value / scratch)
                cost = row.get("cost") or {}
                if scratch and k > 1 and cost.get("all-in") is not None and cost.get("amortized") is not None:
                    # all-in = F + m and amortized = F / k + m: the part shared by the family (F: the
                    # elastic parent; the dense parent; the dense parent + its one retrofit) and this
                    # child's own part (m), whatever the method's "marginal" column counts
                    shared = (cost["all-in"] - cost["amortized"]) * k / (k - 1)
                    slot.setdefault("abs", []).append((shared, cost["all-in"] - shared, scratch))
    return table, parent, metrics


def render(runs: list[Path]) -> str:
    table, parent, metrics = collect(runs)
    shown = ["text"] + [m for m in metrics if m.endswith("/answer-loss")]
    exact = [
        m
        for m in metrics
        if m not in shown and any(max(rows.get(m) or [0]) > 0 for c in table.values() for rows in c.values())
    ]
    shown += exact
    lines = [f"Runs: {', '.join(str(r) for r in runs)} (mean ± half the range over the {len(runs)} runs)", ""]
    if parent:
        lines += ["| parent | training FLOPs | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
        for name, slot in parent.items():
            cells = [_spread(slot.get(m, [])) for m in shown]
            lines.append(f"| {name} | {mean(slot['flops']):.2e} | " + " | ".join(cells) + " |")
        lines.append("")
    for child, methods in table.items():
        lines += [f"### {child}", ""]
        header = "| method | " + " | ".join(shown) + " | " + " | ".join(f"{k} FLOPs (x scratch)" for k in COSTS) + " |"
        lines += [header, "|---" * (len(shown) + len(COSTS) + 1) + "|"]
        for method, slot in methods.items():
            cells = [_spread(slot.get(m, [])) for m in shown]
            costs = [f"{mean(slot['cost'][k]):.2f}" if slot["cost"].get(k) else "-" for k in COSTS]
            lines.append(f"| {method} | " + " | ".join(cells + costs) + " |")
        lines.append("")
    lines += family_sizes(table)
    return "\n".join(lines)


def family_sizes(table: dict, sizes: tuple[int, ...] = (1, 2, 3, 5, 10, 20)) -> list[str]:
    """FLOPs of a family of n children per method, as a multiple of training the n from scratch.

    A method's cost is one fixed part shared by the family (the elastic parent; the dense parent;
    the dense parent + its retrofit, which serves every child) plus a per-child part, both solved
    from the all-in and amortized figures; both are the means over the children and runs measured
    here, and scratch is the mean from-scratch cost of those children."""
    per_method: dict[str, list[tuple[float, float, float]]] = {}
    quality: dict[str, list[float]] = {}
    for methods in table.values():
        for method, slot in methods.items():
            per_method.setdefault(method, []).extend(slot.get("abs", []))
            quality.setdefault(method, []).extend(slot.get("text", []))
    if not per_method:
        return []
    head = "| method | text bits/byte (mean over children and runs) | " + " | ".join(f"n={n}" for n in sizes) + " |"
    lines = [
        "### Family cost: FLOPs for n children as a multiple of training those n from scratch",
        "",
        head,
        "|---" * (len(sizes) + 2) + "|",
    ]
    for method, parts in per_method.items():
        if not parts:
            continue
        fixed = mean(p[0] for p in parts)
        marginal = mean(p[1] for p in parts)
        scratch = mean(p[2] for p in parts)
        cells = [f"{(fixed + n * marginal) / (n * scratch):.2f}" for n in sizes]
        q = quality.get(method) or []
        lines.append(
            f"| {method} | {mean(q):.3f} | " + " | ".join(cells) + " |"
            if q
            else f"| {method} | - | " + " | ".join(cells) + " |"
        )
    lines.append("")
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    runs = [Path(a) for a in argv]
    missing = [str(r) for r in runs if not (r / "report.json").is_file()]
    if missing:
        print(f"no report.json in {', '.join(missing)} (run `elasticmoe run --baselines all` first)", file=sys.stderr)
        return 2
    print(render(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
