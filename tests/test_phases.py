"""Phases after training: distillation fine-tune, baselines, the pipeline end to end (kill + rerun)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from elasticmoe.checkpoint import load_model
from elasticmoe.cost import cost
from elasticmoe.ledger import Ledger
from elasticmoe.phases import FINETUNE_EVAL_WINDOWS, baseline, extract_child, finetune, mean_kd, run_recipe
from elasticmoe.recipe import load_recipe
from elasticmoe.rundata import load_run_data
from elasticmoe.subnet import Subnet
from elasticmoe.train import describe_schedule, sample_step, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A micro parent trained *without* elastic sampling (its space is the parent alone), so that a
    zero-shot extracted child is clearly worse than its parent and distillation has a gap to close.
    (With elastic training the micro children end within a KL of ~0.005 of the parent already.)"""
    run = tmp_path_factory.mktemp("phases") / "run"
    over = [
        "train.steps=150",
        "train.eval_every=150",
        "train.ckpt_every=75",
        "space.depths=[3]",
        "space.experts=[8]",
        "space.top_ks=[2]",
        "space.widths=[64]",
    ]
    train(load_recipe("micro", over), run, progress=False)
    return run


def test_distillation_lowers_kl_and_validation_loss_of_a_zero_shot_child(trained_run, tmp_path):
    parent, _ = load_model(trained_run / "parent")
    extract_child(trained_run, parent, "L2 E2 k1 W32", tmp_path / "child")
    # pure distillation (ce_weight=0): on the micro preset the parent is only slightly better than its
    # children, and the data term alone would pull a child away from it (measured; see the closing note)
    res = finetune(
        tmp_path / "child",
        tmp_path / "ft",
        teacher_run=trained_run,
        tokens=40 * 4 * 32,
        lr=1e-3,
        task_weights={"text": 1.0},
        ckpt_every=20,
        ce_weight=0.0,
    )
    assert res.kd_after < 0.7 * res.kd_before  # measured: 0.031 -> 0.012
    assert res.val_after["text"] < res.val_before["text"] - 0.01  # measured: 4.561 -> 4.510
    # the reported numbers are real: recompute the KL of the saved model
    child, meta = load_model(tmp_path / "ft" / "model")
    data = load_run_data(trained_run, run_recipe(trained_run))
    n = max(run_recipe(trained_run).train.eval_windows, FINETUNE_EVAL_WINDOWS)  # what the fine-tune validates on
    windows = {"text": data.eval_windows("val", n)["text"]}
    assert mean_kd(child, parent, windows, torch.device("cpu")) == pytest.approx(res.kd_after, rel=1e-4)
    assert meta["finetune"]["tokens"] == res.tokens == 40 * 4 * 32
    led = Ledger(trained_run / "ledger.jsonl")
    ft = led.totals("finetune", out=str((tmp_path / "ft").resolve()))
    per_token = cost(child.config, None, 32).flops_train + cost(parent.config, None, 32).flops_forward
    assert ft["tokens"] == res.tokens and ft["flops"] == per_token * res.tokens


def test_finetune_resume_equals_uninterrupted(trained_run, tmp_path):
    parent, _ = load_model(trained_run / "parent")
    extract_child(trained_run, parent, "L2 E4 k1 W32", tmp_path / "child")
    kw = dict(teacher_run=trained_run, steps=12, lr=3e-3, ckpt_every=4, ledger_path=tmp_path / "ledger.jsonl")
    finetune(tmp_path / "child", tmp_path / "a", **kw)
    finetune(tmp_path / "child", tmp_path / "b", stop_at=6, **kw)  # "crash" after step 6 (checkpoint at 4)
    finetune(tmp_path / "child", tmp_path / "b", resume=True, **kw)
    timing = ("ms", "tok_per_s")
    a, b = (
        [{k: v for k, v in json.loads(x).items() if k not in timing} for x in (tmp_path / d / "metrics.jsonl").open()]
        for d in ("a", "b")
    )
    assert len(a) == 12 + 7 and a == b  # 12 steps, keep-best's evaluations at steps 0, 2, ..., 12
    ma, _ = load_model(tmp_path / "a" / "model")
    mb, _ = load_model(tmp_path / "b" / "model")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A micro parent on a text-only user corpus (no structured tasks), as a user's own data gives."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("textonly")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    over = ["train.steps=60", "train.eval_every=60", "data.source=files", f"data.paths=['{corpus}']"]
    train(load_recipe("micro", over), root / "run", progress=False)
    return root / "run"


@pytest.mark.parametrize("lr", [0.3, 3e-3])
def test_finetune_publishes_the_best_validated_state(text_run, tmp_path, lr):
    """A fine-tune whose learning rate wrecks the child (0.3) publishes the zero-shot child and says
    so; a sane one publishes the evaluated state with the lowest validation loss, whichever it is."""
    parent, _ = load_model(text_run / "parent")
    extract_child(text_run, parent, "L2 E2 k1 W32", tmp_path / "child")
    res = finetune(tmp_path / "child", tmp_path / "ft", teacher_run=text_run, steps=10, lr=lr, ce_weight=1.0)
    val = [json.loads(x)["val"]["largest"] for x in (tmp_path / "ft" / "metrics.jsonl").open() if '"val"' in x]
    steps = [json.loads(x)["step"] for x in (tmp_path / "ft" / "metrics.jsonl").open() if '"val"' in x]
    assert steps == [0, 2, 4, 6, 8, 10] and all(set(v) == {"text"} for v in val)
    best = min(range(len(val)), key=lambda i: val[i]["text"])
    model, meta = load_model(tmp_path / "ft" / "model")
    kept = meta["finetune"]["kept"]
    assert kept["step"] == steps[best] and res.kept == kept
    assert res.val_after["text"] == pytest.approx(val[best]["text"], rel=1e-5)
    assert res.val_after["text"] <= res.val_before["text"] + 1e-6
    if lr == 0.3:  # measured: the wrecked child's validation loss rises at every evaluation
        assert kept["step"] == 0 and "the start" in kept["reason"] and kept["last_score"] > kept["score"]
        zero, _ = load_model(tmp_path / "child")
        assert all(torch.equal(a, b) for a, b in zip(zero.state_dict().values(), model.state_dict().values()))
    assert not (tmp_path / "ft" / "best").exists()


def test_keep_best_weighs_each_task_by_its_validation_targets():
    from elasticmoe.train import val_score

    # 3,000 text targets against 100 answer targets: a noisy answer loss cannot outvote the text
    assert val_score({"text": 4.0, "kv": 1.0}, {"text": 3000, "kv": 100}) == pytest.approx((12000 + 100) / 3100)
    assert val_score({"text": 4.0}, {"text": 3000, "kv": 100}) == 4.0  # only the tasks evaluated


def test_baseline_trains_the_architecture_from_scratch_and_is_recorded(trained_run):
    out = baseline(trained_run, "L2 E2 k1 W32", steps=5, name="b1")
    model, meta = load_model(out / "parent")
    assert model.config.layers == 2 and model.config.experts == 2 and model.config.expert_width == 32
    assert meta["kind"] == "baseline" and meta["steps"] == 5
    led = Ledger(trained_run / "ledger.jsonl")
    tot = led.totals("baseline", run=led.ref(out))
    assert led.ref(out) == "baselines/b1"  # relative: the run folder can move
    r = run_recipe(trained_run)
    assert tot["tokens"] == 5 * r.train.batch_size * r.data.seq_len
    assert tot["flops"] == cost(model.config, None, r.data.seq_len).flops_train * tot["tokens"]


def _count_cpu_attention() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel that runs here; teach
    it with torch's own SDPA formulas (GQA: key/value heads broadcast to the query heads)."""
    import torch.utils.flop_counter as fcm

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in fcm.flop_registry:
        return

    def expand(q, kv):
        return (kv[0], q[1], kv[2], kv[3])

    @fcm.register_flop_formula(fwd)  # arguments arrive as shapes
    def _fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fcm.sdpa_flop_count(q, expand(q, k), expand(q, v))

    @fcm.register_flop_formula(bwd)
    def _bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fcm.sdpa_backward_flop_count(grad_out, q, expand(q, k), expand(q, v))


def test_ledger_flops_of_a_training_step_match_flop_counter():
    _count_cpu_attention()
    r = load_recipe("micro", ["sampling.n_random=2"])
    from elasticmoe.model import ElasticMoE
    from elasticmoe.train import kd_loss

    model = ElasticMoE(r.model)
    x = torch.randint(0, r.model.vocab_size, (r.train.batch_size, r.data.seq_len))
    subnets = sample_step(r, 3, model.layer_order)
    ledger_flops = sum(cost(r.model, sn, r.data.seq_len).flops_train for _, sn in subnets) * x.numel()
    with FlopCounterMode(display=False) as fc:
        teacher = None
        for _, sn in subnets:
            out = model(x, sn)
            loss = out.logits.float().logsumexp(-1).mean()
            if teacher is None:
                teacher = out.logits.detach()
            else:
                loss = loss + kd_loss(out.logits, teacher, 1.0)
            loss.backward()
    measured = fc.get_total_flops()
    assert abs(ledger_flops - measured) / measured < 0.03, (ledger_flops, measured)


@pytest.mark.slow
def test_pipeline_end_to_end_with_kill_and_rerun(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "elasticmoe", "run", "--config", "micro", "--out", str(run), "--quiet"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "pipeline.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and "extract" in json.loads(state.read_text() or "{}").get("phases", {}):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the pipeline finished before it could be killed"
    done_before = set(json.loads(state.read_text())["phases"])
    assert {"train", "search", "extract"} <= done_before and "report" not in done_before
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for phase in done_before:
        assert f"{phase:9s} done earlier, skipped" in res.stdout
    phases = json.loads(state.read_text())["phases"]
    assert all(
        phases[p]["done"] for p in ("train", "search", "extract", "export", "finetune", "eval", "baseline", "report")
    )
    report = json.loads((run / "report.json").read_text())
    ernie = next(c for c in report["children"] if c["name"] == "ernie51-shape")
    assert (
        ernie["params"] <= report["parent"]["params"] / 3
        and ernie["active_params"] <= report["parent"]["active_params"] / 2
    )
    assert ernie["baseline"]["kind"] == "measured" and ernie["percent_of_baseline"]["all-in"] > 0
    # the training phase ran once: its tokens are counted once
    r = load_recipe(run / "recipe.yaml")
    assert Ledger(run / "ledger.jsonl").totals("train")["tokens"] == r.train.steps * r.train.batch_size * r.data.seq_len
    md = (run / "report.md").read_text()
    assert "% of the baseline's FLOPs [measured:" in md and "device-s vs the baseline" in md
    # the alternatives: the dense parent beside the elastic one, one row per method, a verdict
    assert "| dense parent, equal tokens |" in md and "| prune-distill |" in md and "Verdict: " in md
    ratio = report["methods"]["parent"]["flops_per_token_vs_dense"]  # micro: sandwich from the first step
    assert ratio > 1.5 and "Training FLOPs per token: elastic parent" in md and f"({ratio:.2f}x" in md
    assert "Fine-tuned row: kept " in md and "chosen on the validation split" in md  # which fine-tune state
    assert f"Training schedule: {describe_schedule(r)}." in md and "a sandwich" in md
    assert "Training data: loss on every token; packed documents see the ones before; task levels drawn" in md
    # each child's percentages name that child's own from-scratch baseline
    assert f"Percentages are of this child's from-scratch baseline: measured: {ernie['subnet']} trained" in md
    rows = report["methods"]["children"]["ernie51-shape"]["rows"]
    assert [r["method"] for r in rows] == ["elastic, zero-shot", "elastic + fine-tune", "from scratch", "prune-distill"]
    # the ledger names folders relative to the run: a moved run folder reports the same figures
    moved = tmp_path / "moved"
    shutil.move(str(run), moved)
    res = subprocess.run(
        [sys.executable, "-m", "elasticmoe", "report", str(moved)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    again = json.loads((moved / "report.json").read_text())
    assert [c["flops"] for c in again["children"]] == [c["flops"] for c in report["children"]]
    assert [c["percent_of_baseline"] for c in again["children"]] == [
        c["percent_of_baseline"] for c in report["children"]
    ]
    hf = moved / "hf" / "ernie51-shape"
    assert (hf / "config.json").exists() and phases["export"]["outputs"]["_proof"]["new_tokens"] > 0
    assert "| results.json | ernie51-shape |" in (hf / "README.md").read_text()  # export follows eval (#27)


def test_baseline_denominator_counts_only_the_attempts_behind_its_model(trained_run):
    from elasticmoe.report import collect_baselines

    parent, _ = load_model(trained_run / "parent")
    extract_child(trained_run, parent, "L2 E2 k1 W16", trained_run / "children" / "denominator")
    out = baseline(trained_run, "L2 E2 k1 W16", steps=4, name="denominator")
    key = str(Subnet.parse("L2 E2 k1 W16", parent.config, parent.layer_order))  # the first 2 in the layer order
    led = Ledger(trained_run / "ledger.jsonl")
    honest = collect_baselines(trained_run, led.records(), None)[key]
    # an abandoned earlier attempt (killed, then restarted from scratch) in the same folder
    led.append(
        {
            "event": "progress",
            "phase": "baseline",
            "run": led.ref(out),
            "attempt": "abandoned",
            "tokens": 10**6,
            "flops": 10**15,
            "seconds": 1e4,
        }
    )
    again = collect_baselines(trained_run, led.records(), None)[key]
    assert again.flops == honest.flops and again.tokens == honest.tokens
    meta = load_model(out / "parent")[1]
    assert len(meta["ledger_attempts"]) == 1


def test_dense_parent_prune_distill_and_expert_prune_baselines(trained_run):
    """Each alternative to an elastic child trains or prunes exactly what it names, and is recorded."""
    from elasticmoe.reorder import measure_importance

    r = run_recipe(trained_run)
    led = Ledger(trained_run / "ledger.jsonl")
    dense = baseline(trained_run, method="dense-parent", steps=30)
    model, meta = load_model(dense / "parent")
    assert dense.name == "dense-parent" and model.config == r.model and meta["method"] == "dense-parent"
    assert led.totals("baseline", run=led.ref(dense))["tokens"] == 30 * r.train.batch_size * r.data.seq_len
    # one network trained normally: no warm-up switch, no re-ordering, whatever the run's schedule
    assert not any('"reorder"' in line for line in (dense / "metrics.jsonl").open())

    # prune-distill: the shape of the spec, on the dense parent's most important layers, then distilled
    out = baseline(trained_run, "L2 E4 k1 W32", method="prune-distill", steps=6)
    pruned, pmeta = load_model(out / "pruned")
    c = pruned.config
    assert (c.layers, c.experts, c.top_k, c.expert_width) == (2, 4, 1, 32)
    assert pruned.num_params() == pmeta["params"] == cost(r.model, pmeta_subnet(pmeta, r), r.data.seq_len).total_params
    distilled, dmeta = load_model(out / "distilled" / "model")
    assert dmeta["finetune"]["steps"] == 6 and dmeta["finetune"]["teacher"] == str(dense)
    assert dmeta["finetune"]["kd_after"] < dmeta["finetune"]["kd_before"]
    assert led.totals("prune", out=led.ref(out / "pruned"))["flops"] > 0
    ft = led.totals("finetune", out=led.ref(out / "distilled"))
    assert ft["tokens"] == 6 * r.train.batch_size * r.data.seq_len

    # expert-prune: every layer kept, the experts with the largest router-weighted output norm kept
    out = baseline(trained_run, "L3 E3 k2 W64", method="expert-prune")
    cut, _ = load_model(out / "pruned")
    assert (cut.config.layers, cut.config.experts, cut.config.top_k) == (3, 3, 2)
    assert not (out / "distilled").exists()
    data = load_run_data(trained_run, r)
    batches = data.train_batches(r.train.batch_size, r.train.seed + 2)
    calib = [next(batches)[0] for _ in range(r.reorder.batches)]
    scores = measure_importance(model, calib, "output")["experts"]
    for i in range(3):
        best = scores[i].argsort(descending=True)[:3]
        want = {tuple(model.blocks[i].moe.router.weight[e].tolist()) for e in best.tolist()}
        got = {tuple(row.tolist()) for row in cut.blocks[i].moe.router.weight}
        assert got == want
    with pytest.raises(Exception, match="only removes experts"):
        baseline(trained_run, "L2 E3 k2 W64", method="expert-prune")


def pmeta_subnet(meta: dict, recipe):
    from elasticmoe.subnet import Subnet

    return Subnet.parse(meta["subnet"], recipe.model)
