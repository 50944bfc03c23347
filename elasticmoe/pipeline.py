"""`elasticmoe run`: train -> search -> extract -> finetune -> eval -> export -> baseline -> report.

One run folder holds everything; `RUN_DIR/pipeline.json` records which phases finished and what
they produced, so a rerun skips finished phases and resumes an interrupted one (training resumes
from its newest valid checkpoint). Every phase appends its work to `RUN_DIR/ledger.jsonl`.
Each phase calls the stage function its command calls (`train.train`, `phases.search_run`,
`phases.extract_child`, `export.export_model`, `phases.finetune`, `evaluate_run.evaluate_folders`,
`phases.baseline`, `report.report_run`), so `elasticmoe X` and phase X do the same work; a phase
only decides the arguments (the family, the budgets) and records its outputs in pipeline.json.

Children are chosen by constraint searches; the default family is the ERNIE-5.1 shape (total
params <= 1/3 and active <= 1/2 of the parent) plus two others, and a measured from-scratch
baseline is trained for the ERNIE-shaped child with the parent's token budget, so the report's
percentages rest on a measurement. Beside the ERNIE-shaped child, a search-targeted one
(`TARGETED`: same constraints, ranked by the find task, fine-tuned on that task mix).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .checkpoint import load_model, read_json, write_json
from .config import ConfigError
from .cost import cost
from .ledger import Ledger
from .recipe import Recipe

log = logging.getLogger(__name__)

# name -> constraints (ratios of the parent); the first is the family's reference child
DEFAULT_FAMILY: dict[str, dict[str, float]] = {
    "ernie51-shape": {"max_params_ratio": 1 / 3, "max_active_ratio": 1 / 2},
    "active-third": {"max_active_ratio": 1 / 3},
    "half-latency": {"max_latency_ratio": 1 / 2},
}
# search-targeted children (the seed's variants "optimized for search"): the constraints of the
# family member `like`, candidates ranked by a weighted task score (`search --objective`), the
# fine-tune on that task mix; the report compares each with `like` on every task. Added to a
# family only when it holds `like`.
TARGETED: dict[str, dict] = {"ernie51-find": {"like": "ernie51-shape", "objective": {"find": 1.0, "text": 0.2}}}
# retrofit baselines (--baselines all): folder name -> elastic training budget as a multiple of the
# fine-tune budget (the marginal budget prune-distill gets, and a larger one)
RETROFIT_BUDGETS = {"retrofit": 1, "retrofit-4x": 4}
FINETUNE_LR_SCALE = 0.3  # fine-tunes and distillations run at this fraction of the parent's learning rate
# rough share of wall time per phase on the tiny preset, for the ETA
# export follows eval, so that the model card of each export carries the child's evaluation
PHASES = {"train": 40, "search": 10, "extract": 2, "finetune": 10, "eval": 12, "export": 4, "baseline": 40, "report": 4}
# --baselines all trains every alternative for every child: measured 23 of 34 minutes (bench/FAMILY.md)
BASELINE_WEIGHT_ALL = 170


class Pipeline:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        family: dict[str, dict[str, float]] | None = None,
        finetune_fraction: float = 0.1,
        eval_examples: int = 100,
        progress: bool = True,
        baselines: str = "reference",
        targeted: dict[str, dict] | None = None,
    ):
        if baselines not in ("reference", "all"):
            raise ConfigError(f"baselines={baselines!r}; allowed 'reference' (the ERNIE-shaped child) or 'all'")
        self.baselines = baselines
        self.recipe, self.run = recipe, Path(run_dir)
        self.family = family or DEFAULT_FAMILY
        targeted = TARGETED if targeted is None else targeted
        self.targeted = {name: t for name, t in targeted.items() if t["like"] in self.family}
        self.finetune_fraction, self.eval_examples, self.progress = finetune_fraction, eval_examples, progress
        self.state_path = self.run / "pipeline.json"
        self.state: dict[str, Any] = read_json(self.state_path) if self.state_path.exists() else {"phases": {}}
        self.state.setdefault("family", [*self.family, *self.targeted])  # run_pipeline checks a rerun's
        self.t0 = time.perf_counter()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _done(self, phase: str) -> bool:
        return self.state["phases"].get(phase, {}).get("done", False)

    def _finish(self, phase: str, outputs: dict) -> None:
        self.state["phases"][phase] = {"done": True, "outputs": outputs, "finished_at": time.time()}
        write_json(self.state_path, self.state)

    def _header(self, i: int, phase: str, skipped: bool) -> None:
        names = list(PHASES)
        weight = {**PHASES, "baseline": BASELINE_WEIGHT_ALL if self.baselines == "all" else PHASES["baseline"]}
        elapsed = time.perf_counter() - self.t0
        todo_w = sum(weight[p] for p in names[i:] if not self._done(p))
        fresh_w = sum(weight[p] for p in names[:i] if p in self._ran)
        eta = f"eta ~{elapsed / fresh_w * todo_w / 60:.1f} min" if fresh_w else "eta: after training"
        status = "done earlier, skipped" if skipped else f"elapsed {elapsed / 60:.1f} min | {eta}"
        print(f"[{i + 1}/{len(names)}] {phase:9s} {status}", flush=True)

    # -- the phases ----------------------------------------------------------------------------
    def run_all(self) -> dict:
        self._ran: set[str] = set()
        for i, phase in enumerate(PHASES):
            skipped = self._done(phase)
            self._header(i, phase, skipped)
            if skipped:
                continue
            outputs = getattr(self, f"phase_{phase}")()
            self._ran.add(phase)
            self._finish(phase, outputs or {})
        return self.state

    def phase_train(self) -> dict:
        from .train import train

        resume = (self.run / "checkpoints").exists()
        res = train(self.recipe, self.run, resume=resume, progress=self.progress)
        tasks = sorted(next(iter(res.final_eval.values()), {}))
        print(
            f"validation cross-entropy (nats/token) of the parent's sub-networks after {res.step} steps "
            f"({res.tokens_per_s:,.0f} training tokens/s):"
        )
        print("  " + f"{'sub-network':12s}" + "".join(f"{t:>8s}" for t in tasks))
        for name, row in res.final_eval.items():
            print("  " + f"{name:12s}" + "".join(f"{row[t]:8.3f}" for t in tasks))
        return {"parent": str(self.run / "parent"), "val": res.final_eval, "tokens_per_s": res.tokens_per_s}

    def phase_search(self) -> dict:
        from .phases import search_run

        searches = {**self.family, **{name: self.family[t["like"]] for name, t in self.targeted.items()}}
        objectives = {name: t["objective"] for name, t in self.targeted.items()}
        results = search_run(
            self.run,
            searches,
            self.run / "search",
            device=self.recipe.train.device,
            latency=True,
            skip_impossible=True,
            objectives=objectives,
        )
        reference = next(iter(self.family))
        if isinstance(results[reference], ConfigError):
            raise ConfigError(f"the reference child {reference!r} cannot be found: {results[reference]}")
        chosen: dict[str, dict] = {}
        for name, result in results.items():
            if isinstance(result, ConfigError):
                print(f"  {name}: skipped, {result}")
                continue
            if self.progress:
                from rich.console import Console

                from .search_output import format_table

                Console().print(format_table(result))
            # a targeted child may share its general twin's shape: its fine-tune differs
            taken = set() if name in self.targeted else {ch["subnet"] for ch in chosen.values()}
            fresh = [c for c in result.frontier if c.text not in taken and c.subnet != result.parent.subnet]
            if not fresh:
                print(f"  {name}: skipped, every frontier point is already in the family")
                continue
            best = min(fresh, key=lambda c: c.loss)
            chosen[name] = {
                "subnet": best.text,
                "subnet_json": best.subnet.to_dict(),
                "loss": best.loss,
                "params": best.params,
                "active_params": best.active_params,
                **self.targeted.get(name, {}),  # like, objective
            }
        return {"children": chosen}

    def _children(self) -> dict[str, dict]:
        return self.state["phases"]["search"]["outputs"]["children"]

    def phase_extract(self) -> dict:
        from .phases import extract_child

        parent, _ = load_model(self.run / "parent")
        out = {}
        for name, ch in self._children().items():
            meta = extract_child(self.run, parent, json.dumps(ch["subnet_json"]), self.run / "children" / name)
            out[name] = {
                "dir": str(self.run / "children" / name),
                "max_abs_logit_diff": meta["verification"]["max_abs_logit_diff"],
            }
        pc = cost(parent.config, None, self.recipe.data.seq_len)
        print(f"  {'child':15s} {'subnet':22s} {'params':>10s} {'active':>10s} {'max |dlogit|':>12s}")
        print(f"  {'(parent)':15s} {'':22s} {pc.total_params:>10,} {pc.active_params:>10,}")
        for name, ch in self._children().items():
            print(
                f"  {name:15s} {ch['subnet']:22s} {ch['params']:>10,} {ch['active_params']:>10,} "
                f"{out[name]['max_abs_logit_diff']:>12.1e}"
            )
        return out

    def phase_export(self) -> dict:
        from .export import export_model

        out = {}
        for name in self._children():
            try:
                prov = export_model(self.run / "children" / name, self.run / "hf" / name, run_dir=self.run)
                out[name] = {
                    "dir": str(self.run / "hf" / name),
                    "max_abs_logit_diff": (prov.get("hf_verification") or {}).get("max_abs_logit_diff"),
                }
            except ConfigError as exc:  # e.g. a per-layer child the stock architecture cannot express
                out[name] = {"refused": str(exc)}
        proof = next((n for n, v in out.items() if "dir" in v), None)
        if proof is not None:
            out["_proof"] = _transformers_generate(self.run / "hf" / proof)
            print(f"transformers loaded {proof} and generated: {out['_proof']['text']!r}")
        return out

    def _tokens_seen(self) -> int:
        return read_json(self.run / "parent" / "config.json")["meta"].get("tokens_seen", 0)

    def _finetune_budget(self) -> int:
        """Tokens of every fine-tune and distillation: finetune_fraction of the parent's training
        tokens (at least one batch); what phase_finetune spent, once it ran."""
        spent = self.state["phases"].get("finetune", {}).get("outputs", {})
        done = next((v["tokens"] for v in spent.values() if isinstance(v, dict) and "tokens" in v), None)
        return done or max(
            int(self._tokens_seen() * self.finetune_fraction), self.recipe.train.batch_size * self.recipe.data.seq_len
        )

    def phase_finetune(self) -> dict:
        from .phases import finetune, finished_finetune

        tokens_seen = self._tokens_seen()
        out = {}
        for name, ch in self._children().items():
            folder = self.run / "finetuned" / name
            res = finished_finetune(folder) or finetune(  # one that finished before an interruption stays
                self.run / "children" / name,
                folder,
                teacher_run=self.run,
                tokens=self._finetune_budget(),
                task_weights=ch.get("objective"),  # a targeted child: its own task mix
                lr=self.recipe.train.lr * FINETUNE_LR_SCALE,
                resume=folder.exists(),
                device=self.recipe.train.device,
            )
            out[name] = {
                "dir": str(folder / "model"),
                "tokens": res.tokens,
                "fraction_of_parent_tokens": res.tokens / max(tokens_seen, 1),
                "val_before": res.val_before,
                "val_after": res.val_after,
                "kd_before": res.kd_before,
                "kd_after": res.kd_after,
                "kept": res.kept,
            }
        return out

    def _models_to_eval(self) -> dict[str, Path]:
        models = {"parent": self.run / "parent"}
        for name in self._children():
            models[f"{name}"] = self.run / "children" / name
            models[f"{name}-ft"] = self.run / "finetuned" / name / "model"
        return models

    def phase_eval(self) -> dict:
        return {"results": self._evaluate(self._models_to_eval(), "eval/results.json")}

    def _evaluate(self, models: dict[str, Path], rel: str) -> dict:
        from .evaluate_run import evaluate_folders

        path = self.run / rel
        return evaluate_folders(
            models, self.run, path, max_examples=self.eval_examples, device=self.recipe.train.device
        )

    def phase_baseline(self) -> dict:
        """The alternatives a user would pick instead of elastic training, each measured on the same
        data: the dense parent (the parent's architecture trained normally, equal tokens), and for
        the reference child (every child with baselines='all') its architecture from scratch on
        the parent's tokens and the dense parent pruned to its shape and distilled with the
        child's fine-tune budget. 'all' adds the dense parent at equal training FLOPs, one-shot
        expert pruning where the shape allows it, and retrofit: the dense parent trained
        elastically for the fine-tune budget and for RETROFIT_BUDGETS times it, each child's shape
        extracted from it and fine-tuned with the same budget."""
        from .phases import BASELINE_MODEL, baseline, retrofit_child_dirs

        children = self._children()
        names = list(children)[:1] if self.baselines == "reference" else list(children)
        tokens_seen = self._tokens_seen()
        ft_budget = self._finetune_budget()
        outs: dict[str, dict] = {}
        dirs: dict[str, Path] = {}

        def run(key: str, models: dict[str, str], folder: str | None = None, **kw) -> None:
            """baselines/<folder or key>; `models`: eval name -> model folder inside it."""
            out = self.run / "baselines" / (folder or key)
            kw.setdefault("resume", out.exists())
            try:
                done = baseline(self.run, name=folder or key, progress=self.progress, **kw)
            except ConfigError as exc:  # e.g. expert-prune of a shape that also cuts layers
                outs[key] = {"refused": str(exc)}
                print(f"  {key}: not run, {exc}")
                return
            outs[key] = {
                "dir": str(done),
                "method": kw.get("method", "scratch"),
                **{k: v for k, v in kw.items() if k in ("arch", "tokens", "finetune_tokens")},
            }
            dirs.update({label: done / rel for label, rel in models.items()})

        def one(label: str, method: str = "scratch") -> dict[str, str]:
            return {label: BASELINE_MODEL[method]}

        run("dense-parent", one("parent (dense, equal tokens)"), method="dense-parent", tokens=tokens_seen)
        if self.baselines == "all":
            ledger = Ledger(self.run / "ledger.jsonl")
            flops = ledger.totals("train", run=ledger.ref(self.run))["flops"]
            per_token = cost(self.recipe.model, None, self.recipe.data.seq_len).flops_train
            run(
                "dense-parent-flops",
                one("parent (dense, equal FLOPs)"),
                method="dense-parent",
                tokens=max(int(flops / per_token), 1),
            )
        lr = self.recipe.train.lr * FINETUNE_LR_SCALE  # what phase_finetune gives the elastic children
        for name in names:
            spec = children[name]["subnet"]
            run(name, one(f"{name} (from scratch)"), arch=spec, tokens=tokens_seen)
            pd = "prune-distill"
            run(f"{name}-{pd}", one(f"{name} ({pd})", pd), arch=spec, method=pd, tokens=ft_budget, lr=lr)
            if self.baselines != "all":
                continue
            run(f"{name}-expert-prune", one(f"{name} (expert-prune)", "expert-prune"), arch=spec, method="expert-prune")
            for key, times in RETROFIT_BUDGETS.items():
                zero, tuned = retrofit_child_dirs(Path(), name)  # inside the retrofit folder
                run(
                    f"{name}-{key}",
                    {f"{name} ({key}, zero-shot)": str(zero), f"{name} ({key} + fine-tune)": str(tuned)},
                    folder=key,
                    arch=spec,
                    method="retrofit",
                    tokens=times * ft_budget,
                    finetune_tokens=ft_budget,
                    lr=lr,
                    child=name,
                )
        self._evaluate(dirs, "eval/baseline.json")
        return outs

    def phase_report(self) -> dict:
        from .report import report_run

        data = report_run(self.run)
        print((self.run / "report.md").read_text())
        return {"report": str(self.run / "report.md"), "break_even": data["break_even"]}


def _transformers_generate(hf_dir: Path, n: int = 12) -> dict:
    """Load an exported folder with stock transformers (offline) and generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt = "kv: "
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return {"prompt": prompt, "text": tok.decode(out[0]), "new_tokens": int(out.shape[1] - ids.shape[1])}


def family_of(names: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, dict]]:
    """(family, targeted) for `run --children`: a subset of DEFAULT_FAMILY and TARGETED by name, the
    first a DEFAULT_FAMILY member (the reference child: the report's and the baselines' first)."""
    known = [*DEFAULT_FAMILY, *TARGETED]
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"--children {','.join(names)}: name each child once, from {', '.join(known)}")
    if names[0] not in DEFAULT_FAMILY:
        one_of = ", ".join(DEFAULT_FAMILY)
        raise ConfigError(f"--children: the first child is the reference and must be one of {one_of}")
    family = {n: DEFAULT_FAMILY[n] for n in names if n in DEFAULT_FAMILY}
    targeted = {n: TARGETED[n] for n in names if n in TARGETED}
    for n, t in targeted.items():
        if t["like"] not in family:
            raise ConfigError(f"--children: {n} is ranked under {t['like']}'s constraints; name {t['like']} too")
    return family, targeted


def run_pipeline(recipe: Recipe, run_dir: Path | str, progress: bool = True, **kwargs: Any) -> dict:
    run_dir = Path(run_dir)
    if recipe.data.source == "shards":
        raise ConfigError(
            "`elasticmoe run` evaluates on raw test text, which pre-tokenized shards do not carry: run the "
            "phases one by one (train, search, extract, export, finetune) with data.source=shards"
        )
    saved = run_dir / "recipe.yaml"
    if saved.exists():
        from .recipe import load_recipe

        if load_recipe(saved).to_dict() != recipe.to_dict():
            raise ConfigError(f"{run_dir} was started with a different recipe ({saved}); use another --out")
    pipe = Pipeline(recipe, run_dir, progress=progress, **kwargs)
    names = [*pipe.family, *pipe.targeted]
    if pipe.state["family"] != names:  # a rerun must not mix two families
        raise ConfigError(
            f"{run_dir} was started with the children {','.join(pipe.state['family'])}, not "
            f"{','.join(names)}; use the same --children or another --out"
        )
    return pipe.run_all()
