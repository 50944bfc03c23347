"""Evaluation: metrics that cannot pass when broken.

Scripted models go through the real evaluation path: `Scripted` is an ElasticMoE whose forward
looks the whole context up in a table built from tokenized examples and puts (almost) all mass on
the scripted next token, so the stock KV-cached `generate` drives it exactly like a trained model.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from elasticmoe.config import ModelConfig
from elasticmoe.data import STRUCTURED_TASKS, Corpus, TaskSpec, build_structured, example_level, split_prompt_answer
from elasticmoe.evaluate import (
    answer_budget,
    arena_examples,
    bootstrap_ratio_ci,
    bradley_terry,
    evaluate,
    format_retention_table,
    greedy_continuations,
    paired_ratio_diff_ci,
    plot_retention,
    read_eval,
    retention,
    retention_table,
    rolling_windows,
    select_by_level,
    wilson_interval,
    write_eval,
)
from elasticmoe.lm_eval_tasks import write_lm_eval_tasks
from elasticmoe.model import ElasticMoE, ModelOutput
from elasticmoe.subnet import Subnet
from elasticmoe.tokenizer import EOS_TOKEN, train_tokenizer

MAX_LEN = 64
SHORT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus Köln: café, 日本語 🙂 (more bytes than characters).",
    "Return a new list containing all items from the iterable in ascending order.",
    "A context manager that changes the working directory and restores it on exit.",
]
LONG_TEXT = " ".join(f"Paragraph {i} says that the value of item {i * 7} is stored in slot {i % 5}." for i in range(20))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    # test split: 40 examples of each task; few kv pairs and find records, so prompts fit MAX_LEN
    spec = TaskSpec(kv_levels=(2, 4), find_levels=(1, 3), find_queries=1)
    structured = build_structured(seed=3, scale=0.1, spec=spec)
    docs = {"train": dict(structured.docs["train"]), "test": dict(structured.docs["test"])}
    docs["train"]["text"] = SHORT_TEXTS * 3 + [LONG_TEXT]
    docs["test"]["text"] = SHORT_TEXTS
    return Corpus(docs)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus.texts("train"), vocab_size=320)


def tiny_config(vocab: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        d_model=16,
        layers=2,
        heads=2,
        kv_heads=1,
        head_dim=8,
        experts=4,
        top_k=2,
        expert_width=16,
        max_seq_len=MAX_LEN,
    )


class Scripted(ElasticMoE):
    """Next token = table[whole context] (else `default`), with logit `confidence` over zeros.

    `table=None` gives uniform logits (all zero). History across KV-cached calls lives on the cache.
    """

    def __init__(self, vocab: int, table: dict | None, default: int, confidence: float = 60.0):
        super().__init__(tiny_config(vocab))
        self.table, self.default, self.confidence = table, default, confidence

    def forward(self, tokens_BT, subnet=None, cache=None):
        if cache is not None:
            history = torch.cat([cache.history, tokens_BT], 1) if cache.length else tokens_BT
            cache.history, start = history, cache.length
            cache.length += tokens_BT.shape[1]
        else:
            history, start = tokens_BT, 0
        B, T = tokens_BT.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        if self.table is not None:
            rows = history.tolist()
            for b in range(B):
                for t in range(T):
                    nxt = self.table.get(tuple(rows[b][: start + t + 1]), self.default)
                    logits[b, t, nxt] = self.confidence
        zero = torch.zeros(())
        return ModelOutput(logits, zero, zero)


def script(tokenizer, sequences) -> dict:
    """Table mapping every prefix of each token sequence to its next token."""
    table = {}
    for seq in sequences:
        for t in range(len(seq) - 1):
            table[tuple(seq[: t + 1])] = seq[t + 1]
    return table


def answering(tokenizer, corpus, answer_for, split="test") -> dict:
    """Table that answers every structured example with `answer_for(index, answer)` then EOS."""
    eos, seqs = tokenizer.eos_id, []
    for task in STRUCTURED_TASKS:
        for i, example in enumerate(corpus.docs[split][task]):
            prompt, answer = split_prompt_answer(task, example)
            seqs.append([eos] + tokenizer.encode(prompt) + tokenizer.encode(answer_for(i, answer)) + [eos])
    return script(tokenizer, seqs)


def digit_id(tokenizer, d="0"):
    (i,) = tokenizer.encode(d)
    return i


# -- structured tasks: exact match ---------------------------------------------------------------
def test_exact_match_right_wrong_half(corpus, tokenizer) -> None:
    V, eos = tokenizer.vocab_size, tokenizer.eos_id
    models = {
        "oracle": Scripted(V, answering(tokenizer, corpus, lambda i, a: a), eos),
        # answer, newline, garbage: the newline ends the answer, so still right
        "newline": Scripted(V, answering(tokenizer, corpus, lambda i, a: a + "\n99 junk"), eos),
        # answer plus one more digit: a prefix match must not count
        "longer": Scripted(V, answering(tokenizer, corpus, lambda i, a: a + "7"), eos),
        "half": Scripted(V, answering(tokenizer, corpus, lambda i, a: a if i % 2 == 0 else "1" + a), eos),
        "constant": Scripted(V, None, eos),  # uniform logits: argmax is id 0, never an answer
        "zeros": Scripted(V, {}, digit_id(tokenizer)),  # "0000..." and never stops
    }
    scores = {
        name: evaluate(m, corpus, tokenizer, tasks=list(STRUCTURED_TASKS), name=name)["tasks"]
        for name, m in models.items()
    }
    for task in STRUCTURED_TASKS:
        n = len(corpus.docs["test"][task])
        assert scores["oracle"][task]["score"] == 1.0 and scores["oracle"][task]["n"] == n
        assert scores["newline"][task]["score"] == 1.0
        assert scores["longer"][task]["score"] == 0.0
        assert scores["constant"][task]["score"] == 0.0
        assert scores["zeros"][task]["score"] == 0.0
        assert scores["half"][task]["score"] == pytest.approx(math.ceil(n / 2) / n)
        for name in scores:
            r = scores[name][task]
            assert r["metric"] == "exact_match" and r["higher_is_better"] is True
            assert r["ci"][0] <= r["score"] <= r["ci"][1]


def test_max_examples_are_evenly_spaced_and_shared(corpus, tokenizer) -> None:
    """max_examples is shared equally between the levels, evenly spaced within each."""
    model = Scripted(
        tokenizer.vocab_size, answering(tokenizer, corpus, lambda i, a: a if i < 20 else "x"), tokenizer.eos_id
    )
    r = evaluate(model, corpus, tokenizer, tasks=["sort"], max_examples=8)["tasks"]["sort"]
    docs = corpus.docs["test"]["sort"]
    by_level = {lv: [d for d in docs if example_level("sort", d) == lv] for lv in (3, 5, 7, 9)}
    chosen = {lv: [ds[0], ds[-1]] for lv, ds in by_level.items()}  # 2 evenly spaced of each level: both ends
    right = {lv: sum(docs.index(d) < 20 for d in ds) for lv, ds in chosen.items()}
    assert r["n"] == 8 and {lv: v["n"] for lv, v in r["levels"].items()} == dict.fromkeys(("3", "5", "7", "9"), 2)
    assert {int(lv): v["exact_match"] * 2 for lv, v in r["levels"].items()} == right
    assert r["score"] == pytest.approx(sum(right.values()) / 8)
    # a count that does not divide: the easier levels take the remainder, the total is as asked
    assert [example_level("sort", d) for d in select_by_level("sort", docs, 5)] == [3, 5, 7, 9, 3]
    assert [example_level("sort", d) for d in select_by_level("sort", docs, 3)] == [3, 5, 7]


def test_exact_match_per_level_with_wilson_intervals(corpus, tokenizer) -> None:
    """Right on every kv example with 2 pairs and none with 4; right on every other sort example:
    each level's exact match, n and Wilson interval, and the answer loss per level."""
    eos, seqs = tokenizer.eos_id, []
    for task in ("kv", "sort"):
        for i, example in enumerate(corpus.docs["test"][task]):
            prompt, answer = split_prompt_answer(task, example)
            right = example_level(task, example) == 2 if task == "kv" else i % 2 == 0
            seqs.append([eos] + tokenizer.encode(prompt) + tokenizer.encode(answer if right else "1" + answer) + [eos])
    model = Scripted(tokenizer.vocab_size, script(tokenizer, seqs), eos)
    res = evaluate(model, corpus, tokenizer, tasks=["kv", "sort"])["tasks"]
    kv, n2 = res["kv"]["levels"], sum(example_level("kv", e) == 2 for e in corpus.docs["test"]["kv"])
    assert set(kv) == {"2", "4"} and kv["2"]["n"] == n2 > 0 and kv["4"]["n"] == len(corpus.docs["test"]["kv"]) - n2
    assert kv["2"]["exact_match"] == 1.0 and (kv["2"]["lo"], kv["2"]["hi"]) == wilson_interval(n2, n2)
    assert kv["4"]["exact_match"] == 0.0 and kv["4"]["lo"] == 0.0
    docs = corpus.docs["test"]["sort"]
    for lv, got in res["sort"]["levels"].items():
        index = [i for i, e in enumerate(docs) if example_level("sort", e) == int(lv)]
        k = sum(i % 2 == 0 for i in index)
        assert (got["n"], got["exact_match"]) == (len(index), k / len(index))
        assert (got["lo"], got["hi"]) == wilson_interval(k, len(index))
    assert res["sort"]["per_example"] == [int(i % 2 == 0) for i in range(len(docs))]
    loss = res["kv/answer-loss"]["levels"]  # the model is sure of its answers: ~0 nats when right
    assert loss["2"]["answer_loss"] < 0.01 < loss["4"]["answer_loss"] and loss["4"]["n"] == kv["4"]["n"]


# -- text: bits per byte -------------------------------------------------------------------------
def text_corpus(docs) -> Corpus:
    return Corpus({"test": {"text": list(docs)}})


def test_bits_per_byte_uniform_is_log2_vocab_per_token(tokenizer) -> None:
    docs = SHORT_TEXTS + [LONG_TEXT]  # the long one needs several rolling windows
    assert len(tokenizer.encode(LONG_TEXT)) > 3 * MAX_LEN
    model = Scripted(tokenizer.vocab_size, None, 0)
    r = evaluate(model, text_corpus(docs), tokenizer)["tasks"]["text"]
    tokens = sum(len(tokenizer.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert r["text_tokens"] == tokens and r["text_bytes"] == n_bytes and r["n"] == len(docs)
    assert r["score"] == pytest.approx(math.log2(tokenizer.vocab_size) * tokens / n_bytes, rel=1e-6)
    assert r["nats_per_token"] == pytest.approx(math.log(tokenizer.vocab_size), rel=1e-6)
    assert r["perplexity"] == pytest.approx(tokenizer.vocab_size, rel=1e-5)
    assert r["metric"] == "bits_per_byte" and r["higher_is_better"] is False
    # per-document figures, for paired comparisons: they add up to the score
    assert len(r["doc_bits"]) == len(r["doc_bytes"]) == len(docs) and sum(r["doc_bytes"]) == n_bytes
    assert sum(r["doc_bits"]) / n_bytes == pytest.approx(r["score"], rel=1e-4)


def test_bits_per_byte_oracle_is_zero_and_wrong_model_is_large(tokenizer) -> None:
    eos = tokenizer.eos_id
    for doc in SHORT_TEXTS:  # one document at a time: after EOS alone, the first token is the doc's
        table = script(tokenizer, [[eos] + tokenizer.encode(doc)])
        oracle = evaluate(Scripted(tokenizer.vocab_size, table, eos), text_corpus([doc]), tokenizer)
        assert oracle["tasks"]["text"]["score"] < 1e-6
    wrong = evaluate(Scripted(tokenizer.vocab_size, {}, eos), text_corpus(SHORT_TEXTS), tokenizer)
    assert wrong["tasks"]["text"]["score"] > math.log2(tokenizer.vocab_size)  # worse than uniform


def test_rolling_windows_score_every_token_once_with_its_true_context() -> None:
    ids = list(range(100, 237))
    for max_len in (1, 5, 16, 137, 200):
        windows = rolling_windows(ids, prefix=7, max_len=max_len)
        scored = []
        for inputs, targets in windows:
            assert len(inputs) == len(targets) <= max_len
            stream = [7] + ids
            start = next(i for i in range(len(stream)) if stream[i : i + len(inputs)] == inputs)
            for j, t in enumerate(targets):
                if t >= 0:
                    assert t == stream[start + j + 1]  # target j is the token after input j
                    scored.append(t)
        assert scored == ids


def test_real_model_text_matches_direct_computation(tokenizer) -> None:
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config(tokenizer.vocab_size))
    r = evaluate(model, text_corpus(SHORT_TEXTS), tokenizer)["tasks"]["text"]
    total = 0.0
    for doc in SHORT_TEXTS:  # each fits one window: plain next-token cross-entropy
        assert len(tokenizer.encode(doc)) < MAX_LEN
        seq = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(doc)])
        logits = model(seq[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits[0], seq[0, 1:], reduction="sum").item()
    assert r["score"] == pytest.approx(total / math.log(2) / sum(len(d.encode()) for d in SHORT_TEXTS), rel=1e-5)


# -- sub-networks, work, identity ----------------------------------------------------------------
def test_parent_subnet_equals_extracted_child(corpus, tokenizer) -> None:
    from elasticmoe.extract import extract

    torch.manual_seed(1)
    parent = ElasticMoE(tiny_config(tokenizer.vocab_size))
    subnet = Subnet.uniform([1], experts=2, top_k=1, width=8)
    a = evaluate(parent, corpus, tokenizer, subnet=subnet, max_examples=8, name="parent")
    b = evaluate(extract(parent, subnet), corpus, tokenizer, max_examples=8, name="child")
    full = evaluate(parent, corpus, tokenizer, max_examples=8)
    for task in a["tasks"]:
        assert a["tasks"][task]["score"] == pytest.approx(b["tasks"][task]["score"], rel=1e-5, abs=1e-9)
        assert a["tasks"][task].get("samples") == b["tasks"][task].get("samples")
    assert a["model"]["subnet"] == str(subnet) and b["model"]["subnet"] is None
    assert a["model"]["params"] == b["model"]["params"] < full["model"]["params"]
    assert a["tokens"] == b["tokens"] > 0 and a["flops"] == b["flops"] > 0
    assert full["flops"] > a["flops"]  # same tokens, bigger network
    assert set(a) >= {"model", "tasks", "tokens", "flops", "seconds", "split"} and a["split"] == "test"


def test_generation_flops_follow_the_cost_model(tokenizer) -> None:
    from elasticmoe.cost import cost

    model = Scripted(tokenizer.vocab_size, {}, digit_id(tokenizer))  # never stops: fixed step count
    corpus = Corpus({"test": {"arith": ["arith: 1+1 = 2"]}})
    r = evaluate(model, corpus, tokenizer)
    T0, steps = 1 + len(tokenizer.encode("arith: 1+1 = ")), answer_budget(["2"])
    f = lambda s: cost(model.config, None, s).flops_forward  # noqa: E731
    # generation (prefill T0, then steps - 1 one-token forwards) + the teacher-forced answer-loss
    # forward over [EOS] + prompt + answer minus its last token (T0 positions, "2" is one token)
    assert r["tokens"] == T0 + steps - 1 + T0
    assert r["flops"] == T0 * f(T0) + sum(f(T0 + i) for i in range(1, steps)) + T0 * f(T0)


# -- intervals -----------------------------------------------------------------------------------
def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    for k, n in [(0, 5), (3, 7), (50, 100), (99, 100)]:
        lo, hi = wilson_interval(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    small, large = wilson_interval(30, 100), wilson_interval(300, 1000)
    assert large[1] - large[0] < small[1] - small[0]


def test_bootstrap_ratio_ci() -> None:
    rng = np.random.default_rng(0)
    num, den = rng.gamma(2.0, 1.0, 2000), rng.integers(50, 150, 2000).astype(float)
    for n in (20, 2000):
        lo, hi = bootstrap_ratio_ci(num[:n], den[:n], seed=1)
        assert lo <= num[:n].sum() / den[:n].sum() <= hi
    narrow, wide = bootstrap_ratio_ci(num, den, seed=1), bootstrap_ratio_ci(num[:20], den[:20], seed=1)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    assert bootstrap_ratio_ci(num[:20], den[:20], seed=1) == bootstrap_ratio_ci(num[:20], den[:20], seed=1)


def test_paired_difference_interval_is_narrow_when_documents_share_their_difficulty() -> None:
    rng = np.random.default_rng(0)
    den = rng.integers(100, 400, 100).astype(float)
    hard = rng.gamma(2.0, 1.0, 100) * den  # documents differ a lot in difficulty ...
    a, b = hard * 1.02, hard  # ... and model a is 2% worse on every one
    lo, hi = paired_ratio_diff_ci(a, b, den, seed=3)
    true = a.sum() / den.sum() - b.sum() / den.sum()
    assert 0 < lo <= true <= hi  # a measured difference
    sep_a, sep_b = bootstrap_ratio_ci(a, den, seed=3), bootstrap_ratio_ci(b, den, seed=3)
    assert sep_a[0] <= sep_b[1]  # the two separate intervals overlap: they could not show it
    assert hi - lo < (sep_a[1] - sep_a[0]) / 10
    same = paired_ratio_diff_ci(b, b, den)
    assert same == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal"):
        paired_ratio_diff_ci(a[:5], b, den)


# -- retention -----------------------------------------------------------------------------------
def fake_result(kv: float, bpb: float) -> dict:
    return {
        "tasks": {
            "kv": {"metric": "exact_match", "score": kv, "ci": [0, 1], "n": 10, "higher_is_better": True},
            "text": {"metric": "bits_per_byte", "score": bpb, "ci": [0, 9], "n": 4, "higher_is_better": False},
        }
    }


def test_retention_from_raw_scores() -> None:
    parent, child = fake_result(0.8, 2.0), fake_result(0.6, 2.5)
    r = retention(parent, child)
    assert r["kv"] == pytest.approx(0.6 / 0.8) and r["text"] == pytest.approx(2.0 / 2.5)
    assert retention(parent, parent) == {"kv": 1.0, "text": 1.0}
    assert retention(fake_result(0.0, 2.0), child)["kv"] is None  # undefined, not inf


def test_retention_table_plot_and_files(tmp_path) -> None:
    results = {
        "parent": fake_result(0.8, 2.0),
        "a": fake_result(0.4, 4.0),
        "a-ft": fake_result(0.6, 2.5),
        "b": fake_result(0.8, 2.0),
    }
    rows = retention_table(results)
    by = {(r["child"], r["task"]): r for r in rows}
    assert set(by) == {("a", "kv"), ("a", "text"), ("b", "kv"), ("b", "text")}
    assert by["a", "kv"]["retention_before"] == pytest.approx(0.5)
    assert by["a", "kv"]["retention_after"] == pytest.approx(0.75)
    assert by["a", "text"]["retention_before"] == pytest.approx(0.5)
    assert by["a", "text"]["retention_after"] == pytest.approx(0.8)
    assert by["b", "kv"]["retention_before"] == 1.0 and by["b", "kv"]["after"] is None
    assert format_retention_table(rows).row_count == 4
    png = plot_retention(rows, tmp_path / "retention.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = {"parent": {**fake_result(0.8, float("nan")), "flops": 3}}
    write_eval(tmp_path / "eval.json", data)
    json.loads((tmp_path / "eval.json").read_text())  # strict JSON: NaN written as null
    assert read_eval(tmp_path / "eval.json")["parent"]["tasks"]["text"]["score"] is None


# -- arena ---------------------------------------------------------------------------------------
def test_bradley_terry_orders_by_wins() -> None:
    wins = np.array([[0, 8, 9], [2, 0, 7], [1, 3, 0]], dtype=float)
    p = bradley_terry(wins)
    assert p[0] > p[1] > p[2] and np.log(p).mean() == pytest.approx(0.0, abs=1e-9)


def test_pairwise_ratings_rank_better_models_higher(corpus, tokenizer) -> None:
    from elasticmoe.evaluate import pairwise_ratings

    eos, V = tokenizer.eos_id, tokenizer.vocab_size
    examples = arena_examples(corpus, "test", max_per_task=6)
    seqs = []
    for _, prompt, cont in examples:
        p = tokenizer.encode(prompt)
        seqs.append([eos] + p + tokenizer.encode(prompt + cont)[len(p) :])
    models = {
        "oracle": Scripted(V, script(tokenizer, seqs), eos),
        "uniform": Scripted(V, None, 0),
        "wrong": Scripted(V, {}, digit_id(tokenizer, "9"), confidence=20.0),
    }
    out = pairwise_ratings(models, examples, tokenizer, n_boot=50)
    r = out["ratings"]
    assert r["oracle"]["rating"] > r["uniform"]["rating"] > r["wrong"]["rating"]
    assert r["oracle"]["ci"][0] > r["uniform"]["ci"][1]
    assert r["oracle"]["wins"] == 2 * len(examples) and r["oracle"]["losses"] == 0
    assert out["n_prompts"] == len(examples) == len(SHORT_TEXTS) + 6 * len(STRUCTURED_TASKS)


# -- lm-evaluation-harness adapter ---------------------------------------------------------------
def test_lm_eval_task_files_hold_the_test_split(corpus, tmp_path) -> None:
    written = write_lm_eval_tasks(corpus, tmp_path)
    assert set(written) == {f"elasticmoe_{t}" for t in ("text", "kv", "arith", "sort", "find")}
    group = yaml.safe_load((tmp_path / "elasticmoe.yaml").read_text())
    assert group == {"group": "elasticmoe", "task": list(written)}
    for name, path in written.items():
        task = name.removeprefix("elasticmoe_")
        config = yaml.safe_load(path.read_text())
        assert config["task"] == name and config["test_split"] == "test"
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        rows = [json.loads(line) for line in open(data_file, encoding="utf-8")]
        docs = corpus.docs["test"][task]
        if task == "text":
            assert config["output_type"] == "loglikelihood_rolling" and config["doc_to_target"] == "text"
            assert [r["text"] for r in rows] == docs
            assert {m["metric"] for m in config["metric_list"]} >= {"bits_per_byte"}
        else:
            assert config["output_type"] == "generate_until"
            assert config["doc_to_text"] == "context" and config["doc_to_target"] == "answer"
            assert [r["prompt"] + r["answer"] for r in rows] == docs
            assert all(r["context"] == EOS_TOKEN + r["prompt"] for r in rows)
            gen = config["generation_kwargs"]
            assert gen["until"] == ["\n", EOS_TOKEN] and gen["do_sample"] is False
            assert gen["max_gen_toks"] == answer_budget([r["answer"] for r in rows])
            assert config["metric_list"][0]["metric"] == "exact_match"
    few = write_lm_eval_tasks(corpus, tmp_path / "few", tasks=["kv"], max_examples=5)
    rows = (tmp_path / "few" / "elasticmoe_kv.jsonl").read_text().splitlines()
    assert list(few) == ["elasticmoe_kv"] and len(rows) == 5


def test_lm_eval_harness_reproduces_our_numbers(corpus, tokenizer, tmp_path) -> None:
    """Runs only where lm-eval is installed (it is not a dependency)."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from elasticmoe.hf import export_hf

    torch.manual_seed(0)
    model = ElasticMoE(replace(tiny_config(tokenizer.vocab_size), max_seq_len=128))
    tokenizer.save(tmp_path / "tok")
    export_hf(model, tmp_path / "hf", tokenizer_path=tmp_path / "tok" / "tokenizer.json")
    small = Corpus(
        {
            "test": {
                "text": SHORT_TEXTS + [LONG_TEXT],
                "kv": corpus.docs["test"]["kv"][:12],
                "sort": corpus.docs["test"]["sort"][:12],
            }
        }
    )
    write_lm_eval_tasks(small, tmp_path / "tasks")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'hf'},dtype=float32,add_bos_token=False",
        tasks=["elasticmoe"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    ours = evaluate(model, small, tokenizer)["tasks"]
    assert out["results"]["elasticmoe_text"]["bits_per_byte,none"] == pytest.approx(ours["text"]["score"], rel=1e-5)
    for task in ("kv", "sort"):
        samples = sorted(out["samples"][f"elasticmoe_{task}"], key=lambda s: s["doc_id"])
        prompts = [s["doc"]["prompt"] for s in samples]
        budget = answer_budget([s["doc"]["answer"] for s in samples])
        assert [s["filtered_resps"][0] for s in samples] == greedy_continuations(model, tokenizer, prompts, budget)
        assert out["results"][f"elasticmoe_{task}"]["exact_match,none"] == pytest.approx(ours[task]["score"])


def test_answer_loss_is_graded_where_exact_match_is_not(corpus, tokenizer) -> None:
    """The companion metric: ~0 for an oracle, exactly ln(V) for uniform logits, in between for a
    model right on half the examples, and lower-is-better so retention is parent / child."""
    V, eos = tokenizer.vocab_size, tokenizer.eos_id
    models = {
        "oracle": Scripted(V, answering(tokenizer, corpus, lambda i, a: a), eos),
        "half": Scripted(V, answering(tokenizer, corpus, lambda i, a: a if i % 2 == 0 else "1" + a), eos),
        "uniform": Scripted(V, None, eos),
    }
    res = {name: evaluate(m, corpus, tokenizer, tasks=["kv"], name=name)["tasks"] for name, m in models.items()}
    key = "kv/answer-loss"
    assert res["oracle"][key]["score"] < 1e-6
    assert res["uniform"][key]["score"] == pytest.approx(math.log(V), rel=1e-5)
    assert res["oracle"][key]["score"] < res["half"][key]["score"] < 60.0
    assert res["half"][key]["higher_is_better"] is False and res["half"][key]["metric"] == "answer_nats_per_token"
    assert res["half"][key]["ci"][0] <= res["half"][key]["score"] <= res["half"][key]["ci"][1]


def test_task_format_and_evaluator_agree_on_where_the_answer_ends(corpus, tokenizer) -> None:
    """Training sees `prompt + answer + EOS`; evaluation feeds [EOS] + prompt and stops at EOS or a
    newline. So for every task: the prompt's tokens are a prefix of the example's, the answer holds
    no EOS or newline, and the generation budget leaves room for the answer and its EOS."""
    from elasticmoe.tokens import tokenize_docs

    for task in STRUCTURED_TASKS:
        examples = corpus.docs["test"][task]
        budget = answer_budget([split_prompt_answer(task, e)[1] for e in examples])
        trained = tokenize_docs(tokenizer, examples).tolist()
        pos = 0
        for example in examples:
            prompt, answer = split_prompt_answer(task, example)
            p, a = tokenizer.encode(prompt), tokenizer.encode(answer)
            assert trained[pos : pos + len(p) + len(a) + 1] == p + a + [tokenizer.eos_id]
            pos += len(p) + len(a) + 1
            assert "\n" not in answer and EOS_TOKEN not in answer and answer[:1].isdigit()
            assert len(a) + 1 <= budget
