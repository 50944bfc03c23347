"""Extracted children vs the elastic parent: inference tokens/s against the active-FLOPs ratio (CPU).

Random-weight parent with the `tiny` preset's architecture (speed does not depend on training).
Children are `elasticmoe.extract.extract(parent, subnet)`. Two regimes:

* prefill: one forward of batch x seq_len tokens, no cache;
* decode: prefill a prompt of P tokens into `model.new_cache` (not timed), then time N greedy
  single-token steps with the KV cache, exactly the loop `ElasticMoE.generate` runs (checked
  token-for-token against `generate` before timing).

The target is child speed-up (parent time / child time) >= 0.9 x the ratio of their forward FLOPs
per token (`elasticmoe.cost.cost`; prefill at context seq_len, decode at the mean context of the
timed steps). The parent running the sub-network directly, `parent(tokens, subnet)`, is timed
against the child too (should be ~1.0x). A depth ladder of the parent's own layer shape (1, 2 and
all layers) splits a step into a fixed part (embedding, RoPE table, final norm, LM head, argmax)
and a per-layer part by a least-squares line, to show how much of a tiny decode step is overhead
that FLOPs do not see; a full-depth child of the space's smallest layer shape (the "floor" probe)
shows how much of a layer's time does not shrink with experts, top-k and width.

Arms of one regime run round-robin in one process after warm-up, in list order on even rounds and
reversed on odd ones, and each child sits next to its own copy of the parent arm, so load from
other processes hits the compared arms alike; times are medians of --repeats rounds;
ratios are the median of per-round ratios with the ratio of medians in parentheses.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_extract.py [--threads 1] [--repeats 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from elasticmoe.cost import cost
from elasticmoe.extract import extract
from elasticmoe.model import ElasticMoE
from elasticmoe.recipe import load_recipe
from elasticmoe.subnet import Subnet, enumerate_uniform


# -- timing ------------------------------------------------------------------------------------
class Rounds:
    """Seconds per arm and round; each arm returns the seconds it measured itself (so untimed setup,
    such as the decode prompt's prefill, can sit inside the arm). ABBA order across rounds."""

    def __init__(self, arms: dict[str, Callable[[], float]], repeats: int, warmup: int = 1):
        names = list(arms)
        self.rounds: list[dict[str, float]] = []
        for round_ in range(warmup + repeats):
            times = {name: arms[name]() for name in (names if round_ % 2 == 0 else names[::-1])}
            if round_ >= warmup:
                self.rounds.append(times)

    def s(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds)

    def speedup(self, slow: str, fast: str) -> float:
        """time(slow) / time(fast), median of the per-round ratios."""
        return statistics.median(r[slow] / r[fast] for r in self.rounds)

    def speedup_txt(self, slow: str, fast: str) -> str:
        return f"{self.speedup(slow, fast):.2f}x ({self.s(slow) / self.s(fast):.2f}x)"


def prefill_arm(model: ElasticMoE, tokens: torch.Tensor, subnet: Subnet | None = None) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(tokens, subnet)
            return time.perf_counter() - t0

    return run


@torch.no_grad()
def decode(model: ElasticMoE, prompt: torch.Tensor, steps: int, subnet: Subnet | None = None):
    """`generate`'s greedy loop with the prompt prefill split off: (tokens, seconds of the steps)."""
    B, P = prompt.shape
    cache = model.new_cache(B, P + steps, subnet)
    logits = model(prompt, subnet, cache).logits[:, -1].float()  # prefill, not timed
    nxt = logits.argmax(-1)[:, None]
    out = [prompt, nxt]
    t0 = time.perf_counter()
    for _ in range(steps - 1):
        nxt = model(nxt, subnet, cache).logits[:, -1].float().argmax(-1)[:, None]
        out.append(nxt)
    seconds = time.perf_counter() - t0
    return torch.cat(out, dim=1), seconds


def decode_arm(model: ElasticMoE, prompt: torch.Tensor, steps: int, subnet: Subnet | None = None):
    return lambda: decode(model, prompt, steps, subnet)[1]


# -- the children ------------------------------------------------------------------------------
def ernie_like(config, space, order) -> Subnet:
    """The uniform sub-network of the space closest to 1/3 of the parent's total and 1/2 of its
    active parameters (sum of the two relative distances)."""
    full = cost(config)

    def distance(s: Subnet) -> float:
        c = cost(config, s)
        return abs(c.total_params / full.total_params - 1 / 3) + abs(c.active_params / full.active_params - 1 / 2)

    return min(enumerate_uniform(space, order), key=distance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is the stable choice on 2 shared cores)")
    ap.add_argument("--repeats", type=int, default=16, help="timed rounds per arm (even: both orders equally)")
    ap.add_argument("--batch", type=int, default=8, help="prefill batch")
    ap.add_argument("--seq-len", type=int, default=128, help="prefill sequence length")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64, help="decode prompt length P")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps N")
    ap.add_argument("--depth-cut", default="L2 E8 k2 W256", help="depth-only child")
    ap.add_argument("--expert-cut", default="L4 E4 k1 W128", help="expert/width child (all layers kept)")
    ap.add_argument(
        "--floor", default=None, help="full-depth floor probe (default: the space's smallest experts, top-k and width)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load0 = time.perf_counter(), os.getloadavg()

    recipe = load_recipe("tiny")
    config, space = recipe.model, recipe.space
    torch.manual_seed(args.seed)
    parent = ElasticMoE(config).eval()
    order = list(parent.layer_order)
    ernie = ernie_like(config, space, order)
    children = {
        "ERNIE-like": ernie,
        "depth cut": Subnet.parse(args.depth_cut, config, order),
        "expert/width cut": Subnet.parse(args.expert_cut, config, order),
    }
    floor = (
        Subnet.parse(args.floor, config, order)
        if args.floor
        else Subnet.uniform(sorted(order), min(space.experts), min(space.top_ks), min(space.widths))
    )
    # Depth ladder of the parent's own layer shape, for the fixed / per-layer split.
    full_spec = Subnet.full(config).specs[0]
    ladder_depths = sorted({1, 2, config.layers})
    ladder = {
        d: Subnet.uniform(sorted(order[:d]), full_spec.experts, full_spec.top_k, full_spec.width)
        for d in ladder_depths
        if d < config.layers
    }
    models = {name: extract(parent, s).eval() for name, s in children.items()}
    # A ladder rung that is already one of the children reuses that child's arm.
    ladder_arm = {d: next((n for n, c in children.items() if c == s), f"{d}-layer") for d, s in ladder.items()}
    ladder_models = {d: extract(parent, s).eval() for d, s in ladder.items() if ladder_arm[d] == f"{d}-layer"}
    probes = {f"{d}-layer": (ladder[d], m) for d, m in ladder_models.items()}
    probes["floor"] = (floor, extract(parent, floor).eval())

    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=g)
    prompts = {b: torch.randint(0, config.vocab_size, (b, args.prompt), generator=g) for b in args.decode_batches}
    P, N = args.prompt, args.new_tokens

    # Checks: child == parent(subnet) on prefill logits; our decode loop == generate, token for token.
    diffs = {}
    with torch.no_grad():
        for name, s in children.items():
            diffs[name] = (parent(tokens, s).logits - models[name](tokens).logits).abs().max().item()
        for name, model in [("parent", parent), *models.items()]:
            for b, prompt in prompts.items():
                ours, _ = decode(model, prompt, N)
                if not torch.equal(ours, model.generate(prompt, N)):
                    raise SystemExit(f"decode loop differs from generate for {name}, batch {b}")

    # -- timing ----------------------------------------------------------------------------------
    # Each child (and probe) gets its own parent arm right next to it, then the parent running its
    # sub-network, then the child: the arms a ratio compares always run back to back.
    def time_regime(make: Callable[[ElasticMoE, Subnet | None], Callable[[], float]]) -> Rounds:
        arms = {}
        for name, s in children.items():
            arms[f"parent@{name}"] = make(parent, None)
            arms[f"{name} via parent"] = make(parent, s)
            arms[name] = make(models[name], None)
        for name, (_, m) in probes.items():
            arms[f"parent@{name}"] = make(parent, None)
            arms[name] = make(m, None)
        rounds = Rounds(arms, args.repeats)
        for r in rounds.rounds:  # the parent's time in a round: the median of its copies
            r["parent"] = statistics.median(t for a, t in r.items() if a.startswith("parent@"))
        return rounds

    prefill = time_regime(lambda model, sub: prefill_arm(model, tokens, sub))
    dec = {b: time_regime(lambda model, sub, p=prompt: decode_arm(model, p, N, sub)) for b, prompt in prompts.items()}

    # -- report ----------------------------------------------------------------------------------
    prefill_tokens, steps = args.batch * args.seq_len, N - 1
    decode_ctx = P + 1 + steps // 2  # mean context length of the timed steps
    full_pf, full_dc = cost(config, None, args.seq_len), cost(config, None, decode_ctx)
    cmd = " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", ".venv/bin/python", *sys.argv])
    bs = args.decode_batches
    lines = [
        "### Extracted children vs parent: inference speed-up vs FLOPs ratio (CPU)",
        "",
        "Produced by:",
        "",
        f"    {cmd}",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {args.threads} thread(s), "
        f"{os.cpu_count()} CPUs (shared; load average {load0[0]:.1f} at start), fp32, "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Parent: `tiny` preset architecture, random weights "
        f"(d_model {config.d_model}, {config.layers} layers, {config.experts} experts top-{config.top_k}, "
        f"width {config.expert_width}, vocab {config.vocab_size}). Prefill: {args.batch} x {args.seq_len} "
        f"tokens, one forward, no cache. Decode: {P}-token prompt prefilled into the KV cache (untimed), "
        f"then {steps} timed greedy 1-token steps (the `generate` loop; {N} new tokens in all), batch "
        f"{' and '.join(map(str, bs))}. {args.repeats} interleaved rounds after 1 warm-up; speed-up = "
        "parent time / child time, median of per-round ratios (ratio of medians in parentheses). "
        f"FLOPs ratio = parent / child forward FLOPs per token from `cost` at context {args.seq_len} "
        f"(prefill) and {decode_ctx} (decode, mean context of the timed steps). Target: speed-up / FLOPs "
        "ratio >= 0.90.",
        "",
        "| child | params | active params | FLOPs ratio prefill / decode | prefill speed-up | "
        + " | ".join(f"decode b{b} speed-up" for b in bs)
        + " | speed-up / FLOPs ratio: prefill | "
        + " | ".join(f"decode b{b}" for b in bs)
        + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(bs) + "---:|" + "---:|" * len(bs),
    ]
    full = cost(config)
    lines.append(
        f"| parent `{Subnet.full(config)}` | {full.total_params:,} | {full.active_params:,} | 1.00 / 1.00 "
        "| 1.00x | " + " | ".join("1.00x" for _ in bs) + " | - | " + " | ".join("-" for _ in bs) + " |"
    )
    verdicts = []

    def row(label: str, subnet: Subnet, arm: str) -> None:
        c = cost(config, subnet)
        fr_pf = full_pf.flops_forward / cost(config, subnet, args.seq_len).flops_forward
        fr_dc = full_dc.flops_forward / cost(config, subnet, decode_ctx).flops_forward
        eff_pf = prefill.speedup(f"parent@{arm}", arm) / fr_pf
        eff_dc = [dec[b].speedup(f"parent@{arm}", arm) / fr_dc for b in bs]
        for what, e in [("prefill", eff_pf), *[(f"decode b{b}", e) for b, e in zip(bs, eff_dc)]]:
            if not label.endswith("probe"):
                verdicts.append((label, what, e))
        lines.append(
            f"| {label} `{subnet}` | {c.total_params:,} ({c.total_params / full.total_params:.0%}) "
            f"| {c.active_params:,} ({c.active_params / full.active_params:.0%}) | {fr_pf:.2f} / {fr_dc:.2f} "
            f"| {prefill.speedup_txt(f'parent@{arm}', arm)} | "
            + " | ".join(dec[b].speedup_txt(f"parent@{arm}", arm) for b in bs)
            + f" | {eff_pf:.2f} | "
            + " | ".join(f"{e:.2f}" for e in eff_dc)
            + " |"
        )

    for name, s in children.items():
        row(name, s, name)
    for name, (s, _) in probes.items():
        row(f"{name} probe", s, name)

    lines += [
        "",
        "Absolute throughput (medians; the machine is shared, so compare within a column):",
        "",
        "| model | prefill tok/s | " + " | ".join(f"decode b{b} tok/s | decode b{b} ms/step" for b in bs) + " |",
        "|---|---:|" + "---:|---:|" * len(bs),
    ]
    for label, arm in [("parent", "parent"), *[(n, n) for n in children], *[(n, n) for n in probes]]:
        cells = [f"{prefill_tokens / prefill.s(arm):,.0f}"]
        for b in bs:
            t = dec[b].s(arm)
            cells += [f"{b * steps / t:,.0f}", f"{1e3 * t / steps:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Parent running the sub-network directly (`parent(tokens, subnet)`, views of the shared weights) vs "
        "the extracted child (contiguous copies); > 1 means the child is faster:",
        "",
        "| child | max abs logit diff | prefill parent(subnet) / child | "
        + " | ".join(f"decode b{b} parent(subnet) / child" for b in bs)
        + " |",
        "|---|---:|---:|" + "---:|" * len(bs),
    ]
    for name in children:
        v = f"{name} via parent"
        lines.append(
            f"| {name} | {diffs[name]:.1e} | {prefill.speedup_txt(v, name)} | "
            + " | ".join(dec[b].speedup_txt(v, name) for b in bs)
            + " |"
        )

    # Fixed / per-layer split of a step from the depth ladder (same layer shape, 1, 2, ..., all layers).
    xs = [*ladder, config.layers]
    lines += [
        "",
        "Fixed vs per-layer cost (medians of per-round least-squares lines through the 1-, 2- and "
        f"{config.layers}-layer models of the parent's layer shape; fixed = embedding, RoPE, final norm, "
        "LM head, argmax):",
        "",
    ]
    floor_shape = f"E{floor.specs[0].experts} k{floor.specs[0].top_k} W{floor.specs[0].width}"
    regimes = [("prefill", prefill, prefill_tokens), *[(f"decode b{b}", dec[b], b) for b in bs]]
    for regime, rounds, unit_tokens in regimes:
        per = 1 if regime == "prefill" else steps
        fits = []  # one line per round (its arms ran back to back), then the medians of intercept and slope
        for r in rounds.rounds:
            ys = [1e3 * r[a] / per for a in [*(ladder_arm[d] for d in ladder), "parent"]]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            fits.append((my - b * mx, b))
        fixed, slope = statistics.median(f[0] for f in fits), statistics.median(f[1] for f in fits)
        ys = [1e3 * rounds.s(a) / per for a in [*(ladder_arm[d] for d in ladder), "parent"]]
        layer_flops = (full_pf if regime == "prefill" else full_dc).flops_forward
        head_flops = 2 * config.vocab_size * config.d_model
        layer_flops = (layer_flops - head_flops) / config.layers
        rate = unit_tokens * layer_flops / (slope * 1e-3) / 1e9 if slope > 0 else float("nan")
        what = "forward" if regime == "prefill" else "step"
        floor_layer = (1e3 * rounds.s("floor") / per - fixed) / floor.depth
        lines.append(
            f"- {regime}: {fixed:.2f} ms fixed + {slope:.2f} ms per layer per {what}; the fixed part is "
            f"{fixed / ys[-1]:.0%} of the parent's {ys[-1]:.2f} ms and {fixed / ys[0]:.0%} of the 1-layer model's; "
            f"a parent layer runs at {rate:.2f} GFLOP/s ({unit_tokens} token(s) x {layer_flops / 1e3:.0f} kFLOP each); "
            f"a floor-probe layer (`{floor_shape}`) still takes {floor_layer:.2f} ms "
            f"({floor_layer / slope:.0%} of a parent layer)."
        )

    short = [f"{n} {w} ({e:.2f})" for n, w, e in verdicts if e < 0.9]
    lines += [
        "",
        "Target (speed-up >= 0.90 x FLOPs ratio) missed by: " + ("; ".join(short) if short else "none") + ".",
        "",
        f"Total wall time {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
