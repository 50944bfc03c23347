"""Byte-level BPE tokenizer: training, loading, and a folder that transformers loads as is.

Why byte-level BPE: every string (any unicode, any whitespace) maps to tokens and back exactly,
so a model trained here can be evaluated by exact match on generated text and exported to
transformers without a lossy conversion. Special tokens: `<|endoftext|>` ends every document
(EOS) and, since the token before any document in training is the previous one's EOS, also
serves as BOS (the prompt convention, `PROMPT_CONVENTION`); `<|pad|>` pads batches and never
occurs in the data, so a pad can never be mistaken for a BOS/EOS (an attention mask inferred from
pad positions stays right). Tokenizers trained before `<|pad|>` existed load as they are and pad
with `<|endoftext|>`.

Digits are split one per pre-token (as LLaMA does) before the GPT-2 byte-level regex. This keeps
numbers as digit sequences, which makes the arithmetic / sorting / retrieval tasks learnable by
a small model, and makes the tokens of a structured prompt ending in a space followed by a
numeric answer a prefix of the tokens of prompt + answer (evaluation relies on that).

The folder written by `Tokenizer.save` holds:

    tokenizer.json            the `tokenizers` serialisation (the only file we read back)
    tokenizer_config.json     tokenizer_class PreTrainedTokenizerFast, eos/bos/pad tokens, no
                              clean-up of spaces, so transformers decodes exactly like we do
    special_tokens_map.json   eos/bos/pad/unk

`Tokenizer.export` writes the same files for a model export, with the model's context as
`model_max_length` and a post-processor that puts `<|endoftext|>` first whenever special tokens
are added (transformers' default, so `tokenizer(text)` and `pipeline(...)` feed the model what
`elasticmoe eval` feeds it); `encode` here never adds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from .config import ConfigError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"
MIN_VOCAB_SIZE = 258  # 256 byte symbols + EOS + PAD
MAX_VOCAB_SIZE = 2**32 - 1  # token ids must fit the uint32 shards of elasticmoe.data


PROMPT_CONVENTION = (
    "Every sequence starts with `<|endoftext|>`, which serves as BOS: the model was trained on documents "
    "separated by `<|endoftext|>` (EOS), so the token before a document is always that one. "
    "`elasticmoe eval` feeds `[<|endoftext|>] + tokens(prompt)`; the exported tokenizer adds it by itself "
    "whenever special tokens are added (`tokenizer(text)`, `pipeline(...)`: transformers' default), and so "
    "does llama.cpp (`add_bos_token = true` in the GGUF), so a stock `pipeline` answers as `elasticmoe eval` "
    "does. lm-evaluation-harness: pass `add_bos_token=False` in `--model_args` (0.4.13 otherwise takes the "
    "tokenizer's default and scores the added `<|endoftext|>` of every text document as text); the task "
    "files of `elasticmoe lm-eval-tasks` write `<|endoftext|>` at the start of each context and the harness "
    "puts it before each text document itself. Generation ends at `<|endoftext|>`; `<|pad|>` (its own id) "
    "pads batches."
)


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the few calls the toolkit needs.

    `encode` never adds special tokens: documents get their EOS from `elasticmoe.data`, and
    prompts get whatever the evaluator prepends. `decode` keeps special tokens by default, so
    `decode(encode(s)) == s` holds even for text that contains `<|endoftext|>` literally.
    """

    def __init__(self, backend: _HFTokenizer) -> None:
        eos_id = backend.token_to_id(EOS_TOKEN)
        added = backend.get_added_tokens_decoder()
        # EOS must be an added *special* token, else the text "<|endoftext|>" would not map to it
        if eos_id is None or eos_id not in added or not added[eos_id].special:
            raise ConfigError(
                f"tokenizer has no special {EOS_TOKEN} token; train one with elasticmoe.tokenizer.train_tokenizer"
            )
        self.backend = backend
        self.eos_id: int = eos_id
        self.eos_token: str = EOS_TOKEN

    # transformers-style aliases: EOS is also BOS; PAD has its own id (EOS in older tokenizers)
    @property
    def bos_id(self) -> int:
        return self.eos_id

    @property
    def pad_token(self) -> str:
        pad = self.backend.token_to_id(PAD_TOKEN)
        added = self.backend.get_added_tokens_decoder()
        return PAD_TOKEN if pad is not None and pad in added and added[pad].special else EOS_TOKEN

    @property
    def pad_id(self) -> int:
        return int(self.backend.token_to_id(self.pad_token))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the model's embedding table needs this many rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many strings at once (the Rust side parallelises over them)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.backend.decode_batch([[int(i) for i in ids] for ids in batch], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def to_str(self) -> str:
        """The canonical `tokenizer.json` text (deterministic for a given tokenizer)."""
        return self.backend.to_str(pretty=True)

    def save(self, folder: str | Path) -> Path:
        """Write tokenizer.json + the two transformers config files into `folder`; return folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / TOKENIZER_FILE, self.to_str())
        self._write_transformers_files(folder, self.transformers_config())
        return folder

    def export(self, folder: str | Path, model_max_length: int) -> Path:
        """Tokenizer files for a model export: as `save`, plus `<|endoftext|>` prepended whenever
        special tokens are added (the prompt convention) and the model's context as its limit."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = json.loads(self.backend.to_str())
        backend = _HFTokenizer.from_str(json.dumps(data))
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{EOS_TOKEN} $A",
                    pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
                    special_tokens=[(EOS_TOKEN, self.eos_id)],
                ),
            ]
        )
        _write_text(folder / TOKENIZER_FILE, backend.to_str(pretty=True))
        config = self.transformers_config(model_max_length)
        config["add_bos_token"] = True
        self._write_transformers_files(folder, config)
        return folder

    def _write_transformers_files(self, folder: Path, config: dict[str, Any]) -> None:
        _write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": self.pad_token, "unk_token": EOS_TOKEN}
        _write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")

    def transformers_config(self, model_max_length: int = 1_000_000_000) -> dict[str, Any]:
        """tokenizer_config.json for transformers (5.x: `PreTrainedTokenizerFast` = `TokenizersBackend`).

        `clean_up_tokenization_spaces: false` keeps transformers from deleting spaces before
        punctuation when decoding; no BOS is added on encode, matching `encode` here (`export`
        changes that for exported models).
        """
        added = self.backend.get_added_tokens_decoder()
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": self.pad_token,
            "unk_token": EOS_TOKEN,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": int(model_max_length),
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for i, t in sorted(added.items())
                if t.special
            },
        }

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary sibling + rename so a crash never leaves half a tokenizer file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _empty_backend() -> _HFTokenizer:
    """Untrained byte-level BPE with the pipeline described in the module docstring."""
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # trim_offsets only changes character offsets, never ids; it keeps offsets pointing at text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | Path | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` and (if `out_path` is given) save it there.

    `out_path` is a folder or a path ending in `tokenizer.json`; a folder gets the transformers
    files too (see `Tokenizer.save`). The result has at most `vocab_size` ids: the 256 byte
    symbols, EOS, PAD, and merges until the budget or the data runs out (a small corpus can give
    fewer; the model must use `Tokenizer.vocab_size`). Training is deterministic: merges are
    chosen by count with ties broken by the pair, and the inputs are summed word counts.
    """
    if (
        not isinstance(vocab_size, int)
        or isinstance(vocab_size, bool)
        or not (MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE)
    ):
        raise ConfigError(
            f"vocab_size={vocab_size!r} is out of range; allowed [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] "
            "(256 byte symbols + EOS + PAD at least)"
        )
    backend = _empty_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, PAD_TOKEN)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    seen = {"docs": 0}

    def counted() -> Iterable[str]:
        for text in texts:
            seen["docs"] += 1
            yield text

    backend.train_from_iterator(counted(), trainer=trainer)
    if seen["docs"] == 0:
        raise ConfigError("cannot train a tokenizer on an empty corpus")
    tokenizer = Tokenizer(backend)
    logger.info("trained byte-level BPE: %d ids from %d documents", tokenizer.vocab_size, seen["docs"])
    if out_path is not None:
        out_path = Path(out_path)
        if out_path.name == TOKENIZER_FILE:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            _write_text(out_path, tokenizer.to_str())
        else:
            tokenizer.save(out_path)
    return tokenizer


MAX_TOKENIZER_BYTES = 64 << 20


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json` file, or a folder holding one; ConfigError names what is wrong."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"folder {path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ConfigError(f"cannot load tokenizer: {where}")
    return Tokenizer(read_tokenizer_file(file))


def read_tokenizer_file(file: Path) -> _HFTokenizer:
    """A `tokenizer.json` parsed by the tokenizers library (any model's, ours or not), its size
    checked first; ConfigError names what is wrong."""
    if file.stat().st_size > MAX_TOKENIZER_BYTES:  # the largest public ones are a few tens of MB
        raise ConfigError(
            f"cannot load tokenizer: {file} is {file.stat().st_size:,} bytes, more than {MAX_TOKENIZER_BYTES:,}"
        )
    try:
        return _HFTokenizer.from_file(str(file))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
        raise ConfigError(f"cannot load tokenizer from {file}: {' '.join(str(exc).split())}") from None


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "Tokenizer", "load_tokenizer", "read_tokenizer_file", "train_tokenizer"]
