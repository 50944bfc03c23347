"""MoE speed on the CPU: our MoE layer vs transformers' Mixtral block, a sub-network run through
the parent vs a standalone child of its shape, achieved GFLOP/s vs a same-run matmul ceiling, and
loop vs grouped-GEMM dispatch.

The arms of each comparison run round-robin in one process (after warm-up), so background load
hits them alike; each arm reports the median of --repeats timings, and the ratios are the numbers
to quote. Every comparison first checks that the arms compute the same thing (max abs diff).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_moe.py --threads 2 1 --write bench/RESULTS.md
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
import torch.nn.functional as F

from elasticmoe.config import ModelConfig
from elasticmoe.extract import extract
from elasticmoe.model import ElasticMoE, MoE
from elasticmoe.subnet import LayerSpec, Subnet


# -- timing ------------------------------------------------------------------------------------
class Timings:
    """Seconds per arm and round. All arms run in every round, in list order on even rounds and in
    reverse on odd ones (ABBA), so load from other processes hits them alike and each compared pair
    (adjacent in the list) runs in both orders: an arm is never always the one after a backward."""

    def __init__(self, arms: dict[str, Callable[[], None]], repeats: int, warmup: int = 2):
        names = list(arms)
        self.rounds: list[dict[str, float]] = []
        for round_ in range(warmup + repeats):
            times = {}
            for name in names if round_ % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                arms[name]()
                times[name] = time.perf_counter() - t0
            if round_ >= warmup:
                self.rounds.append(times)

    def ms(self, name: str) -> str:
        """Median milliseconds of one arm."""
        return f"{1e3 * statistics.median(r[name] for r in self.rounds):.1f}"

    def seconds(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds)

    def ratio(self, a: str, b: str) -> str:
        """time(a) / time(b): median of the per-round ratios (each pair ran back to back), then the
        ratio of the medians in parentheses; the two agree when the load was steady."""
        paired = statistics.median(r[a] / r[b] for r in self.rounds)
        return f"{paired:.2f}x ({self.seconds(a) / self.seconds(b):.2f}x)"


def inference(fn: Callable[..., object], *args) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn(*args)

    return run


def fwd_bwd(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        forward().backward()

    return run


# -- 1 + 3 + 4: one MoE layer ---------------------------------------------------------------------
def moe_pair(d_model: int, experts: int, top_k: int, width: int):
    """Our MoE and transformers' Mixtral sparse MoE block holding the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    ours = MoE(d_model, experts, width, shared_width=0)
    with torch.no_grad():
        for p in (ours.router.weight, ours.w_gate, ours.w_up, ours.w_down):
            p.normal_(0.0, 0.05)
    cfg = MixtralConfig(
        hidden_size=d_model,
        intermediate_size=width,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = "eager"  # the per-expert loop; MACHINE.md: grouped_mm is no faster on CPU
    theirs = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # transformers 5.x fuses experts: gate_up_proj (E, 2I, H), gate rows first
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.w_gate, ours.w_up], dim=1))
        theirs.experts.down_proj.copy_(ours.w_down)
    return ours, theirs.train(), cfg._experts_implementation


def bench_moe_layer(args, threads: int) -> list[str]:
    D, E, K, W, N = args.d_model, args.experts, args.top_k, args.width, args.tokens
    ours, theirs, hf_impl = moe_pair(D, E, K, W)
    spec = LayerSpec(E, K, W)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    x3 = x.detach().view(1, N, D).clone().requires_grad_()
    gy = torch.randn(N, D, generator=g)

    def ours_y(method: str) -> torch.Tensor:
        return ours(x, spec, method)[0]  # aux and z losses are computed too: they are part of our forward

    # Same function: outputs and gradients against transformers.
    y_ours = ours_y("loop")
    (y_ours * gy).sum().backward()
    y_hf = theirs(x3).view(N, D)
    (y_hf * gy).sum().backward()
    diff_y = (y_ours - y_hf).abs().max().item()
    diff_gx = (x.grad - x3.grad.view(N, D)).abs().max().item()
    diff_gw = (torch.cat([ours.w_gate.grad, ours.w_up.grad], 1) - theirs.experts.gate_up_proj.grad).abs().max().item()
    grouped_ok = hasattr(torch, "_grouped_mm")
    if grouped_ok:
        try:
            diff_grouped = (ours_y("grouped") - y_ours).abs().max().item()
        except RuntimeError as exc:  # a torch build whose CPU grouped GEMM refuses these shapes
            grouped_ok, diff_grouped = False, str(exc)

    ours_params, hf_params = [x, *ours.parameters()], [x3, *theirs.parameters()]
    n = args.matmul_n
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    # Order matters for Timings: each compared pair sits side by side.
    arms = {
        "hf fwd": inference(theirs, x3),
        "ours fwd": inference(ours_y, "loop"),
        "ours grouped fwd": inference(ours_y, "grouped"),
        "ours grouped fwd+bwd": fwd_bwd(lambda: (ours_y("grouped") * gy).sum(), ours_params),
        "ours fwd+bwd": fwd_bwd(lambda: (ours_y("loop") * gy).sum(), ours_params),
        "hf fwd+bwd": fwd_bwd(lambda: (theirs(x3).view(N, D) * gy).sum(), hf_params),
        "matmul": lambda: a @ b,
    }
    if not grouped_ok:
        del arms["ours grouped fwd"], arms["ours grouped fwd+bwd"]
    t = Timings(arms, args.repeats)

    # FLOPs (2 per multiply-accumulate): router N*D*E, top_k SwiGLU experts 3*N*K*D*W; backward = 2x forward.
    flops_fwd = 2 * N * (D * E + 3 * K * D * W)
    gflops = lambda flops, s: flops / s / 1e9  # noqa: E731
    ceiling = gflops(2 * n**3, t.seconds("matmul"))
    ms = t.ms
    rate_fwd, rate_train = gflops(flops_fwd, t.seconds("ours fwd")), gflops(3 * flops_fwd, t.seconds("ours fwd+bwd"))
    out = [
        f"### MoE layer, {threads} thread(s): D={D}, E={E}, top-{K}, W={W}, {N} tokens, fp32 "
        f"(load average {os.getloadavg()[0]:.1f} after)",
        "",
        f"Same weights in both; transformers experts implementation: {hf_impl}. "
        f"max |ours - transformers|: output {diff_y:.1e}, input grad {diff_gx:.1e}, gate/up weight grad {diff_gw:.1e}.",
        "",
        "| arm | transformers ms | ours ms | transformers / ours | ours GFLOP/s | ours / matmul ceiling |",
        "|---|---|---|---|---|---|",
        f"| forward (no grad) | {ms('hf fwd')} | {ms('ours fwd')} | {t.ratio('hf fwd', 'ours fwd')} "
        f"| {rate_fwd:.1f} | {rate_fwd / ceiling:.0%} |",
        f"| forward+backward | {ms('hf fwd+bwd')} | {ms('ours fwd+bwd')} | {t.ratio('hf fwd+bwd', 'ours fwd+bwd')} "
        f"| {rate_train:.1f} | {rate_train / ceiling:.0%} |",
        "",
        f"fp32 matmul ceiling, same run ({n}x{n} @ {n}x{n}): {ms('matmul')} ms = {ceiling:.1f} GFLOP/s.",
        "",
    ]
    if grouped_ok:
        out += [
            f"Dispatch (ours, max |grouped - loop| output {diff_grouped:.1e}): "
            f"forward loop {ms('ours fwd')} ms vs grouped {ms('ours grouped fwd')} ms "
            f"(grouped / loop {t.ratio('ours grouped fwd', 'ours fwd')}); forward+backward loop "
            f"{ms('ours fwd+bwd')} ms vs grouped {ms('ours grouped fwd+bwd')} ms "
            f"(grouped / loop {t.ratio('ours grouped fwd+bwd', 'ours fwd+bwd')}).",
            "",
        ]
    else:
        why = diff_grouped if hasattr(torch, "_grouped_mm") else "this torch has no _grouped_mm"
        out += [f"Grouped dispatch not measured: {why}", ""]
    return out


# -- 2: sub-network through the parent vs standalone child ----------------------------------------
def time_subnet(parent: ElasticMoE, subnet: Subnet, tokens: torch.Tensor, repeats: int) -> tuple[float, Timings]:
    """(max abs logit diff, median seconds per arm) for `subnet` in the parent vs its extracted child."""
    child = extract(parent, subnet).train()
    inp, target = tokens[:, :-1], tokens[:, 1:].flatten()
    with torch.no_grad():
        diff = (parent(inp, subnet).logits - child(inp).logits).abs().max().item()

    def loss(model: ElasticMoE, sub: Subnet | None = None) -> torch.Tensor:
        return F.cross_entropy(model(inp, sub).logits.flatten(0, 1), target)

    arms = {
        "parent fwd": inference(parent, inp, subnet),
        "child fwd": inference(child, inp),
        "parent fwd+bwd": fwd_bwd(lambda: loss(parent, subnet), list(parent.parameters())),
        "child fwd+bwd": fwd_bwd(lambda: loss(child), list(child.parameters())),
    }
    return diff, Timings(arms, repeats)


def label(subnet: Subnet) -> str:
    if subnet.is_uniform:
        return str(subnet)
    shapes = " / ".join(f"E{s.experts} k{s.top_k} W{s.width}" for s in subnet.specs)
    return f"L[{','.join(map(str, subnet.layers))}] per layer: {shapes}"


def bench_subnet(args, threads: int) -> list[str]:
    config = ModelConfig(
        vocab_size=4096,
        d_model=args.d_model,
        layers=4,
        heads=8,
        kv_heads=4,
        head_dim=args.d_model // 8,
        experts=args.experts,
        top_k=args.top_k,
        expert_width=args.width,
        max_seq_len=args.seq_len,
    )
    torch.manual_seed(0)
    parent = ElasticMoE(config).train()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    E, W = config.experts, config.expert_width
    subnets = [
        Subnet.uniform((0, 1, 2), E // 2, 1, W // 2),
        Subnet((0, 1, 3), (LayerSpec(E, 2, W), LayerSpec(E // 2, 2, W // 4), LayerSpec(E // 4, 1, W // 2))),
    ]
    out = [
        f"### Sub-network through the parent vs standalone child, {threads} thread(s) "
        f"(load average {os.getloadavg()[0]:.1f} before)",
        "",
        f"Parent: d_model {config.d_model}, 4 layers, {E} experts, top-{config.top_k}, width {W}, vocab "
        f"{config.vocab_size}; batch {args.batch} x {args.seq_len} tokens. The child is "
        "`elasticmoe.extract.extract(parent, subnet)` (contiguous copies of the kept weights); "
        "forward+backward uses cross-entropy on next tokens.",
        "",
        "| sub-network | max abs logit diff | fwd parent ms | fwd child ms | fwd parent / child "
        "| fwd+bwd parent ms | fwd+bwd child ms | fwd+bwd parent / child |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for subnet in subnets:
        diff, t = time_subnet(parent, subnet, tokens, args.repeats)
        row = [f"`{label(subnet)}`", f"{diff:.1e}"]
        for kind in ("fwd", "fwd+bwd"):
            a, b = f"parent {kind}", f"child {kind}"
            row += [t.ms(a), t.ms(b), t.ratio(a, b)]
        out.append("| " + " | ".join(row) + " |")
    return [*out, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch thread counts to run, in order")
    ap.add_argument("--repeats", type=int, default=8, help="timed rounds per arm (even: both orders equally)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens through the single MoE layer")
    ap.add_argument("--batch", type=int, default=4, help="sequences for the sub-network comparison")
    ap.add_argument("--seq-len", type=int, default=128, help="sequence length for the sub-network comparison")
    ap.add_argument("--matmul-n", type=int, default=1024, help="size of the square fp32 matmul ceiling")
    ap.add_argument(
        "--subnet-threads",
        type=int,
        nargs="*",
        default=[1],
        help="thread counts for the sub-network comparison (1 thread is the stable one on a shared CPU)",
    )
    ap.add_argument("--write", default=None, help="write the markdown report to this file")
    args = ap.parse_args(argv)

    import transformers

    start, load0 = time.perf_counter(), os.getloadavg()
    lines = [
        "# MoE benchmarks (CPU)",
        "",
        "Produced by:",
        "",
        "    "
        + " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", ".venv/bin/python", *sys.argv]),
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}. Load average at start "
        f"{load0[0]:.1f} (the machine is shared: compare the ratios, which come from interleaved arms, "
        f"not absolute times). {args.repeats} interleaved rounds after 2 warm-up rounds; times are medians; "
        "ratios are the median of per-round ratios, with the ratio of medians in parentheses.",
        "",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        section = bench_moe_layer(args, threads)
        print("\n".join(section), flush=True)
        lines += section
    for threads in args.subnet_threads:
        torch.set_num_threads(threads)
        section = bench_subnet(args, threads)
        print("\n".join(section), flush=True)
        lines += section
    lines.append(f"Total wall time {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}.")
    report = "\n".join(lines) + "\n"
    print(lines[-1])
    if args.write:
        with open(args.write, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
