"""A run's data, prepared once and kept in the run folder: corpus, tokenizer, token arrays.

    RUN_DIR/data/corpus/<split>/<task>.jsonl   the documents (checksummed, see data.Corpus)
    RUN_DIR/data/tokenizer.json                trained here or copied from data.tokenizer
    RUN_DIR/data/tokens/<split>.<task>.npy     EOS-terminated token ids

Every later phase (search, extraction, fine-tuning, evaluation, baselines) reads this folder, so
all of them see exactly the data, splits and tokenizer the parent was trained with.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .data import (
    DEFAULT_TASK_WEIGHTS,
    SPLITS,
    STRUCTURED_TASKS,
    Corpus,
    build_default_corpus,
    corpus_from_texts,
    load_user_texts,
    task_spec_from,
)
from .recipe import Recipe
from .tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from .tokens import (
    BatchIterator,
    StratifiedBatches,
    TokenShards,
    answer_mask,
    doc_levels,
    eval_windows,
    load_npy,
    mix_tasks,
    tokenize_docs,
)

log = logging.getLogger(__name__)


@dataclass
class RunData:
    folder: Path
    tokenizer: Tokenizer
    seq_len: int
    task_weights: dict[str, float]
    seed: int
    tokens: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    corpus: Corpus | None = None
    train_shards: TokenShards | None = None  # source=shards: memory-mapped training tokens
    _answer_masks: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def answer_mask(self, split: str, task: str) -> np.ndarray:
        """`tokens.answer_mask` of one split's task, computed once per RunData."""
        if (split, task) not in self._answer_masks:
            self._answer_masks[split, task] = answer_mask(self.tokens[split][task], self.tokenizer, task)
        return self._answer_masks[split, task]

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def tasks(self) -> list[str]:
        return list(self.tokens["train"])

    def train_stream(self, seed: int | None = None) -> np.ndarray:
        arrays = {t: a for t, a in self.tokens["train"].items() if len(a)}
        weights = self.task_weights or None
        return mix_tasks(arrays, weights, eos_id=self.tokenizer.eos_id, seed=self.seed if seed is None else seed)

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        task_weights: dict[str, float] | None = None,
        loss_on: str = "all",
        curriculum: float = 0.0,
        total_steps: int | None = None,
    ) -> BatchIterator | StratifiedBatches:
        """Training batches: every batch holds each task's share of rows (`task_weights`, else the
        run's mix, else shares of the tokens), in document-aligned windows; see StratifiedBatches.
        loss_on="answers": structured tasks' rows train on their answers only (`tokens.answer_mask`);
        text (the embedded prose, your files, token shards) keeps every target. curriculum > 0
        (`data.curriculum`): the structured tasks' levels enter easiest first over that fraction
        of `total_steps` (StratifiedBatches)."""
        if self.train_shards is not None:  # memory-mapped: windows are read straight from the files
            # plain text: every token is trained on, whatever data.loss_on says
            return BatchIterator(self.train_shards, self.seq_len, batch_size, seed, rank, world_size)
        arrays = {t: a for t, a in self.tokens["train"].items() if len(a)}
        weights = task_weights if task_weights is not None else (self.task_weights or None)
        masks = None
        if loss_on == "answers":
            masks = {t: self.answer_mask("train", t) for t in arrays if t in STRUCTURED_TASKS}
        levels = None
        if curriculum:
            levels = {t: doc_levels(arrays[t], self.tokenizer, t) for t in arrays if t in STRUCTURED_TASKS}
        return StratifiedBatches(
            arrays,
            weights,
            self.seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            eos_id=self.tokenizer.eos_id,
            loss_masks=masks,
            levels=levels,
            curriculum=curriculum,
            total_steps=total_steps,
        )

    def eval_windows(
        self, split: str, max_windows: int, loss_on: str = "all"
    ) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Held-out windows per task (split "val" for validation, "search" for search). loss_on=
        "answers": structured tasks give (windows, keep), scored on their answers only (as trained)."""
        if split not in self.tokens:
            raise ConfigError(f"no split {split!r}; have {sorted(self.tokens)}")
        out = {}
        for task, arr in self.tokens[split].items():
            if len(arr) > self.seq_len + 1:
                answers = loss_on == "answers" and task in STRUCTURED_TASKS  # text keeps every target
                out[task] = eval_windows(
                    arr, self.seq_len, max_windows, self.answer_mask(split, task) if answers else None
                )
        if not out:
            raise ConfigError(f"split {split!r} has too little data for one window of {self.seq_len + 1} tokens")
        return out


def _build_corpus(recipe: Recipe) -> Corpus:
    d = recipe.data
    if d.source == "default":
        return build_default_corpus(recipe.train.seed, d.scale, spec=task_spec_from(d.task_spec))
    texts = load_user_texts(list(d.paths), d.text_field)
    if not texts:
        raise ConfigError(f"data.paths {list(d.paths)} gave an empty corpus")
    return corpus_from_texts(texts)


def prepare_run_data(recipe: Recipe, run_dir: Path) -> RunData:
    """Build (or reload) the run's corpus, tokenizer and token arrays under RUN_DIR/data."""
    folder = Path(run_dir) / "data"
    d = recipe.data
    if d.source == "shards" and not (folder / "ready").exists():
        _prepare_shards(recipe, folder)
    if (folder / "ready").exists():
        saved = (folder / "ready").read_text()
        if saved.startswith("{") and json.loads(saved) != json.loads(_data_identity(recipe)):
            raise ConfigError(
                f"{folder} was prepared for other data settings ({saved.strip()}); this recipe asks for "
                f"{_data_identity(recipe).strip()}: use a new run folder"
            )
    if not (folder / "ready").exists():
        if d.source == "files":  # fail on bad paths before anything is written
            _build_corpus(recipe)
        tmp = folder.with_name("data.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        corpus = _build_corpus(recipe)
        corpus.save(tmp / "corpus")
        if d.tokenizer:
            tok = load_tokenizer(d.tokenizer)
            shutil.copyfile(
                Path(d.tokenizer) / "tokenizer.json" if Path(d.tokenizer).is_dir() else d.tokenizer,
                tmp / "tokenizer.json",
            )
        else:
            tok = train_tokenizer(corpus.texts("train"), d.vocab_size, tmp / "tokenizer.json")
        if tok.vocab_size > recipe.model.vocab_size:
            raise ConfigError(f"tokenizer has {tok.vocab_size} ids but model.vocab_size={recipe.model.vocab_size}")
        (tmp / "tokens").mkdir()
        for split, by_task in corpus.docs.items():
            for task, docs in by_task.items():
                np.save(tmp / "tokens" / f"{split}.{task}.npy", tokenize_docs(tok, docs))
        (tmp / "ready").write_text(_data_identity(recipe))
        if folder.exists():  # without `ready` it is not data we prepared (a user's folder): never delete it
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"{folder} exists and was not prepared by elasticmoe: refusing to replace it")
        tmp.rename(folder)
    return load_run_data(run_dir, recipe)


def _prepare_shards(recipe: Recipe, folder: Path) -> None:
    """Pre-tokenized data: training shards stay where they are (memory-mapped at load); the held-out
    shards are split into contiguous thirds for val / search / test (task "text")."""
    d = recipe.data
    load_tokenizer(d.tokenizer)  # fail early on a bad tokenizer path
    train_shards = TokenShards(list(d.paths), vocab_size=recipe.model.vocab_size)  # validate before writing
    held = TokenShards(list(d.eval_paths), vocab_size=recipe.model.vocab_size)
    overlap = {str(p.resolve()) for p in train_shards.paths} & {str(p.resolve()) for p in held.paths}
    if overlap:
        raise ConfigError(
            f"data.paths and data.eval_paths share {sorted(overlap)}: held-out tokens would be trained on"
        )
    stream = np.concatenate([np.asarray(a) for a in held.arrays])
    if len(stream) < 3 * (d.seq_len + 2):
        raise ConfigError(f"data.eval_paths hold {len(stream)} tokens; need at least {3 * (d.seq_len + 2)}")
    tmp = folder.with_name("data.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokens").mkdir(parents=True)
    third = len(stream) // 3
    for n, split in enumerate(("val", "search", "test")):
        np.save(tmp / "tokens" / f"{split}.text.npy", stream[n * third : (n + 1) * third])
    np.save(tmp / "tokens" / "train.text.npy", np.zeros(0, dtype=stream.dtype))
    src = Path(d.tokenizer)
    shutil.copyfile(src / "tokenizer.json" if src.is_dir() else src, tmp / "tokenizer.json")
    (tmp / "shards.json").write_text(json.dumps({"train": [str(Path(p).resolve()) for p in d.paths]}) + "\n")
    (tmp / "ready").write_text(_data_identity(recipe))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _data_identity(recipe: Recipe) -> str:
    """What the prepared data depends on; a run folder's data is reused only for the same settings."""
    d = recipe.data
    ident = {
        "source": d.source,
        "paths": list(d.paths),
        "eval_paths": list(d.eval_paths),
        "scale": d.scale,
        "vocab_size": d.vocab_size,
        "tokenizer": d.tokenizer,
        "text_field": d.text_field,
        "seed": recipe.train.seed,
        "model_vocab_size": recipe.model.vocab_size,
    }
    if d.source == "default":  # the embedded corpus's task formats and sizes (data.py): 3 has levels, 4 sort 0-3
        ident["corpus_version"] = 4
        if d.task_spec:
            ident["task_spec"] = d.task_spec
    return json.dumps(ident, sort_keys=True) + "\n"


def load_run_data(run_dir: Path, recipe: Recipe) -> RunData:
    folder = Path(run_dir) / "data"
    if not (folder / "ready").exists():
        raise ConfigError(f"{run_dir} has no prepared data (run `elasticmoe train` first)")
    tok = load_tokenizer(folder / "tokenizer.json")
    tokens: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted((folder / "tokens").glob("*.npy")):
        split, task = path.stem.split(".", 1)
        tokens.setdefault(split, {})[task] = load_npy(path)
    missing = [s for s in SPLITS if s not in tokens]
    if missing:
        raise ConfigError(f"{folder} lacks split(s) {missing}")
    shards = None
    if (folder / "shards.json").is_file():
        paths = json.loads((folder / "shards.json").read_text())["train"]
        shards = TokenShards(paths, vocab_size=recipe.model.vocab_size)
    weights = dict(recipe.data.task_weights)
    if not weights and recipe.data.source == "default":  # the embedded corpus's default mix
        weights = {t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if len(tokens["train"].get(t, ()))}
    return RunData(folder, tok, recipe.data.seq_len, weights, recipe.train.seed, tokens, train_shards=shards)
