"""The eval stage: model folders scored on a run's test split as one recorded phase: scores per
task, retention vs the parent (before and after fine-tuning side by side), arena ratings, a bar
chart, and ledger records. `evaluate_folders` is called alike by `elasticmoe eval` (which names
the folders with `name_models`) and the pipeline's eval and baseline phases.

Model names follow `evaluate.FINETUNED_SUFFIX`: a child "X" and its fine-tuned version "X-ft"
form one row pair of the retention table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_model, read_json
from .config import ConfigError
from .cost import cost
from .evaluate import (
    arena_examples,
    evaluate,
    format_retention_table,
    load_eval_data,
    pairwise_ratings,
    plot_retention,
    retention_table,
    write_eval,
)
from .ledger import Ledger
from .phases import model_folder, parent_run_of
from .train import resolve_device


def name_models(model_dirs: list[Path | str], data: Path | str | None = None) -> tuple[dict[str, Path], Path]:
    """Model folders (or run / fine-tune folders) as {name: model folder}, and the run whose test
    split scores them (`data`, else the first model's parent run). Names: `parent` for an elastic
    parent, `X-ft` for the fine-tune of child X (a pair of the retention table), else the folder's
    name; a name taken twice falls back to the path."""
    folders = [model_folder(m) for m in model_dirs]
    data_run = Path(data) if data else None
    if data_run is None:
        runs = [parent_run_of(f) for f in folders] + [f.parent if f.name == "parent" else None for f in folders]
        data_run = next((r for r in runs if r is not None and (r / "recipe.yaml").exists()), None)
    if data_run is None:
        raise ConfigError("cannot tell which run's test split to use: pass --data RUN_DIR")
    names: dict[str, Path] = {}
    for f in folders:
        kind = read_json(f / "config.json").get("meta", {}).get("kind", "")
        if f.name == "parent" and kind == "elastic-parent":
            name = "parent"
        elif kind == "finetuned-child":
            name = (f.parent.name if f.name == "model" else f.name) + "-ft"
        else:
            name = f.parent.name if f.name in ("model", "parent") else f.name
        names[name if name not in names else str(f)] = f
    return names, data_run


def evaluate_folders(
    models: dict[str, Path],
    run_dir: Path,
    out_path: Path,
    max_examples: int = 100,
    device: str = "auto",
    parent: str | None = None,
    arena: bool = True,
) -> dict[str, Any]:
    """Evaluate each model folder on RUN_DIR's test split; write `out_path` (JSON) and, when a
    parent is among the models, the retention table and `<out_path stem>_retention.png`."""
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    corpus, tokenizer = load_eval_data(run_dir)
    ledger = Ledger(run_dir / "ledger.jsonl")
    results: dict[str, Any] = {}
    loaded = {}
    for name, folder in models.items():
        model, _ = load_model(folder, dev)
        loaded[name] = model
        with ledger.phase("eval", device=str(dev), model=name, dir=ledger.ref(folder)) as rec:
            res = evaluate(model, corpus, tokenizer, split="test", max_examples=max_examples, device=dev, name=name)
            rec["tokens"], rec["flops"] = res["tokens"], res["flops"]
        results[name] = res
    out: dict[str, Any] = {"models": results}
    parent = parent or ("parent" if "parent" in results else None)
    if parent is not None and len(results) > 1:
        if parent not in results:
            raise ConfigError(f"--parent {parent!r} is not among the evaluated models {sorted(results)}")
        rows = retention_table(results, parent=parent)
        out["retention"] = rows
        png = Path(out_path).with_name(Path(out_path).stem + "_retention.png")
        plot_retention(rows, png)
        out["retention_png"] = str(png)
    if arena and len(loaded) > 1:
        examples = arena_examples(corpus, "test", max_per_task=min(25, max_examples))
        with ledger.phase("eval", device=str(dev), model="arena") as rec:
            out["arena"] = pairwise_ratings(loaded, examples, tokenizer, device=dev)
            # one teacher-forced forward of [EOS] + prompt + continuation per example and model,
            # FLOPs per token from the cost model at the examples' mean length
            lengths = [1 + len(tokenizer.encode(prompt + cont)) for _, prompt, cont in examples]
            mean_len = max(1, round(sum(lengths) / len(lengths)))
            rec["tokens"] = sum(lengths) * len(loaded)
            rec["flops"] = sum(cost(m.config, None, mean_len).flops_forward for m in loaded.values()) * sum(lengths)
    write_eval(out_path, out)
    return out


def print_results(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    results = out["models"]
    tasks = sorted({t for r in results.values() for t in r["tasks"]})
    table = Table(title="test split: score [95% CI]")
    table.add_column("model")
    for t in tasks:
        metric = next(r["tasks"][t]["metric"] for r in results.values() if t in r["tasks"])
        table.add_column(f"{t} ({metric})", justify="right")
    for name, r in results.items():
        cells = []
        for t in tasks:
            v = r["tasks"].get(t)
            cells.append(f"{v['score']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v else "-")
        table.add_row(name, *cells)
    console.print(table)
    if out.get("retention"):
        console.print(format_retention_table(out["retention"]))
    if out.get("arena"):
        ar = Table(title=f"arena (Bradley-Terry, Elo scale) on {out['arena']['n_prompts']} prompts")
        for col in ("model", "rating", "95% CI", "wins", "losses"):
            ar.add_column(col, justify="right")
        for name, r in sorted(out["arena"]["ratings"].items(), key=lambda kv: -kv[1]["rating"]):
            ar.add_row(
                name, f"{r['rating']:.0f}", f"[{r['ci'][0]:.0f}, {r['ci'][1]:.0f}]", str(r["wins"]), str(r["losses"])
            )
        console.print(ar)
