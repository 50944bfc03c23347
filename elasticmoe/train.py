"""Elastic training of the parent (train once), as one readable loop.

Each step samples sub-networks by the sandwich rule (largest, smallest, n random, optional fixed
targets), runs and back-propagates each right after its forward (gradient accumulation: peak
memory is one sub-network plus the teacher's logits), and takes one AdamW step. The largest
learns from the data; every other sub-network from the data and from the largest's detached
logits (in-place distillation, Yu & Huang 2019; Cai et al. 2020). Sampling derives from
(seed, step) only, so resumes and ranks agree without storing sampler state. Under torchrun
the same loop runs data-parallel (FSDP2 or DDP; checkpoints sharded): see dist.py.

Run folder written here:

    recipe.yaml              the resolved recipe
    data/                    the corpus (JSONL) and tokenizer.json
    checkpoints/step-NNNNNN  model + optimizer + train_state.json (RNG, data position), manifest
    parent/                  the final elastic parent (model folder), with tokenizer.json
    metrics.jsonl            one line per logged step / evaluation
    ledger.jsonl             tokens, FLOPs and seconds of every phase
    loss.png                 loss curves
"""

from __future__ import annotations

import functools
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import cost as costmod
from . import dist as distmod
from .checkpoint import atomic_write_text, load_model, read_json, save_model
from .config import ConfigError, ElasticSpace, dump_yaml
from .ledger import Ledger
from .metrics import _append_metrics, _mean_tok_per_s, _plot_losses, _Progress, _truncate_metrics
from .model import ElasticMoE
from .recipe import Recipe
from .reorder import reorder
from .subnet import Subnet, largest, sample_layer_drop, sample_per_layer, sample_uniform, smallest
from .threads import ThreadGovernor
from .tokens import IGNORE, unpack_windows
from .trainstate import (
    clean_stale_temporaries,
    find_checkpoint,
    load_any_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)

log = logging.getLogger(__name__)


# -- devices -----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on GPU; float32 on CPU (bf16 matmul is ~100x slower on the CPUs we measured)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# -- sampling ----------------------------------------------------------------------------------
def _phase_space(recipe: Recipe, step: int) -> ElasticSpace:
    """Progressive shrinking: the part of the space open at `step` (full, +depth, +experts, all)."""
    space, c = recipe.space, recipe.model
    phases = recipe.sampling.phases
    order = [p for p in ("full", "depth", "experts", "all") if p in phases]
    total = sum(phases[p] for p in order) or 1.0
    edge, current = 0.0, order[-1] if order else "all"
    for p in order:
        edge += phases[p] / total * recipe.train.steps
        if step < edge:
            current = p
            break
    top = (max(space.depths), max(space.experts), max(space.top_ks), max(space.widths))
    if current == "full":
        return ElasticSpace((top[0],), (top[1],), (top[2],), (top[3],))
    if current == "depth":
        return ElasticSpace(space.depths, (top[1],), (top[2],), (top[3],))
    if current == "experts":
        return ElasticSpace(space.depths, space.experts, (top[2],), (top[3],))
    del c
    return space


def sample_step(recipe: Recipe, step: int, layer_order: list[int]) -> list[tuple[str, Subnet]]:
    """The sub-networks of one step, largest first. Deterministic in (seed, step)."""
    s = recipe.sampling
    rng = random.Random(recipe.train.seed * 1_000_003 + step)
    space = _phase_space(recipe, step) if s.mode == "progressive" else recipe.space
    out = [("largest", largest(recipe.space, layer_order))]
    if step < switch_step(recipe):  # full-network warm-up
        return out
    targets = [Subnet.parse(t, recipe.model, layer_order) for t in s.targets]
    if s.mode == "budget":
        weights = list(s.target_weights) or [1.0] * len(targets)
        for n in range(s.n_random):
            pick = rng.choices(range(len(targets)), weights=weights)[0]
            out.append((f"budget{n}", targets[pick]))
    else:
        out.append(("smallest", smallest(space, layer_order)))
        if s.depth == "drop":
            draw = functools.partial(sample_layer_drop, drop_max=s.drop_max, per_layer=s.per_layer)
        else:
            draw = sample_per_layer if s.per_layer else sample_uniform
        out += [(f"random{n}", draw(space, layer_order, rng)) for n in range(s.n_random)]
        out += [(f"target{n}", t) for n, t in enumerate(targets)]
    seen, unique = set(), []
    for name, sn in out:  # a tiny space may draw the same sub-network twice: train it once
        if sn not in seen:
            seen.add(sn)
            unique.append((name, sn))
    if s.mode == "rows":  # one sub-network per row at most
        unique = unique[: 1 + len(row_layout(recipe, recipe.train.batch_size, len(unique) - 1)[1])]
    return unique


def switch_step(recipe: Recipe) -> int:
    """The number of full-network steps before elastic training starts (sampling.full_fraction)."""
    return math.ceil(recipe.sampling.full_fraction * recipe.train.steps)


def describe_schedule(recipe: Recipe) -> str:
    """One sentence: when elastic training starts, what one elastic step trains, when the
    importance re-ordering runs (the report's description of a run's recipe)."""
    s, steps, k = recipe.sampling, recipe.train.steps, switch_step(recipe)
    if k >= steps:
        return f"the full network alone for all {steps} steps (no elastic training)"
    start = f"the full network alone for the first {k} of {steps} steps ({100 * k / steps:.0f}%), then " if k else ""
    depth = f", depth by layer dropping (up to {s.drop_max:.0%} for the last layer)" if s.depth == "drop" else ""
    per = ", choices drawn per layer" if s.per_layer else ""
    if s.mode == "rows":
        step = (
            f"each step trains the full network on {s.full_rows:.0%} of the rows and the smallest and up to "
            f"{s.n_random} random sub-networks on {s.sub_rows:.0%} of them, one per row group{depth}{per}"
        )
    elif s.mode == "budget":
        step = f"each step trains the full network and {s.n_random} of {len(s.targets)} target sub-networks"
    else:
        shrink = " in progressive-shrinking phases" if s.mode == "progressive" else ""
        step = (
            f"each step trains the full network, the smallest and {s.n_random} random sub-networks on the "
            f"whole batch (a sandwich{shrink}){depth}{per}"
        )
    when = sorted(set(recipe.reorder.at_steps) | ({k} if recipe.reorder.at_switch and k else set()))
    reorder = f"; importance re-ordering after step {', '.join(map(str, when))}" if when else "; no re-ordering"
    return f"{start}{step}{reorder}"


def describe_data(recipe: Recipe) -> str:
    """One phrase: how the rows are read (loss on, document masking, the level mix of the embedded
    corpus's tasks), for the report beside the schedule."""
    d = recipe.data
    parts = ["structured rows trained on their answers only" if d.loss_on == "answers" else "loss on every token"]
    parts.append(
        "each packed document attends only to itself" if d.document_mask else "packed documents see the ones before"
    )
    if d.source == "default":
        weights = list(d.task_spec.get("level_weights") or [])
        parts.append(f"task levels drawn {weights} (easiest first)" if weights else "task levels drawn uniformly")
        if d.curriculum:
            parts.append(f"levels entering easiest first over {d.curriculum:.0%} of the run")
    return "; ".join(parts)


def document_eos(recipe: Recipe, data) -> int | None:
    """The EOS id that keeps packed documents apart in attention (`data.document_mask`), for every
    forward over a run's packed rows (training, validation, search, re-ordering); None when off."""
    return data.tokenizer.eos_id if recipe.data.document_mask else None


def row_layout(recipe: Recipe, rows: int, n_sub: int) -> tuple[list[int], list[list[int]]]:
    """Mode rows: which of `rows` rows (a rank's share of the batch: whole blocks) the largest
    trains on, and the rows of each of up to `n_sub` sub-networks (fewer when the block has fewer
    sub-network rows). Every block of batch_size / row_blocks rows is laid out alike."""
    s = recipe.sampling
    block = recipe.train.batch_size // s.row_blocks
    n_full = max(1, round(s.full_rows * block))
    n_subrows = min(block - 1, max(1, round(s.sub_rows * block)))
    k = min(n_sub, n_subrows)
    edges = [block - n_subrows + round(j * n_subrows / k) for j in range(k + 1)] if k else []
    full, subs = [], [[] for _ in range(k)]
    for start in range(0, rows, block):
        full += [start + i for i in range(n_full)]
        for j in range(k):
            subs[j] += [start + i for i in range(edges[j], edges[j + 1])]
    return full, subs


# -- losses ------------------------------------------------------------------------------------
def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton et al. 2015), mean over tokens
    (over the tokens where `keep` is True when given: the targets the data trains on)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (kl[keep] if keep is not None else kl).mean() * t * t


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup then cosine decay to lr * min_lr_ratio."""
    t = recipe.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = min(1.0, (step - t.warmup) / max(1, t.steps - t.warmup))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: ElasticMoE, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    t = recipe.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        foreach=False,
    )


@torch.no_grad()
def eval_losses(
    model: ElasticMoE,
    windows: dict[str, torch.Tensor],
    subnets: dict[str, Subnet],
    device: torch.device,
    batch: int = 8,
    doc_eos: int | None = None,
) -> dict[str, dict[str, float]]:
    """Mean next-token cross-entropy per task for each named sub-network, on held-out windows.
    A task's windows may be (windows, keep): only the targets where keep is True count. `doc_eos`:
    each document of a window attends only to itself (`data.document_mask`, as in training)."""
    was = model.training
    model.eval()
    out: dict[str, dict[str, float]] = {}
    for name, sn in subnets.items():
        out[name] = {}
        for task, w in windows.items():
            w, keep = unpack_windows(w)
            total, count = 0.0, 0
            for i in range(0, len(w), batch):
                chunk = w[i : i + batch].to(device)
                y = chunk[:, 1:]
                if keep is not None:
                    y = y.masked_fill(~keep[i : i + batch].to(device), IGNORE)
                with autocast(device):
                    logits = model(chunk[:, :-1], sn, doc_eos=doc_eos).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
                total += loss.item()
                count += int((y != IGNORE).sum())
            out[name][task] = total / max(count, 1)
    model.train(was)
    return out


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    step: int
    final_eval: dict[str, dict[str, float]]
    tokens_per_s: float  # median over logged steps, whole world (read on rank 0; 0.0 elsewhere)
    world_size: int = 1
    is_main: bool = True  # rank 0 (prints, writes metrics, ledger and the parent)


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {run_dir} is not writable: {exc.strerror}") from None


def _prepare(recipe: Recipe, run_dir: Path, resume: bool):
    """Check the run folder, prepare the data, write recipe.yaml (rank 0 only)."""
    from .rundata import prepare_run_data

    fresh = not run_dir.exists()
    if not resume and (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} already holds a training run; pass --resume or choose another --out")
    if resume and not (run_dir / "recipe.yaml").exists():
        raise ConfigError(f"nothing to resume in {run_dir}: no recipe.yaml")
    if resume:
        from .recipe import load_recipe

        clean_stale_temporaries(run_dir)

        diff = _differences(load_recipe(run_dir / "recipe.yaml").to_dict(), recipe.to_dict())
        if diff:
            raise ConfigError(
                f"--resume with a recipe that differs from {run_dir / 'recipe.yaml'} in {diff}: an exact resume needs "
                "the saved recipe (omit --config and --set), or start a new run with another --out"
            )
    _check_writable(run_dir)
    try:
        data = prepare_run_data(recipe, run_dir)
    except BaseException:
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if not resume:  # a new run commits its recipe whole, replacing one a failed earlier start left
        atomic_write_text(run_dir / "recipe.yaml", dump_yaml(recipe.to_dict()))
    return data


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


class _NoLedger:
    """The ledger on ranks other than 0: rank 0 records the work of all ranks."""

    @contextmanager
    def phase(self, *args, **kwargs):
        yield {"tokens": 0, "flops": 0}

    def append(self, record: dict) -> dict:
        return record

    def append_once(self, record: dict) -> bool:
        return False

    def ref(self, path) -> str:
        return str(path)


def _init_model(recipe: Recipe, device: torch.device) -> ElasticMoE:
    model = ElasticMoE(recipe.model)
    if recipe.train.init_from:
        src, _ = load_model(recipe.train.init_from)
        if src.config != recipe.model:
            raise ConfigError(f"train.init_from={recipe.train.init_from} has a different model config than the recipe")
        model.load_state_dict(src.state_dict())
        model.layer_order = list(src.layer_order)
    return model.to(device)


# -- the engine ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One training run for the engine. Elastic pre-training: the defaults. A from-scratch
    baseline: a recipe whose space is one point (one fixed sub-network, no teacher). Distillation
    fine-tuning: a given `model`, one fixed sub-network and an external `teacher`."""

    recipe: Recipe
    run_dir: Path
    data: Any  # RunData
    phase: str = "train"  # the ledger phase of the training segments
    output: str = "parent"  # final model folder, inside run_dir
    model: ElasticMoE | None = None  # start from this model instead of the recipe's init
    teacher: ElasticMoE | None = None  # every sub-network distils from it (else from the largest)
    eval_tasks: tuple[str, ...] = ()  # evaluate only these tasks (default: all)
    eval_phase: str = "train-eval"  # the ledger phase of in-training evaluations
    ledger_info: dict = field(default_factory=dict)  # fields added to every ledger record
    final_meta: Callable[[ElasticMoE, dict, dict | None], dict] | None = None  # (model, val, kept) -> meta
    extra_meta: dict = field(default_factory=dict)  # added to the default meta
    # publish the evaluated state (the start included) with the lowest validation loss instead
    # of the last one; it waits in run_dir/best between evaluations, so a resume keeps it
    keep_best: bool = False


@dataclass
class StepResult:
    finite: bool
    losses: dict[str, float]  # data cross-entropy per sub-network
    aux: float
    grad_norm: float | None
    flops: int  # training FLOPs spent, teacher forward included


def train_step(
    model, opt, x, y, subnets, recipe: Recipe, par, step: int, teacher=None, doc_eos: int | None = None
) -> StepResult:
    """One optimizer step: each sub-network's forward and backward (gradient accumulation), one
    clip, one AdamW step. With no external teacher the first (largest) sub-network learns from the
    data and teaches the others in place; the step's loss is a weighted mean (distill.subnet_weight).
    In sampling mode rows each sub-network runs on its own rows of the batch only (`row_layout`).
    A non-finite loss or gradient leaves parameters and optimizer untouched."""
    t, d, seq = recipe.train, recipe.distill, recipe.data.seq_len
    n_sub = len(subnets) - 1
    scale = 1.0 / (1.0 + (d.subnet_weight if n_sub else 0.0))
    flops = 0
    target = None
    if teacher is not None:
        with torch.no_grad(), autocast(par.device):
            target = teacher(x, doc_eos=doc_eos).logits.detach()
        flops += costmod.cost(teacher.config, None, seq).flops_forward * x.numel()
    losses: dict[str, float] = {}
    out = None
    keep = y != IGNORE  # data.loss_on=answers ignores prompt targets
    keep = None if bool(keep.all()) else keep
    rows_mode = recipe.sampling.mode == "rows" and n_sub and teacher is None
    if rows_mode:
        full_rows, sub_rows = row_layout(recipe, x.shape[0], n_sub)
        rows_of = [full_rows, *sub_rows]
    for n, (name, sn) in enumerate(subnets):
        rows = torch.tensor(rows_of[n], device=x.device) if rows_mode else None
        xs, ys, ks = (x, y, keep) if rows is None else (x[rows], y[rows], keep[rows] if keep is not None else None)
        if n and ks is not None and not bool(ks.any()):
            continue  # this sub-network's rows hold no target the data trains on
        with autocast(par.device):
            out = model(xs, sn, doc_eos=doc_eos)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), ys.flatten())
        if target is None:  # in-place distillation: the largest is the teacher of the step
            loss, target = ce, out.logits.detach()
        else:
            if rows_mode:
                teach, extra = _teacher_rows(
                    model, x, target, full_rows, rows_of[n], subnets[0][1], par.device, doc_eos
                )
                flops += costmod.cost(recipe.model, subnets[0][1], seq).flops_forward * extra * seq
            else:
                teach = target
            loss = d.ce_weight * ce + d.kd_weight * kd_loss(out.logits, teach, d.temperature, ks)
        weight = scale if n == 0 else scale * d.subnet_weight / n_sub
        loss = weight * (loss + t.aux_weight * out.aux_loss + t.z_weight * out.z_loss)
        flops += costmod.cost(recipe.model, sn, seq).flops_train * xs.numel()
        if not par.all_finite(loss, step):  # agreed by all ranks before any backward
            opt.zero_grad(set_to_none=True)
            return StepResult(False, losses, 0.0, None, flops)
        loss.backward()
        losses[name] = ce.item()
    par.sync_grads(model)
    grad_norm = par.clip_grad_norm(model, t.grad_clip)
    if not torch.isfinite(grad_norm):
        opt.zero_grad(set_to_none=True)
        return StepResult(False, losses, 0.0, None, flops)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(True, losses, out.aux_loss.item(), grad_norm.item(), flops)


def _teacher_rows(model, x, full_logits, full_rows: list[int], rows: list[int], largest_sn, device, doc_eos=None):
    """Teacher logits of `rows`: the largest's own (detached) logits where it trained on all of
    them, else a forward of the largest on them without gradient. Returns (logits, rows run)."""
    where = {r: i for i, r in enumerate(full_rows)}
    if all(r in where for r in rows):
        return full_logits[torch.tensor([where[r] for r in rows], device=full_logits.device)], 0
    with torch.no_grad(), autocast(device):
        return model(x[torch.tensor(rows, device=x.device)], largest_sn, doc_eos=doc_eos).logits.detach(), len(rows)


def train(
    recipe: Recipe,
    run_dir: Path | str,
    resume: bool = False,
    progress: bool = True,
    stop_at: int | None = None,
    phase: str = "train",
    ledger_path: Path | None = None,
    parallel: str = "auto",
    meta: dict | None = None,
) -> TrainResult:
    """Train the elastic parent into `run_dir` (see module docstring). `stop_at` ends early
    (for tests that simulate an interruption) without writing the final parent. `phase` and
    `ledger_path` let a baseline run record itself as such in its parent's ledger. Under torchrun
    (WORLD_SIZE > 1) this is data-parallel training, `parallel` picking FSDP2 or DDP (see dist.py)."""
    run_dir = Path(run_dir)
    par = distmod.setup(resolve_device(recipe.train.device), parallel)
    try:
        if recipe.train.batch_size % par.world_size:
            raise ConfigError(
                f"train.batch_size={recipe.train.batch_size} is the global batch and must be divisible by the "
                f"world size {par.world_size} (each rank takes batch_size / world size rows)"
            )
        s = recipe.sampling
        if s.mode == "rows" and s.row_blocks % par.world_size:
            raise ConfigError(
                f"sampling.mode=rows at {par.world_size} ranks needs sampling.row_blocks (now {s.row_blocks}) to be a "
                f"multiple of {par.world_size}: each rank takes whole blocks, so the steps are alike at any world size"
            )
        prepared: dict = {}
        par.on_main(lambda: prepared.setdefault("data", _prepare(recipe, run_dir, resume)) and None)
        if not par.is_main:
            from .rundata import load_run_data

            prepared["data"] = load_run_data(run_dir, recipe)
        job = Job(recipe, run_dir, prepared["data"], phase=phase, extra_meta=dict(meta or {}))
        return run_job(job, par, resume, progress, stop_at, ledger_path)
    finally:
        par.close()


def run_job(
    job: Job, par, resume: bool, progress: bool = True, stop_at: int | None = None, ledger_path: Path | None = None
) -> TrainResult:
    """The training loop: resume, then steps with their periodic work (re-order, evaluate,
    checkpoint + ledger segment), then the final model folder. Shared by train, baseline and
    finetune, so resume, the non-finite-step policy, checkpoints and the ledger hold for all."""
    recipe, run_dir, t = job.recipe, job.run_dir, job.recipe.train
    device, world, main = par.device, par.world_size, par.is_main
    ledger = Ledger(ledger_path or run_dir / "ledger.jsonl") if main else _NoLedger()
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)
    model = par.wrap(job.model.to(device) if job.model is not None else _init_model(recipe, device))
    opt = make_optimizer(model, recipe)
    weights = dict(recipe.data.task_weights) or None
    rank_args = () if world == 1 else (par.rank, world)
    batches = job.data.train_batches(
        t.batch_size // world,
        t.seed,
        *rank_args,
        task_weights=weights,
        loss_on=recipe.data.loss_on,
        curriculum=recipe.data.curriculum,
        total_steps=t.steps,
    )
    doc_eos = document_eos(recipe, job.data)
    step, bad_in_row, tokens_seen = 0, 0, 0
    # this attempt's id; the ids of all attempts whose work led to the saved state travel with the
    # checkpoints and the final model, so a report can sum exactly the work behind an artefact
    attempt, attempts = uuid.uuid4().hex[:12], []
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = par.on_main(lambda: find_checkpoint(run_dir))
        if ckpt is not None:
            state = load_any_checkpoint(ckpt, model, opt, par)
            step, bad_in_row, tokens_seen = state["step"], state["bad_in_row"], state["tokens_seen"]
            attempts = list(state.get("attempts", []))
            batches.load_state_dict(state["data"])
            if state.get("ledger_segment"):
                ledger.append_once(state["ledger_segment"])
            log.info("resumed from %s", ckpt)
        if main:
            _truncate_metrics(metrics_path, step)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    attempts.append(attempt)
    windows = job.data.eval_windows("val", t.eval_windows, recipe.data.loss_on)
    if job.eval_tasks:
        windows = {k: w for k, w in windows.items() if k in job.eval_tasks} or windows
    record = {"run": ledger.ref(run_dir), "attempt": attempt, "device": str(device), "world_size": world}
    record.update(job.ledger_info)

    def evaluate() -> dict:
        t0, subnets = time.perf_counter(), _eval_subnets(recipe, model)
        out = eval_losses(model, windows, subnets, device, doc_eos=doc_eos)
        n = sum(w[:, 1:].numel() for w, _ in map(unpack_windows, windows.values()))
        flops = sum(costmod.cost(recipe.model, sn, recipe.data.seq_len).flops_forward for sn in subnets.values())
        ledger.append(
            {
                "event": "end",
                "status": "ok",
                "phase": job.eval_phase,
                **record,
                "step": step,
                "tokens": n * len(subnets) * world,
                "flops": flops * n * world,
                "seconds": time.perf_counter() - t0,
            }
        )
        if main:
            _append_metrics(metrics_path, {"step": step, "val": out})
        if job.keep_best:
            best.offer(model, step, out["largest"])
        return out

    def reorder_now() -> None:
        held_out = [w[: recipe.reorder.batches * 4, :-1].to(device) for w, _ in map(unpack_windows, windows.values())]
        t0 = time.perf_counter()
        summary = par.reorder(model, opt, functools.partial(_reorder, recipe, held_out, doc_eos))
        n = sum(h.numel() for h in held_out)
        ledger.append(
            {
                "event": "end",
                "status": "ok",
                "phase": "importance",
                **record,
                "step": step,
                "tokens": n,
                "flops": costmod.cost(recipe.model, None, recipe.data.seq_len).flops_forward * n,
                "seconds": time.perf_counter() - t0,
            }
        )
        if main:
            _append_metrics(metrics_path, {"step": step, "reorder": summary})

    def checkpoint(seg: dict) -> None:
        seg["tokens"], seg["flops"] = par.sum_ints([seg["tokens"], seg["flops"]])  # work of all ranks
        segment = {"event": "progress", "phase": job.phase, **record, "steps": [seg["from"], step]}
        segment.update({k: seg[k] for k in ("tokens", "flops", "seconds")})
        # the checkpoint carries its segment: a kill between the checkpoint and the ledger line is
        # repaired on resume (ledger.append_once), so the ledger neither loses nor doubles it
        state = {"bad_in_row": bad_in_row, "tokens_seen": tokens_seen, "data": batches.state_dict()}
        state.update(attempts=attempts, ledger_segment=segment)
        if world == 1:
            save_checkpoint(run_dir, step, model, opt, state, t.keep_last)
        else:
            save_sharded_checkpoint(par, run_dir, step, model, opt, state, t.keep_last)
        ledger.append(segment)

    counts = {}  # validation targets per task: keep-best weighs the tasks' losses by them
    for task, (w, keep) in zip(windows, map(unpack_windows, windows.values())):
        counts[task] = int(keep.sum()) if keep is not None else w[:, 1:].numel()
    best = _Best(run_dir / "best", counts) if job.keep_best else None
    if best is not None and world > 1:
        raise ConfigError("keeping the best validated model is a one-process feature (fine-tuning)")
    result_eval = evaluate() if step == 0 else {}
    tokens_per_step = t.batch_size * recipe.data.seq_len
    seg = {"tokens": 0, "flops": 0, "seconds": 0.0, "from": step}
    bar = _Progress(t.steps, step, enabled=progress and main, every=t.log_every)
    governor = ThreadGovernor(device)  # fewer threads while other processes take the cores
    with ledger.phase(job.phase, counted=False, resumed_from=step if resume else None, **record), governor:
        model.train()
        while step < t.steps and (stop_at is None or step < stop_at):
            threads = governor.tick()
            t0 = time.perf_counter()
            lr = lr_at(step, recipe)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = (v.to(device) for v in next(batches))
            subnets = par.agree_on_subnets(step, sample_step(recipe, step, model.layer_order))
            res = train_step(model, opt, x, y, subnets, recipe, par, step, job.teacher, doc_eos)
            step += 1
            dt = time.perf_counter() - t0
            seg["flops"] += res.flops  # a skipped step's compute was spent all the same
            seg["seconds"] += dt
            if not res.finite:
                bad_in_row += 1
                if main:
                    _append_metrics(
                        metrics_path, {"step": step, "skipped": True, "reason": "non-finite loss or gradient"}
                    )
                log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, bad_in_row)
                if bad_in_row >= t.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} non-finite steps in a row at step {step}; the last good checkpoint is intact"
                    )
            else:
                bad_in_row = 0
                tokens_seen += x.numel() * world
                seg["tokens"] += x.numel()
                losses, aux = res.losses, res.aux
                if world > 1:  # log means over ranks, i.e. over the global batch
                    *means, aux = par.mean([*losses.values(), aux])
                    losses = dict(zip(losses, means))
                rec = {
                    "step": step,
                    "lr": lr,
                    "loss": losses,
                    "aux": aux,
                    "grad_norm": res.grad_norm,
                    "subnets": {n: str(s) for n, s in subnets},
                    "ms": dt * 1000,
                    "tok_per_s": tokens_per_step / dt,
                    "threads": threads,
                }
                if main:
                    _append_metrics(metrics_path, rec)
                bar.update(step, next(iter(losses.values()), float("nan")), lr, dt, len(subnets))
            # periodic work runs after skipped steps too, so a skipped last step still checkpoints
            if step in recipe.reorder.at_steps or (recipe.reorder.at_switch and step == switch_step(recipe)):
                reorder_now()
            if step % t.eval_every == 0 or step == t.steps:
                result_eval = evaluate()
            if step % t.ckpt_every == 0 or step == t.steps:
                checkpoint(seg)
                seg = {"tokens": 0, "flops": 0, "seconds": 0.0, "from": step}
        bar.close()
        if step >= t.steps:
            if not result_eval:  # resumed from the final checkpoint: nothing ran, measure once more
                result_eval = evaluate()
            kept = best.restore(model, step, result_eval["largest"]) if best is not None else None
            if kept is not None:
                result_eval = {"largest": kept["val"]}
                log.info("%s", kept["reason"])
            _publish(job, par, model, step, tokens_seen, attempts, result_eval, metrics_path, kept)
            if best is not None:
                shutil.rmtree(best.folder, ignore_errors=True)
    tok_s = _mean_tok_per_s(metrics_path) if main else 0.0
    return TrainResult(run_dir, step, result_eval, tok_s, world, main)


def _publish(
    job: Job, par, model, step: int, tokens_seen: int, attempts: list, val: dict, metrics_path, kept: dict | None = None
) -> None:
    """Write the final model folder (rank 0; gathered there when sharded) and the loss plot."""
    recipe = job.recipe
    full = par.main_model(model)
    if job.final_meta is not None:
        meta = job.final_meta(full, val, kept) if par.is_main else {}
    else:
        meta = {
            "kind": "elastic-parent" if job.phase == "train" else job.phase,
            "steps": step,
            "tokens_seen": tokens_seen,
            "ledger_attempts": attempts,
            "space": recipe.space.to_dict(),
            "val": val,
            **job.extra_meta,
        }
        if kept is not None:
            meta["kept"] = kept

    def publish() -> None:
        save_model(job.run_dir / job.output, full, meta, extra_files={"tokenizer.json": job.data.tokenizer_path})
        _plot_losses(metrics_path, job.run_dir / "loss.png")

    par.on_main(publish)


def val_score(val: dict[str, float], counts: dict[str, int]) -> float:
    """What keep-best minimises: the validation loss over all the validation targets (nats/token;
    structured tasks on the targets the data trains on), i.e. the per-task means weighted by their
    target counts. (An equal weight per task let a few hundred noisy answer tokens outvote
    thousands of text tokens: bench/FINETUNE.md.)"""
    total = sum(counts[task] for task in val)
    return sum(loss * counts[task] for task, loss in val.items()) / max(total, 1)


class _Best:
    """The best evaluated state of a one-process run, as a model folder (atomic, so a kill leaves
    the previous best whole; a resume reads its score back)."""

    def __init__(self, folder: Path, counts: dict[str, int]):
        self.folder, self.counts = folder, counts
        self.meta = None
        if (folder / "config.json").is_file():
            self.meta = read_json(folder / "config.json")["meta"]

    def offer(self, model: ElasticMoE, step: int, val: dict[str, float]) -> None:
        score = val_score(val, self.counts)
        if self.meta is None or score < self.meta["score"]:
            self.meta = {"kind": "best-so-far", "step": step, "score": score, "val": dict(val)}
            save_model(self.folder, model, self.meta)

    def restore(self, model: ElasticMoE, step: int, last_val: dict[str, float]) -> dict:
        """Load the best state into `model` (when it is not the last) and say which was kept and why."""
        last = val_score(last_val, self.counts)
        if self.meta is None or self.meta["step"] == step or last <= self.meta["score"]:
            return {
                "step": step,
                "steps": step,
                "score": last,
                "last_score": last,
                "val": dict(last_val),
                "reason": f"kept the last step ({step}): validation loss {last:.4f}, the lowest evaluated",
            }
        saved, _ = load_model(self.folder, next(model.parameters()).device)
        model.load_state_dict(saved.state_dict())
        b = self.meta
        where = "the start (no fine-tune step helped)" if b["step"] == 0 else f"step {b['step']}"
        return {
            "step": b["step"],
            "steps": step,
            "score": b["score"],
            "last_score": last,
            "val": dict(b["val"]),
            "reason": f"kept {where}: validation loss {b['score']:.4f}, the last step's ({step}) was {last:.4f}",
        }


def _reorder(recipe: Recipe, held_out: list[torch.Tensor], doc_eos: int | None, model: ElasticMoE, opt) -> dict:
    r = recipe.reorder
    return reorder(model, held_out, opt, r.experts_by, r.neurons, r.layers, doc_eos)


def _eval_subnets(recipe: Recipe, model: ElasticMoE) -> dict[str, Subnet]:
    out = {"largest": largest(recipe.space, model.layer_order), "smallest": smallest(recipe.space, model.layer_order)}
    for n, spec in enumerate(recipe.sampling.targets):
        out[f"target{n}"] = Subnet.parse(spec, recipe.model, model.layer_order)
    return out
