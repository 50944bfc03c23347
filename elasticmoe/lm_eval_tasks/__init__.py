"""lm-evaluation-harness adapter: the run's held-out tasks as local task files for `lm_eval`.

`write_lm_eval_tasks(source, out_dir)` writes, for each task of the split (default "test"):

    out_dir/elasticmoe_<task>.jsonl   the examples (one JSON object a line)
    out_dir/elasticmoe_<task>.yaml    the task config, pointing at the jsonl by absolute path
    out_dir/elasticmoe.yaml           a group `elasticmoe` of all of them
    out_dir/README.md                 the command, the example counts and the prompt convention

The tasks mirror `elasticmoe.evaluate` exactly, so the harness reproduces our numbers on an
exported child (`elasticmoe.hf.export_hf`):

* the same examples: `select_by_level` (structured tasks) / `select_examples` (text) as `evaluate` does, so
  `--examples 100` (the default of `elasticmoe eval` and of the pipeline's eval) reproduces
  `eval/*.json`; each task's `metadata.examples` states the count;
* the same prompt convention (`tokenizer.PROMPT_CONVENTION`): with `add_bos_token=False` in
  `--model_args` the harness's `hf` model encodes without special tokens (the exported tokenizer
  would otherwise add `<|endoftext|>` and the harness score it as part of every text document),
  so the context is written as `<|endoftext|>` + prompt (the special token is parsed from the
  text), exactly the ids `evaluate` feeds;
* structured tasks (`kv`, `arith`, `sort`): `generate_until`, context `<|endoftext|>` + prompt,
  greedy, stop at a newline or EOS, `max_gen_toks` = `evaluate.answer_budget`, metric
  `exact_match` (plain string equality, no normalisation);
* free text (`text`): `loglikelihood_rolling` over each document (the harness prefixes EOS, the
  tokenizer's BOS, and uses the same rolling windows as `evaluate.rolling_windows`), metrics
  `bits_per_byte` (= our `bits_per_byte`), `byte_perplexity`, `word_perplexity`.

Tested offline (`tests/test_lm_eval.py`, lm-eval 0.4.13 from `pip install .[eval]`) on a tiny
exported child: the harness's `bits_per_byte` equals ours to 1e-6 and its generations equal our
greedy continuations string for string. The command:

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=HF_DIR,dtype=float32,add_bos_token=False \\
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
from ..evaluate import answer_budget, load_eval_data, select_by_level, select_examples
from ..tokenizer import EOS_TOKEN

GROUP = "elasticmoe"
# the contexts already start with <|endoftext|>: without add_bos_token=False lm-eval adds another
# one and scores text about 2% worse than `elasticmoe eval` (see the module docstring)
MODEL_ARGS = "pretrained=HF_DIR,dtype=float32,add_bos_token=False"


def _structured_config(name: str, data_file: Path, budget: int, examples: int) -> dict[str, Any]:
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
        "metadata": {"version": 1.0, "examples": examples},
    }


def _text_config(name: str, data_file: Path, examples: int) -> dict[str, Any]:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [{"metric": m} for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")],
        "metadata": {"version": 1.0, "examples": examples},
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
        data_file = out / f"{name}.jsonl"
        if task in STRUCTURED_TASKS:
            docs = select_by_level(task, corpus.docs[split][task], max_examples)
            pairs = [split_prompt_answer(task, d) for d in docs]
            rows = [{"context": EOS_TOKEN + p, "prompt": p, "answer": a, "text": p + a} for p, a in pairs]
            config = _structured_config(name, data_file, answer_budget([a for _, a in pairs]), len(rows))
        else:
            docs = select_examples(corpus.docs[split][task], max_examples)
            rows = [{"text": d} for d in docs]
            config = _text_config(name, data_file, len(rows))
        _write_jsonl(data_file, rows)
        written[name] = out / f"{name}.yaml"
        written[name].write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    group = out / f"{GROUP}.yaml"
    group.write_text(yaml.safe_dump({"group": GROUP, "task": list(written)}, sort_keys=False), encoding="utf-8")
    counts = {name: yaml.safe_load(path.read_text())["metadata"]["examples"] for name, path in written.items()}
    (out / "README.md").write_text(_readme(out, counts, split, max_examples), encoding="utf-8")
    return written


def _readme(out: Path, counts: dict[str, int], split: str, max_examples: int | None) -> str:
    from ..tokenizer import PROMPT_CONVENTION

    rows = "\n".join(f"| {name} | {n} |" for name, n in counts.items())
    limit = "all examples" if max_examples is None else f"at most {max_examples} examples per task"
    return f"""# elasticmoe tasks for lm-evaluation-harness

The {split!r} split of the run, {limit}: the examples that
`elasticmoe eval --examples {max_examples if max_examples is not None else "N"}` scores.

| task | examples |
|---|---:|
{rows}

Run them offline on an exported model folder (`elasticmoe export CHILD --format hf --out HF_DIR`):

```bash
pip install 'elasticmoe[eval]'   # lm-eval[hf]: plain lm-eval lacks transformers
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
    --model_args {MODEL_ARGS} \\
    --tasks {GROUP} --include_path {out} --device cpu --batch_size 8
```

Prompt convention: {PROMPT_CONVENTION}
"""


__all__ = ["GROUP", "MODEL_ARGS", "write_lm_eval_tasks"]
