"""Invariants of elasticmoe.data: determinism, no leakage, correct answers, exact resume."""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from elasticmoe.config import ConfigError
from elasticmoe.data import (
    SEPARATORS,
    SPLITS,
    STRUCTURED_TASKS,
    Corpus,
    TaskSpec,
    _rng,
    build_default_corpus,
    build_structured,
    corpus_from_texts,
    example_bucket,
    example_level,
    generate_examples,
    hash_split,
    level_space,
    load_user_texts,
    split_prompt_answer,
    task_spec_from,
)
from elasticmoe.tokens import (
    BatchIterator,
    StratifiedBatches,
    TokenShards,
    aligned_starts,
    eval_windows,
    mix_tasks,
    tokenize_docs,
    write_token_shard,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return build_default_corpus(seed=0, scale=0.05)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded(corpus: Corpus) -> None:
    again = build_default_corpus(seed=0, scale=0.05)
    assert again.docs == corpus.docs
    other = build_default_corpus(seed=1, scale=0.05, tasks=STRUCTURED_TASKS)
    for split in SPLITS:
        for task in STRUCTURED_TASKS:
            assert other.docs[split][task] != corpus.docs[split][task]
    assert set(corpus.tasks) == {"text", "kv", "arith", "sort", "find"}


def test_corpus_sizes_follow_scale(corpus: Corpus) -> None:
    counts = TaskSpec().counts(0.05)
    for split in SPLITS:
        for task in STRUCTURED_TASKS:
            n = counts[task][split]
            if split == "train":  # exact duplicates of held-out examples are dropped: a few at most
                assert 0.95 * n <= len(corpus.docs[split][task]) <= n
            else:  # every level held out on its own, at its count
                levels = Counter(example_level(task, e) for e in corpus.docs[split][task])
                assert levels == n and min(n.values()) > 0, (task, split)
    text = {split: corpus.docs[split]["text"] for split in SPLITS}
    assert sum(map(len, text["train"])) > 500_000  # pydoc topics alone are ~465k characters
    assert all(len(text[s]) >= 20 for s in ("val", "search", "test"))
    assert max(len(d) for d in text["train"]) <= 3000


SMALL_SPACE = TaskSpec(arith_levels=(1,), sort_levels=(1, 3), kv_levels=(1,), kv_value_digits=(1, 1), find_levels=(1,))


@pytest.mark.parametrize("spec", [TaskSpec(), SMALL_SPACE])
def test_no_leakage_between_splits(spec: TaskSpec) -> None:
    # The second spec has tiny task spaces, so collisions are frequent and exclusion must act.
    corpus = build_structured(seed=3, scale=0.05, spec=spec)
    for task in STRUCTURED_TASKS:
        sets = {split: set(corpus.docs[split][task]) for split in SPLITS}
        for split in ("val", "search", "test"):
            assert len(sets[split]) == len(corpus.docs[split][task])  # held-out: distinct within a split
        for a, b in itertools.combinations(SPLITS, 2):
            assert not sets[a] & sets[b], (task, a, b)
    # train is a stream of draws: in a small space it repeats examples (the old distinct-only
    # train set could not, which starved the small buckets)
    assert len(set(corpus.docs["train"]["arith"])) < len(corpus.docs["train"]["arith"]) or spec == TaskSpec()


def _chi2_two_sample(a: list[str], b: list[str]) -> tuple[float, int]:
    """Pearson's chi-square of a 2 x k table of bucket counts (a vs b) and its degrees of freedom.
    Buckets expected to get fewer than 5 items of either sample are pooled (the test's usual rule)."""
    ca, cb = Counter(a), Counter(b)
    total = ca + cb
    small = min(len(a), len(b)) / (len(a) + len(b))
    common = sorted(k for k, n in total.items() if n * small >= 5)
    rare = [k for k in total if k not in common]
    rows = [[c[k] for k in common] + ([sum(c[k] for k in rare)] if rare else []) for c in (ca, cb)]
    counts = np.array(rows, dtype=float)
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    return float(((counts - expected) ** 2 / expected).sum()), counts.shape[1] - 1


# upper 0.1% points of chi-square(df), from standard tables
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877}


def test_train_and_test_share_one_distribution() -> None:
    """Per task and level, a feature of the examples (arith operand digits and operator, the smallest
    number of a sort, the leading answer digit of kv and find) has one distribution in train and
    test, by a chi-square test at the 0.1% level; train's level mix follows level_weights."""
    spec = TaskSpec(level_weights=(1, 2, 3, 4))
    corpus = build_structured(seed=0, scale=1.0, spec=spec)
    for task in STRUCTURED_TASKS:
        levels = spec.levels(task)
        train = Counter(example_level(task, e) for e in corpus.docs["train"][task])
        for level, weight in zip(levels, spec.level_weights):
            expected = weight / 10 * spec.counts(1.0)[task]["train"]
            held = sum(spec.counts(1.0)[task][s][level] for s in ("val", "search", "test"))
            expected *= 1 - held / level_space(task, level, spec)  # held-out duplicates dropped
            assert abs(train[level] - expected) < 4 * expected**0.5 + 1, (task, level, train[level], expected)
        for level in levels:
            tr = [example_bucket(task, e) for e in corpus.docs["train"][task] if example_level(task, e) == level]
            te = [example_bucket(task, e) for e in corpus.docs["test"][task] if example_level(task, e) == level]
            stat, df = _chi2_two_sample(tr, te)
            assert df >= 1 and stat < CHI2_999[df], (task, level, stat, df)


def test_levels_are_held_out_apart_and_parse_back() -> None:
    """Each level's held-out examples are distinct and at that level (read back from the text), the
    held-out splits share no example, and a level with a small space gives at most half of it to
    the held-out splits (arith with 1 digit: 155 possible examples)."""
    spec = TaskSpec()
    corpus = build_structured(seed=1, scale=1.0, spec=spec)
    for task in STRUCTURED_TASKS:
        for level in spec.levels(task):
            held = [
                e for s in ("val", "search", "test") for e in corpus.docs[s][task] if example_level(task, e) == level
            ]
            assert len(held) == len(set(held)) <= level_space(task, level, spec) // 2
            assert len(held) == sum(spec.counts(1.0)[task][s][level] for s in ("val", "search", "test")) > 0
    assert level_space("arith", 1, spec) == 100 + 55
    assert level_space("sort", 3, TaskSpec(sort_value_max=9)) == 1000 and level_space("sort", 3, spec) == 4**3
    small = spec.counts(1.0)["arith"]
    assert small["test"][1] < small["test"][2] == 100


def test_old_split_scheme_fails_the_distribution_check() -> None:
    """The scheme this replaced (held-out drawn first, then a distinct-only train set excluding it)
    starves train of the small buckets: sort of length 3 (1000 possible lists) and test disagree."""
    spec = TaskSpec(sort_levels=(3, 4, 5, 6, 7, 8), sort_value_max=9, held_out=(20, 20, 60))
    new = build_structured(seed=0, scale=1.0, spec=spec)
    held = {e for split in ("val", "search", "test") for e in new.docs[split]["sort"]}
    old_train = generate_examples("sort", len(new.docs["train"]["sort"]), _rng(0, "sort", "train"), held, spec)
    test = [str(example_level("sort", e)) for e in new.docs["test"]["sort"]]
    stat, df = _chi2_two_sample([str(example_level("sort", e)) for e in old_train], test)
    assert stat > CHI2_999[df], stat
    stat, df = _chi2_two_sample([str(example_level("sort", e)) for e in new.docs["train"]["sort"]], test)
    assert stat < CHI2_999[df], stat


def test_text_split_is_content_hash(corpus: Corpus) -> None:
    seen: set[str] = set()
    for split in SPLITS:
        for doc in corpus.docs[split]["text"]:
            assert hash_split(doc) == split
            assert doc not in seen
            seen.add(doc)


def _solve(task: str, prompt: str) -> str:
    body = prompt[len(task) + 2 :]
    if task == "kv":
        context, *asked = body.split(" ? ")
        values = dict(p.split("=") for p in context.split())
        assert sorted(q.split("=")[0] for q in asked) == sorted(values)  # every key queried once
        assert all(values[k] == v for k, v in (q.split("=") for q in asked[:-1]))
        return values[asked[-1][:-1]]
    if task == "arith":  # fixed width: d-digit operands, (d+1)-digit answers least-significant digit first
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+) = ", body).groups()
        assert len(a) == len(b)
        return str(int(a) + int(b) if op == "+" else int(a) - int(b)).zfill(len(a) + 1)[::-1]
    if task == "find":
        records, *asked = body.split(" ? ")
        query = asked[-1][: -len(" -> ")]
        rows = [r.split() for r in records.split("; ")]
        assert len({r[0] for r in rows}) == len(rows)  # ids are unique: one record matches
        return next(value for rid, _, value in rows if rid == query)
    values = re.fullmatch(r"([\d ]+) -> ", body).group(1).split()
    return " ".join(str(v) for v in sorted(int(v) for v in values))


def test_every_structured_example_parses_and_is_correct(corpus: Corpus) -> None:
    for split in SPLITS:
        for task in STRUCTURED_TASKS:
            for example in corpus.docs[split][task]:
                prompt, answer = split_prompt_answer(task, example)
                assert prompt + answer == example and "\n" not in example
                assert prompt.endswith(SEPARATORS[task]) and answer[:1].isdigit()
                assert answer == _solve(task, prompt), example


def test_split_prompt_answer_convention_and_errors() -> None:
    assert split_prompt_answer("arith", "arith: 482+039 = 1250\n") == ("arith: 482+039 = ", "1250")
    assert split_prompt_answer("kv", "kv: q=382 a=907 ? a=907") == ("kv: q=382 a=907 ? a=", "907")
    assert split_prompt_answer("find", "find: 417 k 52; 803 b 96 ? 803 -> 96") == (
        "find: 417 k 52; 803 b 96 ? 803 -> ",
        "96",
    )
    with pytest.raises(ConfigError):
        split_prompt_answer("arith", "sort: 1 2 -> 1 2")
    with pytest.raises(ConfigError):
        split_prompt_answer("text", "hello")


def test_task_spec_validation() -> None:
    with pytest.raises(ConfigError) as err:
        TaskSpec(kv_levels=(3, 1), arith_ops="*")
    assert "kv_levels" in str(err.value) and "arith_ops" in str(err.value)
    with pytest.raises(ConfigError, match="one weight per level"):
        TaskSpec(level_weights=(1, 2))
    assert TaskSpec(train=[1, 2, 3, 4]).train == (1, 2, 3, 4)
    with pytest.raises(ConfigError, match="train needs 4"):
        TaskSpec(train=[1, 2, 3])
    with pytest.raises(ConfigError, match=r"kv_levels=\[4, 30\] must be increasing integers in \[1, 26\]"):
        TaskSpec(kv_levels=(4, 30))
    with pytest.raises(ConfigError):
        build_default_corpus(tasks=("text", "poetry"))


def test_corpus_save_load_round_trip(tmp_path, corpus: Corpus) -> None:
    small = Corpus(
        {"train": {"kv": corpus.docs["train"]["kv"][:5], "text": ["a\u2028b\nc", "é 🙂"]}, "test": {"kv": []}}
    )
    small.save(tmp_path / "c")
    line = (tmp_path / "c" / "train" / "text.jsonl").read_text(encoding="utf-8").split("\n")[1]
    assert json.loads(line) == {"text": "é 🙂"}  # readable, not \u-escaped
    assert Corpus.load(tmp_path / "c").docs == small.docs
    path = tmp_path / "c" / "train" / "kv.jsonl"
    path.write_text(path.read_text().replace("kv:", "kv :", 1))
    with pytest.raises(ConfigError, match="checksum"):
        Corpus.load(tmp_path / "c")
    with pytest.raises(ConfigError):
        Corpus.load(tmp_path / "nothing")


# ----------------------------------------------------------------------------- user data


def test_user_text_glob_and_modes(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond one")
    (tmp_path / "b.md").write_text("# title\n")
    (tmp_path / "skip.csv").write_text("x,y")
    assert load_user_texts([str(tmp_path / "*.txt")], doc_mode="file") == ["first paragraph\n\nsecond one"]
    docs = load_user_texts([str(tmp_path / "*.txt"), tmp_path / "b.md"], doc_mode="paragraphs")
    assert docs == ["first paragraph\n\nsecond one", "# title"]  # short paragraphs merge up to ~400 chars
    assert load_user_texts([tmp_path]) == docs  # a folder: its text files, sorted, csv skipped
    long = "\n\n".join(f"paragraph {i}" + " word" * 100 for i in range(10))
    (tmp_path / "long.txt").write_text(long)
    chunks = load_user_texts([tmp_path / "long.txt"])
    assert len(chunks) > 1 and "\n\n".join(chunks) == long.strip()


def test_user_jsonl_and_errors(tmp_path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"body": "one"}\n\n{"body": "two", "id": 2}\n')
    assert load_user_texts([good], text_field="body") == ["one", "two"]
    with pytest.raises(ConfigError, match=r"good.jsonl:1: no string field 'text'"):
        load_user_texts([good])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: invalid JSON"):
        load_user_texts([bad])
    with pytest.raises(ConfigError, match="does not exist"):
        load_user_texts([tmp_path / "missing.txt"])
    with pytest.raises(ConfigError, match="matches no file"):
        load_user_texts([str(tmp_path / "*.nothing")])
    (tmp_path / "empty.txt").write_text("  \n\n \n")
    with pytest.raises(ConfigError, match="no non-empty document"):
        load_user_texts([tmp_path / "empty.txt"])


def test_user_hf_dataset_folder_needs_datasets(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed (lm-eval pulls it in CI)
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_user_texts([folder])


def test_user_texts_become_hash_split_text_task() -> None:
    texts = [f"document number {i}" for i in range(400)] + ["document number 0"]
    corpus = corpus_from_texts(texts)
    assert corpus_from_texts(reversed(texts)).docs.keys() == corpus.docs.keys()
    flat = [d for s in SPLITS for d in corpus.docs[s]["text"]]
    assert sorted(flat) == sorted(set(texts))  # exact duplicate dropped, nothing lost
    assert all(len(corpus.docs[s]["text"]) > 0 for s in SPLITS)
    merged = build_default_corpus(scale=0.01, tasks=("kv",)).merged(corpus)
    assert set(merged.tasks) == {"text", "kv"}


# ----------------------------------------------------------------------------- tokens


class CharTokenizer:
    """Bytes as ids, EOS = 256: enough to test packing without training a tokenizer."""

    vocab_size = 257
    eos_id = 256

    def encode_batch(self, texts):
        return [list(t.encode()) for t in texts]


def test_tokenize_docs_appends_eos() -> None:
    tokens = tokenize_docs(CharTokenizer(), ["ab", "", "c"])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [97, 98, 256, 256, 99, 256]
    assert tokenize_docs(CharTokenizer(), ["a"], dtype="uint32").dtype == np.uint32


def test_mix_tasks_weights() -> None:
    tok = CharTokenizer()
    arrays = {"text": tokenize_docs(tok, ["x" * 9] * 100), "kv": tokenize_docs(tok, [f"k{i}" for i in range(50)])}
    natural = mix_tasks(arrays, eos_id=256, seed=1)
    assert sorted(natural.tolist()) == sorted(np.concatenate(list(arrays.values())).tolist())
    assert np.array_equal(natural, mix_tasks(arrays, eos_id=256, seed=1))
    mixed = mix_tasks(arrays, {"text": 1.0, "kv": 1.0}, eos_id=256, seed=1, total_tokens=4000)
    docs = bytes(mixed.astype(np.uint8)).split(b"\x00")  # EOS 256 wraps to 0 as a byte
    kv_tokens = sum(len(d) + 1 for d in docs if d.startswith(b"k"))
    assert abs(kv_tokens / len(mixed) - 0.5) < 0.02  # up-sampled from ~11% to ~50%
    assert mixed[-1] == 256
    with pytest.raises(ConfigError, match="no such task"):
        mix_tasks(arrays, {"code": 1.0}, eos_id=256)
    with pytest.raises(ConfigError, match="positive weight"):
        mix_tasks(arrays, {"text": 0.0}, eos_id=256)


def test_token_shards_round_trip_and_rejections(tmp_path) -> None:
    a = np.arange(1000, dtype=np.uint16)
    b = (np.arange(300, dtype=np.uint32) * 1000) % 70000
    write_token_shard(tmp_path / "s0.bin", a)
    write_token_shard(tmp_path / "s1.bin", b.astype(np.uint32))
    shards = TokenShards(str(tmp_path / "s*.bin"))
    assert [arr.dtype.itemsize for arr in shards.arrays] == [2, 4] and len(shards) == 1300
    assert np.array_equal(shards.arrays[0], a) and np.array_equal(shards.arrays[1], b)
    with pytest.raises(ConfigError, match="token id 69000 >= vocab_size"):
        TokenShards([tmp_path / "s1.bin"], vocab_size=69000)
    with pytest.raises(ConfigError, match="sidecar"):
        TokenShards([tmp_path / "s0.bin"], dtype="uint32")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(ConfigError, match="multiple of 2"):
        TokenShards([tmp_path / "odd.bin"])
    (tmp_path / "six.bin").write_bytes(b"\x00" * 6)
    with pytest.raises(ConfigError, match="multiple of 4"):
        TokenShards([tmp_path / "six.bin"], dtype="uint32")
    with pytest.raises(ConfigError, match="does not exist"):
        TokenShards([tmp_path / "none.bin"])
    # windows never straddle two shards: every window is consecutive ids of one shard
    rows = eval_windows(TokenShards([tmp_path / "s0.bin", tmp_path / "s0.bin"]), seq_len=100)
    assert rows.shape == (18, 101) and bool((rows.diff(dim=1) == 1).all())


# ----------------------------------------------------------------------------- batches

TOKENS = np.arange(5000, dtype=np.uint32)  # a token's value is its position: windows are readable


def _take(iterator: BatchIterator, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(iterator) for _ in range(n)]


def test_batches_shape_and_shift() -> None:
    inputs, targets = next(BatchIterator(TOKENS, seq_len=16, batch_size=4, seed=0))
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and bool((targets - inputs == 1).all())
    assert bool((inputs[:, 0] % 16 == 0).all())  # windows start on the seq_len grid
    assert targets.is_contiguous()


def test_resume_gives_the_same_batches_across_epochs() -> None:
    reference = BatchIterator(TOKENS, seq_len=64, batch_size=5, seed=7)  # 78 windows: 15 steps/epoch
    assert reference.steps_per_epoch == 15
    expected = _take(reference, 40)
    first = BatchIterator(TOKENS, seq_len=64, batch_size=5, seed=7)
    _take(first, 13)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchIterator(TOKENS, seq_len=64, batch_size=5, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(_take(resumed, 27), expected[13:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    epoch0 = torch.cat([x[:, 0] for x, _ in expected[:15]])
    assert len(set(epoch0.tolist())) == 75  # no window twice within an epoch
    assert not torch.equal(epoch0, torch.cat([x[:, 0] for x, _ in expected[15:30]]))  # reshuffled


def test_rank_shards_partition_the_global_batch() -> None:
    for world in (2, 3):
        single = BatchIterator(TOKENS, seq_len=32, batch_size=2 * world, seed=5)
        ranks = [
            BatchIterator(TOKENS, seq_len=32, batch_size=2, seed=5, rank=r, world_size=world) for r in range(world)
        ]
        for _ in range(30):  # crosses an epoch boundary
            x_all, y_all = next(single)
            parts = [next(it) for it in ranks]
            starts = [set(x[:, 0].tolist()) for x, _ in parts]
            assert all(not (a & b) for a, b in itertools.combinations(starts, 2))
            assert torch.equal(torch.cat([x for x, _ in parts]), x_all)
            assert torch.equal(torch.cat([y for _, y in parts]), y_all)


def test_batch_errors() -> None:
    with pytest.raises(ConfigError, match="no window"):
        BatchIterator(np.arange(10, dtype=np.uint16), seq_len=16, batch_size=1, seed=0)
    with pytest.raises(ConfigError, match="global batch"):
        BatchIterator(np.arange(100, dtype=np.uint16), seq_len=16, batch_size=4, seed=0, world_size=2)
    it = BatchIterator(TOKENS, seq_len=16, batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        it.load_state_dict({"epoch": 0, "position": 0, "seed": 1})
    with pytest.raises(ConfigError, match="windows"):
        it.load_state_dict(BatchIterator(TOKENS[:1000], seq_len=16, batch_size=4, seed=0).state_dict())


def test_eval_windows() -> None:
    rows = eval_windows(TOKENS, seq_len=100)
    assert rows.shape == (49, 101) and rows.dtype == torch.long
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # share one boundary token: targets are disjoint
    few = eval_windows(TOKENS, seq_len=100, max_windows=5)
    assert torch.equal(few, eval_windows(TOKENS, seq_len=100, max_windows=5))
    assert few.shape[0] == 5 and few[0, 0] == 0 and few[-1, 0] == 4800  # spread over the data


# ----------------------------------------------------------------------------- stratified batches

EOS = 0


def _task_arrays() -> dict[str, np.ndarray]:
    """Three tasks of EOS-separated documents whose ids tell the task (hundreds digit) and the
    document (its length varies); EOS is 0."""
    rng = np.random.default_rng(0)
    out = {}
    for base, task, n_docs in ((100, "text", 300), (200, "kv", 200), (300, "sort", 150)):
        docs = [
            np.append(np.full(int(rng.integers(3, 12)), base + i % 90, dtype=np.uint16), EOS) for i in range(n_docs)
        ]
        out[task] = np.concatenate(docs)
    return out


def _task_of(row: torch.Tensor) -> str:
    ids = {int(v) // 100 for v in row.tolist() if v != EOS}
    assert len(ids) == 1, ids  # a row never mixes tasks
    return {1: "text", 2: "kv", 3: "sort"}[ids.pop()]


def test_aligned_windows_start_at_eos_and_hold_whole_documents() -> None:
    stream = np.array([EOS, 5, 5, EOS, 6, 6, 6, 6, EOS, 7, EOS, 8, 8, 8, 8, 8, 8, 8, 8, 8, EOS, 9, EOS], np.uint16)
    starts = aligned_starts(stream, EOS, seq_len=6).tolist()
    # [0..6] ends inside "6 6 6 6": next starts at the EOS of "5 5"; [3..9] holds "6 6 6 6" whole;
    # the 9-token document is cut at stride 6 (from 10, then 16)
    assert starts == [0, 3, 8, 10, 16]
    for s in starts[:3]:
        assert stream[s] == EOS


def test_stratified_batches_have_the_same_mix_every_step() -> None:
    it = StratifiedBatches(
        _task_arrays(), {"text": 2, "kv": 1, "sort": 1}, seq_len=16, batch_size=8, seed=1, eos_id=EOS
    )
    assert it.rows_at(0) == {"text": 4, "kv": 2, "sort": 2}
    for _ in range(60):  # several epochs of the small tasks
        x, y = next(it)
        assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
        assert [_task_of(r) for r in x] == ["text"] * 4 + ["kv"] * 2 + ["sort"] * 2
        assert bool((x[:, 0] == EOS).all())  # every window starts at a document boundary (short documents)
    # shares that are not whole rows: the whole part every step, one more row on a share of the steps
    it = StratifiedBatches(_task_arrays(), {"text": 0.5, "kv": 0.3, "sort": 0.2}, 16, 4, seed=2, eos_id=EOS)
    rows = [it.rows_at(step) for step in range(2000)]
    assert all(sum(r.values()) == 4 for r in rows)
    assert all(r["text"] == 2 and r["kv"] in (1, 2) and r["sort"] in (0, 1) for r in rows)
    for task, share in (("kv", 0.3), ("sort", 0.2)):
        assert abs(np.mean([r[task] for r in rows]) / 4 - share) < 0.01
    # weights None: shares of the tokens
    natural = StratifiedBatches(_task_arrays(), None, 16, 64, seed=0, eos_id=EOS)
    sizes = {t: len(a) for t, a in _task_arrays().items()}
    for task, n in natural.rows_at(0).items():
        assert abs(n - 64 * sizes[task] / sum(sizes.values())) <= 1


def test_stratified_resume_is_exact_across_epochs() -> None:
    make = lambda: StratifiedBatches(_task_arrays(), {"text": 0.5, "kv": 0.3, "sort": 0.2}, 32, 5, 7, eos_id=EOS)  # noqa: E731
    expected = [next(it) for it in [make()] for _ in range(80)]
    first = make()
    for _ in range(33):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["step"] == 33 and set(state["tasks"]) == {"text", "kv", "sort"}
    resumed = make()
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([next(resumed) for _ in range(47)], expected[33:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert max(st["epoch"] for st in resumed.state_dict()["tasks"].values()) >= 1  # crossed an epoch


def test_stratified_ranks_partition_the_global_batch() -> None:
    arrays = _task_arrays()
    for world, weights in ((2, {"text": 2, "kv": 1, "sort": 1}), (3, {"text": 0.5, "kv": 0.3, "sort": 0.2})):
        single = StratifiedBatches(arrays, weights, 16, 4 * world, seed=5, eos_id=EOS)
        ranks = [StratifiedBatches(arrays, weights, 16, 4, 5, r, world, eos_id=EOS) for r in range(world)]
        for _ in range(40):  # crosses epoch boundaries
            x_all, y_all = next(single)
            parts = [next(it) for it in ranks]
            assert torch.equal(torch.cat([x for x, _ in parts]), x_all)
            assert torch.equal(torch.cat([y for _, y in parts]), y_all)


def test_stratified_errors() -> None:
    arrays = _task_arrays()
    with pytest.raises(ConfigError, match="no such task"):
        StratifiedBatches(arrays, {"code": 1.0}, 16, 4, 0, eos_id=EOS)
    with pytest.raises(ConfigError, match="positive weight"):
        StratifiedBatches(arrays, {"text": 0.0}, 16, 4, 0, eos_id=EOS)
    with pytest.raises(ConfigError, match="too small"):
        StratifiedBatches({"text": arrays["text"][:40]}, None, 16, 8, 0, eos_id=EOS)
    it = StratifiedBatches(arrays, {"text": 1, "kv": 1}, 16, 4, 0, eos_id=EOS)
    with pytest.raises(ConfigError, match="seed"):
        it.load_state_dict({**it.state_dict(), "seed": 1})
    with pytest.raises(ConfigError, match="tasks"):
        it.load_state_dict(StratifiedBatches(arrays, {"text": 1}, 16, 4, 0, eos_id=EOS).state_dict())
    with pytest.raises(ConfigError, match="windows"):
        small = {"text": arrays["text"][:600], "kv": arrays["kv"]}
        it.load_state_dict(StratifiedBatches(small, {"text": 1, "kv": 1}, 16, 4, 0, eos_id=EOS).state_dict())
    with pytest.raises(ConfigError):  # an old single-stream state
        it.load_state_dict({"epoch": 0, "position": 0, "seed": 0, "windows": 10})


def test_recipe_task_spec_knob() -> None:
    """data.task_spec changes the TaskSpec the embedded corpus is built with (levels, the training
    mix over levels); a bad field is named at load time, and the prepared data's identity changes."""
    from elasticmoe.recipe import load_recipe
    from elasticmoe.rundata import _data_identity

    with pytest.raises(ConfigError, match="data.task_spec: .*level_weights"):  # the other tasks have 4 levels
        load_recipe("micro", ["data.task_spec.kv_levels=[1,2]", "data.task_spec.level_weights=[3,1]"])
    recipe = load_recipe("micro", ["data.task_spec.level_weights=[4,3,2,1]"])
    assert task_spec_from(recipe.data.task_spec).level_weights == (4, 3, 2, 1)
    assert _data_identity(recipe) != _data_identity(load_recipe("micro"))
    with pytest.raises(ConfigError, match="data.task_spec: unknown field"):
        load_recipe("micro", ["data.task_spec.kv_pairs=[1,2]"])
    with pytest.raises(ConfigError, match="data.task_spec: .*sort_levels"):
        load_recipe("micro", ["data.task_spec.sort_levels=[5,3]"])
