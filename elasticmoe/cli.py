"""The command line: the only module that reads argv. Each subcommand loads a recipe or run
folder, applies overrides, and calls one library function. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path

from .config import ConfigError
from .recipe import PRESETS_DIR
from .runfolder import RUN, check_separate, lock, output_run, recipe_inputs, writing

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


def _other_kind(folder: Path | str) -> str | None:
    """The kind of a folder elasticmoe wrote that is not a run (a model folder, ...), else None."""
    from .checkpoint import read_marker

    marker = read_marker(Path(folder)) if Path(folder).is_dir() else None
    return marker["kind"] if marker is not None and marker["kind"] != RUN else None


def _lock_run(run: Path | str, command: str):
    """The run folder's write lock; a model folder given as a run is refused before a lock file
    could be left inside it (its manifest would no longer verify)."""
    if kind := _other_kind(run):
        raise ConfigError(f"{run} is a {kind} folder elasticmoe wrote, not a run folder")
    return lock(run, command)


def _lock_output(owner: Path | None, command: str):
    """The lock of the run an output lies in (`runfolder.output_run`), or nothing outside any run."""
    from contextlib import nullcontext

    return lock(owner, command) if owner is not None else nullcontext()


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    presets = ", ".join(sorted(f.stem for f in PRESETS_DIR.glob("*.yaml")))
    p.add_argument("--config", default=None, help=f"recipe file (YAML/TOML/JSON) or preset name ({presets})")
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
def _spec_from_search(run: Path, index: int, search_dir: str | None) -> str:
    """The Subnet (as JSON) of point `index` of a search's frontier."""
    import json

    pareto = Path(search_dir or run / "search") / "pareto.json"
    if not pareto.is_file():
        found = sorted(str(p.parent) for p in (run / "search").glob("*/pareto.json"))
        hint = f"; searches found: {found} (pass one with --search-dir)" if found else ""
        raise ConfigError(f"{pareto} does not exist: run `elasticmoe search {run}` first{hint}")
    points = json.loads(pareto.read_text())["frontier"]
    if not 0 <= index < len(points):
        raise ConfigError(f"--from-search {index} out of range; the frontier has {len(points)} points")
    return json.dumps(points[index]["subnet_json"])


def cmd_extract(args) -> int:
    from .phases import extract_child

    run = Path(args.run_dir)
    if args.from_search is not None:
        spec = _spec_from_search(run, args.from_search, args.search_dir)
    elif args.subnet:
        spec = args.subnet
    else:
        raise ConfigError("give --subnet SPEC or --from-search N")
    out = Path(args.out)
    check_separate(out, [run / "parent", run / "data", run / "checkpoints", run / "recipe.yaml", run / "ledger.jsonl"])
    owner = output_run(out, [run])
    with _lock_run(run, "extract"), _lock_output(owner, "extract"):
        meta = extract_child(run, None, spec, out)
    v = meta["verification"]
    print(
        f"wrote {args.out}: {meta['subnet']} | {meta['params']:,} params, {meta['active_params']:,} active | "
        f"max |logit diff| vs parent {v['max_abs_logit_diff']:.2e} on {v['tokens_verified']} tokens"
    )
    return 0


def cmd_export(args) -> int:
    from .export import export_model
    from .phases import model_folder

    check_separate(args.out, [model_folder(args.model_dir)])
    owner = output_run(args.out, [model_folder(args.model_dir)])
    with _lock_output(owner, "export"):
        rec = export_model(args.model_dir, args.out, args.format, args.gguf_type)
    if args.format == "gguf":
        from .gguf_export import gguf_summary

        print(gguf_summary(rec, args.out))
        return 0
    diff = (rec.get("hf_verification") or {}).get("max_abs_logit_diff")
    print(
        f"wrote {args.out} ({args.format})"
        + (f" | transformers vs elasticmoe max |logit diff| {diff:.2e}" if diff is not None else "")
    )
    return 0


def cmd_import_hf(args) -> int:
    from .checkpoint import atomic_write_text, save_model
    from .config import ElasticSpace, dump_yaml
    from .hf_import import import_hf, source_tokenizer
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
    tok = source_tokenizer(args.hf_dir, model.config.vocab_size)  # copied into the run: checked first
    with writing(out, "import-hf"):
        parent = save_model(
            out / "parent",
            model,
            {"kind": "imported", "source": str(Path(args.hf_dir).resolve())},
            extra_files={"tokenizer.json": tok} if tok else None,
        ).resolve()
        # paths point into the run's own copy, never at the source folder or the working directory
        recipe = {
            "model": model.config.to_dict(),
            "space": space.to_dict(),
            "data": {
                "vocab_size": model.config.vocab_size,
                "tokenizer": str(parent / "tokenizer.json") if tok else "",
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


def cmd_elastify(args) -> int:
    from .elastify import elastify, plan

    _require(args.tokens is None or args.tokens >= 1, f"--tokens={args.tokens} must be >= 1")
    _finite(args.lr, 0, "--lr")
    if args.parent_flops is not None:
        _finite(args.parent_flops, 0, "--parent-flops")
    out = Path(args.out)
    check_separate(out, [args.hf_dir, args.space, *args.data])
    p = None
    if not args.resume:  # import and check everything before the run folder is made
        from .config import ElasticSpace, load_mapping

        space = ElasticSpace.from_dict(load_mapping(args.space)) if args.space else None
        p = plan(args.hf_dir, args.config, args.set, space, args.tokens, args.lr, args.data, args.parent_flops)
        check_separate(out, recipe_inputs(p.recipe))
    with writing(out, "elastify", create=not args.resume):
        res = elastify(p, out, resume=args.resume, progress=not args.quiet)
    val = res.final_eval.get("largest", {})
    print(
        f"elastic parent written to {out / 'parent'} ({res.step} steps; validation "
        + ", ".join(f"{t} {v:.3f}" for t, v in val.items())
        + f" nats/token), the original kept as {out / 'original'}; next: elasticmoe search {out} ..."
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
    from rich.console import Console

    from .phases import search_run
    from .search import parse_objective
    from .search_output import format_table

    _require(args.batch >= 1, f"--batch={args.batch} must be >= 1")
    _require(args.windows >= 1, f"--windows={args.windows} must be >= 1")
    _require(args.seq_len is None or args.seq_len >= 2, f"--seq-len={args.seq_len} must be >= 2")
    _device(args.device)
    run = Path(args.run_dir)
    given = [f"{k}={getattr(args, k)}" for k in CONSTRAINT_FLAGS if getattr(args, k) is not None]
    if args.out:  # inside a run, only that run's own search (its lock is the one taken below)
        output_run(args.out, [run])
    with _lock_run(run, "search"):
        out = Path(args.out) if args.out else run / "search"
        if args.out and not (out / "latency_table.json").is_file():
            _refuse_foreign_folder(out, "pareto.json")
        check_separate(out, [run / "parent", run / "data", run / "checkpoints", run / "recipe.yaml"])
        result = search_run(
            run,
            {"cli": given},
            out,
            dests={"cli": out},
            device=args.device,
            windows=args.windows,
            seed=args.seed,
            per_layer=args.per_layer,
            batch=args.batch,
            seq_len=args.seq_len,
            latency=args.latency,
            objectives={"cli": parse_objective(args.objective)},
        )["cli"]
    Console().print(format_table(result))
    print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")
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
    # the teacher's and data's run folders are not inputs as a whole (a fine-tune may go inside them,
    # as the README's `--out runs/a/finetuned/c0`); their model and data are
    teacher = model_folder(args.teacher) if args.teacher else None
    check_separate(out, [child, teacher, data_run / "data", data_run / "parent"])
    owner = output_run(out, [child])
    from contextlib import nullcontext

    from .runfolder import looks_like_run

    mine = looks_like_run(data_run) and not _other_kind(data_run)  # never lock a model folder
    data_lock = lock(data_run, "finetune") if mine else nullcontext()
    with data_lock, _lock_output(owner, "finetune"), writing(out, "finetune", create=not args.resume):
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
            keep_best=not args.last,
        )
    print(f"fine-tuned {res.steps} steps / {res.tokens:,} tokens -> {Path(args.out) / 'model'}")
    if res.kept:
        print(f"  {res.kept['reason']}")
    for t in res.val_before:
        print(f"  {t:6s} val CE {res.val_before[t]:.3f} -> {res.val_after[t]:.3f}")
    if res.kd_before is not None:
        print(f"  KL to teacher {res.kd_before:.4f} -> {res.kd_after:.4f}")
    return 0


def cmd_baseline(args) -> int:
    from .phases import BASELINE_MODEL, baseline, retrofit_child_dirs, run_recipe, shape_label
    from .subnet import Subnet

    _require(all(v is None or v >= 1 for v in (args.tokens, args.steps)), "--tokens / --steps must be >= 1")
    _require(
        args.method == "expert-prune" or args.tokens is not None or args.steps is not None,
        f"baseline --method {args.method} needs a budget: --tokens or --steps",
    )
    _require(args.method == "dense-parent" or bool(args.arch), f"baseline --method {args.method} needs --arch")
    _require(
        args.finetune_tokens is None or (args.method == "retrofit" and args.finetune_tokens >= 1),
        "--finetune-tokens must be >= 1 and is for --method retrofit",
    )
    _finite(args.lr, 0, "--lr")
    child = shape_label(Subnet.parse(args.arch, run_recipe(args.run_dir).model)) if args.method == "retrofit" else None
    with _lock_run(args.run_dir, "baseline"):
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
            finetune_tokens=args.finetune_tokens,
            child=child,
        )
    model = out / BASELINE_MODEL[args.method]
    print(f"baseline ({args.method}) -> {model} (recorded in {Path(args.run_dir) / 'ledger.jsonl'})")
    if args.method == "retrofit":
        from .checkpoint import read_json

        for folder, what in zip(retrofit_child_dirs(out, child), ("zero-shot", "fine-tuned")):
            meta = read_json(folder / "config.json")["meta"]
            print(f"  {what} child {meta['subnet']} -> {folder}")
    return 0


# -- eval / report / run ---------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .evaluate_run import evaluate_folders, name_models, print_results

    _require(args.examples >= 1, f"--examples={args.examples} must be >= 1")
    _device(args.device)
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give the path of the results JSON file to write")
    names, data_run = name_models(args.model_dirs, args.data)
    out = Path(args.out) if args.out else data_run / "eval" / "cli.json"
    check_separate(out, [*names.values(), data_run / "data", data_run / "ledger.jsonl"])
    owner = output_run(out, [data_run])  # models from elsewhere may be compared on this run's data
    with _lock_run(data_run, "eval"), _lock_output(owner, "eval"):
        res = evaluate_folders(names, data_run, out, max_examples=args.examples, device=args.device, parent=args.parent)
    print_results(res)
    print(f"wrote {out}")
    return 0


def cmd_lm_eval_tasks(args) -> int:
    from .lm_eval_tasks import GROUP, MODEL_ARGS, write_lm_eval_tasks

    _require(args.examples is None or args.examples >= 1, f"--examples={args.examples} must be >= 1")
    _refuse_foreign_folder(Path(args.out), f"{GROUP}.yaml")
    owner = output_run(args.out, [args.run_dir])
    with _lock_output(owner, "lm-eval-tasks"):
        written = write_lm_eval_tasks(Path(args.run_dir), Path(args.out), max_examples=args.examples)
    print(f"wrote {len(written)} lm-eval task(s) to {args.out}; run, offline:")
    print(
        f"  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf --model_args {MODEL_ARGS} "
        f"--tasks {GROUP} --include_path {args.out} --device cpu --batch_size 8"
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
    with _lock_run(args.run_dir, "report"):
        report_run(
            Path(args.run_dir),
            claims=args.claim,
            estimate_tokens=args.estimate_baseline_tokens,
            require_percent=args.percent,
        )
    print((Path(args.run_dir) / "report.md").read_text())
    return 0


def cmd_arena(args) -> int:
    from .arena import run_arena, votes_path

    _require(1 <= args.max_new_tokens <= 1024, f"--max-new-tokens={args.max_new_tokens} must be in 1..1024")
    _require(0 <= args.port <= 65535, f"--port={args.port} must be in 0..65535")
    if not (Path(args.run_dir) / "recipe.yaml").is_file():
        raise ConfigError(f"{args.run_dir} is not a run folder (no recipe.yaml)")
    if args.export:
        from .arena.store import Store, export_jsonl
        from .checkpoint import atomic_write_text

        db = Path(args.db) if args.db else votes_path(args.run_dir)
        if not db.is_file():
            raise ConfigError(f"{db} does not exist: no votes yet")
        store = Store(db)
        try:
            lines = list(export_jsonl(store))
        finally:
            store.close()
        atomic_write_text(Path(args.export), "".join(lines))
        print(f"wrote {len(lines)} votes to {args.export}")
        return 0
    run_arena(args.run_dir, args.host, args.port, args.models, args.token, args.prompts, args.db, args.max_new_tokens)
    return 0


def cmd_run(args) -> int:
    from .pipeline import family_of, run_pipeline

    _finite(args.finetune_fraction, 0, "--finetune-fraction", strict=False)
    _require(args.eval_examples >= 1, f"--eval-examples={args.eval_examples} must be >= 1")
    chosen = {}
    if args.children is not None:
        chosen["family"], chosen["targeted"] = family_of([n.strip() for n in args.children.split(",") if n.strip()])
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
            **chosen,
        )
    print(f"done: {Path(args.out) / 'report.md'}")
    return 0


# -- the parser: one function per command adds its arguments --------------------------------
def _args_info(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--forward", action="store_true", help="also run each sub-network on random tokens")
    p.add_argument("--rows", type=int, default=40, help="at most this many rows")


def _args_train(p: argparse.ArgumentParser) -> None:
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


def _args_search(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--objective",
        default=None,
        help="rank by a weighted task score, e.g. find=1,text=0.2 (weights of the per-task search-split losses)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="default RUN_DIR/search")


def _args_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--subnet", help="Subnet spec, e.g. 'L3 E4 k1 W128' or per-layer JSON")
    p.add_argument("--from-search", type=int, default=None, metavar="N", help="the N-th point of search/pareto.json")
    p.add_argument("--search-dir", default=None, help="folder holding pareto.json (default RUN_DIR/search)")
    p.add_argument("--out", required=True)


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="transformers folder or llama.cpp GGUF")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF tensor type")
    p.add_argument("--out", required=True)


def _args_import_hf(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument("--space", help="ElasticSpace file (YAML/JSON); default: a space derived from the config")


def _args_elastify(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("hf_dir", help="a local transformers MoE folder (safetensors)")
    p.add_argument("--out", required=True, help="new run folder")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="text, .jsonl or HF dataset files (globs; repeatable); default: the recipe's source (the embedded corpus)",
    )
    p.add_argument("--tokens", type=int, default=None, help="elastic training budget (default: the recipe's steps)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the elastic training")
    p.add_argument("--parent-flops", type=float, default=None, metavar="F", help="FLOPs of the original's training")
    p.add_argument("--space", help="ElasticSpace file (YAML/JSON); default: a space derived from the config")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_budget(p: argparse.ArgumentParser, required: bool) -> None:
    budget = p.add_mutually_exclusive_group(required=required)
    budget.add_argument("--tokens", type=int)
    budget.add_argument("--steps", type=int)


def _args_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("child_dir")
    p.add_argument("--teacher", help="parent run folder (the teacher); omit for plain fine-tuning")
    p.add_argument("--data", help="run folder whose data to use (default: the teacher's or the child's parent run)")
    _add_budget(p, required=True)
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
    p.add_argument(
        "--last",
        action="store_true",
        help="publish the last step; default: the evaluated state (the start included) with the lowest "
        "validation loss, so a fine-tune never publishes a child worse than it began on validation",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")


def _args_baseline(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument(
        "--method",
        choices=["scratch", "dense-parent", "prune-distill", "expert-prune", "retrofit"],
        default="scratch",
        help="scratch: --arch from scratch; dense-parent: the parent's architecture trained normally; "
        "prune-distill / expert-prune: the dense parent pruned to --arch's shape (and distilled for the budget); "
        "retrofit: the dense parent trained elastically for the budget, --arch's shape extracted and fine-tuned",
    )
    p.add_argument("--arch", help="Subnet spec of the parent, or a model config file (not for dense-parent)")
    p.add_argument("--dense", default="dense-parent", help="baselines/ folder of the dense parent to prune")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="prune-distill, retrofit: the learning rate of distillation and retrofit"
    )
    _add_budget(p, required=False)
    p.add_argument(
        "--finetune-tokens",
        type=int,
        default=None,
        help="retrofit: the extracted child's fine-tune budget (default: the retrofit's own --tokens/--steps)",
    )
    p.add_argument("--name", help="folder name under RUN_DIR/baselines/")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--quiet", action="store_true")


def _args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dirs", nargs="+")
    p.add_argument("--data", help="run folder whose test split to use (default: the models' parent run)")
    p.add_argument("--parent", help="name of the model that retention is measured against (default: parent)")
    p.add_argument("--examples", type=int, default=100, help="test examples per structured task")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="results JSON (default RUN_DIR/eval/cli.json)")


def _args_lm_eval_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--examples", type=int, default=100, help="examples per task (100: the count `eval` and the pipeline score)"
    )


def _args_report(p: argparse.ArgumentParser) -> None:
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


def _args_arena(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback needs --token")
    p.add_argument("--models", nargs="+", help="names (parent, c0, c0-ft, ...) or model folders; default: all")
    p.add_argument("--token", help="shared token every request must carry (the printed address sets it)")
    p.add_argument("--prompts", help="prompts to draw: one per line, or .jsonl with a 'prompt' key (default: held-out)")
    p.add_argument("--db", help="votes database (default RUN_DIR/arena/votes.sqlite)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    p.add_argument("--export", metavar="PATH", help="write the votes as JSON lines to PATH and exit")


def _args_run(p: argparse.ArgumentParser) -> None:
    _add_recipe_args(p)
    p.add_argument("--out", default="runs/default", help="run folder (a rerun skips finished phases)")
    p.add_argument(
        "--baselines",
        choices=["reference", "all"],
        default="reference",
        help="reference (default): the dense parent, and the ERNIE-shaped child from scratch and pruned + distilled; "
        "all: those for every child, plus the dense parent at equal FLOPs, expert-prune and retrofit (1x and 4x)",
    )
    p.add_argument(
        "--finetune-fraction",
        type=float,
        default=0.1,
        help="fine-tune budget per child as a fraction of the parent's training tokens",
    )
    p.add_argument("--eval-examples", type=int, default=100, help="test examples per structured task")
    p.add_argument(
        "--children",
        help="comma-separated children to search for, extract and train, the first the reference "
        "(default: ernie51-shape,active-third,half-latency,ernie51-find)",
    )
    p.add_argument("--quiet", action="store_true")


# command -> (help, the function adding its arguments); its handler is cmd_<command> (looked up
# when the parser is built, so a test can replace one)
COMMANDS = {
    "info": ("list the elastic space's sub-networks with their cost", _args_info),
    "train": ("train the elastic parent", _args_train),
    "search": ("find the best sub-networks under constraints (a Pareto frontier)", _args_search),
    "extract": ("materialise a sub-network as a standalone, verified child", _args_extract),
    "export": ("write a model folder in another tool's format", _args_export),
    "import-hf": (
        "turn a local Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, ERNIE-4.5-MoE or GLM-4.5 MoE folder into an elastic parent",
        _args_import_hf,
    ),
    "elastify": ("make a local transformers MoE elastic, the original frozen as its teacher", _args_elastify),
    "finetune": ("distil a child from its parent (or plain fine-tune without --teacher)", _args_finetune),
    "baseline": ("a measured alternative to an elastic child (scratch is the denominator)", _args_baseline),
    "eval": ("per-task quality on the held-out test split, with retention vs a parent", _args_eval),
    "lm-eval-tasks": ("write the run's test tasks as local lm-evaluation-harness tasks", _args_lm_eval_tasks),
    "report": ("the cost report: marginal, all-in and amortized cost vs a named baseline", _args_report),
    "run": ("the whole pipeline: train, search, extract, finetune, eval, export, baseline, report", _args_run),
    "arena": ("people vote blind between the run's models in a local web app; ratings with intervals", _args_arena),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (`elasticmoe CMD: error: ...`, exit 2) like every
    other input error, not the usage block; `--help` still prints it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="elasticmoe", description="Train once, extract many: elastic MoE LMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=globals()["cmd_" + name.replace("-", "_")])
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "160")  # rich tables stay one row per line in logs and pipes
    args = build_parser().parse_args(argv)
    if getattr(args, "out", None) == "":
        print(f"elasticmoe {args.command}: error: --out is empty: give a path", file=sys.stderr)
        return 2
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
    previous = _stop_on_signals()
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"elasticmoe {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:  # only ever from reading an input file
        print(f"elasticmoe {args.command}: error: an input file is not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 2
    except RecursionError:  # json/yaml parsers' depth limit on something read from disk
        print(
            f"elasticmoe {args.command}: error: an input file is nested too deeply to be one we wrote", file=sys.stderr
        )
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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (schedulers stop jobs with SIGTERM)
        signum = getattr(exc, "signum", signal.SIGINT)
        print("interrupted" + (f" ({signal.Signals(signum).name})" if signum != signal.SIGINT else ""), file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is, like Ctrl-C: every cleanup that runs on an
    interrupt runs (the ledger closes the phase, temporaries are removed, locks released)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def _stop_on_signals() -> dict:
    """Handle SIGTERM and SIGHUP as Ctrl-C for this command; returns the handlers to restore."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
