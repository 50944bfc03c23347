"""Data: the embedded default corpus, user data, token shards, and resumable batches.

Why an embedded corpus: the pipeline must run on a machine with no network. The default mixes
one "high-entropy" natural-language task with four structured tasks whose answers can be
checked by exact match, so retention of a sub-network is measurable per skill:

    text    English prose from the Python installation (pydoc topics + stdlib docstrings)
    kv      key-value retrieval from context: n single-letter keys with 2-digit values, then
            every key queried once in random order; the graded answer is the last query's
            kv: q=38 a=97 m=15 ? a=97 ? m=15 ? q=38
    arith   addition / subtraction of operands in [0, 10^d), never negative, written with a
            fixed width (operands zero-padded to d digits, answers to d + 1) and the answer
            REVERSED, least-significant digit first (the order in which carries and borrows are
            computed): 482+39 = 521 is written
            arith: 482+039 = 1250
    sort    sorting n digits from a small alphabet (0-3 by default)
            sort: 3 2 0 2 -> 0 2 2 3
    find    longer-context retrieval: n records "id tag value", then up to 3 queries: an id, and
            the value of the record with that id (the last is graded)
            find: 417 k 52; 803 b 96; 155 k 17 ? 155 -> 17 ? 417 -> 52 ? 803 -> 96

Each task is graded by difficulty (`TaskSpec`: kv pairs 1/2/4/8, arith digits 1-4, sort length
3/5/7/9, find records 1/2/4/8 by default); every held-out split holds the same number of examples
of each level, so exact match is scored per level (`example_level`).

Digits are single tokens (see tokenizer.py), keys single letters, so a prompt is short and a
retrieval is a one-token match.

Answer convention (`split_prompt_answer`): a structured example is one line; the prompt is the
line up to and including the *last* separator ("=" for kv, " -> " for sort and find, " = " for
arith); the answer is the rest of the line (always digits, and spaces for sort). Every
document is followed by EOS in the token stream (`tokenize_docs`), so a model learns to emit EOS
right after the answer. How generation stops: the evaluator feeds [EOS] + encode(prompt),
generates greedily until EOS, a newline, or `answer_budget` tokens, cuts the continuation at the
first EOS or newline, and compares the decoded string with the answer exactly. Answers hold no
newline and no EOS, so this delimiter is unambiguous.

Splits: "train"; "val" (importance / model selection); "search" (sub-network search); "test"
(final evaluation only). Text documents go to a split by a hash of their content. Structured
examples: every split samples the SAME generator (disjoint seeded RNG streams); the held-out splits
hold distinct examples of every level (test, then search, then val, each excluding the earlier
ones) and train drops every exact duplicate of a held-out example (never the other way round,
which would skew the held-out splits towards small buckets). So no string is in two splits and
train and test follow one distribution within every level (checked per level and bucket,
`example_bucket`, in tests/test_data.py); train's level mix is `TaskSpec.level_weights`.

Training reads far more structured examples than before (`TaskSpec.train`, repeats allowed as in
an endless stream), so the default run sees each about once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import math
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError

logger = logging.getLogger(__name__)

TASKS = ("text", "kv", "arith", "sort", "find")
STRUCTURED_TASKS = ("kv", "arith", "sort", "find")
SPLITS = ("train", "val", "search", "test")
SEPARATORS = {"kv": "=", "arith": " = ", "sort": " -> ", "find": " -> "}
# The default training mix (share of the rows of every batch; see tokens.StratifiedBatches), used
# when a recipe on the embedded corpus sets no data.task_weights. Eighths: a batch of 8 gets the
# same rows every step. Text keeps a quarter (measured, bench/TASKS.md: an eighth cost 0.8 nats per
# text token of validation loss on the tiny parent and bought no measurable task accuracy).
DEFAULT_TASK_WEIGHTS = {"text": 2 / 8, "kv": 2 / 8, "arith": 2 / 8, "sort": 1 / 8, "find": 1 / 8}
# Fraction of text documents per split (by content hash); structured counts are in TaskSpec.
TEXT_FRACTIONS = {"train": 0.90, "val": 0.04, "search": 0.03, "test": 0.03}
CORPUS_FILE = "corpus.json"

# Pure-python (or always-built) standard library modules whose docstrings are English prose.
# The list is fixed so the corpus is the same on every run on a given Python installation.
DOC_MODULES = tuple(
    """
    abc argparse ast base64 bisect calendar cmd code codecs collections colorsys concurrent.futures
    configparser contextlib copy csv dataclasses datetime decimal difflib doctest email.message enum
    filecmp fnmatch fractions ftplib functools getopt gettext glob graphlib gzip heapq hmac
    html.parser http.client imaplib inspect io ipaddress json locale logging mailbox netrc numbers
    operator optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random
    re runpy sched secrets selectors shlex shutil smtplib statistics string struct subprocess
    symtable tarfile tempfile textwrap threading timeit tokenize trace traceback types typing
    unittest urllib.parse uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree zipfile
    zoneinfo
    """.split()
)


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Documents by split and task: `docs[split][task]` is a list of strings."""

    docs: dict[str, dict[str, list[str]]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return sorted({task for by_task in self.docs.values() for task in by_task}, key=_task_order)

    def texts(self, split: str = "train") -> Iterator[str]:
        """All documents of one split, task by task (e.g. to train the tokenizer on)."""
        if split not in self.docs:
            raise ConfigError(f"corpus has no split {split!r}; allowed: {sorted(self.docs)}")
        for task in sorted(self.docs[split], key=_task_order):
            yield from self.docs[split][task]

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """{split: {task: {"docs": n, "chars": n}}} for logs and the run report."""
        return {
            s: {t: {"docs": len(d), "chars": sum(map(len, d))} for t, d in by_task.items()}
            for s, by_task in self.docs.items()
        }

    def merged(self, other: Corpus) -> Corpus:
        """A copy where `other`'s tasks are added, replacing same-named tasks (e.g. user text)."""
        docs = {s: dict(by_task) for s, by_task in self.docs.items()}
        for s, by_task in other.docs.items():
            docs.setdefault(s, {}).update(by_task)
        return Corpus(docs, {**self.meta, "merged": other.meta})

    def save(self, folder: str | Path) -> Path:
        """Write `folder/<split>/<task>.jsonl` (one {"text": ...} per line) and corpus.json."""
        folder = Path(folder)
        files = {}
        for s, by_task in self.docs.items():
            (folder / s).mkdir(parents=True, exist_ok=True)
            for task, docs in by_task.items():
                path = folder / s / f"{task}.jsonl"
                lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
                path.write_text(lines, encoding="utf-8")
                files[f"{s}/{task}.jsonl"] = hashlib.sha256(lines.encode()).hexdigest()
        info = {"format": "elasticmoe-corpus", "meta": self.meta, "stats": self.stats(), "sha256": files}
        (folder / CORPUS_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Corpus:
        """Read a folder written by `save`; checksums must match (the run trains on exactly this)."""
        folder = Path(folder)
        if not (folder / CORPUS_FILE).is_file():
            raise ConfigError(f"{folder} is not a saved corpus (no {CORPUS_FILE})")
        info = json.loads((folder / CORPUS_FILE).read_text())
        docs: dict[str, dict[str, list[str]]] = {}
        for rel, digest in info["sha256"].items():
            path = folder / rel
            if not path.is_file():
                raise ConfigError(f"corpus file {path} is missing")
            raw = path.read_bytes()
            if hashlib.sha256(raw).hexdigest() != digest:
                raise ConfigError(f"corpus file {path} does not match its checksum in {CORPUS_FILE}")
            split, task = rel[: -len(".jsonl")].split("/")
            # split on "\n" only: JSON escapes it, but not U+2028 and friends that splitlines() breaks on
            lines = [line for line in raw.decode("utf-8").split("\n") if line]
            docs.setdefault(split, {})[task] = [json.loads(line)["text"] for line in lines]
        return cls(docs, info.get("meta", {}))


def _task_order(task: str) -> tuple[int, str]:
    return (TASKS.index(task) if task in TASKS else len(TASKS), task)


@dataclass(frozen=True)
class TaskSpec:
    """The structured tasks: difficulty levels, formats, and example counts at scale 1.0.

    One difficulty knob per task, graded in levels so that every model, however small, is measured
    at a level it can reach (a model at 0% everywhere says nothing about what a child retains):

        kv_levels      key-value pairs in the context (every key is then queried once)
        arith_levels   operand digits (operands uniform in [0, 10^d), zero-padded to d digits)
        sort_levels    numbers to sort
        find_levels    records in the table

    Training draws each example's level from `level_weights` (one weight per position in a task's
    levels, the same for every task; empty: uniform): the level mix of the training stream is a
    recipe knob (`data.task_spec.level_weights`); `data.curriculum` lets the levels enter easiest
    first over the run instead (the batches do it, tokens.StratifiedBatches: this split is the same
    either way). Every held-out split holds `held_out` examples
    of *every* level (val, search, test), so each level is scored on its own. A level with few
    possible examples (arith with 1 digit: 155; sort of 3 over 0-3: 64) gives at most half of them
    to the held-out splits. Sort draws from 0-3: a small alphabet sorts far better at `tiny`'s
    budget (bench/TASKS.md, format ablation: 31-33% at length 5 vs 3-6% over 0-9, 2 seeds).
    Counts `train` are per task (kv, arith, sort, find), over all levels; at scale 1.0 the train
    split holds more examples than the default `tiny` run reads, so each is seen about once.
    """

    kv_levels: tuple[int, ...] = (1, 2, 4, 8)
    arith_levels: tuple[int, ...] = (1, 2, 3, 4)
    sort_levels: tuple[int, ...] = (3, 5, 7, 9)
    find_levels: tuple[int, ...] = (1, 2, 4, 8)
    level_weights: tuple[float, ...] = ()
    kv_value_digits: tuple[int, int] = (2, 2)  # fixed width: a value's digits sit at fixed offsets
    arith_ops: str = "+-"
    arith_reversed: bool = True  # answers least-significant digit first (482+39 = 125 means 521)
    sort_value_max: int = 3  # sort over 0-3: a small alphabet (bench/TASKS.md, format ablation)
    find_queries: int = 3
    train: tuple[int, ...] = (12000, 30000, 12000, 6000)  # kv, arith, sort, find
    held_out: tuple[int, int, int] = (50, 50, 100)  # val, search, test: per level of each task

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):  # lists from YAML -> tuples
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        p = []
        top = {"kv": len(_KV_KEYS), "arith": 18, "sort": 64, "find": 900}  # single-letter keys, 3-digit ids
        for task in STRUCTURED_TASKS:
            name, levels = f"{task}_levels", getattr(self, f"{task}_levels")
            ok = isinstance(levels, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in levels)
            if (
                not ok
                or not levels
                or list(levels) != sorted(set(levels))
                or not 1 <= levels[0] <= levels[-1] <= top[task]
            ):
                p.append(f"{name}={list(levels) if ok else levels!r} must be increasing integers in [1, {top[task]}]")
        counts = {len(self.levels(t)) for t in STRUCTURED_TASKS}
        if self.level_weights:
            if len(counts) > 1 or len(self.level_weights) not in counts:
                p.append(f"level_weights={list(self.level_weights)} needs one weight per level of every task")
            elif any(not w >= 0 for w in self.level_weights) or not sum(self.level_weights) > 0:
                p.append(f"level_weights={list(self.level_weights)} must be >= 0 and not all 0")
        lo, hi = self.kv_value_digits
        if not 1 <= lo <= hi:
            p.append(f"kv_value_digits={[lo, hi]} must be [min, max] with 1 <= min <= max")
        if not self.arith_ops or set(self.arith_ops) - set("+-"):
            p.append(f"arith_ops={self.arith_ops!r} must be a non-empty mix of '+' and '-'")
        if self.find_queries < 1:
            p.append(f"find_queries={self.find_queries} must be >= 1")
        if self.sort_value_max < 0:
            p.append("sort_value_max must be >= 0")
        if len(self.train) != len(STRUCTURED_TASKS) or len(self.held_out) != 3:
            p.append(
                f"train needs {len(STRUCTURED_TASKS)} counts {list(STRUCTURED_TASKS)}, held_out 3 (val, search, test)"
            )
        if min(self.train + self.held_out, default=0) < 0:
            p.append("example counts must be >= 0")
        if p:
            raise ConfigError("; ".join(p))

    def levels(self, task: str) -> tuple[int, ...]:
        if task not in STRUCTURED_TASKS:
            raise ConfigError(f"unknown structured task {task!r}; allowed: {list(STRUCTURED_TASKS)}")
        return getattr(self, f"{task}_levels")

    def counts(self, scale: float) -> dict[str, dict[str, Any]]:
        """{task: {"train": n, "val" / "search" / "test": {level: n}}}; a non-zero count stays at
        least 1 however small the scale, and a level's held-out splits together take at most half
        of its possible examples (`level_space`), shared in proportion to `held_out`."""

        def scaled(n: int) -> int:
            return max(1, round(n * scale)) if n else 0

        out: dict[str, dict[str, Any]] = {}
        for i, task in enumerate(STRUCTURED_TASKS):
            out[task] = {"train": scaled(self.train[i]), "val": {}, "search": {}, "test": {}}
            for level in self.levels(task):
                want = [scaled(n) for n in self.held_out]
                fit = min(1.0, level_space(task, level, self) // 2 / max(1, sum(want)))
                for split, n in zip(("val", "search", "test"), want):
                    out[task][split][level] = int(n * fit) if fit < 1 else n
        return out


_KV_KEYS = "abcdefghijklmnopqrstuvwxyz"  # single letters: one token each


def task_spec_from(fields: dict[str, Any]) -> TaskSpec:
    """A TaskSpec with `fields` changed (a recipe's `data.task_spec`); unknown names are an error."""
    allowed = [f.name for f in dataclasses.fields(TaskSpec)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown}; allowed: {allowed}")
    return TaskSpec(**fields)


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
    """A number whose digit count is uniform in `digits` (leading digit non-zero)."""
    d = rng.randint(*digits)
    return rng.randint(10 ** (d - 1) if d > 1 else 0, 10**d - 1)


def level_space(task: str, level: int, spec: TaskSpec) -> int:
    """How many distinct examples a level can produce (a lower bound where the query order adds more)."""
    if task == "kv":
        lo, hi = spec.kv_value_digits
        values = sum(10**d - (10 ** (d - 1) if d > 1 else 0) for d in range(lo, hi + 1))
        return math.perm(len(_KV_KEYS), level) * values**level
    if task == "arith":
        n = 10**level
        return ("+" in spec.arith_ops) * n * n + ("-" in spec.arith_ops) * n * (n + 1) // 2
    if task == "sort":
        return (spec.sort_value_max + 1) ** level
    if task == "find":
        return math.perm(900, level) * (26 * 90) ** level
    raise ConfigError(f"unknown structured task {task!r}; allowed: {list(STRUCTURED_TASKS)}")


def draw_level(task: str, rng: random.Random, spec: TaskSpec) -> int:
    """A training example's level, drawn from `spec.level_weights` (uniform when empty)."""
    levels = spec.levels(task)
    return rng.choices(levels, weights=spec.level_weights or None)[0]


def make_example(task: str, rng: random.Random, spec: TaskSpec | None = None, level: int | None = None) -> str:
    """One structured example line (no trailing newline) drawn from `rng`, at `level` (default: drawn
    from the spec's training mix). The held-out splits and train call this same generator."""
    spec = spec or TaskSpec()
    level = draw_level(task, rng, spec) if level is None else level
    if task == "kv":
        # Every key is queried once, in a random order: each query is a retrieval the model learns
        # from (dense supervision); the graded answer is the last one.
        keys = rng.sample(_KV_KEYS, level)
        values = dict(zip(keys, (_number(rng, spec.kv_value_digits) for _ in keys)))
        pairs = " ".join(f"{k}={v}" for k, v in values.items())
        queries = " ".join(f"? {k}={values[k]}" for k in rng.sample(keys, len(keys)))
        return f"kv: {pairs} {queries}"
    if task == "arith":
        # Operands uniform in [0, 10^level), zero-padded to `level` digits, the answer to level + 1.
        a, b = (rng.randrange(10**level) for _ in range(2))
        op = rng.choice(spec.arith_ops)
        if op == "-" and a < b:
            a, b = b, a  # answers stay non-negative
        answer = str(a + b if op == "+" else a - b).zfill(level + 1)
        return f"arith: {a:0{level}d}{op}{b:0{level}d} = {answer[::-1] if spec.arith_reversed else answer}"
    if task == "sort":
        values = [rng.randint(0, spec.sort_value_max) for _ in range(level)]
        return f"sort: {' '.join(map(str, values))} -> {' '.join(map(str, sorted(values)))}"
    if task == "find":
        # Records "id tag value"; each query names an id, the answer is that record's value.
        ids = rng.sample(range(100, 1000), level)
        records = [(i, rng.choice(_KV_KEYS), rng.randint(10, 99)) for i in ids]
        table = "; ".join(f"{i} {tag} {v}" for i, tag, v in records)
        queries = " ".join(f"? {i} -> {v}" for i, _, v in rng.sample(records, min(level, spec.find_queries)))
        return f"find: {table} {queries}"
    raise ConfigError(f"unknown structured task {task!r}; allowed: {list(STRUCTURED_TASKS)}")


def _context(task: str, example: str) -> str:
    prompt, _ = split_prompt_answer(task, example)
    return prompt[len(task) + 2 : -len(SEPARATORS[task])].split(" ? ")[0]  # the context, before any query


def example_level(task: str, example: str) -> int:
    """The level of an example, read from its text: kv pairs, arith operand digits (the padded
    width), sort length, find records."""
    body = _context(task, example)
    if task == "kv":
        return body.count("=")
    if task == "sort":
        return len(body.split())
    if task == "find":
        return body.count(";") + 1
    if task == "arith":
        return len(re.match(r"\d+", body).group())
    raise ConfigError(f"unknown structured task {task!r}; allowed: {list(STRUCTURED_TASKS)}")


def example_bucket(task: str, example: str) -> str:
    """A feature of an example *within* its level, for checking that splits share one distribution
    at every level: arith operand significant digits and operator ("3+2"), the smallest number of
    a sort, the leading digit of the graded answer of kv and find."""
    _, answer = split_prompt_answer(task, example)
    if task == "arith":
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", _context(task, example)).groups()
        return f"{len(str(int(a)))}{op}{len(str(int(b)))}"  # significant digits
    if task in ("sort", "kv", "find"):
        return answer[0]
    raise ConfigError(f"unknown structured task {task!r}; allowed: {list(STRUCTURED_TASKS)}")


def split_prompt_answer(task: str, example: str) -> tuple[str, str]:
    """(prompt, answer): prompt ends with the task's separator (space included), answer is the rest.

    Trailing newlines are dropped from the answer, so `prompt + answer == example.rstrip("\\n")`.
    """
    if task not in SEPARATORS:
        raise ConfigError(f"task {task!r} has no prompt/answer form; allowed: {sorted(SEPARATORS)}")
    line = example.rstrip("\n")
    head, sep, answer = line.rpartition(SEPARATORS[task])
    if not sep or not line.startswith(f"{task}: "):
        raise ConfigError(f"not a {task} example (expected '{task}: ...{SEPARATORS[task]}answer'): {example!r}")
    return head + sep, answer


# Where the answers of a structured example are: kv's queried values and find's queried fields
# (every query is an answer, the last one is the graded one), the text after the separator else.
_QUERY_ANSWERS = {"kv": re.compile(r"\? [^ =]+=(\d+)"), "find": re.compile(r"\? \d+ -> (\d+)")}


def answer_spans(task: str, example: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the answers in one structured example (data.loss_on=answers
    trains on these and on the EOS after them). Unknown tasks, e.g. text, have none."""
    if task in _QUERY_ANSWERS:
        return [m.span(1) for m in _QUERY_ANSWERS[task].finditer(example)]
    if task in SEPARATORS:
        prompt, answer = split_prompt_answer(task, example)
        return [(len(prompt), len(prompt) + len(answer))] if answer else []
    return []


def generate_examples(
    task: str, n: int, rng: random.Random, exclude: set[str], spec: TaskSpec, level: int | None = None
) -> list[str]:
    """Up to `n` distinct examples (at `level`, else drawn) not in `exclude` (a held-out split). A
    small task space yields fewer (logged)."""
    out: dict[str, None] = {}
    attempts = 0
    while len(out) < n and attempts < 20 * n + 1000:
        attempts += 1
        example = make_example(task, rng, spec, level)
        if example not in exclude:
            out[example] = None
    if len(out) < n:
        logger.warning("task %s: only %d distinct examples of %d requested (small task space)", task, len(out), n)
    return list(out)


def sample_examples(task: str, n: int, rng: random.Random, exclude: set[str], spec: TaskSpec) -> list[str]:
    """`n` independent draws (repeats allowed, as in an endless stream) minus those in `exclude`.

    Dropping only the exact duplicates of held-out items, and not repeats within the sample, keeps
    the sample's distribution that of the generator within every level: only levels with few
    possible examples lose a share, in proportion to how much of them the held-out splits hold."""
    out = []
    for _ in range(n):
        example = make_example(task, rng, spec)
        if example not in exclude:
            out.append(example)
    return out


def _rng(seed: int, task: str, split: str, level: int | None = None) -> random.Random:
    # String seeds hash with SHA-512 inside `random`: stable across processes and PYTHONHASHSEED.
    return random.Random(f"elasticmoe/{seed}/{task}/{split}" + (f"/{level}" if level is not None else ""))


def build_structured(seed: int = 0, scale: float = 1.0, spec: TaskSpec | None = None) -> Corpus:
    """The structured tasks. Every split samples the same generator (its own seeded stream); the
    held-out splits hold distinct examples of every level (test, then search, then val, each
    excluding the earlier ones), interleaved level by level so that any evenly spaced subset keeps
    the levels balanced, and train drops every exact duplicate of a held-out example."""
    spec = spec or TaskSpec()
    docs: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for task, counts in spec.counts(scale).items():
        held: set[str] = set()
        for split in ("test", "search", "val"):
            by_level = []
            for level in spec.levels(task):
                rng = _rng(seed, task, split, level)
                examples = generate_examples(task, counts[split][level], rng, held, spec, level)
                held.update(examples)
                by_level.append(examples)
            docs[split][task] = [ex for row in itertools.zip_longest(*by_level) for ex in row if ex is not None]
        docs["train"][task] = sample_examples(task, counts["train"], _rng(seed, task, "train"), held, spec)
    return Corpus(docs, {"seed": seed, "scale": scale, "task_spec": dataclasses.asdict(spec)})


def chunk_text(text: str, target_chars: int = 400, max_chars: int = 1500) -> list[str]:
    """Split on blank lines and merge paragraphs into documents of about `target_chars`.

    Why: a whole pydoc topic is too big a unit for a hash split (val/test would get a handful
    of topics); single paragraphs are too small to teach long-range structure.
    """
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n").rstrip()
        if not para.strip():
            continue
        while len(para) > max_chars:  # cut an over-long paragraph at a line end, else a space
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else para.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut].rstrip())
            para = para[cut:].lstrip("\n ")
        if para.strip():
            pieces.append(para)
    docs, current = [], ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= target_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def stdlib_texts(modules: Sequence[str] = DOC_MODULES) -> list[str]:
    """pydoc topics, then docstrings of `modules` (module, public classes/functions, methods)."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a trimmed Python build: skip, the corpus just gets smaller
            logger.info("docstrings: module %s not importable, skipped", name)
            continue
        texts.extend(_module_docstrings(module))
    return list(dict.fromkeys(texts))


def _module_docstrings(module: Any) -> list[str]:
    out = [module.__doc__] if isinstance(module.__doc__, str) else []
    with warnings.catch_warnings():  # some attributes (typing.io ...) warn when touched
        warnings.simplefilter("ignore")
        for name in sorted(dir(module)):
            obj = getattr(module, name, None)
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue  # private, or re-exported from another module
            if isinstance(getattr(obj, "__doc__", None), str):
                out.append(obj.__doc__)
            if inspect.isclass(obj):
                for attr, value in sorted(vars(obj).items()):
                    value = getattr(value, "__func__", value)
                    if not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                        if isinstance(value.__doc__, str):
                            out.append(value.__doc__)
    return [inspect.cleandoc(d) for d in out if d.strip()]


def hash_split(doc: str, fractions: dict[str, float] | None = None, salt: str = "") -> str:
    """The split of a document, from the SHA-256 of its text: stable, seed-independent, no leakage.

    A different `salt` gives an independent draw (used to subsample without biasing the splits).
    """
    fractions = fractions or TEXT_FRACTIONS
    u = int.from_bytes(hashlib.sha256((salt + doc).encode("utf-8")).digest()[:8], "big") / 2**64
    total, acc = sum(fractions.values()), 0.0
    for split, frac in fractions.items():
        acc += frac / total
        if u < acc:
            return split
    return next(reversed(fractions))


def corpus_from_texts(texts: Iterable[str], task: str = "text", fractions: dict[str, float] | None = None) -> Corpus:
    """One task from free text: exact duplicates dropped, each document hash-assigned to a split."""
    fractions = fractions or TEXT_FRACTIONS
    docs: dict[str, dict[str, list[str]]] = {s: {task: []} for s in fractions}
    for doc in dict.fromkeys(texts):
        docs[hash_split(doc, fractions)][task].append(doc)
    return Corpus(docs, {"task": task, "fractions": fractions})


def build_default_corpus(
    seed: int = 0,
    scale: float = 1.0,
    *,
    tasks: Sequence[str] = TASKS,
    spec: TaskSpec | None = None,
    text_fraction: float = 1.0,
) -> Corpus:
    """The embedded corpus: stdlib text + structured tasks, deterministic for (seed, scale).

    `scale` multiplies the structured example counts (0.05 gives a corpus for tests);
    `text_fraction` keeps that fraction of the text documents, chosen by hash (same docs every run).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError(f"tasks={list(tasks)}: unknown or empty; allowed: {list(TASKS)}")
    if not scale > 0 or not 0 < text_fraction <= 1:
        raise ConfigError(f"scale={scale} must be > 0 and text_fraction={text_fraction} in (0, 1]")
    meta: dict[str, Any] = {"seed": seed, "scale": scale, "tasks": list(tasks), "text_fraction": text_fraction}
    docs: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    if "text" in tasks:
        texts = [d for t in stdlib_texts() for d in chunk_text(t)]
        if text_fraction < 1:
            keep = {"keep": text_fraction, "drop": 1 - text_fraction}
            texts = [d for d in texts if hash_split(d, keep, salt="subsample/") == "keep"]
        for s, by_task in corpus_from_texts(texts).docs.items():
            docs[s]["text"] = by_task["text"]
    structured = [t for t in tasks if t in STRUCTURED_TASKS]
    if structured:
        extra = build_structured(seed, scale, spec)
        for s in SPLITS:
            docs[s].update({t: extra.docs[s][t] for t in structured})
        meta["task_spec"] = extra.meta["task_spec"]
    return Corpus(docs, meta)


# ----------------------------------------------------------------------------- user data

_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def load_user_texts(paths: Sequence[str | Path], text_field: str = "text", doc_mode: str = "paragraphs") -> list[str]:
    """Documents from text files, globs, folders, JSONL files and local HF dataset folders.

    Text files become one document each (`doc_mode="file"`) or are chunked on blank lines
    (`"paragraphs"`, the default, so a single large file still fills every split). JSONL gives
    one document per line from `text_field`. A folder holding a saved Hugging Face dataset is read
    with `datasets.load_from_disk` (all its splits); any other folder contributes its text and
    JSONL files, recursively. Use `corpus_from_texts` to turn the result into task "text".
    """
    if doc_mode not in ("file", "paragraphs"):
        raise ConfigError(f"doc_mode={doc_mode!r}; allowed: 'file', 'paragraphs'")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for raw in paths:
        for path in _expand(str(raw)):
            if path.is_dir():
                docs.extend(_load_hf_dataset(path, text_field))
            elif path.suffix == ".jsonl":
                docs.extend(_load_jsonl(path, text_field))
            else:
                text = path.read_text(encoding="utf-8", errors="replace")
                _warn_if_binary(path, text)
                docs.extend([text] if doc_mode == "file" else chunk_text(text))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ConfigError(f"user data {[str(p) for p in paths]} holds no non-empty document")
    return docs


BINARY_SHARE = 0.01  # a text file with more undecodable bytes or control characters than this is flagged


def _warn_if_binary(path: Path, text: str) -> None:
    """Warn (not refuse: a corpus may hold a few damaged bytes) when a data file does not look like
    text: more than BINARY_SHARE of its characters are not UTF-8 or are control characters."""
    sample = text[: 1 << 20]  # the first MiB tells
    bad = sample.count("\ufffd") + len(re.findall(r"[\x00-\x08\x0b\x0e-\x1f]", sample))
    if sample and bad > BINARY_SHARE * len(sample):
        logger.warning(
            "%s does not look like text: %.0f%% of its characters are not UTF-8 or are control characters "
            "(a binary file?); it is trained on as it is",
            path,
            100 * bad / len(sample),
        )


def _expand(raw: str, what: str = "data path") -> list[Path]:
    """A glob's sorted matches (files, HF dataset folders) or the path (a folder: its text files)."""
    if any(c in raw for c in "*?[") and not Path(raw).exists():  # a file literally named `a[1].txt` is that file
        matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True))]
        if what == "token shard":
            matches = [m for m in matches if m.suffix != ".json"]  # sidecars are not shards
        if not matches:
            raise ConfigError(f"{what} glob {raw!r} matches no file")
        return [m for m in matches if m.is_file() or _is_hf_dataset(m)]
    path = Path(raw)
    if not path.exists():
        raise ConfigError(f"{what} {raw} does not exist")
    if not path.is_dir() and not path.is_file():
        raise ConfigError(f"{what} {raw} is not a regular file (a device, pipe or socket is never read as data)")
    if what == "data path" and path.is_dir() and not _is_hf_dataset(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*_TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise ConfigError(f"data folder {raw} has no {', '.join((*_TEXT_SUFFIXES, '.jsonl'))} file")
        return files
    return [path]


def _is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _HF_MARKERS)


def _load_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"{path}:{number}: no string field {text_field!r} (found {keys})")
            docs.append(record[text_field])
    return docs


def _load_hf_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"{path} is a Hugging Face dataset folder: pip install datasets") from None
    loaded = datasets.load_from_disk(str(path))
    parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    docs = []
    for part in parts:
        if text_field not in part.column_names:
            raise ConfigError(f"{path}: no column {text_field!r} (columns: {part.column_names})")
        docs.extend(str(t) for t in part[text_field] if t is not None)
    return docs
