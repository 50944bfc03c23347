"""The retrofit baseline: the dense parent re-ordered by importance, trained elastically for a short
budget, the child's shape extracted zero-shot and fine-tuned; every step in the ledger; the report
row and verdict (issue #14)."""

from __future__ import annotations

import json

import pytest
import torch

from elasticmoe.checkpoint import load_model
from elasticmoe.config import ConfigError
from elasticmoe.cost import cost
from elasticmoe.ledger import Ledger, sum_work
from elasticmoe.methods import _verdict, retrofit_work
from elasticmoe.phases import baseline, calibration_batches, run_recipe
from elasticmoe.recipe import load_recipe
from elasticmoe.reorder import reorder
from elasticmoe.rundata import load_run_data
from elasticmoe.subnet import Subnet, largest, smallest
from elasticmoe.train import eval_losses


@pytest.fixture(scope="module")
def run(micro_run):
    baseline(micro_run, method="dense-parent", steps=20)
    return micro_run


def _records(run_dir, **match):
    return [r for r in Ledger(run_dir / "ledger.jsonl").records() if all(r.get(k) == v for k, v in match.items())]


def test_retrofit_trains_the_reordered_dense_parent_elastically_and_extracts_the_shape(run):
    r = run_recipe(run)
    step_tokens = r.train.batch_size * r.data.seq_len
    led = Ledger(run / "ledger.jsonl")
    parent_train = led.totals("train")
    out = baseline(run, "L2 E4 k1 W32", method="retrofit", steps=4, finetune_tokens=2 * step_tokens, lr=3e-3, child="c")
    assert out == run / "baselines" / "retrofit"
    retro, meta = load_model(out / "parent")
    assert meta["method"] == "retrofit" and meta["retrofit"]["steps"] == 4 and meta["steps"] == 4

    # its starting point is the dense parent re-ordered by importance (the calibration prune-distill uses)
    start, _ = load_model(run / "baselines" / "dense-parent" / "parent")
    data = load_run_data(run, r)
    reorder(start, calibration_batches(data, r), None, r.reorder.experts_by, r.reorder.neurons, r.reorder.layers)
    windows = data.eval_windows("val", r.train.eval_windows)
    subnets = {"largest": largest(r.space, start.layer_order), "smallest": smallest(r.space, start.layer_order)}
    want = eval_losses(start, windows, subnets, torch.device("cpu"))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0
    for name in subnets:  # the smallest sub-network sees the re-ordered prefixes, not the raw dense parent's
        assert first["val"][name] == pytest.approx(want[name], abs=1e-5)
    # ... then trained: the weights moved, and the recipe's re-ordering ran at the same fraction of
    # training as in the parent's run (here step 10 of 30 -> step 1 of 4)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not all(torch.equal(a, b) for a, b in zip(retro.state_dict().values(), start.state_dict().values()))
    assert r.reorder.at_steps == (10,) and r.train.steps == 30
    assert [m["step"] for m in metrics if "reorder" in m] == [1] and metrics[-1]["val"] != first["val"]

    # elastic: several sub-networks every step, and the ledger's FLOPs are exactly theirs
    steps = [m for m in metrics if "subnets" in m]
    assert len(steps) == 4 and all(len(s["subnets"]) >= 2 for s in steps)
    flops = sum(
        cost(r.model, Subnet.parse(t, r.model), r.data.seq_len).flops_train
        for s in steps
        for t in s["subnets"].values()
    )
    trained = led.totals("retrofit", run="baselines/retrofit")
    assert trained["tokens"] == 4 * step_tokens and trained["flops"] == flops * step_tokens
    assert trained["flops"] > 4 * cost(r.model, None, r.data.seq_len).flops_train * step_tokens
    assert led.totals("train") == parent_train  # none of it counts as the elastic parent's training

    # the child has the requested shape on the retrofitted parent's most important layers
    child, cmeta = load_model(out / "children" / "c")
    c = child.config
    assert (c.layers, c.experts, c.top_k, c.expert_width) == (2, 4, 1, 32)
    assert cmeta["subnet"] == str(Subnet.uniform(sorted(retro.layer_order[:2]), 4, 1, 32))
    assert child.num_params() == cmeta["params"] == cost(r.model, Subnet.parse(cmeta["subnet"], r.model)).total_params
    tuned, tmeta = load_model(out / "finetuned" / "c" / "model")
    assert tuned.config == c and tmeta["finetune"]["tokens"] == 2 * step_tokens
    assert tmeta["finetune"]["teacher"] == str(out)

    # every step in the ledger under its own phase and method
    (reorder_rec,) = _records(run, phase="importance", method="retrofit", event="end")
    assert reorder_rec["run"] == "baselines/retrofit" and reorder_rec["tokens"] > 0
    assert [
        x["step"] for x in _records(run, phase="importance", run="baselines/retrofit", event="end") if "step" in x
    ] == [1]
    (extract_rec,) = _records(run, phase="extract", method="retrofit", event="end")
    assert extract_rec["out"] == "baselines/retrofit/children/c"
    assert led.totals("finetune", out="baselines/retrofit/finetuned/c")["tokens"] == 2 * step_tokens
    records = led.records()
    r_work = retrofit_work(records, led.ref, out)["flops"]
    passes = [sum_work(records, phase=ph, run=led.ref(out))["flops"] for ph in ("importance", "train-eval")]
    assert passes[0] > reorder_rec["flops"] and r_work == trained["flops"] + sum(passes)

    # a second child comes from the same retrofitted parent: no training again
    baseline(run, "L3 E2 k2 W64", method="retrofit", steps=4, finetune_tokens=step_tokens, lr=3e-3, child="d")
    assert led.totals("retrofit", run="baselines/retrofit") == trained
    assert load_model(out / "children" / "d")[0].config.experts == 2
    with pytest.raises(ConfigError, match="holds a retrofit of 4 steps"):
        baseline(run, "L2 E4 k1 W32", method="retrofit", steps=8, child="e")


def test_retrofit_command(run, cli, one_line_error):
    args = ["--method", "retrofit", "--arch", "L2 E2 k1 W32", "--steps", 2, "--finetune-tokens", 128, "--name", "rf"]
    out = cli("baseline", run, *args, "--quiet").stdout
    folder = run / "baselines" / "rf"
    assert f"baseline (retrofit) -> {folder / 'parent'}" in out
    assert f"-> {folder / 'children' / 'L0-1_E2_k1_W32'}" in out
    assert f"-> {folder / 'finetuned' / 'L0-1_E2_k1_W32' / 'model'}" in out
    assert load_model(folder / "finetuned" / "L0-1_E2_k1_W32" / "model")[1]["finetune"]["tokens"] == 128
    bad = cli("baseline", run, "--arch", "L2 E2 k1 W32", "--steps", 2, "--finetune-tokens", 5, ok=False)
    one_line_error(bad, "--finetune-tokens")


def _row(method: str, text: float, allin: float) -> dict:
    return {
        "method": method,
        "eval": {"tasks": {"text": {"score": text, "ci": [text - 0.001, text + 0.001]}}},
        "cost": {"marginal": allin / 2, "all-in": allin, "amortized": allin / 3},
    }


def test_verdict_names_the_best_trained_alternative_from_scratch_included():
    rows = [_row("elastic + fine-tune", 3.0, 10.0), _row("from scratch", 3.5, 40.0), _row("prune-distill", 3.2, 20.0)]
    assert _verdict(rows).startswith("the fine-tuned elastic child beats prune-distill (the best of 2 trained")
    rows += [_row("retrofit + fine-tune", 2.9, 25.0), _row("retrofit, zero-shot", 2.5, 21.0)]
    verdict = _verdict(rows)  # a zero-shot row is not a trained alternative
    assert "loses to retrofit + fine-tune (the best of 3 trained alternatives) by 0.100" in verdict
    scratch_best = [rows[0], _row("from scratch", 2.0, 40.0), *rows[2:]]  # a twin from scratch is not left out
    assert "loses to from scratch (the best of 3 trained alternatives) by 1.000" in _verdict(scratch_best)
    assert "at 40% of its all-in FLOPs" in verdict and "inside the 95% intervals" not in verdict
    # with per-document figures on the same documents, the verdict uses the paired interval
    bits = [100.0, 300.0, 50.0, 220.0]
    for row, scale in ((rows[0], 1.0), (rows[3], 0.97)):
        text = row["eval"]["tasks"]["text"]
        text.update(doc_bits=[b * scale for b in bits], doc_bytes=[40, 120, 20, 90])
        text["score"] = sum(text["doc_bits"]) / 270
    verdict = _verdict(rows)
    assert "loses to retrofit + fine-tune" in verdict and "elastic minus it, 95% paired interval" in verdict
    assert "over the same documents [+0.07" in verdict and ": a measured difference)" in verdict
    rows[3]["eval"]["tasks"]["text"]["doc_bytes"] = [40, 120, 20, 91]  # other documents: no pairing
    assert "paired" not in _verdict(rows)


@pytest.mark.slow
def test_pipeline_with_all_baselines_reports_retrofit_rows(tmp_path):
    from elasticmoe.pipeline import RETROFIT_BUDGETS, run_pipeline

    run = tmp_path / "run"
    family = {"ernie": {"max_params_ratio": 1 / 3, "max_active_ratio": 1 / 2}}
    run_pipeline(load_recipe("micro"), run, progress=False, baselines="all", family=family, eval_examples=3)
    state = json.loads((run / "pipeline.json").read_text())["phases"]
    ft = state["finetune"]["outputs"]["ernie"]["tokens"]
    report = json.loads((run / "report.json").read_text())
    rows = {r["method"]: r for r in report["methods"]["children"]["ernie"]["rows"]}
    for key in RETROFIT_BUDGETS:
        assert {f"{key}, zero-shot", f"{key} + fine-tune"} <= set(rows)
        assert state["baseline"]["outputs"][f"ernie-{key}"]["finetune_tokens"] == ft
    led = Ledger(run / "ledger.jsonl")
    records = led.records()
    budgets = {key: led.totals("retrofit", run=f"baselines/{key}")["tokens"] for key in RETROFIT_BUDGETS}
    r = load_recipe("micro")
    assert budgets["retrofit"] >= ft and budgets["retrofit-4x"] >= 4 * ft - r.train.batch_size * r.data.seq_len
    dense = report["methods"]["parent"]["equal tokens"]["flops"]
    for key in RETROFIT_BUDGETS:
        rf = retrofit_work(records, led.ref, run / "baselines" / key)["flops"]
        x = led.totals("extract", out=f"baselines/{key}/children/ernie")["flops"]
        # a fine-tune costs its training and the validation passes its best-state selection needs
        f = sum(led.totals(p, out=f"baselines/{key}/finetuned/ernie")["flops"] for p in ("finetune", "finetune-eval"))
        assert led.totals("finetune-eval", out=f"baselines/{key}/finetuned/ernie")["flops"] > 0
        assert rows[f"{key} + fine-tune"]["cost"]["all-in"] == pytest.approx(dense + rf + x + f)
        assert rows[f"{key}, zero-shot"]["cost"]["marginal"] == pytest.approx(rf + x)
    md = (run / "report.md").read_text()
    assert "| retrofit + fine-tune |" in md and "| retrofit-4x, zero-shot |" in md and "Verdict: " in md
