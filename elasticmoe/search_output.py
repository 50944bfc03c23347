"""What a search leaves behind: `pareto.json`, `pareto.png` and the terminal table.

pareto.json holds the frontier points (subnet text and JSON, params, active params, FLOPs/token,
memory, latency predicted and measured, loss per task and mix), the seed, the constraints as given
and resolved, the parent's figures, the predictors' errors and the search's own cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import cost as costmod
from .checkpoint import atomic_write_bytes
from .subnet import Subnet

if TYPE_CHECKING:
    from .search import SearchResult


def results_dict(result: SearchResult, seed: int | None = None, constraints=None, parent_cost=None) -> dict:
    """The content of pareto.json (see `write_search_results`)."""
    cons = result.constraints if constraints is None else constraints  # a search.Constraints
    if isinstance(parent_cost, costmod.Cost):
        parent_cost = asdict(parent_cost)
    table = result.latency_table
    return {
        "format": "elasticmoe-search",
        "method": result.method,
        "seed": result.seed if seed is None else seed,
        "per_layer": result.per_layer,
        "space": result.space.to_dict() if result.space else None,
        "constraints": {
            "given": cons.given(),
            "resolved": result.limits,
            "seq_len": result.seq_len,
            "batch": result.batch,
        },
        "objective": result.objective,  # task weights of every loss_mix
        "parent": result.parent.to_dict(),
        "parent_cost": parent_cost,
        "frontier": [c.to_dict() for c in result.frontier],
        "latency_frontier": [c.to_dict() for c in result.latency_frontier],
        "latency_table": None
        if table is None
        else {"device": table.device, "batch": table.batch, "seq_len": table.seq_len, "repeats": table.repeats},
        "predictor_error": {"loss": result.predictor, "latency": result.latency_error},
        "search_cost": {
            "evaluated": len(result.evaluated),
            "tokens": result.tokens,
            "flops": result.flops,
            "seconds": round(result.seconds, 3),
        },
        "evaluated": [
            {
                "subnet": c.text,
                "active_params": c.active_params,
                "params": c.params,
                "latency_ms_predicted": c.latency_ms,
                "loss_mix": c.loss,
            }
            for c in result.evaluated
        ],
    }


def write_search_results(
    out_dir: Path | str,
    result: SearchResult,
    seed: int | None = None,
    constraints=None,
    parent_cost: costmod.Cost | dict | None = None,
) -> dict[str, Path]:
    """Write `pareto.json` and `pareto.png` into `out_dir`; returns their paths.

    pareto.json: format, method, seed, per_layer, space, constraints (given, resolved to absolute
    limits, batch), parent (figures and losses), parent_cost, frontier and latency_frontier (each
    point: subnet text and JSON, params, active params, FLOPs/token, memory, latency predicted and
    measured, loss per task and mix), latency_table, predictor_error (loss, latency), search_cost
    (evaluations, tokens, FLOPs, seconds) and every evaluated candidate in short form."""
    out = Path(out_dir)
    data = results_dict(result, seed, constraints, parent_cost)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "pareto.json", (json.dumps(data, indent=2) + "\n").encode())
    atomic_write_bytes(out / "pareto.png", _plot(result))
    return {"json": out / "pareto.json", "png": out / "pareto.png"}


def _plot(result: SearchResult) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        ("active_params", result.frontier, "active params per token"),
        ("latency_ms", result.latency_frontier, "latency (ms, predicted)"),
    ]
    for ax, (attr, front, label) in zip(axes, panels):
        pts = [c for c in result.evaluated if getattr(c, attr) is not None]
        if not pts:
            ax.text(0.5, 0.5, "no latency table", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.scatter(
            [getattr(c, attr) for c in pts],
            [c.loss for c in pts],
            s=12,
            c="0.6",
            alpha=0.35,
            label=f"evaluated ({len(pts)})",
        )
        ax.plot([getattr(c, attr) for c in front], [c.loss for c in front], "o-", c="C3", ms=5, label="Pareto front")
        if attr == "latency_ms" and any(c.latency_ms_measured for c in front):
            ax.scatter(
                [c.latency_ms_measured for c in front],
                [c.loss for c in front],
                marker="x",
                c="C0",
                label="front, measured latency",
            )
        if getattr(result.parent, attr) is not None:
            ax.scatter([getattr(result.parent, attr)], [result.parent.loss], marker="*", s=160, c="k", label="parent")
        ax.set_xlabel(label)
        ax.set_ylabel("search-split loss (mix, nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.method} search, seed {result.seed}: {len(result.evaluated)} feasible candidates")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _human(x: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _short(subnet: Subnet) -> str:
    """One terminal line, per-layer sub-networks included: `L[0-2] E[8,4,4] k[2,1,1] W[64,32,32]`."""
    if subnet.is_uniform:
        return str(subnet)
    lists = {
        f: ",".join(str(getattr(s, a)) for s in subnet.specs)
        for f, a in (("E", "experts"), ("k", "top_k"), ("W", "width"))
    }
    return str(Subnet.uniform(subnet.layers, 1, 1, 1)).split()[0] + "".join(f" {f}[{v}]" for f, v in lists.items())


def format_table(result: SearchResult):
    """A short rich Table of the reported points (both fronts), smallest first, parent last. Latency
    is the direct measurement where there is one, else the table's prediction."""
    from rich.table import Table

    measured = result.parent.latency_ms_measured is not None
    table = Table(title=f"Pareto front ({result.method}, seed {result.seed}, {len(result.evaluated)} evaluated)")
    latency = "latency ms" + (" (measured)" if measured else " (predicted)" if result.latency_table else "")
    for name in ("subnet", "params", "active", "FLOPs/tok", latency, "memory MiB", "loss", "Δ parent"):
        table.add_column(name, justify="left" if name == "subnet" else "right")
    rows = sorted(result.reported, key=lambda c: (c.active_params, c.loss)) + [result.parent]
    for c in rows:
        lat = c.latency_ms_measured if c.latency_ms_measured is not None else c.latency_ms
        table.add_row(
            _short(c.subnet) if c is not result.parent else f"parent {c.text}",
            _human(c.params),
            _human(c.active_params),
            _human(c.flops_per_token),
            "-" if lat is None else f"{lat:.2f}",
            f"{c.memory_mb:.2f}",
            f"{c.loss:.4f}",
            f"{c.loss - result.parent.loss:+.4f}",
        )
    return table
