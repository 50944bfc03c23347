"""Run data from user sources: text files and pre-tokenized, memory-mapped shards."""

from __future__ import annotations

import numpy as np

from elasticmoe.data import build_default_corpus, tokenize_docs, write_token_shard
from elasticmoe.recipe import load_recipe
from elasticmoe.rundata import load_run_data
from elasticmoe.tokenizer import train_tokenizer
from elasticmoe.train import read_metrics, train


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
    vals = [m for m in read_metrics(run / "metrics.jsonl") if "val" in m]
    assert set(vals[-1]["val"]["largest"]) == {"text"}
    assert (run / "parent" / "manifest.json").exists()


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
