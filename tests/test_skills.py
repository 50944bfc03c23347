"""Structured skill by level: the retention verdict, the per-level tables and plots, the report's section."""

from __future__ import annotations

import numpy as np
import pytest

from elasticmoe.evaluate import level_scores
from elasticmoe.ledger import Ledger
from elasticmoe.report import write_report
from elasticmoe.skills import level_table, plot_levels, retention_verdict, verdict_line, verdicts


def fake_eval(kv_right: list[int], kv_levels: list[int], loss: list[float], doc_bits: list[float]) -> dict:
    """An `evaluate` result holding only what the verdict reads: kv exact match and answer loss per
    example, text bits per document."""
    return {
        "tasks": {
            "kv": {
                "metric": "exact_match",
                "score": float(np.mean(kv_right)),
                "ci": [0.0, 1.0],
                "n": len(kv_right),
                "higher_is_better": True,
                "levels": level_scores(kv_right, kv_levels),
                "per_example": list(kv_right),
                "example_levels": list(kv_levels),
            },
            "kv/answer-loss": {
                "metric": "answer_nats_per_token",
                "score": float(np.mean(loss)),
                "ci": [0.0, 9.0],
                "n": len(loss),
                "higher_is_better": False,
                "per_example": list(loss),
                "example_levels": list(kv_levels),
            },
            "text": {
                "metric": "bits_per_byte",
                "score": 2.0,
                "ci": [1.9, 2.1],
                "n": len(doc_bits),
                "higher_is_better": False,
                "doc_bits": list(doc_bits),
                "doc_bytes": [100] * len(doc_bits),
            },
        }
    }


LEVELS = [1, 8] * 40  # 40 examples at level 1, 40 at level 8
RNG = np.random.default_rng(0)
PARENT_RIGHT = [int(lv == 1 and i % 10 != 0) | int(lv == 8 and i % 5 == 1) for i, lv in enumerate(LEVELS)]
LOSS = list(RNG.uniform(0.5, 2.0, len(LEVELS)))
BITS = list(RNG.uniform(100, 300, 60))


@pytest.fixture(scope="module")
def parent() -> dict:
    return fake_eval(PARENT_RIGHT, LEVELS, LOSS, BITS)


def test_exact_match_retention_counts_only_levels_the_parent_reaches(parent) -> None:
    levels = parent["tasks"]["kv"]["levels"]
    assert levels["1"]["exact_match"] >= 0.5 > levels["8"]["exact_match"] > 0
    # the child keeps every other answer the parent gets right at level 1, all of them at level 8
    seen, child_right = 0, []
    for right, lv in zip(PARENT_RIGHT, LEVELS):
        seen += right and lv == 1
        child_right.append(int(right and (lv == 8 or seen % 2 == 0)))
    child = fake_eval(child_right, LEVELS, LOSS, BITS)
    v = retention_verdict(parent, child)
    at_1 = [(p, c) for p, c, lv in zip(PARENT_RIGHT, child_right, LEVELS) if lv == 1]
    assert v["levels"] == {"kv": [1]} and v["exact_match"]["n"] == 40
    assert v["exact_match"]["retention"] == pytest.approx(sum(c for _, c in at_1) / sum(p for p, _ in at_1))
    assert v["exact_match"]["ci"][0] < v["exact_match"]["retention"] < v["exact_match"]["ci"][1] < 1
    assert v["text"]["retention"] == pytest.approx(1.0) and v["answer_loss"]["retention"] == pytest.approx(1.0)
    assert v["structured"] == "exact_match" and v["verdict"] == "worse" and v["difference"]["ci"][1] < 0


def test_verdict_better_level_and_answer_loss_fallback(parent) -> None:
    same = retention_verdict(parent, parent)
    assert same["verdict"] == "level" and same["difference"]["value"] == 0.0
    worse_text = fake_eval(PARENT_RIGHT, LEVELS, LOSS, [b * 1.5 for b in BITS])
    v = retention_verdict(parent, worse_text)
    assert v["text"]["retention"] == pytest.approx(1 / 1.5) and v["verdict"] == "better"
    # no level where the parent reaches 50%: the verdict rests on answer loss, which the child doubles
    weak = [int(i % 6 == 0) for i in range(len(LEVELS))]
    weak_parent = fake_eval(weak, LEVELS, LOSS, BITS)
    v = retention_verdict(weak_parent, fake_eval(weak, LEVELS, [2 * x for x in LOSS], BITS))
    assert v["exact_match"] is None and v["structured"] == "answer_loss"
    assert v["answer_loss"]["retention"] == pytest.approx(0.5) and v["verdict"] == "worse"
    assert "answer loss retention minus text retention -0.500" in verdict_line({"child": "c", "state": "s", **v})
    # evaluations of different examples are not paired: no verdict
    other = fake_eval(PARENT_RIGHT[:-2], LEVELS[:-2], LOSS[:-2], BITS[:-1])
    assert retention_verdict(parent, other)["verdict"] is None


def test_verdicts_per_child_and_state_and_the_report_section(tmp_path, parent) -> None:
    results = {
        "parent": parent,
        "a": fake_eval(PARENT_RIGHT, LEVELS, LOSS, [b * 1.3 for b in BITS]),
        "a-ft": fake_eval(PARENT_RIGHT, LEVELS, LOSS, BITS),
    }
    found = verdicts(results)
    assert [(v["child"], v["state"], v["verdict"]) for v in found] == [
        ("a", "zero-shot", "better"),
        ("a", "fine-tuned", "level"),
    ]
    table = level_table(results, "kv")
    assert table[0] == "| model | kv 1 | kv 8 |" and len(table) == 2 + 3
    assert plot_levels(results, "kv", tmp_path / "kv.png").stat().st_size > 1000
    assert plot_levels(results, "sort", tmp_path / "sort.png") is None  # no model has sort levels

    # the report: the per-task table and plot, one verdict line per child and state
    from elasticmoe.evaluate import write_eval

    write_eval(tmp_path / "eval" / "results.json", {"models": results})
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"event": "progress", "phase": "train", "tokens": 500, "flops": 4.0e9, "seconds": 10.0})
    child = {"name": "a", "subnet": "L2 E2 k1 W16", "child_dir": "/r/children/a", "params": 10, "active_params": 5}
    data = write_report(tmp_path, [child], {}, {"params": 30, "active_params": 10})
    md = (tmp_path / "report.md").read_text()
    assert "## Structured skill by level" in md and "![kv by level](levels_kv.png)" in md
    lines = [line for line in md.splitlines() if line.startswith("- a (")]
    assert len(lines) == 2 and "**better** than text" in lines[0] and "**level** with text" in lines[1]
    assert (tmp_path / "levels_kv.png").is_file() and len(data["skills"]["verdicts"]) == 2


def test_targeted_child_against_its_general_twin(tmp_path, parent) -> None:
    """The targeted child's exact match and answer loss minus the general child's on the objective's
    structured tasks, paired over the same examples, zero-shot and fine-tuned; in the report when
    pipeline.json names the targeted child."""
    import json

    from elasticmoe.skills import skills_section, targeted_comparison

    better = [1 if lv == 1 else r for r, lv in zip(PARENT_RIGHT, LEVELS)]  # right on every level-1 example
    results = {
        "parent": parent,
        "g": parent,
        "t": fake_eval(better, LEVELS, [x * 0.9 for x in LOSS], BITS),
        "g-ft": parent,
        "t-ft": parent,
    }
    rows = targeted_comparison(results, "t", "g", {"kv": 1.0, "text": 0.2, "find": 0.0})
    assert [(r["state"], r["task"], r["verdict"]) for r in rows] == [
        ("zero-shot", "kv", "better"),
        ("fine-tuned", "kv", "level"),
    ]
    em = rows[0]["exact_match"]
    assert em["value"] == pytest.approx((sum(better) - sum(PARENT_RIGHT)) / len(LEVELS)) and em["ci"][0] > 0
    assert rows[0]["answer_loss"]["value"] == pytest.approx(-0.1 * np.mean(LOSS))
    assert rows[1]["exact_match"] == {"value": 0.0, "ci": [0.0, 0.0], "n": len(LEVELS)}
    state = {"phases": {"search": {"outputs": {"children": {"t": {"like": "g", "objective": {"kv": 1.0}}}}}}}
    (tmp_path / "pipeline.json").write_text(json.dumps(state))
    md, data = skills_section(tmp_path, results)
    assert "- t vs g (zero-shot) on kv: **better**; exact match +0.100" in md and len(data["targeted"]) == 2
