"""The stages that work on a trained parent's run folder, one function each, called alike by the
command line (`cli`, which parses and checks arguments) and the pipeline (`pipeline`, which picks
arguments and records its state): `search_run`, `extract_child`, `finetune` and `baseline`
(the other stages: `train.train`, `export.export_model`, `evaluate_run.evaluate_folders`,
`report.report_run`). Each appends its work to the run's ledger.

Search (`search_run`): constraint searches over the parent sharing one evaluator (its cache) and
one latency table; each writes `pareto.json` / `pareto.png`.

Fine-tuning (`finetune`): loss = kd_weight * KL(parent || child) at a temperature + ce_weight *
cross-entropy, on the parent run's training data with per-task weights (e.g. only the search-like
`kv` task, to specialise a child the way ERNIE 5.1 was specialised). The teacher is the full
parent (its largest sub-network). Without a teacher it is plain fine-tuning. The budget is stated
in tokens; checkpoints and exact resume work as in `train`.

Baselines (`baseline`): the alternatives to an elastic child, measured on the same data; the
child's architecture from scratch is the denominator of every cost percentage.

    FT_DIR/checkpoints/step-NNNNNN   resumable state
    FT_DIR/model/                    the fine-tuned child (a model folder)
    FT_DIR/metrics.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from . import cost as costmod
from . import dist as distmod
from .checkpoint import atomic_write_text, load_model, read_json
from .config import ConfigError, ElasticSpace
from .ledger import Ledger
from .recipe import DistillConfig, Recipe, SamplingConfig, load_recipe
from .rundata import load_run_data
from .subnet import Subnet
from .tokens import unpack_windows
from .train import Job, document_eos, eval_losses, kd_loss, resolve_device, run_job, train

log = logging.getLogger(__name__)


def model_folder(path: Path | str) -> Path:
    """Accept a model folder, a run folder (its `parent/`) or a fine-tune folder (its `model/`)."""
    p = Path(path)
    for cand in (p, p / "model", p / "parent"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise ConfigError(f"{p} is not a model folder (no config.json + model.safetensors in it, model/ or parent/)")


def run_recipe(run_dir: Path | str) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no recipe.yaml)")
    return load_recipe(path)


def val_tokens(run_dir: Path | str, n_windows: int = 2) -> torch.Tensor:
    """Held-out validation tokens of a run (its first task's windows, inputs only): what extraction
    and export check a model's logits on."""
    data = load_run_data(run_dir, run_recipe(run_dir))
    return next(iter(data.eval_windows("val", n_windows).values()))[:, :-1]


def parent_run_of(model_dir: Path) -> Path | None:
    """The run folder a child was extracted from, when its meta names it and it still exists."""
    meta = read_json(model_dir / "config.json").get("meta", {})
    path = (meta.get("parent") or {}).get("path")
    if not path:
        return None
    p = Path(path)
    run = p.parent if p.name == "parent" else p
    return run if (run / "recipe.yaml").is_file() else None


@dataclasses.dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    tokens: int
    val_before: dict[str, float]
    val_after: dict[str, float]
    kd_before: float | None
    kd_after: float | None
    kept: dict | None = None  # which evaluated state was published and why (keep_best)


def finished_finetune(out_dir: Path | str) -> FinetuneResult | None:
    """The result of a fine-tune that already wrote `out_dir/model` (read from its meta, nothing
    re-run), or None when it has not finished."""
    done = Path(out_dir) / "model"
    if not (done / "manifest.json").exists():
        return None
    ft = read_json(done / "config.json")["meta"]["finetune"]
    return FinetuneResult(
        Path(out_dir),
        ft["steps"],
        ft["tokens"],
        ft["val_before"],
        ft["val_after"],
        ft["kd_before"],
        ft["kd_after"],
        ft.get("kept"),
    )


def _steps_for(tokens: int | None, steps: int | None, tokens_per_step: int) -> int:
    if (tokens is None) == (steps is None):
        raise ConfigError("give exactly one of --tokens or --steps")
    n = steps if steps is not None else math.ceil(tokens / tokens_per_step)
    if n < 1:
        given = f"{steps} steps" if steps is not None else f"{tokens} tokens"
        raise ConfigError(f"a budget of {given} is less than one step ({tokens_per_step} tokens)")
    return n


@torch.no_grad()
def mean_kd(
    child, teacher, windows: dict[str, torch.Tensor], device, temperature: float = 1.0, doc_eos: int | None = None
) -> float:
    """Mean KL(teacher || child) per token over the windows of every task (over the kept targets
    of a task given as (windows, keep)); `doc_eos` as in train.eval_losses."""
    total, n = 0.0, 0
    for w, keep in map(unpack_windows, windows.values()):
        x = w[:, :-1].to(device)
        keep = keep.to(device) if keep is not None else None
        count = int(keep.sum()) if keep is not None else x.numel()
        if count:
            child_logits, teacher_logits = child(x, doc_eos=doc_eos).logits, teacher(x, doc_eos=doc_eos).logits
            total += kd_loss(child_logits, teacher_logits, temperature, keep).item() * count
            n += count
    return total / max(n, 1)


# validation windows per task of a fine-tune (at least): keep-best chooses on them, and 16 windows
# left the choice to noise (bench/FINETUNE.md)
FINETUNE_EVAL_WINDOWS = 32


def _finetune_recipe(
    recipe: Recipe, child_config, distill, task_weights, lr, n_steps, bs, ckpt_every, device, eval_every=None
):
    """A fine-tune as a recipe for the training engine: one fixed sub-network (the whole child),
    the teacher outside it, the parent's data with the fine-tune's mix, its own batch order."""
    return dataclasses.replace(
        recipe,
        model=child_config,
        space=ElasticSpace.full(child_config),
        # a fine-tune starts from trained weights: every level from its first step, no curriculum
        data=dataclasses.replace(recipe.data, task_weights=dict(task_weights or {}), curriculum=0.0),
        sampling=SamplingConfig(mode="sandwich", n_random=0, full_fraction=0.0),
        distill=distill,
        reorder=dataclasses.replace(recipe.reorder, at_steps=(), at_switch=False),
        train=dataclasses.replace(
            recipe.train,
            lr=lr,
            steps=n_steps,
            warmup=max(1, n_steps // 10),
            batch_size=bs,
            ckpt_every=ckpt_every,
            eval_every=eval_every or n_steps,
            eval_windows=max(recipe.train.eval_windows, FINETUNE_EVAL_WINDOWS),
            keep_last=2,
            seed=recipe.train.seed + 1,
            device=device,
            init_from="",
        ),
    )


def finetune(
    child_dir: Path | str,
    out_dir: Path | str,
    teacher_run: Path | str | None = None,
    data_run: Path | str | None = None,
    tokens: int | None = None,
    steps: int | None = None,
    task_weights: dict[str, float] | None = None,
    lr: float = 1e-3,
    batch_size: int | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    temperature: float = 1.0,
    ckpt_every: int | None = None,
    resume: bool = False,
    device: str = "auto",
    ledger_path: Path | None = None,
    stop_at: int | None = None,
    keep_best: bool = True,
) -> FinetuneResult:
    """Distil (or, without `teacher_run`, plainly fine-tune) the child at `child_dir`. With
    `keep_best` (the default) the child is evaluated on the run's validation split at the start and
    5 times during the fine-tune, and the state with the lowest validation loss (over all its
    validation targets, at least 32 windows per task) is published
    (the zero-shot child when no step helped); its meta says which was kept and why."""
    child_dir = model_folder(child_dir)
    out_dir = Path(out_dir)
    data_run = Path(data_run or teacher_run or parent_run_of(child_dir) or "")
    if not (data_run / "recipe.yaml").is_file():
        raise ConfigError("fine-tuning needs data: pass --teacher RUN_DIR or --data RUN_DIR")
    recipe = run_recipe(data_run)
    data = load_run_data(data_run, recipe)
    bs = batch_size or recipe.train.batch_size
    n_steps = _steps_for(tokens, steps, bs * recipe.data.seq_len)
    if not resume and (out_dir / "checkpoints").exists():
        raise ConfigError(f"{out_dir} already holds a fine-tune; pass --resume or choose another --out")
    dev = resolve_device(device)
    child, child_meta = load_model(child_dir, dev)
    teacher = None
    if teacher_run is not None:
        teacher, _ = load_model(model_folder(teacher_run), dev)
        teacher.eval()
        if teacher.config.vocab_size != child.config.vocab_size:
            raise ConfigError("teacher and child have different vocabularies")
    ft_recipe = _finetune_recipe(
        recipe,
        child.config,
        DistillConfig(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, subnet_weight=0.0),
        task_weights,
        lr,
        n_steps,
        bs,
        ckpt_every or max(1, min(50, math.ceil(n_steps / 10))),  # a kill loses <= 10% of the work
        device,
        eval_every=max(1, n_steps // 5) if keep_best else n_steps,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = data.eval_windows("val", ft_recipe.train.eval_windows, recipe.data.loss_on)
    if task_weights:
        windows = {t: w for t, w in windows.items() if task_weights.get(t, 0) > 0} or windows
    full = Subnet.full(child.config)
    doc_eos = document_eos(recipe, data)
    before_file = out_dir / "before.json"
    if resume and before_file.is_file():  # measured on the zero-shot child when this fine-tune began
        saved = json.loads(before_file.read_text())
        before, kd_before = saved["val"], saved["kd"]
    else:
        before = eval_losses(child, windows, {"child": full}, dev, doc_eos=doc_eos)["child"]
        kd_before = mean_kd(child, teacher, windows, dev, temperature, doc_eos) if teacher is not None else None
        atomic_write_text(before_file, json.dumps({"val": before, "kd": kd_before}) + "\n")
    ledger = Ledger(ledger_path or data_run / "ledger.jsonl")
    info = {
        "model": str(child_meta.get("subnet", child_dir)),
        "child_dir": ledger.ref(child_dir),
        "parent_run": ledger.ref(data_run),
        "teacher": bool(teacher),
        "out": ledger.ref(out_dir),
    }
    after: dict[str, float] = {}
    late: dict[str, Any] = {"kd": None, "kept": None}  # set when the model is published

    def final_meta(model, _val, kept) -> dict:
        after.update(eval_losses(model, windows, {"child": full}, dev, doc_eos=doc_eos)["child"])
        late["kd"] = mean_kd(model, teacher, windows, dev, temperature, doc_eos) if teacher is not None else None
        late["kept"] = kept
        return {
            **child_meta,
            "kind": "finetuned-child",
            "finetune": {
                "tokens": n_steps * bs * recipe.data.seq_len,
                "steps": n_steps,
                "teacher": str(teacher_run) if teacher_run else None,
                "task_weights": task_weights or {},
                "kd_weight": kd_weight,
                "ce_weight": ce_weight,
                "temperature": temperature,
                "lr": lr,
                "val_before": before,
                "val_after": dict(after),
                "kd_before": kd_before,
                "kd_after": late["kd"],
                "kept": kept,
            },
        }

    job = Job(
        ft_recipe,
        out_dir,
        data,
        phase="finetune",
        output="model",
        model=child,
        teacher=teacher,
        eval_tasks=tuple(windows),
        eval_phase="finetune-eval",
        ledger_info=info,
        final_meta=final_meta,
        keep_best=keep_best,
    )
    par = distmod.setup(dev, "auto")
    try:
        res = run_job(job, par, resume, progress=False, stop_at=stop_at, ledger_path=ledger.path)
    finally:
        par.close()
    if not after:  # stopped early, or resumed a finished fine-tune: measure the model as it is
        after = eval_losses(child, windows, {"child": full}, dev, doc_eos=doc_eos)["child"]
        late["kd"] = mean_kd(child, teacher, windows, dev, temperature, doc_eos) if teacher is not None else None
    tokens = res.step * bs * recipe.data.seq_len
    return FinetuneResult(out_dir, res.step, tokens, before, after, kd_before, late["kd"], late["kept"])


def extract_child(run_dir: Path | str, parent, spec: str, out: Path, n_windows: int = 4) -> dict:
    """The extract stage: `spec` from the run's parent (given, or None to load `RUN/parent`) into
    `out`, verified on held-out validation tokens, recorded in the ledger (the verification
    forwards of parent-subnet and child)."""
    run_dir = Path(run_dir)
    data = load_run_data(run_dir, run_recipe(run_dir))
    if parent is None:
        parent, _ = load_model(model_folder(run_dir))
    subnet = Subnet.parse(spec, parent.config, parent.layer_order)
    parent_meta = {"path": str(model_folder(run_dir).resolve()), "run": str(run_dir.resolve())}
    return _extract_recorded(run_dir, data, parent, subnet, Path(out), parent_meta, n_windows)


def _extract_recorded(
    run_dir: Path, data, parent, subnet: Subnet, out: Path, parent_meta: dict, n_windows: int = 4, **fields
) -> dict:
    """Extract and verify `subnet` of `parent` into `out` as a ledger phase `extract` (with `fields`)."""
    from .extract import extract_to_folder

    tokens = next(iter(data.eval_windows("val", n_windows).values()))[:, :-1]
    ledger = Ledger(run_dir / "ledger.jsonl")
    with ledger.phase(
        "extract", model=str(subnet), out=ledger.ref(out), parent_run=ledger.ref(run_dir), **fields
    ) as rec:
        meta = extract_to_folder(
            parent, subnet, out, tokens, tokenizer_path=data.tokenizer_path, parent_meta=parent_meta
        )
        k_parent = costmod.cost(parent.config, subnet, tokens.shape[1]).flops_forward
        rec["tokens"] = 2 * tokens.numel()  # parent-with-subnet and child each run the tokens
        rec["flops"] = 2 * k_parent * tokens.numel()
    return meta


def search_run(
    run_dir: Path | str,
    searches: dict[str, Any],
    out: Path | str,
    dests: dict[str, Path] | None = None,
    device: str = "auto",
    windows: int | None = None,
    seed: int | None = None,
    per_layer: bool = False,
    batch: int = 1,
    seq_len: int | None = None,
    latency: bool = False,
    skip_impossible: bool = False,
    objectives: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The search stage: constraint searches over the run's parent, in order, sharing one evaluator
    (a sub-network evaluated once is not evaluated again) and one latency table. `objectives`: name
    -> task weights (`search.parse_objective`) that search ranks by (default: every task alike).

    `searches`: name -> constraints (what `search.parse_constraints` takes), each taken at `batch`
    sequences of `seq_len` tokens (default the recipe's). Each search is a ledger phase `search`
    (model = its name) and writes pareto.json / pareto.png into `dests[name]` (default
    `out/<name>`). A latency table is measured, recorded and saved as `out/latency_table.json`
    when `latency` or a constraint needs one. `windows` (search-split windows per task) and `seed`
    default to the recipe's. Returns name -> SearchResult; with `skip_impossible`, a search whose
    constraints no sub-network meets maps to its ConfigError instead of raising."""
    from .latency import LatencyTable
    from .search import SubnetEvaluator, parse_constraints, search
    from .search_output import write_search_results

    run_dir, out = Path(run_dir), Path(out)
    recipe = run_recipe(run_dir)
    seq = seq_len or recipe.data.seq_len
    parsed = {name: dataclasses.replace(parse_constraints(c), batch=batch, seq_len=seq) for name, c in searches.items()}
    parent, _ = load_model(model_folder(run_dir))
    dev = resolve_device(device)
    parent.to(dev)
    data = load_run_data(run_dir, recipe)
    evaluator = SubnetEvaluator(
        parent,
        data.eval_windows("search", windows or recipe.train.eval_windows, recipe.data.loss_on),
        dev,
        doc_eos=document_eos(recipe, data),
    )
    seed = recipe.train.seed if seed is None else seed
    parent_cost = costmod.cost(parent.config, None, seq)
    ledger = Ledger(run_dir / "ledger.jsonl")
    same = _search_identity(ledger, run_dir, out, str(dev), seq, batch)
    table = None
    if latency or any(c.needs_latency for c in parsed.values()):
        key = _search_key(same, "latency-table")
        with ledger.phase("search", device=str(dev), model="latency-table", key=key) as rec:
            table = LatencyTable.measure(parent, seq, batch, dev, repeats=5, space=recipe.space)
            table.save(out / "latency_table.json")
            rec["seconds_measured"] = table.meta.get("seconds")
    results: dict[str, Any] = {}
    for name, cons in parsed.items():
        try:
            objective = (objectives or {}).get(name)
            key = _search_key(same, name, cons.given(), seed, per_layer, windows, (dests or {}).get(name))
            if objective:  # keys of searches without one stay as they were
                key = _search_key(same, name, key, objective)
            with ledger.phase("search", device=str(dev), model=name, constraints=cons.given(), key=key) as rec:
                result = search(
                    evaluator.weighted(objective),
                    recipe.space,
                    parent.layer_order,
                    cons,
                    seed=seed,
                    per_layer=per_layer,
                    latency_table=table,
                )
                rec["tokens"], rec["flops"] = result.tokens, result.flops
        except ConfigError as exc:
            if not skip_impossible:
                raise
            results[name] = exc
            continue
        dest = (dests or {}).get(name, out / name)
        write_search_results(dest, result, seed=seed, constraints=cons, parent_cost=parent_cost)
        results[name] = result
    return results


def _search_identity(ledger: Ledger, run_dir: Path, out: Path, *settings: Any) -> list:
    """What makes two searches the same work: the parent (its manifest), where the results go, and
    the measurement settings."""
    from .checkpoint import sha256_file

    manifest = model_folder(run_dir) / "manifest.json"
    return [sha256_file(manifest) if manifest.is_file() else None, ledger.ref(out), *settings]


def _search_key(identity: list, *what: Any) -> str:
    """The ledger key of one search: the same search redone (a `run` killed mid-search and run
    again, or the same command repeated into the same folder) is counted once, as a resumed training
    segment is; a search with other constraints, seed or output counts on its own."""
    import hashlib

    blob = json.dumps([*identity, *what], sort_keys=True, default=str)
    return "search:" + hashlib.sha256(blob.encode()).hexdigest()[:24]


BASELINE_METHODS = ("scratch", "dense-parent", "prune-distill", "expert-prune", "retrofit")
# where each method's model lies inside its baselines/<name>/ folder (retrofit: the retrofitted
# elastic parent; its children are in `retrofit_child_dirs`)
BASELINE_MODEL = {
    "scratch": "parent",
    "dense-parent": "parent",
    "prune-distill": "distilled/model",
    "expert-prune": "pruned",
    "retrofit": "parent",
}


def baseline(
    run_dir: Path | str,
    arch: str | None = None,
    tokens: int | None = None,
    steps: int | None = None,
    name: str | None = None,
    progress: bool = False,
    resume: bool = False,
    method: str = "scratch",
    dense: str = "dense-parent",
    lr: float = 1e-3,
    finetune_tokens: int | None = None,
    child: str | None = None,
) -> Path:
    """A measured alternative to an elastic child, recorded in the run's ledger; returns its folder.

    scratch        `arch` (a Subnet spec of the run's parent, or a model config file) trained from
                   scratch on the run's data with the run's recipe and no elastic sampling
    dense-parent   the same for the parent's own architecture (`arch` omitted): the normally
                   trained parent the elastic parent is judged by (equal tokens, or pass more
                   tokens for equal FLOPs)
    prune-distill  the dense parent (baselines/`dense`) importance-pruned to the shape of `arch`
                   and distilled from it for `tokens` (Minitron-style); see `prune_baseline`
    expert-prune   the dense parent's experts cut one-shot to the expert count of `arch` by
                   router-weighted output saliency, no training (REAP-style); see `prune_baseline`
    retrofit       the dense parent re-ordered by importance and trained elastically for
                   `tokens` (Nemotron Elastic-style), then the shape of `arch` extracted zero-shot
                   (folder name `child`) and fine-tuned for `finetune_tokens`; see `retrofit_baseline`
    """
    if method not in BASELINE_METHODS:
        raise ConfigError(f"baseline method {method!r}; allowed {list(BASELINE_METHODS)}")
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    if method in ("prune-distill", "expert-prune"):
        if not arch:
            raise ConfigError(f"baseline --method {method} needs --arch (the child's shape)")
        return prune_baseline(run_dir, arch, method, tokens, steps, name, dense, resume, lr)
    if method == "retrofit":
        if not arch:
            raise ConfigError("baseline --method retrofit needs --arch (the child's shape)")
        return retrofit_baseline(
            run_dir, arch, tokens, steps, name, dense, resume, lr, finetune_tokens, child, progress=progress
        )
    if method == "dense-parent":
        arch = arch or str(Subnet.full(recipe.model))
        name = name or "dense-parent"
    if not arch:
        raise ConfigError("baseline --method scratch needs --arch (a Subnet spec or a model config file)")
    if Path(arch).is_file():
        from .config import ModelConfig, load_mapping

        mapping = load_mapping(arch)
        model_cfg = ModelConfig.from_dict(mapping.get("model", mapping))
        label = name or Path(arch).stem
    else:
        sn = Subnet.parse(arch, recipe.model)
        model_cfg = costmod.child_config(recipe.model, sn)
        label = name or str(sn).replace(" ", "_").replace("[", "").replace("]", "").replace(",", "+")
    tokens_per_step = recipe.train.batch_size * recipe.data.seq_len
    n_steps = _steps_for(tokens, steps, tokens_per_step)
    b_recipe = dataclasses.replace(
        recipe,
        model=model_cfg,
        space=ElasticSpace.full(model_cfg),
        sampling=SamplingConfig(mode="sandwich", n_random=0, full_fraction=0.0),
        train=dataclasses.replace(
            recipe.train,
            steps=n_steps,
            eval_every=max(1, n_steps),
            warmup=min(recipe.train.warmup, max(1, n_steps // 10)),
            ckpt_every=max(1, min(recipe.train.ckpt_every, n_steps)),
        ),
        reorder=dataclasses.replace(recipe.reorder, at_steps=(), at_switch=False),
    )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", label):
        raise ConfigError(f"baseline name {label!r} must be one path component of letters, digits and ._+-")
    out = run_dir / "baselines" / label
    if not resume and out.exists() and not (out / "parent" / "manifest.json").exists():
        shutil.rmtree(out)  # an unfinished earlier attempt without --resume: start over
    if not (run_dir / "data" / "ready").exists():
        raise ConfigError(f"{run_dir} has no prepared data (an imported parent? train it first): nothing to train on")
    if not (out / "data" / "ready").exists():  # copy under a temporary name, then rename: never half a copy
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out / "data", ignore_errors=True)
        shutil.copytree(run_dir / "data", tmp)
        tmp.rename(out / "data")
    train(
        b_recipe,
        out,
        resume=resume and (out / "checkpoints").exists(),
        progress=progress,
        phase="baseline",
        ledger_path=run_dir / "ledger.jsonl",
        meta={"method": method},
    )
    return out


def _dense_parent(run_dir: Path, recipe: Recipe, dense: str, method: str):
    """The trained dense parent (RUN/baselines/`dense`/parent) the pruning and retrofit methods
    start from, and its folder."""
    dense_dir = run_dir / "baselines" / dense
    if not (dense_dir / "parent" / "manifest.json").exists():
        raise ConfigError(f"{method} needs a trained dense parent at {dense_dir}: run `baseline --method dense-parent`")
    parent, _ = load_model(dense_dir / "parent")
    if parent.config != recipe.model:
        raise ConfigError(f"{dense_dir} is not the parent's architecture: it cannot be pruned to a child shape")
    return parent, dense_dir


def calibration_batches(data, recipe: Recipe) -> list[torch.Tensor]:
    """The training batches the importance of a dense parent is measured on before it is pruned
    or retrofitted (the same for every method, so they start from the same re-ordering)."""
    batches = data.train_batches(recipe.train.batch_size, recipe.train.seed + 2)
    return [next(batches)[0] for _ in range(recipe.reorder.batches)]


def reorder_on_calibration(model, data, recipe: Recipe, ledger: Ledger, out: Path, method: str) -> None:
    """The importance re-ordering of a trained model before its first elastic step (retrofit,
    elastify), on `calibration_batches`, recorded in the ledger once per output folder `out`."""
    from .reorder import reorder

    calib = calibration_batches(data, recipe)
    n = sum(c.numel() for c in calib)
    ref = ledger.ref(out)
    with ledger.phase("importance", run=ref, method=method, key=f"{method}-reorder:{ref}") as rec:
        r = recipe.reorder
        reorder(model, calib, None, r.experts_by, r.neurons, r.layers)
        rec["tokens"], rec["flops"] = n, costmod.cost(model.config, None, recipe.data.seq_len).flops_forward * n


def shape_label(shape: Subnet) -> str:
    """A folder name for a shape: `L[0-1] E4 k1 W32` -> `L0-1_E4_k1_W32`."""
    return re.sub(r"[^A-Za-z0-9._+-]", "", str(shape).replace(" ", "_").replace(",", "+"))


def _pruned_shape(arch: str, parent) -> Subnet:
    """The shape of `arch` (depth, experts, top-k, width) on `parent`, keeping its most important
    layers: a child's spec names layers of the elastic parent, the dense parent ranks its own."""
    shape = Subnet.parse(arch, parent.config)
    if not shape.is_uniform:
        raise ConfigError(f"pruning baselines take uniform shapes; {arch!r} varies per layer")
    spec = shape.specs[0]
    layers = tuple(sorted(parent.layer_order[: shape.depth]))
    return Subnet.uniform(layers, spec.experts, spec.top_k, spec.width)


def prune_baseline(
    run_dir: Path,
    arch: str,
    method: str,
    tokens: int | None,
    steps: int | None,
    name: str | None,
    dense: str,
    resume: bool,
    lr: float = 1e-3,
) -> Path:
    """Prune the dense parent (RUN/baselines/`dense`/parent) to the shape of `arch`.

    prune-distill: re-order layers, experts and neurons by the importance measures the elastic
    training uses (reorder.py), measured on training batches (calibration data), keep the best
    prefix of each, then distil from the dense parent for `tokens`/`steps` with the fine-tune's
    defaults. expert-prune: rank experts by router-weighted output norm (gate x ||expert output||,
    the saliency of REAP, Cerebras 2025) and keep the best `experts` of every layer, nothing else
    cut and no training; only for shapes with the parent's depth, top-k and width."""
    from .extract import extract_to_folder
    from .reorder import reorder

    recipe = run_recipe(run_dir)
    parent, dense_dir = _dense_parent(run_dir, recipe, dense, method)
    shape = Subnet.parse(arch, recipe.model)
    full = Subnet.full(recipe.model)
    if method == "expert-prune" and (
        shape.depth != full.depth
        or any((s.top_k, s.width) != (f.top_k, f.width) for s, f in zip(shape.specs, full.specs))
    ):
        raise ConfigError(
            f"expert-prune only removes experts: {arch!r} also changes depth, top-k or width (use prune-distill)"
        )
    label = name or f"{method}-" + shape_label(shape)
    out = run_dir / "baselines" / label
    pruned = out / "pruned"
    data = load_run_data(run_dir, recipe)
    ledger = Ledger(run_dir / "ledger.jsonl")
    if not (pruned / "manifest.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        calib = calibration_batches(data, recipe)
        by_output = method == "expert-prune"
        n = sum(c.numel() for c in calib)
        with ledger.phase(
            "prune", method=method, model=arch, out=ledger.ref(pruned), parent_run=ledger.ref(run_dir)
        ) as rec:
            reorder(
                parent, calib, None, "output" if by_output else recipe.reorder.experts_by, not by_output, not by_output
            )
            subnet = (
                _pruned_shape(arch, parent)
                if not by_output
                else Subnet.uniform(full.layers, shape.specs[0].experts, full.specs[0].top_k, full.specs[0].width)
            )
            held = next(iter(data.eval_windows("val", 4).values()))[:, :-1]
            extract_to_folder(
                parent,
                subnet,
                pruned,
                held,
                tokenizer_path=data.tokenizer_path,
                parent_meta={"path": str((dense_dir / "parent").resolve()), "method": method},
            )
            rec["tokens"] = n + 2 * held.numel()
            rec["flops"] = costmod.cost(parent.config, None, recipe.data.seq_len).flops_forward * n + 2 * (
                costmod.cost(parent.config, subnet, held.shape[1]).flops_forward * held.numel()
            )
    if method == "prune-distill":
        finetune(
            pruned,
            out / "distilled",
            teacher_run=dense_dir,
            data_run=run_dir,
            tokens=tokens,
            steps=steps,
            lr=lr,
            resume=resume and (out / "distilled" / "checkpoints").exists(),
            ledger_path=run_dir / "ledger.jsonl",
        )
    return out


def retrofit_child_dirs(out: Path | str, child: str) -> tuple[Path, Path]:
    """(zero-shot child, fine-tuned child model) of a retrofit baseline folder."""
    return Path(out) / "children" / child, Path(out) / "finetuned" / child / "model"


def retrofit_recipe(recipe: Recipe, n_steps: int, lr: float) -> Recipe:
    """The run's elastic recipe for a short retrofit: its space, sampling and in-place
    distillation; its re-orderings at the same fractions of training; no full-network warm-up and
    no level curriculum (the dense parent is that network, trained); the given learning rate; a
    batch order of its own."""
    t = recipe.train
    at = sorted({min(n_steps, max(1, round(s * n_steps / t.steps))) for s in recipe.reorder.at_steps})
    return dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, curriculum=0.0),
        sampling=dataclasses.replace(recipe.sampling, full_fraction=0.0),
        reorder=dataclasses.replace(recipe.reorder, at_steps=tuple(at)),
        train=dataclasses.replace(
            t,
            steps=n_steps,
            lr=lr,
            warmup=max(1, n_steps // 10),
            eval_every=n_steps,
            ckpt_every=max(1, min(t.ckpt_every, n_steps)),
            seed=t.seed + 3,
            init_from="",
        ),
    )


def _retrofit_parent(run_dir: Path, recipe: Recipe, data, out: Path, n_steps: int, dense, resume, lr, progress) -> None:
    """Write `out/parent`: the dense parent re-ordered, then trained elastically for `n_steps`
    (or check that the finished one there had that budget)."""

    if (out / "parent" / "manifest.json").exists():
        done = read_json(out / "parent" / "config.json")["meta"].get("retrofit", {})
        if done.get("steps") != n_steps:
            raise ConfigError(
                f"{out} holds a retrofit of {done.get('steps')} steps, not {n_steps}: choose another --name"
            )
        return
    if not resume and out.exists():
        shutil.rmtree(out)  # an unfinished earlier attempt without --resume: start over
    model, dense_dir = _dense_parent(run_dir, recipe, dense, "retrofit")
    resuming = resume and (out / "checkpoints").exists()
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(run_dir / "ledger.jsonl")
    seq = recipe.data.seq_len
    if not resuming:  # a resume loads the re-ordered, partly trained weights from its checkpoint
        reorder_on_calibration(model, data, recipe, ledger, out, "retrofit")
    tokens = n_steps * recipe.train.batch_size * seq
    info = {"steps": n_steps, "tokens": tokens, "lr": lr, "dense": str(dense_dir / "parent")}
    extra = {"method": "retrofit", "retrofit": info}
    job = Job(retrofit_recipe(recipe, n_steps, lr), out, data, phase="retrofit", model=model, extra_meta=extra)
    par = distmod.setup(resolve_device(recipe.train.device), "auto")
    try:
        run_job(job, par, resuming, progress=progress, ledger_path=ledger.path)
    finally:
        par.close()


def retrofit_baseline(
    run_dir: Path,
    arch: str,
    tokens: int | None,
    steps: int | None,
    name: str | None,
    dense: str,
    resume: bool,
    lr: float = 1e-3,
    finetune_tokens: int | None = None,
    child: str | None = None,
    progress: bool = False,
) -> Path:
    """Retrofit: the normally trained (dense) parent made elastic after the fact, as NVIDIA's
    Nemotron Elastic does with a trained model. The dense parent (RUN/baselines/`dense`) is
    re-ordered by importance (reorder.py, on the calibration batches prune-distill uses), then
    trained elastically for `tokens`/`steps` with the run's elastic recipe (`retrofit_recipe`),
    then the shape of `arch` is extracted zero-shot and fine-tuned (distilled from the retrofitted
    parent) for `finetune_tokens` (default: the retrofit's own token budget).

        baselines/<name>/parent/                  the retrofitted elastic parent, shared by every
                                                  child extracted from it (reused when finished)
        baselines/<name>/children/<child>/        the zero-shot child (`child`: default the shape)
        baselines/<name>/finetuned/<child>/model/ the child after the fine-tune

    Ledger: `importance` (the one-shot re-ordering), `retrofit` (training segments) and
    `train-eval`, each with run = baselines/<name>; `extract` (method retrofit) and `finetune` with
    out = the child's folders."""
    recipe = run_recipe(run_dir)
    label = name or "retrofit"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", label):
        raise ConfigError(f"baseline name {label!r} must be one path component of letters, digits and ._+-")
    out = run_dir / "baselines" / label
    shape = Subnet.parse(arch, recipe.model)  # a bad spec fails before any work
    if not shape.is_uniform:
        raise ConfigError(f"retrofit extracts uniform shapes; {arch!r} varies per layer")
    bs, seq = recipe.train.batch_size, recipe.data.seq_len
    n_steps = _steps_for(tokens, steps, bs * seq)
    data = load_run_data(run_dir, recipe)
    _retrofit_parent(run_dir, recipe, data, out, n_steps, dense, resume, lr, progress)
    parent, _ = load_model(out / "parent")
    subnet = _pruned_shape(arch, parent)
    child_dir, ft_model = retrofit_child_dirs(out, child or shape_label(shape))
    if (child_dir / "manifest.json").exists():
        got = read_json(child_dir / "config.json")["meta"].get("subnet")
        if got != str(subnet):
            raise ConfigError(f"{child_dir} holds {got}, not {subnet}: pass another child name")
    else:
        parent_meta = {"path": str((out / "parent").resolve()), "method": "retrofit"}
        _extract_recorded(run_dir, data, parent, subnet, child_dir, parent_meta, method="retrofit")
    if finished_finetune(ft_model.parent) is None:
        finetune(
            child_dir,
            ft_model.parent,
            teacher_run=out,
            data_run=run_dir,
            tokens=finetune_tokens or n_steps * bs * seq,
            lr=lr,
            resume=resume and (ft_model.parent / "checkpoints").exists(),
            device=recipe.train.device,
            ledger_path=run_dir / "ledger.jsonl",
        )
    return out
