"""A training step on a quiet machine and beside a busy process (issue 23, part 5).

    python bench/bench_threads.py --preset tiny --rounds 2 --steps 12

Each (arm, condition) runs in its own process (OpenMP reads its settings once per process), the
arms and conditions interleaved round by round. `busy` starts one single-thread process that
spins on a core for as long as the arm runs. Arms:

    fixed-N   torch at N threads whatever the load (ELASTICMOE_THREADS=fixed)
    auto      the training loop's ThreadGovernor (elasticmoe/threads.py), re-deciding every second

Reported: the median step time over the last two thirds of each arm's steps (the governor's first
decision needs a second of measurement), per condition, and the busy/quiet ratio against the
fastest quiet arm, which is what a user would have got on the quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"fixed-2": 2, "fixed-1": 1, "auto": 2}
SPIN = "while True: pass"


def worker(arm: str, steps: int, preset: str) -> None:
    import torch

    from elasticmoe import dist as distmod
    from elasticmoe.model import ElasticMoE
    from elasticmoe.recipe import load_recipe
    from elasticmoe.threads import ThreadGovernor
    from elasticmoe.train import make_optimizer, sample_step, train_step

    torch.set_num_threads(ARMS[arm])
    recipe = load_recipe(preset, [])
    b, seq = recipe.train.batch_size, recipe.data.seq_len
    torch.manual_seed(0)
    x = torch.randint(0, recipe.model.vocab_size, (b, seq))
    y = torch.randint(0, recipe.model.vocab_size, (b, seq))
    par = distmod.setup(torch.device("cpu"), "auto")
    model = ElasticMoE(recipe.model)
    opt = make_optimizer(model, recipe)
    last = recipe.train.steps - 1
    times, trace = [], ""
    with ThreadGovernor(torch.device("cpu"), every_s=1.0) as governor:
        for s in range(steps):
            trace += str(governor.tick())
            subnets = sample_step(recipe, last - s % 4, model.layer_order)  # a fixed cycle of draws
            t0 = time.perf_counter()
            train_step(model, opt, x, y, subnets, recipe, par, last)
            times.append(time.perf_counter() - t0)
    par.close()
    print(f"{statistics.median(times[steps // 3 :]) * 1000:.1f} {trace}")


def run_arm(arm: str, busy: bool, steps: int, preset: str) -> tuple[float, str]:
    env = dict(os.environ, ELASTICMOE_THREADS="auto" if arm == "auto" else "fixed", OMP_NUM_THREADS="2")
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", arm, "--steps", str(steps), "--preset", preset],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    return float(out[0]), out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.preset)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ms: dict[tuple[str, str], list[float]] = {}
    final: dict[tuple[str, str], str] = {}
    for rnd in range(args.rounds):
        for cond in ("quiet", "busy"):
            for arm in ARMS:
                t, trace = run_arm(arm, cond == "busy", args.steps, args.preset)
                ms.setdefault((arm, cond), []).append(t)
                final[arm, cond] = trace[-1]
                print(f"round {rnd} {cond:5s} {arm:8s} {t:8.1f} ms/step, threads per step {trace}", flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    best_quiet = min(med[a, "quiet"] for a in ARMS)
    print(f"\npreset {args.preset}, {os.cpu_count()} cores, {args.rounds} rounds x {args.steps} steps per arm")
    print("| arm | quiet ms/step | beside 1 busy process | busy / best quiet | threads at the end (busy) |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        q, b = med[arm, "quiet"], med[arm, "busy"]
        print(f"| {arm} | {q:.0f} | {b:.0f} | {b / best_quiet:.2f}x | {final[arm, 'busy']} |")


if __name__ == "__main__":
    main()
