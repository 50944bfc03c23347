"""Byte-level BPE: exact round trips, determinism, and parity with transformers' loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elasticmoe.config import ConfigError
from elasticmoe.data import STRUCTURED_TASKS, build_default_corpus, split_prompt_answer
from elasticmoe.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, load_tokenizer, train_tokenizer

SAMPLES = [
    "",
    "plain ascii, with punctuation: (a, b) -> c!",
    "line one\nline two\r\n\n\ttabbed  double  spaced   \n",
    "Grüße, naïve café — 日本語のテキスト, emoji 🙂👩‍👩‍👧, zero\u200bwidth, rtl עברית",
    f"document one{EOS_TOKEN}document two",
    "arith: 482+39 = 521",
    "   leading and trailing spaces   ",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    corpus = build_default_corpus(seed=0, scale=0.05, text_fraction=0.3)
    return list(corpus.texts("train"))


@pytest.fixture(scope="module")
def trained(texts: list[str], tmp_path_factory) -> tuple[Tokenizer, Path]:
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(texts, vocab_size=512, out_path=folder), folder


def test_round_trip_is_exact(trained) -> None:
    tokenizer, _ = trained
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(SAMPLES) == [tokenizer.encode(t) for t in SAMPLES]
    assert tokenizer.decode_batch([tokenizer.encode(t) for t in SAMPLES]) == SAMPLES
    assert tokenizer.encode(EOS_TOKEN) == [tokenizer.eos_id]
    assert tokenizer.decode(tokenizer.encode(SAMPLES[4]), skip_special_tokens=True) == "document onedocument two"


def test_vocab_size_and_digits(trained, texts: list[str]) -> None:
    tokenizer, _ = trained
    assert tokenizer.vocab_size == 512  # enough data: the budget is used exactly
    assert tokenizer.id_to_token(tokenizer.eos_id) == EOS_TOKEN and tokenizer.bos_id == tokenizer.eos_id
    assert tokenizer.id_to_token(tokenizer.pad_id) == PAD_TOKEN and tokenizer.pad_id != tokenizer.eos_id
    assert tokenizer.encode(PAD_TOKEN) == [tokenizer.pad_id]
    assert max(i for t in SAMPLES for i in tokenizer.encode(t)) < 512
    digits = [tokenizer.id_to_token(i) for i in tokenizer.encode("x 12345")]
    assert digits[-5:] == ["1", "2", "3", "4", "5"]  # one token per digit
    small = train_tokenizer(["tiny corpus"] * 3, vocab_size=1000)
    assert 258 <= small.vocab_size < 1000  # data runs out before the budget: fewer ids, never more
    for bad in (100, 257, "512"):
        with pytest.raises(ConfigError, match="vocab_size"):
            train_tokenizer(texts[:10], vocab_size=bad)
    with pytest.raises(ConfigError, match="empty corpus"):
        train_tokenizer([], vocab_size=300)


def test_training_is_deterministic(trained, texts: list[str], tmp_path) -> None:
    tokenizer, folder = trained
    again = train_tokenizer(texts, vocab_size=512, out_path=tmp_path / "tokenizer.json")
    assert (tmp_path / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert again.encode(SAMPLES[3]) == tokenizer.encode(SAMPLES[3])


def test_structured_prompt_tokens_are_a_prefix(trained) -> None:
    # Evaluation feeds encode(prompt) and compares what follows: that must be how training saw it.
    tokenizer, _ = trained
    corpus = build_default_corpus(seed=2, scale=0.01, tasks=STRUCTURED_TASKS)
    for task in STRUCTURED_TASKS:
        for example in corpus.docs["test"][task]:
            prompt, answer = split_prompt_answer(task, example)
            assert tokenizer.encode(prompt) + tokenizer.encode(answer) == tokenizer.encode(example)


def test_load_tokenizer(trained, tmp_path) -> None:
    tokenizer, folder = trained
    for path in (folder, folder / "tokenizer.json", str(folder)):
        loaded = load_tokenizer(path)
        assert loaded.to_str() == tokenizer.to_str() and loaded.eos_id == tokenizer.eos_id
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "broken.json")
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = []
    (tmp_path / "no_eos.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="endoftext"):
        load_tokenizer(tmp_path / "no_eos.json")


def test_transformers_loads_the_folder_identically(trained, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    tokenizer, folder = trained
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    for hf in (
        transformers.AutoTokenizer.from_pretrained(folder),
        transformers.PreTrainedTokenizerFast.from_pretrained(folder),
    ):
        assert hf.eos_token_id == hf.bos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id
        assert len(hf) == tokenizer.vocab_size
        for text in SAMPLES:
            ids = tokenizer.encode(text)
            assert hf(text)["input_ids"] == ids  # no BOS/EOS added by default
            assert hf.encode(text, add_special_tokens=False) == ids
            assert hf.decode(ids) == text  # no clean-up of spaces
        batch = hf(SAMPLES[1:3], padding=True)["input_ids"]
        assert batch[0][: len(tokenizer.encode(SAMPLES[1]))] == tokenizer.encode(SAMPLES[1])


def test_export_prepends_bos_and_states_the_context(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    tokenizer, _ = trained
    tokenizer.export(tmp_path, model_max_length=256)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.model_max_length == 256
    assert hf.pad_token == PAD_TOKEN and hf.pad_token_id == tokenizer.pad_id
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == [tokenizer.eos_id, *ids]  # the prompt convention
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text.replace(EOS_TOKEN, "")
    assert load_tokenizer(tmp_path).encode(SAMPLES[3]) == tokenizer.encode(SAMPLES[3])  # encode adds nothing
    padded = hf(["a", "a longer text"], padding=True)
    masked = [i for i, m in zip(padded["input_ids"][0], padded["attention_mask"][0]) if m == 0]
    assert masked and set(masked) == {tokenizer.pad_id}


def test_tokenizer_without_pad_token_pads_with_eos(trained, tmp_path) -> None:
    tokenizer, _ = trained
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != PAD_TOKEN]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = load_tokenizer(tmp_path / "old.json")
    assert old.pad_id == old.eos_id and old.pad_token == EOS_TOKEN
