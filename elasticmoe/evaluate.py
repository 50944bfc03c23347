"""Evaluation on the held-out test split: per task, retention against the parent, pairwise arena.

What `evaluate` measures (every number has a unit and a formula):

* task `text` (high entropy): **bits per byte** = sum over documents of the nats of every token of
  the document / ln 2 / sum of the documents' UTF-8 bytes. Each document is scored as
  `[EOS] + encode(doc)`, EOS acting as BOS; no trailing EOS is scored (it is not text). A
  document longer than `max_seq_len` is scored in rolling windows: the first window predicts the
  first `max_seq_len` tokens, each later one the next `max_seq_len` (the last window is filled
  with earlier tokens as context and scores only what is new), so every token is scored exactly
  once. This is lm-evaluation-harness' `loglikelihood_rolling` scheme (context_len 1), so its
  `bits_per_byte` on an exported model equals ours. Also reported: nats per token and perplexity
  = exp(nats per token). CI: percentile bootstrap over documents (seeded), ratio of sums.
* tasks `kv`, `arith`, `sort`, `find` (structured): **exact match** accuracy. The prompt is fed as
  `[EOS] + encode(prompt)` (`data.split_prompt_answer`), the model's KV-cached `generate` runs
  greedily (temperature 0) until EOS or for `answer_budget` tokens (longest answer in UTF-8 bytes
  + 4, an upper bound on its tokens), the continuation is cut at the first EOS or newline and
  compared with the answer as strings. Training documents are `prompt + answer + EOS` and answers
  hold no newline or EOS, so the answer's end is unambiguous (tests/test_evaluate.py checks it).
  Prompts of equal token length are batched (exact: no padding).
  CI: Wilson score interval (Wilson 1927) at 95%. Scored per difficulty level too (`levels`:
  {level: {exact_match, lo, hi, n}}, `data.example_level`); `max_examples` is shared equally
  between the levels (`select_by_level`), and `per_example` (0/1, in order) lets two models be
  compared on the same examples.
* `<task>/answer-loss` for each structured task: teacher-forced nats per token of the reference
  answer given `[EOS] + prompt` (mean over examples, bootstrap CI). Exact match stays at 0 until a
  model gets whole answers right; this graded companion shows what a child retains before that.
* work: `tokens` = token positions the model computed (padding included), `flops` = for each
  forward of T new tokens against S keys, T * `cost.cost(config, subnet, S).flops_forward`
  (the cost model's per-token forward FLOPs at context S), summed. The caller records both in
  the ledger (phase "evaluate").

Retention (`retention`): child score / parent score when higher is better (accuracy); parent /
child when lower is better (bits per byte), so 1.0 means as good as the parent and < 1 worse in
both cases. Undefined (parent accuracy 0, or child bits per byte 0) -> None.

Arena (`pairwise_ratings`): on the same test prompts, the model with the lower mean nats per
token of the reference continuation wins the prompt (equal: a tie, half a win each). Win counts
give Bradley-Terry strengths (Hunter 2004, MM algorithm; 0.5 virtual wins per ordered pair keep
a model that wins everything finite), shown on the Elo scale (1000 + 400 log10 strength,
geometric mean strength 1), with percentile bootstrap CIs over prompts.

lm-evaluation-harness: see `elasticmoe.lm_eval_tasks.write_lm_eval_tasks`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint
from .config import ConfigError
from .cost import cost
from .data import STRUCTURED_TASKS, Corpus, example_level, split_prompt_answer
from .subnet import Subnet
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

FORMAT = "elasticmoe-eval"
TEXT_METRIC, EXACT_METRIC = "bits_per_byte", "exact_match"
ANSWER_LOSS_SUFFIX = "/answer-loss"  # the graded companion task of each exact-match task
FINETUNED_SUFFIX = "-ft"  # `retention_table` pairs "X" (before fine-tuning) with "X-ft" (after)
Z95 = 1.959963984540054  # standard normal quantile at 0.975


# -- data ---------------------------------------------------------------------------------------
def load_eval_data(source: Any, tokenizer: Tokenizer | None = None) -> tuple[Corpus, Tokenizer]:
    """(corpus, tokenizer) from a RunData, a Corpus (+ tokenizer), or a folder: a run folder
    (RUN_DIR/data/corpus), its data folder, or a saved corpus folder (tokenizer given, or read from
    the data folder's tokenizer.json)."""
    if isinstance(source, Corpus):
        if tokenizer is None:
            raise ConfigError("evaluating a Corpus needs its tokenizer (tokenizer=...)")
        return source, tokenizer
    if hasattr(source, "tokens") and hasattr(source, "folder"):  # rundata.RunData
        corpus = source.corpus if source.corpus is not None else Corpus.load(Path(source.folder) / "corpus")
        return corpus, tokenizer or source.tokenizer
    folder = Path(source)
    if (folder / "data" / "corpus" / "corpus.json").is_file():  # a run folder
        data_dir, corpus_dir = folder / "data", folder / "data" / "corpus"
    elif (folder / "corpus" / "corpus.json").is_file():  # RUN_DIR/data
        data_dir, corpus_dir = folder, folder / "corpus"
    elif (folder / "corpus.json").is_file():  # RUN_DIR/data/corpus
        data_dir, corpus_dir = folder.parent, folder
    else:
        raise ConfigError(f"{folder}: not a run folder, data folder or saved corpus (no corpus.json found)")
    return Corpus.load(corpus_dir), tokenizer or load_tokenizer(data_dir / "tokenizer.json")


def select_examples(docs: Sequence[str], max_examples: int | None) -> list[str]:
    """All of `docs`, or `max_examples` evenly spaced ones (same ones for every model)."""
    if max_examples is None or len(docs) <= max_examples:
        return list(docs)
    if max_examples < 1:
        raise ConfigError(f"max_examples={max_examples} must be >= 1")
    index = np.unique(np.linspace(0, len(docs) - 1, max_examples).round().astype(np.int64))
    return [docs[i] for i in index]


def select_by_level(task: str, docs: Sequence[str], max_examples: int | None) -> list[str]:
    """`select_examples` within each level of a structured task (`max_examples` shared as equally as
    the count allows, the easier levels taking the remainder), interleaved level by level: the same
    examples for every model."""
    by_level: dict[int, list[str]] = defaultdict(list)
    for doc in docs:
        by_level[example_level(task, doc)].append(doc)
    levels = sorted(by_level)
    if max_examples is None:
        groups = [by_level[level] for level in levels]
    else:
        if max_examples < 1:
            raise ConfigError(f"max_examples={max_examples} must be >= 1")
        per, extra = divmod(max_examples, len(levels))
        shares = [per + (i < extra) for i in range(len(levels))]
        groups = [select_examples(by_level[lv], n) for lv, n in zip(levels, shares) if n > 0]
    return [d for row in zip_longest(*groups) for d in row if d is not None]


def answer_budget(answers: Sequence[str]) -> int:
    """New tokens to generate: longest answer in UTF-8 bytes (>= its tokens) + 4 for EOS and slack."""
    return max((len(a.encode("utf-8")) for a in answers), default=0) + 4


# -- confidence intervals -------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact edges (no 1e-18 from rounding)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_ratio_ci(
    numerators: Sequence[float], denominators: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num) / sum(den), resampling items (documents) with replacement."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # bounded memory: 256 x n indices at a time
        idx = rng.integers(0, len(num), (min(256, n_boot - start), len(num)))
        stats[start : start + len(idx)] = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_ratio_diff_ci(
    num_a: Sequence[float],
    num_b: Sequence[float],
    den: Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num_a)/sum(den) - sum(num_b)/sum(den) for two models scored on
    the same items, resampling items jointly: the spread of the *difference*, far narrower than
    two separate intervals when both models find the same documents hard."""
    a, b, d = (np.asarray(v, dtype=np.float64) for v in (num_a, num_b, den))
    if not (len(a) == len(b) == len(d)) or len(a) == 0:
        raise ValueError(f"paired scores need equal, non-empty lengths; got {len(a)}, {len(b)}, {len(d)}")
    return bootstrap_ratio_ci(a - b, d, n_boot, seed, level)


# -- work accounting ------------------------------------------------------------------------------
class Work:
    """Token positions computed and forward FLOPs, from the cost model (see module docstring)."""

    def __init__(self, config, subnet: Subnet | None):
        self.tokens = 0
        self.flops = 0
        self._per_token = lru_cache(maxsize=None)(lambda keys: cost(config, subnet, keys).flops_forward)

    def forward(self, batch: int, new: int, keys: int) -> None:
        self.tokens += batch * new
        self.flops += batch * new * self._per_token(keys)

    def generate(self, batch: int, prompt: int, steps: int) -> None:
        """`steps` tokens generated: one forward over the prompt, then steps - 1 single-token ones."""
        if steps > 0:
            self.forward(batch, prompt, prompt)
        for i in range(1, steps):
            self.forward(batch, 1, prompt + i)


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _resolve_subnet(model, subnet: Subnet | str | None) -> Subnet | None:
    if isinstance(subnet, str):
        return Subnet.parse(subnet, model.config, list(getattr(model, "layer_order", [])) or None)
    return subnet


# -- text: bits per byte --------------------------------------------------------------------------
def rolling_windows(ids: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows scoring every token of `ids` once; targets of -1 are not scored.

    Same windows as lm-evaluation-harness' `get_rolling_token_windows(..., context_len=1)`.
    """
    ids = list(ids)
    if not ids:
        return []
    first = min(max_len, len(ids))
    out = [([prefix] + ids[: first - 1], ids[:first])]
    done = first
    while done < len(ids):
        new = min(len(ids) - done, max_len)
        end = done + new
        out.append((ids[end - max_len - 1 : end - 1], [-1] * (max_len - new) + ids[done:end]))
        done = end
    return out


@torch.no_grad()
def _window_nats(model, windows, subnet, device, pad_id: int, work: Work) -> np.ndarray:
    """Summed nats of the scored targets of each (inputs, targets) window, batched by length."""
    vocab = model.config.vocab_size
    budget = max(model.config.max_seq_len, (1 << 25) // vocab)  # token positions per batch: logits <= 128 MB
    order = sorted(range(len(windows)), key=lambda i: len(windows[i][0]))
    out = np.zeros(len(windows), dtype=np.float64)
    start = 0
    while start < len(order):
        longest = len(windows[order[start]][0])
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * len(windows[order[stop]][0]) <= budget:
            longest = len(windows[order[stop]][0])
            stop += 1
        rows = order[start:stop]
        x = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        y = torch.full((len(rows), longest), -1, dtype=torch.long)
        for r, i in enumerate(rows):
            inputs, targets = windows[i]
            x[r, : len(inputs)] = torch.tensor(inputs)
            y[r, : len(targets)] = torch.tensor(targets)
        logits = model(x.to(device), subnet=subnet).logits.float()
        nats = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-1, reduction="none")
        out[rows] = nats.view(len(rows), longest).double().sum(1).cpu().numpy()
        work.forward(len(rows), longest, longest)
        start = stop
    return out


def evaluate_text(
    model,
    tokenizer: Tokenizer,
    docs: Sequence[str],
    subnet=None,
    device=None,
    work: Work | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Bits per byte (and nats per token, perplexity) of `model` on `docs`; see module docstring."""
    device = device or _device_of(model)
    work = work or Work(model.config, subnet)
    encoded = [tokenizer.encode(d) for d in docs]
    keep = [i for i, ids in enumerate(encoded) if ids]
    windows, owner = [], []
    for i in keep:
        for w in rolling_windows(encoded[i], tokenizer.eos_id, model.config.max_seq_len):
            windows.append(w)
            owner.append(i)
    per_window = _window_nats(model, windows, subnet, device, tokenizer.eos_id, work)
    nats = np.zeros(len(docs))
    np.add.at(nats, np.asarray(owner, dtype=np.int64), per_window)
    nats = nats[keep]
    n_bytes = np.array([len(docs[i].encode("utf-8")) for i in keep], dtype=np.float64)
    n_tokens = np.array([len(encoded[i]) for i in keep], dtype=np.float64)
    bpb = float(nats.sum() / math.log(2) / n_bytes.sum()) if keep else float("nan")
    lo, hi = bootstrap_ratio_ci(nats / math.log(2), n_bytes, n_boot, seed)
    per_token = float(nats.sum() / n_tokens.sum()) if keep else float("nan")
    return {
        "metric": TEXT_METRIC,
        "score": bpb,
        "ci": [lo, hi],
        "n": len(keep),
        "higher_is_better": False,
        "nats_per_token": per_token,
        "perplexity": math.exp(per_token) if keep else float("nan"),
        "text_tokens": int(n_tokens.sum()),
        "text_bytes": int(n_bytes.sum()),
        # per document, for paired comparisons of two models on the same documents
        "doc_bits": [round(float(x), 4) for x in nats / math.log(2)],
        "doc_bytes": [int(x) for x in n_bytes],
    }


# -- structured tasks: exact match ----------------------------------------------------------------
@torch.no_grad()
def greedy_continuations(
    model,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    subnet=None,
    device=None,
    batch_size: int = 64,
    work: Work | None = None,
) -> list[str]:
    """Greedy continuation of `[EOS] + encode(prompt)` for each prompt, cut at EOS or newline."""
    device = device or _device_of(model)
    work = work or Work(model.config, subnet)
    eos = tokenizer.eos_id
    encoded = [[eos] + tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out = [""] * len(prompts)
    short = sum(len(m) for n, m in by_length.items() if n + max_new_tokens > model.config.max_seq_len)
    if short:  # generation stops at max_seq_len: these answers may be cut short (and scored wrong)
        log.warning(
            "%d of %d prompts leave fewer than %d new tokens before max_seq_len=%d",
            short,
            len(prompts),
            max_new_tokens,
            model.config.max_seq_len,
        )
    for length, members in sorted(by_length.items()):
        for s in range(0, len(members), batch_size):
            rows = members[s : s + batch_size]
            x = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
            y = model.generate(x, max_new_tokens, subnet=subnet, temperature=0.0, eos_id=eos)
            new = y[:, length:].tolist()
            work.generate(len(rows), length, len(new[0]) if new else 0)
            for i, ids in zip(rows, new):
                ids = ids[: ids.index(eos)] if eos in ids else ids
                out[i] = tokenizer.decode(ids).split("\n", 1)[0]
    return out


def evaluate_exact_match(
    model,
    tokenizer: Tokenizer,
    task: str,
    examples: Sequence[str],
    subnet=None,
    device=None,
    work: Work | None = None,
    batch_size: int = 64,
    samples: int = 3,
) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers on `examples` (lines of `task`); Wilson 95% CI."""
    pairs = [split_prompt_answer(task, e) for e in examples]
    answers = [a for _, a in pairs]
    predictions = greedy_continuations(
        model, tokenizer, [p for p, _ in pairs], answer_budget(answers), subnet, device, batch_size, work
    )
    correct = [int(p == a) for p, a in zip(predictions, answers)]
    levels = [example_level(task, e) for e in examples]
    k, n = sum(correct), len(correct)
    lo, hi = wilson_interval(k, n)
    return {
        "metric": EXACT_METRIC,
        "score": k / n if n else float("nan"),
        "ci": [lo, hi],
        "n": n,
        "higher_is_better": True,
        "correct": k,
        "levels": level_scores(correct, levels),
        # per example, in order, for paired comparisons of two models on the same examples
        "per_example": correct,
        "example_levels": levels,
        "samples": [{"prompt": p, "answer": a, "prediction": q} for (p, a), q in zip(pairs[:samples], predictions)],
    }


def level_scores(correct: Sequence[int], levels: Sequence[int]) -> dict[str, dict[str, float]]:
    """{level: {"exact_match", "lo", "hi", "n"}} (levels ascending, as strings for JSON): the share of
    correct answers at each level with its Wilson 95% interval."""
    out = {}
    for level in sorted(set(levels)):
        hits = [c for c, lv in zip(correct, levels) if lv == level]
        lo, hi = wilson_interval(sum(hits), len(hits))
        out[str(level)] = {"exact_match": sum(hits) / len(hits), "lo": lo, "hi": hi, "n": len(hits)}
    return out


# -- one model, all tasks -------------------------------------------------------------------------
def model_identity(model, subnet: Subnet | None = None, name: str | None = None) -> dict[str, Any]:
    """Name, sub-network, params (total / active per token) and architecture of what was evaluated."""
    c = model.config
    k = cost(c, subnet, c.max_seq_len)
    return {
        "name": name,
        "subnet": str(subnet) if subnet is not None else None,
        "params": k.total_params,
        "active_params": k.active_params,
        "config": c.to_dict(),
    }


def evaluate(
    model,
    data: Any,
    tokenizer: Tokenizer | None = None,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    subnet: Subnet | str | None = None,
    seed: int = 0,
    name: str | None = None,
    batch_size: int = 64,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Evaluate `model` (optionally running `subnet` of it) on every task of `split`.

    `data`: a RunData, a Corpus (+ `tokenizer`), or a run / data / corpus folder. Returns
    {"format", "model": identity, "split", "seed", "max_examples", "tasks": {task: {"metric",
    "score", "ci": [lo, hi], "n", "higher_is_better", ...}}, "tokens", "flops", "seconds"}.
    """
    corpus, tokenizer = load_eval_data(data, tokenizer)
    if split not in corpus.docs:
        raise ConfigError(f"corpus has no split {split!r}; have {sorted(corpus.docs)}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}"
        )
    subnet = _resolve_subnet(model, subnet)
    device = torch.device(device) if device is not None else _device_of(model)
    available = [t for t in corpus.tasks if corpus.docs[split].get(t)]
    tasks = list(tasks) if tasks is not None else available
    missing = [t for t in tasks if t not in available]
    if missing:
        raise ConfigError(f"tasks {missing} have no {split!r} examples; available: {available}")
    work, t0, was_training = Work(model.config, subnet), time.perf_counter(), model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for task in tasks:
            if task in STRUCTURED_TASKS:
                docs = select_by_level(task, corpus.docs[split][task], max_examples)
                results[task] = evaluate_exact_match(model, tokenizer, task, docs, subnet, device, work, batch_size)
                results[f"{task}{ANSWER_LOSS_SUFFIX}"] = evaluate_answer_loss(
                    model, tokenizer, task, docs, subnet, device, work, n_boot, seed
                )
            else:  # free text (the default "text" task or a user's own): bits per byte
                docs = select_examples(corpus.docs[split][task], max_examples)
                results[task] = evaluate_text(model, tokenizer, docs, subnet, device, work, n_boot, seed)
            log.info(
                "eval %s %s: %s %.4f [%.4f, %.4f] n=%d",
                name or "model",
                task,
                results[task]["metric"],
                results[task]["score"],
                *results[task]["ci"],
                results[task]["n"],
            )
    finally:
        model.train(was_training)
    return {
        "format": FORMAT,
        "model": model_identity(model, subnet, name),
        "split": split,
        "seed": seed,
        "max_examples": max_examples,
        "tasks": results,
        "tokens": work.tokens,
        "flops": work.flops,
        "seconds": time.perf_counter() - t0,
    }


def evaluate_answer_loss(
    model, tokenizer: Tokenizer, task: str, examples: Sequence[str], subnet, device, work, n_boot: int, seed: int
) -> dict[str, Any]:
    """Teacher-forced nats per token of the reference answer given `[EOS] + prompt`: a graded companion
    to exact match, which stays at 0 for every model until a model gets whole answers right (small
    models, short training), and so cannot show how much of the parent a child retains."""
    pairs = [split_prompt_answer(task, ex) for ex in examples]
    per_example = continuation_nats(model, tokenizer, pairs, subnet, device, work)
    ones = np.ones_like(per_example)
    lo, hi = bootstrap_ratio_ci(per_example, ones, n_boot, seed)
    levels = [example_level(task, e) for e in examples]
    return {
        "metric": "answer_nats_per_token",
        "score": float(per_example.mean()),
        "ci": [lo, hi],
        "n": len(per_example),
        "higher_is_better": False,
        "levels": {
            str(lv): {"answer_loss": float(per_example[[x == lv for x in levels]].mean()), "n": levels.count(lv)}
            for lv in sorted(set(levels))
        },
        "per_example": [round(float(x), 5) for x in per_example],
        "example_levels": levels,
    }


# -- retention ------------------------------------------------------------------------------------
def _tasks_of(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return result["tasks"] if "tasks" in result and isinstance(result["tasks"], dict) else result


def retention_of(parent: dict[str, Any], child: dict[str, Any]) -> float | None:
    """One task's retention (see module docstring); None where undefined."""
    p, c = float(parent["score"]), float(child["score"])
    if parent.get("higher_is_better", True):
        return c / p if p > 0 else None
    return p / c if c > 0 else None


def retention(parent_scores: dict[str, Any], child_scores: dict[str, Any]) -> dict[str, float | None]:
    """{task: retention} over the tasks both evaluations share (full results or their "tasks")."""
    parent, child = _tasks_of(parent_scores), _tasks_of(child_scores)
    for task in parent.keys() & child.keys():
        if parent[task]["metric"] != child[task]["metric"]:
            raise ConfigError(f"task {task}: parent metric {parent[task]['metric']} != child {child[task]['metric']}")
    return {t: retention_of(parent[t], child[t]) for t in parent if t in child}


def default_pairs(names: Sequence[str], parent: str = "parent") -> dict[str, tuple[str, str | None]]:
    """{child: (before, after)}: "X" with "X-ft" when both exist, else (X, None) / (None, X-ft)."""
    pairs: dict[str, tuple[str | None, str | None]] = {}
    for name in names:
        if name == parent:
            continue
        base = name[: -len(FINETUNED_SUFFIX)] if name.endswith(FINETUNED_SUFFIX) else name
        before, after = pairs.get(base, (None, None))
        pairs[base] = (before, name) if name != base else (name, after)
    return pairs  # type: ignore[return-value]


def retention_table(
    results: dict[str, dict[str, Any]],
    parent: str = "parent",
    pairs: dict[str, tuple[str | None, str | None]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (child, task): parent score, the child's before/after fine-tuning scores and
    retentions. `results`: {model name: evaluate() result}; `pairs`: {child label: (before name,
    after name)}, either may be None (default: `default_pairs`)."""
    if parent not in results:
        raise ConfigError(f"no results for the parent {parent!r}; have {sorted(results)}")
    pairs = pairs if pairs is not None else default_pairs(list(results), parent)
    ptasks = _tasks_of(results[parent])
    rows = []
    for label, (before, after) in pairs.items():
        for name in (before, after):
            if name is not None and name not in results:
                raise ConfigError(f"pair {label!r}: no results for {name!r}; have {sorted(results)}")
        for task, pt in ptasks.items():
            row = {
                "child": label,
                "task": task,
                "metric": pt["metric"],
                "higher_is_better": pt["higher_is_better"],
                "parent": pt["score"],
                "parent_ci": pt.get("ci"),
            }
            for which, name in (("before", before), ("after", after)):
                ct = _tasks_of(results[name]).get(task) if name is not None else None
                row[which] = ct["score"] if ct else None
                row[f"{which}_ci"] = ct.get("ci") if ct else None
                row[f"retention_{which}"] = retention_of(pt, ct) if ct else None
            rows.append(row)
    return rows


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_retention_table(rows: Sequence[dict[str, Any]], title: str = "Retention vs parent (1.0 = parent)"):
    """A rich Table of `retention_table` rows."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("child", "task", "metric", "parent", "before ft", "after ft", "retention before", "retention after"):
        table.add_column(col, justify="left" if col in ("child", "task", "metric") else "right")
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        table.add_row(
            r["child"],
            r["task"],
            f"{r['metric']} {arrow}",
            _fmt(r["parent"]),
            _fmt(r["before"]),
            _fmt(r["after"]),
            _fmt(r["retention_before"]),
            _fmt(r["retention_after"]),
        )
    return table


def plot_retention(rows: Sequence[dict[str, Any]], out_png: str | Path, title: str = "Retention vs parent") -> Path:
    """Grouped bars: per task, per child a pale bar (before fine-tuning) beside a solid one (after);
    a dashed line at 1.0 = the parent. Missing values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    children = list(dict.fromkeys(r["child"] for r in rows))
    width = 0.8 / max(1, 2 * len(children))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) * max(1, len(children))), 4.0))
    cmap = plt.get_cmap("tab10")
    by_key = {(r["child"], r["task"]): r for r in rows}
    for c, child in enumerate(children):
        for w, (which, alpha) in enumerate((("before", 0.45), ("after", 1.0))):
            xs, ys = [], []
            for t, task in enumerate(tasks):
                value = by_key.get((child, task), {}).get(f"retention_{which}")
                if value is not None:
                    xs.append(t - 0.4 + (2 * c + w + 0.5) * width)
                    ys.append(value)
            label = f"{child} ({'before' if which == 'before' else 'after'} ft)"
            ax.bar(xs, ys, width, color=cmap(c % 10), alpha=alpha, label=label, edgecolor="black", linewidth=0.4)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="parent")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("retention (1.0 = parent; bpb: parent/child)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# -- files ----------------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    """NaN/inf become None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_eval(path: str | Path, results: dict[str, Any]) -> Path:
    """Atomically write one evaluation (or {name: evaluation}) as strict JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(path, _json_safe(results))
    return path


def read_eval(path: str | Path) -> dict[str, Any]:
    return checkpoint.read_json(Path(path))


# -- arena: pairwise comparison on the same prompts -----------------------------------------------
def arena_examples(
    corpus: Corpus, split: str = "test", tasks: Sequence[str] | None = None, max_per_task: int | None = 50
) -> list[tuple[str, str, str]]:
    """(task, prompt, reference continuation): structured examples split at the answer; text
    documents as a whole continuation of an empty prompt."""
    out = []
    for task in tasks or corpus.tasks:
        for doc in select_examples(corpus.docs[split].get(task, []), max_per_task):
            out.append((task, *split_prompt_answer(task, doc)) if task in STRUCTURED_TASKS else (task, "", doc))
    return out


@torch.no_grad()
def continuation_nats(
    model, tokenizer: Tokenizer, examples: Sequence[tuple[str, str]], subnet=None, device=None, work: Work | None = None
) -> np.ndarray:
    """Mean nats per token of each reference continuation given `[EOS] + prompt` (truncated to the
    model's context; at least one continuation token is always scored)."""
    device = device or _device_of(model)
    max_len, eos = model.config.max_seq_len, tokenizer.eos_id
    windows = []
    for prompt, continuation in examples:
        p = tokenizer.encode(prompt)
        full = tokenizer.encode(prompt + continuation)
        c = full[len(p) :] if full[: len(p)] == p else tokenizer.encode(continuation)
        if not c:
            raise ConfigError(f"empty continuation for prompt {prompt[:40]!r}")
        c = c[: max_len - 1]  # at most max_len - 1 scored tokens, so at least one context token fits
        seq = ([eos] + p)[-(max_len + 1 - len(c)) :] + c
        windows.append((seq[:-1], [-1] * (len(seq) - 1 - len(c)) + c))
    nats = _window_nats(model, windows, subnet, device, eos, work or Work(model.config, subnet))
    counts = np.array([sum(t >= 0 for t in w[1]) for w in windows], dtype=np.float64)
    return nats / counts


def bradley_terry(wins: np.ndarray, prior: float = 0.5, iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Strengths (geometric mean 1) from wins[i, j] = times i beat j, by Hunter's MM updates."""
    w = np.asarray(wins, dtype=np.float64) + prior * (1 - np.eye(len(wins)))
    games = w + w.T
    p = np.ones(len(w))
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        new = w.sum(1) / denom
        new /= np.exp(np.log(new).mean())
        if np.abs(new - p).max() < tol:
            return new
        p = new
    return p


def _outcomes(losses: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """wins[i, j] over prompts `rows`: i beats j on a prompt when its loss is lower; ties count half."""
    L = losses[rows]
    diff = L[:, :, None] - L[:, None, :]  # prompts x i x j
    tie = np.abs(diff) <= 1e-9 * np.maximum(1.0, np.abs(L[:, :, None]))
    wins = ((diff < 0) & ~tie).sum(0) + 0.5 * tie.sum(0)
    np.fill_diagonal(wins, 0.0)
    return wins


def pairwise_ratings(
    models: dict[str, Any],
    examples: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    *,
    device=None,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Arena ratings of `models` ({name: model or (model, subnet)}) on the same (prompt,
    continuation) examples (`arena_examples` gives (task, prompt, continuation); the task is dropped).
    Returns {"ratings": {name: {"rating", "ci", "wins", "losses", "ties", "mean_nats"}}, "n_prompts",
    "wins": matrix, "names"}."""
    examples = [e[-2:] for e in examples]
    names = list(models)
    if len(names) < 2 or not examples:
        raise ConfigError("pairwise ratings need at least two models and one example")
    columns = []
    for name in names:
        model, subnet = models[name] if isinstance(models[name], tuple) else (models[name], None)
        columns.append(continuation_nats(model, tokenizer, examples, _resolve_subnet(model, subnet), device))
    losses = np.stack(columns, 1)
    wins = _outcomes(losses, np.arange(len(examples)))
    elo = 1000 + 400 * np.log10(bradley_terry(wins))
    rng = np.random.default_rng(seed)
    boot = np.stack(
        [
            1000 + 400 * np.log10(bradley_terry(_outcomes(losses, rng.integers(0, len(examples), len(examples)))))
            for _ in range(n_boot)
        ]
    )
    lo, hi = np.quantile(boot, [0.025, 0.975], axis=0)
    ratings = {}
    for i, name in enumerate(names):
        diff = losses[:, [i]] - np.delete(losses, i, axis=1)
        tie = np.abs(diff) <= 1e-9 * np.maximum(1.0, np.abs(losses[:, [i]]))
        ratings[name] = {
            "rating": float(elo[i]),
            "ci": [float(lo[i]), float(hi[i])],
            "wins": int(((diff < 0) & ~tie).sum()),
            "losses": int(((diff > 0) & ~tie).sum()),
            "ties": int(tie.sum()),
            "mean_nats": float(losses[:, i].mean()),
        }
    return {"names": names, "ratings": ratings, "n_prompts": len(examples), "wins": wins.tolist()}


__all__ = [
    "answer_budget",
    "arena_examples",
    "bootstrap_ratio_ci",
    "paired_ratio_diff_ci",
    "bradley_terry",
    "continuation_nats",
    "default_pairs",
    "evaluate",
    "evaluate_exact_match",
    "evaluate_text",
    "format_retention_table",
    "greedy_continuations",
    "load_eval_data",
    "model_identity",
    "pairwise_ratings",
    "plot_retention",
    "read_eval",
    "retention",
    "retention_of",
    "retention_table",
    "rolling_windows",
    "level_scores",
    "select_by_level",
    "select_examples",
    "wilson_interval",
    "write_eval",
]
