"""Training throughput at several world sizes: tokens/s of `elasticmoe train` in one process and
under `torchrun --nproc-per-node N` (DDP and/or FSDP2), on CPU (gloo) or GPUs (NCCL).

tokens/s = global batch x seq_len / step wall time (the loop's own `tok_per_s`, rank 0's clock),
median over the steps after the first `--warmup`; evaluation, checkpoints and re-ordering are
outside the timed step. Default: strong scaling (the recipe's global batch, split over ranks);
`--weak` multiplies the global batch by N (per-rank batch constant). Arms run interleaved,
`--rounds` times, and the best median per arm is reported (the least disturbed by other load).

On CPU each arm uses all cores by default: threads per process = cores // N (`--threads` fixes
it), so the ratio shows what splitting the same cores into processes buys, not more hardware.

    python bench/bench_dist.py                                      # CPU, tiny, N = 1, 2
    python bench/bench_dist.py --device cuda --nprocs 1 2 4 8 --config small-gpu --weak

Prints a markdown snippet (command, machine, table); writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_arm(args, world: int, parallel: str, out: Path) -> dict:
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    sets = [
        f"train.steps={args.steps}",
        f"train.device={args.device}",
        f"train.eval_every={args.steps}",
        f"train.ckpt_every={args.steps}",
        "train.eval_windows=1",
        "reorder.at_steps=[]",
    ]
    if args.batch:
        sets.append(f"train.batch_size={args.batch * (world if args.weak else 1)}")
    elif args.weak:
        sets.append(f"train.batch_size={args.base_batch * world}")
    train_args = ["train", "--config", args.config, "--out", str(out), "--quiet"]
    for s in sets:
        train_args += ["--set", s]
    if world == 1:
        cmd = [sys.executable, "-m", "elasticmoe", *train_args]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        cmd = [*launcher, "-m", "elasticmoe", *train_args, "--parallel", parallel]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"arm world={world} {parallel} failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tok = [r["tok_per_s"] for r in recs if "tok_per_s" in r][args.warmup :]
    ms = [r["ms"] for r in recs if "ms" in r][args.warmup :]
    return {
        "tok_s": statistics.median(tok),
        "ms": statistics.median(ms),
        "wall": wall,
        "threads": threads,
        "batch": _recipe_batch(out),
    }


def _recipe_batch(run: Path) -> int:
    import yaml

    return int(yaml.safe_load((run / "recipe.yaml").read_text())["train"]["batch_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="preset or recipe file (default: tiny)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="world sizes (1 = plain python)")
    ap.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="timed steps ignored at the start")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="threads per process (default cores // N on CPU)")
    ap.add_argument("--batch", type=int, default=0, help="global batch (default: the recipe's)")
    ap.add_argument("--weak", action="store_true", help="scale the global batch with N")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    args.base_batch = _preset_batch(args.config)
    arms = [(n, "single" if n == 1 else p) for n in args.nprocs for p in (["-"] if n == 1 else args.parallel)]
    results: dict[tuple[int, str], list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="bench_dist.") as tmp:
        for r in range(args.rounds):
            for n, p in arms:
                out = Path(tmp) / f"r{r}-n{n}-{p}"
                results[(n, p)].append(run_arm(args, n, p, out))
                print(f"round {r} world {n} {p}: {results[(n, p)][-1]['tok_s']:,.0f} tok/s", file=sys.stderr)
    best = {a: max(v, key=lambda x: x["tok_s"]) for a, v in results.items()}
    base = best[arms[0]]["tok_s"] if arms[0][0] == 1 else None
    cmd = " ".join(["python", "bench/bench_dist.py", *sys.argv[1:]])
    print(f"`{cmd}`  ")
    print(
        f"{args.config} preset, {args.steps} steps ({args.warmup} ignored), {args.device}, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"{'weak' if args.weak else 'strong'} scaling, best of {args.rounds} interleaved round(s)\n"
    )
    print("| world size | parallel | threads/process | global batch | ms/step | tokens/s | vs 1 process |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (n, p), b in best.items():
        ratio = f"{b['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {n} | {p} | {b['threads']} | {b['batch']} | {b['ms']:.0f} | {b['tok_s']:,.0f} | {ratio} |")


def _preset_batch(config: str) -> int:
    from elasticmoe.recipe import load_recipe

    return load_recipe(config).train.batch_size


if __name__ == "__main__":
    main()
