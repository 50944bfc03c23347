"""Elastic training: learning, exact resume after kill -9, checkpoint integrity, bad inputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from elasticmoe import train as trainmod
from elasticmoe.checkpoint import CheckpointError, verify_manifest
from elasticmoe.metrics import read_metrics
from elasticmoe.recipe import load_recipe
from elasticmoe.tokenizer import load_tokenizer
from elasticmoe.train import describe_data, describe_schedule, sample_step, train
from elasticmoe.trainstate import find_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def micro(**over):
    return load_recipe("micro", [f"{k}={v}" for k, v in over.items()])


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "elasticmoe", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300
    )


def _train_losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def test_training_lowers_validation_loss_of_largest_and_smallest(tmp_path):
    res = train(micro(**{"train.steps": 40, "train.eval_every": 40}), tmp_path / "run", progress=False)
    vals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val" in r]
    first, last = vals[0], vals[-1]
    assert first["step"] == 0 and last["step"] == 40
    for name in ("largest", "smallest"):
        before = sum(first["val"][name].values())
        after = sum(last["val"][name].values())
        assert after < before - 0.5, (name, before, after)
    assert (tmp_path / "run" / "parent" / "manifest.json").exists()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert res.tokens_per_s > 0


def test_document_mask_reaches_training_and_validation(tmp_path, monkeypatch):
    """data.document_mask: every forward of the steps and the validation gets the EOS id (a packed
    validation window holds several documents, so its loss at step 0, the same
    initial weights, differs from the unmasked run's); the run trains to a finite loss."""
    seen = []
    real = trainmod.ElasticMoE.forward

    def spy(self, *a, **kw):
        seen.append(kw.get("doc_eos"))
        return real(self, *a, **kw)

    monkeypatch.setattr(trainmod.ElasticMoE, "forward", spy)
    over = {"train.steps": 6, "train.eval_every": 6, "reorder.at_steps": "[3]"}
    train(micro(**over, **{"data.document_mask": "true"}), tmp_path / "masked", progress=False)
    assert set(seen) == {load_tokenizer(tmp_path / "masked" / "parent").eos_id}, set(seen)
    seen.clear()
    train(micro(**over), tmp_path / "plain", progress=False)
    assert set(seen) == {None}
    masked, plain = (
        [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "val" in r] for run in ("masked", "plain")
    )
    assert masked[0]["step"] == plain[0]["step"] == 0
    assert masked[0]["val"]["largest"]["text"] != plain[0]["val"]["largest"]["text"]
    assert all(v == v and v < 20 for v in masked[-1]["val"]["largest"].values())


def test_describe_data_names_how_rows_are_read():
    assert describe_data(load_recipe("tiny")) == (
        "structured rows trained on their answers only; each packed document attends only to itself; "
        "task levels drawn [8, 4, 2, 1] (easiest first)"
    )
    plain = describe_data(micro(**{"data.curriculum": 0.5}))
    assert plain.startswith("loss on every token; packed documents see the ones before; task levels drawn uniformly")
    assert plain.endswith("levels entering easiest first over 50% of the run")


def test_sandwich_sampling_is_a_function_of_seed_and_step():
    r = micro(**{"sampling.n_random": 2})
    order = list(range(r.model.layers))
    a = [sample_step(r, s, order) for s in range(30)]
    b = [sample_step(r, s, order) for s in range(30)]
    assert a == b
    assert a[0][0][0] == "largest" and a[0][1][0] == "smallest"
    assert len({str(x) for step in a for _, x in step}) > 3  # random draws differ across steps
    for step in a:
        for _, sn in step:
            assert sn.in_space(r.space)


def test_progressive_shrinking_opens_the_space_in_phases():
    r = micro(**{"sampling.mode": "progressive", "train.steps": 100, "sampling.n_random": 3})
    order = list(range(r.model.layers))
    early = {sn for s in range(0, 10) for _, sn in sample_step(r, s, order)}
    assert len(early) == 1  # only the full model in the first phase
    late = {sn for s in range(60, 100) for _, sn in sample_step(r, s, order)}
    assert len(late) > 3
    depth_phase = {sn for s in range(12, 24) for _, sn in sample_step(r, s, order)}
    assert all(x.specs[0].experts == max(r.space.experts) for x in depth_phase)


def test_budget_sampling_draws_only_targets():
    r = micro(
        **{
            "sampling.mode": "budget",
            "sampling.targets": "['L2 E2 k1 W16', 'L3 E4 k1 W32']",
            "sampling.target_weights": "[0.9, 0.1]",
            "sampling.n_random": 4,
        }
    )
    order = list(range(r.model.layers))
    drawn = [str(sn) for s in range(50) for name, sn in sample_step(r, s, order) if name != "largest"]
    assert set(drawn) <= {"L[0-1] E2 k1 W16", "L[0-2] E4 k1 W32"}
    assert drawn.count("L[0-1] E2 k1 W16") > drawn.count("L[0-2] E4 k1 W32")


def _kill_at_step(cmd: list[str], metrics: Path, kill_at: int) -> None:
    """Run an elasticmoe command and SIGKILL it once its metrics log shows step `kill_at`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "elasticmoe", *cmd], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if max(_train_losses(metrics.parent), default=0) >= kill_at if metrics.exists() else False:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    from safetensors.torch import load_file

    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    args = ["--config", "micro", "--set", "train.steps=24", "--set", "train.ckpt_every=4", "--quiet"]
    ref = _cli("train", *args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    _kill_at_step(["train", *args, "--out", str(run)], run / "metrics.jsonl", random.Random(os.getpid()).randint(6, 18))
    assert not (run / "parent").exists()
    res = _cli("train", *args, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr
    want, got = _train_losses(tmp_path / "ref"), _train_losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 25))
    assert got == want  # exact float equality, every sub-network, every step
    _assert_same_weights(tmp_path / "ref" / "parent", run / "parent")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune", "baseline"])
def test_finetune_and_baseline_resume_after_kill_9_bit_for_bit(tmp_path, stage):
    """Fine-tuning and baselines run on the same engine as train: the same exact resume."""
    parent = tmp_path / "parent"
    res = _cli("train", "--config", "micro", "--set", "train.steps=6", "--quiet", "--out", str(parent))
    assert res.returncode == 0, res.stderr
    if stage == "finetune":
        res = _cli("extract", str(parent), "--subnet", "L2 E4 k1 W32", "--out", str(tmp_path / "child"))
        assert res.returncode == 0, res.stderr

        def cmd(out: Path) -> list[str]:
            child, teacher = str(tmp_path / "child"), str(parent)
            return ["finetune", child, "--teacher", teacher, "--steps", "24", "--out", str(out)]

        outs, model = (tmp_path / "ref", tmp_path / "killed"), "model"
    else:

        def cmd(out: Path) -> list[str]:
            return ["baseline", str(parent), "--arch", "L2 E4 k1 W32", "--steps", "24", "--name", out.name, "--quiet"]

        outs, model = (parent / "baselines" / "ref", parent / "baselines" / "killed"), "parent"
    ref, run = outs
    assert _cli(*cmd(ref)).returncode == 0
    _kill_at_step(cmd(run), run / "metrics.jsonl", random.Random(os.getpid()).randint(6, 18))
    assert not (run / model).exists()
    res = _cli(*cmd(run), "--resume")
    assert res.returncode == 0, res.stderr
    want, got = _train_losses(ref), _train_losses(run)
    assert sorted(got) == sorted(want) == list(range(1, 25))
    assert got == want
    _assert_same_weights(ref / model, run / model)


def test_corrupted_checkpoint_is_rejected_and_resume_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    train(micro(**{"train.steps": 10, "train.ckpt_every": 5}), run, progress=False)
    newest = run / "checkpoints" / "step-000010"
    target = newest / "model.safetensors"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_manifest(newest)
    assert find_checkpoint(run) == run / "checkpoints" / "step-000005"
    assert "model.safetensors" in caplog.text


def test_nonfinite_step_is_skipped_and_parameters_untouched(tmp_path, monkeypatch):
    real = trainmod.kd_loss
    calls = {"n": 0}

    def flaky(student, teacher, t, keep=None):
        calls["n"] += 1
        out = real(student, teacher, t, keep)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(trainmod, "kd_loss", flaky)
    run = tmp_path / "run"
    train(micro(**{"train.steps": 6}), run, progress=False)
    recs = read_metrics(run / "metrics.jsonl")
    skipped = [r for r in recs if r.get("skipped")]
    assert len(skipped) == 1
    assert len([r for r in recs if "loss" in r]) == 5

    monkeypatch.setattr(trainmod, "kd_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train(micro(**{"train.steps": 6, "train.max_bad_steps": 3}), tmp_path / "run2", progress=False)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "data.source=files", "--set", "data.paths=['/nonexistent/*.txt']"], "nonexistent"),
        (["--set", "train.bogus=1"], "bogus"),
        (["--set", "space.top_ks=[3]"], "top_ks"),
        (["--set", "space.widths=[999]"], "widths"),
        (["--set", "data.document_mask=2"], "document_mask"),
    ],
)
def test_bad_inputs_give_one_line_errors_and_exit_2(tmp_path, extra, needle):
    out = tmp_path / "run"
    res = _cli("train", "--config", "micro", *extra, "--out", str(out), "--quiet")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1 and "Traceback" not in res.stderr and needle in lines[0]
    assert not (out / "parent").exists() and not (out / "checkpoints").exists()


def test_empty_corpus_and_unwritable_output_are_clean_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = _cli(
        "train",
        "--config",
        "micro",
        "--set",
        "data.source=files",
        "--set",
        f"data.paths=['{empty}']",
        "--out",
        str(tmp_path / "r"),
        "--quiet",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "empty" in res.stderr.lower()
    assert not (tmp_path / "r").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("train", "--config", "micro", "--out", str(blocker / "sub"), "--quiet")
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr


def test_existing_run_requires_resume(tmp_path):
    run = tmp_path / "run"
    train(micro(**{"train.steps": 5}), run, progress=False)
    res = _cli("train", "--config", "micro", "--out", str(run), "--quiet")
    assert res.returncode == 2 and "--resume" in res.stderr


def test_ledger_records_training_work(tmp_path):
    from elasticmoe.ledger import Ledger

    run = tmp_path / "run"
    r = micro(**{"train.steps": 10, "train.ckpt_every": 5})
    train(r, run, progress=False)
    led = Ledger(run / "ledger.jsonl")
    tot = led.totals("train")
    assert tot["tokens"] == 10 * r.train.batch_size * r.data.seq_len
    assert tot["flops"] > 0 and led.finished("train")
    prog = [x for x in led.records() if x["event"] == "progress"]
    assert [p["steps"] for p in prog] == [[0, 5], [5, 10]]
    assert json.loads(json.dumps(prog))  # plain JSON


def test_resume_refuses_a_different_recipe_and_defaults_to_the_saved_one(tmp_path):
    run = tmp_path / "run"
    train(micro(**{"train.steps": 10, "train.ckpt_every": 5}), run, progress=False, stop_at=5)
    res = _cli("train", "--config", "micro", "--set", "train.steps=12", "--out", str(run), "--resume", "--quiet")
    assert res.returncode == 2 and "train.steps" in res.stderr and "Traceback" not in res.stderr
    res = _cli("train", "--out", str(run), "--resume", "--quiet")  # no --config: the run's own recipe
    assert res.returncode == 0, res.stderr[-2000:]
    assert max(_train_losses(run)) == 10


def test_progressive_shrinking_with_few_experts_never_draws_an_invalid_top_k():
    r = micro(
        **{
            "sampling.mode": "progressive",
            "space.experts": "[1, 2, 8]",
            "space.top_ks": "[1, 2]",
            "train.steps": 40,
            "sampling.n_random": 4,
        }
    )
    for step in range(40):
        for _, sn in sample_step(r, step, list(range(r.model.layers))):
            sn.validate(r.model)


def test_outputs_never_replace_a_folder_elasticmoe_did_not_write(tmp_path):
    from elasticmoe.checkpoint import AtomicFolder

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        with AtomicFolder(victim) as tmp:
            (tmp / "x").write_text("new")
    assert (victim / "important.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    for content in ("first", "second"):  # a folder we wrote (it has a manifest) is replaced whole
        with AtomicFolder(ours) as tmp:
            (tmp / "x").write_text(content)
    assert (ours / "x").read_text() == "second" and (ours / "manifest.json").exists()


def test_a_skipped_last_step_still_checkpoints_and_records_its_segment(tmp_path, monkeypatch):
    from elasticmoe.ledger import Ledger

    real_kd, real_sample, current = trainmod.kd_loss, trainmod.sample_step, {}

    def spy(recipe, step, order):
        current["step"] = step
        return real_sample(recipe, step, order)

    monkeypatch.setattr(trainmod, "sample_step", spy)
    monkeypatch.setattr(trainmod, "kd_loss", lambda *a: real_kd(*a) * (float("nan") if current["step"] == 5 else 1.0))
    run = tmp_path / "run"
    train(micro(**{"train.steps": 6, "train.ckpt_every": 3}), run, progress=False)
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("skipped")] == [6]
    assert (run / "checkpoints" / "step-000006" / "manifest.json").exists()
    assert (run / "parent" / "manifest.json").exists()
    progress = [r["steps"] for r in Ledger(run / "ledger.jsonl").records() if r.get("event") == "progress"]
    assert progress == [[0, 3], [3, 6]]


def test_full_network_warmup_trains_the_largest_alone_and_the_ledger_shows_it(tmp_path):
    """sampling.full_fraction: the first steps train the largest network only; the ledger's FLOPs
    are those of the sub-networks really trained, step by step."""
    from elasticmoe.cost import cost
    from elasticmoe.ledger import Ledger

    r = micro(**{"train.steps": 8, "train.ckpt_every": 4, "sampling.full_fraction": 0.5})
    order = list(range(r.model.layers))
    assert all(len(sample_step(r, s, order)) == 1 for s in range(4))
    assert all(len(sample_step(r, s, order)) > 1 for s in range(4, 8))
    run = tmp_path / "run"
    train(r, run, progress=False)
    per_step = r.train.batch_size * r.data.seq_len
    want = sum(
        cost(r.model, sn, r.data.seq_len).flops_train * per_step for s in range(8) for _, sn in sample_step(r, s, order)
    )
    assert Ledger(run / "ledger.jsonl").totals("train")["flops"] == want
    logged = [rec for rec in read_metrics(run / "metrics.jsonl") if "loss" in rec]
    assert [len(rec["loss"]) for rec in logged[:4]] == [1, 1, 1, 1]


def test_step_loss_is_a_weighted_mean_of_the_sub_networks(monkeypatch):
    """distill.subnet_weight w: loss = (L_largest + w * mean of the others) / (1 + w), so the
    gradient keeps the scale of one network (clipping means what it does from scratch)."""
    from elasticmoe import dist as distmod
    from elasticmoe.model import ElasticMoE

    over = {"distill.subnet_weight": 0.5, "distill.kd_weight": 0.0, "distill.ce_weight": 1.0}
    r = micro(**over, **{"train.aux_weight": 0.0, "train.z_weight": 0.0})
    torch.manual_seed(0)
    model = ElasticMoE(r.model)
    x = torch.randint(0, r.model.vocab_size, (2, r.data.seq_len))
    y = torch.randint(0, r.model.vocab_size, (2, r.data.seq_len))
    subnets = sample_step(r, 5, model.layer_order)
    seen = []
    real_backward = torch.Tensor.backward

    def spy(self, *a, **kw):
        seen.append(self.item())
        return real_backward(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "backward", spy)
    par = distmod.setup(torch.device("cpu"), "auto")
    opt = trainmod.make_optimizer(model, r)
    res = trainmod.train_step(model, opt, x, y, subnets, r, par, 5)
    par.close()
    n = len(subnets) - 1
    assert n >= 1 and res.finite
    ce = list(res.losses.values())
    assert seen[0] == pytest.approx(ce[0] / 1.5, rel=1e-5)  # the largest: CE only, weight 1 / (1 + w)
    assert seen[1:] == pytest.approx([0.5 / n / 1.5 * c for c in ce[1:]], rel=1e-5)


def test_a_segment_lost_between_checkpoint_and_ledger_is_recorded_on_resume(tmp_path):
    """A kill after a checkpoint is renamed into place but before its ledger line is written: the
    checkpoint carries the segment and the resume appends it once, so totals equal an
    uninterrupted run's exactly (and resuming twice does not count it twice)."""
    from elasticmoe.ledger import Ledger

    r = micro(**{"train.steps": 8, "train.ckpt_every": 4})
    train(r, tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    train(r, run, progress=False, stop_at=4)
    path = run / "ledger.jsonl"
    lines = path.read_text().splitlines()
    kept = [x for x in lines if not ('"progress"' in x and '"steps": [0, 4]' in x)]
    assert len(kept) == len(lines) - 1
    path.write_text("\n".join(kept) + "\n")
    train(r, run, resume=True, progress=False)
    train(r, run, resume=True, progress=False)  # a finished run resumed again adds no training segment
    want, got = Ledger(tmp_path / "ref" / "ledger.jsonl").totals("train"), Ledger(path).totals("train")
    assert got["tokens"] == want["tokens"] and got["flops"] == want["flops"]


# -- the cheap elastic step (sampling.mode=rows) and the schedule ---------------------------------
def _rows(**over):
    base = {"sampling.mode": "rows", "sampling.sub_rows": 0.5, "sampling.n_random": 2, "sampling.per_layer": True}
    return micro(**{**base, **over})


def test_row_layout_gives_each_configuration_its_own_rows():
    r = _rows(**{"train.batch_size": 8, "sampling.row_blocks": 2})
    full, subs = trainmod.row_layout(r, 8, 3)  # blocks of 4 rows: 2 sub-network rows each
    assert full == list(range(8)) and subs == [[2, 6], [3, 7]]  # 2 rows a block: 2 of the 3 drawn
    assert [name for name, _ in sample_step(r, 10, [0, 1, 2])] == ["largest", "smallest", "random0"]
    r = _rows(**{"train.batch_size": 8, "sampling.full_rows": 0.5})
    full, subs = trainmod.row_layout(r, 8, 2)
    assert full == [0, 1, 2, 3] and subs == [[4, 5], [6, 7]]  # disjoint: the partition arm


class _Capture:
    """Stands in for AdamW: keeps the gradient of the step."""

    def __init__(self, model):
        self.model, self.param_groups = model, []

    def step(self):
        self.grads = [p.grad.clone() if p.grad is not None else None for p in self.model.parameters()]

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=True)


def test_rows_step_gradient_is_that_of_the_documented_loss():
    """Each configuration trains on its rows: the step's gradient equals the gradient of
    (CE_largest(all rows) + w/n * sum_j KD_j(rows_j; teacher = the largest's logits)) / (1 + w),
    computed here in one graph, so every drawn configuration contributes; with disjoint rows the
    teacher logits of a sub-network's rows come from a forward of the largest without gradient."""
    from elasticmoe import dist as distmod
    from elasticmoe.model import ElasticMoE

    for full_rows in (1.0, 0.5):
        r = _rows(**{"train.aux_weight": 0.0, "train.z_weight": 0.0, "sampling.full_rows": full_rows})
        torch.manual_seed(0)
        model = ElasticMoE(r.model)
        x = torch.randint(0, r.model.vocab_size, (4, r.data.seq_len))
        y = torch.randint(0, r.model.vocab_size, (4, r.data.seq_len))
        subnets = sample_step(r, 15, model.layer_order)
        assert len(subnets) == 3 and len({sn for _, sn in subnets}) == 3

        opt, par = _Capture(model), distmod.setup(torch.device("cpu"), "auto")
        res = trainmod.train_step(model, opt, x, y, subnets, r, par, 15)
        par.close()
        assert res.finite and set(res.losses) == {name for name, _ in subnets}
        full, subs = trainmod.row_layout(r, 4, 2)
        big = model(x[full], subnets[0][1]).logits
        loss = torch.nn.functional.cross_entropy(big.flatten(0, 1), y[full].flatten())
        teacher = model(x, subnets[0][1]).logits.detach()
        w = r.distill.subnet_weight
        for (_, sn), rows in zip(subnets[1:], subs):
            loss = loss + w / 2 * trainmod.kd_loss(model(x[rows], sn).logits, teacher[rows], 1.0)
        (loss / (1 + w)).backward()
        for p, g in zip(model.parameters(), opt.grads):
            assert (p.grad is None) == (g is None) or torch.count_nonzero(p.grad) == 0
            if g is not None:
                torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        model.zero_grad(set_to_none=True)
        seq, c = r.data.seq_len, trainmod.costmod.cost
        want = sum(c(r.model, sn, seq).flops_train * len(rows) * seq for (_, sn), rows in zip(subnets, [full, *subs]))
        extra = sum(len(rows) for rows in subs if not set(rows) <= set(full))  # rows the largest did not train
        assert res.flops == want + c(r.model, subnets[0][1], seq).flops_forward * extra * seq


def test_rows_training_ledger_counts_the_flops_spent_and_stays_cheap(tmp_path):
    """The ledger's training FLOPs are those of the rows each configuration really ran; with the
    sub-networks on a quarter of the rows the step costs at most 1.25x a full-network step."""
    from elasticmoe.cost import cost
    from elasticmoe.ledger import Ledger

    r = _rows(**{"train.steps": 8, "train.ckpt_every": 4, "sampling.sub_rows": 0.25, "train.batch_size": 8})
    run = tmp_path / "run"
    train(r, run, progress=False)
    seq, order, want = r.data.seq_len, list(range(r.model.layers)), 0
    steps = {rec["step"]: rec for rec in read_metrics(run / "metrics.jsonl") if "loss" in rec}
    for s in range(8):
        subnets = sample_step(r, s, order)
        assert {name: str(sn) for name, sn in subnets} == steps[s + 1]["subnets"]
        full, subs = trainmod.row_layout(r, 8, len(subnets) - 1)
        want += sum(
            cost(r.model, sn, seq).flops_train * len(rows) * seq for (_, sn), rows in zip(subnets, [full, *subs])
        )
    got = Ledger(run / "ledger.jsonl").totals("train")
    assert got["flops"] == want and got["tokens"] == 8 * 8 * seq
    assert got["flops"] <= 1.25 * cost(r.model, None, seq).flops_train * got["tokens"]


def test_rows_resume_mid_schedule_equals_uninterrupted(tmp_path):
    """A stop after the switch to elastic training (and its re-ordering) resumes exactly."""
    over = {"train.steps": 12, "train.ckpt_every": 4, "sampling.full_fraction": 0.25, "reorder.at_switch": True}
    r = _rows(**over, **{"sampling.depth": "drop", "reorder.at_steps": []})
    train(r, tmp_path / "a", progress=False)
    train(r, tmp_path / "b", progress=False, stop_at=6)  # checkpoint at 4: resumes into the elastic part
    train(r, tmp_path / "b", resume=True, progress=False)
    assert _train_losses(tmp_path / "a") == _train_losses(tmp_path / "b")
    reorders = [rec["step"] for rec in read_metrics(tmp_path / "a" / "metrics.jsonl") if "reorder" in rec]
    assert reorders == [3]  # ceil(0.25 * 12): after the full-network steps, before the first elastic one
    _assert_same_weights(tmp_path / "a" / "parent", tmp_path / "b" / "parent")


def test_layer_drop_keeps_important_layers_more_often():
    from elasticmoe.config import ElasticSpace
    from elasticmoe.subnet import sample_layer_drop

    space = ElasticSpace((2, 3, 4), (2, 4), (1, 2), (32, 64))
    order = [2, 0, 3, 1]  # most important first
    rng = random.Random(0)
    draws = [sample_layer_drop(space, order, rng, 0.6, per_layer=True) for _ in range(3000)]
    kept = {lay: sum(lay in d.layers for d in draws) / len(draws) for lay in order}
    assert kept[2] == 1.0 and kept[2] > kept[0] > kept[3] > kept[1] > 0.3
    assert all(d.depth in space.depths and len(d.specs) == d.depth for d in draws)
    assert any(list(d.layers) != sorted(order[: d.depth]) for d in draws)  # not only prefixes
    assert len({d.specs for d in draws if d.depth == 4}) > 10  # per-layer shapes vary


def test_rows_recipe_errors_name_the_field():
    from elasticmoe.config import ConfigError

    for over, needle in (
        ({"sampling.row_blocks": 3}, "sampling.row_blocks=3"),
        ({"sampling.full_rows": 0.5, "sampling.sub_rows": 0.25}, "leaves rows"),
        ({"sampling.depth": "skip"}, "sampling.depth"),
    ):
        with pytest.raises(ConfigError, match=needle):
            _rows(**over)


def test_describe_schedule_names_switch_step_and_reordering():
    r = load_recipe("tiny", ["sampling.full_fraction=0.8", "reorder.at_switch=true", "reorder.at_steps=[]"])
    text = describe_schedule(r)
    assert text.startswith("the full network alone for the first 800 of 1000 steps (80%), then")
    assert "a sandwich" in text and text.endswith("re-ordering after step 800")
    rows = describe_schedule(load_recipe("tiny", ["sampling.mode=rows", "sampling.depth=drop"]))
    assert "on 25% of them" in rows and "layer dropping" in rows
    plain = describe_schedule(load_recipe("tiny", ["sampling.full_fraction=1.0"]))
    assert plain == "the full network alone for all 1000 steps (no elastic training)"
