"""The command line: the only module that reads argv. Each subcommand loads a recipe or run
folder, applies overrides, and calls one library function. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError

log = logging.getLogger("elasticmoe")


def _recipe(args):
    from .recipe import load_recipe

    return load_recipe(args.config, args.set)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="recipe file (YAML/TOML/JSON) or preset name (tiny, micro, small-gpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one recipe key, e.g. --set train.steps=100 (repeatable)")


# -- info --------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    """Table of the space's uniform sub-networks: params, active params, FLOPs/token; optional forward."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from .cost import cost
    from .model import ElasticMoE
    from .subnet import enumerate_uniform

    recipe = _recipe(args)
    c = recipe.model
    subnets = enumerate_uniform(recipe.space, list(range(c.layers)))
    parent = cost(c, None, recipe.data.seq_len)
    model = ElasticMoE(c) if args.forward else None
    table = Table(title=f"{len(subnets)} uniform sub-networks (seq_len {recipe.data.seq_len})")
    for col in ("subnet", "params", "active", "GFLOP/token fwd", "params/parent", "active/parent"):
        table.add_column(col, justify="right")
    for sn in subnets[:: max(1, len(subnets) // args.rows)]:
        k = cost(c, sn, recipe.data.seq_len)
        if model is not None:
            with torch.no_grad():
                out = model(torch.randint(0, c.vocab_size, (1, 16)), sn)
            assert torch.isfinite(out.logits).all()
        table.add_row(str(sn), f"{k.total_params:,}", f"{k.active_params:,}", f"{k.flops_forward / 1e9:.4f}",
                      f"{k.total_params / parent.total_params:.3f}", f"{k.active_params / parent.active_params:.3f}")
    Console().print(table)
    return 0


# -- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .train import train

    recipe = _recipe(args)
    res = train(recipe, Path(args.out), resume=args.resume, progress=not args.quiet)
    table = Table(title=f"validation cross-entropy (nats/token) at step {res.step}")
    tasks = sorted(next(iter(res.final_eval.values()), {}))
    table.add_column("sub-network")
    for t in tasks:
        table.add_column(t, justify="right")
    for name, row in res.final_eval.items():
        table.add_row(name, *(f"{row[t]:.3f}" for t in tasks))
    Console().print(table)
    print(f"parent written to {Path(args.out) / 'parent'} | {res.tokens_per_s:,.0f} tokens/s (median)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticmoe", description="Train once, extract many: elastic MoE LMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="list the elastic space's sub-networks with their cost")
    _add_recipe_args(p)
    p.add_argument("--forward", action="store_true", help="also run each sub-network on random tokens")
    p.add_argument("--rows", type=int, default=40, help="at most this many rows")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train the elastic parent")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"elasticmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
