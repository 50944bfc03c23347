"""The structured-task format ablation (issue 24): which formats and level mixes a small model learns.

Each arm trains `tiny`'s full network alone (`sampling.full_fraction=1.0`: every step's gradient
goes to the largest network, the fast proxy for the parent used in bench/TASKS.md) on the embedded
corpus with some `data.task_spec` fields changed (or the level curriculum, `data.curriculum`), then
scores the parent on the test split: exact match per level (Wilson 95%), answer loss per task, text
bits/byte. Arms share the seed, model, steps and tokens; only the structured data differs. One JSON
line per (arm, seed) in --out; a rerun skips the lines already there.

    OMP_NUM_THREADS=1 python bench/task_formats.py --arms default not-reversed --seeds 0 1 \
        --root runs/task-formats --out bench/task-formats/results.jsonl
    python bench/task_formats.py --table bench/task-formats/results.jsonl
    python bench/task_formats.py --table bench/task-formats/curriculum.jsonl --versus default curriculum
    OMP_NUM_THREADS=1 python bench/task_formats.py --config small --arms preset --seeds 0 \
        --out bench/task-formats/small.jsonl      # the small preset's elastic parent as it is
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# arm -> recipe overrides of the structured data. The base (COMMON) is `tiny` as it was before the
# document-mask ablation changed its presets: levels, kv every key queried, arith reversed and
# zero-padded, sort over 0-3, find 3 queries, a uniform mix over levels, packed rows unmasked. So
# `default` is that base, and every arm's rows stay reproducible after the presets moved on.
ARMS = {
    "default": [],
    "not-reversed": ["data.task_spec.arith_reversed=false"],  # arith answers most-significant digit first
    "easy-first": ["data.task_spec.level_weights=[4,3,2,1]"],  # the mix leans to the easy levels
    "small-alphabet": ["data.task_spec.sort_value_max=3"],  # sort over 0-3 instead of 0-9
    "one-query": ["data.task_spec.find_queries=1"],  # find: one query per example instead of 3
    # the levels enter easiest first, one every 1/8 of the run (all four from 3/8 of it on)
    "curriculum": ["data.curriculum=0.5"],
    # packed rows: each example attends only to itself (model.document_mask), no earlier example in view
    "doc-mask": ["data.document_mask=true"],
    # both: the mix leans to the easy levels, each example alone in its attention
    "doc-mask-easy-first": ["data.document_mask=true", "data.task_spec.level_weights=[4,3,2,1]"],
    "doc-mask-easier-first": ["data.document_mask=true", "data.task_spec.level_weights=[8,4,2,1]"],
    "doc-mask-steeper": ["data.document_mask=true", "data.task_spec.level_weights=[16,8,4,1]"],
    # the preset exactly as it is (no COMMON): the elastic parent, with today's formats and schedule
    "preset": None,
}
COMMON = ["sampling.full_fraction=1.0", "data.document_mask=false", "data.task_spec.level_weights=[]"]


def commands(arm: str, seed: int, out: Path, examples: int, config: str = "tiny") -> list[list[str]]:
    sets = [f"train.seed={seed}", *([] if ARMS[arm] is None else [*COMMON, *ARMS[arm]])]
    train = ["elasticmoe", "train", "--config", config, *(x for s in sets for x in ("--set", s)), "--out", str(out)]
    evaluate = ["elasticmoe", "eval", str(out / "parent"), "--examples", str(examples), "--out", str(out / "eval.json")]
    return [train + ["--quiet"], evaluate]


def summary(eval_json: Path) -> dict:
    """Per task: exact match per level, answer loss; text bits/byte."""
    model = json.loads(eval_json.read_text())["models"]
    tasks = next(iter(model.values()))["tasks"]
    out: dict = {}
    for task, r in tasks.items():
        if "levels" in r and r["metric"] == "exact_match":
            out[task] = {
                lv: [round(v["exact_match"], 3), round(v["lo"], 3), round(v["hi"], 3), v["n"]]
                for lv, v in r["levels"].items()
            }
        elif task.endswith("/answer-loss"):
            out[task] = round(r["score"], 4)
            out[task + "/levels"] = {lv: round(v["answer_loss"], 4) for lv, v in r["levels"].items()}
        elif r["metric"] == "bits_per_byte":
            out[task] = round(r["score"], 4)
    return out


def run(arms: list[str], seeds: list[int], root: Path, out: Path, examples: int, config: str = "tiny") -> None:
    """Each (arm, seed) not yet in `out`: train, evaluate, append a line. Another preset than tiny
    names its rows `config:arm`."""
    done = set()
    if out.is_file():
        done = {(r["arm"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seeds outermost: a cut-short ablation still holds every arm of seed 0
        for arm in arms:
            name = arm if config == "tiny" else f"{config}:{arm}"
            if (name, seed) in done:
                continue
            folder = root / f"{name.replace(':', '-')}-s{seed}"
            cmds = commands(arm, seed, folder, examples, config)
            t0 = time.time()
            for cmd in cmds:
                subprocess.run([sys.executable, "-m", "elasticmoe", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
            row = {"arm": name, "seed": seed, "overrides": ARMS[arm], "commands": [" ".join(c) for c in cmds]}
            row |= {"seconds": round(time.time() - t0), "results": summary(folder / "eval.json")}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


def _by_level(values: dict, fmt: str) -> str:
    return " / ".join(fmt.format(v) for _, v in sorted(values.items(), key=lambda kv: int(kv[0])))


def table(path: Path) -> str:
    """Markdown: one row per (arm, seed); per task exact match and answer loss (nats/token) by level
    (easiest first), text bits/byte."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tasks = ["kv", "arith", "sort", "find"]
    head = "| arm | seed | " + " | ".join(f"{t} EM by level" for t in tasks)
    head += " | " + " | ".join(f"{t} answer loss by level" for t in tasks)
    lines = [head + " | text bpb |", "|---|---|" + "---|" * (2 * len(tasks) + 1)]
    for r in rows:
        res = r["results"]
        em = [_by_level({lv: v[0] for lv, v in res[t].items()}, "{:.2f}") for t in tasks]
        loss = [_by_level(res[t + "/answer-loss/levels"], "{:.2f}") for t in tasks]
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(em + loss) + f" | {res['text']:.3f} |")
    return "\n".join(lines)


def _pooled_em(levels: dict) -> float:
    """Exact match over all levels of a task (each level's [em, lo, hi, n], counts recovered)."""
    return sum(round(v[0] * v[3]) for v in levels.values()) / sum(v[3] for v in levels.values())


def versus(path: Path, base: str, arm: str) -> str:
    """Markdown: for every seed run by both arms, `arm` minus `base` in each task's answer loss
    (nats/token, all levels) and exact match (all levels pooled), and in text bits/byte; then the
    mean over seeds. A difference whose sign changes from seed to seed is inside the noise."""
    rows = {(r["arm"], r["seed"]): r["results"] for r in map(json.loads, path.read_text().splitlines())}
    seeds = sorted(s for a, s in rows if a == base and (arm, s) in rows)
    tasks = ["kv", "arith", "sort", "find"]
    head = "| seed | " + " | ".join(f"{t} answer loss" for t in tasks) + " | "
    head += " | ".join(f"{t} EM" for t in tasks) + " | text bpb |"
    lines = [f"{arm} minus {base}:", "", head, "|---|" + "---|" * (2 * len(tasks) + 1)]
    diffs = []
    for seed in seeds:
        x, y = rows[base, seed], rows[arm, seed]
        d = [y[f"{t}/answer-loss"] - x[f"{t}/answer-loss"] for t in tasks]
        d += [_pooled_em(y[t]) - _pooled_em(x[t]) for t in tasks] + [y["text"] - x["text"]]
        diffs.append(d)
        lines.append(f"| {seed} | " + " | ".join(f"{v:+.3f}" for v in d) + " |")
    if diffs:
        mean = [sum(col) / len(diffs) for col in zip(*diffs)]
        lines.append("| mean | " + " | ".join(f"{v:+.3f}" for v in mean) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--root", type=Path, default=Path("runs/task-formats"))
    p.add_argument("--out", type=Path, default=Path("bench/task-formats/results.jsonl"))
    p.add_argument("--examples", type=int, default=400, help="test examples per task (shared between levels)")
    p.add_argument("--config", default="tiny", help="the preset the arms change (rows of another are named config:arm)")
    p.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    p.add_argument("--versus", nargs=2, metavar=("BASE", "ARM"), help="with --table: ARM minus BASE, seed by seed")
    args = p.parse_args()
    if args.table:
        print(versus(args.table, *args.versus) if args.versus else table(args.table))
        return
    run(args.arms, args.seeds, args.root, args.out, args.examples, args.config)


if __name__ == "__main__":
    main()
