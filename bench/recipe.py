"""Recipe ablation: is the elastic parent as good as the same parent trained alone, and is each
child (zero-shot, extracted) as good as its twin trained alone on the same tokens?

For every seed, every arm trains on the same prepared data (corpus, tokenizer and batches depend
on the seed only) for the same number of steps and tokens:

    alone:parent        the parent's architecture, no elastic sampling (the bar)
    alone:<child>       each fixed child shape trained from scratch (the child's twin)
    <recipe>            an elastic recipe (overrides of the preset), its parent and its children
                        measured zero-shot (the parent running the child's sub-network, which is
                        exactly what `extract` writes)

Held-out loss = mean next-token cross-entropy (nats/token) on the test split, per task; the text
task's ratio equals the ratio of bits/byte (same tokenizer, same bytes). FLOPs come from each
run's ledger, so recipes that train fewer sub-networks per step show it.

    OMP_NUM_THREADS=1 python bench/recipe.py --preset tiny --seeds 0 1 --out bench/recipe-runs/tiny
    python bench/recipe.py --out bench/recipe-runs/tiny --report bench/RECIPE.md

(results of the recorded ablation: bench/recipe-results/*.jsonl, one JSON line per arm and seed)

Runs are resumable: a finished (arm, seed) is skipped, so the command can be re-run after a stop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from elasticmoe import cost as costmod
from elasticmoe.checkpoint import load_model
from elasticmoe.config import ElasticSpace
from elasticmoe.ledger import Ledger
from elasticmoe.recipe import SamplingConfig, load_recipe
from elasticmoe.rundata import load_run_data, prepare_run_data
from elasticmoe.subnet import Subnet
from elasticmoe.train import eval_losses, train

# Elastic recipes: overrides of the preset. "old" is the recipe before this ablation with its
# summed loss expressed as weights (3 other sub-networks, weight 1 each, CE + KD).
RECIPES: dict[str, list[str]] = {
    "old": ["distill.subnet_weight=3", "distill.ce_weight=1"],
    "mean-kd": ["distill.subnet_weight=1", "distill.ce_weight=0"],
    "warm30-kd": ["distill.subnet_weight=1", "distill.ce_weight=0", "sampling.full_fraction=0.3"],
    "warm30-light": ["distill.subnet_weight=0.5", "distill.ce_weight=0", "sampling.full_fraction=0.3"],
    "warm50-kd": ["distill.subnet_weight=1", "distill.ce_weight=0", "sampling.full_fraction=0.5"],
    "warm50-light": ["distill.subnet_weight=0.5", "distill.ce_weight=0", "sampling.full_fraction=0.5"],
    # issue 23: the cheap step (each sub-network on its own rows) and the switch point; on top of
    # the preset (sandwich default: warm30-light), re-ordering at the switch as well
    "rows25": ["sampling.mode=rows", "sampling.sub_rows=0.25", "reorder.at_switch=true"],
    "rows50": ["sampling.mode=rows", "sampling.sub_rows=0.5", "reorder.at_switch=true"],
    "split50": ["sampling.mode=rows", "sampling.full_rows=0.5", "sampling.sub_rows=0.5", "reorder.at_switch=true"],
    "rows25-switch50": [
        "sampling.mode=rows",
        "sampling.sub_rows=0.25",
        "reorder.at_switch=true",
        "sampling.full_fraction=0.5",
    ],
    "rows25-switch70": [
        "sampling.mode=rows",
        "sampling.sub_rows=0.25",
        "reorder.at_switch=true",
        "sampling.full_fraction=0.7",
    ],
    "rows25-drop": ["sampling.mode=rows", "sampling.sub_rows=0.25", "reorder.at_switch=true", "sampling.depth=drop"],
    # the sandwich kept, but switched on late: most of the run trains the full network alone
    "warm70-light": ["sampling.full_fraction=0.7", "reorder.at_switch=true", "reorder.at_steps=[]"],
    "warm80-light": ["sampling.full_fraction=0.8", "reorder.at_switch=true", "reorder.at_steps=[]"],
    "rows25-perlayer": [
        "sampling.mode=rows",
        "sampling.sub_rows=0.25",
        "reorder.at_switch=true",
        "sampling.per_layer=true",
    ],
}
# Fixed child shapes, measured zero-shot in every elastic parent and trained alone as twins.
CHILDREN = {
    "tiny": ["L3 E4 k1 W128", "L2 E6 k2 W192", "L4 E8 k1 W256", "L2 E2 k1 W64"],
    "micro": ["L2 E4 k1 W32", "L3 E8 k1 W64"],
}


def _label(spec: str) -> str:
    return spec.replace(" ", "_")


def _data_for(base, seed: int, out: Path) -> Path:
    """Prepare the seed's data once; every run of that seed copies it."""
    folder = out / f"data-seed{seed}"
    if not (folder / "data" / "ready").exists():
        prepare_run_data(base, folder)
    return folder / "data"


# The tiny preset's schedule when these arms were run (before commit 617472a made the late switch the
# default): each arm's overrides apply on top of it, so a rerun reproduces bench/RECIPE.md's tables.
SCHEDULE_THEN = {"tiny": ["sampling.full_fraction=0.3", "reorder.at_switch=false", "reorder.at_steps=[250,500]"]}


def _recipe(preset: str, seed: int, overrides: list[str], steps: int | None):
    extra = [f"train.seed={seed}"] + ([f"train.steps={steps}"] if steps else [])
    return load_recipe(preset, extra + SCHEDULE_THEN.get(preset, []) + overrides)


def _alone_recipe(base, spec: str | None):
    model = base.model if spec is None else costmod.child_config(base.model, Subnet.parse(spec, base.model))
    return dataclasses.replace(
        base,
        model=model,
        space=ElasticSpace.full(model),
        sampling=SamplingConfig(mode="sandwich", n_random=0, full_fraction=0.0),
        reorder=dataclasses.replace(base.reorder, at_steps=(), at_switch=False),
    )


def _ledger_totals(run: Path) -> dict:
    recs = [r for r in Ledger(run / "ledger.jsonl").records() if r.get("event") == "progress"]
    return {"flops": sum(r["flops"] for r in recs), "tokens": sum(r["tokens"] for r in recs)}


def run_one(arm: str, seed: int, args, out: Path) -> dict:
    base = _recipe(args.preset, seed, [], args.steps)
    children = CHILDREN[args.preset]
    if arm.startswith("alone:"):
        spec = arm.split(":", 1)[1]
        recipe = _alone_recipe(base, None if spec == "parent" else spec)
    else:
        recipe = _recipe(args.preset, seed, RECIPES[arm], args.steps)
    run = out / f"{arm.replace(':', '-').replace(' ', '_')}-seed{seed}"
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    shutil.copytree(_data_for(base, seed, out), run / "data")
    t0 = time.perf_counter()
    train(recipe, run, progress=False)
    seconds = time.perf_counter() - t0
    model, _ = load_model(run / "parent")
    data = load_run_data(run, recipe)
    windows = data.eval_windows("test", args.windows)
    if arm.startswith("alone:"):
        subnets = {arm.split(":", 1)[1]: None}
    else:
        subnets = {"parent": None, **{c: Subnet.parse(c, model.config, model.layer_order) for c in children}}
    losses = eval_losses(model, windows, subnets, torch.device("cpu"))
    res = {"arm": arm, "seed": seed, "losses": losses, "seconds": seconds, **_ledger_totals(run)}
    if not args.keep:
        shutil.rmtree(run)
    return res


def _mean_loss(losses: dict[str, float]) -> float:
    return statistics.fmean(losses.values())


def report(results: list[dict], out_md: Path | None, command: str) -> str:
    by = {(r["arm"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    arms = [a for a in RECIPES if any((a, s) in by for s in seeds)]
    children = [k for r in results if not r["arm"].startswith("alone:") for k in r["losses"] if k != "parent"]
    children = list(dict.fromkeys(children))

    def fmt(vals: list[float], pct: bool = False) -> str:
        if not vals:
            return "n/a"
        m = statistics.fmean(vals)
        spread = (max(vals) - min(vals)) / 2
        if len(vals) == 1:  # no spread to show: say so instead of a misleading ± 0
            return f"{100 * m:+.1f}% (1 seed)" if pct else f"{m:.3f} (1 seed)"
        if pct:
            return f"{100 * m:+.1f}% ± {100 * spread:.1f}"
        return f"{m:.3f} ± {spread:.3f}"

    def relative(arm: str, sub: str, ref: str, ref_sub: str, task: str | None) -> list[float]:
        """Per seed: loss of `sub` in `arm` / loss of `ref_sub` in `ref` - 1 (task None: all-task mean)."""
        vals = []
        for s in seeds:
            if (arm, s) in by and (ref, s) in by:
                a, b = by[(arm, s)]["losses"][sub], by[(ref, s)]["losses"][ref_sub]
                va, vb = (a[task], b[task]) if task else (_mean_loss(a), _mean_loss(b))
                vals.append(va / vb - 1)
        return vals

    def ratio(arm: str, sub: str, alone: str, task: str | None) -> list[float]:
        return relative(arm, sub, f"alone:{alone}", alone, task)

    lines = [
        "# Recipe ablation",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds {seeds}; each cell is the mean over seeds ± half the range. Held-out loss is nats/token on",
        "the test split; a ratio of text losses equals the ratio of bits/byte. `vs alone` is the",
        "relative difference to the same architecture trained alone on the same tokens and seed (lower",
        "is better; the targets are parent within +1%, each child zero-shot within +3%).",
        "",
        "## Parent",
        "",
        "| arm | text loss | text vs alone | all-task mean vs alone | train FLOPs vs alone | wall s (shared machine) |",
        "|---|---|---|---|---|---|",
    ]
    alone_rows = [("alone:parent", "parent")]
    for arm, sub in alone_rows + [(a, "parent") for a in arms]:
        rs = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rs:
            continue
        text = [r["losses"][sub]["text"] for r in rs]
        flops = [
            by[(arm, s)]["flops"] / by[("alone:parent", s)]["flops"]
            for s in seeds
            if (arm, s) in by and ("alone:parent", s) in by
        ]
        lines.append(
            f"| {arm} | {fmt(text)} | {fmt(ratio(arm, sub, 'parent', 'text'), True) if arm in RECIPES else '-'} | "
            f"{fmt(ratio(arm, sub, 'parent', None), True) if arm in RECIPES else '-'} | "
            f"{statistics.fmean(flops) if flops else float('nan'):.2f}x | "
            f"{statistics.fmean(r['seconds'] for r in rs):.0f} |"
        )
    lines += [
        "",
        "## Children, zero-shot, text loss vs the twin trained alone",
        "",
        "| arm | " + " | ".join(f"`{c}`" for c in children) + " |",
        "|---|" + "---|" * len(children),
    ]
    twin = []
    for c in children:
        vals = [by[(f"alone:{c}", s)]["losses"][c]["text"] for s in seeds if (f"alone:{c}", s) in by]
        twin.append(fmt(vals))
    lines.append("| twin alone (loss) | " + " | ".join(twin) + " |")
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(fmt(ratio(arm, c, c, "text"), True) for c in children) + " |")
    if any(("warm30-light", s) in by for s in seeds):  # the preset's sandwich: what a cheaper step must match
        lines += [
            "",
            "## Children and parent, zero-shot, text loss vs the preset's sandwich (`warm30-light`), same seed",
            "",
            "| arm | parent | " + " | ".join(f"`{c}`" for c in children) + " |",
            "|---|---|" + "---|" * len(children),
        ]
        for arm in arms:
            if arm == "warm30-light":
                continue
            cells = [fmt(relative(arm, sub, "warm30-light", sub, "text"), True) for sub in ["parent", *children]]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Recipes (overrides of the preset):", ""]
    lines += [f"- `{a}`: `{' '.join(RECIPES[a])}`" for a in arms]
    text = "\n".join(lines) + "\n"
    if out_md:
        out_md.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=None, help="recipes and alone:<spec>; default: all")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps (smoke runs)")
    ap.add_argument("--windows", type=int, default=64, help="test windows per task")
    ap.add_argument("--out", type=Path, required=True, help="run folders and results.jsonl")
    ap.add_argument("--results", type=Path, nargs="*", default=None, help="--report: results files (default OUT's)")
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown table here and stop")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = [json.loads(x) for x in results_path.read_text().splitlines()] if results_path.exists() else []
    if args.report:
        if args.results:
            results = [json.loads(x) for f in args.results for x in f.read_text().splitlines()]
        cmd = (args.out / "command.txt").read_text().strip() if (args.out / "command.txt").exists() else "?"
        print(report(results, args.report, cmd))
        return
    arms = args.arms or ["alone:parent", *RECIPES, *(f"alone:{c}" for c in CHILDREN[args.preset])]
    done = {(r["arm"], r["seed"]) for r in results}
    for seed in args.seeds:
        for arm in arms:
            if (arm, seed) in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}", flush=True)
            res = run_one(arm, seed, args, args.out)
            with results_path.open("a") as f:
                f.write(json.dumps(res) + "\n")
            print(f"    text loss { {k: round(v['text'], 4) for k, v in res['losses'].items()} }", flush=True)
    print(report([json.loads(x) for x in results_path.read_text().splitlines()], None, "-"))


if __name__ == "__main__":
    main()
