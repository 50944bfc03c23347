"""The fine-tune recipe ablation (issue 28): why a distillation fine-tune can make a child worse.

For every run folder given (made by `elasticmoe run`, so it holds `parent/` and `children/*`), every
child and every arm, fine-tune the zero-shot child with the run's own fine-tune budget (what
`run` gave its children: `pipeline.json`'s finetune tokens) and measure both models on the same
held-out windows of the validation and the test split: per task the loss in nats/token (text on
every token, structured tasks on their answers), and for text the paired 95% bootstrap interval of
(fine-tuned - zero-shot) over the same windows. Arms measure the *last* step (no best-checkpoint
selection), so the table shows what the recipe itself does, except the `-best` arms, which publish
the best validated state as `finetune` does by default.

One JSON line per (run, child, arm) in --out; a rerun skips the lines already there (--resume is
the default behaviour: delete the file to start over).

    OMP_NUM_THREADS=1 python bench/finetune_ablation.py runs/ft-emb-s0 runs/ft-fort-s0 \
        --arms old lr-final kd lr-final-kd --out bench/finetune-results/ablation.jsonl
    python bench/finetune_ablation.py --table bench/finetune-results/ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F

from elasticmoe.checkpoint import load_model, read_json
from elasticmoe.evaluate import paired_ratio_diff_ci
from elasticmoe.phases import finetune, run_recipe
from elasticmoe.rundata import load_run_data
from elasticmoe.tokens import IGNORE, unpack_windows

# arm -> fine-tune settings; lr as a multiple of the parent's peak lr ("final" = its last lr)
ARMS = {
    "old": {"lr": 0.3, "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0},  # before issue 28
    "lr-final": {"lr": "final", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0},
    "kd": {"lr": 0.3, "ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0},
    "lr-final-kd": {"lr": "final", "ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0},
    "lr-low": {"lr": 0.03, "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0},
    "lr-low-kd": {"lr": 0.03, "ce_weight": 0.0, "kd_weight": 1.0, "temperature": 1.0},
    "lr-final-T2": {"lr": "final", "ce_weight": 0.0, "kd_weight": 1.0, "temperature": 2.0},
    "default": {},  # whatever phases.finetune does by default today
    # the same recipes publishing their best validated state (the safety net) instead of the last step
    "old-best": {"lr": 0.3, "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0, "keep_best": True},
    "lr-final-best": {"lr": "final", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0, "keep_best": True},
}
WINDOWS = 64  # per task and split


@torch.no_grad()
def window_losses(model, windows) -> tuple[list[float], list[int]]:
    """Per window: summed next-token cross-entropy over the kept targets, and their count."""
    w, keep = unpack_windows(windows)
    sums, counts = [], []
    for i in range(0, len(w), 8):
        chunk = w[i : i + 8]
        y = chunk[:, 1:]
        if keep is not None:
            y = y.masked_fill(~keep[i : i + 8], IGNORE)
        logits = model(chunk[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=IGNORE)
        sums += loss.sum(1).tolist()
        counts += (y != IGNORE).sum(1).tolist()
    return sums, counts


def measure(zero, tuned, data, loss_on: str) -> dict:
    out = {}
    for split in ("val", "test"):
        for task, win in data.eval_windows(split, WINDOWS, loss_on).items():
            (zs, n), (ft, _) = window_losses(zero, win), window_losses(tuned, win)
            total = max(sum(n), 1)
            row = {"zero": sum(zs) / total, "tuned": sum(ft) / total, "windows": len(n)}
            if task == "text":
                row["diff_ci"] = list(paired_ratio_diff_ci(ft, zs, n))
            out[f"{split}/{task}"] = row
    return out


def run_arm(run: Path, child: str, arm: str, budget: int) -> dict:
    recipe = run_recipe(run)
    kw = dict(ARMS[arm])
    keep_best = kw.pop("keep_best", False)
    lr = kw.pop("lr", None)
    if lr == "final":
        kw["lr"] = recipe.train.lr * recipe.train.min_lr_ratio
    elif lr is not None:
        kw["lr"] = recipe.train.lr * lr
    out = run / "ft-ablation" / arm / child
    if out.exists():
        shutil.rmtree(out)  # an arm interrupted before its line was written starts over
    res = finetune(run / "children" / child, out, teacher_run=run, tokens=budget, keep_best=keep_best, **kw)
    data = load_run_data(run, recipe)
    zero, _ = load_model(run / "children" / child)
    tuned, _ = load_model(out / "model")
    meta = read_json(out / "model" / "config.json")["meta"]["finetune"]
    settings = {k: meta.get(k) for k in ("lr", "ce_weight", "kd_weight", "temperature", "kept")}
    return {
        "run": str(run),
        "child": child,
        "arm": arm,
        "tokens": res.tokens,
        **settings,
        **measure(zero, tuned, data, recipe.data.loss_on),
    }


def budget_of(run: Path) -> int:
    """What `run` gives each child: 10% of the parent's training tokens (at least one batch)."""
    recipe = run_recipe(run)
    seen = read_json(run / "parent" / "config.json")["meta"]["tokens_seen"]
    return max(int(seen * 0.1), recipe.train.batch_size * recipe.data.seq_len)


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    corpora = sorted({_corpus(r["run"]) for r in rows})
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = [
        "| corpus | arm | child | seeds | val text, relative change | test text, relative change | "
        "test text diff, 95% paired CI (per seed) | structured answer loss, relative change (val) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for corpus in corpora:
        for arm in arms:
            by_child: dict[str, list[dict]] = {}
            for r in rows:
                if r["arm"] == arm and _corpus(r["run"]) == corpus:
                    by_child.setdefault(r["child"], []).append(r)
            for child, rs in sorted(by_child.items()):
                val = [r["val/text"]["tuned"] / r["val/text"]["zero"] - 1 for r in rs]
                test = [r["test/text"]["tuned"] / r["test/text"]["zero"] - 1 for r in rs]
                cis = "; ".join(
                    f"[{r['test/text']['diff_ci'][0]:+.3f}, {r['test/text']['diff_ci'][1]:+.3f}]" for r in rs
                )
                structured = [
                    r[k]["tuned"] / r[k]["zero"] - 1
                    for r in rs
                    for k in r
                    if k.startswith("val/") and k != "val/text" and isinstance(r[k], dict)
                ]
                lines.append(
                    f"| {corpus} | {arm} | {child} | {len(rs)} | {_pct(val)} | {_pct(test)} | {cis} | "
                    f"{_pct(structured) if structured else '-'} |"
                )
    return "\n".join(lines)


def _pct(values: list[float]) -> str:
    m, half = mean(values), (max(values) - min(values)) / 2
    return f"{m * 100:+.1f}% ± {half * 100:.1f}" if len(values) > 1 else f"{m * 100:+.1f}%"


def _corpus(run: str) -> str:
    return "fortunes" if "fort" in Path(run).name else "embedded"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--arms", nargs="+", default=["old", "lr-final", "kd", "lr-final-kd"], choices=sorted(ARMS))
    ap.add_argument("--out", type=Path, default=Path("bench/finetune-results/ablation.jsonl"))
    ap.add_argument("--table", type=Path, help="print the markdown table of a results file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():
        done = {(r["run"], r["child"], r["arm"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for run in args.runs:
        budget = budget_of(run)
        for child in sorted(p.name for p in (run / "children").iterdir()):
            for arm in args.arms:
                if (str(run), child, arm) in done:
                    continue
                print(f"{run} {child} {arm}", file=sys.stderr, flush=True)
                row = run_arm(run, child, arm, budget)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
