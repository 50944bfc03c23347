"""Elastify: a trained transformers MoE made elastic, the original kept frozen as its teacher.

What `baseline --method retrofit` does to our own dense parent, done to a user's model: import
(`hf_import`, every check before anything is written), importance re-ordering on calibration
batches of the user's data (`reorder`, the batches `phases.calibration_batches` draws), then the
elastic recipe of a retrofit (`phases.retrofit_recipe`: no full-network warm-up, the re-orderings
at the recipe's fractions of training) for the token budget, every sub-network (the largest
included) distilling from the *imported original*, frozen, instead of from the moving largest
(Nemotron Elastic's choice for a trained model: the target does not drift while the weights
move). The run folder is an ordinary run, so search, extract, finetune, eval, export and report
work on it:

    RUN/original/      the imported model, unchanged: the teacher, and the reference of the report
                       (its meta: source folder and class, the original's training FLOPs if given)
    RUN/recipe.yaml    the resolved recipe (data, space, budget); RUN/data/ the prepared data
    RUN/checkpoints/   resumable state (`elastify --resume`)
    RUN/parent/        the elastic parent (kind elastic-parent, meta `elastify`)

Ledger: `importance` (the one-shot re-ordering) and `train` / `train-eval` (the elastic steps,
teacher forwards included), all with run = RUN: the parent's cost P of the report is the
elastification; the original's own training is the user's figure (`--parent-flops`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from . import dist as distmod
from .checkpoint import load_model, save_model
from .config import ConfigError, ElasticSpace, apply_overrides, load_mapping
from .hf_import import import_hf, source_tokenizer
from .ledger import Ledger
from .model import ElasticMoE
from .phases import reorder_on_calibration, retrofit_recipe
from .recipe import PRESETS_DIR, Recipe, load_recipe
from .reference import ORIGINAL, read_original
from .train import Job, TrainResult, resolve_device, run_job

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Everything elastify checked before writing: the imported model, its tokenizer, the recipe."""

    hf_dir: Path
    model: ElasticMoE | None  # None once written to RUN/original
    tokenizer: Path | None
    recipe: Recipe
    parent_flops: float | None


def _base_mapping(config: str | None) -> dict:
    """The recipe file (or preset, default `tiny`) whose data, training and sampling knobs elastify
    starts from; its model and space are replaced by the imported model's."""
    path = Path(config or "tiny")
    if not path.exists() and (PRESETS_DIR / f"{path}.yaml").exists():
        path = PRESETS_DIR / f"{path}.yaml"
    return load_mapping(path)


def elastify_recipe(
    model_config,
    space: ElasticSpace | None,
    base: dict,
    overrides: list[str],
    tokens: int | None,
    lr: float,
    data: list[str] | None = None,
) -> Recipe:
    """The recipe of an elastification: `base`'s knobs with the imported model, its space (given,
    else `ElasticSpace.default_for`), the user's data files (`data`: text, .jsonl or HF dataset
    folders; else the base's source), and the retrofit's elastic recipe for `tokens` (default: the
    base's own budget) at `lr`, on the base's seed (so a model trained on the embedded corpus with
    that seed is scored on the test split it never saw). `overrides` (`--set`) apply last."""
    m = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    m["model"] = model_config.to_dict()
    m["space"] = (space or ElasticSpace.default_for(model_config)).to_dict()
    d = m.setdefault("data", {})
    d["vocab_size"] = model_config.vocab_size
    d["seq_len"] = min(d.get("seq_len", 128), model_config.max_seq_len)
    if data:
        d.update(source="files", paths=list(data))
    m.setdefault("train", {})["init_from"] = ""
    r = Recipe.from_dict(apply_overrides(m, overrides))
    step_tokens = r.train.batch_size * r.data.seq_len
    n_steps = math.ceil(tokens / step_tokens) if tokens else r.train.steps
    elastic = retrofit_recipe(r, n_steps, lr)
    elastic = dataclasses.replace(elastic, train=dataclasses.replace(elastic.train, seed=r.train.seed))
    return Recipe.from_dict(apply_overrides(elastic.to_dict(), overrides))  # the user's --set wins


def plan(
    hf_dir: str | Path,
    config: str | None = None,
    overrides: list[str] | None = None,
    space: ElasticSpace | None = None,
    tokens: int | None = None,
    lr: float = 1e-3,
    data: list[str] | None = None,
    parent_flops: float | None = None,
) -> Plan:
    """Import and check everything (architecture, weights against config.json, tokenizer, recipe)
    without writing: a refusal leaves no run folder behind."""
    model = import_hf(hf_dir, space)
    tok = source_tokenizer(hf_dir, model.config.vocab_size)
    recipe = elastify_recipe(model.config, space, _base_mapping(config), list(overrides or []), tokens, lr, data)
    if tok is not None and recipe.data.tokenizer and Path(recipe.data.tokenizer).resolve() != tok.resolve():
        raise ConfigError(
            f"{hf_dir} has its own tokenizer.json: data.tokenizer={recipe.data.tokenizer} cannot replace it"
        )
    if tok is None and not recipe.data.tokenizer and recipe.data.source != "shards":
        log.warning(
            "%s has no tokenizer.json: a tokenizer is trained on the data, whose ids the model never saw", hf_dir
        )
    if parent_flops is not None and not (math.isfinite(parent_flops) and parent_flops > 0):
        raise ConfigError(f"--parent-flops={parent_flops} must be a finite number > 0")
    return Plan(Path(hf_dir), model, tok, recipe, parent_flops)


def frozen_teacher(run_dir: Path, device) -> ElasticMoE:
    """RUN/original as the teacher: evaluation mode, no parameter requires a gradient (it is in
    no optimizer either: the training engine optimises only the student)."""
    teacher, _ = load_model(Path(run_dir) / ORIGINAL, device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _write_original(p: Plan, out: Path) -> Recipe:
    """RUN/original (the imported model, its tokenizer) and the recipe, its tokenizer path pointing
    into the run's own copy (never at the source folder)."""
    from .checkpoint import atomic_write_text
    from .config import dump_yaml

    meta = {
        "kind": "imported",
        "source": str(p.hf_dir.resolve()),
        "source_architecture": p.model.config.source_architecture,
        "training_flops": p.parent_flops,
    }
    extra = {"tokenizer.json": p.tokenizer} if p.tokenizer else None
    folder = save_model(out / ORIGINAL, p.model, meta, extra_files=extra).resolve()
    p.model = None  # written: training reads it back as float32, teacher and student (no third copy)
    recipe = p.recipe
    if p.tokenizer:
        recipe = dataclasses.replace(
            recipe, data=dataclasses.replace(recipe.data, tokenizer=str(folder / "tokenizer.json"))
        )
    atomic_write_text(out / "recipe.yaml", dump_yaml(recipe.to_dict()))
    return recipe


def elastify(p: Plan | None, out: Path | str, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run a planned elastification into `out` (see the module docstring); with `resume`, continue
    the one there from its newest checkpoint (`p` may then be None: the run's recipe and original
    are used)."""
    from .rundata import prepare_run_data

    out = Path(out)
    if resume:
        if not (out / ORIGINAL / "manifest.json").exists() or not (out / "recipe.yaml").is_file():
            raise ConfigError(f"nothing to resume in {out}: no {ORIGINAL}/ and recipe.yaml (not an elastify run)")
        recipe = load_recipe(out / "recipe.yaml")
    else:
        if (out / "checkpoints").exists() or (out / ORIGINAL).exists():
            raise ConfigError(f"{out} already holds an elastification; pass --resume or choose another --out")
        recipe = _write_original(p, out)
    data = prepare_run_data(recipe, out)
    dev = resolve_device(recipe.train.device)
    teacher = frozen_teacher(out, dev)
    resuming = resume and (out / "checkpoints").exists()
    model = load_model(out / ORIGINAL)[0]  # float32, whatever the source's dtype: the student's master weights
    if not resuming:  # a resume loads the re-ordered, partly trained weights from its checkpoint
        reorder_on_calibration(model, data, recipe, Ledger(out / "ledger.jsonl"), out, "elastify")
    meta = read_original(out)
    info = {"original": ORIGINAL, "source": meta.get("source"), "steps": recipe.train.steps}
    info["tokens"] = recipe.train.steps * recipe.train.batch_size * recipe.data.seq_len
    job = Job(recipe, out, data, model=model, teacher=teacher, extra_meta={"method": "elastify", "elastify": info})
    par = distmod.setup(dev, "auto")
    try:
        return run_job(job, par, resuming, progress=progress)
    finally:
        par.close()


__all__ = ["Plan", "elastify", "elastify_recipe", "frozen_teacher", "plan"]
