"""The measured example of README "Start from your own MoE" (issue 25): a model trained here normally,
exported as a stock transformers folder, elastified, its ERNIE-shaped child against the same child
trained from scratch on the same data. Results: bench/ELASTIFY.md.

    OMP_NUM_THREADS=1 python bench/elastify_example.py [OUT] [SEED]   # default runs/elastify-bench, seed 0

Each step is one `elasticmoe` command, run in order (one process at a time) and skipped when its
output exists, then the table is printed (markdown). Budgets are the tiny preset's: the normal
model and the from-scratch twin train on 1,024,000 tokens (1000 steps), elastify runs for 4x the
pipeline's fine-tune budget (409,600 tokens, the retrofit-4x budget of bench/FAMILY.md) and, in a
second arm, 1x (102,400), the child is fine-tuned for 102,400 tokens (10% of the parent's tokens,
the pipeline's default) from the original at the pipeline's fine-tune learning rate (0.3 x 3e-3),
and a second twin from scratch gets the FLOPs the 4x elastic child cost once the original existed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SHAPE = "L3 E4 k1 W128"  # the ERNIE-5.1 shape of the tiny parent (README)
TINY_SPACE = ["--set", "space.experts=[2,4,6,8]", "--set", "space.widths=[64,128,192,256]"]  # the tiny preset's


def sh(*args: str) -> None:
    print("$ elasticmoe " + " ".join(f"'{a}'" if " " in a else a for a in args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([sys.executable, "-m", "elasticmoe", *args], check=True, env=env)


def flops(folder: Path, phases: tuple[str, ...], **match) -> float:
    """Training FLOPs of `phases` in the ledger of run `folder`, records matching `match` (paths)."""
    from elasticmoe.ledger import Ledger, sum_work

    led = Ledger(folder / "ledger.jsonl")
    match = {k: led.ref(v) for k, v in match.items()}
    return sum_work(led.records(), phases=phases, **match)["flops"]


def child_cost(b: Path) -> dict[str, float]:
    """Training FLOPs from the ledgers: the original's training, the elastification, the child's
    extraction and fine-tune, its twins from scratch (validation passes included throughout)."""
    normal, run = b / "normal", b / "elastic"
    out = {
        "original": flops(normal, ("train", "train-eval"), run=normal),
        "elastify": flops(run, ("train", "train-eval", "importance"), run=run),
        "extract": flops(run, ("extract",), out=run / "children" / "ernie"),
        "finetune": flops(run, ("finetune", "finetune-eval"), out=run / "finetuned" / "ernie"),
    }
    for name in ("ernie-scratch", "ernie-scratch-flops"):
        out[name] = flops(normal, ("baseline", "train-eval"), run=normal / "baselines" / name)
    out["child"] = out["elastify"] + out["extract"] + out["finetune"]
    one = b / "elastic-1x"
    if (one / "ledger.jsonl").is_file():
        out["elastify-1x"] = flops(one, ("train", "train-eval", "importance"), run=one)
        out["child-1x"] = out["elastify-1x"] + flops(one, ("extract",), out=one / "children" / "ernie-1x")
        out["child-1x"] += flops(one, ("finetune", "finetune-eval"), out=one / "finetuned" / "ernie-1x")
    return out


def steps(b: Path, seed: int) -> None:
    normal, hf, run = b / "normal", b / "normal-hf", b / "elastic"
    seeded = ["--set", f"train.seed={seed}"]  # the seed of the weights, the batches and the embedded corpus
    if not (normal / "parent").is_dir():  # the user's model: trained normally (the full network only)
        normally = ["--set", "sampling.full_fraction=1.0", "--set", "reorder.at_steps=[]", *seeded]
        sh("train", "--config", "tiny", *normally, "--out", str(normal), "--quiet")
    if not hf.is_dir():
        sh("export", str(normal / "parent"), "--format", "hf", "--out", str(hf))
    if not (run / "parent").is_dir():
        f = flops(normal, ("train", "train-eval"), run=normal)
        budget = ["--tokens", "409600", "--parent-flops", f"{f:.6g}"]
        sh("elastify", str(hf), "--out", str(run), *budget, *TINY_SPACE, *seeded, "--quiet")
    child, ft = run / "children" / "ernie", run / "finetuned" / "ernie"
    if not child.is_dir():
        sh("extract", str(run), "--subnet", SHAPE, "--out", str(child))
    if not (ft / "model").is_dir():
        budget = ["--tokens", "102400", "--lr", "9e-4"]
        sh("finetune", str(child), "--teacher", str(run / "original"), "--data", str(run), *budget, "--out", str(ft))
    scratch = normal / "baselines" / "ernie-scratch"
    if not (scratch / "parent").is_dir():  # the twin: the tiny recipe, the same data, the parent's tokens
        sh("baseline", str(normal), "--arch", SHAPE, "--tokens", "1024000", "--name", "ernie-scratch", "--quiet")
    scratch_flops = normal / "baselines" / "ernie-scratch-flops"
    if not (scratch_flops / "parent").is_dir():  # the twin given the elastic child's own FLOPs
        c = child_cost(b)
        tokens = round(c["child"] / (c["ernie-scratch"] / 1_024_000))
        sh("baseline", str(normal), "--arch", SHAPE, "--tokens", str(tokens), "--name", scratch_flops.name, "--quiet")
    results = run / "eval" / "results.json"
    if not results.is_file():
        models = [run / "original", run / "parent", child, ft / "model", scratch / "parent"]
        sh("eval", *map(str, models), "--data", str(run), "--parent", "original", "--out", str(results))
    if not (run / "eval" / "scratch-flops.json").is_file():
        out = str(run / "eval" / "scratch-flops.json")
        sh("eval", str(scratch_flops / "parent"), "--data", str(run), "--out", out)
    if not (run / "report.md").is_file():
        sh("report", str(run))
    one_x(b, seeded)


def one_x(b: Path, seeded: list[str]) -> None:
    """The same with a quarter of the elastification (102,400 tokens: the pipeline's 1x retrofit
    budget), scored on the same test split."""
    run, hf = b / "elastic-1x", b / "normal-hf"
    if not (run / "parent").is_dir():
        f = flops(b / "normal", ("train", "train-eval"), run=b / "normal")
        budget = ["--tokens", "102400", "--parent-flops", f"{f:.6g}"]
        sh("elastify", str(hf), "--out", str(run), *budget, *TINY_SPACE, *seeded, "--quiet")
    child, ft = run / "children" / "ernie-1x", run / "finetuned" / "ernie-1x"
    if not child.is_dir():
        sh("extract", str(run), "--subnet", SHAPE, "--out", str(child))
    if not (ft / "model").is_dir():
        budget = ["--tokens", "102400", "--lr", "9e-4"]
        sh("finetune", str(child), "--teacher", str(run / "original"), "--data", str(run), *budget, "--out", str(ft))
    out = b / "elastic" / "eval" / "elastic-1x.json"
    if not out.is_file():
        sh("eval", str(run / "parent"), str(child), str(ft / "model"), "--data", str(b / "elastic"), "--out", str(out))


def table(b: Path) -> str:
    from elasticmoe.methods import paired_text_diff

    run = b / "elastic"
    ev = {}
    for name in ("results.json", "scratch-flops.json", "elastic-1x.json"):
        if (run / "eval" / name).is_file():
            ev.update(
                {
                    k + ("-1x" if name == "elastic-1x.json" and k == "parent" else ""): v
                    for k, v in json.loads((run / "eval" / name).read_text())["models"].items()
                }
            )
    c = child_cost(b)
    rows = [
        ("original (trained normally)", "original", c["original"]),
        ("elastified parent", "parent", c["original"] + c["elastify"]),
        (f"ERNIE child `{SHAPE}`, zero-shot", "ernie", c["elastify"] + c["extract"]),
        ("ERNIE child + fine-tune (the state kept)", "ernie-ft", c["child"]),
        ("ERNIE child from scratch, the parent's tokens", "ernie-scratch", c["ernie-scratch"]),
        ("ERNIE child from scratch, the elastic child's FLOPs", "ernie-scratch-flops", c["ernie-scratch-flops"]),
    ]
    if "ernie-1x-ft" in ev:
        rows[2:2] = [
            ("elastified parent, 1/4 of the budget", "parent-1x", c["original"] + c["elastify-1x"]),
            ("ERNIE child of it + fine-tune (the state kept)", "ernie-1x-ft", c["child-1x"]),
        ]
    tasks = list(ev["original"]["tasks"])
    out = [
        "| model | training FLOPs (a child's: once the original exists) | " + " | ".join(tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for label, name, f in rows:
        cells = []
        for t in tasks:
            r = ev[name]["tasks"][t]
            cells.append(f"{r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")
        out.append(f"| {label} | {f:.3g} | " + " | ".join(cells) + " |")
    out.append("")
    for mine in ("ernie-ft", "ernie-1x-ft"):
        if mine not in ev:
            continue
        ft = ev[mine]["tasks"]["text"]
        for name in ("ernie-scratch", "ernie-scratch-flops"):
            s = ev[name]["tasks"]["text"]
            lo, hi = paired_text_diff(ft, s)
            rel = 100 * (ft["score"] / s["score"] - 1)
            out.append(
                f"Text, {mine} vs {name}: {ft['score']:.3f} vs {s['score']:.3f} bits/byte "
                f"({rel:+.1f}%; 95% paired interval of the difference [{lo:+.3f}, {hi:+.3f}])."
            )
    more = c["extract"] + c["finetune"]
    out.append(
        f"Cost: elastify {c['elastify']:.3g} FLOPs = {100 * c['elastify'] / c['original']:.0f}% of the original's "
        f"training ({c['original']:.3g}); the elastic child's own cost once the original exists (elastify + extraction "
        f"+ fine-tune) {c['child']:.3g} = {100 * c['child'] / c['ernie-scratch']:.0f}% of its twin's at the parent's "
        f"tokens ({c['ernie-scratch']:.3g}); every further child of the same elastified parent costs its extraction "
        f"and fine-tune ({more:.3g}, {100 * more / c['ernie-scratch']:.0f}%)."
    )
    return "\n".join(out)


if __name__ == "__main__":
    base = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/elastify-bench")
    steps(base, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(table(base))
