"""The original model as the reference of an elastified run (`elasticmoe elastify`).

RUN/original/ holds the imported model, unchanged; its meta names the source folder and class
and, when the user gave it, the FLOPs of the original's own training. The report's section here
measures every child against it: per task, retention = child / original (accuracy) or original /
child (bits per byte), as `evaluate.retention` defines it (1.0 = as good as the original); and
cost, each child's marginal and all-in FLOPs (all-in = the elastification P + marginal) as a
share of the original's training.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import read_json
from .evaluate import FINETUNED_SUFFIX, retention

ORIGINAL = "original"  # RUN/original: the imported model, the frozen teacher


def read_original(run_dir: Path | str) -> dict:
    """The meta of RUN/original ({} when the run was not elastified)."""
    path = Path(run_dir) / ORIGINAL / "config.json"
    return read_json(path).get("meta", {}) if path.is_file() else {}


def _cell(result: dict | None, task: str, reference: dict | None) -> str:
    t = (result or {}).get("tasks", {}).get(task)
    if not t:
        return "n/a"
    ret = retention(reference, result).get(task) if reference and result is not reference else None
    return f"{t['score']:.3f}" + (f" ({ret:.2f})" if ret is not None else "")


def reference_section(run_dir: Path | str, costs: list, evals: dict) -> str:
    """Markdown: the children against the original model; empty for a run not elastified."""
    meta = read_original(run_dir)
    if not meta:
        return ""
    flops = meta.get("training_flops")
    p = costs[0].parent["flops"] if costs else 0.0
    source = Path(str(meta.get("source", "?"))).name
    lines = [
        "",
        "## Against the original model",
        "",
        f"This run was made elastic from `{source}` ({meta.get('source_architecture', '?')}), kept unchanged in "
        f"`{ORIGINAL}/`: the frozen teacher of every elastic step and the reference every child is measured "
        f"against here. Making it elastic cost P = {p:.3g} FLOPs (the parent's cost above); the original's own "
        + (
            f"training, as given (`elastify --parent-flops`): {flops:.3g} FLOPs."
            if flops
            else "training was not given (`elastify --parent-flops F` states it), so no share of it is shown."
        ),
        "",
    ]
    original = evals.get(ORIGINAL)
    tasks = [t for t in (original or {}).get("tasks", {}) if not t.endswith("/answer-loss")]
    if original is None:
        lines += [
            "The original is not evaluated yet: `elasticmoe eval RUN/original RUN/parent RUN/children/NAME ... "
            "--parent original --out RUN/eval/results.json`, then the report again.",
            "",
        ]
    else:
        lines += [
            "Quality on the test split, retention against the original in brackets (1.00 = as good as the "
            "original; text in bits/byte, lower is better; tasks in exact match):",
            "",
            "| model | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        names = [ORIGINAL, "parent"] + [n for c in costs for n in (c.name, c.name + FINETUNED_SUFFIX)]
        for name in names:
            if name in evals:
                lines.append(f"| {name} | " + " | ".join(_cell(evals[name], t, original) for t in tasks) + " |")
        lines.append("")
    lines += [
        "| child | marginal FLOPs | all-in FLOPs (with the elastification) | marginal, share of the original's "
        "training | all-in, share of the original's training |",
        "|---|---|---|---|---|",
    ]
    for c in costs:
        m, a = c.figure("marginal"), c.figure("all-in")
        shares = [f"{100 * x / flops:.2f}%" if flops else "n/a" for x in (m, a)]
        lines.append(f"| {c.name} | {m:.3g} | {a:.3g} | " + " | ".join(shares) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["ORIGINAL", "read_original", "reference_section"]
