"""The cost report: figures recomputed from raw ledger records; no baseline, no percentage."""

from __future__ import annotations

import json
import math
import threading

import pytest

from elasticmoe.config import ConfigError
from elasticmoe.ledger import Ledger
from elasticmoe.report import (
    Baseline,
    break_even,
    check_claim,
    estimated_baselines,
    family_costs,
    ledger_by_phase,
    parse_claim,
    write_report,
)

CHILDREN = [
    {
        "name": "a",
        "subnet": "L[0-1] E2 k1 W16",
        "child_dir": "/r/children/a",
        "finetune_out": "/r/finetuned/a",
        "params": 1000,
        "active_params": 600,
    },
    {
        "name": "b",
        "subnet": "L[0-2] E4 k2 W32",
        "child_dir": "/r/children/b",
        "finetune_out": None,
        "params": 3000,
        "active_params": 1500,
    },
]


def _records():
    r = []
    for steps, flops in (([0, 5], 4.0e9), ([5, 10], 4.0e9)):  # parent training, two checkpoint segments
        r.append(
            {"event": "progress", "phase": "train", "steps": steps, "tokens": 500, "flops": flops, "seconds": 10.0}
        )
    r.append({"event": "end", "phase": "train", "status": "ok", "phase_seconds": 21.0})  # not summed
    r.append({"event": "end", "phase": "search", "status": "ok", "tokens": 300, "flops": 6.0e8, "seconds": 3.0})
    r.append({"event": "end", "phase": "extract", "out": "/r/children/a", "tokens": 64, "flops": 1.0e6, "seconds": 0.1})
    r.append({"event": "end", "phase": "extract", "out": "/r/children/b", "tokens": 64, "flops": 3.0e6, "seconds": 0.2})
    r.append(
        {
            "event": "progress",
            "phase": "finetune",
            "out": "/r/finetuned/a",
            "tokens": 100,
            "flops": 2.0e8,
            "seconds": 1.0,
        }
    )
    r.append({"event": "start", "phase": "finetune", "out": "/r/finetuned/a"})  # starts carry no work
    return r


def test_costs_are_recomputed_from_raw_records():
    base = {
        "L[0-1] E2 k1 W16": Baseline(
            "measured: a from scratch", flops=2.0e9, seconds=30.0, tokens=1000, kind="measured"
        )
    }
    a, b = family_costs(_records(), CHILDREN, base)
    P, S = 8.0e9, 6.0e8
    marginal_a = S / 2 + 1.0e6 + 2.0e8
    assert a.figure("marginal") == pytest.approx(marginal_a)
    assert a.figure("all-in") == pytest.approx(P + marginal_a)
    assert a.figure("amortized") == pytest.approx(P / 2 + marginal_a)
    assert a.percent("marginal") == pytest.approx(100 * marginal_a / 2.0e9)
    assert a.percent("all-in") == pytest.approx(100 * (P + marginal_a) / 2.0e9)
    assert a.percent("amortized", "seconds") == pytest.approx(100 * (20.0 / 2 + 1.5 + 0.1 + 1.0) / 30.0)
    assert b.figure("marginal") == pytest.approx(S / 2 + 3.0e6)  # not fine-tuned
    with pytest.raises(ConfigError, match="elasticmoe baseline"):
        b.percent("marginal")


def test_break_even_formula():
    base = {"L[0-1] E2 k1 W16": Baseline("m", flops=2.0e9, seconds=1.0, tokens=1, kind="measured")}
    costs = family_costs(_records(), CHILDREN, base)
    be = break_even(costs, 8.0e9)
    m = costs[0].figure("marginal")
    n = be["children"]
    assert 8.0e9 + n * m < n * 2.0e9 and 8.0e9 + (n - 1) * m >= (n - 1) * 2.0e9
    cheap = {"L[0-1] E2 k1 W16": Baseline("m", flops=1.0, seconds=1.0, tokens=1, kind="measured")}
    assert break_even(family_costs(_records(), CHILDREN, cheap), 8.0e9)["children"] is None


def test_claim_check_names_which_definition_matches():
    assert parse_claim("6% of pre-training cost of comparable models") == (
        6.0,
        "pre-training cost of comparable models",
    )
    assert parse_claim("360x")[0] == pytest.approx(100 / 360)
    base = {"L[0-1] E2 k1 W16": Baseline("m", flops=2.0e9, seconds=1.0, tokens=1, kind="measured")}
    a = family_costs(_records(), CHILDREN, base)[0]
    marginal_pct = a.percent("marginal")
    res = check_claim(f"{marginal_pct:.2f}% of comparable models", a)
    assert res["matches"] == "marginal"
    assert res["figures_percent"]["all-in"] == pytest.approx(a.percent("all-in"))
    with pytest.raises(ConfigError):
        parse_claim("cheap")


def test_report_without_baseline_refuses_percentages(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    for r in _records():
        led.append(r)
    data = write_report(tmp_path, CHILDREN, {}, {"params": 9000, "active_params": 3000})
    md = (tmp_path / "report.md").read_text()
    assert "%" not in md.split("## Cost against a named baseline")[1].split("## Break-even")[0]
    assert all(c["percent_of_baseline"] is None for c in data["children"])
    with pytest.raises(ConfigError, match="baseline"):
        write_report(tmp_path, CHILDREN, {}, {}, claims=["6% of comparable models"])
    with pytest.raises(ConfigError, match="baseline"):
        write_report(tmp_path, CHILDREN, {}, {}, require_percent=True)


def test_report_percentages_name_their_baseline(tmp_path):
    from elasticmoe.config import ModelConfig
    from elasticmoe.cost import cost

    led = Ledger(tmp_path / "ledger.jsonl")
    for r in _records():
        led.append(r)
    children, cfg = (
        [],
        ModelConfig(
            vocab_size=97, d_model=32, layers=2, heads=4, kv_heads=2, head_dim=8, experts=2, top_k=1, expert_width=16
        ),
    )
    for ch in CHILDREN:  # the estimate reads each child's architecture from its folder
        d = tmp_path / "children" / ch["name"]
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
        children.append({**ch, "child_dir": str(d)})
    est = estimated_baselines(children, tokens=10_000, seq_len=32)
    data = write_report(tmp_path, children, est, {"params": 9000, "active_params": 3000}, claims=["6% of pre-training"])
    md = (tmp_path / "report.md").read_text()
    per_token = cost(cfg, None, 32).flops_train
    lines = [line for line in md.splitlines() if "% of the baseline's FLOPs" in line]
    assert lines
    for line in lines:  # the estimate's formula and inputs on the same line as every percentage
        assert f"F_train x D = {per_token:,} FLOPs/token (cost model, seq 32) x 10,000 tokens" in line
    child = data["children"][0]
    assert child["percent_of_baseline"]["marginal"] == pytest.approx(
        100 * child["flops"]["marginal"] / (per_token * 10_000)
    )
    assert (tmp_path / "cost.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["claims"][0]["stated_basis"] == "pre-training"


def test_ledger_totals_equal_record_sums_and_appends_are_whole_lines(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")

    def writer(i):
        for j in range(50):
            led.append({"event": "progress", "phase": f"p{i % 2}", "tokens": 1, "flops": j, "seconds": 0.5})

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = led.records()
    assert len(recs) == 200
    tot = ledger_by_phase(recs)
    assert tot["p0"]["tokens"] == 100 and tot["p1"]["flops"] == 2 * sum(range(50))
    assert led.totals()["seconds"] == pytest.approx(100.0)


def test_crashed_phase_leaves_a_record(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(RuntimeError):
        with led.phase("extract", model="x") as rec:
            rec["tokens"] = 5
            raise RuntimeError("boom")
    end = [r for r in led.records() if r["event"] == "end"][0]
    assert end["status"] == "crashed" and "boom" in end["error"] and not led.finished("extract")
    assert math.isfinite(end["seconds"])


def test_a_torn_ledger_line_does_not_swallow_the_next_record(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"event": "end", "phase": "a", "tokens": 1})
    with open(led.path, "a") as f:
        f.write('{"event": "end", "phase": "b", "tok')  # a power cut mid-line
    led.append({"event": "end", "phase": "c", "tokens": 3})
    assert [r["phase"] for r in led.records()] == ["a", "c"]


def test_damaged_ledger_lines_are_shown_in_the_report_not_dropped(tmp_path):
    led = Ledger(tmp_path / "ledger.jsonl")
    recs = _records()
    for r in recs[:3]:
        led.append(r)
    with open(led.path, "ab") as f:
        f.write(b'{"event": "progress", "phase": "train", "steps": [10, 15], "tok\n')  # damaged mid-file
    for r in recs[3:]:
        led.append(r)
    data = write_report(tmp_path, CHILDREN, {}, {"params": 9000, "active_params": 3000})
    md = (tmp_path / "report.md").read_text()
    assert "1 damaged line" in md and "line 4" in md
    assert data["ledger_problems"] and data["ledger_problems"][0].startswith("line 4")
