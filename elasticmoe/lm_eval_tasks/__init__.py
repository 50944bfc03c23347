"""lm-evaluation-harness adapter: the run's held-out tasks as local task files for `lm_eval`.

`write_lm_eval_tasks(source, out_dir)` writes, for each task of the split (default "test"):

    out_dir/elasticmoe_<task>.jsonl   the examples (one JSON object a line)
    out_dir/elasticmoe_<task>.yaml    the task config, pointing at the jsonl by absolute path
    out_dir/elasticmoe.yaml           a group `elasticmoe` of all of them

The tasks mirror `elasticmoe.evaluate` exactly, so the harness reproduces our numbers on an
exported child (`elasticmoe.hf.export_hf`):

* structured tasks (`kv`, `arith`, `sort`): `generate_until`, context `<|endoftext|>` + prompt
  (EOS as BOS, written into the text because the exported tokenizer adds no special token),
  greedy, stop at a newline or EOS, `max_gen_toks` = `evaluate.answer_budget`, metric
  `exact_match` (plain string equality, no normalisation);
* free text (`text`): `loglikelihood_rolling` over each document (the harness prefixes EOS, the
  tokenizer's BOS, and uses the same rolling windows as `evaluate.rolling_windows`), metrics
  `bits_per_byte` (= our `bits_per_byte`), `byte_perplexity`, `word_perplexity`.

Verified offline (lm-eval 0.4.13, transformers 5.23, torch 2.13 CPU, a separate virtualenv) on a
tiny exported Mixtral: the harness's `bits_per_byte` equals ours to 1e-6 and its generations equal
our greedy continuations string for string. The command:

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=HF_DIR,dtype=float32 \\
        --tasks elasticmoe --include_path TASK_DIR --device cpu --batch_size 8 \\
        --output_path OUT --log_samples

(`--tasks elasticmoe_kv,elasticmoe_text` picks single tasks.) The exported model's context is its
`max_position_embeddings`; a generation task needs `max_gen_toks` below it (the harness asserts so)
and truncates prompts to the difference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..data import STRUCTURED_TASKS, Corpus, split_prompt_answer
from ..evaluate import answer_budget, load_eval_data, select_examples
from ..tokenizer import EOS_TOKEN

GROUP = "elasticmoe"


def _structured_config(name: str, data_file: Path, budget: int) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "context",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n", EOS_TOKEN], "do_sample": False, "max_gen_toks": budget},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def _text_config(name: str, data_file: Path) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m} for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")],
        "metadata": {"version": 1.0},
    }


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_lm_eval_tasks(
    source: Any,
    out_dir: str | Path,
    *,
    split: str = "test",
    tasks: Sequence[str] | None = None,
    max_examples: int | None = None,
) -> dict[str, Path]:
    """Write task YAML + jsonl files for `lm_eval --include_path out_dir`; return {task name: yaml}.

    `source`: a Corpus, a RunData, or a run / data / corpus folder (see `evaluate.load_eval_data`).
    Examples are the ones `evaluate` scores for the same `split` and `max_examples`.
    """
    corpus = source if isinstance(source, Corpus) else load_eval_data(source)[0]
    if split not in corpus.docs:
        raise ConfigError(f"corpus has no split {split!r}; have {sorted(corpus.docs)}")
    available = [t for t in corpus.tasks if corpus.docs[split].get(t)]
    tasks = list(tasks) if tasks is not None else available
    missing = [t for t in tasks if t not in available]
    if missing:
        raise ConfigError(f"tasks {missing} have no {split!r} examples; available: {available}")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task in tasks:
        name = f"{GROUP}_{task}"
        docs = select_examples(corpus.docs[split][task], max_examples)
        data_file = out / f"{name}.jsonl"
        if task in STRUCTURED_TASKS:
            pairs = [split_prompt_answer(task, d) for d in docs]
            rows = [{"context": EOS_TOKEN + p, "prompt": p, "answer": a, "text": p + a} for p, a in pairs]
            config = _structured_config(name, data_file, answer_budget([a for _, a in pairs]))
        else:
            rows = [{"text": d} for d in docs]
            config = _text_config(name, data_file)
        _write_jsonl(data_file, rows)
        written[name] = out / f"{name}.yaml"
        written[name].write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    group = out / f"{GROUP}.yaml"
    group.write_text(yaml.safe_dump({"group": GROUP, "task": list(written)}, sort_keys=False), encoding="utf-8")
    return written


__all__ = ["GROUP", "write_lm_eval_tasks"]
