"""The command line: the only module that reads argv. Each subcommand loads a recipe or run
folder, applies overrides, and calls one library function. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .config import ConfigError
from .ledger import Ledger
from .runfolder import check_separate, lock, recipe_inputs, writing

log = logging.getLogger("elasticmoe")


def _recipe(args):
    from .recipe import load_recipe

    return load_recipe(args.config, args.set)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(value: float, lo: float, name: str, strict: bool = True, hi: float | None = None) -> None:
    """A command-line number must be finite and in range (NaN and inf are refused, named)."""
    inside = value > lo if strict else value >= lo
    if hi is not None:
        inside = inside and value <= hi
    if not (math.isfinite(value) and inside):
        bound = f"> {lo}" if strict else f">= {lo}"
        raise ConfigError(
            f"{name}={value} must be a finite number {bound}" + (f" and <= {hi}" if hi is not None else "")
        )


def _device(name: str, flag: str = "--device") -> str:
    import re

    _require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name) is not None,
        f"{flag}={name!r}; allowed auto, cpu, cuda, cuda:N, mps",
    )
    return name


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", default=None, help="recipe file (YAML/TOML/JSON) or preset name (tiny, micro, small-gpu)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe key, e.g. --set train.steps=100 (repeatable)",
    )


# -- info --------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    """Table of the space's uniform sub-networks: params, active params, FLOPs/token; optional forward."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from .cost import cost
    from .model import ElasticMoE
    from .subnet import enumerate_uniform

    _require(args.rows >= 1, f"--rows={args.rows} must be >= 1")
    recipe = _recipe(args)
    c = recipe.model
    subnets = enumerate_uniform(recipe.space, list(range(c.layers)))
    parent = cost(c, None, recipe.data.seq_len)
    model = ElasticMoE(c) if args.forward else None
    table = Table(title=f"{len(subnets)} uniform sub-networks (seq_len {recipe.data.seq_len})")
    for col in ("subnet", "params", "active", "MFLOP/token fwd", "params/parent", "active/parent"):
        table.add_column(col, justify="right")
    for sn in subnets[:: max(1, len(subnets) // args.rows)]:
        k = cost(c, sn, recipe.data.seq_len)
        if model is not None:
            with torch.no_grad():
                out = model(torch.randint(0, c.vocab_size, (1, 16)), sn)
            assert torch.isfinite(out.logits).all()
        table.add_row(
            str(sn),
            f"{k.total_params:,}",
            f"{k.active_params:,}",
            f"{k.flops_forward / 1e6:.3f}",
            f"{k.total_params / parent.total_params:.3f}",
            f"{k.active_params / parent.active_params:.3f}",
        )
    Console().print(table)
    return 0


# -- train -------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .train import train

    out = Path(args.out)
    saved = out / "recipe.yaml"
    if args.resume and args.config is None and saved.is_file():  # resume with the run's own recipe
        from .recipe import load_recipe

        recipe = load_recipe(saved, args.set)
    else:
        recipe = _recipe(args)
    check_separate(out, recipe_inputs(recipe))
    with writing(out, "train", create=not args.resume):
        _commit_recipe(out, recipe, args.resume)
        res = train(recipe, out, resume=args.resume, progress=not args.quiet, parallel=args.parallel)
    if not res.is_main:  # under torchrun, rank 0 reports
        return 0
    table = Table(title=f"validation cross-entropy (nats/token) at step {res.step}")
    tasks = sorted(next(iter(res.final_eval.values()), {}))
    table.add_column("sub-network")
    for t in tasks:
        table.add_column(t, justify="right")
    for name, row in res.final_eval.items():
        table.add_row(name, *(f"{row[t]:.3f}" for t in tasks))
    Console().print(table)
    print(f"parent written to {Path(args.out) / 'parent'} | {res.tokens_per_s:,.0f} tokens/s (median)")
    return 0


def _commit_recipe(run_dir: Path, recipe, resume: bool) -> None:
    """A new run (no checkpoint yet) gets this command's recipe, atomically: a recipe.yaml left by
    an earlier attempt that failed before its first checkpoint must not outlive it (it would be
    the recipe a later --resume trains with). Rank 0 only; under torchrun the others wait in train."""
    import os

    from .checkpoint import atomic_write_text
    from .config import dump_yaml

    if resume or (run_dir / "checkpoints").exists() or int(os.environ.get("RANK", "0")) != 0:
        return
    atomic_write_text(run_dir / "recipe.yaml", dump_yaml(recipe.to_dict()))


# -- extract / export / import -------------------------------------------------------------
def _verify_tokens(run_dir: Path, n_windows: int = 4):
    from .phases import run_recipe
    from .rundata import load_run_data

    data = load_run_data(run_dir, run_recipe(run_dir))
    windows = data.eval_windows("val", n_windows)
    return next(iter(windows.values()))[:, :-1], data


def cmd_extract(args) -> int:
    import json

    from .checkpoint import load_model
    from .phases import extract_child, model_folder

    run = Path(args.run_dir)
    if args.from_search is not None:
        pareto = Path(args.search_dir or run / "search") / "pareto.json"
        if not pareto.is_file():
            found = sorted(str(p.parent) for p in (run / "search").glob("*/pareto.json"))
            hint = f"; searches found: {found} (pass one with --search-dir)" if found else ""
            raise ConfigError(f"{pareto} does not exist: run `elasticmoe search {run}` first{hint}")
        points = json.loads(pareto.read_text())["frontier"]
        if not 0 <= args.from_search < len(points):
            raise ConfigError(f"--from-search {args.from_search} out of range; the frontier has {len(points)} points")
        spec = json.dumps(points[args.from_search]["subnet_json"])
    elif args.subnet:
        spec = args.subnet
    else:
        raise ConfigError("give --subnet SPEC or --from-search N")
    out = Path(args.out)
    check_separate(out, [run / "parent", run / "data", run / "checkpoints", run / "recipe.yaml", run / "ledger.jsonl"])
    with lock(run, "extract"):
        parent, _ = load_model(model_folder(run))
        meta = extract_child(run, parent, spec, out)
    v = meta["verification"]
    print(
        f"wrote {args.out}: {meta['subnet']} | {meta['params']:,} params, {meta['active_params']:,} active | "
        f"max |logit diff| vs parent {v['max_abs_logit_diff']:.2e} on {v['tokens_verified']} tokens"
    )
    return 0


def cmd_export(args) -> int:
    from .hf import export_hf
    from .phases import model_folder

    src = model_folder(args.model_dir)
    check_separate(args.out, [src])
    if args.format == "gguf":
        from .gguf_export import export_gguf, gguf_summary, held_out_tokens

        rec = export_gguf(src, Path(args.out), qtype=args.gguf_type, verify_tokens=held_out_tokens(src))
        print(gguf_summary(rec, args.out))
        return 0
    tokens = None
    try:
        from .phases import parent_run_of

        run = parent_run_of(src)
        if run is not None:
            tokens, _ = _verify_tokens(run, 2)
    except ConfigError:
        tokens = None
    prov = export_hf(src, Path(args.out), verify_tokens=tokens)
    diff = (prov.get("hf_verification") or {}).get("max_abs_logit_diff")
    print(
        f"wrote {args.out} ({args.format})"
        + (f" | transformers vs elasticmoe max |logit diff| {diff:.2e}" if diff is not None else "")
    )
    return 0


def cmd_import_hf(args) -> int:
    from .checkpoint import atomic_write_text, save_model
    from .config import ElasticSpace, dump_yaml
    from .hf_import import import_hf
    from .recipe import DataConfig

    space = None
    if args.space:
        from .config import load_mapping

        space = ElasticSpace.from_dict(load_mapping(args.space))
    out = Path(args.out)
    check_separate(out, [args.hf_dir, args.space])
    if (out / "parent").exists():
        raise ConfigError(f"{out} already holds a parent")
    model = import_hf(args.hf_dir, space)  # everything is checked before the output folder is made
    space = space or ElasticSpace.default_for(model.config)
    tok = Path(args.hf_dir) / "tokenizer.json"
    with writing(out, "import-hf"):
        parent = save_model(
            out / "parent",
            model,
            {"kind": "imported", "source": str(Path(args.hf_dir).resolve())},
            extra_files={"tokenizer.json": tok} if tok.is_file() else None,
        ).resolve()
        # paths point into the run's own copy, never at the source folder or the working directory
        recipe = {
            "model": model.config.to_dict(),
            "space": space.to_dict(),
            "data": {
                "vocab_size": model.config.vocab_size,
                "tokenizer": str(parent / "tokenizer.json") if tok.is_file() else "",
                "seq_len": min(DataConfig.seq_len, model.config.max_seq_len),
            },
            "train": {"init_from": str(parent)},
        }
        atomic_write_text(out / "recipe.yaml", dump_yaml(recipe))
    print(
        f"imported {args.hf_dir} -> {out / 'parent'} ({model.num_params():,} params); continue elastic training "
        f"with: elasticmoe train --config {out / 'recipe.yaml'} --out NEW_RUN"
    )
    return 0


# -- search ----------------------------------------------------------------------------------
CONSTRAINT_FLAGS = (
    "max_params",
    "max_active_params",
    "max_flops_per_token",
    "max_latency_ms",
    "max_memory_mb",
    "max_params_ratio",
    "max_active_ratio",
    "max_flops_ratio",
    "max_latency_ratio",
    "max_memory_ratio",
)


def cmd_search(args) -> int:
    _require(args.batch >= 1, f"--batch={args.batch} must be >= 1")
    _require(args.windows >= 1, f"--windows={args.windows} must be >= 1")
    _require(args.seq_len is None or args.seq_len >= 2, f"--seq-len={args.seq_len} must be >= 2")
    _device(args.device)
    run = Path(args.run_dir)
    with lock(run, "search"):
        return _search(args, run)


def _search(args, run: Path) -> int:
    from rich.console import Console

    from .checkpoint import load_model
    from .cost import cost
    from .latency import LatencyTable
    from .phases import model_folder, run_recipe
    from .rundata import load_run_data
    from .search import SubnetEvaluator, parse_constraints, search
    from .search_output import format_table, write_search_results
    from .train import resolve_device

    recipe = run_recipe(run)
    seq = args.seq_len or recipe.data.seq_len
    given = [f"{k}={getattr(args, k)}" for k in CONSTRAINT_FLAGS if getattr(args, k) is not None]
    cons = parse_constraints(given + [f"batch={args.batch}", f"seq_len={seq}"])
    parent, _ = load_model(model_folder(run))
    device = resolve_device(args.device)
    parent.to(device)
    windows = load_run_data(run, recipe).eval_windows("search", args.windows)
    out = Path(args.out) if args.out else run / "search"
    if args.out and not (out / "latency_table.json").is_file():
        _refuse_foreign_folder(out, "pareto.json")
    check_separate(out, [run / "parent", run / "data", run / "checkpoints", run / "recipe.yaml"])
    ledger = Ledger(run / "ledger.jsonl")
    table = None
    with ledger.phase("search", device=str(device), model="latency-table"):
        if cons.needs_latency or args.latency:
            table = LatencyTable.measure(parent, seq, args.batch, device, repeats=5, space=recipe.space)
            table.save(out / "latency_table.json")
    with ledger.phase("search", device=str(device), model="cli", constraints=cons.given()) as rec:
        result = search(
            SubnetEvaluator(parent, windows, device),
            recipe.space,
            parent.layer_order,
            cons,
            seed=args.seed,
            per_layer=args.per_layer,
            latency_table=table,
        )
        rec["tokens"], rec["flops"] = result.tokens, result.flops
    paths = write_search_results(
        out, result, seed=args.seed, constraints=cons, parent_cost=cost(parent.config, None, seq)
    )
    Console().print(format_table(result))
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


# -- finetune / baseline ---------------------------------------------------------------------
def _weights(items: list[str]) -> dict[str, float] | None:
    if not items:
        return None
    out = {}
    for it in items:
        task, _, w = it.partition("=")
        try:
            out[task] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"--task-weight {it!r} must look like TASK=WEIGHT") from None
    return out


def cmd_finetune(args) -> int:
    from .phases import finetune, model_folder, parent_run_of

    _finite(args.lr, 0, "--lr")
    _finite(args.temperature, 0, "--temperature")
    _finite(args.kd_weight, 0, "--kd-weight", strict=False)
    _finite(args.ce_weight, 0, "--ce-weight", strict=False)
    _require(all(v is None or v >= 1 for v in (args.tokens, args.steps)), "--tokens / --steps must be >= 1")
    _require(args.kd_weight > 0 or args.ce_weight > 0, "--kd-weight and --ce-weight are both 0: nothing to train on")
    child = model_folder(args.child_dir)
    data_run = Path(args.data or args.teacher or parent_run_of(child) or args.child_dir)
    out = Path(args.out)
    check_separate(out, [child, args.teacher, args.data, data_run / "data", data_run / "parent"])
    from contextlib import nullcontext

    from .runfolder import looks_like_run

    data_lock = lock(data_run, "finetune") if looks_like_run(data_run) else nullcontext()
    with data_lock, writing(out, "finetune", create=not args.resume):
        return _finetune(args, finetune)


def _finetune(args, finetune) -> int:
    res = finetune(
        args.child_dir,
        args.out,
        kd_weight=args.kd_weight,
        ce_weight=args.ce_weight,
        temperature=args.temperature,
        teacher_run=args.teacher,
        data_run=args.data,
        tokens=args.tokens,
        steps=args.steps,
        task_weights=_weights(args.task_weight),
        lr=args.lr,
        resume=args.resume,
    )
    print(f"fine-tuned {res.steps} steps / {res.tokens:,} tokens -> {Path(args.out) / 'model'}")
    for t in res.val_before:
        print(f"  {t:6s} val CE {res.val_before[t]:.3f} -> {res.val_after[t]:.3f}")
    if res.kd_before is not None:
        print(f"  KL to teacher {res.kd_before:.4f} -> {res.kd_after:.4f}")
    return 0


def cmd_baseline(args) -> int:
    from .phases import baseline

    _require(all(v is None or v >= 1 for v in (args.tokens, args.steps)), "--tokens / --steps must be >= 1")
    _require(
        args.method == "expert-prune" or args.tokens is not None or args.steps is not None,
        f"baseline --method {args.method} needs a budget: --tokens or --steps",
    )
    _require(args.method == "dense-parent" or bool(args.arch), f"baseline --method {args.method} needs --arch")
    _finite(args.lr, 0, "--lr")
    with lock(args.run_dir, "baseline"):
        out = baseline(
            args.run_dir,
            args.arch,
            tokens=args.tokens,
            steps=args.steps,
            name=args.name,
            progress=not args.quiet,
            resume=args.resume,
            method=args.method,
            dense=args.dense,
            lr=args.lr,
        )
    model = {"prune-distill": "distilled/model", "expert-prune": "pruned"}.get(args.method, "parent")
    print(f"baseline ({args.method}) -> {out / model} (recorded in {Path(args.run_dir) / 'ledger.jsonl'})")
    return 0


# -- eval / report / run ---------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .checkpoint import read_json
    from .evaluate_run import evaluate_folders, print_results
    from .phases import model_folder, parent_run_of

    _require(args.examples >= 1, f"--examples={args.examples} must be >= 1")
    _device(args.device)
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the path of the results JSON file to write")
    folders = [model_folder(m) for m in args.model_dirs]
    data_run = Path(args.data) if args.data else None
    if data_run is None:
        runs = [parent_run_of(f) for f in folders] + [f.parent if f.name == "parent" else None for f in folders]
        data_run = next((r for r in runs if r is not None and (r / "recipe.yaml").exists()), None)
    if data_run is None:
        raise ConfigError("cannot tell which run's test split to use: pass --data RUN_DIR")
    names = {}
    for f in folders:
        kind = read_json(f / "config.json").get("meta", {}).get("kind", "")
        if f.name == "parent" and kind == "elastic-parent":
            name = "parent"
        elif kind == "finetuned-child":
            name = (f.parent.name if f.name == "model" else f.name) + "-ft"
        else:
            name = f.parent.name if f.name in ("model", "parent") else f.name
        names[name if name not in names else str(f)] = f
    out = Path(args.out) if args.out else data_run / "eval" / "cli.json"
    check_separate(out, [*folders, data_run / "data", data_run / "ledger.jsonl"])
    with lock(data_run, "eval"):
        res = evaluate_folders(names, data_run, out, max_examples=args.examples, device=args.device, parent=args.parent)
    print_results(res)
    print(f"wrote {out}")
    return 0


def cmd_lm_eval_tasks(args) -> int:
    from .lm_eval_tasks import GROUP, write_lm_eval_tasks

    _require(args.examples is None or args.examples >= 1, f"--examples={args.examples} must be >= 1")
    _refuse_foreign_folder(Path(args.out), f"{GROUP}.yaml")
    written = write_lm_eval_tasks(Path(args.run_dir), Path(args.out), max_examples=args.examples)
    print(f"wrote {len(written)} lm-eval task(s) to {args.out}; run, offline:")
    print(
        f"  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32 "
        f"--tasks elasticmoe --include_path {args.out} --device cpu --batch_size 8"
    )
    return 0


def _refuse_foreign_folder(out: Path, ours: str) -> None:
    """An output folder that a command writes files into (not a marked folder it replaces whole):
    absent, empty, or holding `ours` from an earlier run of the same command; never a user's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ours).is_file())):
        raise ConfigError(
            f"--out {out} exists and holds files elasticmoe did not write (no {ours}): refusing to write into it; "
            "choose a new or empty folder"
        )


def cmd_report(args) -> int:
    from .report import report_run

    _require(
        args.estimate_baseline_tokens is None or args.estimate_baseline_tokens >= 1,
        f"--estimate-baseline-tokens={args.estimate_baseline_tokens} must be >= 1",
    )
    if not Path(args.run_dir).is_dir():
        raise ConfigError(f"{args.run_dir} is not a folder")
    with lock(args.run_dir, "report"):
        report_run(
            Path(args.run_dir),
            claims=args.claim,
            estimate_tokens=args.estimate_baseline_tokens,
            require_percent=args.percent,
        )
    print((Path(args.run_dir) / "report.md").read_text())
    return 0


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    _finite(args.finetune_fraction, 0, "--finetune-fraction", strict=False)
    _require(args.eval_examples >= 1, f"--eval-examples={args.eval_examples} must be >= 1")
    recipe = _recipe(args)
    out = Path(args.out)
    check_separate(out, recipe_inputs(recipe))
    with writing(out, "run"):
        run_pipeline(
            recipe,
            out,
            progress=not args.quiet,
            baselines=args.baselines,
            finetune_fraction=args.finetune_fraction,
            eval_examples=args.eval_examples,
        )
    print(f"done: {Path(args.out) / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elasticmoe", description="Train once, extract many: elastic MoE LMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="list the elastic space's sub-networks with their cost")
    _add_recipe_args(p)
    p.add_argument("--forward", action="store_true", help="also run each sub-network on random tokens")
    p.add_argument("--rows", type=int, default=40, help="at most this many rows")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train the elastic parent")
    _add_recipe_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--parallel",
        choices=["auto", "fsdp", "ddp"],
        default="auto",
        help="under torchrun: FSDP2 (sharded) or DDP (replicated); auto = fsdp on GPU, ddp on CPU",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="find the best sub-networks under constraints (a Pareto frontier)")
    p.add_argument("run_dir")
    for flag in CONSTRAINT_FLAGS:
        p.add_argument(
            "--" + flag.replace("_", "-"),
            dest=flag,
            default=None,
            help="ratio of the parent, e.g. 1/3" if flag.endswith("ratio") else "absolute limit (e.g. 2M)",
        )
    p.add_argument("--batch", type=int, default=1, help="batch size for latency and memory")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs, latency, memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-layer", action="store_true", help="search per-layer (heterogeneous) sub-networks")
    p.add_argument("--latency", action="store_true", help="measure a latency table even without a latency limit")
    p.add_argument("--windows", type=int, default=16, help="search-split windows per task")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default RUN_DIR/search")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("extract", help="materialise a sub-network as a standalone, verified child")
    p.add_argument("run_dir")
    p.add_argument("--subnet", help="Subnet spec, e.g. 'L3 E4 k1 W128' or per-layer JSON")
    p.add_argument("--from-search", type=int, default=None, metavar="N", help="the N-th point of search/pareto.json")
    p.add_argument("--search-dir", default=None, help="folder holding pareto.json (default RUN_DIR/search)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export", help="write a model folder in another tool's format")
    p.add_argument("model_dir")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="transformers folder or llama.cpp GGUF")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF tensor type")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="turn a local Mixtral / Qwen3-MoE folder into an elastic parent")
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--space", help="ElasticSpace file (YAML/JSON); default: a space derived from the config")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("finetune", help="distil a child from its parent (or plain fine-tune without --teacher)")
    p.add_argument("child_dir")
    p.add_argument("--teacher", help="parent run folder (the teacher); omit for plain fine-tuning")
    p.add_argument("--data", help="run folder whose data to use (default: the teacher's or the child's parent run)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=int)
    budget.add_argument("--steps", type=int)
    p.add_argument(
        "--task-weight",
        action="append",
        default=[],
        metavar="TASK=W",
        help="data mix, e.g. --task-weight kv=1 (only search-like data)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of KL(teacher || child)")
    p.add_argument("--ce-weight", type=float, default=1.0, help="weight of the data cross-entropy")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("baseline", help="a measured alternative to an elastic child (scratch is the denominator)")
    p.add_argument("run_dir")
    p.add_argument(
        "--method",
        choices=["scratch", "dense-parent", "prune-distill", "expert-prune"],
        default="scratch",
        help="scratch: --arch from scratch; dense-parent: the parent's architecture trained normally; "
        "prune-distill / expert-prune: the dense parent pruned to --arch's shape (and distilled for the budget)",
    )
    p.add_argument("--arch", help="Subnet spec of the parent, or a model config file (not for dense-parent)")
    p.add_argument("--dense", default="dense-parent", help="baselines/ folder of the dense parent to prune")
    p.add_argument("--lr", type=float, default=1e-3, help="prune-distill: the distillation learning rate")
    budget = p.add_mutually_exclusive_group(required=False)
    budget.add_argument("--tokens", type=int)
    budget.add_argument("--steps", type=int)
    p.add_argument("--name", help="folder name under RUN_DIR/baselines/")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("eval", help="per-task quality on the held-out test split, with retention vs a parent")
    p.add_argument("model_dirs", nargs="+")
    p.add_argument("--data", help="run folder whose test split to use (default: the models' parent run)")
    p.add_argument("--parent", help="name of the model that retention is measured against (default: parent)")
    p.add_argument("--examples", type=int, default=100, help="test examples per structured task")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default RUN_DIR/eval/cli.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval-tasks", help="write the run's test tasks as local lm-evaluation-harness tasks")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--examples", type=int, default=100, help="examples per task (100: the count `eval` and the pipeline score)"
    )
    p.set_defaults(func=cmd_lm_eval_tasks)

    p = sub.add_parser("report", help="the cost report: marginal, all-in and amortized cost vs a named baseline")
    p.add_argument("run_dir")
    p.add_argument("--claim", action="append", default=[], help="check a claim, e.g. '6%% of pre-training cost'")
    p.add_argument(
        "--estimate-baseline-tokens",
        type=int,
        default=None,
        metavar="D",
        help="allow the estimate F_train x D (cost-model training FLOPs/token x D) where no baseline was measured",
    )
    p.add_argument("--percent", action="store_true", help="fail unless percentages can be given")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "run", help="the whole pipeline: train, search, extract, export, finetune, eval, baseline, report"
    )
    _add_recipe_args(p)
    p.add_argument("--out", default="runs/default", help="run folder (a rerun skips finished phases)")
    p.add_argument(
        "--baselines",
        choices=["reference", "all"],
        default="reference",
        help="train from scratch the ERNIE-shaped child only (default) or every child (family experiment)",
    )
    p.add_argument(
        "--finetune-fraction",
        type=float,
        default=0.1,
        help="fine-tune budget per child as a fraction of the parent's training tokens",
    )
    p.add_argument("--eval-examples", type=int, default=100, help="test examples per structured task")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")  # rich tables stay one row per line in logs and pipes
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command != "train":
        print(
            f"elasticmoe {args.command}: error: only `train` runs under torchrun (WORLD_SIZE > 1); "
            "run the other commands in one process",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"elasticmoe {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # only ever from reading an input file
        print(f"elasticmoe {args.command}: error: an input file is not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from .dist import describe_failure

        line = describe_failure(exc) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        if line is None:
            raise
        print(f"elasticmoe {args.command}: error: {line}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not the input: disk full, permissions, a vanished file
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"elasticmoe {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
