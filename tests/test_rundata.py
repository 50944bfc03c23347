"""Run data from user sources: text files and pre-tokenized, memory-mapped shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elasticmoe.config import ConfigError
from elasticmoe.data import build_default_corpus
from elasticmoe.metrics import read_metrics
from elasticmoe.recipe import load_recipe
from elasticmoe.rundata import load_run_data
from elasticmoe.tokenizer import train_tokenizer
from elasticmoe.tokens import tokenize_docs, write_token_shard
from elasticmoe.train import train


def test_training_on_pretokenized_shards(tmp_path):
    corpus = build_default_corpus(0, 0.05)
    tok = train_tokenizer(corpus.texts("train"), 320, tmp_path / "tok" / "tokenizer.json")
    ids = tokenize_docs(tok, list(corpus.texts("train")))
    held = tokenize_docs(tok, list(corpus.texts("val")))
    half = len(ids) // 2
    write_token_shard(tmp_path / "s0.bin", ids[:half])
    write_token_shard(tmp_path / "s1.bin", ids[half:])
    write_token_shard(tmp_path / "heldout.bin", held)
    r = load_recipe(
        "micro",
        [
            "data.source=shards",
            f"data.paths=['{tmp_path}/s*.bin']",
            f"data.eval_paths=['{tmp_path}/heldout.bin']",
            f"data.tokenizer={tmp_path}/tok/tokenizer.json",
            "train.steps=6",
            "train.eval_every=6",
        ],
    )
    run = tmp_path / "run"
    train(r, run, progress=False)
    data = load_run_data(run, r)
    assert isinstance(data.train_shards.arrays[0], np.memmap)
    assert sum(len(a) for a in data.train_shards.arrays) == len(ids)
    x, y = next(data.train_batches(4, 0))
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    ax, ay = next(data.train_batches(4, 0, loss_on="answers"))  # plain text: every target kept
    assert torch.equal(ax, x) and torch.equal(ay, y)
    vals = [m for m in read_metrics(run / "metrics.jsonl") if "val" in m]
    assert set(vals[-1]["val"]["largest"]) == {"text"}
    assert (run / "parent" / "manifest.json").exists()
    # a resume on a shard re-written with other tokens (same name, same size) is refused, naming it
    stopped = tmp_path / "stopped"
    train(r, stopped, progress=False, stop_at=5)  # a checkpoint at step 5
    write_token_shard(tmp_path / "s1.bin", ids[half:][::-1].copy())
    with pytest.raises(ConfigError, match="data/shards changed"):
        train(r, stopped, resume=True, progress=False)


def test_training_on_user_text_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    corpus = build_default_corpus(0, 0.05)
    text = "\n\n".join(corpus.docs["train"]["text"][:400])
    (docs / "a.txt").write_text(text)
    r = load_recipe(
        "micro", ["data.source=files", f"data.paths=['{docs}/*.txt']", "train.steps=4", "train.eval_every=4"]
    )
    train(r, tmp_path / "run", progress=False)
    data = load_run_data(tmp_path / "run", r)
    assert set(data.tokens) == {"train", "val", "search", "test"} and list(data.tokens["train"]) == ["text"]


def test_default_data_batches_follow_the_default_mix(tmp_path):
    import json

    import pytest

    from elasticmoe.config import ConfigError
    from elasticmoe.data import DEFAULT_TASK_WEIGHTS
    from elasticmoe.rundata import prepare_run_data

    r = load_recipe("micro", ["model.max_seq_len=128", "data.seq_len=128"])
    data = prepare_run_data(r, tmp_path / "run")
    assert data.task_weights == DEFAULT_TASK_WEIGHTS
    batches = data.train_batches(8, 0)
    rows = batches.rows_at(0)
    assert rows == {t: round(w * 8) for t, w in DEFAULT_TASK_WEIGHTS.items()}
    x, y = next(batches)
    assert x.shape == (8, 128) and torch_equal(x[:, 1:], y[:, :-1])
    first = 0
    for task, n in rows.items():
        for row in x[first : first + n]:
            text = data.tokenizer.decode(row.tolist())
            if task in ("kv", "arith", "sort"):  # documents < 128 tokens: windows start at a document boundary
                assert text.startswith(f"<|endoftext|>{task}: "), text[:40]
            elif task == "find":
                assert "find: " in text or " ? " in text
        first += n
    assert data.train_batches(8, 0, task_weights={"kv": 1.0}).rows_at(5) == {"kv": 8}
    # a run folder prepared before the corpus changed (no corpus_version) is refused, not reused
    ready = tmp_path / "run" / "data" / "ready"
    ident = json.loads(ready.read_text())
    ident.pop("corpus_version")
    ready.write_text(json.dumps(ident) + "\n")
    with pytest.raises(ConfigError, match="other data settings"):
        prepare_run_data(r, tmp_path / "run")


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_loss_on_answers_trains_structured_rows_on_their_answers_only(tmp_path):
    """data.loss_on=answers: structured rows' targets outside their answers (and closing EOS) are
    ignored, text rows keep every target, the KD loss averages over the kept tokens only, and a
    run trains with finite losses."""
    from elasticmoe.data import answer_spans
    from elasticmoe.tokens import IGNORE
    from elasticmoe.train import kd_loss

    r = load_recipe("micro", ["data.loss_on=answers", "train.steps=4", "train.eval_every=4", "train.ckpt_every=4"])
    run = tmp_path / "run"
    train(r, run, progress=False)
    losses = [v for m in read_metrics(run / "metrics.jsonl") if "loss" in m for v in m["loss"].values()]
    assert len(losses) >= 4 and all(np.isfinite(losses))
    data = load_run_data(run, r)
    tok = data.tokenizer
    batches = data.train_batches(8, 0, loss_on="answers")
    plain = data.train_batches(8, 0)
    seen, kept_rows = set(), 0
    for _ in range(3):
        tasks = [t for t, n in batches.rows_at(batches.step).items() for _ in range(n)]  # rows, task by task
        (x, y), (px, py) = next(batches), next(plain)
        assert torch.equal(x, px)  # the same rows; only the targets differ
        for row, task in enumerate(tasks):
            seen.add(task)
            ignored = y[row] == IGNORE
            if task == "text":
                assert not ignored.any()
                continue
            assert int((~ignored).sum()) < len(ignored)  # (a window of a long record table may hold no answer)
            kept_rows += int((~ignored).any())
            assert torch.equal(y[row][~ignored], py[row][~ignored])
            # every kept target is an answer character or EOS
            kept = "".join(tok.decode([int(t)]) for t in y[row][~ignored])
            assert set(kept) <= set("0123456789 ") | set(tok.eos_token), (task, kept)
    assert seen >= {"text", "kv", "arith"} and kept_rows >= 6
    # the spans the mask follows
    assert answer_spans("kv", "kv: a=12 b=345 ? b=345 ? a=12") == [(19, 22), (27, 29)]
    assert answer_spans("arith", "arith: 012+003 = 0150") == [(17, 21)]
    assert answer_spans("sort", "sort: 3 1 -> 1 3") == [(13, 16)]
    assert answer_spans("find", "find: 101 a 55; 202 b 66 ? 202 -> 66") == [(34, 36)]
    assert answer_spans("text", "anything = 3") == []
    # KD over kept tokens only
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    keep = torch.tensor([[True, False, True, False, False], [False] * 4 + [True]])
    assert torch.allclose(kd_loss(s, t, 2.0, keep), kd_loss(s[keep][None], t[keep][None], 2.0))


def test_loss_on_answers_scores_held_out_windows_on_their_answers(tmp_path):
    """Validation, search and the fine-tune's KD measure what data.loss_on=answers trains: a
    structured task's held-out windows come with the mask of their answers."""
    from elasticmoe.checkpoint import load_model
    from elasticmoe.phases import mean_kd
    from elasticmoe.search import SubnetEvaluator
    from elasticmoe.subnet import Subnet
    from elasticmoe.train import eval_losses

    r = load_recipe("micro", ["data.loss_on=answers", "train.steps=2", "train.eval_every=2", "train.ckpt_every=2"])
    run = tmp_path / "run"
    train(r, run, progress=False)
    data = load_run_data(run, r)
    masked, plain = data.eval_windows("val", 4, "answers"), data.eval_windows("val", 4)
    assert not isinstance(masked["text"], tuple) and torch.equal(masked["text"], plain["text"])
    w, keep = masked["kv"]
    assert torch.equal(w, plain["kv"]) and keep.shape == (len(w), w.shape[1] - 1) and 0 < keep.float().mean() < 1
    model, _ = load_model(run / "parent")
    full = Subnet.full(model.config)
    got = eval_losses(model, masked, {"s": full}, torch.device("cpu"))["s"]
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none")
    assert got["kv"] == pytest.approx(float(nats[keep.flatten()].mean()), rel=1e-4)
    assert got["text"] == pytest.approx(eval_losses(model, plain, {"s": full}, torch.device("cpu"))["s"]["text"])
    search = SubnetEvaluator(model, masked, "cpu")
    assert search(full)["kv"] == pytest.approx(got["kv"], rel=1e-5) and search.tokens > 0
    assert mean_kd(model, model, masked, "cpu") == pytest.approx(0.0, abs=1e-6)
