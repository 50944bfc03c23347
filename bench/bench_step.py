"""What one elastic training step costs against a plain (full-network) step: FLOPs per token from
the step's own count (what the ledger records) and wall time per step, the arms interleaved round
by round on one model and one batch so that a busy machine slows all arms alike (issue 23).

    OMP_NUM_THREADS=1 python bench/bench_step.py --preset tiny --rounds 30

Arms (overrides of the preset; every arm past its full-network warm-up):
    plain       the largest network alone (a normal training step)
    sandwich    the preset's elastic step (largest + smallest + n_random, each on the whole batch)
    rows25      sampling.mode=rows, sub-networks on a quarter of the rows, the largest on all
    rows50      sampling.mode=rows, sub-networks on half of the rows, the largest on all
    split50     sampling.mode=rows, the largest on half of the rows, the sub-networks on the other half
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from elasticmoe import dist as distmod
from elasticmoe.cost import cost
from elasticmoe.model import ElasticMoE
from elasticmoe.recipe import load_recipe
from elasticmoe.train import make_optimizer, sample_step, train_step

ARMS = {
    "plain": ["sampling.full_fraction=1.0"],
    "sandwich": [],
    "rows25": ["sampling.mode=rows", "sampling.sub_rows=0.25"],
    "rows50": ["sampling.mode=rows", "sampling.sub_rows=0.5"],
    "split50": ["sampling.mode=rows", "sampling.full_rows=0.5", "sampling.sub_rows=0.5"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    recipes = {arm: load_recipe(args.preset, over) for arm, over in ARMS.items()}
    base = recipes["plain"]
    torch.manual_seed(0)
    model = ElasticMoE(base.model)
    par = distmod.setup(torch.device("cpu"), "auto")
    b, seq = base.train.batch_size, base.data.seq_len
    x = torch.randint(0, base.model.vocab_size, (b, seq))
    y = torch.randint(0, base.model.vocab_size, (b, seq))
    opts = {arm: make_optimizer(model, r) for arm, r in recipes.items()}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    flops: dict[str, list[int]] = {arm: [] for arm in ARMS}
    last = base.train.steps - 1
    for rnd in range(args.rounds + 2):  # two warm-up rounds are not counted
        for arm, r in recipes.items():
            subnets = sample_step(r, last - rnd % 50, model.layer_order)  # varied draws, all elastic
            t0 = time.perf_counter()
            res = train_step(model, opts[arm], x, y, subnets, r, par, last)
            if rnd >= 2:
                times[arm].append(time.perf_counter() - t0)
                flops[arm].append(res.flops)
    par.close()
    plain_flops = cost(base.model, None, seq).flops_train * b * seq
    plain_ms = statistics.median(times["plain"]) * 1000
    threads = torch.get_num_threads()
    print(f"preset {args.preset}, batch {b} x {seq}, {args.rounds} interleaved rounds, torch threads {threads}")
    print("| arm | FLOPs per token vs plain | median ms/step | wall time vs plain |")
    print("|---|---|---|---|")
    for arm in ARMS:
        ms = statistics.median(times[arm]) * 1000
        ratio = statistics.mean(flops[arm]) / plain_flops
        print(f"| {arm} | {ratio:.2f}x | {ms:.0f} | {ms / plain_ms:.2f}x |")


if __name__ == "__main__":
    main()
