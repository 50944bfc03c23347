"""The models of an arena: which folders of a run take part, their answers, and the prompts to draw.

Answers come from the eval stage's generation (`evaluate.greedy_continuations`: `[EOS] + prompt`,
greedy, cut at EOS or the first newline), at most `max_new_tokens` new tokens and never past the
smallest model's context. Greedy answers depend only on (model, prompt), so they are cached.
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..checkpoint import load_model
from ..config import ConfigError
from ..evaluate import arena_examples, greedy_continuations, load_eval_data
from ..evaluate_run import name_models
from ..train import resolve_device

MAX_PROMPT_CHARS = 2000  # a typed prompt longer than this is refused before it is tokenized
MIN_NEW_TOKENS = 4  # a prompt must leave every model room for at least this many new tokens
TEXT_PROMPT_CHARS = 60  # held-out text documents are drawn as their first words, up to this long


class PromptError(ConfigError):
    """A prompt the arena refuses (empty, too long); the message says why."""


def family_folders(run_dir: Path | str) -> dict[str, Path]:
    """Every finished model folder of a run, by the names `eval` gives them: the parent, children,
    fine-tuned children (`X-ft`) and baselines."""
    run = Path(run_dir)
    found = [run / "parent", *sorted((run / "children").glob("*")), *sorted((run / "finetuned").glob("*/model"))]
    found += sorted((run / "baselines").glob("*/parent"))
    folders = [f for f in found if (f / "manifest.json").is_file() and (f / "model.safetensors").is_file()]
    if not folders:
        raise ConfigError(f"{run} has no finished model folders (parent/, children/, finetuned/, baselines/)")
    return name_models(folders, run)[0]


def choose_models(run_dir: Path | str, wanted: list[str] | None = None) -> dict[str, Path]:
    """The run's models named in `wanted` (names `family_folders` gives, or model folder paths);
    all of the run's when None."""
    family = family_folders(run_dir)
    if not wanted:
        chosen = dict(family)
    else:
        chosen, unknown = {}, []
        for w in wanted:
            if w in family:
                chosen[w] = family[w]
            elif (Path(w) / "model.safetensors").is_file():
                chosen.update(name_models([w], run_dir)[0])
            else:
                unknown.append(w)
        if unknown:
            raise ConfigError(f"--models {', '.join(unknown)}: not a model of this run; allowed {', '.join(family)}")
    if len(chosen) < 2:
        raise ConfigError(f"the arena needs at least two models; got {', '.join(chosen) or 'none'}")
    return chosen


def read_prompt_file(path: Path | str) -> list[str]:
    """Prompts from a file: JSON lines with a "prompt" key (.jsonl), else one prompt per line."""
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts {p} is not a file")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix == ".jsonl":
        try:
            return [str(json.loads(ln)["prompt"]) for ln in lines]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--prompts {p}: each line must be a JSON object with a 'prompt' ({exc})") from None
    return lines


def held_out_prompts(corpus, per_task: int = 50) -> list[tuple[str, str]]:
    """(source, prompt) from the run's test split: each structured task's prompt (its answer cut
    off), and the first words of each text document."""
    out = []
    for task, prompt, continuation in arena_examples(corpus, "test", max_per_task=per_task):
        if task != "text":
            out.append((f"held-out:{task}", prompt))
            continue
        line = continuation.strip().split("\n", 1)[0]
        cut = line[:TEXT_PROMPT_CHARS].rsplit(" ", 1)[0] if len(line) > TEXT_PROMPT_CHARS else line
        if cut:
            out.append(("held-out:text", cut))
    return out


class Contestants:
    """Loaded models of one run, their tokenizer, and the prompts to draw from."""

    def __init__(
        self,
        run_dir: Path | str,
        models: dict[str, Path],
        prompt_file: Path | str | None = None,
        max_new_tokens: int = 48,
        device: str = "cpu",
        cache_size: int = 4096,
    ):
        dev = resolve_device(device)
        self.models = {name: load_model(folder, dev)[0].eval() for name, folder in models.items()}
        self.folders = {name: str(folder) for name, folder in models.items()}
        corpus, self.tokenizer = load_eval_data(run_dir)
        self.max_new_tokens = max_new_tokens
        self.context = min(m.config.max_seq_len for m in self.models.values())
        drawn = [("file", p) for p in read_prompt_file(prompt_file)] if prompt_file else held_out_prompts(corpus)
        self.prompts = [(s, p) for s, p in drawn if self._fits(p)]
        if not self.prompts:
            raise ConfigError("no prompt to draw fits the models' context; give shorter ones with --prompts")
        self.lock = threading.Lock()  # one generation at a time: the CPU is the bottleneck anyway
        self.cache_lock = threading.Lock()  # held for dictionary work only, never during generation
        self.cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.cache_size = cache_size

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def _tokens(self, prompt: str) -> int:
        return 1 + len(self.tokenizer.encode(prompt))  # [EOS] + prompt

    def _fits(self, prompt: str) -> bool:
        return 0 < len(prompt) <= MAX_PROMPT_CHARS and self._tokens(prompt) + MIN_NEW_TOKENS <= self.context

    def check_prompt(self, prompt: str) -> None:
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        n = self._tokens(prompt)
        if n + MIN_NEW_TOKENS > self.context:
            raise PromptError(
                f"the prompt is {n} tokens; these models read at most {self.context - MIN_NEW_TOKENS} "
                f"(context {self.context}, {MIN_NEW_TOKENS} left to answer)"
            )

    def draw(self, rng: random.Random) -> tuple[str, str]:
        """(source, prompt) drawn from the prompt file or the run's held-out tasks."""
        return self.prompts[rng.randrange(len(self.prompts))]

    def settings(self, prompt: str) -> dict[str, Any]:
        """How both answers to `prompt` are generated (stored with every battle)."""
        return {
            "decoding": "greedy",
            "max_new_tokens": min(self.max_new_tokens, self.context - self._tokens(prompt)),
            "stop": "EOS or newline",
            "input": "[EOS] + prompt",
        }

    def cached(self, name: str, prompt: str) -> str | None:
        """`name`'s answer to `prompt` if already generated, else None (never generates)."""
        with self.cache_lock:
            return self.cache.get((name, prompt))

    def answer(self, name: str, prompt: str) -> str:
        """`name`'s greedy answer to `prompt` (checked with `check_prompt` first)."""
        key = (name, prompt)
        with self.lock:
            text = self.cached(name, prompt)
            if text is None:
                budget = self.settings(prompt)["max_new_tokens"]
                text = greedy_continuations(self.models[name], self.tokenizer, [prompt], budget)[0]
            with self.cache_lock:
                self.cache[key] = text
                self.cache.move_to_end(key)
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
            return text
