"""bench/family_table.py: the family-size cost splits each method into a shared and a per-child part."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("family_table", Path(__file__).parents[1] / "bench" / "family_table.py")
family_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(family_table)


def _row(method: str, shared: float, own: float, k: int, text: float) -> dict:
    cost = {"marginal": own, "all-in": shared + own, "amortized": shared / k + own}
    return {"method": method, "eval": {"tasks": {"text": {"score": text}}}, "cost": cost}


def test_family_cost_counts_a_shared_parent_once(tmp_path):
    k, scratch = 3, 10.0
    children = {}
    for name in ("a", "b", "c"):
        rows = [
            _row("elastic + fine-tune", 60.0, 2.0, k, 2.7),
            _row("from scratch", 0.0, scratch, k, 2.6),
            # retrofit's "marginal" column includes its retrofit training, but the parent is shared
            dict(
                _row("retrofit-4x + fine-tune", 60.0, 1.0, k, 2.6),
                cost={"marginal": 31.0, "all-in": 61.0, "amortized": 60.0 / k + 1.0},
            ),
        ]
        children[name] = {"scratch_flops": scratch, "rows": rows}
    run = tmp_path / "run"
    run.mkdir()
    report = {"children": [{"name": n} for n in children], "methods": {"parent": {}, "children": children}}
    (run / "report.json").write_text(json.dumps(report))
    table, _, _ = family_table.collect([run])
    lines = family_table.family_sizes(table, (1, 10))
    cells = {
        line.split("|")[1].strip(): [float(x) for x in line.split("|")[3:5]]
        for line in lines
        if "|" in line and "n=" not in line and "---" not in line
    }
    assert cells["elastic + fine-tune"] == pytest.approx([(60 + 2) / 10, (60 + 20) / 100], abs=0.01)
    assert cells["retrofit-4x + fine-tune"] == pytest.approx([(60 + 1) / 10, (60 + 10) / 100], abs=0.01)
    assert cells["from scratch"] == pytest.approx([1.0, 1.0])
