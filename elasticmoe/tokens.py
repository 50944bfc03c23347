"""Token arrays: tokenizing and mixing documents, memory-mapped shards, resumable sharded batches.

Documents become EOS-terminated token streams (`tokenize_docs`), mixed across tasks by weight
(`mix_tasks`); pre-tokenized data too large for memory is read from raw uint16/uint32 shards with
`np.memmap` (`TokenShards`). `BatchIterator` yields (inputs, targets) windows for one rank of a
global batch and resumes exactly from a small JSON state; `eval_windows` gives fixed held-out
windows. `StratifiedBatches` does the same per task, with the same task mix in every batch and
windows that start at a document boundary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .data import _expand, _task_order, answer_spans, example_level

logger = logging.getLogger(__name__)


_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
IGNORE = -100  # a target no loss is taken on (torch's cross_entropy ignore_index default)


def token_dtype(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def tokenize_docs(tokenizer: Any, docs: Sequence[str], dtype: str | None = None) -> np.ndarray:
    """Concatenate the documents' tokens, each document followed by EOS (`tokenizer.eos_id`)."""
    dtype = dtype or token_dtype(tokenizer.vocab_size)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r}; allowed: {sorted(_DTYPES)}")
    if np.iinfo(_DTYPES[dtype]).max < tokenizer.vocab_size - 1:
        raise ConfigError(f"dtype {dtype} cannot hold ids of a {tokenizer.vocab_size}-token vocabulary")
    parts = []
    for start in range(0, len(docs), 4096):  # bounded memory for the Python lists of ids
        for ids in tokenizer.encode_batch(list(docs[start : start + 4096])):
            parts.append(np.asarray([*ids, tokenizer.eos_id], dtype=_DTYPES[dtype]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=_DTYPES[dtype])


def mix_tasks(
    arrays: dict[str, np.ndarray],
    weights: dict[str, float] | None = None,
    *,
    eos_id: int,
    seed: int = 0,
    total_tokens: int | None = None,
) -> np.ndarray:
    """One token stream with each task's share of tokens set by `weights`, documents shuffled.

    Each array is EOS-terminated documents (from `tokenize_docs`). A task with weight w gets
    about w / sum(weights) * total_tokens tokens (default total: all tokens), repeating its
    documents in a seeded order when up-sampled and taking a seeded subset when down-sampled;
    all chosen documents are then shuffled together, so windows mix tasks. Weights None keeps
    the natural proportions (every document once).
    """
    weights = dict(weights) if weights is not None else {t: float(len(a)) for t, a in arrays.items()}
    problems = [f"weights[{t!r}]: no such task (have {sorted(arrays)})" for t in weights if t not in arrays]
    problems += [f"weights[{t!r}]={w} must be >= 0" for t, w in weights.items() if not w >= 0]
    if not problems and not sum(weights.get(t, 0.0) for t in arrays) > 0:
        problems.append("weights must give at least one non-empty task a positive weight")
    if problems:
        raise ConfigError("; ".join(problems))
    total = total_tokens if total_tokens is not None else sum(len(a) for a in arrays.values())
    norm = sum(weights.get(t, 0.0) for t in arrays if len(arrays[t]))

    rng = np.random.default_rng([seed, 7])
    chosen: list[np.ndarray] = []
    for task in sorted(arrays, key=_task_order):
        weight, tokens = weights.get(task, 0.0), arrays[task]
        if weight <= 0 or len(tokens) == 0:
            continue
        docs = _split_docs(tokens, eos_id)
        want, have, order = round(weight / norm * total), 0, rng.permutation(len(docs))
        i = 0
        while have < want:
            doc = docs[order[i % len(docs)]]
            chosen.append(doc)
            have += len(doc)
            i += 1
        logger.info("mix: %s %d tokens (%.1f%%)", task, have, 100 * have / max(total, 1))
    order = rng.permutation(len(chosen))
    return np.concatenate([chosen[i] for i in order]) if chosen else np.zeros(0, np.uint32)


def _split_docs(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eos_id) + 1
    if len(ends) == 0 or ends[-1] != len(tokens):
        ends = np.append(ends, len(tokens))  # a last document without EOS stays whole
    return np.split(tokens, ends[:-1])


def answer_mask(tokens: np.ndarray, tokenizer: Any, task: str) -> np.ndarray:
    """True on the tokens of `tokens` (a task's EOS-terminated documents) that are answers (see
    `data.answer_spans`) or the EOS closing a document with answers: the targets data.loss_on=answers
    trains on. A token is an answer when any of its characters is; offsets come from re-encoding the
    decoded document, and a document that does not re-encode to the same ids keeps every token."""
    mask = np.zeros(len(tokens), dtype=bool)
    docs = _split_docs(np.asarray(tokens), tokenizer.eos_id)
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    bodies = [d[:-1] if len(d) and d[-1] == tokenizer.eos_id else d for d in docs]
    texts = tokenizer.decode_batch([b.tolist() for b in bodies])
    encoded = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    for start, body, text, enc in zip(starts, bodies, texts, encoded):
        spans = answer_spans(task, text)
        if not spans:
            continue
        if list(enc.ids) != body.tolist():
            mask[start : start + len(body) + 1] = True
            continue
        chars = np.zeros(len(text) + 1, dtype=np.int64)  # answer characters, as a running count
        for a, b in spans:
            chars[a + 1 : b + 1] = 1
        chars = np.cumsum(chars)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        mask[start : start + len(body)] = chars[offsets[:, 1]] > chars[offsets[:, 0]]
        mask[start + len(body) : start + len(body) + 1] = True  # the EOS: where generation stops
    return mask


def write_token_shard(path: str | Path, tokens: np.ndarray, vocab_size: int | None = None) -> Path:
    """Write raw `tokens` (uint16 / uint32) to `path` plus a `<path>.json` sidecar with dtype."""
    path = Path(path)
    dtype = str(np.asarray(tokens[:0]).dtype)
    if dtype not in _DTYPES:
        raise ConfigError(f"token shard dtype {dtype}; allowed: {sorted(_DTYPES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens).tofile(path)
    sidecar = {"dtype": dtype, "tokens": int(len(tokens)), "vocab_size": vocab_size}
    Path(f"{path}.json").write_text(json.dumps(sidecar) + "\n")
    return path


def load_npy(path: Path | str) -> np.ndarray:
    """A prepared token array (`.npy`), its header checked before anything is allocated: a plain
    integer dtype (never objects, so nothing is unpickled) and a shape whose bytes are exactly the
    data the file holds (a header claiming 1e12 items is an error naming the file, not an allocation)."""
    from numpy.lib import format as npformat

    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, _, dtype = read(f, max_header_size=1 << 16)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError) as exc:
        raise ConfigError(f"{path} is not a .npy file elasticmoe wrote ({exc})") from None
    if dtype.kind not in "iu" or len(shape) != 1:
        raise ConfigError(f"{path}: a token array must be 1-D integers; its header says {dtype} {shape}")
    need, size = shape[0] * dtype.itemsize, path.stat().st_size - offset
    if need != size:
        raise ConfigError(f"{path}: its header claims {shape[0]:,} tokens ({need:,} bytes) but it holds {size:,} bytes")
    return np.load(path, allow_pickle=False)


class TokenShards:
    """Read-only memory-mapped token files: data larger than memory, shared by all workers.

    Each `.bin` file is raw little-endian uint16 or uint32 ids; a `<file>.json` sidecar may state
    {"dtype": ...}. `dtype=None` takes the sidecar's, else uint16. Globs are expanded (sorted).
    """

    def __init__(
        self, paths: Sequence[str | Path] | str, dtype: str | None = None, vocab_size: int | None = None
    ) -> None:

        if isinstance(paths, (str, Path)):
            paths = [paths]
        files = [p for raw in paths for p in _expand(str(raw), "token shard") if p.is_file()]
        if not files:
            raise ConfigError("TokenShards needs at least one .bin file")
        self.paths = files
        self.arrays: list[np.ndarray] = [self._open(p, dtype, vocab_size) for p in files]

    @staticmethod
    def _open(path: Path, dtype: str | None, vocab_size: int | None) -> np.ndarray:
        sidecar = Path(f"{path}.json")
        stated = json.loads(sidecar.read_text()).get("dtype") if sidecar.is_file() else None
        if dtype is not None and stated is not None and dtype != stated:
            raise ConfigError(f"{path}: dtype={dtype} but its sidecar {sidecar.name} says {stated}")
        name = dtype or stated or "uint16"
        if name not in _DTYPES:
            raise ConfigError(f"{path}: dtype {name!r}; allowed: {sorted(_DTYPES)}")
        itemsize, size = np.dtype(name).itemsize, path.stat().st_size
        if size == 0 or size % itemsize:
            raise ConfigError(f"{path}: {size} bytes is not a positive multiple of {itemsize} ({name})")
        array = np.memmap(path, dtype=np.dtype(name).newbyteorder("<"), mode="r")
        if vocab_size is not None:
            top = max(int(array[i : i + (1 << 24)].max()) for i in range(0, len(array), 1 << 24))
            if top >= vocab_size:
                raise ConfigError(f"{path}: token id {top} >= vocab_size {vocab_size}")
        return array

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)


class _Windows:
    """Windows of seq_len+1 tokens at stride seq_len inside each array (never across shards)."""

    def __init__(self, tokens: np.ndarray | TokenShards | Sequence[np.ndarray], seq_len: int) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len={seq_len!r} must be a positive integer")
        arrays = tokens.arrays if isinstance(tokens, TokenShards) else tokens
        self.arrays = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        self.seq_len = seq_len
        per_array = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.ends = np.cumsum(per_array)
        self.count = int(self.ends[-1]) if len(self.ends) else 0
        if self.count == 0:
            sizes = [len(a) for a in self.arrays]
            raise ConfigError(f"data too small: {sizes} tokens give no window of seq_len+1={seq_len + 1} tokens")

    def get(self, indices: np.ndarray) -> torch.Tensor:
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            which = int(np.searchsorted(self.ends, index, side="right"))
            start = (int(index) - (int(self.ends[which - 1]) if which else 0)) * self.seq_len
            rows[row] = self.arrays[which][start : start + self.seq_len + 1]
        return torch.from_numpy(rows)


class BatchIterator:
    """Endless (inputs, targets) batches for one rank, resumable to the exact batch.

    Each epoch visits the windows in a permutation seeded by (seed, epoch); global batch g takes
    the next batch_size * world_size windows of it and rank r gets the r-th block of batch_size.
    A partial global batch at the end of an epoch is skipped, so every rank takes the same steps.
    State is {"epoch", "position"} (windows consumed this epoch, over all ranks), plus the seed and
    window count to refuse resuming on other data. Since the position counts global windows, a
    resume may change world_size or batch_size and still continue the same permutation.
    """

    def __init__(
        self,
        tokens: np.ndarray | TokenShards | Sequence[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need 0 <= rank < world")
        self.windows = _Windows(tokens, seq_len)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if self.windows.count < self.global_batch:
            raise ConfigError(
                f"data too small: {self.windows.count} windows of {seq_len + 1} tokens, but one global "
                f"batch needs batch_size*world_size={self.global_batch}"
            )
        self.epoch, self.position = 0, 0
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.windows.count // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows.count)
        return self._perm

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.windows.count:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        start = self.position + self.rank * self.batch_size
        rows = self.windows.get(self._permutation()[start : start + self.batch_size])
        self.position += self.global_batch
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "windows": self.windows.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.seed), ("windows", self.windows.count)):
            if key in state and int(state[key]) != mine:
                raise ConfigError(f"data state {key}={state[key]} does not match this data ({key}={mine})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.windows.count:
            raise ConfigError(f"data state epoch={epoch}, position={position} out of range")
        self.epoch, self.position, self._perm = epoch, position, None


def aligned_starts(tokens: np.ndarray, eos_id: int, seq_len: int) -> np.ndarray:
    """Start offsets of windows of seq_len+1 tokens that begin at an EOS and end where a document ends.

    `tokens` is EOS-separated documents starting with an EOS. Each window starts at the EOS that ends
    the previous document (it acts as BOS, as in evaluation: [EOS] + prompt) and the next window
    starts at the last EOS that is a target of this one, so every document no longer than seq_len
    is whole, with its EOS as BOS, in exactly one window; the partial document filling a window's
    tail is repeated whole in the next. A document longer than seq_len is cut at stride seq_len.
    """
    ends = np.flatnonzero(tokens == eos_id)
    starts, s, last = [], 0, len(tokens) - seq_len - 1
    while s <= last:
        starts.append(s)
        j = int(np.searchsorted(ends, s + seq_len, side="right")) - 1  # last EOS within the targets
        s = int(ends[j]) if j >= 0 and ends[j] > s else s + seq_len
    return np.asarray(starts, dtype=np.int64)


class _Source:
    """Document-aligned windows (`aligned_starts`) of one token stream, walked in a permutation seeded
    by `seed` + [epoch]; a partial block at the end of an epoch is skipped. `targets`: the stream as
    targets with IGNORE outside a loss mask (None: the stream itself)."""

    def __init__(
        self, stream: np.ndarray, targets: np.ndarray | None, seq_len: int, eos_id: int, seed: list[int]
    ) -> None:
        self.stream, self.targets, self.seed = stream, targets, seed
        self.starts = aligned_starts(stream, eos_id, seq_len)
        self.epoch, self.position = 0, 0
        self._perm: np.ndarray | None = None

    def take(self, n: int) -> list[int]:
        """Start offsets of the next `n` windows."""
        if self.position + n > len(self.starts):
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = np.random.default_rng([*self.seed, self.epoch]).permutation(len(self.starts))
        picked = self._perm[self.position : self.position + n]
        self.position += n
        return [int(self.starts[w]) for w in picked]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "windows": len(self.starts)}

    def problems(self, name: str, st: dict) -> list[str]:
        """Why the saved state `st` cannot be loaded into this source (none: it can)."""
        if int(st["windows"]) != len(self.starts):
            return [f"data state: {name} has {st['windows']} windows; this data {len(self.starts)}"]
        if int(st["epoch"]) < 0 or not 0 <= int(st["position"]) <= len(self.starts):
            return [f"data state: {name} epoch={st['epoch']}, position={st['position']} out of range"]
        return []

    def load_state_dict(self, st: dict) -> None:
        self.epoch, self.position, self._perm = int(st["epoch"]), int(st["position"]), None


class StratifiedBatches:
    """Endless (inputs, targets) batches with the same task mix every step, resumable to the exact batch.

    Each task keeps its own token stream (its training documents in a seeded order, EOS-separated,
    starting with an EOS) cut into document-aligned windows (`aligned_starts`), and each step a
    batch of `batch_size` rows takes `weight / sum(weights) * batch_size` rows of each task. When
    that is not a whole number, the task gets its whole part every step plus one more row on a
    share of the steps equal to the fraction, chosen by systematic sampling seeded by (seed, step),
    so the mix differs from step to step by at most one row per task (none with weights in
    multiples of 1/batch_size, as the default). Weights None: shares of the tokens.

    Ranks: the mix is set for the global batch (batch_size * world_size rows, task by task) and rank
    r takes its r-th block of batch_size rows, so N ranks see exactly the rows of one process with
    an N times larger batch. Each task walks its windows in a
    permutation seeded by (seed, task index, epoch); a partial block at the end of an epoch is
    skipped. State: {"step", "seed", "tasks": {task: {"epoch", "position", "windows"}}}, positions
    counting global windows, so a resume may change world_size or batch_size.

    `loss_masks` ({task: bool array aligned with its tokens}, from `answer_mask`) sets the targets
    outside the mask to IGNORE: that task's rows train on their answers only.

    Curriculum (`curriculum` > 0, with `levels` = {task: the level of each of its documents, from
    `doc_levels`} and the run's `total_steps`): each graded task's documents are split by level
    into streams of their own (same seeded order, windows and epochs per level), and a task's rows
    of a step are shared between the levels that have entered by then, in proportion to their
    tokens, by systematic sampling seeded by (seed, task, step). Level k of L (easiest first)
    enters at step floor(curriculum * total_steps * k / L): the easiest trains alone at first and
    the hardest from curriculum * (L - 1) / L of the run on ("baby steps", Bengio et al. 2009;
    Spitkovsky et al. 2010). Scaled to the run's steps, not to the stream, because a run reads
    only part of a task's stream: an easy-first order of the stream would never reach the hard
    levels. After the last entry the rows follow the levels' token shares, which is the level mix
    of today's single stream. Rows are then of one level each; the task mix per step is unchanged.
    The state holds each level's position and the curriculum (a resume under another is refused).
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        weights: dict[str, float] | None,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        eos_id: int,
        loss_masks: dict[str, np.ndarray] | None = None,
        levels: dict[str, np.ndarray] | None = None,
        curriculum: float = 0.0,
        total_steps: int | None = None,
    ) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ConfigError(f"seq_len={seq_len!r} must be a positive integer")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need 0 <= rank < world")
        _check_curriculum(curriculum, total_steps)
        weights = dict(weights) if weights is not None else {t: float(len(a)) for t, a in arrays.items()}
        problems = [f"weights[{t!r}]: no such task (have {sorted(arrays)})" for t in weights if t not in arrays]
        problems += [f"weights[{t!r}]={w} must be >= 0" for t, w in weights.items() if not w >= 0]
        tasks = [t for t in sorted(arrays, key=_task_order) if weights.get(t, 0.0) > 0 and len(arrays[t])]
        if not problems and not tasks:
            problems.append("weights must give at least one non-empty task a positive weight")
        if problems:
            raise ConfigError("; ".join(problems))
        total = sum(weights[t] for t in tasks)
        shares = np.array([weights[t] / total * batch_size * world_size for t in tasks])  # of the global batch
        self.tasks, self.base = tasks, np.floor(shares + 1e-9).astype(np.int64)
        self.frac = np.clip(shares - self.base, 0.0, None)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.curriculum, self.total_steps = float(curriculum), total_steps
        self.sources: dict[str, list[_Source]] = {}
        self.levels: dict[str, list[int]] = {}  # graded tasks under the curriculum: their levels, easiest first
        self.enters: dict[str, np.ndarray] = {}  # the step each of those levels enters at
        for i, task in enumerate(tasks):
            graded = self.curriculum > 0 and levels is not None and task in levels
            self.sources[task] = self._sources(i, task, arrays[task], eos_id, loss_masks, levels if graded else None)
            need = int(self.base[i]) + (self.frac[i] > 0)
            for k, source in enumerate(self.sources[task]):
                if len(source.starts) < max(need, 1):
                    which = f"task {task!r}" + (f" level {self.levels[task][k]}" if task in self.levels else "")
                    raise ConfigError(
                        f"data too small: {which} has {len(source.starts)} windows of {seq_len + 1} tokens, "
                        f"but one global batch needs {need}"
                    )
        self.step = 0
        logger.info("batches: rows per step %s", {t: round(float(x), 3) for t, x in zip(tasks, shares)})
        for task, enter in self.enters.items():
            logger.info("curriculum: %s levels %s enter at steps %s", task, self.levels[task], enter.tolist())

    def _sources(
        self,
        i: int,
        task: str,
        tokens: np.ndarray,
        eos_id: int,
        loss_masks: dict[str, np.ndarray] | None,
        levels: dict[str, np.ndarray] | None,
    ) -> list[_Source]:
        """The task's stream (its documents in an order seeded by (seed, task index)), or under the
        curriculum one stream per level, each keeping that order."""
        docs = _split_docs(tokens, eos_id)
        order = np.random.default_rng([self.seed, 11, i]).permutation(len(docs))
        pieces = None
        if loss_masks and task in loss_masks:  # the same documents in the same order
            if len(loss_masks[task]) != len(tokens):
                have, want = len(loss_masks[task]), len(tokens)
                raise ConfigError(f"loss mask of task {task!r} has {have} entries for {want} tokens")
            pieces = np.split(loss_masks[task], np.cumsum([len(d) for d in docs])[:-1])
        head = np.asarray([eos_id], dtype=tokens.dtype)

        def source(picked: np.ndarray, seed: list[int]) -> _Source:
            stream = np.concatenate([head, *(docs[j] for j in picked)])
            targets = None
            if pieces is not None:
                keep = np.concatenate([[False], *(pieces[j] for j in picked)])
                targets = np.where(keep, stream.astype(np.int64), IGNORE)  # the stream, as targets
            return _Source(stream, targets, self.seq_len, eos_id, seed)

        if levels is None:
            return [source(order, [self.seed, i])]
        of_doc = np.asarray(levels[task])
        if len(of_doc) != len(docs):
            raise ConfigError(f"levels of task {task!r}: {len(of_doc)} for {len(docs)} documents")
        self.levels[task] = sorted({int(v) for v in of_doc})
        n = len(self.levels[task])
        self.enters[task] = np.array([int(self.curriculum * self.total_steps * k / n) for k in range(n)])
        return [source(order[of_doc[order] == lv], [self.seed, 19, i, k]) for k, lv in enumerate(self.levels[task])]

    def rows_at(self, step: int) -> dict[str, int]:
        """Rows of each task in the global batch at `step` (sums to batch_size * world_size)."""
        rows = self.base.copy()
        extra = int(round(self.batch_size * self.world_size - rows.sum()))
        if extra > 0:
            cum = np.cumsum(self.frac)
            cum *= extra / cum[-1]
            u = np.random.default_rng([self.seed, 13, step]).random()
            picked = np.searchsorted(cum, u + np.arange(extra), side="right")
            rows[np.minimum(picked, len(rows) - 1)] += 1
        return {t: int(n) for t, n in zip(self.tasks, rows)}

    def level_rows_at(self, task: str, step: int, rows: int) -> dict[int, int]:
        """Under the curriculum: how a graded task's `rows` at `step` are shared between its levels
        (the levels entered by `step`, in proportion to their tokens; systematic sampling)."""
        tokens = np.array([len(s.stream) for s in self.sources[task]], dtype=np.float64)
        weights = np.where(step >= self.enters[task], tokens, 0.0)
        cum = np.cumsum(weights) / weights.sum() * rows
        cum[np.flatnonzero(weights)[-1] :] = np.inf  # rounding never picks a level not entered yet
        u = np.random.default_rng([self.seed, 17, self.tasks.index(task), step]).random()
        picked = np.searchsorted(cum, u + np.arange(rows), side="right")
        return dict(zip(self.levels[task], np.bincount(picked, minlength=len(weights)).tolist()))

    def __iter__(self) -> StratifiedBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen: list[tuple[_Source, int]] = []  # the global batch: (source, window start), task by task
        for task, n in self.rows_at(self.step).items():
            if n == 0:
                continue
            sources = self.sources[task]
            counts = self.level_rows_at(task, self.step, n).values() if task in self.levels else [n]
            for source, k in zip(sources, counts):
                if k:
                    chosen += [(source, s) for s in source.take(k)]
        self.step += 1
        mine = chosen[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        inputs = np.stack([src.stream[s : s + self.seq_len] for src, s in mine]).astype(np.int64)
        targets = np.stack(
            [(src.stream if src.targets is None else src.targets)[s + 1 : s + self.seq_len + 1] for src, s in mine]
        )
        return torch.from_numpy(inputs), torch.from_numpy(targets.astype(np.int64))

    def _curriculum_state(self) -> dict[str, float | int] | None:
        return {"fraction": self.curriculum, "steps": self.total_steps} if self.curriculum > 0 else None

    def state_dict(self) -> dict[str, Any]:
        tasks: dict[str, Any] = {}
        for t in self.tasks:
            if t in self.levels:
                tasks[t] = {"levels": {str(lv): s.state_dict() for lv, s in zip(self.levels[t], self.sources[t])}}
            else:
                tasks[t] = self.sources[t][0].state_dict()
        state = {"step": self.step, "seed": self.seed, "tasks": tasks}
        if (curriculum := self._curriculum_state()) is not None:
            state["curriculum"] = curriculum
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tasks" not in state or int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(
                f"data state {sorted(state)} (seed {state.get('seed')}) does not match this data's "
                f"stratified batches (seed {self.seed})"
            )
        if sorted(state["tasks"]) != sorted(self.tasks):
            raise ConfigError(f"data state has tasks {sorted(state['tasks'])}; this data mixes {sorted(self.tasks)}")
        if state.get("curriculum") != self._curriculum_state():
            raise ConfigError(
                f"data state curriculum {state.get('curriculum')} does not match this run's {self._curriculum_state()} "
                "(data.curriculum over train.steps)"
            )
        pairs = []  # (source, saved state)
        for t, st in state["tasks"].items():
            if t in self.levels:
                saved = st.get("levels", {})
                if sorted(saved, key=int) != [str(lv) for lv in self.levels[t]]:
                    raise ConfigError(f"data state: task {t} has levels {sorted(saved)}; this data {self.levels[t]}")
                pairs += [(s, saved[str(lv)], f"task {t} level {lv}") for lv, s in zip(self.levels[t], self.sources[t])]
            else:
                pairs.append((self.sources[t][0], st, f"task {t}"))
        problems = [p for source, st, name in pairs for p in source.problems(name, st)]
        if problems:
            raise ConfigError("; ".join(problems))
        if int(state["step"]) < 0:
            raise ConfigError(f"data state step={state['step']} must be >= 0")
        self.step = int(state["step"])
        for source, st, _ in pairs:
            source.load_state_dict(st)


def _check_curriculum(curriculum: float, total_steps: int | None) -> None:
    if isinstance(curriculum, bool) or not isinstance(curriculum, (int, float)) or not 0 <= curriculum <= 1:
        raise ConfigError(f"data.curriculum={curriculum!r} must be a number in [0, 1] (0: off)")
    if curriculum > 0 and (isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1):
        raise ConfigError(
            f"data.curriculum={curriculum} needs the run's total steps (train.steps), got {total_steps!r}"
        )


def doc_levels(tokens: np.ndarray, tokenizer: Any, task: str) -> np.ndarray:
    """The level (`data.example_level`) of each EOS-terminated document of a graded task's tokens,
    in order: what the curriculum of `StratifiedBatches` splits a task's stream by."""
    docs = _split_docs(np.asarray(tokens), tokenizer.eos_id)
    bodies = [d[:-1] if len(d) and d[-1] == tokenizer.eos_id else d for d in docs]
    out = np.zeros(len(docs), dtype=np.int64)
    for k, text in enumerate(tokenizer.decode_batch([b.tolist() for b in bodies])):
        try:
            out[k] = example_level(task, text)
        except (ConfigError, AttributeError, ValueError):
            raise ConfigError(f"task {task!r}: document {k} ({text[:60]!r}) has no difficulty level") from None
    return out


def eval_windows(
    tokens: np.ndarray | TokenShards | Sequence[np.ndarray],
    seq_len: int,
    max_windows: int | None = None,
    loss_mask: np.ndarray | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(n, seq_len+1) LongTensor of windows for validation, the same on every call.

    Windows sit at stride seq_len, so consecutive windows share one boundary token and their
    targets (window[1:]) are disjoint and cover the data. More than `max_windows` available:
    evenly spaced ones are kept, so the estimate covers the whole split, not just its start.
    With `loss_mask` (bool, aligned with `tokens`, from `answer_mask`): (windows, keep), keep the
    (n, seq_len) bool mask of the targets that count.
    """
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows={max_windows} must be >= 1")
    windows = _Windows(tokens, seq_len)
    index = np.arange(windows.count)
    if max_windows is not None and windows.count > max_windows:
        index = np.unique(np.linspace(0, windows.count - 1, max_windows).round().astype(np.int64))
    if loss_mask is None:
        return windows.get(index)
    keep = _Windows(np.asarray(loss_mask, dtype=np.int64), seq_len).get(index)[:, 1:].bool()
    return windows.get(index), keep


def unpack_windows(w: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(windows, keep or None) from what `eval_windows` returned for one task."""
    return w if isinstance(w, tuple) else (w, None)
