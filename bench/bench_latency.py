"""Latency table vs direct measurement on the tiny preset's shape.

Builds a random-weight parent with the tiny preset's architecture and space (d_model 128, 4 layers,
8 experts, top-2, width 256), measures a LatencyTable at seq_len 128 for batch 1 and batch 8, then
times ~10 held-out sub-networks directly and prints the predictor's mean and max relative error
|predicted - measured| / measured as a markdown snippet. Writes no files.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_latency.py [--threads 1] [--repeats 5] [--held-out 10]
        [--batches 1 8] [--statistic median|min] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch

from elasticmoe.config import ElasticSpace, ModelConfig, load_mapping
from elasticmoe.latency import LatencyTable
from elasticmoe.model import ElasticMoE
from elasticmoe.subnet import Subnet, enumerate_uniform

PRESET = Path(__file__).resolve().parents[1] / "elasticmoe" / "presets" / "tiny.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # One thread: on 2 shared cores, 2 threads per process oversubscribe and timings swing 5-20x.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--held-out", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--statistic", choices=["median", "min"], default="median")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_mapping(PRESET)
    config, space = ModelConfig.from_dict(preset["model"]), ElasticSpace.from_dict(preset["space"])
    torch.manual_seed(args.seed)
    parent = ElasticMoE(config).to(args.device)
    candidates = enumerate_uniform(space, parent.layer_order)
    held_out = random.Random(args.seed).sample(candidates, min(args.held_out, len(candidates)))

    rows = []
    for batch in args.batches:
        t0 = time.perf_counter()
        table = LatencyTable.measure(
            parent, args.seq_len, batch, args.device, args.repeats, space=space, statistic=args.statistic
        )
        build_s = time.perf_counter() - t0
        report = table.validate(held_out, device=args.device)
        rows.append((batch, table, build_s, report))
        for p in report["points"]:
            print(
                f"batch {batch:>2} | {p['subnet']:<22} | predicted {p['predicted_ms']:8.2f} ms | "
                f"measured {p['measured_ms']:8.2f} ms | error {100 * p['rel_error']:5.1f}%"
            )

    print()
    print(
        f"### Latency table vs direct forward ({args.device}, {args.threads} threads, {rows[0][1].meta['dtype']}, "
        f"tiny preset shape, seq_len {args.seq_len}, {args.statistic} of {args.repeats})"
    )
    print()
    print("| batch | table entries | table build s | held-out | mean rel. error | max rel. error | parent ms (pred.) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, table, build_s, report in rows:
        parent_ms = table.predict(Subnet.full(config))
        print(
            f"| {batch} | {len(table.moe_ms) + 2} | {build_s:.2f} | {report['n']} | "
            f"{100 * report['mean_rel_error']:.1f}% | {100 * report['max_rel_error']:.1f}% | {parent_ms:.2f} |"
        )
    print()
    print(
        f"Held-out sub-networks: {report['n']} uniform ones drawn with seed {args.seed} from "
        f"{len(candidates)}; error = |predicted - measured| / measured, measured = {args.statistic} of "
        f"{args.repeats} interleaved direct forwards after one warm-up; "
        f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs."
    )


if __name__ == "__main__":
    main()
