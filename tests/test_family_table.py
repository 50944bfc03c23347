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


def test_recipe_family_compares_arms_inside_each_run(tmp_path):
    """bench/recipe_family.py: each arm's elastic children against the same run's scratch and
    retrofit-4x rows, averaged over children, then over the arm's runs."""
    spec = importlib.util.spec_from_file_location(
        "recipe_family", Path(__file__).parents[1] / "bench" / "recipe_family.py"
    )
    recipe_family = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_family)
    k, scratch = 2, 10.0
    runs = {}
    for arm, ft_text, shared in (("a", 2.75, 60.0), ("b", 2.70, 40.0)):
        children = {
            name: {
                "scratch_flops": scratch,
                "rows": [
                    _row("elastic + fine-tune", shared, 2.0, k, ft_text),
                    _row("elastic, zero-shot", shared, 1.0, k, 2.9),
                    _row("from scratch", 0.0, scratch, k, 2.5),
                    _row("retrofit-4x + fine-tune", 60.0, 1.0, k, 2.6),
                ],
            }
            for name in ("c0", "c1")
        }
        parent = {
            "elastic": {"flops": 5.0, "eval": {"tasks": {"text": {"score": 2.4}}}},
            "flops_per_token_vs_dense": 1.5,
        }
        report = {"children": [{"name": n} for n in children], "methods": {"parent": parent, "children": children}}
        runs[arm] = tmp_path / arm
        runs[arm].mkdir()
        (runs[arm] / "report.json").write_text(json.dumps(report))
    md = recipe_family.render({arm: [path] for arm, path in runs.items()})
    assert "| a | 1 | 1.50x | 2.400 |" in md
    assert (
        "| a | 2.750 | 2.500 | 2.600 | +10.0% | +5.8% | +16.0% |" in md and "| b | 2.700 | 2.500 | 2.600 | +8.0%" in md
    )
    assert "| b | elastic + fine-tune | 4.200 | 1.533 | 0.600 |" in md  # (40 + 2n) / 10n
    assert "| a | retrofit-4x + fine-tune | 6.100 | 2.100 | 0.700 |" in md
    assert recipe_family.main(["a"]) == 2


def test_recipe_scale_groups_runs_by_budget_and_pairs_documents(tmp_path):
    """bench/recipe_scale.py: the budget comes from each run's recipe, the gaps are the named
    child's (not the first child's), each with the paired interval over the same documents, and
    the plot is written."""
    spec = importlib.util.spec_from_file_location(
        "recipe_scale", Path(__file__).parents[1] / "bench" / "recipe_scale.py"
    )
    recipe_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_scale)
    docs = [100] * 42  # a multiple of 3: the per-document wobble below averages to exactly 1

    def row(method: str, all_in: float, per_doc: float) -> dict:
        bits = [per_doc * b * (1 + 0.01 * (i % 3 - 1)) for i, b in enumerate(docs)]  # same documents
        score = sum(bits) / sum(docs)
        text = {"score": score, "doc_bits": bits, "doc_bytes": docs, "ci": [score - 0.01, score + 0.01]}
        return {"method": method, "eval": {"tasks": {"text": text}}, "cost": {"all-in": all_in}}

    runs = []
    for steps, seed, ours in ((250, 0, 2.9), (250, 1, 2.7), (1000, 0, 2.5)):
        rows = [row("elastic + fine-tune", 30.0, ours), row("from scratch", 10.0, 2.5)]
        rows.append(row("retrofit-4x + fine-tune", 40.0, 2.4))
        other = {"rows": [row("elastic + fine-tune", 1.0, 9.9), row("from scratch", 1.0, 1.0)]}
        report = {"methods": {"children": {"active-third": other, "ernie51-shape": {"rows": rows}}}}
        run = tmp_path / f"r{steps}-{seed}"
        run.mkdir()
        (run / "report.json").write_text(json.dumps(report))
        recipe = {"train": {"steps": steps, "batch_size": 8}, "data": {"seq_len": 128}}
        (run / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
        runs.append(run)
    figs = [recipe_scale.run_figures(r) for r in runs]
    assert [f["tokens"] for f in figs] == [256_000, 256_000, 1_024_000]
    assert figs[0]["gap"]["scratch"]["rel"] == pytest.approx(2.9 / 2.5 - 1)
    lo, hi = figs[0]["gap"]["scratch"]["ci"]
    assert 0 < lo < figs[0]["gap"]["scratch"]["diff"] < hi  # elastic measurably worse, paired
    assert figs[2]["gap"]["scratch"]["ci"][0] <= 0 <= figs[2]["gap"]["scratch"]["ci"][1] + 1e-9  # level
    assert figs[0]["cost"] == {"elastic": 3.0, "scratch": 1.0, "retrofit-4x": 4.0}
    md = recipe_scale.render(figs)
    assert "| 256,000 | 2 | 2.800 ± 0.100 | 2.500 ± 0.000 | 2.400 ± 0.000 | +12.0% ± 4.0% |" in md  # +16%, +8%
    assert "| 1,024,000 | 1 | 2.500 |" in md
    png = tmp_path / "scale.png"
    assert recipe_scale.main([str(r) for r in runs] + ["--plot", str(png)]) == 0 and png.stat().st_size > 0
    # --pair: one run's elastic child against another run's retrofit-4x child, same documents
    paired = recipe_scale.pair(runs[2], runs[0])
    assert paired["diff"] == pytest.approx(2.5 - 2.4) and paired["flops_ratio"] == pytest.approx(30 / 40)
    assert paired["ci"][0] > 0
    assert recipe_scale.main(["--pair", f"{runs[2]}={runs[0]}"]) == 0
    assert recipe_scale.main(["--pair", f"{runs[2]}={tmp_path / 'nope'}"]) == 2
    assert recipe_scale.main([]) == 2
    assert recipe_scale.main([str(tmp_path / "nope")]) == 2
    assert recipe_scale.main([str(runs[0]), "--child", "half-latency"]) == 2
