"""The model card (README.md) of every export: what the model is, what it cost, how it scores, how to run it.

One card for both export formats (`hf.export_hf`, `gguf_export.export_gguf`). It states:

* the architecture, params and active params per token (`cost.cost`, embeddings included);
* provenance: the parent (path, checksum), the sub-network, how extraction was verified;
* cost, when the run's ledger is found (`RUN_DIR/ledger.jsonl`, the run named in the model's
  meta): tokens, FLOPs and device-seconds of parent training, search, this child's extraction
  and fine-tuning, summed by `Ledger.totals`;
* evaluation, when the run has `eval/*.json` results for a model of this name;
* the prompt convention (`tokenizer.PROMPT_CONVENTION`) and how to run the model in transformers and
  in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .cost import cost
from .ledger import Ledger
from .model import ElasticMoE


def run_folder(record: dict[str, Any]) -> Path | None:
    """The run folder (with its ledger) an exported model came from, when it is on this machine."""
    parent = record.get("parent") if isinstance(record.get("parent"), dict) else {}
    # first the run the model folder lies in (a fine-tune's RUN/finetuned/c/model, a copied run), then
    # the run its meta names
    source = Path(record["source"]).resolve() if record.get("source") else None
    candidates = [*(source.parents if source is not None else ()), parent.get("run"), record.get("run")]
    if parent.get("path"):
        p = Path(parent["path"])
        candidates.append(p.parent if p.name == "parent" else p)
    for c in candidates:
        if c and (Path(c) / "ledger.jsonl").is_file():
            return Path(c)
    return None


def _fmt(n: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def cost_rows(run: Path, subnet: str | None, finetune_dir: Path | None = None) -> list[tuple[str, dict[str, float]]]:
    """(what, totals) from the run's ledger: parent training, search, this child's extraction and,
    for a fine-tuned child, its own fine-tune (the ledger records whose `out` is `finetune_dir`;
    another fine-tune of the same shape, such as the prune-distill baseline's distillation, is
    not this model's work)."""
    ledger = Ledger(run / "ledger.jsonl")
    rows = [("parent training (whole run)", ledger.totals("train")), ("search (all searches)", ledger.totals("search"))]
    if subnet:
        rows.append(("extraction of this sub-network", ledger.totals("extract", model=subnet)))
    if finetune_dir is not None:
        rows.append(("fine-tuning of this model", ledger.totals("finetune", out=ledger.ref(finetune_dir))))
    return [(what, t) for what, t in rows if t.get("tokens") or t.get("flops") or t.get("seconds")]


def model_name(record: dict[str, Any], out_dir: Path | str) -> str:
    """The name an export goes by (card title, GGUF `general.name`): run and child, and whether it
    is fine-tuned (`default-ernie51-shape-finetuned`), from where the model folder lies in its run;
    the output folder's name for a folder outside that layout."""
    source = record.get("source")
    if not source:
        return Path(out_dir).name
    p = Path(source).resolve()
    if p.name == "model" and p.parent.parent.name == "finetuned":
        return f"{p.parents[2].name}-{p.parent.name}-finetuned"
    if p.parent.name == "children":
        return f"{p.parents[1].name}-{p.name}"
    if p.name == "parent":
        return f"{p.parent.name}-parent"
    return p.name


def _finetune_dir(record: dict[str, Any]) -> Path | None:
    """The fine-tune folder of a fine-tuned child (its model lies in FOLDER/model), else None."""
    if not isinstance(record.get("finetune"), dict) or not record.get("source"):
        return None
    return Path(record["source"]).resolve().parent


def portable(value: Any) -> Any:
    """`value` with every absolute path cut to its last three parts (`default/children/c`): a card
    names models, not the folders of the machine that wrote it."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        return "/".join(Path(value).parts[-3:])
    return value


def eval_rows(run: Path, names: list[str]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(results file, model, task, result) for every eval result in RUN_DIR/eval/*.json of a model
    named in `names` (and of the parent, for comparison)."""
    out = []
    for path in sorted((run / "eval").glob("*.json")):
        try:
            models = json.loads(path.read_text()).get("models") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        for name in [*names, "parent"]:
            for task, res in sorted(((models.get(name) or {}).get("tasks") or {}).items()):
                if isinstance(res, dict) and "score" in res:
                    out.append((path.name, name, task, res))
    return out


def _usage(folder_hint: str, gguf_file: str | None) -> list[str]:
    from .tokenizer import PROMPT_CONVENTION

    lines = ["## Prompt convention", "", PROMPT_CONVENTION, "", "## How to run it", ""]
    if gguf_file is None:
        lines += [
            "transformers (no custom code):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
            f'tok = AutoTokenizer.from_pretrained("{folder_hint}")',
            f'model = AutoModelForCausalLM.from_pretrained("{folder_hint}", dtype="float32")',
            'gen = pipeline("text-generation", model=model, tokenizer=tok)',
            'out = gen("kv: a=12 b=7 ? b=7 ? a=", max_new_tokens=8, do_sample=False, return_full_text=False)',
            'print(out[0]["generated_text"].split("\\n")[0])  # an answer ends at a newline, as in eval',
            "```",
            "",
            "llama.cpp: `elasticmoe export CHILD --format gguf --out DIR` writes a GGUF of the same child, checked "
            "in llama.cpp (ids, logits, greedy tokens) before it is published.",
        ]
    else:
        lines += [
            "llama.cpp:",
            "",
            "```bash",
            f'llama-cli -m {gguf_file} -p "kv: a=12 b=7 ? b=7 ? a=" -n 8 --temp 0',
            "```",
            "",
            f"Python: `xllamacpp` or `llama-cpp-python` load `{gguf_file}` like any GGUF.",
        ]
    return lines


def model_card(
    model: ElasticMoE, record: dict[str, Any], model_type: str, arch: str, gguf_file: str | None = None
) -> str:
    """README.md text for an export of `model` whose provenance is `record`; `model_type` and `arch`
    are the transformers names the export uses (hf.architecture_for, hf.ARCHITECTURES)."""
    c = model.config
    k = cost(c)
    fmt = f"GGUF `{gguf_file}` (llama.cpp arch `{record['gguf']['arch']}`)" if gguf_file else f"transformers `{arch}`"
    lines = [
        "---",
        "library_name: " + ("gguf" if gguf_file else "transformers"),
        "pipeline_tag: text-generation",
        f"tags: [elasticmoe, mixture-of-experts, {model_type}]",
        "---",
        "",
        f"# {record.get('name') or 'elasticmoe export'}",
        "",
        f"A {fmt} written by elasticmoe"
        + (": no custom code, no `trust_remote_code`." if not gguf_file else ", with llama.cpp's own `gguf` package."),
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | {arch} |",
        f"| params / active params per token | {k.total_params:,} / {k.active_params:,} |",
        f"| layers / d_model / vocab | {c.layers} / {c.d_model} / {c.vocab_size} |",
        f"| heads / kv heads / head dim | {c.heads} / {c.kv_heads} / {c.head_dim} |",
        f"| experts / top-k / expert width | {c.experts} / {c.top_k} / {c.expert_width} |",
        f"| context / RoPE theta | {c.max_seq_len} / {c.rope_theta:g} |",
        "",
        "## Provenance",
        "",
    ]
    parent = record.get("parent") if isinstance(record.get("parent"), dict) else {}
    if parent.get("path"):
        sha = f" (model sha256 `{parent['model_sha256']}`)" if parent.get("model_sha256") else ""
        lines.append(f"- parent: `{portable(str(Path(parent['path']).resolve()))}`{sha}")
    else:
        lines.append("- parent: none recorded (this folder is not a child extracted by elasticmoe)")
    subnet = record.get("subnet")
    lines.append(f"- sub-network: `{subnet}`" if subnet else "- sub-network: the whole model")
    finetune_dir = _finetune_dir(record)
    if finetune_dir is not None:
        ft = record["finetune"]
        teacher = "distilled from the parent" if ft.get("teacher") else "fine-tuned on the data"
        lines.append(f"- this folder holds the **fine-tuned** child: {teacher} for {ft.get('tokens', 0):,} tokens")
    elif subnet:
        lines.append("- this folder holds the **zero-shot** child: extracted from the parent, not fine-tuned")
    pad = record.get("expert_width_padded")
    if isinstance(pad, dict):
        lines.append(
            f"- expert width {pad.get('width')} stored as {pad.get('exported')} with zero units "
            f"(same logits): {pad.get('why', '')}"
        )
    v = record.get("verification") or {}
    if v:
        lines.append(
            f"- extraction verified: max abs logit difference {v.get('max_abs_logit_diff')} vs the parent running "
            f"the sub-network on {v.get('tokens_verified')} held-out tokens"
        )
    for key, label in (("hf_verification", "transformers"), ("gguf_verification", "llama.cpp")):
        check = record.get(key) or {}
        if check.get("skipped"):
            lines.append(f"- export NOT checked in {label}: {check['skipped']}")
        elif check:
            lines.append(
                f"- export checked in {label} ({check.get('transformers_version') or check.get('runtime')}): max abs "
                f"logit difference {check.get('max_abs_logit_diff'):.3g} on {check.get('tokens_verified')} "
                f"{check.get('tokens', 'tokens')}"
                + (
                    f"; greedy continuations identical {check['greedy_identical']}"
                    if "greedy_identical" in check
                    else ""
                )
            )
    run = run_folder(record)
    lines += ["", "## Cost (from the run's ledger)", ""]
    rows = cost_rows(run, subnet, finetune_dir) if run else []
    if rows:
        lines += ["| work | tokens | FLOPs | device-seconds |", "|---|---:|---:|---:|"]
        lines += [
            f"| {what} | {_fmt(t.get('tokens', 0))} | {_fmt(t.get('flops', 0))} | {t.get('seconds', 0):.1f} |"
            for what, t in rows
        ]
        lines.append(
            f"\nTraining tokens of the parent: {int(rows[0][1].get('tokens', 0)):,}; `elasticmoe report "
            f"{run.name}` (the run folder) puts these against a named baseline."
        )
    else:
        lines.append("No ledger found (the model's run folder is not on this machine).")
    names = [n for n in (record.get("name"), Path(str(record.get("source", ""))).name) if n]
    if finetune_dir is not None:
        names.append(f"{finetune_dir.name}-ft")  # what `elasticmoe run` calls a fine-tuned child in eval/
    evals = eval_rows(run, names) if run else []
    lines += ["", "## Evaluation (test split of the run)", ""]
    if evals:
        lines += ["| results | model | task | metric | score [95% CI] |", "|---|---|---|---|---|"]
        for file, name, task, res in evals:
            ci = res.get("ci") or [float("nan"), float("nan")]
            lines.append(
                f"| {file} | {name} | {task} | {res.get('metric')} | {res['score']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |"
            )
    else:
        lines.append("No evaluation of this model yet: `elasticmoe eval RUN_DIR/parent THIS_CHILD`, then export again.")
    lines += ["", *_usage(Path(str(record.get("out") or "THIS_FOLDER")).name, gguf_file), ""]
    lines += ["## Conventions", "", *_conventions(c), "", "## Full provenance", ""]
    lines += [
        "```json",
        json.dumps(portable(json.loads(json.dumps(record, default=str))), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _conventions(c) -> list[str]:
    """What the exported block computes, from its config (hf.py's conventions, per option)."""
    score = "sigmoid per expert" if c.router_score == "sigmoid" else "softmax over the experts"
    choice = "top-k of the scores + a per-expert selection bias" if c.router_bias else "top-k"
    weights = "kept scores renormalised to sum to one" if c.renormalize_top_k else "kept scores as they are"
    scale = f", times {c.routed_scale:g}" if c.routed_scale != 1.0 else ""
    shared = "no shared expert"
    if c.shared_expert_width:
        shared = f"a shared expert of width {c.shared_expert_width}" + (
            " with a sigmoid gate" if c.shared_expert_gate else ""
        )
    dense = (
        f"dense layers {list(c.dense_layers)} (width {c.dense_width}, kept whole)"
        if c.dense_layers
        else "every layer MoE"
    )
    biases = "biases on q/k/v only" if c.qkv_bias else "no biases"
    rope = f"on the first {c.rope_dims} dims of each head" if c.rope_dims else "on the whole head"
    pairs = c.source_architecture == "Ernie4_5_MoeForCausalLM"  # its q/k rows are exported in its pair order
    kind = "on adjacent pairs" if pairs else "rotate-half"
    return [
        f"- router: float32 {score}, {choice}, {weights}{scale}",
        f"- SwiGLU experts, {biases}, {shared}; {dense}",
        f"- RoPE {kind} (`rope_type: default`) {rope}; RMSNorm computed in float32",
    ]


__all__ = ["cost_rows", "eval_rows", "model_card", "model_name", "run_folder"]
