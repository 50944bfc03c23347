"""The honest report: what each child cost, against a named baseline, three ways.

For a family of K children extracted from one elastic parent, with ledger totals
P (elastic pre-training of the parent), S (search, shared by the family), X_c (extraction and
verification of child c) and F_c (its fine-tuning), the cost of child c is reported as

    (a) marginal   = S / K + X_c + F_c          what one more child costs once the parent exists
    (b) all-in     = P + S / K + X_c + F_c      as if the parent had been trained for this child alone
    (c) amortized  = P / K + S / K + X_c + F_c  the parent's cost split evenly across the family

(P includes the parent's periodic validation and importance re-ordering passes, ledger phases
`train-eval` and `importance` of the parent's run; a measured baseline likewise includes its own
validation passes.)

each as a percentage of a *named* baseline B_c: either a measured from-scratch run of the
child's architecture recorded in the same ledger (`elasticmoe baseline`), or, only when asked
for explicitly, an estimate F_train x D (the cost model's training FLOPs per token of the child times D
tokens) whose inputs are printed beside every figure.
Without a baseline no percentage is printed (asking for one is an error).

Break-even: training n children from scratch costs n x mean(B); the elastic family costs
P + n x mean(marginal). It is cheaper once n > P / (mean(B) - mean(marginal)) (never if the
marginal cost is not below the baseline). FLOPs are the primary unit (from `cost.py`, the same
numbers as the ledger); wall seconds are shown beside them and depend on the machine.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import ConfigError
from .ledger import FINETUNE_PHASES, Ledger, sum_work

log = logging.getLogger(__name__)


@dataclass
class Baseline:
    name: str  # e.g. "measured: L[0-1] E4 k1 W128 from scratch, 150k tokens"
    flops: float
    seconds: float
    tokens: int
    kind: str  # "measured" or "estimate"
    formula: str = ""  # for estimates: the formula with its inputs


@dataclass
class ChildCost:
    name: str
    subnet: str
    params: int
    active_params: int
    search_share: dict[str, float]
    extract: dict[str, float]
    finetune: dict[str, float]
    parent: dict[str, float]
    family_size: int
    baseline: Baseline | None = None
    quality: dict[str, Any] = field(default_factory=dict)

    def figure(self, kind: str, unit: str = "flops") -> float:
        m = self.search_share[unit] + self.extract[unit] + self.finetune[unit]
        if kind == "marginal":
            return m
        if kind == "all-in":
            return self.parent[unit] + m
        if kind == "amortized":
            return self.parent[unit] / self.family_size + m
        raise ValueError(kind)

    def percent(self, kind: str, unit: str = "flops") -> float:
        if self.baseline is None:
            raise ConfigError(
                f"no baseline for child {self.name}: a percentage needs a named denominator. Train one with "
                f"`elasticmoe baseline RUN_DIR --arch '{self.subnet}' --tokens N` or pass --estimate-baseline-tokens D "
                "to use the estimate F_train x D (cost-model training FLOPs per token x D)"
            )
        denom = self.baseline.flops if unit == "flops" else self.baseline.seconds
        return 100.0 * self.figure(kind, unit) / denom


KINDS = ("marginal", "all-in", "amortized")


def family_costs(
    records: list[dict], children: list[dict], baselines: dict[str, Baseline], ref=lambda path: path
) -> list[ChildCost]:
    """Per-child costs from raw ledger records. `children`: [{"name", "subnet", "child_dir",
    "finetune_out" (optional), "params", "active_params"}]; `baselines`: subnet text -> Baseline."""
    k = len(children)
    if k == 0:
        raise ConfigError("the report needs at least one extracted child")
    # the parent's cost: elastic training steps + its periodic validation + importance passes
    run = next((r["run"] for r in records if r.get("phase") == "train" and "run" in r), None)
    parts = [sum_work(records, phase="train")] + [
        sum_work(records, phase=p, run=run) for p in ("train-eval", "importance")
    ]
    parent = {k: sum(part[k] for part in parts) for k in parts[0]}
    search = sum_work(records, phase="search")
    out = []
    for ch in children:
        ft = (
            sum_work(records, phases=FINETUNE_PHASES, out=ref(ch["finetune_out"]))
            if ch.get("finetune_out")
            else sum_work([])
        )
        out.append(
            ChildCost(
                name=ch["name"],
                subnet=ch["subnet"],
                params=ch["params"],
                active_params=ch["active_params"],
                search_share={u: v / k for u, v in search.items()},
                extract=sum_work(records, phase="extract", out=ref(ch["child_dir"])),
                finetune=ft,
                parent=parent,
                family_size=k,
                baseline=baselines.get(ch["subnet"]),
            )
        )
    return out


def break_even(costs: list[ChildCost], parent_flops: float) -> dict[str, Any]:
    """Smallest family size n for which the elastic family is cheaper than n from-scratch runs."""
    with_b = [c for c in costs if c.baseline is not None]
    if not with_b:
        return {"children": None, "reason": "no baseline"}
    mean_b = sum(c.baseline.flops for c in with_b) / len(with_b)
    mean_m = sum(c.figure("marginal") for c in with_b) / len(with_b)
    if mean_m >= mean_b:
        return {
            "children": None,
            "reason": "a child's marginal cost is not below its from-scratch baseline",
            "mean_baseline_flops": mean_b,
            "mean_marginal_flops": mean_m,
        }
    n = math.floor(parent_flops / (mean_b - mean_m)) + 1
    return {
        "children": n,
        "mean_baseline_flops": mean_b,
        "mean_marginal_flops": mean_m,
        "formula": "n > P / (mean(B) - mean(marginal))",
    }


def parse_claim(claim: str) -> tuple[float, str]:
    m = re.match(r"\s*([0-9]*\.?[0-9]+)\s*(%|x)\s*(?:of\s+)?(.*)$", claim)
    if not m:
        raise ConfigError(f"--claim {claim!r} must look like '6% of pre-training cost of comparable models'")
    value = float(m.group(1))
    if m.group(2) == "x":  # "360x cheaper" means cost = 1/360 of the basis
        value = 100.0 / value
    return value, m.group(3).strip() or "(no basis stated)"


def check_claim(claim: str, child: ChildCost) -> dict[str, Any]:
    """Which of marginal / all-in / amortized a claimed percentage corresponds to, and the others."""
    value, basis = parse_claim(claim)
    figures = {kind: child.percent(kind) for kind in KINDS}
    closest = min(figures, key=lambda kind: abs(math.log(max(figures[kind], 1e-12) / value)))
    ratio = figures[closest] / value
    return {
        "claim": claim,
        "claimed_percent": value,
        "stated_basis": basis,
        "child": child.name,
        "figures_percent": figures,
        "matches": closest if 0.9 <= ratio <= 1.1 else None,
        "ratio_to_claim": ratio,
        "closest": closest,
        "baseline": child.baseline.name,
    }


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def _pct(c: ChildCost, kind: str) -> str:
    return f"{c.percent(kind):.1f}%" if c.baseline else "n/a (no baseline)"


def render_markdown(
    costs: list[ChildCost],
    parent_info: dict,
    evals: dict,
    claims: list[dict],
    be: dict,
    ledger_totals: dict,
    retention: list[dict] | None = None,
) -> str:
    lines = ["# elasticmoe report", ""]
    lines += [
        f"Parent: {parent_info.get('params', 0):,} params, {parent_info.get('active_params', 0):,} active; "
        f"elastic pre-training P = {_fmt_flops(costs[0].parent['flops'])} FLOPs, "
        f"{parent_info.get('tokens_seen') or 0:,} training tokens, {costs[0].parent['seconds']:.0f} s.",
        "",
    ]
    if parent_info.get("schedule"):
        lines += [f"Training schedule: {parent_info['schedule']}.", ""]
    if parent_info.get("data"):
        lines += [f"Training data: {parent_info['data']}.", ""]
    lines += [
        "Cost definitions (FLOPs from the analytic cost model, forward+backward = 3x forward):",
        "(a) marginal = search/K + extraction + fine-tune; (b) all-in = parent + marginal; "
        f"(c) amortized = parent/K + marginal, with K = {costs[0].family_size} children.",
        "",
    ]
    lines += [
        "## Children",
        "",
        "| child | subnet | params | active | marginal FLOPs | all-in FLOPs | amortized FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c.name} | `{c.subnet}` | {c.params:,} | {c.active_params:,} | "
            f"{_fmt_flops(c.figure('marginal'))} | {_fmt_flops(c.figure('all-in'))} | "
            f"{_fmt_flops(c.figure('amortized'))} |"
        )
    lines += ["", "## Cost against a named baseline", ""]
    for c in costs:
        if c.baseline is None:
            lines.append(f"- {c.name}: no baseline for this architecture, so no percentage is given.")
            continue
        b = c.baseline
        basis = f"{b.name} = {_fmt_flops(b.flops)} FLOPs" + (f" ({b.formula})" if b.formula else "")
        for kind in KINDS:
            # measured time is shown as time, never as a percentage: on a shared machine a baseline
            # slowed by another job would make the child look cheaper than its FLOPs say
            wall = (
                f"measured on this machine: {c.figure(kind, 'seconds'):.0f} device-s vs the baseline's "
                f"{b.seconds:.0f} device-s"
                if b.kind == "measured" and b.seconds > 0
                else "an estimate has no wall time"
            )
            lines.append(f"- {c.name} {kind}: {_pct(c, kind)} of the baseline's FLOPs [{basis}] ({wall})")
    lines += ["", "## Break-even", ""]
    if be.get("children"):
        lines.append(
            f"The elastic family is cheaper than training each child from scratch once it has more than "
            f"{be['children'] - 1} children (n >= {be['children']}; {be['formula']}, mean baseline "
            f"{_fmt_flops(be['mean_baseline_flops'])} FLOPs, mean marginal "
            f"{_fmt_flops(be['mean_marginal_flops'])} FLOPs)."
        )
    else:
        lines.append(f"No break-even: {be.get('reason')}.")
    if evals:
        lines += ["", "## Quality per task (held-out test split)", ""]
        tasks = sorted({t for r in evals.values() for t in r.get("tasks", r)})
        lines.append("| model | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        for name, res in evals.items():
            row = res.get("tasks", res)
            cells = []
            for t in tasks:
                v = row.get(t)
                cells.append(f"{v['score']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] ({v['metric']})" if v else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if retention:
        lines += ["", "## Retention vs the parent (1.0 = as good as the parent)", ""]
        lines += ["| child | task | metric | parent | before ft | after ft | retention before | retention after |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for r in retention:
            nums = ("parent", "before", "after", "retention_before", "retention_after")
            cells = [r["child"], r["task"], r["metric"]] + ["-" if r[k] is None else f"{r[k]:.3f}" for k in nums]
            lines.append("| " + " | ".join(cells) + " |")
    if claims:
        lines += ["", "## Claim check", ""]
        for cl in claims:
            f = cl["figures_percent"]
            verdict = (
                f"matches ({cl['matches']}, within 10%)"
                if cl["matches"]
                else f"matches none within 10% (closest: {cl['closest']}, {cl['ratio_to_claim']:.2f}x the claim)"
            )
            lines.append(
                f'- "{cl["claim"]}" for {cl["child"]} {verdict}; against [{cl["baseline"]}]: '
                + ", ".join(f"{k} = {v:.1f}%" for k, v in f.items())
            )
    lines += ["", "## Ledger totals by phase", "", "| phase | tokens | FLOPs | seconds |", "|---|---|---|---|"]
    for ph, t in ledger_totals.items():
        lines.append(f"| {ph} | {t['tokens']:,.0f} | {_fmt_flops(t['flops'])} | {t['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot_costs(costs: list[ChildCost], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in costs]
    parts = {
        "parent / K": [c.parent["flops"] / c.family_size for c in costs],
        "search / K": [c.search_share["flops"] for c in costs],
        "extraction": [c.extract["flops"] for c in costs],
        "fine-tune": [c.finetune["flops"] for c in costs],
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(costs)
    for label, vals in parts.items():
        ax.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, c in enumerate(costs):
        if c.baseline:
            ax.plot([i - 0.4, i + 0.4], [c.baseline.flops] * 2, "k--")
            ax.annotate(
                "baseline", (i, c.baseline.flops), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8
            )
    ax.set_ylabel("FLOPs")
    ax.set_title("amortized cost per child (stacked) vs from-scratch baseline (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def ledger_by_phase(records: list[dict]) -> dict[str, dict[str, float]]:
    phases = sorted({r.get("phase") for r in records if r.get("phase")})
    return {p: sum_work(records, phase=p) for p in phases}


def write_report(
    run_dir: Path,
    children: list[dict],
    baselines: dict[str, Baseline],
    parent_info: dict,
    evals: dict | None = None,
    claims: list[str] | None = None,
    require_percent: bool = False,
    retention: list[dict] | None = None,
) -> dict:
    """Compute and write RUN_DIR/report.md, report.json and cost.png. Returns the JSON data."""
    ledger = Ledger(run_dir / "ledger.jsonl")
    records, problems = ledger.read()
    for p in problems:
        log.warning("%s: damaged line, its work is missing from every figure: %s", ledger.path, p)
    costs = family_costs(records, children, baselines, ledger.ref)
    if (require_percent or claims) and not any(c.baseline for c in costs):
        costs[0].percent("marginal")  # raises the explanatory ConfigError
    target = next((c for c in costs if c.baseline), costs[0])
    checked = [check_claim(cl, target) for cl in claims or []]
    be = break_even(costs, costs[0].parent["flops"])
    totals = ledger_by_phase(records)
    md = render_markdown(costs, parent_info, evals or {}, checked, be, totals, retention)
    from .methods import compare  # the alternatives a user would pick, when measured

    methods_md, methods = compare(run_dir, records, ledger.ref, costs, evals or {})
    md += "\n" + methods_md if methods_md else ""
    from .reference import reference_section  # an elastified run: the children against the original

    md += reference_section(run_dir, costs, evals or {})
    from .skills import skills_section  # exact match by level and the retention verdicts (issue 24)

    skills_md, skills = skills_section(run_dir, _read(run_dir / "eval" / "results.json").get("models", {}))
    md += skills_md
    md += arena_section(run_dir)
    if problems:
        shown = "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        md = md.replace(
            "# elasticmoe report\n\n",
            f"# elasticmoe report\n\n**Warning: ledger.jsonl has {len(problems)} damaged line(s); the work they "
            f"recorded is missing from every figure below:** {shown}\n\n",
            1,
        )
    data = {
        "parent": parent_info,
        "family_size": len(costs),
        "children": [
            {
                "name": c.name,
                "subnet": c.subnet,
                "params": c.params,
                "active_params": c.active_params,
                "flops": {k: c.figure(k) for k in KINDS},
                "seconds": {k: c.figure(k, "seconds") for k in KINDS},
                "percent_of_baseline": {k: c.percent(k) for k in KINDS} if c.baseline else None,
                "baseline": vars(c.baseline) if c.baseline else None,
                "parts": {
                    "parent": c.parent,
                    "search_share": c.search_share,
                    "extract": c.extract,
                    "finetune": c.finetune,
                },
            }
            for c in costs
        ],
        "break_even": be,
        "claims": checked,
        "ledger_totals": totals,
        "evals": evals or {},
        "retention": retention or [],
        "ledger_problems": problems,
        "methods": methods,
        "skills": skills,
    }
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.json", json.dumps(data, indent=2) + "\n")
    plot_costs(costs, run_dir / "cost.png")
    return data


def arena_section(run_dir: Path) -> str:
    """People's arena ratings (`elasticmoe arena`) beside the automatic arena's, when votes exist."""
    from .arena import votes_path
    from .arena.ratings import report_section
    from .arena.store import read_outcomes

    outcomes = read_outcomes(votes_path(run_dir))
    if not outcomes:
        return ""
    return "\n" + "\n".join(report_section(outcomes, _read(run_dir / "eval" / "results.json").get("arena"))) + "\n"


# -- reading a run folder --------------------------------------------------------------------
def _read(path: Path) -> dict:
    """A JSON object file of the run ({} when absent); a damaged one is a one-line error."""
    if not path.is_file():
        return {}
    from .checkpoint import read_json_object

    return read_json_object(path)


def collect_children(run_dir: Path) -> list[dict]:
    """Children of the run: RUN/children/NAME (extracted), with RUN/finetuned/NAME if fine-tuned."""
    out = []
    for d in sorted((run_dir / "children").glob("*")):
        cfg = _read(d / "config.json")
        if not cfg or not (d / "manifest.json").exists():
            continue
        meta = cfg.get("meta", {})
        ft = run_dir / "finetuned" / d.name
        out.append(
            {
                "name": d.name,
                "subnet": meta.get("subnet", "?"),
                "child_dir": str(d.resolve()),
                "finetune_out": str(ft.resolve()) if (ft / "model" / "manifest.json").exists() else None,
                "params": meta.get("params", 0),
                "active_params": meta.get("active_params", 0),
            }
        )
    return out


def collect_baselines(run_dir: Path, records: list[dict], parent_config) -> dict[str, Baseline]:
    """Measured baselines: RUN/baselines/NAME runs recorded in the ledger, keyed by the subnet text
    of the parent whose child config they match."""
    from .config import ModelConfig

    out: dict[str, Baseline] = {}
    for d in sorted((run_dir / "baselines").glob("*")):
        if not (d / "parent" / "manifest.json").exists():
            continue
        cfg = ModelConfig.from_dict(_read(d / "parent" / "config.json")["model"])
        led = Ledger(run_dir / "ledger.jsonl")
        # only the attempts that produced this baseline's model: work of an abandoned attempt (killed
        # and restarted from scratch) would otherwise inflate the denominator, in our favour
        meta = _read(d / "parent" / "config.json").get("meta", {})
        kept = set(meta.get("ledger_attempts") or [])
        mine = [r for r in records if not kept or r.get("attempt") in kept]
        trained = sum_work(mine, phase="baseline", run=led.ref(d))
        if trained["flops"] <= 0:
            continue
        evals = sum_work(mine, phase="train-eval", run=led.ref(d))  # its validation, as for the parent
        tot = {k: trained[k] + evals[k] for k in trained}
        for ch in collect_children(run_dir):
            child_cfg = ModelConfig.from_dict(_read(Path(ch["child_dir"]) / "config.json")["model"])
            if child_cfg == cfg:
                out[ch["subnet"]] = Baseline(
                    name=f"measured: {ch['subnet']} trained from scratch on the same data, "
                    f"{trained['tokens']:,.0f} training tokens",
                    flops=tot["flops"],
                    seconds=tot["seconds"],
                    tokens=int(trained["tokens"]),
                    kind="measured",
                )
    del parent_config
    return out


def estimated_baselines(children: list[dict], tokens: int, seq_len: int) -> dict[str, Baseline]:
    """An explicit estimate, in the same FLOP convention as every other figure: the cost model's
    training FLOPs per token of the child's architecture (3 x forward, attention at `seq_len`)
    times D tokens (the 6 x N x D rule of Kaplan et al. 2020 with our own per-token count)."""
    from .config import ModelConfig
    from .cost import cost

    out = {}
    for ch in children:
        cfg = ModelConfig.from_dict(_read(Path(ch["child_dir"]) / "config.json")["model"])
        per_token = cost(cfg, None, seq_len).flops_train
        out[ch["subnet"]] = Baseline(
            name=f"estimate for {ch['subnet']} from scratch",
            flops=per_token * tokens,
            seconds=float("nan"),
            tokens=tokens,
            kind="estimate",
            formula=f"F_train x D = {per_token:,} FLOPs/token (cost model, seq {seq_len}) x {tokens:,} tokens",
        )
    return out


def _recipe_seq_len(run_dir: Path) -> int:
    from .recipe import load_recipe

    return load_recipe(run_dir / "recipe.yaml").data.seq_len


def report_run(
    run_dir: Path | str,
    claims: list[str] | None = None,
    estimate_tokens: int | None = None,
    require_percent: bool = False,
    retention: list[dict] | None = None,
) -> dict:
    """Gather the run folder's children, baselines and evaluations, and write the report."""
    run_dir = Path(run_dir)
    if not (run_dir / "ledger.jsonl").exists():
        raise ConfigError(f"{run_dir} has no ledger.jsonl: not a run folder")
    records = Ledger(run_dir / "ledger.jsonl").records()
    children = collect_children(run_dir)
    if not children:
        raise ConfigError(f"{run_dir} has no extracted children: run `elasticmoe extract` first")
    pcfg = _read(run_dir / "parent" / "config.json")
    from .config import ModelConfig
    from .cost import cost

    parent_config = ModelConfig.from_dict(pcfg["model"])
    k = cost(parent_config)
    baselines = collect_baselines(run_dir, records, parent_config)
    if estimate_tokens:
        seq = _read(run_dir / "parent" / "config.json").get("meta", {}).get("seq_len") or _recipe_seq_len(run_dir)
        for key, b in estimated_baselines(children, estimate_tokens, seq).items():
            baselines.setdefault(key, b)
    evals = {
        **_read(run_dir / "eval" / "results.json").get("models", {}),
        **_read(run_dir / "eval" / "baseline.json").get("models", {}),
    }
    info = {
        "params": k.total_params,
        "active_params": k.active_params,
        "tokens_seen": pcfg.get("meta", {}).get("tokens_seen"),
    }
    if (run_dir / "recipe.yaml").exists():
        from .recipe import load_recipe
        from .train import describe_data, describe_schedule

        recipe = load_recipe(run_dir / "recipe.yaml")
        info["schedule"], info["data"] = describe_schedule(recipe), describe_data(recipe)
    retention = _read(run_dir / "eval" / "results.json").get("retention")
    return write_report(run_dir, children, baselines, info, evals, claims, require_percent, retention)
