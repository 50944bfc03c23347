"""The run recipe: every knob of a run in one validated, serialisable tree (layer 0, no torch).

A recipe file (YAML, TOML or JSON) has the sections below; any key may be overridden on the
command line as `section.key=value`. The resolved recipe is saved as `recipe.yaml` in the run
folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import ConfigError, ElasticSpace, ModelConfig, _from_dict, apply_overrides, load_mapping

SAMPLING_MODES = ("sandwich", "progressive", "budget", "rows")
DEPTH_MODES = ("prefix", "drop")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    source: str = "default"  # "default" (embedded corpus), "files" (text/jsonl/HF dataset) or "shards"
    paths: tuple[str, ...] = ()  # text files/globs, .jsonl, HF dataset folders; or .bin token shards
    eval_paths: tuple[str, ...] = ()  # source=shards: held-out shards, split into val / search / test
    text_field: str = "text"
    scale: float = 1.0  # size of the embedded corpus's generated tasks
    vocab_size: int = 1024  # tokenizer trained on the corpus unless `tokenizer` is given
    tokenizer: str = ""  # path of an existing tokenizer.json
    seq_len: int = 128
    task_weights: dict[str, float] = field(default_factory=dict)  # training mix; empty = natural
    loss_on: str = "all"  # "answers": structured tasks' rows train on their answers only; text on every token
    # the embedded corpus's structured tasks: data.TaskSpec fields to change (levels, level_weights
    # = the training mix over levels, formats, counts), e.g. task_spec.level_weights=[4,3,2,1]
    task_spec: dict[str, Any] = field(default_factory=dict)
    # the embedded corpus's level curriculum: over this fraction of train.steps the structured
    # tasks' levels enter one by one, easiest first (tokens.StratifiedBatches); 0 = off, every
    # level from the first step (the mix of task_spec.level_weights)
    curriculum: float = 0.0
    # packed rows: each token attends only within its own document (an EOS starts one), so an
    # example never sees the keys of the examples packed before it (model.document_mask)
    document_mask: bool = False


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    aux_weight: float = 0.01
    z_weight: float = 0.001
    eval_every: int = 100
    eval_windows: int = 16
    ckpt_every: int = 50
    keep_last: int = 3
    log_every: int = 10
    max_bad_steps: int = 5
    device: str = "auto"
    init_from: str = ""  # a model folder (e.g. from `import-hf`) to start from instead of random weights


@dataclass(frozen=True)
class SamplingConfig:
    mode: str = "sandwich"
    n_random: int = 2
    per_layer: bool = False  # random sub-networks with per-layer choices
    targets: tuple[str, ...] = ()  # fixed Subnet specs trained every step (sandwich) or sampled (budget)
    target_weights: tuple[float, ...] = ()  # budget mode: probabilities over targets
    # the first steps * full_fraction steps train the largest network only, the sandwich the rest:
    # 0.8 costs 1.26x a plain run's FLOPs per token (0.3: 1.91x) and its family is cheaper at every
    # size with children as good (tiny, 2 seeds: bench/RECIPE.md)
    full_fraction: float = 0.8
    # progressive shrinking: fractions of the steps spent in each phase, in this order
    phases: dict[str, float] = field(default_factory=lambda: {"full": 0.1, "depth": 0.15, "experts": 0.15, "all": 0.6})
    # mode "rows", the cheap elastic step: each row of a batch runs one configuration. In every
    # block of batch_size / row_blocks rows the largest trains on the first full_rows of the rows and
    # the sub-networks (the smallest, then n_random random ones, as many as there are rows) on the
    # last sub_rows, in equal groups; a sub-network row the largest did not run gets its teacher
    # logits from a forward of the largest without gradient. Under N ranks row_blocks must be a
    # multiple of N (each rank takes whole blocks), so a run gives the same steps at any world size.
    full_rows: float = 1.0
    sub_rows: float = 0.25
    row_blocks: int = 1
    depth: str = "prefix"  # random sub-networks' layers: a "prefix" of the layer order, or "drop"
    drop_max: float = 0.5  # depth=drop: drop probability of the last layer of the layer order


@dataclass(frozen=True)
class DistillConfig:
    kd_weight: float = 1.0  # KL(largest || sub-network) weight, for all but the largest
    # data cross-entropy weight, for all but the largest: 0 = sub-networks learn from the largest's
    # soft labels only (BigNAS); measured in bench/RECIPE.md
    ce_weight: float = 0.0
    temperature: float = 1.0
    # Weight of all the other sub-networks of a step together, shared equally, against 1 for the
    # largest; the step's loss is divided by (1 + subnet_weight) so its gradient has the scale of
    # one network's (gradient clipping then means what it means in a from-scratch run).
    subnet_weight: float = 0.5


@dataclass(frozen=True)
class ReorderConfig:
    at_steps: tuple[int, ...] = ()  # steps after which importance re-ordering is applied
    # also re-order when elastic training starts (after the full-network steps of
    # sampling.full_fraction): the prefixes the sub-networks then train are the important ones
    at_switch: bool = True
    experts_by: str = "mass"  # "mass" (routed probability) or "output" (gate x output norm)
    neurons: bool = True
    layers: bool = True
    batches: int = 4  # importance is measured on batches x 4 validation windows of each task


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    space: ElasticSpace | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    reorder: ReorderConfig = field(default_factory=ReorderConfig)

    def __post_init__(self) -> None:
        if self.space is None:
            object.__setattr__(self, "space", ElasticSpace.default_for(self.model))
        self.validate()

    def validate(self) -> None:
        """Every field's type, range and finiteness, and the cross-field rules; all problems at once."""
        from .config import check_number, check_type

        p: list[str] = []
        try:
            self.space.validate(self.model)
        except ConfigError as exc:
            p.append(str(exc))
        t, d, s, k, r = self.train, self.data, self.sampling, self.distill, self.reorder
        ints = {  # field: lowest allowed value
            "train.steps": 1,
            "train.batch_size": 1,
            "train.warmup": 0,
            "train.seed": 0,
            "train.eval_every": 1,
            "train.eval_windows": 1,
            "train.ckpt_every": 1,
            "train.keep_last": 1,
            "train.log_every": 1,
            "train.max_bad_steps": 1,
            "sampling.n_random": 0,
            "reorder.batches": 1,
            "data.vocab_size": 2,
            "sampling.row_blocks": 1,
        }
        # field: (low, high, low excluded, high excluded); None = unbounded
        floats = {
            "train.lr": (0, None, True, False),
            "train.min_lr_ratio": (0, 1, False, False),
            "train.weight_decay": (0, None, False, False),
            "train.beta1": (0, 1, False, True),
            "train.beta2": (0, 1, False, True),
            "train.grad_clip": (0, None, True, False),
            "train.aux_weight": (0, None, False, False),
            "train.z_weight": (0, None, False, False),
            "data.scale": (0, None, True, False),
            "data.curriculum": (0, 1, False, False),
            "sampling.full_fraction": (0, 1, False, False),
            "sampling.full_rows": (0, 1, True, False),
            "sampling.sub_rows": (0, 1, True, False),
            "sampling.drop_max": (0, 1, False, False),
            "distill.kd_weight": (0, None, False, False),
            "distill.ce_weight": (0, None, False, False),
            "distill.temperature": (0, None, True, False),
            "distill.subnet_weight": (0, None, False, False),
        }
        sections = {"train": t, "data": d, "sampling": s, "distill": k, "reorder": r}

        def value(dotted: str):
            section, name = dotted.split(".")
            return getattr(sections[section], name)

        for name, lo in ints.items():
            check_number(p, name, value(name), lo, 2**32 - 1 if name == "train.seed" else None, integer=True)
        for name, (lo, hi, lo_open, hi_open) in floats.items():
            check_number(p, name, value(name), lo, hi, lo_open=lo_open, hi_open=hi_open)
        for name in ("data.text_field", "data.tokenizer", "train.init_from", "train.device", "data.source"):
            check_type(p, name, value(name), str)
        for name in ("data.paths", "data.eval_paths", "sampling.targets"):
            check_type(p, name, value(name), tuple, str)
        bools = ("sampling.per_layer", "reorder.neurons", "reorder.layers", "reorder.at_switch", "data.document_mask")
        for name in bools:
            check_type(p, name, value(name), bool)
        for name in ("data.task_weights", "sampling.phases"):
            mapping = value(name)
            if check_type(p, name, mapping, dict):
                for key, w in mapping.items():
                    check_number(p, f"{name}.{key}", w, 0)
                if mapping and all(isinstance(w, (int, float)) for w in mapping.values()) and not sum(mapping.values()):
                    p.append(f"{name} weights sum to 0")
        if check_type(p, "sampling.target_weights", s.target_weights, tuple):
            for i, w in enumerate(s.target_weights):
                check_number(p, f"sampling.target_weights[{i}]", w, 0)
        if check_type(p, "reorder.at_steps", r.at_steps, tuple):
            for i, step in enumerate(r.at_steps):
                check_number(p, f"reorder.at_steps[{i}]", step, 1, integer=True)
        if t.device not in DEVICE_CHOICES:
            p.append(f"train.device={t.device!r}; allowed {list(DEVICE_CHOICES)}")
        if d.source not in ("default", "files", "shards"):
            p.append(f"data.source={d.source!r}; allowed ['default', 'files', 'shards']")
        if d.source == "files" and not d.paths:
            p.append("data.paths is empty; give text/jsonl files or globs when data.source=files")
        if d.source == "shards" and not (d.paths and d.eval_paths and d.tokenizer):
            p.append(
                "data.source=shards needs data.paths (training shards), data.eval_paths (held-out shards) "
                "and data.tokenizer (the tokenizer.json the shards were made with)"
            )
        check_number(p, "data.seq_len", d.seq_len, 2, self.model.max_seq_len, integer=True)
        if not d.tokenizer and d.vocab_size != self.model.vocab_size:
            p.append(f"data.vocab_size={d.vocab_size!r} must equal model.vocab_size={self.model.vocab_size}")
        if check_type(p, "data.task_spec", d.task_spec, dict) and d.task_spec:
            from .data import task_spec_from

            try:
                task_spec_from(d.task_spec)
            except ConfigError as exc:
                p.append(f"data.task_spec: {exc}")
        if isinstance(d.curriculum, (int, float)) and d.curriculum > 0 and d.source != "default":
            p.append(f"data.curriculum={d.curriculum} needs graded tasks: only data.source=default has them")
        if d.loss_on not in ("all", "answers"):
            p.append(f"data.loss_on={d.loss_on!r}; allowed ['all', 'answers']")
        if s.mode not in SAMPLING_MODES:
            p.append(f"sampling.mode={s.mode!r}; allowed {list(SAMPLING_MODES)}")
        if s.mode == "budget" and not s.targets:
            p.append("sampling.mode=budget needs sampling.targets (Subnet specs)")
        if isinstance(s.target_weights, tuple) and s.target_weights and len(s.target_weights) != len(s.targets):
            p.append(f"sampling.target_weights has {len(s.target_weights)} values for {len(s.targets)} targets")
        if s.depth not in DEPTH_MODES:
            p.append(f"sampling.depth={s.depth!r}; allowed {list(DEPTH_MODES)}")
        if s.mode == "rows" and isinstance(s.row_blocks, int) and s.row_blocks >= 1:
            rows = t.batch_size // s.row_blocks if isinstance(t.batch_size, int) else 0
            if t.batch_size % s.row_blocks or rows < 2:
                p.append(
                    f"sampling.row_blocks={s.row_blocks} must divide train.batch_size={t.batch_size} into blocks of "
                    "at least 2 rows (one for the largest, one for a sub-network)"
                )
        fr, sr = s.full_rows, s.sub_rows
        if s.mode == "rows" and all(isinstance(v, (int, float)) for v in (fr, sr)) and fr + sr < 1:
            p.append(f"sampling.full_rows={fr} + sampling.sub_rows={sr} < 1 leaves rows of every batch unused")
        if s.mode == "rows" and s.targets:
            p.append("sampling.targets are trained by the sandwich and budget modes, not by mode=rows")
        if s.mode == "progressive" and isinstance(s.phases, dict):
            bad = sorted(set(s.phases) - {"full", "depth", "experts", "all"})
            if bad:
                p.append(f"sampling.phases has unknown phase(s) {bad}; allowed full, depth, experts, all")
        if r.experts_by not in ("mass", "output"):
            p.append(f"reorder.experts_by={r.experts_by!r}; allowed ['mass', 'output']")
        if p:
            raise ConfigError("; ".join(p))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.to_dict(), "space": self.space.to_dict()}
        for name in ("data", "train", "sampling", "distill", "reorder"):
            section = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"recipe: unknown section(s) {unknown}; allowed: {sorted(allowed)}")
        model = ModelConfig.from_dict(data.get("model", {}))
        space = ElasticSpace.from_dict(data["space"]) if data.get("space") else None
        kwargs = {
            "data": _from_dict(DataConfig, data.get("data", {}), "data"),
            "train": _from_dict(TrainConfig, data.get("train", {}), "train"),
            "sampling": _from_dict(SamplingConfig, data.get("sampling", {}), "sampling"),
            "distill": _from_dict(DistillConfig, data.get("distill", {}), "distill"),
            "reorder": _from_dict(ReorderConfig, data.get("reorder", {}), "reorder"),
        }
        return cls(model=model, space=space, **kwargs)


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or a preset name like `tiny`), apply `key=value` overrides, validate."""
    if path is None:
        path = "tiny"
    p = Path(path)
    if not p.exists() and (PRESETS_DIR / f"{path}.yaml").exists():
        p = PRESETS_DIR / f"{path}.yaml"
    data = load_mapping(p)
    return Recipe.from_dict(apply_overrides(data, overrides or []))
