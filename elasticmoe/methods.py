"""Is elastic pre-training worth it? Each child against the alternatives a user would pick.

For every child with measured alternatives (see `phases.baseline` and `pipeline.phase_baseline`),
one row per method, quality per task (95% intervals, on the same test split) and cost in
training FLOPs, each against the named from-scratch baseline of the child's architecture:

    elastic, zero-shot   marginal = search/K + extraction              all-in = P + marginal
    elastic + fine-tune  marginal = search/K + extraction + fine-tune  all-in = P + marginal
    from scratch         the child's architecture trained alone (the named baseline)
    prune-distill        marginal = pruning pass + distillation        all-in = D + marginal
    expert-prune         marginal = pruning pass (no training)         all-in = D + marginal
    retrofit, zero-shot  marginal = R + extraction                     all-in = D + marginal
    retrofit + fine-tune marginal = R + extraction + fine-tune         all-in = D + marginal

P is the elastic parent's training (with its validation and importance passes), D the dense
parent's (the parent's architecture trained normally, the starting point of the pruning and
retrofit methods), R a retrofit's elastic training of the dense parent (its re-ordering, steps and
validation; `phases.retrofit_baseline`), counted in the marginal cost because it is what a user
who has the dense parent pays for the child; amortized = P/K (D/K; (D + R)/K for retrofit, whose
retrofitted parent serves the whole family) + the rest of the marginal cost, over the K children
of the family. A retrofit row per retrofit folder of the run (`retrofit`, `retrofit-4x`: its
training budget). The parent's own section compares the elastic parent with the dense parent at
equal tokens (and at equal training FLOPs when that baseline was run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .evaluate import paired_ratio_diff_ci
from .ledger import FINETUNE_PHASES, sum_work

DENSE = {"equal tokens": "dense-parent", "equal FLOPs": "dense-parent-flops"}


def _work(records: list[dict], ref, folder: Path, phases: tuple[str, ...], key: str = "run") -> dict[str, float]:
    return sum_work(records, phases=phases, **{key: ref(folder)})


def _flops_per_token(records: list[dict], ref, run_dir: Path, dense_dir: Path) -> tuple[float, float] | None:
    """Training FLOPs per training token of the elastic parent (its `train` segments) and of the
    dense parent (its `baseline` segments); None when either trained no token."""
    elastic = _work(records, ref, run_dir, ("train",))
    dense = _work(records, ref, dense_dir, ("baseline",))
    if not (elastic["tokens"] and dense["tokens"]):
        return None
    return elastic["flops"] / elastic["tokens"], dense["flops"] / dense["tokens"]


def _score(ev: dict | None, task: str) -> str:
    t = (ev or {}).get("tasks", {}).get(task)
    if not t:
        return "n/a"
    lo, hi = t["ci"]
    return f"{t['score']:.3f} [{lo:.3f}, {hi:.3f}]"


def _tasks(evals: dict) -> list[str]:
    first = next((e for e in evals.values() if e.get("tasks")), {})
    return [t for t in first.get("tasks", {}) if not t.endswith("/answer-loss")]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def compare(run_dir: Path, records: list[dict], ref, costs: list, evals: dict) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON of the method comparison; empty when no alternative was measured."""
    base = Path(run_dir) / "baselines"
    dense_cost = {
        label: _work(records, ref, base / name, ("baseline", "train-eval"))
        for label, name in DENSE.items()
        if (base / name / "parent" / "manifest.json").exists()
    }
    if not dense_cost and not any(f"{c.name} (from scratch)" in evals for c in costs):
        return "", {}
    tasks = _tasks(evals)
    lines = ["## Is elastic pre-training worth it?", ""]
    data: dict[str, Any] = {"parent": {}, "children": {}}
    # the parent against the dense parent
    if dense_cost:
        parent_flops = costs[0].parent["flops"]
        lines += [
            "The elastic parent against the same architecture trained normally on the same data (quality on the "
            "test split, 95% intervals; text in bits/byte, lower is better; tasks in exact match):",
            "",
            "| model | training FLOPs | " + " | ".join(tasks) + " |",
            "|---|---|" + "---|" * len(tasks),
            f"| elastic parent | {_fmt(parent_flops)} | "
            + " | ".join(_score(evals.get("parent"), t) for t in tasks)
            + " |",
        ]
        data["parent"]["elastic"] = {"flops": parent_flops, "eval": evals.get("parent")}
        for label, work in dense_cost.items():
            ev = evals.get(f"parent (dense, {label})")
            lines.append(
                f"| dense parent, {label} | {_fmt(work['flops'])} | " + " | ".join(_score(ev, t) for t in tasks) + " |"
            )
            data["parent"][label] = {"flops": work["flops"], "tokens": work["tokens"], "eval": ev}
        ev_e, ev_d = evals.get("parent"), evals.get("parent (dense, equal tokens)")
        if ev_e and ev_d and "text" in ev_e.get("tasks", {}) and "text" in ev_d.get("tasks", {}):
            e, d = ev_e["tasks"]["text"]["score"], ev_d["tasks"]["text"]["score"]
            paired = paired_text_diff(ev_e["tasks"]["text"], ev_d["tasks"]["text"])
            spread = (
                f"; elastic minus dense, 95% paired interval [{paired[0]:+.3f}, {paired[1]:+.3f}]" if paired else ""
            )
            lines += [
                "",
                f"Elastic parent vs dense parent at equal tokens: text {e:.3f} vs {d:.3f} bits/byte "
                f"({100 * (e / d - 1):+.1f}%{spread}; target within +1%).",
            ]
            data["parent"]["text_vs_dense_equal_tokens"] = e / d - 1
            data["parent"]["text_diff_paired_ci"] = list(paired) if paired else None
        per_token = _flops_per_token(records, ref, Path(run_dir), base / DENSE["equal tokens"])
        if per_token:
            elastic, dense = per_token
            lines += [
                "",
                f"Training FLOPs per token: elastic parent {_fmt(elastic)}, dense parent {_fmt(dense)} "
                f"({elastic / dense:.2f}x: what the sub-networks trained beside the full network cost).",
            ]
            data["parent"]["flops_per_token_vs_dense"] = elastic / dense
        lines.append("")
    dense_flops = dense_cost.get("equal tokens", {}).get("flops")
    for c in costs:
        rows = _child_rows(c, records, ref, base, evals, dense_flops)
        if len(rows) <= 2:  # no alternative measured for this child
            continue
        denom = c.baseline.flops if c.baseline else None
        lines += [
            f"### {c.name} (`{c.subnet}`)",
            "",
            "| method | " + " | ".join(tasks) + " | marginal FLOPs | all-in FLOPs | amortized FLOPs |",
            "|---|" + "---|" * len(tasks) + "---|---|---|",
        ]
        for r in rows:
            cells = [_score(r["eval"], t) for t in tasks]
            figs = []
            for kind in ("marginal", "all-in", "amortized"):
                v = r["cost"].get(kind)
                pct = f" ({100 * v / denom:.0f}% of scratch)" if v is not None and denom else ""
                figs.append("n/a" if v is None else _fmt(v) + pct)
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " | " + " | ".join(figs) + " |")
        if c.baseline:
            lines += ["", f"Percentages are of this child's from-scratch baseline: {c.baseline.name}."]
        kept = (_meta(Path(run_dir) / "finetuned" / c.name / "model").get("finetune") or {}).get("kept")
        if kept:  # the fine-tune publishes its best validated state: say which one the row shows
            lines += ["", f"Fine-tuned row: {kept['reason']} (chosen on the validation split, not on this test split)."]
        verdict = _verdict(rows)
        lines += ["", f"Verdict: {verdict}", ""] if verdict else [""]
        data["children"][c.name] = {"rows": rows, "verdict": verdict, "scratch_flops": denom}
    return "\n".join(lines) + "\n", data


def _child_rows(c, records, ref, base: Path, evals: dict, dense_flops: float | None) -> list[dict]:
    k = c.family_size
    zero = c.search_share["flops"] + c.extract["flops"]
    rows = [
        {
            "method": "elastic, zero-shot",
            "eval": evals.get(c.name),
            "cost": {"marginal": zero, "all-in": c.parent["flops"] + zero, "amortized": c.parent["flops"] / k + zero},
        },
        {
            "method": "elastic + fine-tune",
            "eval": evals.get(f"{c.name}-ft"),
            "cost": {kind: c.figure(kind) for kind in ("marginal", "all-in", "amortized")},
        },
    ]
    if f"{c.name} (from scratch)" in evals and c.baseline:
        f = c.baseline.flops
        rows.append(
            {
                "method": "from scratch",
                "eval": evals[f"{c.name} (from scratch)"],
                "cost": {"marginal": f, "all-in": f, "amortized": f},
            }
        )
    for method in ("prune-distill", "expert-prune"):
        ev = evals.get(f"{c.name} ({method})")
        if ev is None:
            continue
        folder = base / f"{c.name}-{method}"
        m = _work(records, ref, folder / "pruned", ("prune",), key="out")["flops"]
        if method == "prune-distill":
            m += _work(records, ref, folder / "distilled", FINETUNE_PHASES, key="out")["flops"]
        cost = {"marginal": m}
        if dense_flops is not None:
            cost.update({"all-in": dense_flops + m, "amortized": dense_flops / k + m})
        rows.append({"method": method, "eval": ev, "cost": cost})
    for folder in _retrofits(base):
        rows += _retrofit_rows(c, records, ref, folder, evals, dense_flops)
    return rows


def _retrofits(base: Path) -> list[Path]:
    """The run's retrofit folders (a finished retrofitted parent), smallest budget first."""
    found = []
    for d in sorted(base.glob("*")):
        meta = _meta(d / "parent")
        if meta.get("method") == "retrofit" and (d / "parent" / "manifest.json").exists():
            found.append((meta.get("retrofit", {}).get("tokens", 0), d.name, d))
    return [d for *_, d in sorted(found)]


def _meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text()).get("meta", {})
    except (OSError, ValueError):
        return {}


def retrofit_work(records: list[dict], ref, folder: Path) -> dict[str, float]:
    """R: the retrofit's elastic training of the dense parent (the one-shot re-ordering, training
    segments, validation and re-ordering passes, all with run = its folder), only the attempts
    behind its final model (an abandoned attempt would inflate the alternative's cost, in our
    favour)."""
    kept = set(_meta(folder / "parent").get("ledger_attempts") or [])
    mine = [r for r in records if not kept or "attempt" not in r or r["attempt"] in kept]
    return _work(mine, ref, folder, ("importance", "retrofit", "train-eval"))


def _retrofit_rows(c, records, ref, folder: Path, evals: dict, dense_flops: float | None) -> list[dict]:
    """The retrofit rows of child c: zero-shot and after the fine-tune, when evaluated."""
    r = retrofit_work(records, ref, folder)["flops"]
    x = _work(records, ref, folder / "children" / c.name, ("extract",), key="out")["flops"]
    f = _work(records, ref, folder / "finetuned" / c.name, FINETUNE_PHASES, key="out")["flops"]
    rows = []
    for label, rest in ((f"{folder.name}, zero-shot", x), (f"{folder.name} + fine-tune", x + f)):
        ev = evals.get(f"{c.name} ({label})")
        if ev is None:
            continue
        cost = {"marginal": r + rest}
        if dense_flops is not None:
            cost.update({"all-in": dense_flops + r + rest, "amortized": (dense_flops + r) / c.family_size + rest})
        rows.append({"method": label, "eval": ev, "cost": cost, "retrofit_flops": r})
    return rows


def _text(row: dict | None) -> dict | None:
    return ((row or {}).get("eval") or {}).get("tasks", {}).get("text")


def paired_text_diff(a: dict, b: dict) -> tuple[float, float] | None:
    """95% bootstrap interval of bits/byte(a) - bits/byte(b), resampling the documents both were
    scored on; None when either result lacks per-document figures or they are other documents."""
    if not (a.get("doc_bits") and b.get("doc_bits") and a.get("doc_bytes") == b.get("doc_bytes")):
        return None
    return paired_ratio_diff_ci(a["doc_bits"], b["doc_bits"], a["doc_bytes"])


def _verdict(rows: list[dict]) -> str:
    """One line: the fine-tuned elastic child (the state its fine-tune kept on validation, the
    zero-shot child when no step helped) against the best (on text bits/byte) of the trained
    alternatives: from scratch, prune-distill, each retrofit after its fine-tune; at what share of
    that method's all-in and amortized cost."""
    by = {r["method"]: r for r in rows}
    ours = by.get("elastic + fine-tune")
    trained = ("from scratch", "prune-distill")
    rivals = [r for r in rows if (r["method"] in trained or r["method"].endswith("+ fine-tune")) and r is not ours]
    rivals = [r for r in rivals if _text(r)]
    other = min(rivals, key=lambda r: _text(r)["score"]) if rivals else None
    a, b = _text(ours), _text(other)
    if a is None or b is None:
        return ""
    diff = b["score"] - a["score"]
    word = "beats" if diff > 0 else "loses to"
    paired = paired_text_diff(a, b)
    if paired is not None:
        lo, hi = paired
        measured = "a measured difference" if lo > 0 or hi < 0 else "not a measured difference"
        noise = f" (elastic minus it, 95% paired interval over the same documents [{lo:+.3f}, {hi:+.3f}]: {measured})"
    else:
        overlap = a["ci"][0] <= b["ci"][1] and b["ci"][0] <= a["ci"][1]
        noise = " (inside the 95% intervals: not a measured difference)" if overlap else ""
    shares = []
    for kind in ("all-in", "amortized"):
        x, y = ours["cost"].get(kind), other["cost"].get(kind)
        if x is not None and y:
            shares.append(f"{100 * x / y:.0f}% of its {kind} FLOPs")
    at = " at " + " and ".join(shares) if shares else ""
    best = f" (the best of {len(rivals)} trained alternatives)" if len(rivals) > 1 else ""
    return (
        f"the fine-tuned elastic child {word} {other['method']}{best} by {abs(diff):.3f} bits/byte on text{noise}{at}."
    )
