"""Does the elastic-vs-alternative gap move with the training budget? (issue 23, part 4)

Reads runs of `elasticmoe run --baselines all` (any `--children` holding the compared child,
`--child`, ernie51-shape by default) made at several token budgets, groups them by budget (train.steps x
batch_size x seq_len from each run's recipe.yaml), and for each budget prints the reference
child's text bits/byte for the elastic recipe (after its fine-tune), from scratch and retrofit-4x +
fine-tune, the relative gaps with each seed's 95% paired interval over the same test documents,
and each method's all-in FLOPs as a multiple of from scratch. `--plot` draws the gaps against the
budget (one point per run, the mean as a line).

    python bench/recipe_scale.py runs/scale/t250k-s0 runs/scale/t500k-s0 runs/fam23/warm80-s0 \\
        --plot bench/recipe-results/scale.png > table.md

Launch the runs with bench/recipe-results/scale-launch.sh (resumable: a rerun skips finished phases).

`--pair A=B` instead compares two runs of the same seed: A's elastic + fine-tune child against B's
retrofit-4x + fine-tune child (B a `--baselines all` run), paired over the same test documents,
with A's all-in FLOPs as a multiple of B's retrofit-4x (the switch at retrofit-4x's FLOPs):

    python bench/recipe_scale.py --pair runs/scale/ff0.714-1400-s0=runs/fam23/warm80-s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

import yaml

from elasticmoe.methods import _text, paired_text_diff

ELASTIC, SCRATCH = "elastic + fine-tune", "from scratch"
RIVALS = {"scratch": SCRATCH, "retrofit-4x": "retrofit-4x + fine-tune"}


def budget(run: Path) -> int:
    """Training tokens of the run's parent: steps x batch x sequence length."""
    r = yaml.safe_load((run / "recipe.yaml").read_text())
    return int(r["train"]["steps"]) * int(r["train"]["batch_size"]) * int(r["data"]["seq_len"])


def run_figures(run: Path, child: str = "ernie51-shape") -> dict:
    """One child of one run: text per method, gaps with paired intervals, cost vs scratch."""
    report = json.loads((run / "report.json").read_text())
    children = (report.get("methods") or {}).get("children") or {}
    if child not in children:
        raise ValueError(f"{run}/report.json has no methods table for {child}: run it with --baselines all")
    info = children[child]
    rows = {r["method"]: r for r in info["rows"]}
    missing = [m for m in (ELASTIC, *RIVALS.values()) if not _text(rows.get(m))]
    if missing:
        raise ValueError(f"{run}: {child} has no text score for {', '.join(missing)}")
    ours = _text(rows[ELASTIC])
    out = {"run": str(run), "tokens": budget(run), "child": child, "text": {"elastic": ours["score"]}, "gap": {}}
    scratch_cost = rows[SCRATCH]["cost"]["all-in"]
    out["cost"] = {"elastic": rows[ELASTIC]["cost"]["all-in"] / scratch_cost}
    for key, method in RIVALS.items():
        theirs = _text(rows[method])
        out["text"][key] = theirs["score"]
        out["cost"][key] = rows[method]["cost"]["all-in"] / scratch_cost
        ci = paired_text_diff(ours, theirs)  # elastic minus rival, bits/byte
        out["gap"][key] = {
            "rel": ours["score"] / theirs["score"] - 1,
            "diff": ours["score"] - theirs["score"],
            "ci": list(ci) if ci else None,
        }
    return out


def pair(a: Path, b: Path, child: str = "ernie51-shape") -> dict:
    """A's fine-tuned elastic child against B's retrofit-4x + fine-tune child (same seed and data)."""
    rows = []
    for run in (a, b):
        children = (json.loads((run / "report.json").read_text()).get("methods") or {}).get("children") or {}
        if child not in children:
            raise ValueError(f"{run}/report.json has no methods table for {child}")
        rows.append({r["method"]: r for r in children[child]["rows"]})
    ours, theirs = rows[0].get(ELASTIC), rows[1].get(RIVALS["retrofit-4x"])
    if not (_text(ours) and _text(theirs)):
        raise ValueError(f"{a} needs an {ELASTIC} row and {b} a {RIVALS['retrofit-4x']} row with text scores")
    ci = paired_text_diff(_text(ours), _text(theirs))
    return {
        "a": str(a),
        "b": str(b),
        "elastic": _text(ours)["score"],
        "retrofit-4x": _text(theirs)["score"],
        "diff": _text(ours)["score"] - _text(theirs)["score"],
        "ci": list(ci) if ci else None,
        "flops_ratio": ours["cost"]["all-in"] / theirs["cost"]["all-in"],
    }


def render_pairs(pairs: list[dict]) -> str:
    lines = [
        "| elastic run (A) | retrofit-4x from (B) | A: elastic + ft | B: retrofit-4x + ft | A minus B [95% paired] "
        "| A's all-in FLOPs / B's |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        ci = f" [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]" if p["ci"] else ""
        lines.append(
            f"| {p['a']} | {p['b']} | {p['elastic']:.3f} | {p['retrofit-4x']:.3f} | {p['diff']:+.3f}{ci} "
            f"| {p['flops_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _pm(values: list[float], fmt: str) -> str:
    half = (max(values) - min(values)) / 2
    return fmt.format(mean(values)) + (f" ± {fmt.format(half).lstrip('+')}" if len(values) > 1 else "")


def render(figs: list[dict]) -> str:
    by: dict[int, list[dict]] = {}
    for f in figs:
        by.setdefault(f["tokens"], []).append(f)
    lines = [
        "| budget (tokens) | runs | elastic + ft | from scratch | retrofit-4x + ft | vs scratch | vs retrofit-4x "
        "| all-in FLOPs vs scratch: elastic / retrofit-4x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tokens in sorted(by):
        group = by[tokens]
        text = [_pm([f["text"][k] for f in group], "{:.3f}") for k in ("elastic", "scratch", "retrofit-4x")]
        gaps = [_pm([100 * f["gap"][k]["rel"] for f in group], "{:+.1f}%") for k in RIVALS]
        costs = " / ".join(_pm([f["cost"][k] for f in group], "{:.2f}x") for k in ("elastic", "retrofit-4x"))
        lines.append(f"| {tokens:,} | {len(group)} | " + " | ".join(text + gaps) + f" | {costs} |")
    lines += ["", "Per run: elastic minus the alternative, bits/byte, with its 95% paired interval", ""]
    lines += ["| run | budget | child | vs scratch | vs retrofit-4x |", "|---|---|---|---|---|"]
    for f in sorted(figs, key=lambda f: (f["tokens"], f["run"])):
        cells = []
        for k in RIVALS:
            g = f["gap"][k]
            ci = f" [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]" if g["ci"] else ""
            cells.append(f"{g['diff']:+.3f}{ci}")
        lines.append(f"| {f['run']} | {f['tokens']:,} | {f['child']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(figs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, color in zip(RIVALS, ("tab:blue", "tab:orange")):
        xs = sorted({f["tokens"] for f in figs})
        for f in figs:
            ax.scatter(f["tokens"], 100 * f["gap"][key]["rel"], color=color, alpha=0.5, s=18)
        means = [mean(100 * f["gap"][key]["rel"] for f in figs if f["tokens"] == x) for x in xs]
        ax.plot(xs, means, color=color, marker="o", label=f"elastic + fine-tune vs {key}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parent training tokens")
    ax.set_ylabel("text bits/byte gap, % (above 0: elastic worse)")
    ax.set_title(f"ERNIE-shaped child: the gap against the budget ({figs[0]['child']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--pair", action="append", default=[], metavar="A=B", help="A's elastic child vs B's retrofit-4x")
    p.add_argument("--child", default="ernie51-shape", help="the child compared (a name from --children)")
    p.add_argument("--plot", type=Path, help="write the gap-vs-budget plot here (png)")
    p.add_argument("--json", type=Path, help="write each run's figures here")
    args = p.parse_args(argv)
    if args.pair:
        try:
            pairs = [pair(Path(a), Path(b), args.child) for a, _, b in (x.partition("=") for x in args.pair)]
        except (ValueError, OSError) as exc:
            print(exc, file=sys.stderr)
            return 2
        print(render_pairs(pairs), end="")
        return 0
    if not args.runs:
        print("give run folders, or --pair A=B", file=sys.stderr)
        return 2
    missing = [str(r) for r in args.runs if not (r / "report.json").is_file() or not (r / "recipe.yaml").is_file()]
    if missing:
        print(f"no report.json/recipe.yaml in {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        figs = [run_figures(r, args.child) for r in args.runs]
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(render(figs), end="")
    if args.plot:
        plot(figs, args.plot)
    if args.json:
        args.json.write_text(json.dumps(figs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
