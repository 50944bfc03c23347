"""Recipes judged on the family (issue 23, part 3): for each recipe arm, its runs of
`elasticmoe run --baselines all` (one per seed), the elastic children against the alternatives
each run trained for the same shapes, and what a family of n children costs.

    python bench/recipe_family.py default=runs/fam23/default-s0,runs/fam23/default-s1 \\
        warm80=runs/fam23/warm80-s0,runs/fam23/warm80-s1 > table.md

Every comparison is inside a run (same seed, same data, same child shapes: the search ran on that
run's parent, so the shapes differ between arms and seeds), then averaged over the run's children;
a cell is the mean over the arm's runs ± half their range. Text quality is bits/byte on the test
split (lower is better); `vs` columns are relative differences (negative: the elastic child is
better). Family cost: FLOPs for n children as a multiple of training the same n from scratch
(`family_table.family_sizes`' split of each method's cost into the part the family shares and
each child's own part).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_table import _spread, collect  # noqa: E402

ELASTIC_FT, ELASTIC_ZS, SCRATCH = "elastic + fine-tune", "elastic, zero-shot", "from scratch"
SIZES = (1, 3, 10)


def _retrofit4x(methods: dict) -> str | None:
    return next((m for m in methods if "retrofit" in m and "4x" in m and m.endswith("+ fine-tune")), None)


def _cell(values: list[float], pct: bool = False) -> str:
    if not values or not pct:
        return _spread(values)
    m, half = mean(values), (max(values) - min(values)) / 2
    return f"{100 * m:+.1f}%" + (f" ± {100 * half:.1f}" if len(values) > 1 else "")


def run_summary(run: Path) -> dict[str, float]:
    """One run's figures: parent vs dense, children's gaps (means over its children), family costs."""
    table, parent, _ = collect([run])
    report = json.loads((run / "report.json").read_text())
    out: dict[str, float] = {}
    methods_parent = (report.get("methods") or {}).get("parent") or {}
    if "flops_per_token_vs_dense" in methods_parent:
        out["flops_per_token_vs_dense"] = methods_parent["flops_per_token_vs_dense"]
    for name, slot in parent.items():
        if slot.get("text"):
            out[f"parent:{name}"] = slot["text"][0]
    gaps: dict[str, list[float]] = {}
    costs: dict[str, list[tuple[float, float, float]]] = {}
    for methods in table.values():
        ft, zs, scratch = (methods.get(m, {}).get("text", [None])[0] for m in (ELASTIC_FT, ELASTIC_ZS, SCRATCH))
        r4 = _retrofit4x(methods)
        r4_text = methods[r4].get("text", [None])[0] if r4 else None
        for key, a, b in (("ft_vs_scratch", ft, scratch), ("zs_vs_scratch", zs, scratch), ("ft_vs_r4", ft, r4_text)):
            if a is not None and b:
                gaps.setdefault(key, []).append(a / b - 1)
        for key, method in (("elastic", ELASTIC_FT), ("retrofit-4x", r4)):
            if method and methods[method].get("abs"):
                costs.setdefault(key, []).extend(methods[method]["abs"])
        for key, method in (("text:elastic", ELASTIC_FT), ("text:scratch", SCRATCH), ("text:retrofit-4x", r4)):
            if method and methods.get(method, {}).get("text"):
                gaps.setdefault(key, []).append(methods[method]["text"][0])
    out.update({k: mean(v) for k, v in gaps.items()})
    for key, parts in costs.items():
        fixed, own, scratch = (mean(p[i] for p in parts) for i in range(3))
        for n in SIZES:
            out[f"cost:{key}:n={n}"] = (fixed + n * own) / (n * scratch)
    return out


def render(arms: dict[str, list[Path]]) -> str:
    summaries = {arm: [run_summary(r) for r in runs] for arm, runs in arms.items()}

    def col(arm: str, key: str, pct: bool = False) -> str:
        return _cell([s[key] for s in summaries[arm] if key in s], pct)

    lines = [
        "| arm | runs | train FLOPs/token vs dense | parent text | dense, equal tokens | dense, equal FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    for arm, runs in arms.items():
        ratio = [s["flops_per_token_vs_dense"] for s in summaries[arm] if "flops_per_token_vs_dense" in s]
        lines.append(f"| {arm} | {len(runs)} | {mean(ratio):.2f}x | " if ratio else f"| {arm} | {len(runs)} | - | ")
        lines[-1] += " | ".join(col(arm, f"parent:{k}") for k in ("elastic", "equal tokens", "equal FLOPs"))
        lines[-1] += " |"
    lines += [
        "",
        "Children (mean over a run's children, then over runs): text bits/byte and relative gaps",
        "",
        "| arm | elastic + fine-tune | from scratch | retrofit-4x + fine-tune | fine-tuned vs scratch "
        "| fine-tuned vs retrofit-4x | zero-shot vs scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        cells = [col(arm, k) for k in ("text:elastic", "text:scratch", "text:retrofit-4x")]
        cells += [col(arm, k, pct=True) for k in ("ft_vs_scratch", "ft_vs_r4", "zs_vs_scratch")]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Family cost: FLOPs for n children as a multiple of training those n from scratch",
        "",
        "| arm | method | " + " | ".join(f"n={n}" for n in SIZES) + " |",
        "|---|---|" + "---|" * len(SIZES),
    ]
    for arm in arms:
        for method in ("elastic", "retrofit-4x"):
            cells = [col(arm, f"cost:{method}:n={n}") for n in SIZES]
            lines.append(f"| {arm} | {method} + fine-tune | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    arms: dict[str, list[Path]] = {}
    for arg in argv:
        name, sep, paths = arg.partition("=")
        if not sep or not paths:
            print(f"expected ARM=RUN[,RUN...], got {arg!r}", file=sys.stderr)
            return 2
        arms[name] = [Path(p) for p in paths.split(",")]
    missing = [str(r) for runs in arms.values() for r in runs if not (r / "report.json").is_file()]
    if not arms or missing:
        print(f"no report.json in {', '.join(missing) or '(no runs given)'}", file=sys.stderr)
        return 2
    print(render(arms), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
